"""Tests for the UL2 objective, UL2 batches through the model, and the recipe.

The NumPy references here (log-softmax cross-entropy grouped by denoiser, the
prefix-LM visibility rule, the closed-form gradient ``w (softmax - onehot)``)
are written independently of the library; hand-computed numbers are derived
in comments.
"""

import functools
import importlib.util
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignax import defaults
from alignax import metrics as metrics_lib
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import step as step_lib
from alignax import train
from alignax.data import packing
from alignax.data import tokenizer as tokenizer_lib
from alignax.data import ul2
from alignax.data import ul2_pipeline
from alignax.models import ModelConfig
from alignax.models import Transformer
from alignax.objectives import lm
from alignax.objectives import ul2 as ul2_obj

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SEQ_LEN = 32
VOCAB = 320
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=SEQ_LEN)
DENOISERS = ul2.UL2_DENOISERS
OBJECTIVE = functools.partial(ul2_obj.ul2_objective, denoisers=DENOISERS)
# Compiled once per shape: eager op-by-op dispatch of the model is slow.
_objective = nnx.jit(OBJECTIVE)
_forward = nnx.jit(lm.forward)


class _ByteBackend:
  """UTF-8 byte b -> id b + 4; 0 pad, 1 unk, 2 bos, 3 eos."""

  size, bos_id, eos_id = 260, 2, 3

  def encode(self, text):
    return [b + 4 for b in text.encode("utf-8")]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.Tokenizer(_ByteBackend(), num_sentinels=16,
                                 vocab_size=VOCAB)


@pytest.fixture(scope="module")
def batches(tok, tmp_path_factory):
  """Real UL2 batches [8, 32] of English phrases (1 to 8 words each)."""
  words = " ".join([ul2.__doc__, ul2_pipeline.__doc__]).split()
  cuts = np.cumsum(np.random.default_rng(0).integers(1, 9, len(words)))
  phrases = [" ".join(words[i:j]) for i, j in zip(cuts, cuts[1:])
             if j <= len(words)]
  path = tmp_path_factory.mktemp("ul2_text") / "train.jsonl"
  path.write_text("\n".join(json.dumps({"text": p}) for p in phrases))
  c = defaults.base_config().data
  c.update(source="jsonl", paths=(str(path),), task="ul2")
  c.num_threads, c.prefetch_buffer_size = 1, 4
  ds = ul2_pipeline.build_ul2_dataset(c, tok, split="train", seed=0,
                                      seq_len=SEQ_LEN, batch_size=8)
  it = iter(ds)
  return [next(it) for _ in range(3)]


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


class _TableModel:
  """A fake LM: the logits of token ``x`` are row ``x`` of a table.

  As an alignax LM it has final hidden states (the one-hot of the token)
  and an untied ``[V, V]`` head (the table), so the fused log-prob path
  computes the same logits ``one_hot(x) @ table = table[x]``.
  """

  def __init__(self, table):
    self.table = table
    self.lm_head = jnp.asarray(table)  # [D = V, V]
    self.cfg = types.SimpleNamespace(tie_embeddings=False, dtype="float32",
                                     final_logit_softcap=0.0)

  def __call__(self, tokens, *, return_hidden=False, **unused):
    if return_hidden:
      return jax.nn.one_hot(tokens, self.table.shape[0], dtype=jnp.float32)
    return self.table[tokens]


def _np_cross_entropy(logits, targets):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(-1))
  picked = np.take_along_axis(shifted, targets[..., None], -1)[..., 0]
  return log_z - picked


def _np_metrics(logits, batch, denoisers):
  """Reference: total and per-family/per-denoiser (loss sum, tokens)."""
  per_token = _np_cross_entropy(logits, batch["targets"])
  w = batch["weights"].astype(np.float64)
  out = {"loss": ((per_token * w).sum(), w.sum())}
  for family in "RXS":
    ids = [k for k, d in enumerate(denoisers) if d.kind == family]
    m = w * np.isin(batch["denoiser"], ids)
    out[f"ul2/{family}/loss"] = ((per_token * m).sum(), m.sum())
    out[f"ul2/{family}/tokens"] = (m.sum(), w.sum())
  for k, d in enumerate(denoisers):
    m = w * (batch["denoiser"] == k)
    out[f"ul2/{d.name}/loss"] = ((per_token * m).sum(), m.sum())
  return out


