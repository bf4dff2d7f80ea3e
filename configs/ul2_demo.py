"""UL2 pretraining demo: the demo model on the mixture of seven denoisers.

The model, batch and schedule of ``configs/demo.py``; the data is the
embedded corpus turned into UL2 examples (R, X and S denoisers of the UL2
paper's Table 1, mixed uniformly, packed with per-segment prefixes), and the
metrics split the loss by denoiser family (``train/ul2/R/loss``, ...) and by
denoiser on the held-out set (``eval/ul2/X(0.5,64)/loss``, ...). Trains on a
2-core CPU in a few minutes and visibly learns. Run:

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/ul2demo

Any field can be overridden, e.g. ``--config.data.ul2.preset=ul2r`` (the
U-PaLM mixture) or ``--config.data.ul2.s_split=uniform``. A longer
``--config.train.seq_len`` may need more sentinels: the run stops with the
number to pass as ``--config.tokenizer.num_sentinels``.
"""

from alignax import defaults
from alignax.data import ul2


def get_config(arg=None):
  del arg  # no variants
  c = defaults.base_config()
  c.objective = "ul2"  # token cross-entropy + per-denoiser metrics
  c.data.task = "ul2"  # documents -> UL2 examples -> packed rows
  c.data.ul2.preset = "ul2"  # the seven denoisers of the paper
  c.data.ul2.rates = ()  # uniform mixing, as the paper
  c.data.ul2.s_split = "fixed"  # S: the last 25% of a window is the target
  # The demo model of configs/demo.py.
  c.model.d_model = 128  # ~1.1M parameters besides the embedding
  c.model.n_layers = 4  # small enough for a 2-core CPU
  c.train.steps = 300  # a few minutes on 2 CPU cores
  c.train.batch_size = 16  # rows per step (2048 tokens)
  c.train.seq_len = 128  # tokens per row
  c.train.eval_every = 100  # held-out loss per denoiser at 0, 100, 200, 300
  c.checkpoint.save_every = 100  # three checkpoints over the run
  # The default 100 sentinels cover this row length (the mixture needs 16 at
  # 128 tokens), so the UL2 checkpoint shares its tokenizer with the demo,
  # dual-encoder and DPO recipes that start from it.
  assert c.tokenizer.num_sentinels >= ul2.num_sentinels_needed(
      ul2.UL2_DENOISERS, c.train.seq_len + 1)
  return c
