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
Exit status 0 on success, 2 on bad input (one ``error:`` line naming the file),
143 / 130 when stopped by SIGTERM / SIGINT (one line; nothing half-written).
"""
from __future__ import annotations

import contextlib
import os
import sys

import jax

from deepflow_jax import outputs
from deepflow_jax import storage
from deepflow_jax.errors import ArgumentParser, UserError, cli_main
from deepflow_jax.evaluation import metrics
from deepflow_jax.evaluation import suite
from deepflow_jax.signals import StopRequests


def _parser() -> ArgumentParser:
  p = ArgumentParser(prog="python -m deepflow_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--samples", required=True, help="ADM-format .npz of samples (arr_0 uint8 NHWC)")
  p.add_argument("--reference", required=True,
                 help="ADM reference batch .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
  p.add_argument("--inception", required=True,
                 help="FID Inception weights: pytorch-fid's pt_inception-*.pth or the TF graph .pb")
  p.add_argument("--output", default=None, help="write the metrics to this JSON file")
  p.add_argument("--batch_size", type=int, default=None,
                 help=f"global batch (default {suite.DEFAULT_PER_DEVICE_BATCH} per device)")
  p.add_argument("--preprocessing", default="adm", choices=suite.PREPROCESSINGS,
                 help="adm (the paper's numbers) or pytorch_fid (not comparable with them)")
  p.add_argument("--distance", default="float16", choices=metrics.DISTANCE_MODES,
                 help="precision/recall distances: float16 (ADM's) or float32 (exact up to ties)")
  p.add_argument("--no_cache", action="store_true",
                 help="do not read or write the reference feature cache")
  p.add_argument("--allow_resolution_mismatch", action="store_true",
                 help="evaluate samples whose resolution differs from the reference images'")
  return p


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  outputs.check_file_path(a.output, "--output")
  if a.batch_size is not None and a.batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {a.batch_size}")
  if not storage.is_url(a.inception) and not os.path.isfile(a.inception):
    raise UserError(f"--inception={a.inception}: no such file (expected pytorch-fid's "
                    f"{suite.INCEPTION_FILES[0]} or the TF graph {suite.INCEPTION_FILES[1]})")
  for flag, path in (("--samples", a.samples), ("--reference", a.reference),
                     ("--inception", a.inception), ("--output", a.output)):
    if path and storage.is_url(path):
      storage.check_bucket(path, flag)
  if storage.is_url(a.reference) and not a.no_cache:
    _log(f"[evaluate] --reference={a.reference} is a URL: it is read from a downloaded copy and "
         "its feature cache is not kept (use a local copy to keep it)")
  # gs:// inputs are downloaded to a temporary folder first (the readers need files).
  with contextlib.ExitStack() as files, StopRequests(
      raise_now=True, what="evaluation stopped, no metrics written (a finished reference "
      "feature cache is kept)"):
    samples = files.enter_context(storage.local_copy(a.samples, "--samples"))
    ref = files.enter_context(storage.local_copy(a.reference, "--reference"))
    inception = files.enter_context(storage.local_copy(a.inception, "--inception"))
    res = suite.evaluate_files(samples, ref, inception,
                               preprocessing=a.preprocessing, distance=a.distance,
                               batch_size=a.batch_size, cache=not a.no_cache, log=_log,
                               allow_resolution_mismatch=a.allow_resolution_mismatch)
  _log(suite.format_table(res))
  if a.output and jax.process_index() == 0:
    suite.write_metrics_json(a.output, res)
    _log(f"[evaluate] wrote {a.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
