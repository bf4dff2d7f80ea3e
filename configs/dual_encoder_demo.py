"""Dual encoder from the demo LM: docstring -> code retrieval on the stdlib.

The pretrained demo LM (``configs/ul2_demo.py``, the README's first stage;
``configs/demo.py`` works too) becomes a text embedding model:
mean pooling over one shared tower with ``query: `` / ``passage: ``
prefixes, symmetric InfoNCE (CLIP) with a learnable temperature, trained on
the docstring -> code pairs of the embedded corpus's train split and
evaluated (Recall@k, MRR, nDCG, MAP) on its held-out split, whose files the
LM never saw. CPU minutes. Run:

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python launch/tpu_train.py --config=configs/dual_encoder_demo.py \\
      --workdir=/tmp/alignax_dual_encoder
  python -m alignax.mine --config=configs/dual_encoder_demo.py \\
      --checkpoint=/tmp/alignax_dual_encoder

The config argument is the LM's workdir (default ``/tmp/alignax_demo``):
``--config=configs/dual_encoder_demo.py:/tmp/demo`` starts from ``/tmp/demo``
and reuses its tokenizer (``--config.checkpoint.init_from=...`` alone also
works; the tokenizer is then retrained, identically, in the new workdir).
The step-0 eval line holds the untrained head's retrieval metrics on the
LM's hidden states, the baseline. From the UL2 demo checkpoint, held-out
Recall@10 goes 0.17 -> 0.34 and nDCG@10 0.07 -> 0.17 (93 queries; from a
``configs/demo.py`` LM: 0.14 -> 0.32 and 0.06 -> 0.19; benchmarks/RESULTS.md).
"""

import os

from alignax import defaults


def get_config(arg=None):
  lm_workdir = arg or "/tmp/alignax_demo"
  c = defaults.base_config()
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.objective = "contrastive"  # alignax.objectives.contrastive
  c.checkpoint.init_from = lm_workdir  # start from the pretrained LM
  c.tokenizer.cache_dir = os.path.join(lm_workdir, "tokenizer")  # the LM's tokenizer
  c.contrastive.loss = "clip"  # symmetric InfoNCE over in-batch negatives
  # Mean, not last: the 300-step demo LM's EOS state carries little of the
  # text, and last-token runs collapsed to one embedding (uniformity ~0).
  c.contrastive.pooling = "mean"  # average of each text's hidden states
  c.data.task = "pairs"  # alignax.data.pairs: [B, V, T] view batches
  c.data.source = "embedded"  # docstring -> code pairs (alignax.data.retrieval_task)
  c.data.num_views = 2  # query + positive (in-batch negatives only)
  c.data.query_prefix = "query: "  # instruction prefix of queries
  c.data.doc_prefix = "passage: "  # instruction prefix of documents
  c.data.no_duplicates = True  # no text twice in a batch
  c.data.dedupe_window = 4  # batches formed at once by the no-duplicates sampler
  c.data.eval_queries = 0  # all held-out queries
  c.train.steps = 300  # 5-11 CPU minutes; 2.5 passes over the 3810 pairs
  c.train.batch_size = 32  # pairs per step: 31 in-batch negatives each
  c.train.seq_len = 64  # docstrings fit; code is cut after 64 tokens
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # retrieval eval on the held-out split
  c.train.eval_batches = 2  # held-out contrastive-loss batches (93 pairs)
  c.optimizer.lr = 1e-3  # lower than pretraining: the backbone is trained
  c.optimizer.warmup_steps = 20  # short warmup
  c.checkpoint.save_every = 100  # three checkpoints
  return c
