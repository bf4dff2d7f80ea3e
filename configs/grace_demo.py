"""GRACE from the UL2 demo checkpoint on the embedded docstring -> code pairs.

Each rollout step takes 4 training pairs (a function's docstring summary and
its code, :func:`alignax.data.retrieval_task.code_search_pairs`), samples
one anchor rationale per text at temperature 0.5 and G = 4 rationales of
each document and each query at temperature 1 (a docstring is continued
with a line of code, code with a ``#`` comment line; :mod:`alignax.grace`),
embeds every text with its rationale (mean of the final hidden states),
rewards each sample by GRACE's contrastive terms against its partner's
anchor and the other pairs (:mod:`alignax.rewards.grace`; tau = 0.1, both
weights 0.2, -1 for a rationale that never ends), and takes one
DAPO-normalised GRPO step on the 32 rows. The held-out evaluation
(``eval/rationale/recall@10``, ``eval/rationale/mrr@10``, beside
``eval/plain/...``: the same model's mean-pooled raw texts) embeds all 93
held-out pairs' greedy rationales:

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.rl --config=configs/grace_demo.py --workdir=/tmp/alignax_grace

``--config.grpo.grace.train_queries=False`` trains the documents'
rationales only (the authors' setting); ``--config.grpo.grace.pool=rationale``
pools the rationale alone.
"""

from alignax import defaults


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  c.objective = "grpo"  # the GRPO family (grpo.loss_type)
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained UL2 demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.reference = "none"  # beta = 0: no reference model
  c.grpo.task = "grace"  # alignax.grace: rationales rewarded by contrastive similarity
  c.grpo.prompt_mode = "[S2S]"  # UL2's S-denoiser: continue the prefix
  c.grpo.loss_type = "dapo"  # token-level normalisation (TRL's default)
  c.grpo.num_generations = 4  # G rationales per text
  c.grpo.prompts_per_step = 4  # pairs per rollout: 4 x 2 texts x G = 32 rows
  c.grpo.max_completion_length = 16  # tokens per rationale (one line)
  c.grpo.temperature = 1.0  # sampling temperature of the trained rationales
  c.grpo.num_iterations = 1  # one optimizer step per rollout (on-policy)
  c.grpo.grace.temperature = 0.1  # tau (the authors' train.sh)
  c.grpo.grace.clustering_weight = 0.2  # w_c (the authors' train.sh)
  c.grpo.grace.cross_group_weight = 0.2  # w_x (the authors' train.sh)
  c.grpo.grace.anchor_temperature = 0.5  # the partner's anchor rationale (the authors' 0.5)
  c.grpo.grace.train_queries = True  # queries' rationales are trained too
  c.grpo.grace.eval_pairs = 0  # all 93 held-out pairs
  c.train.steps = 30  # rollout steps (= optimizer steps here)
  c.train.seq_len = 128  # prompt (text start kept) + rationale: the UL2 window
  c.train.log_every = 5  # steps between metrics lines
  c.train.eval_every = 15  # held-out retrieval at 0, 15, 30
  c.optimizer.lr = 1e-3  # below pretraining's 3e-3
  c.optimizer.warmup_steps = 5  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the start
  c.checkpoint.save_every = 15  # two checkpoints over the run
  return c
