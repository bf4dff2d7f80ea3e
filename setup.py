"""alignax: a JAX/Flax, TPU-first stack for pretraining and aligning LMs."""
import setuptools

# Versions are pinned to releases tested together; bump them together.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "pyarrow==26.0.1",
    "safetensors==0.8.0",  # Hugging Face weights: checkpoint.init_from=HF_DIR
    "jinja2==3.1.6",  # Hugging Face chat templates (alignax.data.chat)
    "numpy>=2.0",
]

EXTRAS_REQUIRE = {
    # tensorboard views workdir/tb and the profiler's trace; wandb is tested
    # offline.
    "dev": ["pytest==9.2.0", "pytest-xdist==3.8.0", "tensorboard==2.21.0",
            "wandb==0.31.0"],
    "wandb": ["wandb==0.31.0"],  # config.wandb.project
    # torch 2.13.0 CPU lies on disk; pip takes it from there.
    # datasets: data.source='hf' (save_to_disk and Hub-layout directories).
    # peft: the LoRA adapter export is checked by loading it with peft.
    "hf": ["torch==2.13.0", "transformers==5.23.0", "datasets==5.2.0",
           "peft==0.21.2"],
    "notebooks": ["matplotlib==3.11.2", "nbclient==0.11.0", "ipykernel==7.4.0",
                  "nbformat==5.11.1"],
    # libtpu (0.0.42.*, jax's own pin): Cloud TPU VMs, and --compile_for on
    # any host (alignax.aot); CPU runs keep JAX_PLATFORMS=cpu.
    "tpu": ["jax[tpu]==0.10.2"],
    # CUDA 12 wheels of jaxlib's plugin for local GPU runs.
    "cuda12": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
    name="alignax",
    version="0.1.0",
    description="JAX/Flax stack for UL2 pretraining, contrastive dual "
    "encoders and DPO/LiPO post-training on one sharded model state.",
    packages=setuptools.find_packages(include=["alignax", "alignax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
