"""GRACE (alignax.rewards.grace, alignax.grace): rewards, pooling, the loop."""

import numpy as np
import pytest

from alignax.rewards import grace as grace_rewards


def _reference(anchors, samples, negatives, g, tau, wc, wx):
  """The authors' HiddenRewardManager (supervised, with_scale) as loops."""
  def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  b = len(samples)
  p = b // g
  total = np.zeros(b)
  for grp in range(p):
    rows = range(grp * g, grp * g + g)
    neg = 0.0 if negatives is None else -cos(anchors[grp * g],
                                             negatives[grp * g])
    for i in rows:
      pos = cos(anchors[i], samples[i])
      clu = (sum(cos(samples[i], samples[j]) for j in rows if j != i)
             / (g - 1) if g > 1 else 0.0)
      maxes = [max(cos(anchors[i], samples[j])
                   for j in range(h * g, h * g + g))
               for h in range(p) if h != grp]
      cross = -np.mean(maxes) if maxes else 0.0
      total[i] = (pos + neg + wc * clu + wx * cross) / tau
  return total


@pytest.mark.parametrize("g,p,with_negatives", [(4, 3, True), (2, 1, False),
                                                (1, 3, True)])
def test_rewards_match_the_authors_loops(g, p, with_negatives):
  rng = np.random.default_rng(g * 10 + p)
  a, x, n = (rng.normal(size=(g * p, 5)) for _ in range(3))
  n = n if with_negatives else None
  total, terms = grace_rewards.grace_rewards(
      a, x, n, num_generations=g, temperature=0.7, clustering_weight=0.3,
      cross_group_weight=0.5)
  np.testing.assert_allclose(total, _reference(a, x, n, g, 0.7, 0.3, 0.5),
                             rtol=1e-12, atol=1e-12)
  assert set(terms) == set(grace_rewards.COMPONENTS)
  np.testing.assert_allclose(
      total, terms["positive"] + terms["negative"]
      + 0.3 * terms["clustering"] + 0.5 * terms["cross_group"])
  # Scale-free: cosine similarities.
  again, _ = grace_rewards.grace_rewards(
      3 * a, 0.5 * x, n, num_generations=g, temperature=0.7,
      clustering_weight=0.3, cross_group_weight=0.5)
  np.testing.assert_allclose(again, total, rtol=1e-12)


def test_rewards_by_hand():
  # Two groups of G = 2 in 2-D; anchors a_g, samples x_gi.
  s = np.sqrt(0.5)
  anchors = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)
  samples = np.array([[1, 0], [s, s], [0, 1], [-1, 0]], float)
  total, terms = grace_rewards.grace_rewards(
      anchors, samples, num_generations=2, temperature=0.5,
      clustering_weight=0.2, cross_group_weight=0.2)
  # positive: cos(a, x) = 1, s, 1, 0; clustering: cos(x_g1, x_g2) = s, s,
  # 0, 0; cross: -max over the other group's samples of cos(a, x):
  # group 0 (a = e1) vs {e2, -e1} -> 0; group 1 (a = e2) vs {e1, (s, s)} -> s.
  np.testing.assert_allclose(terms["positive"], np.array([1, s, 1, 0]) / 0.5)
  np.testing.assert_allclose(terms["clustering"], np.array([s, s, 0, 0]) / .5)
  np.testing.assert_allclose(terms["cross_group"],
                             np.array([0, 0, -s, -s]) / 0.5, atol=1e-15)
  want = np.array([1 + 0.2 * s, s + 0.2 * s, 1 - 0.2 * s, -0.2 * s]) / 0.5
  np.testing.assert_allclose(total, want)
  # = [2.28284271, 1.69705627, 1.71715729, -0.28284271]
  np.testing.assert_allclose(
      total, [2.2828427125, 1.6970562748, 1.7171572875, -0.2828427125],
      rtol=1e-10)


