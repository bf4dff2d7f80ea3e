"""Multi-objective (ArmoRM) and causal reward models on the embedded task.

The embedded multi-attribute task (``alignax.data.attribute_task``):
docstring -> function name, every candidate rated on correctness, brevity,
style and (the spurious) length; training pairs prefer the longer response
85% of the time, held-out pairs half the time. From the UL2 demo LM
(``configs/ul2_demo.py``; or drop ``init_from`` to start from scratch)::

  # ArmoRM stage 1: four regression heads on the ratings
  python launch/tpu_train.py --config=configs/reward_models_demo.py:ratings \\
      --workdir=/tmp/armo_stage1
  # stage 2: decorrelate from length, then train the gate on the pairs
  python launch/tpu_train.py --config=configs/reward_models_demo.py:gate \\
      --workdir=/tmp/armo_stage2 --config.checkpoint.init_from=/tmp/armo_stage1
  # a causal reward model (Bradley-Terry + MMD across length bins), and
  # the plain Bradley-Terry one to compare with
  python launch/tpu_train.py --config=configs/reward_models_demo.py:causal \\
      --workdir=/tmp/causal_rm
  python launch/tpu_train.py --config=configs/reward_models_demo.py:plain \\
      --workdir=/tmp/plain_rm

``benchmarks/causal_rm.py`` trains the last two and reports their held-out
accuracy and reward-length correlation.
"""

from alignax import defaults

ATTRIBUTES = ("correctness", "brevity", "style", "length")
VARIANTS = ("ratings", "gate", "causal", "plain")


def get_config(arg="ratings"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/reward_models_demo.py:{arg}: use one of "
                     f"{VARIANTS}")
  c = defaults.base_config()
  c.objective = {"ratings": "multi_reward", "gate": "reward_gate",
                 "causal": "causal_reward", "plain": "reward_model"}[arg]
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.data.task = "ratings" if arg == "ratings" else "preference"
  c.data.source = "embedded"  # the multi-attribute docstring -> name task
  c.data.preference.embedded_task = "attributes"  # its pairs (not names')
  c.data.preference.attributes = ATTRIBUTES  # one regression head each
  c.data.preference.groups_per_row = 4  # examples packed per row
  c.reward.verbosity_attribute = "length"  # gate: decorrelate from length
  c.reward.mmd_weight = 1.0  # causal: weight of the MMD penalty
  c.reward.num_bins = 4  # causal: length quartiles of each batch
  c.optimizer.lr = 1e-3  # below pretraining's 3e-3
  c.optimizer.warmup_steps = 20  # short warmup
  c.optimizer.weight_decay = 0.0  # no decay of the pretrained weights
  c.train.steps = 300  # a few minutes on 2 CPU cores
  c.train.batch_size = 16  # rows per step
  c.train.seq_len = 128  # tokens per row
  c.train.log_every = 20  # steps between metrics lines
  c.train.eval_every = 100  # held-out metrics
  c.train.eval_batches = 8  # held-out batches per evaluation
  c.checkpoint.save_every = 100  # checkpoints over the run
  return c
