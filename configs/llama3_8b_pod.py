"""Llama-3-8B on a TPU v5p-128 slice: UL2 pretraining or DPO (frozen reference).

``--config=configs/llama3_8b_pod.py`` (or ``...:ul2``) continues pretraining
Llama 3 8B with the UL2 mixture; ``...:dpo`` aligns it with DPO against the
frozen starting parameters. Check that a variant fits before taking a slice
(any host with ``pip install -e '.[tpu]'``, no TPU needed)::

  python launch/tpu_train.py --config=configs/llama3_8b_pod.py:dpo \\
      --workdir=/tmp/aot_8b_dpo --compile_for=v5p-128

then run the same command without ``--compile_for`` on every host of the
slice, with the model in ``checkpoint.init_from`` (a Hugging Face
directory: its ``config.json`` and ``tokenizer.json`` are read, the
vocabulary grows to the ids the tokenizer reserves) and the data in
``data.paths``.

Arithmetic:

* Slice: v5p-128 = 64 chips, 16 hosts; 95 GiB HBM and 459 TFLOP/s (bf16)
  per chip. Mesh ``data=1, fsdp=64, tensor=1``: parameters and Adam moments
  (fp32) sharded 64 ways, 8.03B x 12 B / 64 = 1.5 GiB per chip; each
  layer's weights are gathered (bf16) only while it runs, and every chip
  keeps its own rows of activations (``alignax.sharding``).
* Model: Llama 3 8B, d_model 4096, 32 layers, 32 query / 8 key-value heads
  of 128, SwiGLU 14336, RoPE theta 500k, untied; vocabulary 128256 + the
  UL2 mode tokens and 256 sentinels (UL2), padded to 128.
* Batch: 256 rows x 2048 tokens = 524,288 tokens per step, 4 rows per
  chip; full rematerialisation of each block.
* FLOPs: ``flops_per_token(2048)`` = 6 x 7.50B matmul parameters + 12 L H
  Dh T = 48.2 GFLOP per token; DPO adds the reference's forward (a third).

Compiled for v5p-128 on a CPU host (jax 0.10.2, libtpu 0.0.42.1; the
train step alone, ``aot.compile_for(..., layer_cost_estimate=False,
eval_step=False)``, 13 minutes on a loaded 2-core container):

* ``:dpo`` (policy + frozen reference, 4 x 2048 per chip): 8.37 GiB of
  95 GiB per chip (arguments 1.87 GiB: the fp32 shards of the parameters,
  both Adam moments and the reference, 8.03B x 16 B / 64; temp 6.40 GiB);
  fits. Model FLOPs 33.7 PFLOP per step (the reference's forward included).
* ``:ul2`` (4 x 2048 per chip; compiled 2026-12-03 in 103 s on the quiet
  container, with the 1- and 2-layer unrolled compiles for the estimate):
  7.88 GiB of 95 GiB per chip (arguments 1.41 GiB, temp 6.40 GiB); fits.
  XLA's idealised step estimate 1.212 s (71% MFU: an upper bound, not a
  timing); model FLOPs 25.3 PFLOP per step.

``--compile_for`` also compiles the eval step and, for the step estimate,
the step with 1 and 2 unrolled layers (see ``alignax.aot``).
"""

from alignax import defaults
from alignax.data import ul2

VARIANTS = ("ul2", "dpo", "grpo")


def _llama3_8b(c):
  c.model.d_model = 4096  # residual width
  c.model.n_layers = 32  # blocks
  c.model.n_heads = 32  # query heads of 128
  c.model.n_kv_heads = 8  # grouped-query attention, 4 queries per kv head
  c.model.head_dim = 128  # width of one head
  c.model.d_ff = 14336  # SwiGLU hidden width
  c.model.rope_theta = 500000.0  # Llama 3's RoPE base
  c.model.norm_eps = 1e-5  # Llama 3's RMSNorm epsilon
  c.model.max_seq_len = 8192  # Llama 3's context
  c.model.dtype = "bfloat16"  # compute dtype on TPU
  c.model.param_dtype = "float32"  # master weights and Adam state in fp32
  c.model.remat = "full"  # keep only block inputs for the backward pass


