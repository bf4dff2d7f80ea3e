"""End to end: the DPO recipe trains, saves and resumes; cached = live reference."""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from alignax import objectives
from alignax import reference
from alignax import train
from alignax.data import preference
from alignax.data import reference_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizer"))


def recipe(name, tok_dir, **train_overrides):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.checkpoint.update(init_from="", save_every=2, keep=3)
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=64)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=4, batch_size=8, seq_len=64, log_every=2, eval_every=2,
                 eval_batches=1, progress_bar=False)
  c.train.update(train_overrides)
  c.data.preference.update(max_prompt_len=32, groups_per_row=3)
  c.optimizer.update(warmup_steps=1, schedule_steps=4)
  return c


def final_params(trainer):
  return jax.device_get(trainer.state.params)


def test_dpo_recipe_resumes_to_the_straight_run(tok_dir, tmp_path):
  straight, last = train.run(recipe("dpo_demo", tok_dir), str(tmp_path / "a"))
  assert last["step"] == 4
  for key in ("train/loss", "train/rewards/accuracies", "eval/rewards/margins",
              "eval/logps/chosen", "train/grad_norm"):
    assert np.isfinite(last[key]), key
  train.run(recipe("dpo_demo", tok_dir, steps=2), str(tmp_path / "b"))
  resumed, _ = train.run(recipe("dpo_demo", tok_dir), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, final_params(straight),
               final_params(resumed))
  # The policy left its (frozen, starting) reference.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       final_params(straight), jax.device_get(straight.frozen))
  assert max(jax.tree.leaves(moved)) > 0


def test_lipo_recipe_runs(tok_dir, tmp_path):
  _, last = train.run(recipe("lipo_demo", tok_dir, steps=2),
                      str(tmp_path / "lipo"))
  assert 0 <= last["eval/rewards/ndcg"] <= 1
  assert np.isfinite(last["train/loss"])


def jsonl_config(tok_dir, tmp_path, n=40):
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for i in range(n):
      pick = lambda k: " ".join(rng.choice(words, k))
      f.write(json.dumps({"prompt": pick(1 + i % 5), "chosen": pick(2),
                          "rejected": pick(1 + i % 3)}) + "\n")
  c = recipe("dpo_demo", tok_dir, steps=2)
  c.data.update(source="jsonl", paths=(str(tmp_path / "pairs.jsonl"),),
                eval_paths=(str(tmp_path / "pairs.jsonl"),))
  return c