# --------------------------------------------------------- hand-made batches


def _hand_batch():
  """One row, 6 positions: denoisers R, R, X, X, S, S; the 5th is a prefix."""
  return {
      "inputs": np.array([[0, 1, 2, 3, 0, 1]], np.int32),
      "targets": np.array([[1, 2, 3, 0, 1, 2]], np.int32),
      "weights": np.array([[0, 1, 1, 1, 0, 1]], np.float32),
      "positions": np.arange(6, dtype=np.int32)[None],
      "segment_ids": np.ones((1, 6), np.int32),
      "prefix": np.zeros((1, 6), bool),
      "denoiser": np.array([[0, 0, 1, 1, 2, 2]], np.int32),
  }


HAND_DENOISERS = (ul2.Denoiser.regular(0.15, 3), ul2.Denoiser.extreme(0.5, 3),
                  ul2.Denoiser.sequential(0.25))


def test_hand_computed_uniform_and_peaked_logits():
  batch = _hand_batch()
  # All-zero logits over 4 ids: every token costs log 4. Loss tokens: R 1,
  # X 2, S 1 (the weights), 4 in all.
  _, (count, m) = ul2_obj.ul2_objective(
      _TableModel(jnp.zeros((4, 4))), batch, None, denoisers=HAND_DENOISERS)
  log4 = np.log(4.0)
  expected = {"loss": (4 * log4, 4), "ul2/R/loss": (log4, 1),
              "ul2/X/loss": (2 * log4, 2), "ul2/S/loss": (log4, 1),
              "ul2/R/tokens": (1, 4), "ul2/X/tokens": (2, 4),
              "ul2/S/tokens": (1, 4), "ul2/R(0.15,3)/loss": (log4, 1),
              "ul2/X(0.5,3)/loss": (2 * log4, 2), "ul2/S(0.25)/loss": (log4, 1)}
  assert float(count) == 4
  for name, want in expected.items():
    np.testing.assert_allclose(np.asarray(m[name], np.float64), want,
                               rtol=1e-6, err_msg=name)
  # Logit ln 3 on the correct next id (x + 1 mod 4), 0 elsewhere:
  # p = 3 / (3 + 3) = 1/2, so every token costs ln 2 and is predicted right.
  table = np.log(3.0) * np.eye(4, k=1) + np.log(3.0) * np.eye(4, k=-3)
  loss, (_, m) = ul2_obj.ul2_objective(
      _TableModel(jnp.asarray(table)), batch, None, denoisers=HAND_DENOISERS)
  np.testing.assert_allclose(float(loss), 4 * np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(m["ul2/X/loss"], (2 * np.log(2.0), 2), rtol=1e-6)
  np.testing.assert_allclose(m["accuracy"], (4, 4))


def test_matches_numpy_reference_and_closed_form_gradient():
  rng = np.random.default_rng(0)
  batch = _hand_batch()
  table = rng.normal(size=(4, 4)).astype(np.float32)
  fn = lambda t: ul2_obj.ul2_objective(_TableModel(t), batch, None,
                                       denoisers=HAND_DENOISERS)
  loss, (_, m) = fn(jnp.asarray(table))
  want = _np_metrics(table[batch["inputs"]], batch, HAND_DENOISERS)
  for name, pair in want.items():
    np.testing.assert_allclose(m[name], pair, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  # d(sum_t w_t l_t)/d logits_t = w_t (softmax(logits_t) - onehot(y_t)),
  # scattered back onto the table row of input x_t.
  grad = jax.grad(lambda t: fn(t)[0])(jnp.asarray(table))
  logits = table[batch["inputs"][0]].astype(np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  probs[np.arange(6), batch["targets"][0]] -= 1.0
  want_grad = np.zeros((4, 4))
  np.add.at(want_grad, batch["inputs"][0],
            batch["weights"][0][:, None] * probs)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_jit_and_vmap_agree_with_eager():
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  base = _hand_batch()
  stacked = []
  for seed in range(3):
    b = dict(base)
    r = np.random.default_rng(seed)
    b["weights"] = (r.random((1, 6)) < 0.7).astype(np.float32)
    b["denoiser"] = r.integers(0, 3, (1, 6)).astype(np.int32)
    stacked.append(b)
  fn = lambda b: ul2_obj.ul2_objective(_TableModel(table), b, None,
                                       denoisers=HAND_DENOISERS)
  eager = [fn(b) for b in stacked]
  jitted = jax.jit(fn)
  batched = jax.vmap(fn)(jax.tree.map(lambda *x: np.stack(x), *stacked))
  for i, b in enumerate(stacked):
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-6),
                 eager[i], jitted(b))
    jax.tree.map(lambda a, c, i=i: np.testing.assert_allclose(
        a, c[i], rtol=1e-6), eager[i], batched)


def test_missing_denoiser_field_names_the_task():
  batch = _hand_batch()
  del batch["denoiser"]
  with pytest.raises(ValueError, match="config.data.task='ul2'"):
    ul2_obj.ul2_objective(_TableModel(jnp.zeros((4, 4))), batch, None,
                          denoisers=HAND_DENOISERS)


# ------------------------------------------- real UL2 batches in the model


def _visibility(model, row):
  """``[T, T]`` bool: does output ``i`` change when input ``j`` changes?"""
  t = row["inputs"].shape[1]
  tokens = np.repeat(row["inputs"], t + 1, axis=0)  # [T + 1, T]
  tokens[1 + np.arange(t), np.arange(t)] = (
      tokens[1 + np.arange(t), np.arange(t)] + 101) % VOCAB
  tile = lambda x: np.repeat(x, t + 1, axis=0)
  logits = np.asarray(model(tokens, positions=tile(row["positions"]),
                            segment_ids=tile(row["segment_ids"]),
                            prefix=tile(row["prefix"])))  # [T + 1, T, V]
  changed = np.abs(logits[1:] - logits[:1]).max(-1) > 1e-6  # [j, i]
  return changed.T


def test_prefix_lm_attention_on_a_real_ul2_batch(model, batches):
  rows = [(b, r) for b in batches for r in range(8)
          if len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0])) > 1]
  assert rows, "no row packs two examples"
  for batch, r in rows[:2]:
    row = {k: v[r:r + 1] for k, v in batch.items()}
    seen = _visibility(model, row)
    seg, pre = row["segment_ids"][0], row["prefix"][0]
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    t = len(seg)
    causal = np.tril(np.ones((t, t), bool))
    both_prefix = pre[:, None] & pre[None, :]
    want = (same & (causal | both_prefix)) | np.eye(t, dtype=bool)
    np.testing.assert_array_equal(seen, want)
    for i in range(t):
      later = np.arange(t) > i
      if seg[i] and not pre[i]:  # a target never sees a later token
        assert not seen[i, later].any()
      if pre[i]:  # a prefix token sees its whole prefix and nothing else
        np.testing.assert_array_equal(seen[i], (seg == seg[i]) & pre)


