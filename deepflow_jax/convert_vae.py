"""Converts a diffusers AutoencoderKL folder into an Orbax checkpoint of Flax params.

    python -m deepflow_jax.convert_vae --input=DIR --output=DIR [--force]

``--input`` is a diffusers folder (``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``), e.g. a local copy of
``stabilityai/sd-vae-ft-ema``. ``--output`` receives::

    OUTPUT/config.json   the input's config.json, copied byte for byte
    OUTPUT/params/       Orbax (StandardCheckpointer) checkpoint, float32 params

``deepflow_jax.vae.load_diffusers_vae(OUTPUT)`` loads either folder. A non-empty
``--output`` is refused unless ``--force``; ``--force`` replaces ``config.json``
and ``params/`` there and leaves any other file alone. Errors are one line on
stderr with exit status 2.
"""
from __future__ import annotations

import sys

from deepflow_jax.models import vae as vae_lib
from deepflow_jax.errors import ArgumentParser
from deepflow_jax.errors import cli_main


def _parse(argv):
  parser = ArgumentParser(
      prog="python -m deepflow_jax.convert_vae",
      description="Convert a diffusers AutoencoderKL folder to an Orbax checkpoint.")
  parser.add_argument("--input", required=True,
                      help="diffusers folder: config.json + diffusion_pytorch_model.*")
  parser.add_argument("--output", required=True,
                      help="folder to write config.json and params/ (Orbax) into")
  parser.add_argument("--force", action="store_true",
                      help="replace config.json and params/ in a non-empty --output")
  return parser.parse_args(argv)


@cli_main
def main(argv=None):
  args = _parse(argv)
  vae_lib.convert_diffusers_vae(args.input, args.output, force=args.force)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
