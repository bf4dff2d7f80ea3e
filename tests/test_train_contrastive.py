"""End to end: LM -> dual encoder (init_from, resume) and CAFe, via train.run."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from alignax import checkpoint as ckpt_lib
from alignax import defaults
from alignax import metrics as metrics_lib
from alignax import mine
from alignax import retrieval
from alignax import sharding as shd
from alignax import state as state_lib
from alignax import train
from alignax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizer"))


def tiny_config(tok_dir, objective="lm", task="lm", steps=4):
  c = defaults.base_config()
  c.objective, c.data.task = objective, task
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 d_ff=64, max_seq_len=32)
  c.tokenizer.update(vocab_size=512, num_sentinels=8, cache_dir=tok_dir)
  c.train.update(steps=steps, batch_size=8, seq_len=32, log_every=2,
                 eval_every=2, eval_batches=2, progress_bar=False)
  c.checkpoint.update(save_every=2, keep=3)
  c.optimizer.update(warmup_steps=1, schedule_steps=4)
  c.data.eval_queries = 16  # a quick retrieval eval (the corpus stays whole)
  return c


@pytest.fixture(scope="module")
def lm_workdir(tok_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lm"))
  c = tiny_config(tok_dir, steps=2)
  c.train.eval_every = 0
  train.run(c, workdir)
  return workdir


def dual_encoder_config(tok_dir, lm_workdir, steps=4):
  c = tiny_config(tok_dir, "contrastive", "pairs", steps)
  c.checkpoint.init_from = lm_workdir
  c.contrastive.update(proj_dim=16, chunk_size=8)  # with gradient caching
  c.train.eval_every = 4  # step 0 and the last step
  return c


def test_lm_checkpoint_loads_into_the_embedding_model(tok_dir, lm_workdir,
                                                      tmp_path):
  trainer = train.Trainer(dual_encoder_config(tok_dir, lm_workdir),
                          str(tmp_path))
  fresh_head = jax.device_get(trainer.state.params["head"])
  assert trainer.restore_or_init() == 0
  params = dict(trainer.state.params)
  head = params.pop("head")
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  lm_params = ckpt_lib.load_params(lm_workdir, target)  # the LM's last step
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(lm_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(head),
               fresh_head)
  trainer.checkpointer.close()


def test_dual_encoder_resume_equals_straight_run(tok_dir, lm_workdir,
                                                 tmp_path):
  straight, last = train.run(dual_encoder_config(tok_dir, lm_workdir),
                             str(tmp_path / "a"))
  assert last["step"] == 4
  for key in ("eval/retrieval/recall@10", "eval/retrieval/ndcg@10",
              "eval/retrieval/mrr@10", "eval/retrieval/map@100",
              "train/contrastive/temperature", "eval/contrastive/accuracy"):
    assert np.isfinite(last[key]), key
  records = metrics_lib.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  assert records[0]["step"] == 0 and "eval/retrieval/recall@1" in records[0]
  first_leg = dual_encoder_config(tok_dir, lm_workdir, steps=2)
  first_leg.train.eval_every = 0  # evaluation does not touch the state
  train.run(first_leg, str(tmp_path / "b"))
  second_leg = dual_encoder_config(tok_dir, lm_workdir)
  second_leg.train.eval_every = 0
  resumed, _ = train.run(second_leg, str(tmp_path / "b"))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(straight.state.params),
               jax.device_get(resumed.state.params))
  # The standalone evaluator on the saved checkpoint = the in-loop eval.
  c = dual_encoder_config(tok_dir, lm_workdir)
  graphdef, params = mine.load_embedding_params(
      c, str(tmp_path / "a"), straight.tokenizer, straight.mesh)
  standalone = retrieval.from_config(c, straight.tokenizer, straight.mesh,
                                     graphdef)(params)
  for key, value in standalone.items():
    np.testing.assert_allclose(value, last["eval/" + key], rtol=1e-5,
                               err_msg=key)


def test_mine_hard_negatives_from_a_model(tok_dir, lm_workdir, tmp_path):
  records = [{"query": f"return item {i} of the list", "positive":
              f"def get_{i}(xs):\n    return xs[{i}]"} for i in range(16)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = dual_encoder_config(tok_dir, lm_workdir)
  c.data.update(source="jsonl", paths=(str(path),))
  tokenizer = tok_lib.build_tokenizer(c.tokenizer, str(tmp_path))
  mesh = shd.make_mesh(c.mesh)
  graphdef, params = mine.load_embedding_params(c, lm_workdir, tokenizer,
                                                     mesh)
  out = tmp_path / "mined.jsonl"
  n = mine.mine_to_file(c, graphdef, params, tokenizer, mesh, str(out),
                             num_negatives=2)
  assert n == 16
  positives = {r["positive"] for r in records}
  for line, record in zip(out.read_text().splitlines(), records):
    mined = json.loads(line)
    assert mined["query"] == record["query"]
    assert len(mined["negatives"]) == 2
    assert record["positive"] not in mined["negatives"]
    assert set(mined["negatives"]) <= positives


def test_cafe_reports_both_losses(tok_dir, lm_workdir, tmp_path):
  c = tiny_config(tok_dir, "cafe", "cafe", steps=2)
  c.checkpoint.init_from = lm_workdir
  c.contrastive.update(loss="siglip", lm_weight=0.5)
  _, last = train.run(c, str(tmp_path))
  for key in ("train/lm/loss", "train/contrastive/loss", "eval/lm/loss",
              "eval/lm/accuracy", "eval/retrieval/recall@10", "train/loss"):
    assert np.isfinite(last[key]), key
  # SigLIP's init: t = 10, b = -10 (moved by two small steps at most).
  np.testing.assert_allclose(last["train/contrastive/logit_scale"], 10.0,
                             rtol=0.05)
  with pytest.raises(ValueError, match="microbatches"):
    c.train.microbatches = 2
    defaults.validate(c, num_devices=8, batch_ways=4)


def test_fill_missing_keeps_fresh_leaves_and_rejects_no_match():
  fresh = {"a": np.ones(2), "head": {"w": np.zeros(3)}}
  restored = {"a": np.full(2, 5.0),
              "head": {"w": jax.ShapeDtypeStruct((3,), np.float32)}}
  out = state_lib.fill_missing(restored, fresh)
  np.testing.assert_array_equal(out["a"], [5.0, 5.0])
  np.testing.assert_array_equal(out["head"]["w"], np.zeros(3))
  with pytest.raises(ValueError, match="none of the model's parameters"):
    state_lib.fill_missing(
        {"a": jax.ShapeDtypeStruct((2,), np.float32)}, {"a": np.ones(2)})


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo recipes at test size (flags as a user would pass them).
TINY_OVERRIDES = dict(
    model=dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
               d_ff=64, max_seq_len=32),
    tokenizer=dict(vocab_size=512, num_sentinels=8),
    train=dict(steps=2, batch_size=8, seq_len=32, log_every=2, eval_every=2,
               eval_batches=1, progress_bar=False),
    checkpoint=dict(save_every=2), optimizer=dict(warmup_steps=1),
    data=dict(eval_queries=16))


def _demo_recipe(name, lm_workdir, tok_dir):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(lm_workdir)
  assert c.checkpoint.init_from == lm_workdir
  for section, values in TINY_OVERRIDES.items():
    c[section].update(values)
  c.tokenizer.cache_dir = tok_dir  # the tiny LM's tokenizer
  return c


def test_demo_recipes_and_the_retrieval_command(tok_dir, lm_workdir, tmp_path):
  workdir = str(tmp_path / "dual")
  _, last = train.run(_demo_recipe("dual_encoder_demo", lm_workdir, tok_dir),
                      workdir)
  assert last["step"] == 2 and 0 <= last["eval/retrieval/recall@10"] <= 1
  _, cafe = train.run(_demo_recipe("cafe_demo", lm_workdir, tok_dir),
                      str(tmp_path / "cafe"))
  assert np.isfinite(cafe["eval/lm/loss"]) and np.isfinite(
      cafe["eval/contrastive/loss"])
  # The standalone evaluation of the saved checkpoint prints the loop's.
  flags = [f"--config.{s}.{k}={v}" for s, values in TINY_OVERRIDES.items()
           for k, v in values.items()]
  cmd = [sys.executable, "-m", "alignax.mine",
         f"--config={os.path.join(ROOT, 'configs', 'dual_encoder_demo.py')}:"
         f"{lm_workdir}", f"--checkpoint={workdir}",
         f"--config.tokenizer.cache_dir={tok_dir}", *flags]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = json.loads(done.stdout.strip().splitlines()[-1])
  for key, value in printed.items():
    np.testing.assert_allclose(value, last[f"eval/{key}"], atol=2e-5)
  assert "retrieval/ndcg@10" in printed
