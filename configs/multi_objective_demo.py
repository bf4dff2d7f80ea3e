"""Multi-objective alignment on the embedded docstring -> name task.

Two objectives that pull apart: ``similarity`` (``difflib`` ratio of the
sampled name to the true one) and ``length`` (characters / 32: a padded
name is longer and less similar). From the UL2 demo LM
(``configs/ul2_demo.py``), every variant is a few minutes on 2 CPU cores.
The UL2 LM does not write names yet (its samples are fragments of text), so
an SFT stage on the task's better candidates comes first (the attribute
task's training pairs: the true name, or in most pairs a padded one), as
DPA starts from an SFT model:

  python launch/tpu_train.py --config=configs/multi_objective_demo.py:sft \
      --workdir=/tmp/mo/sft

  # DPA: one policy, the direction v written into the prompt, RSF rounds
  python -m alignax.dpa --config=configs/multi_objective_demo.py:dpa \\
      --workdir=/tmp/mo/dpa
  # two single-objective policies from the same base, for rewarded soups
  python -m alignax.dpa --config=configs/multi_objective_demo.py:similarity \\
      --workdir=/tmp/mo/similarity
  python -m alignax.dpa --config=configs/multi_objective_demo.py:length \\
      --workdir=/tmp/mo/length
  # the fronts: soups of the two, MODPO per weight (trained here), DPA per
  # direction; JSONL, a plot and the hypervolumes
  python -m alignax.pareto --config=configs/multi_objective_demo.py:pareto \\
      --workdir=/tmp/mo/pareto

``dpa.reward_model`` scores with an ArmoRM run's attribute heads
(``configs/reward_models_demo.py:ratings``) instead of the task's computed
attributes.
"""

import ml_collections

from alignax import defaults

VARIANTS = ("sft", "dpa", "similarity", "length", "modpo", "pareto")
OBJECTIVES = ("similarity", "length")


def get_config(arg="dpa"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/multi_objective_demo.py:{arg}: use one of "
                     f"{VARIANTS}")
  c = defaults.base_config()
  c.checkpoint.init_from = "/tmp/mo/sft"  # the SFT stage below
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.data.task = "preference"  # packed preference batches
  c.data.preference.format = "pairs"  # best vs worst of each prompt's samples
  c.data.preference.list_size = 4  # K samples per prompt
  c.data.preference.groups_per_row = 3  # pairs packed per 128-token row
  c.objective = "dpo"
  c.preference.loss_type = "sft"  # RSF: the NLL of the best sample
  c.preference.beta = 0.1  # (modpo) scale of the implicit rewards
  c.optimizer.lr = 1e-3  # below pretraining's 3e-3
  c.optimizer.warmup_steps = 10  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the base
  c.train.steps = 100  # per round
  c.train.batch_size = 16  # rows per step
  c.train.seq_len = 128  # tokens per row
  c.train.log_every = 20  # steps between metrics lines
  c.train.eval_every = 100  # offline held-out pairs, once per round
  c.train.eval_batches = 4  # held-out batches per evaluation
  c.checkpoint.save_every = 100  # one checkpoint per round
  c.onpolicy = ml_collections.ConfigDict()
  c.onpolicy.rounds = 3  # sample -> score -> fine-tune rounds
  c.onpolicy.prompts_per_round = 512  # training prompts sampled per round
  c.onpolicy.max_new_tokens = 12  # a name and its "(" fit easily
  c.onpolicy.temperature = 1.0  # sampling temperature
  c.onpolicy.top_p = 1.0  # nucleus sampling mass (1 = off)
  c.onpolicy.sample_batch = 128  # sequences per generate call
  c.onpolicy.eval_prompts = 128  # held-out prompts of the greedy evaluation
  c.onpolicy.reward_model = ""  # (unused: dpa.reward_model scores)
  c.dpa = ml_collections.ConfigDict()
  c.dpa.objectives = OBJECTIVES  # the reward space of the directions
  c.dpa.angles = (0.0, 90.0)  # training directions: uniform angle (degrees)
  c.dpa.train_angles = (0.0, 22.5, 45.0, 67.5, 90.0)  # or drawn from these (() = uniform)
  c.dpa.normalize = True  # standardise each objective over a round's samples
  c.dpa.condition = True  # write the direction into the prompt
  c.dpa.eval_angles = (0.0, 22.5, 45.0, 67.5, 90.0)  # held-out directions
  c.dpa.reward_model = ""  # ArmoRM run ("" = the task's computed rewards)
  if arg == "sft":  # the starting policy: SFT on the task's pairs
    c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained UL2 LM
    c.reference = "none"  # loss_type sft reads no reference
    c.data.source = "embedded"
    c.data.preference.embedded_task = "attributes"  # the better candidate
    c.train.steps = 200  # one pass over ~3,200 chosen names
    c.train.eval_every = 100
    c.checkpoint.save_every = 100
  if arg in ("similarity", "length"):  # one fixed direction, no template
    angle = 0.0 if arg == "similarity" else 90.0
    c.dpa.angles = (angle, angle)
    c.dpa.train_angles = ()
    c.dpa.condition = False
    c.dpa.eval_angles = (angle,)
  if arg in ("modpo", "pareto"):  # offline MODPO on the attribute pairs
    c.objective = "modpo"
    c.preference.loss_type = "sigmoid"
    c.reference = "frozen"  # the SFT policy
    c.data.source = "embedded"
    c.data.preference.embedded_task = "attributes"  # utility-ranked pairs
    c.data.preference.reward_fields = ("length",)  # MODPO's margin reward
    c.preference.modpo_weights = (0.5, 0.5)  # (utility, length)
    c.train.steps = 150  # one run per weight
    c.train.eval_every = 150
    c.checkpoint.save_every = 150
  c.pareto = ml_collections.ConfigDict()
  c.pareto.objectives = OBJECTIVES  # the front's axes
  c.pareto.reference = (0.0, 0.0)  # hypervolume reference point
  c.pareto.soups = ("/tmp/mo/similarity", "/tmp/mo/length")  # policies
  c.pareto.soup_steps = 6  # interpolation weights from (1, 0) to (0, 1)
  c.pareto.modpo_weights = (0.1, 0.3, 0.5, 0.7, 0.9)  # w of (1 - w, w)
  c.pareto.dpa = "/tmp/mo/dpa"  # the DPA run (its dpa.eval_angles)
  c.pareto.reward_model = ""  # ArmoRM run that scores ("" = computed rewards)
  return c
