"""GRPO / RLOO / DisCO objectives on rollout batches: fused log-probs, the
losses on them, gradients, config, and 8 sharded devices = 1 device.

The reference log-probs come from full logits of right-padded rows (a
different layout from the batch's left-padded prompts), log-softmaxed in
NumPy at the sampling temperature.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import defaults
from alignax import losses
from alignax import objectives
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.models import ModelConfig
from alignax.objectives import grpo

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=32)
GRAPHDEF = state_lib.abstract_model(CFG)[0]
P, N, G = 6, 10, 4  # prompt slots, completion slots, samples per prompt


def _jit(fn, *args, **kw):
  """``fn`` under jit: one compile, not one per eager op."""
  return jax.jit(functools.partial(fn, **kw))(*args)


@functools.lru_cache(maxsize=None)
def params(seed):
  return state_lib.init_params(CFG, seed)


def samples(seed=0, rows=8):
  """``(prompts, completions)``: G samples of each of rows / G prompts."""
  rng = np.random.default_rng(seed)
  prompts, completions = [], []
  for q in range(rows // G):
    prompt = list(rng.integers(1, 64, rng.integers(2, P + 1)))
    for j in range(G):
      prompts.append(prompt)
      completions.append(list(rng.integers(1, 64, 1 + (q * G + j) % N)))
  return prompts, completions


def rollout_batch(prompts, completions, seed=0):
  """The documented batch: left-padded prompt + completion, shifted by one."""
  b = len(prompts)
  row = np.zeros((b, P + N), np.int32)
  pos = np.full((b, P + N), -1, np.int32)
  seg = np.zeros((b, P + N), np.int32)
  weights = np.zeros((b, P + N - 1), np.float32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    row[i, P - len(p):P + len(c)] = p + c
    pos[i, P - len(p):P + len(c)] = np.arange(len(p) + len(c))
    seg[i, P - len(p):P + len(c)] = 1
    weights[i, P - 1:P - 1 + len(c)] = 1.0  # targets row[P:P+len(c)]
  rng = np.random.default_rng(seed + 1)
  rewards = (rng.random(b) < 0.5).astype(np.float32)
  rewards[:G] = [1, 0, 0, 1]  # group 0 mixed
  return {"inputs": row[:, :-1], "targets": row[:, 1:],
          "positions": pos[:, :-1], "segment_ids": seg[:, :-1],
          "weights": weights, "rewards": rewards,
          "advantages": np.asarray(_jit(losses.group_advantages, rewards,
                                        num_generations=G)),
          "old_logps": np.zeros_like(weights)}


@jax.jit
def _logits(p, tokens, segment_ids):
  return nnx.merge(GRAPHDEF, p)(tokens, segment_ids=segment_ids)


def reference_logps(seed, prompts, completions, temperature=1.0):
  """``[B, P + N - 1]`` completion log-probs in the batch's layout, from
  full logits of right-padded rows, NumPy log-softmax at ``temperature``."""
  tokens = np.zeros((len(prompts), P + N), np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    tokens[i, :len(p) + len(c)] = p + c
  logits = np.asarray(_logits(params(seed), tokens, (tokens > 0).astype(
      np.int32)), np.float64) / temperature
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  out = np.zeros((len(prompts), P + N - 1))
  for i, (p, c) in enumerate(zip(prompts, completions)):
    steps = np.arange(len(p) - 1, len(p) + len(c) - 1)
    out[i, P - 1:P - 1 + len(c)] = logp[i, steps, tokens[i, steps + 1]]
  return out


def run(objective, batch, seed=0, ref_seed=1):
  fn = jax.jit(lambda p, f, b: objective(nnx.merge(GRAPHDEF, p), b, None,
                                         frozen=f))
  return fn(params(seed), params(ref_seed), batch)


# Every loss type is checked against TRL in tests/losses; here, what the
# objective adds: bnpo's per-batch normalisation and the live reference.
CASES = [dict(loss_type="bnpo", beta=0.04, epsilon_high=0.28)]


def test_objective_equals_losses_on_full_logit_logps():
  prompts, completions = samples()
  batch = rollout_batch(prompts, completions)
  temperature = 0.7
  logps = reference_logps(0, prompts, completions, temperature)
  ref = reference_logps(1, prompts, completions, temperature)
  mask = batch["weights"].astype(np.float64)
  rng = np.random.default_rng(9)
  batch["old_logps"] = (logps + rng.normal(0, 0.2, logps.shape) * mask
                        ).astype(np.float32)
  hps = [grpo.GRPOHparams(**c) for c in CASES]

  def all_losses(p, f, b):
    model = nnx.merge(GRAPHDEF, p)
    out = [grpo.grpo_objective(model, b, None, frozen=f, hparams=h,
                               reference="frozen", temperature=temperature)
           for h in hps]
    return ([s / c for s, (c, _) in out], out[0][1][1]["kl"],
            grpo.sampled_token_logps(model, b, temperature=temperature))

  got, kl, fused = jax.jit(all_losses)(params(0), params(1), batch)
  np.testing.assert_allclose(np.asarray(fused) * mask, logps, atol=2e-5)
  for h, value in zip(hps, got):
    sums, counts = _jit(losses.grpo_loss, logps, batch["old_logps"], ref,
                        batch["advantages"], mask, **vars(h))
    want = np.sum(sums) / max(np.sum(counts), 1.0)
    np.testing.assert_allclose(value, want, rtol=2e-4, atol=1e-6,
                               err_msg=str(h))
  want_kl = np.exp(ref - logps) - (ref - logps) - 1
  np.testing.assert_allclose(kl[0] / kl[1], np.sum(want_kl * mask)
                             / np.sum(mask), rtol=1e-4)


def test_rloo_and_disco_objectives_equal_their_losses():
  prompts, completions = samples(seed=1)
  batch = rollout_batch(prompts, completions, seed=1)
  logps = reference_logps(0, prompts, completions)
  mask = batch["weights"].astype(np.float64)
  batch["old_logps"] = (logps + 0.1 * mask).astype(np.float32)
  rloo = functools.partial(grpo.rloo_objective, epsilon_high=0.28)
  disco = functools.partial(grpo.disco_objective, num_generations=G,
                            tau=10.0, beta=500.0, delta=1e-4)
  (rloo_sum, (rloo_n, _)), (disco_sum, (disco_n, metrics)) = jax.jit(
      lambda p, b: (rloo(nnx.merge(GRAPHDEF, p), b, None),
                    disco(nnx.merge(GRAPHDEF, p), b, None)))(params(0), batch)
  want = _jit(losses.rloo_loss, logps, batch["old_logps"],
              batch["advantages"], mask, epsilon_high=0.28)
  np.testing.assert_allclose(rloo_sum / rloo_n, np.mean(want), rtol=2e-4)
  want = _jit(losses.disco_loss, logps, batch["old_logps"], mask,
              batch["rewards"], num_generations=G, tau=10.0, beta=500.0,
              delta=1e-4)
  assert float(disco_n) == 2 and float(want[0]) > 0.0  # penalty is active
  np.testing.assert_allclose(disco_sum / disco_n, np.mean(want), rtol=2e-4)
  np.testing.assert_allclose(metrics["kl"][0], _jit(
      losses.old_policy_kl, logps, batch["old_logps"], mask), rtol=1e-4)


def grads_on(mesh_cfg, devices=None):
  """The step's gradients of on-policy DAPO (no ``old_logps``) at 0.7."""
  mesh = shd.make_mesh(mesh_cfg, devices)
  shardings = shd.param_shardings(state_lib.abstract_model(CFG)[1], mesh,
                                  shd.DEFAULT_RULES)
  policy = jax.device_put(params(0), shardings)
  objective = functools.partial(grpo.grpo_objective,
                                hparams=grpo.GRPOHparams(), temperature=0.7)
  grad_fn = step_lib.make_grad_fn(objective, GRAPHDEF, mesh=mesh)
  batch = rollout_batch(*samples(seed=3), seed=3)
  del batch["old_logps"]  # on-policy: old = stop_gradient(current)
  out = jax.jit(grad_fn)(policy, shd.host_to_global(batch, mesh),
                         jax.random.PRNGKey(0), None, 1.0)
  return jax.device_get(out), batch


