"""UL2 pretraining of a ~1B decoder-only model on a TPU v5p-32 slice.

Variants: ``configs/ul2_pod.py`` (v5p-32, below), ``:v5p-8`` (one host of
4 chips, batch 64: the same 16 rows per chip) and ``:2slice`` (two v5p-32
slices over the data-centre network, batch 512: ``mesh.*`` lays out one
slice and the slices multiply ``data``, as MaxText's
``dcn_data_parallelism``; only the data-parallel gradient reduction crosses
DCN). Per-chip memory of the train step and the compiler's step estimate,
from ``--compile_for``'s compile on a CPU host (jax 0.10.2 + libtpu
0.0.42.1, 2026-12-03; see ``benchmarks/RESULTS.md``):

* v5p-32 (16 chips, ``data=1 fsdp=16``): 8.26 of 95 GiB per chip
  (arguments 0.69, temp 7.53); compiler step estimate 0.592 s (77% MFU,
  XLA's idealised figure: an upper bound, not a timing); 80 s to compile.
* ``:v5p-8`` (4 chips, ``fsdp=4``): 11.42 GiB (arguments 2.75, temp 8.63);
  step estimate 0.598 s; 96 s to compile.
* ``:2slice`` (2 x 16 chips, ``data=2 fsdp=16``): 9.08 GiB (arguments 0.69,
  temp 8.30); no step estimate: libtpu's cost model returns a negative time
  for the multi-slice step (the report says so); 121 s to compile.

Compile a variant on any host with the ``[tpu]`` extra::

  python launch/tpu_train.py --config=configs/ul2_pod.py:2slice \\
      --workdir=/tmp/aot_2slice --compile_for=v5p-32 --compile_slices=2

Run the same command on every host of the slice (``jax.distributed`` starts
automatically on a pod)::

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="\\
    python launch/tpu_train.py --config=configs/ul2_pod.py \\
      --workdir=gs://$BUCKET/ul2_1b \\
      --config.tokenizer.path=/tmp/t5_spm.model \\
      --config.data.tfds_data_dir=gs://$BUCKET/tensorflow_datasets"

Before that: copy T5's SentencePiece vocabulary to every host
(``gsutil cp gs://t5-data/vocabs/cc_all.32000/sentencepiece.model
/tmp/t5_spm.model``; tokenizer files must be local) and prepare C4 in the
ArrayRecord format (``tfds build c4/en:3.1.0 --file_format=array_record``).

Arithmetic (``tests/objectives/test_ul2_objective.py`` recomputes the exact
numbers from this config):

* Slice: v5p-32 = 16 chips (32 TensorCores; one JAX device per chip), 4
  hosts with 4 chips each; 95 GiB HBM and 459 TFLOP/s (bf16) per chip.
* Model: d_model 2048, 18 layers, 16 query / 8 key-value heads of 128,
  SwiGLU 5632, vocabulary 32768 (T5's 32000 pieces + BOS + 3 mode tokens +
  256 sentinels, padded), untied: 983,640,064 parameters.
* Mesh: ``data=1, fsdp=16, tensor=1``: every parameter and Adam moment is
  sharded 16 ways; the batch is split 16 ways.
* Batch: 256 rows x 2048 tokens = 524,288 tokens per step, 16 rows per chip,
  64 rows per host; 38,000 steps = 19.9B tokens (about 20 tokens per
  parameter, Chinchilla's ratio).
* Memory per chip, params + Adam state in fp32: 983.6M x 4 B x 3 / 16 =
  0.69 GiB (11.0 GiB in all), plus 0.23 GiB of fp32 gradients. Activations
  (estimate): with ``remat='full'`` the 18 saved block inputs take
  16 x 2048 x 2048 x 2 B x 18 = 2.25 GiB; the fp32 logits 16 x 2048 x 32768
  x 4 B = 4 GiB and their gradient as much; far below 95 GiB.
* FLOPs: 6,404,702,208 model FLOPs per token (``flops_per_token``: 6 N over
  the matmul parameters plus 12 L H Dh T for attention), 3.36 PFLOP per step.
  The slice peaks at 16 x 459 = 7,344 TFLOP/s.
* Step time (estimate, assuming 40% MFU, not measured): 3.36 PFLOP /
  (0.4 x 7,344 TFLOP/s) = 1.14 s per step, ~459k tokens/s (~115k per host,
  ~29k per chip); the 38,000 steps take ~12 hours.
* Data (estimate): each host must produce ~115k tokens/s of UL2 examples.
  ``benchmarks/ul2_data.py --pipeline_seq_lens=2048`` measured ~0.95M
  tokens/s at 2048 tokens per row on one core of the 2-core dev container
  (``benchmarks/RESULTS.md``; the demo's 2048-piece tokenizer on Python
  sources, not T5's on C4), about 8x the need before any reader threads.
"""

