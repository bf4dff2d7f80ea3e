"""DPO on the embedded docstring -> function-name task, from the demo LM.

Pretrain the demo model, then align it with DPO (a few minutes each on a
2-core CPU); held-out preference accuracy (``eval/rewards/accuracies``) rises
from 0 (the policy equals its reference: every implicit reward is 0):

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python launch/tpu_train.py --config=configs/dpo_demo.py --workdir=/tmp/alignax_dpo \\
      --config.checkpoint.init_from=/tmp/alignax_demo

Prompts are a function's docstring summary (``# ...\\ndef ``), the chosen
response its true name, the rejected one another function's name (see
``alignax.data.preference_task``); held-out functions come from the
documents the demo LM never trained on. ``eval/logps/accuracies`` is the
policy's own preference (before training: the pretrained LM's). Variants:
``--config.preference.loss_type=ipo`` (any TRL loss type),
``--config.objective=simpo --config.reference=none`` (reference-free), or
``--config.reference=none --config.preference.cache_reference=True``
(reference log-probs computed once before training, then read from disk;
``python -m alignax.reference`` fills the cache without training).
"""

from alignax import defaults


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  c.objective = "dpo"  # TRL's DPO (loss_type='sigmoid')
  c.reference = "frozen"  # the starting parameters, passed to the step
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.data.task = "preference"  # packed preference batches
  c.data.source = "embedded"  # the docstring -> name task
  c.data.preference.format = "pairs"  # prompt / chosen / rejected
  c.data.preference.groups_per_row = 4  # pairs packed per 128-token row
  c.preference.beta = 0.1  # DPO's beta
  c.optimizer.lr = 2e-3  # a little below pretraining's 3e-3
  c.optimizer.warmup_steps = 10  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the reference
  c.train.steps = 300  # a few minutes on 2 CPU cores
  c.train.batch_size = 16  # rows per step (up to 64 pairs)
  c.train.seq_len = 128  # tokens per row
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # held-out preference accuracy / NDCG
  c.train.eval_batches = 8  # the whole held-out split (460 pairs)
  c.checkpoint.save_every = 100  # two checkpoints over the run
  return c
