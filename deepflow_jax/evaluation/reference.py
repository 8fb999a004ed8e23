"""Reference statistics of the ADM evaluation suite, with a feature cache next to the file.

:class:`ReferenceStatistics` is what samples are compared with: FID (``mu``,
``sigma``) and sFID (``mu_s``, ``sigma_s``) statistics and, for
precision/recall, the reference images' pool features. :func:`load_reference`
reads an ADM reference batch ``.npz``: its precomputed statistics when present
(as ADM does), and whatever else is needed computed with the feature network
and cached next to it (``<name>.features-<key>.npz``); the reference file itself
is never written. :func:`compute_reference_statistics` makes them from images.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from typing import Any, Iterable, Optional

import jax
import numpy as np

from deepflow_jax import outputs
from deepflow_jax.errors import UserError, first_line
from deepflow_jax.evaluation import metrics
from deepflow_jax.evaluation.features import FeatureAccumulator
from deepflow_jax.evaluation.features import Log
from deepflow_jax.evaluation.features import count_images
from deepflow_jax.evaluation.features import log_fn
from deepflow_jax.evaluation.features import print_log
from deepflow_jax.evaluation.features import run_feature_pass
from deepflow_jax.npy_io import NpzArray
from deepflow_jax.npy_io import npz_keys

IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_CACHE_VERSION = 1


@dataclasses.dataclass
class ReferenceStatistics:
  """What samples are compared with: FID (``mu``, ``sigma``) and sFID (``mu_s``,
  ``sigma_s``) statistics and, for precision/recall, the reference's (N, 2048)
  float32 pool features (ADM: its 10,000 images). Missing parts are ``None``
  and their metrics come out ``None``."""
  mu: Optional[np.ndarray] = None
  sigma: Optional[np.ndarray] = None
  mu_s: Optional[np.ndarray] = None
  sigma_s: Optional[np.ndarray] = None
  pool: Optional[np.ndarray] = None

  @property
  def num_images(self) -> Optional[int]:
    return None if self.pool is None else len(self.pool)

  def arrays(self) -> dict[str, np.ndarray]:
    """The arrays that are present, by field name (no copies)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}


def check_reference_dims(reference: "ReferenceStatistics", dims: dict[str, int],
                         name: str) -> None:
  """Refuses reference statistics whose widths differ from the network's outputs ``dims``."""
  for key, out in (("mu", "pool"), ("mu_s", "spatial"), ("pool", "pool")):
    v = getattr(reference, key)
    if v is not None and out in dims and v.shape[-1] != dims[out]:
      raise UserError(f"{name}: {key} has {v.shape[-1]} features but the network's {out!r} "
                      f"output has {dims[out]}: the reference was made with another network")


def reference_from_accumulator(acc: FeatureAccumulator) -> ReferenceStatistics:
  ref = ReferenceStatistics()
  if acc.pool_stats is not None:
    ref.mu, ref.sigma = acc.pool_stats.statistics()
  if acc.spatial_stats is not None:
    ref.mu_s, ref.sigma_s = acc.spatial_stats.statistics()
  if acc.pool is not None:
    ref.pool = acc.pool.features()
  return ref


def compute_reference_statistics(model, params, images, *, precision_recall: bool = True,
                                 **pass_kwargs) -> ReferenceStatistics:
  """Statistics (and pool features unless ``precision_recall=False``) of reference images.

  ``images`` and ``pass_kwargs`` as :func:`run_feature_pass`.
  """
  n = count_images(images, pass_kwargs.get("num_images"))
  acc = FeatureAccumulator(inception_score=False, keep_pool=precision_recall, capacity=n)
  pass_kwargs.setdefault("name", "reference")
  run_feature_pass(model, params, images, acc, **pass_kwargs)
  return reference_from_accumulator(acc)


def open_image_batch(path: str, *, min_images: int = 1, why: str = "") -> NpzArray:
  """An ADM-format batch's images (``arr_0`` uint8 (N, H, W, 3)), checked, to read in chunks.

  ``why`` is appended to the message when there are fewer than ``min_images``.
  """
  arr = NpzArray(path, IMAGES_KEY)
  if arr.dtype != np.uint8:
    raise UserError(f"{path}: {IMAGES_KEY} has dtype {arr.dtype}; expected uint8 images "
                    "(ADM-format batch)")
  if len(arr.shape) != 4 or arr.shape[-1] != 3 or min(arr.shape[1:3]) < 1:
    raise UserError(f"{path}: {IMAGES_KEY} has shape {arr.shape}; expected (N, H, W, 3) NHWC "
                    "RGB images")
  if len(arr) < min_images:
    raise UserError(f"{path}: {IMAGES_KEY} holds {len(arr)} images; at least {min_images} are "
                    "needed" + (f" ({why})" if why else ""))
  return arr


