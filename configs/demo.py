"""The embedded default: a tiny Llama-style LM on the embedded corpus.

Trains on a 2-core CPU in a few minutes and visibly learns (held-out loss
falls well below its start). Run:

  python launch/tpu_train.py --config=configs/demo.py --workdir=/tmp/demo

Any field can be overridden, e.g. ``--config.train.steps=50``.
"""

from alignax import defaults


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  # defaults.base_config() already describes the demo model and data; the
  # lines below restate the choices that matter for a CPU run.
  c.model.d_model = 128  # ~1.1M parameters besides the embedding
  c.model.n_layers = 4  # small enough for a 2-core CPU
  c.train.steps = 300  # a few minutes on 2 CPU cores
  c.train.batch_size = 16  # rows per step (2048 tokens)
  c.train.seq_len = 128  # tokens per row
  c.checkpoint.save_every = 100  # three checkpoints over the run
  return c