def test_cached_reference_equals_live(tok_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(reference_cache, "CHUNK_RECORDS", 16)
  live_cfg = jsonl_config(tok_dir, tmp_path)
  cached_cfg = jsonl_config(tok_dir, tmp_path)
  # LD-DPO's weighted sums, cached as computed live (the plain sums are
  # cached through the launcher in tests/interop/test_hf_init_from.py).
  live_cfg.preference.ld_alpha = cached_cfg.preference.ld_alpha = 0.5
  cached_cfg.reference = "none"
  cached_cfg.preference.cache_reference = True
  with pytest.raises(ValueError, match="reference_cache is empty"):
    objectives.build_objective(cached_cfg)
  workdir = str(tmp_path / "cached")
  prepared = reference.prepare(cached_cfg, workdir)
  directory = prepared.data.preference.reference_cache
  chunks = sorted(os.listdir(os.path.join(directory, "train")))
  assert chunks == [f"chunk-00000{i}.npy" for i in range(3)]  # 40 records
  # Reused as is; a lost chunk (preemption) is the only one recomputed.
  os.remove(os.path.join(directory, "train", chunks[1]))
  written = []
  original = reference.compute_split
  monkeypatch.setattr(reference, "compute_split",
                      lambda *a, **k: written.append(original(*a, **k)))
  again = reference.prepare(cached_cfg, workdir)
  assert again.data.preference.reference_cache == directory
  assert written == [1, 0]  # train: the lost chunk; eval: nothing

  # The same batch, scored with the live frozen reference and the cache.
  tok = train.tok_lib.build_tokenizer(prepared.tokenizer, workdir)
  batch = next(iter(preference.build_preference_dataset(
      prepared.data, tok, split="train", seed=0, seq_len=64, batch_size=8)))
  live = train.Trainer(live_cfg, str(tmp_path / "live"))
  live.restore_or_init()
  policy = jax.tree.map(lambda x: x * 1.05, live.state.params)
  out = {}
  for name, cfg in (("frozen", live_cfg), ("cached", prepared)):
    objective = objectives.build_objective(cfg)
    fn = jax.jit(lambda p, f, b, o=objective: o(nnx.merge(live.graphdef, p), b,
                                                None, frozen=f))
    out[name] = jax.device_get(fn(policy, live.frozen, batch))
  loss_live, (count, m_live) = out["frozen"]
  loss_cached, (_, m_cached) = out["cached"]
  assert count > 8
  np.testing.assert_allclose(loss_cached, loss_live, rtol=1e-5)
  np.testing.assert_allclose(m_cached["rewards/margins"],
                             m_live["rewards/margins"], rtol=1e-4, atol=1e-5)
  assert abs(float(m_live["rewards/margins"][0])) > 1e-3  # not trivially 0
  # And a training run from the cache never receives the reference.
  prepared.train.update(steps=1, eval_every=0, log_every=1)
  trainer, last = train.run(prepared, workdir)
  assert trainer.frozen is None and np.isfinite(last["train/loss"])


def test_bco_running_mean_is_checkpointed_and_resumes(tok_dir, tmp_path):
  def bco(**overrides):
    c = recipe("dpo_demo", tok_dir, **overrides)
    c.objective = "bco"
    c.data.preference.format = "binary"
    return c

  straight, last = train.run(bco(log_every=1), str(tmp_path / "a"))
  extras = jax.device_get(straight.state.extras)
  assert float(extras["bco/count"]) > 0
  # The last step's delta is the running mean after folding that step in.
  np.testing.assert_allclose(extras["bco/mean"], last["train/bco/delta"],
                             rtol=1e-5)
  assert np.isfinite(last["eval/bco/delta"])
  train.run(bco(steps=2, log_every=1), str(tmp_path / "b"))
  resumed, _ = train.run(bco(log_every=1), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal, final_params(straight),
               final_params(resumed))
  jax.tree.map(np.testing.assert_array_equal, extras,
               jax.device_get(resumed.state.extras))


class _Tok:
  vocab_size, bos_id, eos_id = 100, 1, 2

  def encode(self, text):
    return [ord(c) % 100 for c in text]


def test_reference_cache_key_follows_data_and_reference(tmp_path):
  from alignax import defaults  # pylint: disable=g-import-not-at-top
  data = tmp_path / "prefs.jsonl"
  data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
  c = defaults.base_config()
  c.data.source, c.data.paths = "jsonl", (str(data),)
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  key, material = reference.cache_key(c, _Tok(), params)
  assert key == reference.cache_key(c, _Tok(), dict(params))[0]
  assert material["data"]["train"][0][0] == str(data)
  swapped = dict(params, w=params["w"][::-1])  # same sums, other weights
  assert reference.cache_key(c, _Tok(), swapped)[0] != key
  moved = dict(params, b=params["b"] + 1e-3)
  assert reference.cache_key(c, _Tok(), moved)[0] != key
  data.write_text('{"prompt": "p", "chosen": "a", "rejected": "cc"}\n')
  assert reference.cache_key(c, _Tok(), params)[0] != key  # new data
  c.train.seq_len = 64
  assert reference.cache_key(c, _Tok(), params)[0] != key


def _tr_dpo(tok_dir):
  """TR-DPO (a sync every 2 steps, alpha 0.6), a checkpoint every step."""
  c = recipe("dpo_demo", tok_dir, eval_every=0, log_every=1)
  c.checkpoint.update(save_every=1, keep=4)
  c.preference.update(sync_ref_model=True, ref_model_mixup_alpha=0.6,
                      ref_model_sync_steps=2)
  return c


def test_tr_dpo_reference_mixes_in_the_policy_and_resumes(tok_dir, tmp_path):
  from alignax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from alignax import state as state_lib  # pylint: disable=g-import-not-at-top
  straight, last = train.run(_tr_dpo(tok_dir), str(tmp_path / "a"))
  assert np.isfinite(last["train/loss"]) and last["step"] == 4
  # Every saved step's policy and reference, read back from disk.
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      straight.state.params)
  directory = str(tmp_path / "a" / "checkpoints")
  reader = ckpt_lib.Checkpointer(directory, save_every=1, keep=4)
  ref = {s: jax.device_get(reader.restore_reference(s, abstract))
         for s in range(1, 5)}
  reader.close()
  pol = {s: jax.device_get(ckpt_lib.load_params(f"{directory}/{s}", abstract))
         for s in range(1, 5)}
  start = jax.device_get(state_lib.init_params(straight.model_cfg, 0))
  check = lambda want, got, **tol: jax.tree.map(
      lambda w, g: np.testing.assert_allclose(g, w, **tol), want, got)
  mix = lambda p, r: jax.tree.map(
      lambda p, r: np.float32(0.4) * r + np.float32(0.6) * p, p, r)
  check(start, ref[1], rtol=1e-6, atol=1e-7)  # no sync before step 2
  check(mix(pol[2], ref[1]), ref[2], rtol=1e-6, atol=1e-7)
  jax.tree.map(np.testing.assert_array_equal, ref[2], ref[3])  # between
  check(mix(pol[4], ref[3]), ref[4], rtol=1e-6, atol=1e-7)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), ref[4], start)
  assert max(jax.tree.leaves(moved)) > 1e-4
  jax.tree.map(np.testing.assert_array_equal, ref[4],
               jax.device_get(straight.frozen))
  # Stopped after step 3 (past the sync at 2; step 4's save never landed)
  # and resumed through the sync at 4: the straight run's policy and
  # reference.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  resumed, _ = train.run(_tr_dpo(tok_dir), str(tmp_path / "b"))
  for a, b in ((straight.state.params, resumed.state.params),
               (straight.frozen, resumed.frozen)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a),
                 jax.device_get(b))


