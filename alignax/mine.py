"""Retrieval with a checkpoint outside the loop: evaluate it, or mine with it.

On the held-out split of a run's data (``--checkpoint`` empty = the
untrained head on a fresh model; an LM checkpoint = its backbone with a
fresh head)::

  python -m alignax.mine --config=configs/dual_encoder_demo.py \\
      --checkpoint=/tmp/alignax_dual_encoder

``--mine_to=FILE --num_negatives=3`` instead writes the train pairs with
hard negatives mined by the model (JSONL, for ``data.source='jsonl'``).
"""

from __future__ import annotations

import json
import tempfile

import numpy as np

from alignax import cli
from alignax import init_from
from alignax import objectives
from alignax import retrieval
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.data import pairs
from alignax.data import tokenizer as tok_lib
from alignax.objectives import contrastive


def load_embedding_params(config, checkpoint, tokenizer, mesh):
  """``(graphdef, params)`` of the run's embedding model from ``checkpoint``.

  Parameters the checkpoint lacks (a fresh head on an LM checkpoint) keep
  their initialisation from ``config.seed``; ``checkpoint=''`` gives an
  untrained model.
  """
  model_cfg = state_lib.build_model_config(config.model, tokenizer)
  build = (objectives.model_builder(config)
           or contrastive.embedding_model_builder(config))
  return init_from.model_params(checkpoint, model_cfg, mesh,
                                config.sharding_rules, seed=config.seed,
                                build=build)


def mine_to_file(config, graphdef, params, tokenizer, mesh, path, *,
                 num_negatives, skip_top=0, margin=None):
  """Writes the train pairs with model-mined hard negatives; returns count."""
  d = config.data
  queries, corpus, relevant, _ = pairs.retrieval_set(d, "train")
  evaluator = retrieval.RetrievalEvaluator(
      queries, corpus, relevant, tokenizer=tokenizer, graphdef=graphdef,
      mesh=mesh, seq_len=config.train.seq_len,
      batch_size=config.train.batch_size,
      query_prefix=pairs.option(d, "query_prefix"),
      doc_prefix=pairs.option(d, "doc_prefix"))
  q, c = evaluator.embeddings(params)
  k = min(len(corpus), 1 + skip_top + 4 * num_negatives)
  scores, ids = retrieval.retrieve(q, retrieval.global_rows(c, mesh), k=k,
                                   mesh=mesh, num_valid=len(c))
  positives = np.array([r[0] for r in relevant])
  negatives = pairs.select_hard_negatives(
      scores, ids, positives, num_negatives=num_negatives, skip_top=skip_top,
      margin=margin)
  records = [{"query": qt, "positive": corpus[p]}
             for qt, p in zip(queries, positives)]
  return pairs.write_with_negatives(records, negatives, corpus, path)


def main(argv):
  del argv
  with cli.user_errors():
    _main()


def _main():
  # pylint: disable=g-import-not-at-top
  from absl import flags
  from absl import logging
  # pylint: enable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  f = flags.FLAGS
  config = f.config
  mesh = shd.make_mesh(config.mesh)
  workdir = f.checkpoint or tempfile.mkdtemp()
  tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
  graphdef, params = load_embedding_params(config, f.checkpoint, tokenizer,
                                           mesh)
  if f.mine_to:
    n = mine_to_file(config, graphdef, params, tokenizer, mesh, f.mine_to,
                     num_negatives=f.num_negatives, skip_top=f.skip_top,
                     margin=f.margin)
    print(f"wrote {n} pairs with {f.num_negatives} mined negatives to "
          f"{f.mine_to}")
    return
  evaluator = retrieval.from_config(config, tokenizer, mesh, graphdef)
  print(json.dumps({k: round(v, 5) for k, v in evaluator(params).items()}))


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Recipe file.",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", "", "Workdir, checkpoints dir or step "
                      "dir; empty = untrained model.")
  flags.DEFINE_string("mine_to", "", "Write train pairs with mined hard "
                      "negatives to this JSONL file instead of evaluating.")
  flags.DEFINE_integer("num_negatives", 3, "Mined negatives per pair.")
  flags.DEFINE_integer("skip_top", 0, "Top candidates skipped when mining.")
  flags.DEFINE_float("margin", None, "Mined negatives score at most the "
                     "positive's minus this.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