from alignax import defaults
from alignax.data import ul2


VARIANTS = ("v5p-32", "v5p-8", "2slice")


def get_config(arg=None):
  variant = arg or "v5p-32"
  if variant not in VARIANTS:
    raise ValueError(f"configs/ul2_pod.py:{arg}: use one of {VARIANTS}")
  c = defaults.base_config()
  c.objective = "ul2"  # token cross-entropy + per-denoiser metrics
  c.data.task = "ul2"  # documents -> UL2 examples -> packed rows
  c.data.ul2.preset = "ul2"  # the seven denoisers of the UL2 paper
  c.data.ul2.rates = ()  # uniform mixing, as the paper
  c.data.ul2.s_split = "fixed"  # S: the last 25% of a window is the target

  c.model.vocab_size = 32768  # T5 vocabulary + reserved ids, padded
  c.model.d_model = 2048  # residual width
  c.model.n_layers = 18  # blocks: 983.6M parameters in all
  c.model.n_heads = 16  # query heads of 128
  c.model.n_kv_heads = 8  # grouped-query attention, 2 queries per kv head
  c.model.head_dim = 128  # width of one head
  c.model.d_ff = 5632  # SwiGLU hidden width (2.75 x d_model)
  c.model.max_seq_len = 2048  # row length
  c.model.dtype = "bfloat16"  # compute dtype on TPU
  c.model.param_dtype = "float32"  # master weights and Adam state in fp32
  c.model.remat = "full"  # keep only block inputs for the backward pass

  c.mesh.data = 1  # no replicated data parallelism
  c.mesh.fsdp = -1  # all 16 chips shard parameters and the batch
  c.mesh.tensor = 1  # a 1B model needs no tensor parallelism

  c.optimizer.lr = 3e-4  # peak learning rate
  c.optimizer.warmup_steps = 2000  # ~1B tokens of warmup
  c.optimizer.final_lr_ratio = 0.1  # cosine to 3e-5

  c.train.steps = 38_000  # 19.9B tokens
  c.train.batch_size = 256  # global rows per step (16 per chip)
  c.train.seq_len = 2048  # tokens per row: 524,288 per step
  c.train.microbatches = 1  # the batch fits without accumulation
  c.train.z_loss = 1e-4  # keeps bf16 logits' normaliser near one (PaLM)
  c.train.log_every = 100  # steps between metric lines
  c.train.eval_every = 2000  # held-out loss per denoiser
  c.train.eval_batches = 16  # 8.4M held-out tokens per evaluation
  c.train.progress_bar = False  # logs only, on a pod

  c.checkpoint.save_every = 1000  # ~19 minutes of training (estimate)
  c.checkpoint.keep = 3  # checkpoints kept

  c.data.source = "tfds"  # prepared C4 in ArrayRecord format
  c.data.tfds_name = "c4/en:3.1.0"  # English C4
  c.data.num_threads = 16  # reader threads per host
  c.data.prefetch_buffer_size = 256  # documents read ahead per host

  c.tokenizer.kind = "sentencepiece"  # T5's model, loaded from tokenizer.path
  c.tokenizer.path = "/tmp/t5_spm.model"  # local copy (see the docstring)
  c.tokenizer.num_sentinels = ul2.num_sentinels_needed(
      ul2.UL2_DENOISERS, c.train.seq_len + 1)  # 256 at 2048 tokens
  if variant == "v5p-8":  # one host, 4 chips: 16 rows per chip as above
    c.train.batch_size = 64  # 131,072 tokens per step
    c.train.steps = 152_000  # the same 19.9B tokens
    c.data.num_threads = 4  # one host reads for all 4 chips
  elif variant == "2slice":  # two v5p-32 slices joined over DCN
    # mesh.* lays out one slice; the slices multiply data (sharding.make_mesh).
    c.train.batch_size = 512  # 16 rows per chip on 32 chips
    c.train.steps = 19_000  # the same 19.9B tokens
  return c
