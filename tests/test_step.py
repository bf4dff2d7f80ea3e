"""The shared train step: sharding equivalence, accumulation, NaN handling."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax.models import ModelConfig
from alignax.objectives import lm

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
OPT = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "final_lr_ratio": 1.0,
       "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
       "grad_clip_norm": 0.0}


def make_batch(b=8, t=16, seed=0):
  """Two packed segments per row (lengths 10 and 6), token ids in [1, 64)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(b, t + 1)).astype(np.int32)
  seg = np.concatenate([np.full(10, 1), np.full(6, 2)]).astype(np.int32)
  pos = np.concatenate([np.arange(10), np.arange(6)]).astype(np.int32)
  weights = np.ones((b, t), np.float32)
  weights[:, [9, 15]] = 0.0  # last token of each segment predicts nothing
  weights[b // 2:, 12:] = 0.0  # uneven token counts across rows
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights,
      "positions": np.tile(pos, (b, 1)), "segment_ids": np.tile(seg, (b, 1)),
      "prefix": np.zeros((b, t), bool),
  }


def setup(mesh_cfg, devices=None, opt=OPT):
  mesh = shd.make_mesh(mesh_cfg, devices)
  optimizer, schedule = state_lib.build_optimizer(opt, 10)
  graphdef, state, shardings = state_lib.create_train_state(
      CFG, optimizer, mesh, shd.DEFAULT_RULES, seed=0)
  return mesh, optimizer, schedule, graphdef, state, shardings


def grads_and_loss(mesh_cfg, devices=None, microbatches=1):
  mesh, _, _, graphdef, state, _ = setup(mesh_cfg, devices)
  grad_fn = step_lib.make_grad_fn(lm.lm_objective, graphdef,
                                  microbatches=microbatches, mesh=mesh)
  batch = shd.host_to_global(make_batch(), mesh)
  grads, count, metrics = jax.jit(grad_fn)(state.params, batch,
                                           jax.random.PRNGKey(0), None, 1.0)
  return jax.device_get((grads, count, metrics["loss"]))


def assert_tree_close(a, b, rtol=1e-4, atol=2e-5):
  # fp32 sums over shards and microbatches run in a different order.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
               a, b)


