"""Compiling for abstract TPU slices on this host (alignax.aot).

Needs libtpu (``pip install -e '.[tpu]'``); without it only the topology
arithmetic runs. The compiled programs are per-chip: their memory analysis
and HLO text say where the bytes live.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from alignax import aot
from alignax import defaults

for _key, _value in aot.LIBTPU_ENV.items():
  os.environ.setdefault(_key, _value)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", ("v5p:2x2x1", 4)),
    ("v5p-16", ("v5p:2x2x2", 8)),
    ("v5p-128", ("v5p:4x4x4", 64)),
    ("v5p-256", ("v5p:4x4x8", 128)),
    ("v4-32", ("v4:2x2x4", 16)),
    ("v5e-16", ("v5e:4x4", 16)),
    ("v6e-8", ("v6e:2x4", 8)),
    ("v5p:4x4x12", ("v5p:4x4x12", 192)),
])
def test_slice_names(name, expected):
  _, libtpu_name, chips = aot.parse_topology(name)
  assert (libtpu_name, chips) == expected


@pytest.mark.parametrize("name", ["v5p-7", "v9-8", "tpu", "v5p-384"])
def test_bad_slice_names(name):
  with pytest.raises(ValueError):
    aot.parse_topology(name)


@needs_libtpu
def test_two_slices_add_a_data_axis_over_dcn():
  mesh = aot.topology_mesh({"data": 1, "fsdp": -1, "tensor": 1}, "v5p-16",
                           slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "tensor": 1}
  # data crosses the slices; fsdp's all-gathers stay inside one (ICI).
  assert {d.slice_index for d in mesh.devices[:, 0, 0]} == {0, 1}
  assert {d.slice_index for d in mesh.devices[0, :, 0]} == {0}


def _small_config(rows_per_chip, chips, seq_len=512):
  """A model whose per-chip memory is activations, not parameter shards."""
  c = defaults.base_config()
  c.model.update(vocab_size=512, d_model=256, n_layers=2, n_heads=4,
                 n_kv_heads=2, head_dim=64, d_ff=768, max_seq_len=seq_len,
                 dtype="bfloat16", remat="full")
  c.train.seq_len = seq_len
  c.train.batch_size = rows_per_chip * chips
  return c


def _compile(config, topology):
  mesh = aot.topology_mesh(config.mesh, topology)
  steps = aot.build_steps(config, aot.model_config(config), mesh)
  compiled, _ = aot.compile_step(steps.train, steps.train_args)
  return compiled


@pytest.fixture(scope="module")
def pod_and_slice():
  """The same rows per chip compiled for fsdp=8 (v5p-16) and fsdp=64."""
  return {topology: _compile(_small_config(8, chips), topology)
          for topology, chips in (("v5p-16", 8), ("v5p-128", 64))}


@needs_libtpu
def test_demo_compiles_for_v5p_8(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "tpu_train.py"),
       f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
       f"--workdir={tmp_path}", "--compile_for=v5p-8",
       "--config.model.vocab_size=2048"],  # the demo tokenizer's, rounded
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "aot v5p-8 (4 chips" in proc.stdout and "fits" in proc.stdout
  report = json.loads((tmp_path / "aot.json").read_text())
  assert report["fits"] and report["chips"] == 4
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["rows_per_chip"] == 4
  memory = report["per_chip_bytes"]
  assert 0 < memory["temp"] < memory["total"] < report["hbm_bytes"]
  assert not (tmp_path / "checkpoints").exists()  # trained nothing
  # The unrolled-layer estimate counts every layer: about the model FLOPs.
  total_flops = report["hlo_flops_per_chip"] * report["chips"]
  assert 0.8 < total_flops / report["model_flops_per_step"] < 1.5
  assert report["hlo_flops_per_chip"] > report["hlo_flops_per_chip_scan_once"]
  assert 0 < report["mfu"] < 1


@needs_libtpu
def test_per_chip_temp_depends_on_rows_per_chip_not_pod_size(pod_and_slice):
  temp = {t: c.memory_analysis().temp_size_in_bytes
          for t, c in pod_and_slice.items()}
  assert abs(temp["v5p-128"] / temp["v5p-16"] - 1) < 0.1, temp


def _collectives(hlo, op):
  """``(result shape text, line)`` of every ``op`` (and ``op-start``)."""
  out = []
  for line in hlo.splitlines():
    if re.search(rf"\b{op}(-start)?\(", line):
      out.append((line.split(" = ", 1)[1].split(f" {op}")[0], line))
  return out


@needs_libtpu
def test_hlo_gathers_weights_per_layer_never_global_activations(
    pod_and_slice):
  hlo = pod_and_slice["v5p-16"].as_text()
  # The layer loop gathers each [1, ...] layer slice of the stacked kernels.
  in_loop = [s for s, line in _collectives(hlo, "all-gather")
             if "while/body" in line and "bf16[1," in s]
  assert len(in_loop) >= 7, in_loop  # q, k, v, o, gate, up, down
  # No chip ever holds, or reduces, the global batch's activations:
  # [global rows, T, ...] with 64 or 512 global rows of 512 tokens.
  for topology, rows in (("v5p-16", 64), ("v5p-128", 512)):
    text = pod_and_slice[topology].as_text()
    for op in ("all-reduce", "all-gather", "all-to-all"):
      for shape, _ in _collectives(text, op):
        assert not re.search(rf"\[{rows},512\b", shape), (topology, op, shape)


def _all_reduces_by_computation(hlo):
  """``{computation name: [result shape of each all-reduce in it]}``."""
  out, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(1)
    found = re.search(r" = (\S+) all-reduce(?:-start)?\(", line)
    if found and name:
      out.setdefault(name, []).append(found.group(1))
  return out


@needs_libtpu
def test_hlo_never_all_reduces_a_whole_layer_gradient(pod_and_slice):
  """Layer gradients leave the step reduce-scattered, never all-reduced
  whole onto every chip. libtpu lowers the reduce-scatter as an
  ``all-reduce-scatter`` computation (an all-reduce whose only use is this
  chip's dynamic slice, one collective: the 1B's and MaxText's compiled
  steps) or as a ring of collective-permutes (this small model). The only
  whole-array all-reduce allowed is the token embedding's [V, D] gradient
  from the lookup's scatter-add, which libtpu all-reduces whole at this
  size (the 1B's [32000, 2048] goes through an all-reduce-scatter)."""
  by_comp = _all_reduces_by_computation(pod_and_slice["v5p-16"].as_text())
  whole = [(name, shape) for name, shapes in by_comp.items()
           if not name.startswith("all-reduce-scatter") for shape in shapes
           if re.search(r"\[([0-9,]*)\]", shape).group(1).count(",") >= 1]
  # vocab 512 x d_model 256; every layer kernel has d_ff 768 or a head axis.
  assert all(re.match(r"bf16\[512,256\]", s) for _, s in whole), whole
  assert len(whole) <= 1, whole


def test_summary_says_when_there_is_no_step_estimate():
  """libtpu's cost model gave -1.39 s for a 2 x v5p-32 step: the report
  keeps no estimate or MFU and the line says why."""
  report = {"topology": "v5p-32", "slices": 2, "chips": 32,
            "mesh": {"data": 2, "fsdp": 16, "tensor": 1},
            "global_batch": 512, "seq_len": 2048, "rows_per_chip": 16.0,
            "hbm_bytes": 95 * 2**30, "fits": True,
            "per_chip_bytes": {"total": 9 * 2**30, "argument": 2**30,
                               "temp": 8 * 2**30},
            "compile_seconds": {"train": 121.0},
            "step_estimate_error": "the compiler's time estimate is -1.39 s;"
                                   " no step estimate"}
  line = aot.summary(report)
  assert "v5p-32 x2 (32 chips" in line and "MFU" not in line
  assert "no step estimate" in line and line.endswith("compiled in 121 s")


def test_rollout_objectives_compile_for_a_rollout_batch():
  """GRPO/RLOO/DisCO steps compile for the rollout batch of
  alignax.objectives.grpo (old and reference log-probs when needed)."""
  c = defaults.base_config()
  c.objective, c.train.seq_len = "grpo", 64
  batch = aot.host_batch(c, 8)
  assert set(batch) == {"inputs", "targets", "positions", "segment_ids",
                        "weights", "advantages", "rewards"}
  assert batch["inputs"].shape == (8, 64) and batch["advantages"].shape == (8,)
  c.grpo.num_iterations, c.grpo.beta = 2, 0.04  # reference='none': batched
  batch = aot.host_batch(c, 8)
  assert batch["old_logps"].shape == batch["ref_logps"].shape == (8, 64)
  c.reference = "frozen"  # computed in the step instead
  assert "ref_logps" not in aot.host_batch(c, 8)
  c.objective = "disco"
  assert "ref_logps" not in aot.host_batch(c, 8)


@needs_libtpu
def test_offloaded_remat_keeps_qkv_in_host_memory():
  # MaxText's 'qkv_proj_offloaded': q, k and v leave HBM for pinned host
  # memory between the forward and backward passes instead of staying on
  # the chip ('save_qkv_proj') or being recomputed ('full').
  memory = {}
  for remat in ("save_qkv_proj", "qkv_proj_offloaded"):
    c = _small_config(4, 4)
    c.model.remat = remat
    memory[remat] = _compile(c, "v5p-8").memory_analysis()
  saved, offloaded = memory["save_qkv_proj"], memory["qkv_proj_offloaded"]
  assert saved.host_temp_size_in_bytes == 0
  # Per chip, 2 layers x 4 rows x 512 x (4 + 2 + 2) heads x 64 x bf16.
  qkv_bytes = 2 * 4 * 512 * 8 * 64 * 2
  assert offloaded.host_temp_size_in_bytes >= qkv_bytes
