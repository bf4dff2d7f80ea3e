"""``config.data.task`` -> how records become train and eval batches.

Each entry is ``(train dataset builder, eval batches builder)``; both take
the arguments of :func:`alignax.data.pipeline.build_lm_dataset` /
:func:`alignax.data.pipeline.build_eval_batches`.
"""

from alignax.data import pairs
from alignax.data import pipeline
from alignax.data import preference
from alignax.data import ratings
from alignax.data import ul2_pipeline

DATA_TASKS = {
    "lm": (pipeline.build_lm_dataset, pipeline.build_eval_batches),
    "pairs": (pairs.build_pairs_dataset, pairs.build_pair_eval_batches),
    "cafe": (pairs.build_cafe_dataset, pairs.build_cafe_eval_batches),
    "preference": (preference.build_preference_dataset,
                   preference.build_preference_eval_batches),
    "ul2": (ul2_pipeline.build_ul2_dataset,
            ul2_pipeline.build_ul2_eval_batches),
    "ratings": (ratings.build_ratings_dataset,
                ratings.build_ratings_eval_batches),
}


def task(name: str):
  """The ``(train, eval)`` builders of ``config.data.task``, or an error."""
  if name not in DATA_TASKS:
    raise ValueError(f"config.data.task={name!r}: known tasks are "
                     f"{sorted(DATA_TASKS)}")
  return DATA_TASKS[name]