def get_config(arg=None):
  variant = arg or "ul2"
  if variant not in VARIANTS:
    raise ValueError(f"configs/llama3_8b_pod.py:{variant}: variants are "
                     f"{VARIANTS}")
  c = defaults.base_config()
  _llama3_8b(c)
  c.mesh.data = 1  # no replicated data parallelism
  c.mesh.fsdp = -1  # all 64 chips shard parameters and the batch
  c.mesh.tensor = 1  # 8B needs no tensor parallelism at 4 rows per chip

  c.train.batch_size = 256  # global rows per step (4 per chip)
  c.train.seq_len = 2048  # tokens per row: 524,288 per step
  c.train.microbatches = 1  # the batch fits without accumulation
  c.train.log_every = 50  # steps between metric lines
  c.train.eval_every = 1000  # held-out evaluation
  c.train.eval_batches = 8  # held-out batches per evaluation
  c.train.progress_bar = False  # logs only, on a pod
  c.checkpoint.save_every = 500  # steps between checkpoints
  c.checkpoint.keep = 2  # checkpoints kept
  c.checkpoint.init_from = "/tmp/Meta-Llama-3-8B"  # HF directory (local copy)
  c.tokenizer.kind = "hf"  # Llama 3's tokenizer.json
  c.tokenizer.path = "/tmp/Meta-Llama-3-8B/tokenizer.json"  # local copy
  c.data.source = "jsonl"  # records in data.paths / data.eval_paths

  if variant == "ul2":
    c.objective = "ul2"  # token cross-entropy + per-denoiser metrics
    c.data.task = "ul2"  # documents -> UL2 examples -> packed rows
    c.data.ul2.preset = "ul2"  # the seven denoisers of the UL2 paper
    c.tokenizer.num_sentinels = ul2.num_sentinels_needed(
        ul2.UL2_DENOISERS, c.train.seq_len + 1)  # 256 at 2048 tokens
    # 128256 + 3 mode tokens + 256 sentinels, padded to 128.
    c.model.vocab_size = 128640  # must cover the grown tokenizer
    c.optimizer.lr = 1e-4  # continued pretraining
    c.optimizer.warmup_steps = 500  # ~0.26B tokens
    c.train.steps = 20_000  # 10.5B tokens
    c.train.z_loss = 1e-4  # keeps bf16 logits' normaliser near one
  elif variant == "grpo":
    c.objective = "grpo"  # TRL's GRPO, loss_type dapo, beta 0 (no reference)
    c.data.task = "lm"  # unused: alignax.rl builds the rollout batches
    c.grpo.num_generations = 8  # G samples per prompt: 32 prompts per step
    c.grpo.max_completion_length = 1536  # after prompts of up to 512 tokens
    c.grpo.beta = 0.0  # TRL's default: no KL term, no reference model
    c.grpo.num_iterations = 1  # on-policy: old log-probs are the current ones
    c.tokenizer.num_sentinels = 0  # no UL2 sentinels
    c.model.vocab_size = 128256  # Llama 3's vocabulary
    c.optimizer.lr = 1e-6  # GRPO on an 8B model
    c.optimizer.warmup_steps = 10  # short warmup
    c.optimizer.weight_decay = 0.0
    c.train.steps = 1_000  # rollout steps
  else:
    c.objective = "dpo"  # TRL's DPO (loss_type='sigmoid')
    c.reference = "frozen"  # the starting parameters, a second argument
    c.data.task = "preference"  # packed preference batches
    c.data.preference.format = "pairs"  # prompt / chosen / rejected
    c.data.preference.groups_per_row = 2  # pairs packed per row
    c.data.preference.max_prompt_len = 512  # prompt tokens kept
    c.data.preference.max_response_len = 512  # tokens kept per response
    c.tokenizer.num_sentinels = 0  # no UL2 sentinels
    c.model.vocab_size = 128256  # Llama 3's vocabulary
    c.preference.beta = 0.1  # DPO's beta
    c.optimizer.lr = 5e-7  # DPO on an 8B model (Zephyr / Tulu)
    c.optimizer.warmup_steps = 100  # short warmup
    c.optimizer.weight_decay = 0.0  # stay near the reference
    c.train.steps = 2_000  # ~1M pairs
  return c
