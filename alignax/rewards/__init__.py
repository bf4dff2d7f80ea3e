"""Rewards for online RL: a subprocess sandbox, verifiable reward functions
(exact match, unit tests) with a registry, multi-reward combination, and
GRACE's contrastive rewards on rationale embeddings.

Pure Python and NumPy; no model, no JAX. Linux only (the sandbox).
"""

from alignax.rewards import combine
from alignax.rewards import grace
from alignax.rewards import sandbox
from alignax.rewards import verifiable
