"""DPO of a Hugging Face model on TRL-format preference data.

The starting point of a TRL user: a local Hugging Face causal LM (Llama,
Mistral, Qwen2/3, Gemma/Gemma 2 with ``config.json``, ``*.safetensors`` and
``tokenizer.json``) and preference records in TRL's formats: explicit
``{"prompt", "chosen", "rejected"}`` or implicit-prompt
``{"chosen", "rejected"}``, plain strings or chat messages (rendered with
the model's own chat template), in ``.jsonl``, ``.jsonl.gz`` or Parquet
(``--config.data.source=parquet``). Run:

  python launch/tpu_train.py --config=configs/dpo_from_hf.py:HF_DIR \\
      --workdir=/tmp/dpo_hf --config.data.paths=prefs.jsonl
  python -m alignax.interop.hf export /tmp/dpo_hf /tmp/dpo_hf/hf --like=HF_DIR
  python -m alignax.generate --workdir=/tmp/dpo_hf --prompt="Hello"

The model and tokenizer come from ``HF_DIR`` (``config.model`` fields other
than dtype/remat/attention are replaced). Without ``data.eval_paths`` a
hashed ``data.eval_fraction`` of the training records is held out. The
optimisation follows TRL's ``DPOConfig`` and the alignment handbook's DPO
recipes rather than the toy demos: learning rate 5e-7 with 10% warmup and
decay to 0, no weight decay, beta 0.1, bfloat16 compute over fp32 weights.
"""

from alignax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.objective = "dpo"  # TRL's DPO (loss_type='sigmoid')
  c.reference = "frozen"  # the starting model, frozen, as TRL's ref_model
  c.checkpoint.init_from = arg or ""  # the HF directory (config arg)
  c.model.dtype = "bfloat16"  # compute dtype (weights stay fp32)
  c.model.remat = "full"  # recompute activations: rows of 2k tokens fit
  c.data.task = "preference"  # packed preference batches
  c.data.source = "jsonl"  # jsonl (also .jsonl.gz / .zst) | parquet
  c.data.paths = ()  # the training files (required)
  c.data.eval_paths = ()  # held-out files; () = carve eval_fraction out
  c.data.eval_fraction = 0.05  # share of paths' records held out
  c.data.preference.format = "pairs"  # TRL's pairs (explicit or implicit)
  c.data.preference.max_prompt_len = 512  # TRL's max_prompt_length
  c.data.preference.max_response_len = 512  # TRL: max_length - prompt
  c.data.preference.groups_per_row = 2  # pairs packed per 2048-token row
  c.preference.beta = 0.1  # TRL's default beta
  c.optimizer.lr = 5e-7  # alignment-handbook DPO learning rate
  c.optimizer.warmup_steps = 100  # 10% of train.steps
  c.optimizer.final_lr_ratio = 0.0  # decay to 0, as TRL's schedulers
  c.optimizer.weight_decay = 0.0  # TRL's default
  c.train.steps = 1000  # optimizer steps
  c.train.batch_size = 32  # rows per step (up to 64 pairs)
  c.train.seq_len = 2048  # tokens per row: prompt + chosen + rejected
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # held-out reward accuracy and margins
  c.train.eval_batches = 8  # held-out batches per evaluation
  c.checkpoint.save_every = 250  # steps between checkpoints
  return c