def _per_token(model, batch):
  logits = _forward(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return np.asarray(jax.nn.log_softmax(logits)), logits


def test_packed_rows_equal_unpacked_examples(model, batches):
  batch = batches[0]
  segments = []
  for b in range(8):
    for s in np.unique(batch["segment_ids"][b][batch["segment_ids"][b] > 0]):
      segments.append((b, np.flatnonzero(batch["segment_ids"][b] == s)))
  alone = ul2_pipeline.empty_batch(len(segments), SEQ_LEN)
  for n, (b, idx) in enumerate(segments):
    for key in alone:
      alone[key][n, :len(idx)] = batch[key][b, idx]
  assert np.all(alone["positions"][:, 0] == 0) and alone["prefix"][:, 0].all()
  packed_logp, _ = _per_token(model, batch)
  alone_logp, _ = _per_token(model, alone)
  for n, (b, idx) in enumerate(segments):
    np.testing.assert_allclose(alone_logp[n, :len(idx)], packed_logp[b, idx],
                               atol=2e-5)
  # Hence the per-denoiser losses agree too.
  _, (_, m_packed) = _objective(model, batch, None)
  _, (_, m_alone) = _objective(model, alone, None)
  for name, (s, c) in m_packed.items():
    np.testing.assert_allclose(m_alone[name], (s, c), rtol=2e-5, atol=1e-5,
                               err_msg=name)


def test_metrics_add_up_and_match_numpy(model, batches):
  batch = batches[1]
  loss, (count, m) = _objective(model, batch, None)
  _, logits = _per_token(model, batch)
  want = _np_metrics(np.asarray(logits), batch, DENOISERS)
  for name, pair in want.items():
    np.testing.assert_allclose(m[name], pair, rtol=1e-4, err_msg=name)
  families = [f"ul2/{f}" for f in "RXS"]
  np.testing.assert_allclose(sum(m[f + "/loss"][0] for f in families), loss,
                             rtol=1e-5)
  np.testing.assert_allclose(sum(m[f + "/loss"][1] for f in families), count)
  np.testing.assert_allclose(
      sum(m[f + "/tokens"][0] / m[f + "/tokens"][1] for f in families), 1.0,
      rtol=1e-6)
  np.testing.assert_allclose(
      sum(m[f"ul2/{d.name}/loss"][0] for d in DENOISERS), loss, rtol=1e-5)
  # The UL2 objective is the LM objective plus metrics.
  lm_loss, (lm_count, lm_m) = lm.lm_objective(model, batch, None)
  np.testing.assert_allclose(loss, lm_loss, rtol=1e-6)
  np.testing.assert_allclose(m["accuracy"], lm_m["accuracy"])


def test_no_corruption_is_the_plain_lm_loss(model, tok):
  # An S example with an empty prefix (nothing corrupted, nothing hidden):
  # [S2S] + tokens + [EOS] with the loss on every next token.
  tokens = np.asarray(tok.encode("UL2 with no corruption is a plain LM."))
  mode = tok.mode_id(ul2.S2S)
  example = ul2.to_decoder_only_example(mode, np.array([], np.int64),
                                        np.r_[tokens, tok.eos_id])
  example["denoiser"] = np.full(len(example["inputs"]), 6, np.int32)
  assert example["weights"].all() and example["prefix"].sum() == 1

  def packed(segment):
    return packing.pad_batch(
        {k: np.asarray(v)[None] for k, v in dict(
            segment, positions=np.arange(len(segment["inputs"])),
            segment_ids=np.ones(len(segment["inputs"]))).items()}, 1)

  ul2_loss, (ul2_count, m) = OBJECTIVE(model, packed(example), None)
  lm_batch = packed(dict(packing.lm_segment(np.r_[mode, tokens, tok.eos_id]),
                         denoiser=example["denoiser"]))
  lm_loss, (lm_count, _) = lm.lm_objective(model, lm_batch, None)
  # NumPy reference: causal next-token loss of the unpacked sequence.
  seq = np.r_[mode, tokens, tok.eos_id]
  logits = np.asarray(model(jnp.asarray(seq[None, :-1])))
  want = _np_cross_entropy(logits[0], seq[1:]).sum()
  assert float(ul2_count) == float(lm_count) == len(seq) - 1
  np.testing.assert_allclose(ul2_loss, want, rtol=1e-5)
  np.testing.assert_allclose(lm_loss, want, rtol=1e-5)
  np.testing.assert_allclose(m["ul2/S/loss"][0], want, rtol=1e-5)
  np.testing.assert_allclose(m["ul2/S/tokens"][0] / m["ul2/S/tokens"][1], 1.0)


def _grads_and_metrics(batch, mesh_cfg, devices=None):
  mesh = shd.make_mesh(mesh_cfg, devices)
  optimizer, _ = state_lib.build_optimizer(
      defaults.base_config().optimizer, 100)
  graphdef, state, _ = state_lib.create_train_state(
      CFG, optimizer, mesh, shd.DEFAULT_RULES, seed=0)
  grad_fn = step_lib.make_grad_fn(OBJECTIVE, graphdef, mesh=mesh)
  out = jax.jit(grad_fn)(state.params, shd.host_to_global(batch, mesh),
                         jax.random.PRNGKey(0), None, 1.0)
  return jax.device_get(out)


def test_one_device_equals_eight_devices(batches):
  one = _grads_and_metrics(batches[2], {"fsdp": 1}, jax.devices()[:1])
  eight = _grads_and_metrics(batches[2], {"data": 2, "fsdp": 2, "tensor": 2})
  # fp32 sums over shards run in another order.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=2e-5), one, eight)


# ------------------------------------------------------ recipes end to end


def _load_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizer"))


def tiny_ul2_config(tok_dir, **train_overrides):
  c = _load_config("ul2_demo").get_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=SEQ_LEN)
  c.tokenizer.update(vocab_size=512, cache_dir=tok_dir)
  c.train.update(steps=4, batch_size=8, seq_len=SEQ_LEN, log_every=2,
                 eval_every=2, eval_batches=2, progress_bar=False)
  c.train.update(train_overrides)
  c.checkpoint.update(save_every=2, keep=3, async_save=True)
  c.optimizer.update(warmup_steps=1, schedule_steps=4)
  c.data.num_threads, c.data.prefetch_buffer_size = 2, 4
  return c


