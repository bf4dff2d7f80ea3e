"""GRPO from the UL2 demo checkpoint on the embedded code task.

Each rollout step samples G = 4 bodies for each of 4 standard-library
function headers (signature + docstring with doctests, from the embedded
corpus, :mod:`alignax.data.code_task`), rewards each by the fraction of its
doctest examples that pass in the sandbox, and takes one DAPO-normalised
GRPO step on the 16 rows (TRL's defaults: ``loss_type='dapo'``, ``beta=0``,
no reference). The prompt is read as UL2's S-denoiser prefix (``[S2S]``),
the mode the demo checkpoint learned continuations in. Every 20 steps the
22 held-out problems are completed greedily and their mean reward is
logged (``eval/reward``). 15.5 minutes on a 2-core CPU shared with other
jobs (``benchmarks/RESULTS.md``), most of it sampling: the prefix-LM mode
reruns the whole row per new token; ``--config.grpo.prompt_mode=''``
samples ``[BOS] + prompt`` causally from the KV cache, about 8x faster.
The demo LM is too small to write a body that passes a doctest, so the
reward stays 0 (the docstring task at the end gives the loop a signal):

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python -m alignax.rl --config=configs/grpo_demo.py --workdir=/tmp/alignax_grpo

``configs/grpo_demo.py:function`` is the task on which the held-out
reward can rise (:mod:`alignax.data.function_task`: one-line bodies named
by their docstring, 4 unit tests each in the sandbox). The UL2 demo LM
writes no ``return`` line there either, so it first gets a supervised
warm-up on the task's training split (the usual SFT -> RL order; 100 LM
steps, about a minute, leave its greedy held-out reward near 0.2), then
GRPO samples causally from the KV cache:

  python -m alignax.data.function_task /tmp/function_train.jsonl
  python launch/tpu_train.py --config=configs/demo.py \
      --workdir=/tmp/alignax_function_sft --config.data.source=jsonl \
      --config.data.paths="('/tmp/function_train.jsonl',)" \
      --config.checkpoint.init_from=/tmp/alignax_demo \
      --config.train.steps=100 --config.train.eval_every=0 \
      --config.checkpoint.save_every=50 --config.optimizer.warmup_steps=5
  python -m alignax.rl --config=configs/grpo_demo.py:function \
      --workdir=/tmp/alignax_grpo_function

``--config.objective=rloo`` (RLOO) or ``disco`` (DisCO) train the same
rollouts with the other objectives; ``--config.grpo.task=docstring
--config.grpo.max_completion_length=12`` the docstring -> function-name task
of ``configs/onpolicy_demo.py`` (a denser reward: name similarity).
"""

from alignax import defaults


def get_config(arg=None):
  if arg not in (None, "", "function"):
    raise ValueError(f"configs/grpo_demo.py has the variant 'function', "
                     f"not {arg!r}")
  c = defaults.base_config()
  c.objective = "grpo"  # the GRPO family (grpo.loss_type)
  c.checkpoint.init_from = "/tmp/alignax_demo"  # the pretrained UL2 demo LM
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.reference = "none"  # beta = 0: no reference model
  c.grpo.task = "code"  # alignax.data.code_task: doctests in the sandbox
  c.grpo.prompt_mode = "[S2S]"  # UL2's S-denoiser: continue the prefix
  c.grpo.loss_type = "dapo"  # token-level normalisation (TRL's default)
  c.grpo.num_generations = 4  # G samples per prompt
  c.grpo.prompts_per_step = 4  # 16 rows per rollout step
  c.grpo.max_completion_length = 40  # tokens per sampled body
  c.grpo.temperature = 1.0  # sampling temperature
  c.grpo.num_iterations = 1  # one optimizer step per rollout (on-policy)
  c.grpo.eval_prompts = 22  # every held-out problem, greedy
  c.train.steps = 40  # rollout steps (= optimizer steps here)
  c.train.seq_len = 128  # prompt (its end kept) + completion: the UL2 window
  c.train.log_every = 5  # steps between metrics lines
  c.train.eval_every = 20  # held-out greedy reward at 0, 20 and 40
  c.optimizer.lr = 1e-3  # below pretraining's 3e-3
  c.optimizer.warmup_steps = 5  # short warmup
  c.optimizer.weight_decay = 0.0  # stay near the start
  c.checkpoint.save_every = 20  # two checkpoints over the run
  if arg == "function":
    c.checkpoint.init_from = "/tmp/alignax_function_sft"  # the warm-up above
    c.grpo.task = "function"  # alignax.data.function_task: unit tests
    c.grpo.prompt_mode = ""  # [BOS] + prompt, causal KV-cache sampling
    c.grpo.num_generations = 8  # G samples per prompt
    c.grpo.prompts_per_step = 8  # 64 rows per rollout step
    c.grpo.max_completion_length = 16  # '    return <expression>' + EOS
    c.grpo.eval_prompts = 128  # held-out problems, greedy
    c.train.steps = 120  # rollout steps
    c.train.log_every = 10  # steps between metrics lines
    c.train.eval_every = 30  # held-out greedy reward every 30 steps
    c.optimizer.lr = 2e-4  # 3e-4 with 4 prompts per step moved a sequence's log-prob by ~2 nats per step and the held-out reward fell
    c.checkpoint.save_every = 60  # two checkpoints over the run
  return c
