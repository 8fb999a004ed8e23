"""Names users import keep working where the README, the docs or an earlier release gave them.

Moving code is allowed; breaking ``from deepflow_jax.X import Y`` in someone's notebook is not.
Each entry is checked by importing it in this process (no model is built, so it is fast).
"""
import importlib

import pytest

# (module, name): every name the README/docs import, plus names that moved (old home kept).
PUBLIC = [
    ("deepflow_jax.vae", "load_diffusers_vae"),
    ("deepflow_jax.convert", "load_torch_checkpoint"),
    ("deepflow_jax.convert", "load_converted"),
    ("deepflow_jax.sampling", "sample"),
    ("deepflow_jax.models", "get_model"),
    ("deepflow_jax.models.loading", "init_params"),
    ("deepflow_jax.models.loading", "load_model"),
    ("deepflow_jax.models.loading", "load_workdir_ema"),
    ("deepflow_jax.data.encode", "encode_dataset"),
    ("deepflow_jax.progress", "format_rate"),
    ("deepflow_jax.progress", "format_duration"),
    ("deepflow_jax.train_loop", "train"),
    ("deepflow_jax.config_lib", "load_config"),
    ("deepflow_jax.evaluation.suite", "evaluate_samples"),
    ("deepflow_jax.evaluation.metrics", "frechet_distance"),
    ("deepflow_jax.evaluation.inception", "load_fid_inception"),
    ("deepflow_jax.encoders.dinov2", "load_dinov2"),
    ("deepflow_jax.encoders.dinov2", "preprocess_raw_image"),
    # Moved in the library split; the old import paths stay.
    ("deepflow_jax.checkpointing", "load_workdir_ema"),
    ("deepflow_jax.eval.digits_eval", "train_classifier"),
    ("deepflow_jax.eval.digits_eval", "evaluate_generated"),
]


@pytest.mark.parametrize("module,name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_importable(module, name):
  assert callable(getattr(importlib.import_module(module), name))


def test_moved_names_are_the_same_objects():
  from deepflow_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from deepflow_jax.eval import digits_eval  # pylint: disable=g-import-not-at-top
  from deepflow_jax.evaluation import digits  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models import loading  # pylint: disable=g-import-not-at-top
  assert checkpointing.load_workdir_ema is loading.load_workdir_ema
  assert digits_eval.train_classifier is digits.train_classifier
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    getattr(checkpointing, "nope")
