"""Training that survives its own numbers (issue 21): skipped non-finite steps, NaN-safe
outputs, divergence rollback and stop, refused restarts, file-system faults.

In-process tests use a tiny DeepFlow on one CPU device; runs of ``python -m
deepflow_jax.main`` use test_train's tiny digits flags so each takes seconds.
"""
import json
import os

import numpy as np
import pytest

from conftest import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny_config(**train):
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.update(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, df_idxs=(1,), projector_dim=32, dtype="float32")
  c.loss.scale_weight = (0.2, 1.0)
  c.data.name = "digits"
  c.data.image_size = 8
  c.train.global_batch_size = 8
  c.train.ema_decay = 0.9
  c.train.update(train)
  c.optim.learning_rate = 1e-3
  config_lib.validate(c)
  return c


def _trainer(c, latent):
  import jax  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models.loading import model_from_config  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  return Trainer(c, model_from_config(c), shd.make_mesh(c, jax.devices()[:1]), latent=latent)


def _latent_batch(rng, poison=False):
  mean = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
  if poison:
    mean[3, 2, 1, 0] = np.nan
  return {"mean": mean, "std": np.full_like(mean, 0.1),
          "label": rng.integers(0, 10, 8).astype(np.int32)}


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_poisoned_batch_is_skipped_with_the_state_unchanged():
  """A batch with one NaN latent: params, EMA and Adam state stay bitwise the same (the same
  process, the same program: jnp.where selects the old arrays), the step and the skip
  counters advance; the next good batch trains again and resets the streak."""
  tr = _trainer(tiny_config(), latent=True)
  rng = np.random.default_rng(0)
  state = tr.init_state(0)
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng)))
  assert np.isfinite(float(m["loss"])) and int(m["skipped_steps"]) == 0
  before = [_leaves(state.params), _leaves(state.ema_params), _leaves(state.opt_state)]
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng, poison=True)))
  assert not np.isfinite(float(m["loss"]))
  assert (int(state.step), int(state.skipped_steps), int(state.skip_streak)) == (2, 1, 1)
  assert (int(m["skipped_steps"]), int(m["skip_streak"])) == (1, 1)
  after = [_leaves(state.params), _leaves(state.ema_params), _leaves(state.opt_state)]
  for b, a in zip(before, after):
    for x, y in zip(b, a):
      np.testing.assert_array_equal(x, y)
  assert tr.state_is_finite(state)
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng)))
  assert (int(state.skipped_steps), int(state.skip_streak)) == (1, 0)
  assert not np.array_equal(_leaves(state.params)[0], before[0][0])
