"""LiPO-λ on K-lists of the embedded docstring -> function-name task.

Same task as configs/dpo_demo.py, but each prompt comes with K = 4
candidate names graded by their similarity to the true name, and the loss is
LiPO-λ's Lambda-weighted pairwise logistic loss over each list. Held-out
``eval/rewards/accuracies`` (over all differently-graded pairs of a list) and
``eval/rewards/ndcg`` rise as the policy learns to rank names:

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python launch/tpu_train.py --config=configs/lipo_demo.py --workdir=/tmp/alignax_lipo \\
      --config.checkpoint.init_from=/tmp/alignax_demo

``--config.preference.list_loss=list_mle`` (or ``list_softmax``,
``pairwise_logistic``, ``pairwise_hinge``) swaps the listwise loss.
"""

from alignax import defaults


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  c.objective = "lipo"  # listwise preference optimisation
  c.preference.list_loss = "lipo_lambda"  # LiPO-λ (Liu et al., 2024)
  c.reference = "frozen"  # the starting parameters, passed to the step
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.data.task = "preference"  # packed preference batches
  c.data.source = "embedded"  # the docstring -> name task
  c.data.preference.format = "lists"  # prompt / responses / scores
  c.data.preference.list_size = 4  # K candidates per prompt
  c.data.preference.groups_per_row = 3  # lists packed per 128-token row
  c.preference.beta = 0.1  # scale of the implicit rewards
  c.optimizer.lr = 2e-3  # a little below pretraining's 3e-3
  c.optimizer.warmup_steps = 10  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the reference
  c.train.steps = 300  # a few minutes on 2 CPU cores
  c.train.batch_size = 16  # rows per step (up to 48 lists)
  c.train.seq_len = 128  # tokens per row
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # held-out accuracy / NDCG
  c.train.eval_batches = 15  # the whole held-out split (460 lists)
  c.checkpoint.save_every = 100  # three checkpoints over the run
  return c
