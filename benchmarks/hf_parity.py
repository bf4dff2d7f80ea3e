"""Parity errors of the Hugging Face import/export, per model family.

  python benchmarks/hf_parity.py

Builds the tiny random models of ``tests/interop/test_hf_parity.py`` (the
same configs and perturbation, so the numbers are those the tests bound)
with ``transformers`` (float32, eager attention), imports each with
``alignax.interop.hf.load_hf``, and prints the largest absolute differences
against ``transformers``: logits, the DPO sequence log-probs, and the logits
of the exported directory reloaded by ``transformers``.
"""

import importlib.util
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def _test_module():
  spec = importlib.util.spec_from_file_location(
      "test_hf_parity", os.path.join(ROOT, "tests", "interop",
                                     "test_hf_parity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  t = _test_module()
  from alignax import policy  # pylint: disable=g-import-not-at-top
  from alignax.interop import hf  # pylint: disable=g-import-not-at-top
  print("| family | max abs logit error | max abs sequence log-prob error "
        "| export round trip (transformers reload) |")
  print("|---|---|---|---|")
  tokens = t._tokens()  # pylint: disable=protected-access
  weights = np.zeros((2, t.T - 1), np.float32)
  weights[0, 4:], weights[1, 7:] = 1, 1
  with tempfile.TemporaryDirectory() as root:
    for family in t.FAMILIES:
      model = t._hf_model(family)  # pylint: disable=protected-access
      path = os.path.join(root, family)
      model.save_pretrained(path)
      cfg, params = hf.load_hf(path)
      ours = t._ours(cfg, params, tokens)  # pylint: disable=protected-access
      theirs = t._hf_logits(model, tokens)  # pylint: disable=protected-access
      logps = policy.sequence_logps(
          policy.token_logps(ours[:, :-1], tokens[:, 1:]), weights)
      ref = t._torch_sequence_logps(theirs, tokens, weights)  # pylint: disable=protected-access
      out = os.path.join(root, family + "_export")
      hf.export_hf(out, cfg, params, model_type=hf.read_hf_config(path)[
          "model_type"], base_config=hf.read_hf_config(path))
      back = t.transformers.AutoModelForCausalLM.from_pretrained(
          out, attn_implementation="eager").eval()
      round_trip = t._hf_logits(back, tokens)  # pylint: disable=protected-access
      print(f"| {family} | {np.abs(ours - theirs).max():.2e} | "
            f"{np.abs(np.asarray(logps) - ref).max():.2e} | "
            f"{np.abs(round_trip - theirs).max():.2e} |")


if __name__ == "__main__":
  main()