@pytest.mark.parametrize("overrides, expect", [
    (dict(reference="none"), "set config.reference='frozen' (got 'none')"),
    (dict(reference="base", lora=True), "not supported with LoRA"),
    (dict(reference="none", cache_reference=True), "cannot be precomputed"),
    (dict(ref_model_mixup_alpha=0.0),
     "config.preference.ref_model_mixup_alpha=0.0 must be in (0, 1]"),
    (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha=1.5 must be"),
    (dict(ref_model_sync_steps=0),
     "config.preference.ref_model_sync_steps=0 must be an integer > 0"),
    (dict(objective="kto", sync_ref_model=False, use_weighting=True),
     "use it with objective 'dpo', not 'kto'"),
])
def test_tr_dpo_and_wpo_config_errors_are_one_line(tok_dir, overrides,
                                                   expect):
  from alignax import defaults  # pylint: disable=g-import-not-at-top
  c = recipe("dpo_demo", tok_dir)
  c.preference.sync_ref_model = True
  for key, value in overrides.items():
    if key in ("reference", "objective"):
      c[key] = value
    elif key == "lora":
      c.lora.enabled = value
    else:
      c.preference[key] = value
  with pytest.raises(ValueError) as e:
    defaults.check_values(c)
  assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_wpo_config_reaches_the_dpo_objective(tok_dir):
  c = recipe("dpo_demo", tok_dir)
  assert not objectives.build_objective(c).keywords["use_weighting"]
  c.preference.use_weighting = True
  assert objectives.build_objective(c).keywords["use_weighting"]
