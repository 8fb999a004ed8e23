"""The ADM evaluation suite, streaming and sharded: FID, sFID, Inception Score, precision, recall.

:func:`evaluate_samples` is the one call that scores a sample set (uint8 NHWC
images: an array, an ``npy_io.NpzArray`` or batches) against
:class:`~deepflow_jax.evaluation.reference.ReferenceStatistics` and returns
``{"fid", "sfid", "inception_score", "precision", "recall", "num_samples"}``,
each number computed as the ADM evaluator does
(:mod:`deepflow_jax.evaluation.metrics`) from the accumulated features
(:mod:`deepflow_jax.evaluation.features`); :func:`evaluate_files` does the same
for an ADM-format sample ``.npz`` against a reference ``.npz``
(:mod:`deepflow_jax.evaluation.reference` reads and caches it).
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import numpy as np

from deepflow_jax import outputs
from deepflow_jax import storage
from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import metrics
from deepflow_jax.evaluation.features import DEFAULT_PER_DEVICE_BATCH
from deepflow_jax.evaluation.features import FeatureAccumulator
from deepflow_jax.evaluation.features import Log
from deepflow_jax.evaluation.features import count_images
from deepflow_jax.evaluation.features import feature_dims
from deepflow_jax.evaluation.features import log_fn
from deepflow_jax.evaluation.features import print_log
from deepflow_jax.evaluation.features import run_feature_pass
from deepflow_jax.evaluation.reference import ReferenceStatistics
from deepflow_jax.evaluation.reference import check_reference
from deepflow_jax.evaluation.reference import check_reference_dims
from deepflow_jax.evaluation.reference import load_reference
from deepflow_jax.evaluation.reference import open_image_batch
from deepflow_jax.models import inception as inception_lib
from deepflow_jax.npy_io import NpzArray
from deepflow_jax.progress import format_duration
from deepflow_jax.sharding import data_mesh


def metrics_from_features(acc: FeatureAccumulator, reference: ReferenceStatistics, *,
                          distance: str = "float16", block_size: int = metrics.PR_BLOCK_SIZE,
                          mesh=None, log: Log = print_log) -> dict[str, Any]:
  """The metrics dict from a sample accumulator and reference statistics (ADM's arithmetic).

  FID/sFID are ``frechet_distance(samples, reference)`` (ADM's argument order);
  a metric whose inputs are missing on either side is ``None``.
  """
  log = log_fn(log)
  out: dict[str, Any] = {"fid": None, "sfid": None, "inception_score": None, "precision": None,
                         "recall": None, "num_samples": int(acc.count)}
  for key, stats, mu, sigma in (("fid", acc.pool_stats, reference.mu, reference.sigma),
                                ("sfid", acc.spatial_stats, reference.mu_s, reference.sigma_s)):
    if stats is None or mu is None:
      continue
    t = time.perf_counter()
    if stats.dim is not None and stats.dim >= 512:
      log(f"[metrics] {key}: matrix square root of a {stats.dim}x{stats.dim} product (scipy, "
          "~20 s on 2 CPU cores at 2048)")
    out[key] = metrics.frechet_distance(*stats.statistics(), mu, sigma)
    log(f"[metrics] {key} {out[key]:.4f} ({time.perf_counter() - t:.1f}s)")
  if acc.inception is not None and acc.inception.count:
    out["inception_score"] = acc.inception.result()
  if acc.pool is not None and reference.pool is not None:
    t = time.perf_counter()
    out["precision"], out["recall"] = metrics.precision_recall(
        reference.pool, acc.pool.features(), distance=distance, block_size=block_size,
        mesh=mesh if mesh is not None else data_mesh())
    log(f"[metrics] precision {out['precision']:.4f}, recall {out['recall']:.4f} "
        f"({time.perf_counter() - t:.1f}s)")
  return out


def evaluate_samples(model, params, samples, reference: ReferenceStatistics, *,
                     num_samples: Optional[int] = None, batch_size: Optional[int] = None,
                     per_device_batch: int = DEFAULT_PER_DEVICE_BATCH, mesh=None,
                     precision_recall: bool = True, distance: str = "float16",
                     split_size: int = metrics.IS_SPLIT_SIZE, log: Log = print_log) -> dict[str, Any]:
  """Scores uint8 NHWC samples against ``reference``: the ADM suite's metrics in one call.

  Args:
    model, params: the feature network (``inception.load_fid_inception(path)``).
    samples: uint8 (N, H, W, 3) images: an array, an :class:`NpzArray` or an
      iterable of batches (then pass ``num_samples`` for progress lines and a
      preallocated feature buffer).
    reference: from :func:`load_reference` / :func:`compute_reference_statistics`.
    batch_size, per_device_batch, mesh: as :func:`run_feature_pass`.
    precision_recall: keep the pool features and compute P/R (needs ``reference.pool``).
    distance: precision/recall distance arithmetic (``"float16"``: ADM's; ``"float32"``).
    split_size: Inception Score split (ADM: 5,000 samples).
    log: progress sink on process 0 (``None``: silent).

  Returns:
    ``{"fid", "sfid", "inception_score", "precision", "recall", "num_samples"}``
    (floats; ``None`` where the reference lacks what a metric needs).
  """
  mesh = mesh if mesh is not None else data_mesh()
  keep_pool = precision_recall and reference.pool is not None
  acc = FeatureAccumulator(spatial=reference.mu_s is not None, keep_pool=keep_pool,
                           split_size=split_size, capacity=count_images(samples, num_samples))
  run_feature_pass(model, params, samples, acc, batch_size=batch_size,
                   per_device_batch=per_device_batch, mesh=mesh, num_images=num_samples,
                   name="samples", log=log)
  if acc.count < 2:
    raise UserError(f"samples: {acc.count} image(s); the statistics need at least 2 "
                    "(the paper's protocol: 50,000)")
  return metrics_from_features(acc, reference, distance=distance, mesh=mesh, log=log)


# ---------------------------------------------------------------------------
# Sample files against a reference file: what `evaluate` and `generate` run.
# ---------------------------------------------------------------------------

PREPROCESSINGS = ("adm", "pytorch_fid")
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "classify_image_graph_def.pb")
FEATURE_DIM = 2048  # a covariance from fewer samples is singular


def check_inputs(samples: str, reference: str, inception: str, *,
                 allow_resolution_mismatch: bool = False) -> NpzArray:
  """Checks the three files before anything runs; returns the samples' ``arr_0``.

  Samples of another resolution than the reference's images are refused unless
  ``allow_resolution_mismatch`` (FID across resolutions measures the resizing).
  """
  min_samples = metrics.PR_NEIGHBOURHOOD + 1
  images = open_image_batch(
      samples, min_images=min_samples,
      why=f"the statistics need >= 2 and precision/recall >= {min_samples} (k = "
          f"{metrics.PR_NEIGHBOURHOOD} neighbours); the paper's protocol uses 50,000")
  _, ref_images = check_reference(reference)
  if (ref_images is not None and tuple(ref_images.shape[1:3]) != tuple(images.shape[1:3])
      and not allow_resolution_mismatch):
    raise UserError(f"{samples}: samples are {images.shape[1]}x{images.shape[2]} but the "
                    f"reference {reference} holds {ref_images.shape[1]}x{ref_images.shape[2]} "
                    "images; use a reference of the samples' resolution (or pass "
                    "--allow_resolution_mismatch)")
  if not os.path.isfile(inception):
    raise UserError(f"{inception}: no such FID Inception weights file (expected pytorch-fid's "
                    f"{INCEPTION_FILES[0]} or {INCEPTION_FILES[1]})")
  return images


def evaluate_files(samples: str, reference: str, inception: str, *,
                   preprocessing: str = "adm", distance: str = "float16",
                   batch_size: Optional[int] = None, cache: bool = True,
                   log: Log = print_log, allow_resolution_mismatch: bool = False
                   ) -> dict[str, Any]:
  """The ADM suite's metrics of an ADM-format sample ``.npz`` against a reference ``.npz``.

  ``inception`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or the
  TF graph ``classify_image_graph_def.pb``. Returns the metrics of
  :func:`evaluate_samples` plus ``settings`` (files, preprocessing, distance,
  reference size), ready to be written as JSON.
  """
  log = log_fn(log)
  images = check_inputs(samples, reference, inception,
                        allow_resolution_mismatch=allow_resolution_mismatch)
  if preprocessing not in PREPROCESSINGS:
    raise UserError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
  model, params = inception_lib.load_fid_inception(inception, preprocessing=preprocessing)
  dims = feature_dims(model, params, images.shape[1:])
  t0 = time.perf_counter()
  log(f"[evaluate] {len(images):,} samples {images.shape[1:]} from {samples} vs {reference}; "
      f"{jax.device_count()} devices, preprocessing {preprocessing}")
  if len(images) < FEATURE_DIM:
    log(f"[evaluate] note: {len(images):,} samples < {FEATURE_DIM:,} feature dimensions: the "
        "sample covariance is singular and FID is biased upwards; compare FIDs only at equal "
        "sample counts (the paper: 50,000 samples vs the 10,000-image reference)")
  ref = load_reference(reference, model, params, cache=cache, batch_size=batch_size, log=log)
  check_reference_dims(ref, dims, reference)
  res = evaluate_samples(model, params, images, ref, distance=distance, batch_size=batch_size,
                         log=log)
  log(f"[evaluate] done in {format_duration(time.perf_counter() - t0)}")
  res["settings"] = {
      "samples": os.path.abspath(samples), "reference": os.path.abspath(reference),
      "inception": os.path.abspath(inception), "preprocessing": preprocessing,
      "distance": distance, "reference_images": ref.num_images,
      "is_split_size": metrics.IS_SPLIT_SIZE, "pr_k": metrics.PR_NEIGHBOURHOOD}
  return res


def format_table(res: dict) -> str:
  """The metrics as a two-column text table (``-`` where a metric was not computed)."""
  rows = [("FID", res["fid"]), ("sFID", res["sfid"]), ("Inception Score", res["inception_score"]),
          ("Precision", res["precision"]), ("Recall", res["recall"]),
          ("samples", res["num_samples"])]
  lines = [f"{'metric':<16} {'value':>12}", f"{'-' * 16} {'-' * 12}"]
  for name, v in rows:
    if v is None:
      text = "-"
    elif isinstance(v, int):
      text = f"{v:,}"
    else:
      text = f"{v:.4f}"
    lines.append(f"{name:<16} {text:>12}")
  return "\n".join(lines)


def write_metrics_json(path: str, res: dict) -> None:
  """Writes the metrics as strict JSON atomically (a NaN, e.g. an undefined IS, becomes null)."""
  def clean(v):
    if isinstance(v, float) and not np.isfinite(v):
      return None
    return {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else v
  path = storage.absolute(path)
  storage.makedirs(storage.dirname(path))
  outputs.atomic_write_json(path, clean(res))
