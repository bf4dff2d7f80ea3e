"""ArmoRM's verbosity decorrelation, fitted before stage 2 (``reward_gate``).

``prepare(config, workdir)`` (a no-op unless ``config.objective ==
'reward_gate'`` and ``config.reward.verbosity_attribute`` names one of
``data.preference.attributes``) loads the stage-1 parameters
(``config.checkpoint.init_from``), predicts the K attribute rewards of a
reference set of responses, fits for every attribute :math:`k` the
:math:`\\lambda_k` that zeroes the correlation of :math:`r_k - \\lambda_k
r_{verbose}` with :math:`r_{verbose}` (Spearman's, as the paper, or
Pearson's: ``config.reward.decorrelation``), writes the parameters with
``verbosity_lambda`` set to ``<workdir>/decorrelated`` (an import directory,
with ``lambdas.json``) and returns the config with ``checkpoint.init_from``
pointing there. ``train.run`` calls it, so stage 2 is one command::

  python launch/tpu_train.py --config=... --config.objective=reward_gate \\
      --config.checkpoint.init_from=/tmp/stage1 \\
      --config.reward.verbosity_attribute=length

The reference set is the first ``config.reward.reference_size`` responses
(chosen and rejected) of the training pairs, in record order: the
distribution the gate is trained on. (The paper used UltraFeedback's
responses.) Stage 2 freezes the backbone and the heads, so the fitted
coefficients hold for the whole stage. A second call with the same workdir
reuses the fit.

References:
  Wang, Xiong, Xie, Zhao & Zhang, *Interpretable Preferences via
  Multi-Objective Reward Modeling and Mixture-of-Experts*, 2024.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignax import init_from
from alignax import losses
from alignax import objectives
from alignax import sharding as shd
from alignax import state as state_lib
from alignax.data import preference
from alignax.data import preference_packing as packing
from alignax.data import tokenizer as tok_lib
from alignax.interop import hf
from alignax.models import multi_reward as mr
from alignax.objectives import common
from alignax.objectives import multi_reward

DIRECTORY = "decorrelated"
LAMBDAS_FILE = "lambdas.json"
FITS = {"spearman": losses.spearman_decorrelation,
        "pearson": losses.pearson_decorrelation}


def needed(config) -> bool:
  return (config.objective == "reward_gate"
          and multi_reward.verbose_index(config) >= 0)


def reference_batches(config, tokenizer, num_responses):
  """Packed batches of the first training pairs (host arrays, in order)."""
  data = config.data
  records = preference.record_source(data, "train")
  ds = preference.examples(records, data, tokenizer, split="train", seed=0,
                           seq_len=config.train.seq_len, shuffle=False,
                           num_epochs=1)
  pref = data.preference
  layout = packing.Layout(list_size=2, groups_per_row=int(pref.groups_per_row),
                          num_rewards=len(pref.reward_fields),
                          shared_prompt=bool(pref.shared_prompt))
  rows = config.train.batch_size // jax.process_count()
  seen = 0
  for batch in packing.pack_and_batch(ds, layout, seq_len=config.train.seq_len,
                                      batch_size=rows, shuffle_bins=False,
                                      drop_remainder=False):
    yield batch
    seen += int(np.sum(batch["valid"])) * jax.process_count()
    if seen >= num_responses:
      return


def attribute_rewards(graphdef, params, mesh, batches):
  """Host ``[N, K]`` raw attribute rewards of the batches' valid slots."""

  @jax.jit
  def predict(params, batch):
    with shd.activation_sharding(mesh):
      model = nnx.merge(graphdef, params)
      states, _, present = multi_reward.slot_states(
          common.hidden_states(model, batch), batch)
      return (model.attribute_rewards(states),
              batch["valid"].astype(bool) & present)

  out = []
  for batch in batches:
    rewards, keep = (np.asarray(multihost_utils.process_allgather(
        x, tiled=True)) for x in predict(params, shd.host_to_global(batch,
                                                                    mesh)))
    out.append(rewards[keep])
  return np.concatenate(out)


def fit(rewards, verbose_index, method="spearman"):
  """``[K]`` coefficients of ``[N, K]`` reference rewards (see the module)."""
  if method not in FITS:
    raise ValueError(f"config.reward.decorrelation={method!r}: use one of "
                     f"{sorted(FITS)}")
  rewards = jnp.asarray(rewards, jnp.float32)
  return np.asarray(FITS[method](rewards, rewards[:, verbose_index]))


def prepare(config, workdir):
  """The config of a stage-2 run, starting from decorrelated parameters."""
  if not needed(config):
    return config
  out_dir = os.path.join(os.path.abspath(workdir), DIRECTORY)
  done = os.path.join(out_dir, LAMBDAS_FILE)
  if not os.path.exists(done):
    lambdas = _fit_and_write(config, workdir, out_dir)
    if jax.process_index() == 0:
      with open(done + ".tmp", "w") as f:
        json.dump({"attributes": list(config.data.preference.attributes),
                   "verbosity_attribute": config.reward.verbosity_attribute,
                   "method": config.reward.decorrelation,
                   "source": config.checkpoint.init_from,
                   "lambdas": [float(x) for x in lambdas]}, f, indent=2)
      os.replace(done + ".tmp", done)
    multihost_utils.sync_global_devices("alignax.decorrelation")
  config = copy.deepcopy(config)
  with config.unlocked():
    config.checkpoint.init_from = out_dir
  return config


def _fit_and_write(config, workdir, out_dir):
  if not config.checkpoint.init_from:
    raise ValueError("config.reward.verbosity_attribute fits the "
                     "decorrelation on a trained stage-1 model: set "
                     "config.checkpoint.init_from (a multi_reward run)")
  tokenizer = tok_lib.build_tokenizer(config.tokenizer, workdir)
  model_cfg = state_lib.apply_lora_config(
      state_lib.build_model_config(config.model, tokenizer), config.lora)
  mesh = shd.make_mesh(config.mesh)
  graphdef, params = init_from.model_params(
      config.checkpoint.init_from, model_cfg, mesh, config.sharding_rules,
      seed=config.seed, build=objectives.model_builder(config))
  size = int(config.reward.reference_size)
  rewards = attribute_rewards(graphdef, params, mesh,
                              reference_batches(config, tokenizer, size))
  lambdas = fit(rewards[:size], multi_reward.verbose_index(config),
                config.reward.decorrelation)
  logging.info("verbosity decorrelation on %d responses: lambdas %s",
               min(len(rewards), size), lambdas)
  old = params[mr.DECORRELATION]
  params = dict(params, **{mr.DECORRELATION: jax.device_put(
      jnp.asarray(lambdas, old.dtype), old.sharding)})
  hf.save_checkpoint(out_dir, model_cfg, params)
  return lambdas
