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

import argparse
import os
import shutil
import sys

import jax
import numpy as np

from deepflow_jax import vae as vae_lib
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog="python -m deepflow_jax.convert_vae",
      description="Convert a diffusers AutoencoderKL folder to an Orbax checkpoint.")
  parser.add_argument("--input", required=True,
                      help="diffusers folder: config.json + diffusion_pytorch_model.*")
  parser.add_argument("--output", required=True,
                      help="folder to write config.json and params/ (Orbax) into")
  parser.add_argument("--force", action="store_true",
                      help="overwrite config.json and params/ in a non-empty --output")
  return parser.parse_args(argv)


def convert(input_dir: str, output_dir: str, force: bool = False) -> int:
  """Converts and writes; returns the number of parameters written."""
  input_dir = vae_lib.resolve_vae_dir(input_dir)
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output {output_dir} exists and is not a directory")
  if os.path.realpath(output_dir) == os.path.realpath(input_dir):
    raise UserError("--output must differ from --input")
  if os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
    raise UserError(
        f"--output {output_dir} is not empty; pass --force to overwrite its "
        f"{vae_lib.CONFIG_NAME} and {vae_lib.ORBAX_PARAMS_DIR}/")
  if vae_lib.is_orbax_vae_dir(input_dir):
    raise UserError(f"--input {input_dir} is already a converted (Orbax) VAE folder")

  config = vae_lib.read_config(input_dir)
  model = vae_lib.AutoencoderKL.from_config(config)
  state_dict, weights_file = vae_lib.load_diffusers_state_dict(input_dir)
  print(f"read {len(state_dict)} tensors from {weights_file}")
  params = vae_lib.convert_state_dict(state_dict, model, source=weights_file)
  params = jax.tree_util.tree_map(
      lambda a: np.ascontiguousarray(a, dtype=np.float32), params)
  n_params = vae_lib.count_params(params)

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  ckpt_dir = os.path.join(output_dir, vae_lib.ORBAX_PARAMS_DIR)
  if os.path.lexists(ckpt_dir):  # only reachable with --force
    if os.path.isdir(ckpt_dir) and not os.path.islink(ckpt_dir):
      shutil.rmtree(ckpt_dir)
    else:
      os.remove(ckpt_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(ckpt_dir, params)
    checkpointer.wait_until_finished()
  shutil.copyfile(os.path.join(input_dir, vae_lib.CONFIG_NAME),
                  os.path.join(output_dir, vae_lib.CONFIG_NAME))
  n_arrays = len(jax.tree_util.tree_leaves(params))
  print(f"converted {n_arrays} arrays, {n_params:,} parameters "
        f"({len(model.block_out_channels)} levels, widths "
        f"{tuple(model.block_out_channels)}) -> {output_dir}")
  return n_params


@cli_main
def main(argv=None):
  args = _parse(argv)
  convert(args.input, args.output, force=args.force)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
