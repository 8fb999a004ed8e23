"""ADM evaluation suite metrics of a sample batch: FID, sFID, Inception Score, precision, recall.

Command line::

    python -m deepflow_jax.evaluate --samples=S.npz --reference=REF.npz \\
        --inception=pt_inception-2015-12-05-6726825d.pth [--output=metrics.json] \\
        [--batch_size=N] [--preprocessing=adm|pytorch_fid] [--distance=float16|float32] \\
        [--no_cache]

``S.npz`` and ``REF.npz`` are ADM-format batches: ``arr_0`` uint8 (N, H, W, 3)
(what ``python -m deepflow_jax.generate`` writes; the paper's protocol is 50,000
samples against ADM's ``VIRTUAL_imagenet256_labeled.npz``). The reference's
precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` are used when present;
whatever is missing, and the reference images' pool features that precision and
recall need, are computed and cached next to the reference
(``REF.features-<key>.npz``; the reference itself is never written).
``--inception`` is pytorch-fid's weight file or the TF graph
``classify_image_graph_def.pb``. Images are read in chunks, features are
computed data-parallel over every device of every host and accumulated as
running statistics (``deepflow_jax.evaluation.suite``), with the ADM
evaluator's arithmetic (``deepflow_jax.evaluation.metrics``).

Prints a table and, with ``--output``, writes the metrics as JSON (atomically).
Exit status 0 on success, 2 on bad input (one ``error:`` line naming the file).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from deepflow_jax.errors import ArgumentParser, UserError, cli_main
from deepflow_jax.evaluation import metrics
from deepflow_jax.evaluation import suite

PREPROCESSINGS = ("adm", "pytorch_fid")
# A 2048-d covariance from fewer rows is singular; FIDs are comparable only at equal counts.
_FEATURE_DIM_HINT = 2048


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog="python -m deepflow_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--samples", required=True, help="ADM-format .npz of samples (arr_0 uint8 NHWC)")
  p.add_argument("--reference", required=True,
                 help="ADM reference batch .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
  p.add_argument("--inception", required=True,
                 help="FID Inception weights: pytorch-fid's pt_inception-*.pth or the TF graph .pb")
  p.add_argument("--output", default=None, help="write the metrics to this JSON file")
  p.add_argument("--batch_size", type=int, default=None,
                 help=f"global batch (default {suite.DEFAULT_PER_DEVICE_BATCH} per device)")
  p.add_argument("--preprocessing", default="adm", choices=PREPROCESSINGS,
                 help="adm (the paper's numbers) or pytorch_fid (not comparable with them)")
  p.add_argument("--distance", default="float16", choices=metrics.DISTANCE_MODES,
                 help="precision/recall distances: float16 (ADM's) or float32 (exact up to ties)")
  p.add_argument("--no_cache", action="store_true",
                 help="do not read or write the reference feature cache")
  return p


def _check_output(path: str | None) -> None:
  if path is None:
    return
  if os.path.isdir(path):
    raise UserError(f"--output={path}: is a directory, expected a .json file path")
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f"--output={path}: {parent} is not a directory")


def _json_number(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None  # strict JSON has no nan; the table shows it
  return v


def write_json_atomic(path: str, obj) -> None:
  """Writes ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, allow_nan=False)
      f.write("\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  _check_output(a.output)
  if a.batch_size is not None and a.batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {a.batch_size}")
  # Inputs are checked before the network is loaded or anything runs.
  min_samples = metrics.PR_NEIGHBOURHOOD + 1
  samples = suite.open_image_batch(
      a.samples, min_images=min_samples,
      why=f"the statistics need >= 2 and precision/recall >= {min_samples} (k = "
          f"{metrics.PR_NEIGHBOURHOOD} neighbours); the paper's protocol uses 50,000")
  suite.check_reference(a.reference)
  if not os.path.isfile(a.inception):
    raise UserError(f"--inception={a.inception}: no such file (expected pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth or classify_image_graph_def.pb)")

  from deepflow_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  model, params = inception.load_fid_inception(a.inception, preprocessing=a.preprocessing)
  dims = suite.feature_dims(model, params, samples.shape[1:])
  t0 = time.perf_counter()
  _log(f"[evaluate] {len(samples):,} samples {samples.shape[1:]} from {a.samples} vs "
       f"{a.reference}; {jax.device_count()} devices, preprocessing {a.preprocessing}")
  if len(samples) < _FEATURE_DIM_HINT:
    _log(f"[evaluate] note: {len(samples):,} samples < {_FEATURE_DIM_HINT:,} feature dimensions: "
         "the sample covariance is singular and FID is biased upwards; compare FIDs only at "
         "equal sample counts (the paper: 50,000 samples vs the 10,000-image reference)")
  pass_kwargs = {"batch_size": a.batch_size, "log": _log}
  # The cache key covers the weights and the model's settings (its preprocessing included),
  # so library callers with the same network share the cache.
  reference = suite.load_reference(a.reference, model, params, cache=not a.no_cache,
                                   **pass_kwargs)
  suite.check_reference_dims(reference, dims, a.reference)
  res = suite.evaluate_samples(model, params, samples, reference, distance=a.distance,
                               **pass_kwargs)
  _log(f"[evaluate] done in {time.perf_counter() - t0:.1f}s\n" + format_table(res))
  if a.output and jax.process_index() == 0:
    record = {k: _json_number(v) for k, v in res.items()}
    record["settings"] = {
        "samples": os.path.abspath(a.samples), "reference": os.path.abspath(a.reference),
        "inception": os.path.abspath(a.inception), "preprocessing": a.preprocessing,
        "distance": a.distance, "reference_images": reference.num_images,
        "is_split_size": metrics.IS_SPLIT_SIZE, "pr_k": metrics.PR_NEIGHBOURHOOD}
    write_json_atomic(a.output, record)
    _log(f"[evaluate] wrote {a.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