def _read_npz_arrays(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  keys = [k for k in keys if k in npz_keys(path)]
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in keys}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: cannot read {', '.join(keys)} ({first_line(e)})") from e


def read_reference_statistics(path: str) -> ReferenceStatistics:
  """An ADM reference batch's precomputed mu/sigma/mu_s/sigma_s (where present), checked."""
  arrays = _read_npz_arrays(path, STATS_KEYS)
  ref = ReferenceStatistics(**arrays)
  for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
    mu, sigma = arrays.get(m), arrays.get(s)
    if (mu is None) != (sigma is None):
      raise UserError(f"{path}: has {m if mu is not None else s} without "
                      f"{s if mu is not None else m}")
    if mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2
                           or not np.issubdtype(mu.dtype, np.floating)
                           or not np.issubdtype(sigma.dtype, np.floating)):
      raise UserError(f"{path}: {m} {mu.dtype} {mu.shape} / {s} {sigma.dtype} {sigma.shape}: "
                      "expected float (D,) and (D, D)")
  return ref


def check_reference(path: str) -> tuple[ReferenceStatistics, Optional[NpzArray]]:
  """Checks an ADM reference batch without computing anything.

  Returns its precomputed statistics (fields ``None`` where absent) and its
  images (``None`` if it has no ``arr_0``); raises :class:`UserError` for a
  missing or malformed file, bad statistics, bad images, or neither.
  """
  ref = read_reference_statistics(path)
  images = None
  if IMAGES_KEY in npz_keys(path):
    images = open_image_batch(path, min_images=metrics.PR_NEIGHBOURHOOD + 1,
                              why="precision/recall need k + 1 reference images")
  elif ref.mu is None:
    raise UserError(f"{path}: has neither {IMAGES_KEY} (images) nor mu/sigma (statistics); "
                    "expected an ADM-format reference batch")
  return ref, images


def reference_cache_path(path: str, key: str) -> str:
  """Where :func:`load_reference` caches features computed from ``path`` (next to it)."""
  path = os.path.abspath(path)
  return f"{path[:-4] if path.endswith('.npz') else path}.features-{key}.npz"


def reference_cache_key(path: str, params, model=None, extra: Any = None) -> str:
  """What cached reference features depend on: the file (size, mtime) and the network."""
  st = os.stat(path)
  desc = {"version": _CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "params": outputs.tree_digest(params), "model": repr(model) if model is not None else None,
          "extra": extra}
  return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  outputs.atomic_write(path, write)


def load_reference(path: str, model, params, *, precision_recall: bool = True,
                   cache: bool = True, cache_extra: Any = None, log: Log = print_log,
                   **pass_kwargs) -> ReferenceStatistics:
  """An ADM reference batch ``.npz`` as :class:`ReferenceStatistics`.

  The file's precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` are used when
  present (as ADM does); whatever else is needed (all statistics for a batch
  without them; the pool features of its ``arr_0`` images for precision/recall)
  is computed with ``model`` and, with ``cache``, stored next to the file as
  ``<name>.features-<key>.npz`` (written atomically; ``key`` covers the file's
  size and mtime, the parameters and the model's settings, plus
  ``cache_extra``) and reused by later calls. The reference file itself is
  never written.
  """
  log = log_fn(log)
  ref, images = check_reference(path)
  if images is None and precision_recall:
    log(f"[reference] {path} has no {IMAGES_KEY}: precision/recall will not be computed")
  need_pool = precision_recall and images is not None
  if images is None or (ref.mu is not None and ref.mu_s is not None and not need_pool):
    return ref
  key = reference_cache_key(path, params, model, cache_extra)
  cache_path = reference_cache_path(path, key)
  computed = None
  if cache and os.path.exists(cache_path):
    try:
      with np.load(cache_path, allow_pickle=False) as f:
        computed = ReferenceStatistics(**{k: f[k] for k in ("pool",) + STATS_KEYS if k in f.files})
      if computed.pool is None or len(computed.pool) != len(images) or computed.mu_s is None:
        raise ValueError("incomplete")
      log(f"[reference] features of {path} from the cache {cache_path}")
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      log(f"[reference] ignoring the unreadable cache {cache_path} ({first_line(e)})")
      computed = None
  if computed is None:
    computed = compute_reference_statistics(model, params, images, log=log, **pass_kwargs)
    if cache and jax.process_index() == 0:
      try:
        _atomic_savez(cache_path, computed.arrays())
        log(f"[reference] cached the features of {path} in {cache_path}")
      except OSError as e:
        log(f"[reference] could not write the cache {cache_path} ({first_line(e)}); continuing")
  # The file's own statistics win (ADM uses them); computed ones fill what it lacks.
  if ref.mu is None:
    ref.mu, ref.sigma = computed.mu, computed.sigma
  if ref.mu_s is None:
    ref.mu_s, ref.sigma_s = computed.mu_s, computed.sigma_s
  if need_pool:
    ref.pool = computed.pool
  return ref
