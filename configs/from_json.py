"""A run's resolved config, saved by the loop as ``<workdir>/config.json``.

Rerun or continue a run exactly as it was configured (command-line overrides
included), overriding fields again as with any recipe::

  python launch/tpu_train.py --config=configs/from_json.py:/tmp/demo/config.json \\
      --workdir=/tmp/demo --config.train.steps=600
"""

import json

import ml_collections


def _tuples(value):
  """JSON lists back to the tuples the recipes use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(path: str) -> ml_collections.ConfigDict:
  if not path:
    raise ValueError("configs/from_json.py needs the file: "
                     "--config=configs/from_json.py:<workdir>/config.json")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