def test_eight_devices_fsdp_tensor_equal_one_device():
  one = grads_and_loss({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  for mesh_cfg in ({"data": 2, "fsdp": 2, "tensor": 2},
                   {"data": 1, "fsdp": 4, "tensor": 2}):
    eight = grads_and_loss(mesh_cfg)
    assert_tree_close(one, eight)


def test_params_are_really_sharded():
  _, _, _, _, state, _ = setup({"data": 1, "fsdp": 4, "tensor": 2})
  leaves = jax.tree.leaves(state.params)
  sharded = [x for x in leaves if len(x.sharding.device_set) == 8
             and x.addressable_shards[0].data.size < x.size]
  assert sharded, "no parameter is split across devices"
  biggest = max(leaves, key=lambda x: x.size)
  assert biggest.addressable_shards[0].data.size < biggest.size


def test_microbatches_give_the_full_batch_gradient():
  # Rows carry different token counts, so averaging per-microbatch means
  # would be wrong; summing and dividing by the total count is exact.
  full = grads_and_loss({"fsdp": -1})
  for m in (4,):
    assert_tree_close(full, grads_and_loss({"fsdp": -1}, microbatches=m))


@pytest.fixture(scope="module")
def env():
  """One mesh, state and jitted step for the multi-step tests (compile once)."""
  mesh, optimizer, schedule, graphdef, state, shardings = setup({"fsdp": -1})
  step = step_lib.jit_train_step(
      step_lib.make_train_step(lm.lm_objective, graphdef, optimizer, schedule),
      shardings, mesh)
  return mesh, graphdef, state, step


def run_steps(env, seeds, poison_at=None):
  mesh, _, state, step = env
  state = jax.tree.map(jnp.copy, state)  # the step donates its input
  ms = []
  for i, seed in enumerate(seeds):
    batch = make_batch(seed=seed)
    if i == poison_at:
      batch["weights"] = batch["weights"] * np.float32(np.nan)
    state, m = step(state, shd.host_to_global(batch, mesh))
    ms.append(jax.device_get(m))
  return state, ms


def test_training_reduces_loss_and_reports_norms(env):
  _, ms = run_steps(env, [0] * 12)
  first, last = ms[0]["loss"], ms[-1]["loss"]
  assert last[0] / last[1] < 0.7 * first[0] / first[1]
  for key in ("grad_norm", "param_norm", "update_norm", "lr"):
    assert np.isfinite(ms[-1][key][0]) and ms[-1][key][0] > 0


def test_nonfinite_step_is_dropped(env):
  state_a, ms = run_steps(env, [0, 1, 2], poison_at=1)
  assert [m["nonfinite"][0] for m in ms] == [0.0, 1.0, 0.0]
  # Dropping step 1 equals never having seen its batch.
  state_b, _ = run_steps(env, [0, 2])
  assert_tree_close(state_a.params, state_b.params)
  assert int(state_a.step) == 3  # the step counter still advances


def test_overflowing_update_with_finite_gradients_is_dropped():
  # lr = 1e39 is Inf in float32: the gradients are finite, the update is not.
  # Neither the parameters nor Adam's moments may take it.
  mesh, optimizer, _, graphdef, state, shardings = setup(
      {"fsdp": -1}, opt=dict(OPT, lr=1e39))
  step = step_lib.jit_train_step(
      step_lib.make_train_step(lm.lm_objective, graphdef, optimizer),
      shardings, mesh)
  before = jax.device_get(state)
  state, m = step(state, shd.host_to_global(make_batch(), mesh))
  assert float(m["nonfinite"][0]) == 1.0
  assert np.isfinite(float(m["grad_norm"][0]))  # only the update overflowed
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state,
               before.opt_state)
  assert bool(step_lib.all_finite(after))
  assert not bool(step_lib.all_finite({"a": jnp.ones(2), "b": jnp.inf}))
  assert bool(step_lib.all_finite({"count": jnp.int32(3)}))


def test_dynamic_loss_scale_halves_on_overflow_and_grows():
  cfg = step_lib.LossScaleConfig(dynamic=True, period=2, factor=2.0)
  s = state_lib.TrainState(step=0, params={}, opt_state=(), rng=None,
                           loss_scale=jnp.float32(8.0), good_steps=jnp.int32(0))
  scale, good = step_lib._next_loss_scale(s, jnp.bool_(False), cfg)
  assert (float(scale), int(good)) == (4.0, 0)
  s = s.replace(good_steps=jnp.int32(1))
  scale, good = step_lib._next_loss_scale(s, jnp.bool_(True), cfg)
  assert (float(scale), int(good)) == (16.0, 0)


def test_loss_scale_does_not_change_gradients(env):
  mesh, graphdef, state, _ = env
  fn = jax.jit(step_lib.make_grad_fn(lm.lm_objective, graphdef))
  batch = shd.host_to_global(make_batch(), mesh)
  g1, c1, _ = fn(state.params, batch, jax.random.PRNGKey(0), None, 1.0)
  g2, c2, _ = fn(state.params, batch, jax.random.PRNGKey(0), None, 1024.0)
  assert_tree_close(g1, jax.tree.map(lambda g: g / 1024.0, g2))


def test_schedule_warmup_then_cosine():
  sched = state_lib.build_schedule(dict(OPT, lr=1.0, warmup_steps=10,
                                        final_lr_ratio=0.1), 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-6)
  # Halfway through the decay, cosine sits at the midpoint.
  np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-5)


def test_bad_optimizer_and_mesh_values_are_named():
  with pytest.raises(ValueError, match="warmup_steps"):
    state_lib.build_schedule(dict(OPT, warmup_steps=50), 10)
  with pytest.raises(ValueError, match="optimizer.name"):
    state_lib.build_optimizer(dict(OPT, name="sgdd"), 10)
  with pytest.raises(ValueError, match="needs 6 devices"):
    shd.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="only one axis"):
    shd.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="unknown axes"):
    shd.make_mesh({"pipeline": 2})
