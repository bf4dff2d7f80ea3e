"""On-policy LiPO-λ rounds on the embedded docstring -> function-name task.

Each round samples K = 4 names per docstring prompt from the current policy
(temperature 1), scores them by their similarity to the true name (the
task's computed reward), and trains LiPO-λ on those lists, starting from
and referenced to the round's policy (see ``alignax.onpolicy``). Held-out
greedy mean reward and exact match are printed per round (round -1 = the
pretrained LM):

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.onpolicy --config=configs/onpolicy_demo.py \\
      --workdir=/tmp/alignax_onpolicy

``--config.objective=dpo`` trains DPO on best-vs-worst pairs instead.
"""

import ml_collections

from alignax import defaults


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  c.objective = "lipo"  # LiPO-λ on K-lists (dpo: best-vs-worst pairs)
  c.preference.list_loss = "lipo_lambda"  # LiPO-λ (Liu et al., 2024)
  c.reference = "frozen"  # each round's starting policy
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.data.task = "preference"  # packed preference batches
  c.data.preference.format = "lists"  # set per round from the objective
  c.data.preference.list_size = 4  # K samples per prompt
  c.data.preference.groups_per_row = 3  # lists packed per 128-token row
  c.preference.beta = 0.1  # scale of the implicit rewards
  c.optimizer.lr = 2e-3  # a little below pretraining's 3e-3
  c.optimizer.warmup_steps = 10  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the reference
  c.train.steps = 100  # per round
  c.train.batch_size = 16  # rows per step (up to 48 lists)
  c.train.seq_len = 128  # tokens per row
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # offline held-out lists, once per round
  c.train.eval_batches = 8  # held-out lists per evaluation: up to 384
  c.checkpoint.save_every = 50  # two checkpoints per round
  c.onpolicy = ml_collections.ConfigDict()
  c.onpolicy.rounds = 3  # sample -> score -> train rounds
  c.onpolicy.prompts_per_round = 512  # training prompts sampled per round
  c.onpolicy.max_new_tokens = 12  # a name and its "(" fit easily
  c.onpolicy.temperature = 1.0  # sampling temperature (0 = greedy)
  c.onpolicy.top_p = 1.0  # nucleus sampling mass (1 = off)
  c.onpolicy.sample_batch = 128  # sequences per generate call
  c.onpolicy.eval_prompts = 256  # held-out prompts of the greedy evaluation
  c.onpolicy.reward_model = ""  # reward-model workdir ("" = the task's reward)
  return c