def test_ul2_run_resumes_exactly_and_logs_denoisers(tok_dir, tmp_path):
  straight, last = train.run(tiny_ul2_config(tok_dir), str(tmp_path / "a"))
  assert last["step"] == 4
  train.run(tiny_ul2_config(tok_dir, steps=2), str(tmp_path / "b"))
  resumed, _ = train.run(tiny_ul2_config(tok_dir), str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(straight.state.params),
               jax.device_get(resumed.state.params))
  records = metrics_lib.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  assert [r["step"] for r in records] == [0, 2, 4]
  for split in ("train", "eval"):
    for family in "RXS":
      assert np.isfinite(records[-1][f"{split}/ul2/{family}/loss"])
    shares = sum(records[-1][f"{split}/ul2/{f}/tokens"] for f in "RXS")
    np.testing.assert_allclose(shares, 1.0, rtol=1e-6)
  assert all(f"eval/ul2/{d.name}/loss" in records[0] for d in DENOISERS)


def test_recipe_configs_validate_and_pod_arithmetic_holds():
  demo = _load_config("ul2_demo").get_config()
  defaults.validate(demo, num_devices=8, batch_ways=8)
  # The demo shares the default tokenizer (100 sentinels) with the recipes
  # that start from its checkpoint; the mixture needs 16 at 128 tokens.
  needed = ul2.num_sentinels_needed(DENOISERS, demo.train.seq_len + 1)
  assert needed == 16
  assert demo.tokenizer.num_sentinels >= needed
  pod_module = _load_config("ul2_pod")
  pod = pod_module.get_config()
  defaults.validate(pod, num_devices=16, batch_ways=16)
  assert shd.mesh_shape(pod.mesh, 16) == (1, 16, 1)
  cfg = ModelConfig(**pod.model)
  n, flops = cfg.num_params(), cfg.flops_per_token(pod.train.seq_len)
  tokens = pod.train.batch_size * pod.train.seq_len
  doc = pod_module.__doc__
  assert f"{n:,} parameters" in doc
  assert f"{tokens:,} tokens per step" in doc
  assert f"{flops:,} model FLOPs per token" in doc
  billions = pod.train.steps * tokens / 1e9
  assert f"{pod.train.steps:,} steps = {billions:.1f}B tokens" in doc
  assert f"{n * 4 * 3 / 16 / 2**30:.2f} GiB" in doc  # params + Adam, per chip
  step_s = tokens * flops / (0.4 * 16 * 459e12)
  assert f"= {step_s:.2f} s per step" in doc
  assert pod.tokenizer.num_sentinels == 256
  # The variants keep 16 rows per chip and the 19.9B tokens.
  for variant, chips in (("v5p-8", 4), ("2slice", 32)):
    v = pod_module.get_config(variant)
    defaults.validate(v, num_devices=chips, batch_ways=chips)
    assert v.train.batch_size == 16 * chips
    assert v.train.steps * v.train.batch_size == pod.train.steps * 256
    assert f"``:{variant}``" in doc
  with pytest.raises(ValueError, match="ul2_pod.py:v4-8: use one of"):
    pod_module.get_config("v4-8")
