"""CAFe-style joint training: contrastive + LM loss on one model, per step.

The dual-encoder demo (``configs/dual_encoder_demo.py``) with the LM loss of
the pretraining corpus mixed into every step (Yu et al., 2025, CAFe):
``L = w_con * L_con + w_lm * L_lm`` on the same parameters, each batch holding
32 docstring -> code pairs and 32 packed rows of embedded-corpus text. The
held-out LM loss (``eval/lm/loss``, on the corpus's held-out documents) is
logged at step 0 (the pretrained LM) and after training, next to the
retrieval metrics. Run after pretraining:

  python launch/tpu_train.py --config=configs/ul2_demo.py --workdir=/tmp/alignax_demo
  python launch/tpu_train.py --config=configs/cafe_demo.py \\
      --workdir=/tmp/alignax_cafe

``--config.contrastive.lm_weight=0`` is the contrastive-only control (same
data, same eval): its LM loss shows what the joint loss preserves. From
``/tmp/demo``: held-out LM loss 5.40 -> 5.33 (control: -> 6.20), Recall@10
0.14 -> 0.37 (benchmarks/RESULTS.md). The
config argument is the LM's workdir, as in ``configs/dual_encoder_demo.py``.
"""

import os

from alignax import defaults


def get_config(arg=None):
  lm_workdir = arg or "/tmp/alignax_demo"
  c = defaults.base_config()
  c.model.d_model = 128  # must match configs/demo.py
  c.model.n_layers = 4  # must match configs/demo.py
  c.objective = "cafe"  # contrastive + LM, alignax.objectives.contrastive
  c.checkpoint.init_from = lm_workdir  # start from the pretrained LM
  c.tokenizer.cache_dir = os.path.join(lm_workdir, "tokenizer")  # the LM's tokenizer
  c.contrastive.loss = "clip"  # symmetric InfoNCE over in-batch negatives
  c.contrastive.pooling = "mean"  # as configs/dual_encoder_demo.py
  c.contrastive.weight = 1.0  # w_con
  c.contrastive.lm_weight = 1.0  # w_lm
  c.data.task = "cafe"  # pair batches + lm_* packed LM rows
  c.data.source = "embedded"  # docstring -> code pairs
  c.data.lm_source = "embedded"  # LM rows: the pretraining corpus
  c.data.lm_paths = ()  # LM train files for a file lm_source
  c.data.lm_eval_paths = ()  # LM held-out files for a file lm_source
  c.data.num_views = 2  # query + positive
  c.data.query_prefix = "query: "  # instruction prefix of queries
  c.data.doc_prefix = "passage: "  # instruction prefix of documents
  c.data.no_duplicates = True  # no text twice in a batch
  c.data.dedupe_window = 4  # batches formed at once by the no-duplicates sampler
  c.data.eval_queries = 0  # all held-out queries
  c.train.steps = 300  # as the dual-encoder demo
  c.train.batch_size = 32  # pairs (and LM rows) per step
  c.train.seq_len = 64  # texts and LM rows
  c.train.log_every = 10  # steps between metrics lines
  c.train.eval_every = 100  # retrieval + held-out LM loss
  c.train.eval_batches = 2  # held-out batches (93 pairs; 64 LM rows)
  c.optimizer.lr = 1e-3  # as the dual-encoder demo
  c.optimizer.warmup_steps = 20  # short warmup
  c.checkpoint.save_every = 100  # three checkpoints
  return c
