"""The complete run configuration with defaults; recipes in configs/ edit it.

Every field a run reads is defined here (with a one-line comment), so an
override of a field that does not exist (``--config.optimizer.lrr=1``) fails
in ml_collections with the field's name, and ``validate`` below rejects
values that are inconsistent with each other.
"""

from __future__ import annotations

import ml_collections

from alignax import sharding


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds parameter init, data order and the step rng
  c.objective = "lm"  # key of train.OBJECTIVES

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0 = the tokenizer's size rounded up to a multiple of 128
  c.model.d_model = 128  # residual width
  c.model.n_layers = 4  # transformer blocks
  c.model.n_heads = 4  # query heads
  c.model.n_kv_heads = 2  # key/value heads (grouped-query attention)
  c.model.head_dim = 32  # width of one head
  c.model.d_ff = 384  # SwiGLU hidden width
  c.model.max_seq_len = 128  # longest sequence the model is used with
  c.model.rope_theta = 10000.0  # RoPE base
  c.model.norm_eps = 1e-6  # RMSNorm epsilon
  c.model.tie_embeddings = False  # share the input embedding with the LM head
  c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
  c.model.param_dtype = "float32"  # parameter dtype (keep fp32)
  c.model.remat = "none"  # none | full | dots_saveable | nothing_saveable
  c.model.attention = "fused"  # fused (jax.nn.dot_product_attention) | einsum
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)  # None | xla | cudnn

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data-parallel ways
  c.mesh.fsdp = -1  # parameter-sharded data-parallel ways (-1 = the rest)
  c.mesh.tensor = 1  # tensor-parallel ways
  c.sharding_rules = tuple(sharding.DEFAULT_RULES)  # logical axis -> mesh axes

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # only AdamW for now
  c.optimizer.lr = 3e-3  # peak learning rate
  c.optimizer.warmup_steps = 20  # linear warmup from 0
  c.optimizer.final_lr_ratio = 0.1  # cosine decays to lr * this
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.95  # Adam beta2
  c.optimizer.eps = 1e-8  # Adam epsilon
  c.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  c.optimizer.schedule_steps = 0  # length of the lr schedule (0 = train.steps)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # optimizer steps
  c.train.batch_size = 16  # global batch (rows) per optimizer step
  c.train.seq_len = 128  # tokens per row
  c.train.microbatches = 1  # gradient accumulation splits of the batch
  c.train.log_every = 10  # steps between metrics.jsonl lines
  c.train.eval_every = 100  # steps between held-out evaluations (0 = never)
  c.train.eval_batches = 8  # held-out batches per evaluation
  c.train.on_nonfinite = "stop"  # stop | skip: what a NaN/Inf step does
  c.train.loss_scaling = False  # dynamic loss scaling (for float16 compute)
  c.train.z_loss = 0.0  # z-loss coefficient of the LM cross-entropy
  c.train.progress_bar = True  # tqdm bar on process 0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 100  # steps between checkpoints
  c.checkpoint.keep = 2  # checkpoints kept
  c.checkpoint.async_save = True  # write in the background
  c.checkpoint.init_from = ""  # start a new run from these parameters (workdir/step dir)

  c.reference = "none"  # none | frozen: the policy's starting params as a frozen model

  c.data = ml_collections.ConfigDict()
  c.data.task = "lm"  # key of train.DATA_TASKS: how records become batches
  c.data.source = "embedded"  # embedded | jsonl | parquet | array_record | tfds
  c.data.paths = ()  # files of the train split (jsonl/parquet/array_record)
  c.data.eval_paths = ()  # files of the held-out split
  c.data.text_field = "text"  # record field holding the text
  c.data.tfds_name = ""  # TFDS dataset name (source=tfds)
  c.data.tfds_data_dir = ""  # TFDS data_dir (source=tfds)
  c.data.skip_malformed = False  # count and skip bad records instead of failing
  c.data.heldout_fraction = 0.02  # embedded corpus: share of documents held out
  c.data.add_bos = False  # prepend BOS to every document
  c.data.ul2 = ml_collections.ConfigDict()  # UL2 mixture (data.task='ul2')
  c.data.ul2.preset = "ul2"  # ul2 (UL2 Table 1, 7 denoisers) | ul2r (U-PaLM, 4)
  c.data.ul2.denoisers = ()  # e.g. ("R(0.15,3)", "X(0.5,64)", "S(0.25)"); () = preset
  c.data.ul2.rates = ()  # mixing weight per denoiser; () = uniform (as the paper)
  c.data.ul2.s_split = "fixed"  # fixed (paper: last 25% target) | uniform (T5)

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "sentencepiece"  # sentencepiece (trained on first use) | hf
  c.tokenizer.vocab_size = 2048  # base SentencePiece vocabulary
  c.tokenizer.num_sentinels = 100  # reserved <extra_id_i> ids at the top
  c.tokenizer.path = ""  # tokenizer.json for kind=hf
  c.tokenizer.cache_dir = ""  # where the trained model is cached ("" = workdir/tokenizer)
  return c


def validate(c: ml_collections.ConfigDict, *, num_devices: int,
             batch_ways: int) -> None:
  """Raises ``ValueError`` naming the field for inconsistent settings."""
  t = c.train
  if t.steps <= 0:
    raise ValueError(f"config.train.steps={t.steps} must be > 0")
  if t.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"config.train.on_nonfinite={t.on_nonfinite!r}: use "
                     "'stop' or 'skip'")
  if t.microbatches <= 0 or t.batch_size % t.microbatches:
    raise ValueError(f"config.train.batch_size={t.batch_size} must be a "
                     f"multiple of config.train.microbatches={t.microbatches}")
  if (t.batch_size // t.microbatches) % batch_ways:
    raise ValueError(
        f"config.train.batch_size={t.batch_size} / microbatches="
        f"{t.microbatches} must divide over the {batch_ways} data x fsdp "
        f"ways of the mesh ({num_devices} devices)")
  if t.seq_len > c.model.max_seq_len:
    raise ValueError(f"config.train.seq_len={t.seq_len} exceeds "
                     f"config.model.max_seq_len={c.model.max_seq_len}")
  if c.reference not in ("none", "frozen"):
    raise ValueError(f"config.reference={c.reference!r}: use 'none' or 'frozen'")
  from alignax import train  # late import: train imports this module
  if c.objective not in train.OBJECTIVES:
    raise ValueError(f"config.objective={c.objective!r}: known objectives "
                     f"are {sorted(train.OBJECTIVES)}")
  if c.data.task not in train.DATA_TASKS:
    raise ValueError(f"config.data.task={c.data.task!r}: known tasks are "
                     f"{sorted(train.DATA_TASKS)}")
