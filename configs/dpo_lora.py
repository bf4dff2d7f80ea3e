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

import importlib.util
import os


def _dpo_from_hf():
  """``configs/dpo_from_hf.py`` beside this file (configs are no package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "dpo_from_hf.py")
  spec = importlib.util.spec_from_file_location("alignax_dpo_from_hf", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _dpo_from_hf().get_config(arg)  # TRL-like DPO from an HF directory
  c.reference = "base"  # the policy with its adapters off: no second copy
  c.lora.enabled = True  # adapters on the targets, the base frozen
  c.lora.rank = 16  # adapter rank
  c.lora.alpha = 32.0  # scale alpha / rank = 2
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # all linear kernels
  c.optimizer.lr = 5e-6  # LoRA DPO learning rate
  return c
