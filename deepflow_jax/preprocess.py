"""Command line: ImageNet (or any ImageFolder / TFDS image dataset) -> SD-VAE latent moments.

::

    python -m deepflow_jax.preprocess --source=imagefolder:PATH --vae=DIR --output=DIR \\
        [--split=train] [--resolution=256] [--format=arrayrecord|repa] [--save_images] \\
        [--batch_size=32] [--examples_per_shard=5000] [--limit=N] [--num_workers=N] \\
        [--precision=highest|default] [--tfds_data_dir=DIR] \\
        [--process_index=I --process_count=P | --distributed [--coordinator_address=HOST:PORT \\
         --num_processes=P --process_id=I]]
    python -m deepflow_jax.preprocess --output=DIR --finalize

This module only parses and checks the flags, starts JAX's multi-process runtime
for ``--distributed``, and calls the library:
:func:`deepflow_jax.data.encode.encode_dataset` (the job: sources and the crop
in :mod:`deepflow_jax.data.image_sources`, output layouts, resumable state and
final files in :mod:`deepflow_jax.data.latent_writer`) or, for ``--finalize``,
:func:`deepflow_jax.data.latent_writer.finalize_output`. ``docs/preprocessing.md``
describes the pipeline, the formats and resumption. Errors are one line on
stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import sys

import jax

from deepflow_jax.data import encode
from deepflow_jax.data import latent_writer
from deepflow_jax.errors import ArgumentParser
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.errors import first_line


def _parser() -> ArgumentParser:
  p = ArgumentParser(
      prog="python -m deepflow_jax.preprocess",
      description="Encode images to SD-VAE latent moments (ArrayRecord or REPA layout).")
  p.add_argument("--source", help="imagefolder:PATH (PATH/<class>/<images>) or tfds:NAME")
  p.add_argument("--split", default="train",
                 help="TFDS split to read; the shard-name prefix in both cases (default train)")
  p.add_argument("--resolution", type=int, default=256, help="crop side in pixels (256)")
  p.add_argument("--vae", help="VAE folder (diffusers or convert_vae), e.g. sd-vae-ft-mse/ema")
  p.add_argument("--output", required=True, help="output folder (created; resumable)")
  p.add_argument("--format", default=latent_writer.ARRAYRECORD,
                 choices=latent_writer.FORMATS)
  p.add_argument("--save_images", action="store_true",
                 help="also store the crops, for SSL alignment (model.ssl_align): repa: PNGs in "
                      "OUT/images/ (the reference's layout); arrayrecord: in each record")
  p.add_argument("--batch_size", type=int, default=32, help="images per device per batch")
  p.add_argument("--examples_per_shard", type=int, default=5000,
                 help="source examples per shard (the unit of work, resumption and hosts)")
  p.add_argument("--limit", type=int, default=None, help="only the first N source examples")
  p.add_argument("--num_workers", type=int, default=None,
                 help="image decoding threads (default: the CPU count)")
  p.add_argument("--precision", default="highest", choices=encode.PRECISIONS,
                 help="conv/matmul precision of the encoder: highest (full float32) or the "
                      "backend's default (faster; TF32 on recent NVIDIA GPUs, bf16 passes on TPU)")
  p.add_argument("--tfds_data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host launches; the cluster is "
                      "auto-detected unless the three flags below are given)")
  p.add_argument("--coordinator_address", default=None, help="with --distributed: host:port")
  p.add_argument("--num_processes", type=int, default=None, help="with --distributed")
  p.add_argument("--process_id", type=int, default=None, help="with --distributed")
  p.add_argument("--process_index", type=int, default=None,
                 help="this process's index among independent launches (default: JAX's)")
  p.add_argument("--process_count", type=int, default=None,
                 help="number of independent launches sharing --output (default: JAX's)")
  p.add_argument("--finalize", action="store_true",
                 help="only write the final files of a finished multi-process run in --output")
  p.add_argument("--log_every_s", type=float, default=10.0, help=argparse.SUPPRESS)
  return p


def _validate(a) -> None:
  for name, lo in (("resolution", 8), ("batch_size", 1), ("examples_per_shard", 1)):
    if getattr(a, name) < lo:
      raise UserError(f"--{name} must be >= {lo}, got {getattr(a, name)}")
  if a.limit is not None and a.limit < 1:
    raise UserError(f"--limit must be >= 1, got {a.limit}")
  if a.num_workers is not None and a.num_workers < 0:
    raise UserError(f"--num_workers must be >= 0, got {a.num_workers}")
  if (a.process_index is None) != (a.process_count is None):
    raise UserError("give both --process_index and --process_count, or neither")
  if a.process_count is not None and not 0 <= a.process_index < a.process_count:
    raise UserError(f"need 0 <= --process_index < --process_count, got {a.process_index} / "
                    f"{a.process_count}")
  if a.distributed and a.process_count is not None:
    raise UserError("--distributed takes the process index and count from JAX; do not also "
                    "give --process_index/--process_count")
  if not a.finalize and (not a.source or not a.vae):
    raise UserError("--source and --vae are required (unless --finalize)")


def _initialize_distributed(a) -> None:
  """``jax.distributed.initialize`` (explicit flags, else cluster auto-detection)."""
  # Barriers run as device collectives; between CPU devices of several processes they
  # need gloo (the setting affects only the CPU backend).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=a.coordinator_address,
                               num_processes=a.num_processes, process_id=a.process_id)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--distributed: jax.distributed.initialize failed ({first_line(e)}); "
                    "give --coordinator_address, --num_processes and --process_id, or launch "
                    "on a cluster JAX detects (SLURM, Open MPI, Cloud TPU, ...)") from e


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  _validate(a)
  if a.finalize:
    latent_writer.finalize_output(a.output)
    return 0
  if a.distributed:
    _initialize_distributed(a)
  result = encode.encode_dataset(
      a.source, a.vae, a.output, split=a.split, resolution=a.resolution, format=a.format,
      save_images=a.save_images, batch_size=a.batch_size,
      examples_per_shard=a.examples_per_shard, limit=a.limit, num_workers=a.num_workers,
      precision=a.precision, tfds_data_dir=a.tfds_data_dir, process_index=a.process_index,
      process_count=a.process_count,
      log_every_s=a.log_every_s)
  return result.exit_status


if __name__ == "__main__":
  sys.exit(main())
