"""alignax: pretraining and aligning LMs in JAX/Flax NNX.

``alignax.load(workdir)`` loads a run for text in, text out
(:func:`alignax.generate.load`); it is imported on first use so that
``import alignax.<module>`` stays light.
"""


def __getattr__(name):
  if name == "load":
    from alignax.generate import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'alignax' has no attribute {name!r}")