def _infonce_reference(anchors, samples, g, tau):
  """log p(own pair | sample) over the side's partner anchors, as loops."""
  def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  out = []
  for i, x in enumerate(samples):
    logits = [cos(x, a) / tau for a in anchors]
    out.append(logits[i // g] - np.log(sum(np.exp(v) for v in logits)))
  return np.array(out)


@pytest.mark.parametrize("g,p", [(4, 3), (1, 5), (3, 1)])
def test_infonce_rewards_match_loops(g, p):
  rng = np.random.default_rng(7 * g + p)
  a, x = rng.normal(size=(p, 6)), rng.normal(size=(p * g, 6))
  total, terms = grace_rewards.infonce_rewards(a, x, num_generations=g,
                                               temperature=0.3)
  np.testing.assert_allclose(total, _infonce_reference(a, x, g, 0.3),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(total, terms["positive"] - terms["log_partition"])
  assert set(terms) == set(grace_rewards.INFONCE_COMPONENTS)
  assert np.all(total <= 0)
  if p == 1:  # one pair: nothing to tell apart
    np.testing.assert_allclose(total, 0.0, atol=1e-12)


def test_infonce_rewards_by_hand_and_errors():
  s = np.sqrt(0.5)
  anchors = np.array([[1, 0], [0, 1]], float)
  samples = np.array([[1, 0], [s, s], [0, 1], [-1, 0]], float)
  total, _ = grace_rewards.infonce_rewards(anchors, samples, num_generations=2,
                                           temperature=0.5)
  # logits / tau: [2, 0], [2s, 2s], [0, 2], [-2, 0]; own pair 0, 0, 1, 1.
  a = 2 - np.log(np.exp(2) + 1)
  np.testing.assert_allclose(total, [a, -np.log(2), a, a])
  np.testing.assert_allclose(total, [-0.1269280110, -0.6931471806,
                                     -0.1269280110, -0.1269280110], rtol=1e-9)
  # The sample nearer its own partner than the other pair's wins, unlike
  # GRACE's terms, whose in-group part is the closeness to the partner only.
  with pytest.raises(ValueError, match=r"\[P \* G, D\]"):
    grace_rewards.infonce_rewards(anchors, samples[:3], num_generations=2)
  with pytest.raises(ValueError, match="temperature"):
    grace_rewards.infonce_rewards(anchors, samples, num_generations=2,
                                  temperature=0.0)


def test_length_penalty_and_errors():
  np.testing.assert_array_equal(
      grace_rewards.length_penalized([0.5, 2.0, 3.0], [False, True, False]),
      [0.5, -1.0, 3.0])
  a = np.ones((4, 3))
  with pytest.raises(ValueError, match="multiple of G=3"):
    grace_rewards.grace_components(a, a, num_generations=3)
  with pytest.raises(ValueError, match=r"anchors must have shape \[B, D\]"):
    grace_rewards.grace_components(a[0], a, num_generations=2)
  with pytest.raises(ValueError, match="finite"):
    grace_rewards.grace_components(a, a * np.nan, num_generations=2)
  with pytest.raises(ValueError, match="temperature"):
    grace_rewards.grace_rewards(a, a, num_generations=2, temperature=0.0)


# --- pooling and rows (alignax.grace) -------------------------------------------


def _tiny_model():
  """A 2-layer model with random NumPy parameters (no init to compile)."""
  import jax
  from flax import nnx
  from alignax import state as state_lib
  from alignax.models import config as config_lib
  cfg = config_lib.ModelConfig(vocab_size=64, d_model=32, n_layers=2,
                               n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                               max_seq_len=16)
  graphdef, abstract = state_lib.abstract_model(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: rng.normal(0.0, 0.3, x.shape).astype(x.dtype),
      nnx.to_pure_dict(abstract))
  return graphdef, params


def test_mean_pooling_equals_the_masked_mean_of_return_hidden():
  import jax
  from flax import nnx
  from alignax import grace
  from alignax import sharding as shd
  graphdef, params = _tiny_model()
  rng = np.random.default_rng(0)
  rows = rng.integers(1, 64, (8, 12)).astype(np.int32)
  seg = np.ones_like(rows)
  seg[:, 10:] = 0  # padding
  prefix = np.zeros(rows.shape, bool)
  prefix[:, :4] = True  # a prefix-LM prompt, as the UL2 rows
  masks = np.zeros(rows.shape, np.float32)
  masks[:, 5:9] = 1.0
  masks[3] = 0.0  # nothing pooled: zeros
  masks[5, 2:10] = 1.0
  positions = np.tile(np.arange(12, dtype=np.int32), (8, 1))
  got = grace.rationale_embeddings(graphdef, params, rows, masks,
                                   positions=positions, segment_ids=seg,
                                   prefix=prefix)
  hidden = jax.jit(lambda p: nnx.merge(graphdef, p)(
      rows, positions=positions, segment_ids=seg, prefix=prefix,
      return_hidden=True))
  h = np.asarray(hidden(params), np.float64)  # [B, T, D]
  for i in range(8):
    on = masks[i] > 0
    want = h[i, on].mean(0) if on.any() else np.zeros(h.shape[-1])
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  # Rows over an 8-device mesh, in chunks (embed pads the last chunk).
  mesh = shd.make_mesh({"fsdp": -1})
  batch = {"inputs": rows[:6], "positions": positions[:6],
           "segment_ids": seg[:6], "prefix": prefix[:6]}
  sharded = grace.embed(graphdef, jax.device_put(params), batch, masks[:6],
                        mesh=mesh, batch_size=8)
  np.testing.assert_allclose(sharded, got[:6], rtol=1e-5, atol=1e-6)


class _Tok:
  """Characters as ids (a = 10, ...); BOS 1, EOS 2, the mode token 5."""
  bos_id, eos_id = 1, 2

  def mode_id(self, name):
    assert name == "[S2S]"
    return 5

  def encode(self, text):
    return [10 + ord(c) - ord("a") for c in text]


def test_prompts_rows_and_pooling_masks():
  from alignax import grace
  t = grace.Template(head="ab", tail="c")
  p = grace.prompt_ids(_Tok(), "defgh", t, room=6, mode="[S2S]")
  # [mode] + head + the text's start + tail, within room ids.
  assert p.ids == (5, 10, 11, 13, 14, 12) and p.text_span == (3, 5)
  q = grace.prompt_ids(_Tok(), "d", t, room=6)
  assert q.ids == (1, 10, 11, 13, 12) and q.text_span == (3, 4)
  with pytest.raises(ValueError, match="no room"):
    grace.prompt_ids(_Tok(), "d", t, room=4)
  outs = [[40, 41, 2, 42], [43, 44, 45]]  # stopped at 2; never stopped
  batch, mask = grace.rationale_rows([p, q], outs + outs, seq_len=10,
                                     stop_tokens=(2,))
  assert batch["inputs"].shape == (4, 10)
  np.testing.assert_array_equal(batch["truncated"], [False, True, False,
                                                     True])
  want = np.zeros((4, 10), np.float32)
  want[0, 6:9] = want[1, 6:9] = 1  # the rationale, through its stop
  want[2, 5:8] = want[3, 5:8] = 1
  only = grace.rationale_rows([p, q], outs + outs, seq_len=10,
                              stop_tokens=(2,), pool="rationale")[1]
  np.testing.assert_array_equal(only, want)
  want[:2, 3:5] = want[2:, 3:4] = 1  # and the text (the authors' pooling)
  np.testing.assert_array_equal(mask, want)
  # The rows are the rollout batch's: the completion's targets are trained.
  assert batch["weights"][0, 5:8].sum() == 3 and batch["weights"][0].sum() == 3
  with pytest.raises(ValueError, match="pool="):
    grace.rationale_rows([p], outs, seq_len=10, stop_tokens=(2,), pool="x")


class _CharTok:
  """A character tokenizer over 64 ids; id 4 is the newline (a stop)."""
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = base_vocab_size = 60

  def mode_id(self, name):
    return 3

  def encode(self, text):
    return [4 if c == "\n" else 5 + ord(c) % 55 for c in text]

  def decode(self, ids):
    return "".join("\n" if i == 4 else chr(i) if i >= 5 else "" for i in ids)


def test_task_rollout_and_evaluation_on_a_tiny_policy():
  import types
  from alignax import defaults
  from alignax import grace
  graphdef, params = _tiny_model()
  c = defaults.base_config()
  c.train.update(seq_len=16, batch_size=8)
  c.grpo.update(num_generations=2, max_completion_length=4, task="grace")
  c.grpo.grace.update(eval_pairs=6, anchor_temperature=1.0)  # 2 compiles
  trainer = types.SimpleNamespace(graphdef=graphdef, tokenizer=_CharTok(),
                                  state=types.SimpleNamespace(params=params),
                                  mesh=None, config=c)
  task = grace.GraceTask.from_config(c)
  assert task.groups_per_prompt == 2 == grace.groups_per_prompt(c)
  prompts = task.prompts("eval", 2, seed=0)  # (parsing 'train' takes ~10 s)
  ids, outs, rewards = task.rollout(trainer, prompts, jax_key(0))
  # 2 pairs -> 2 document groups, then 2 query groups, of G = 2 rows.
  assert len(ids) == 4 and len(outs) == 8 and rewards.shape == (8, 1)
  s = task.settings
  want_doc = grace.prompt_ids(_CharTok(), prompts[1].target["positive"],
                              grace.DOC_TEMPLATE, room=s.room).ids
  assert tuple(ids[1]) == want_doc and len(ids[2]) <= s.room
  assert all(len(o) <= 4 for o in outs) and np.isfinite(rewards).all()
  never_stopped = np.array([4 not in o and 2 not in o for o in outs])
  np.testing.assert_array_equal(rewards[never_stopped, 0], -1.0)
  assert set(task.last_terms) == set(grace_rewards.COMPONENTS)
  # grpo.grace.reward='infonce': each sample's log p(own pair), at most 0.
  import dataclasses
  task.settings = dataclasses.replace(task.settings, reward="infonce")
  _, outs, rewards = task.rollout(trainer, prompts, jax_key(0))
  stopped = np.array([4 in o or 2 in o for o in outs])
  assert np.all(rewards[stopped, 0] <= 0) and np.isfinite(rewards).all()
  assert set(task.last_terms) == set(grace_rewards.INFONCE_COMPONENTS)
  metrics = task.evaluate(trainer)
  for side in ("rationale", "plain"):
    for k in ("recall@1", "recall@5", "recall@10", "mrr@10"):
      assert 0.0 <= metrics[f"{side}/{k}"] <= 1.0
  assert 0 < metrics["rationale/mean_length"] <= 4


def jax_key(seed):
  import jax
  return jax.random.key(seed)


def _loop_config(tok_dir, steps):
  from alignax import defaults
  c = defaults.base_config()
  c.objective = "grpo"
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=32)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=steps, seq_len=32, log_every=1, eval_every=0,
                 progress_bar=False)
  c.optimizer.update(warmup_steps=0, schedule_steps=4, lr=1e-2)
  c.checkpoint.update(save_every=1, keep=2)
  c.mesh.update(fsdp=4, tensor=2)  # the 4 rows over the batch ways
  c.grpo.update(task="grace", num_generations=2, prompts_per_step=1,
                max_completion_length=4)
  # A fresh model never writes a newline: without the length penalty the
  # rewards still differ within a group, so the step has a gradient.
  c.grpo.grace.update(length_penalty=False, anchor_temperature=1.0)
  return c


def test_rl_loop_trains_and_resumes_as_a_straight_run(tmp_path, monkeypatch):
  import json
  import os
  import shutil
  import jax
  from alignax import grace
  from alignax import rl
  from alignax.data import retrieval_task
  # The held-out pairs stand in for the training pairs (parsing the whole
  # training split costs ~10 s).
  few = retrieval_task.code_search_pairs("heldout")[:6]
  monkeypatch.setattr(grace.GraceTask, "pairs", lambda self, split: few)
  tok, a, b = (str(tmp_path / d) for d in ("tok", "a", "b"))
  straight, last = rl.run(_loop_config(tok, 2), a)
  assert straight.config.train.batch_size == 4  # 1 pair x 2 sides x G = 2
  assert last["step"] == 2 and last["train/nonfinite"] == 0
  for key in ("train/loss", "rollout/reward", "rollout/reward/grace_std"):
    assert np.isfinite(last[key]), key
  assert last["train/update_norm"] > 0
  with open(os.path.join(a, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "2"))
  resumed, again = rl.run(_loop_config(tok, 2), b)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(straight.state.params),
               jax.device_get(resumed.state.params))
  assert again["train/loss"] == last["train/loss"]
