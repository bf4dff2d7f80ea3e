"""LoRA DPO of a Hugging Face model; the reference is the base model itself.

``configs/dpo_from_hf.py`` with LoRA adapters (``alignax.models.lora``) on
every attention and MLP kernel: only the adapters get gradients and optimizer
state, and the DPO reference is the same weights with the adapters switched
off (``reference='base'``, TRL's PEFT reference), so there is no frozen
copy. The adapters' B starts at zero, so step 0's sigmoid DPO loss is
exactly log 2. Run:

  python launch/tpu_train.py --config=configs/dpo_lora.py:HF_DIR \\
      --workdir=/tmp/dpo_lora --config.data.paths=prefs.jsonl
  # a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
  python -m alignax.interop.peft export /tmp/dpo_lora /tmp/dpo_lora/peft --base=HF_DIR
  # or the adapters merged into plain Hugging Face weights
  python -m alignax.interop.hf export /tmp/dpo_lora /tmp/dpo_lora/hf --like=HF_DIR

The learning rate follows PEFT/TRL LoRA-DPO practice (5e-6, far above full
fine-tuning's 5e-7: the low-rank update is small and starts at zero); rank
16, alpha 32 as in the alignment handbook's LoRA recipes.
"""

from alignax import defaults


def get_config(arg=None):
  c = defaults.base_config()
  c.objective = "dpo"  # TRL's DPO (loss_type='sigmoid')
  c.reference = "base"  # the policy with its adapters off: no second copy
  c.lora.enabled = True  # adapters on the targets, the base frozen
  c.lora.rank = 16  # adapter rank
  c.lora.alpha = 32.0  # scale alpha / rank = 2
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # all linear kernels
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
  c.optimizer.lr = 5e-6  # LoRA DPO learning rate
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