def test_gradients_finite_and_eight_devices_equal_one_device():
  one, batch = grads_on({"data": 1, "fsdp": 1, "tensor": 1},
                        jax.devices()[:1])
  grads, count, metrics = one
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert max(float(np.abs(g).max()) for g in leaves) > 0
  assert float(count) == batch["weights"].sum()  # dapo: completion tokens
  # On-policy, every ratio is 1: nothing is clipped.
  assert float(metrics["clip_ratio/region_mean"][0]) == 0.0
  eight, _ = grads_on({"data": 2, "fsdp": 2, "tensor": 2})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=2e-5), one, eight)


def test_from_config_and_checks():
  c = defaults.base_config()
  c.objective = "grpo"
  c.grpo.loss_type = "dr_grpo"
  c.grpo.epsilon_high = 0.28
  defaults.check_values(c)
  fn = objectives.build_objective(c)
  assert fn.keywords["hparams"].max_completion_length == 64
  assert fn.keywords["hparams"].epsilon_high == 0.28
  assert fn.keywords["reference"] == "none"
  c.grpo.beta = 0.04
  assert objectives.build_objective(c).keywords["reference"] == "batch"
  c.reference = "frozen"
  assert objectives.build_objective(c).keywords["reference"] == "frozen"
  c.objective = "disco"
  assert objectives.build_objective(c).keywords["num_generations"] == 8
  for field, value, match in [
      ("loss_type", "ppo", "config.grpo.loss_type='ppo'"),
      ("num_generations", 1, "config.grpo.num_generations=1"),
      ("num_generations", 3, "multiple of config.grpo.num_generations=3"),
      ("importance_sampling_level", "seq",
       "config.grpo.importance_sampling_level='seq'"),
      ("max_completion_length", 128, "max_completion_length=128")]:
    bad = defaults.base_config()
    bad.objective = "grpo"
    bad.grpo[field] = value
    with pytest.raises(ValueError, match=match):
      defaults.check_values(bad)
  bad = defaults.base_config()
  bad.objective, bad.train.microbatches = "disco", 2
  with pytest.raises(ValueError, match="microbatches=1"):
    defaults.check_values(bad)
