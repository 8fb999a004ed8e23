"""The data config: every key of ``config.data``, its default, and how each is read.

:func:`default_config` is the one schema: the training config's ``config.data``
block *is* it (``config_lib.base_config``), and the pipeline reads the same
keys (:func:`resolve` takes that ``ConfigDict``, or a plain dict with a subset
of the keys, filled from the same defaults). Sources (``name``): ``"digits"``
(:mod:`deepflow_jax.data.digits`), ``"repa"`` (:mod:`deepflow_jax.data.repa`),
``"arrayrecord"`` (:mod:`deepflow_jax.data.arrayrecord`); the order, sharding,
batching and iterator state are :mod:`deepflow_jax.data.pipeline`'s.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
import numpy as np
from ml_collections import config_dict

from deepflow_jax.data import digits as digits_lib
from deepflow_jax.data.common import DIGITS
from deepflow_jax.data.common import SOURCES
from deepflow_jax.errors import UserError


def default_config() -> ml_collections.ConfigDict:
  """Every data key with its default: the ``config.data`` block of the training config.

  ``None`` defaults are typed ``ml_collections`` placeholders, so command-line
  overrides (``--config.data.num_workers=4``) type-check.
  """
  c = ml_collections.ConfigDict()
  c.name = config_dict.placeholder(str)  # "digits" | "repa" | "arrayrecord" (required)
  c.path = ""  # dataset root (repa, arrayrecord)
  # digits only
  c.image_size = digits_lib.NATIVE_SIZE  # side length (8 = native; larger is resized)
  c.split = "train"  # "train" | "heldout"
  c.heldout_fraction = digits_lib.DEFAULT_HELDOUT_FRACTION
  c.split_seed = digits_lib.DEFAULT_SPLIT_SEED
  # latent sources
  c.num_classes = config_dict.placeholder(int)  # None: the dataset's (metadata / max label + 1)
  c.latent_shape = config_dict.placeholder(tuple)  # (h, w, c); None: the dataset's
  c.missing_labels = "error"  # repa with "labels": null: "error" | "zero" (label 0 for all)
  c.latent_scale = config_dict.placeholder(float)  # None: the dataset's record, else 0.18215
  c.vae_downsampling = config_dict.placeholder(int)  # None: the dataset's record, else 8
  # order and reading
  c.shuffle = True
  c.num_epochs = config_dict.placeholder(int)  # None: repeat forever
  c.include_index = False  # add "index": each example's position in the source order
  c.num_workers = config_dict.placeholder(int)  # worker processes; None: default_parallelism
  c.num_threads = config_dict.placeholder(int)  # reading threads per process/worker; None: same
  c.prefetch_batches = config_dict.placeholder(int)  # batches read ahead; None: 2 x readers
  return c



DEFAULTS = default_config().to_dict()
KNOWN_KEYS = tuple(DEFAULTS)


def resolve(data_config) -> dict[str, Any]:
  """``config.data`` (or a dict of some of its keys) as a plain dict of every key: unknown keys
  are refused, missing ones take :func:`default_config`'s defaults; name and path are checked."""
  if data_config is None:
    raise UserError("no data config given")
  if hasattr(data_config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    data_config = data_config.to_dict()
  if not isinstance(data_config, Mapping):
    raise UserError(f"data config must be a dict or ConfigDict, got {type(data_config).__name__}")
  unknown = sorted(set(data_config) - set(DEFAULTS))
  if unknown:
    raise UserError(f"unknown data config key(s) {unknown}; known: {list(KNOWN_KEYS)}")
  cfg = dict(DEFAULTS)
  cfg.update({k: v for k, v in data_config.items() if v is not None})
  if cfg["name"] not in SOURCES:
    raise UserError(f"data.name={cfg['name']!r} is not one of {', '.join(SOURCES)}")
  if cfg["name"] != DIGITS and not cfg["path"]:
    raise UserError(f"data.path is required for data.name={cfg['name']!r}")
  if "://" in str(cfg["path"]):
    raise UserError(f"data.path={cfg['path']}: training data is read from local paths only "
                    "(REPA folders are many small files and ArrayRecord readers need a local "
                    "file); copy it to every host first (gcloud storage rsync -r URL DIR) or "
                    "mount the bucket (gcsfuse); see docs/launch.md")
  return cfg


def int_option(cfg, key, lo=0) -> int | None:
  v = cfg[key]
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or (
      int(v) != v or int(v) < lo):
    raise UserError(f"data.{key} must be an integer >= {lo}, got {v!r}")
  return int(v)


def scale_option(cfg) -> float | None:
  v = cfg["latent_scale"]
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
    raise UserError(f"data.latent_scale must be a positive number, got {v!r}")
  return float(v)


def latent_shape_option(cfg) -> tuple[int, int, int] | None:
  v = cfg["latent_shape"]
  if v is None:
    return None
  try:
    shape = tuple(int(d) for d in v)
  except (TypeError, ValueError):
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise UserError(f"data.latent_shape must be [h, w, c] positive integers, got {v!r}")
  return shape


def check(data_config) -> dict[str, Any]:
  """Every key of ``data_config`` read as the sources and the iterator will read it: a
  ``UserError`` names the first bad one. Cheap: reads no file. Returns ``resolve``'s dict."""
  cfg = resolve(data_config)
  for key, lo in (("num_classes", 1), ("vae_downsampling", 1), ("num_epochs", 1),
                  ("num_workers", 0), ("num_threads", 0), ("prefetch_batches", 0)):
    int_option(cfg, key, lo=lo)
  scale_option(cfg)
  latent_shape_option(cfg)
  if cfg["missing_labels"] not in ("error", "zero"):
    raise UserError(f"data.missing_labels must be 'error' or 'zero', got {cfg['missing_labels']!r}")
  if cfg["name"] == DIGITS and cfg["split"] not in ("train", "heldout"):
    raise UserError(f"data.split must be 'train' or 'heldout', got {cfg['split']!r}")
  return cfg
