"""Throughput of the frozen DINOv2 encoder (deepflow_jax.models.dinov2) for REPA targets.

Builds an official architecture (``--variant``, default ``vitb14`` as the
reference's SSL runs use) with random weights and the position grid of
``repa_input_size(--resolution)`` (16 at 256 pixels), jits two functions and
times ``--iters`` calls of each after compiling and ``--warmup`` calls:

* ``encoder``: preprocessed float32 input (N, 224, 224, 3) -> patch tokens;
* ``repa_features``: uint8 images (N, 256, 256, 3) -> preprocessing (the
  reference's normalise + torch-bicubic resize) -> encoder -> patch tokens,
  what a training step runs.

The batch is split over all local devices with ``sharding.data_mesh()`` (data
parallel, parameters replicated); images/s are reported in total and per
device, one JSON line per phase.

    python scripts/bench_dinov2.py --batch=8 --iters=3
    python scripts/bench_dinov2.py --variant=vitb14 --dtype=bfloat16 --batch=256  # accelerators
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from deepflow_jax.models import dinov2  # pylint: disable=wrong-import-position
from bench_vae import data_shardings  # scripts/: the same helpers  # pylint: disable=wrong-import-position
from bench_vae import time_calls  # pylint: disable=wrong-import-position


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="vitb14", help="vits14, vitb14, vitl14, vitg14 (+_reg)")
  p.add_argument("--batch", type=int, default=8, help="global batch (all devices)")
  p.add_argument("--resolution", type=int, default=256, help="generated image size (REPA)")
  p.add_argument("--iters", type=int, default=3, help="timed calls per phase")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="computation dtype (params stay float32)")
  p.add_argument("--phases", default="encoder,repa_features")
  return p.parse_args(argv)


def main(argv=None):
  args = _parse(argv)
  size, grid = dinov2.repa_input_size(args.resolution)
  encoder = dinov2.variant(args.variant, pos_grid=grid, dtype=jnp.dtype(args.dtype))
  n_dev, replicated, batch_sharded = data_shardings(args.batch)

  init_x = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.jit(encoder.init, out_shardings=replicated)(jax.random.PRNGKey(0), init_x)["params"]
  n_params = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params)))

  rng = np.random.default_rng(0)
  r = args.resolution
  images = jax.device_put(rng.integers(0, 256, (args.batch, r, r, 3), dtype=np.uint8),
                          batch_sharded)
  x = jax.device_put(rng.standard_normal((args.batch, size, size, 3)).astype(np.float32),
                     batch_sharded)
  encode = jax.jit(lambda p, x: encoder.apply({"params": p}, x)["x_norm_patchtokens"],
                   out_shardings=batch_sharded)
  features = jax.jit(lambda p, im: dinov2.repa_features(encoder, p, im),
                     out_shardings=batch_sharded)
  phases = {"encoder": (encode, (params, x)), "repa_features": (features, (params, images))}
  for name in args.phases.split(","):
    fn, fn_args = phases[name]
    sec, compile_s = time_calls(fn, fn_args, args.iters, args.warmup)
    print(json.dumps({
        "phase": name, "variant": args.variant, "params_M": round(n_params / 1e6, 1),
        "input": f"{args.batch}x{r}x{r}x3 uint8" if name == "repa_features"
                 else f"{args.batch}x{size}x{size}x3 float32",
        "tokens": grid * grid, "dtype": args.dtype, "backend": jax.default_backend(),
        "devices": n_dev, "sec_per_call": round(sec, 4),
        "images_per_s": round(args.batch / sec, 2),
        "images_per_s_per_device": round(args.batch / sec / n_dev, 2),
        "compile_s": round(compile_s, 1)}), flush=True)


if __name__ == "__main__":
  main()
