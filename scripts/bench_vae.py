"""Encode / decode throughput of the SD-VAE (deepflow_jax.vae) on the present backend.

Builds the real stabilityai/sd-vae-ft-ema architecture (``vae.SD_VAE_CONFIG``, or
``--config`` a diffusers config.json) with random weights, jits ``encode`` and
``decode``, excludes compilation and ``--warmup`` calls, and times ``--iters``
calls of each. The batch is split over all local devices (data parallel, params
replicated); throughput is reported in total and per device.

    python scripts/bench_vae.py --batch=8 --resolution=256 --iters=10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from deepflow_jax.models import vae as vae_lib  # pylint: disable=wrong-import-position
from deepflow_jax.sharding import data_mesh  # pylint: disable=wrong-import-position


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8, help="global batch (all devices)")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--iters", type=int, default=10, help="timed calls per phase")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="computation dtype (params stay float32)")
  p.add_argument("--config", default=None,
                 help="diffusers config.json (default: sd-vae-ft-ema architecture)")
  p.add_argument("--phases", default="encode,decode")
  return p.parse_args(argv)


def data_shardings(batch: int):
  """(device count, replicated, batch-sharded) on a data mesh over every device; the
  global ``batch`` must split evenly. Also used by bench_dinov2.py."""
  devices = jax.devices()
  if batch % len(devices):
    raise SystemExit(f"--batch={batch} is not a multiple of {len(devices)} devices")
  mesh = data_mesh(devices)
  return len(devices), NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def time_calls(fn, args, iters, warmup):
  """(seconds per call of ``fn(*args)`` over ``iters`` timed calls, compile + first call).

  Also used by bench_dinov2.py."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile + first run
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters, compile_s


def main(argv=None):
  args = _parse(argv)
  if args.config:
    with open(args.config, encoding="utf-8") as f:
      config = json.load(f)
  else:
    config = vae_lib.SD_VAE_CONFIG
  dtype = jnp.dtype(args.dtype)
  vae = vae_lib.AutoencoderKL.from_config(config, dtype=dtype, param_dtype=jnp.float32)
  n_dev, replicated, batch_sharded = data_shardings(args.batch)

  f = vae.downsample_factor
  init_x = jnp.zeros((1, 2 * f, 2 * f, vae.in_channels), jnp.float32)
  params = jax.jit(vae.init, out_shardings=replicated)(jax.random.PRNGKey(0), init_x)["params"]
  n_params = vae_lib.count_params(params)

  r = args.resolution
  rng = np.random.default_rng(0)
  x = jax.device_put(
      rng.uniform(-1, 1, (args.batch, r, r, vae.in_channels)).astype(np.float32),
      batch_sharded)
  z = jax.device_put(
      rng.standard_normal((args.batch, r // f, r // f, vae.latent_channels)).astype(np.float32),
      batch_sharded)
  encode = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode),
                   out_shardings=batch_sharded)
  decode = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.decode),
                   out_shardings=batch_sharded)

  print(f"backend={jax.default_backend()} devices={n_dev} ({jax.devices()[0].device_kind}) "
        f"params={n_params:,} batch={args.batch} resolution={r} dtype={args.dtype} "
        f"iters={args.iters} warmup={args.warmup}")
  results = {}
  for phase in args.phases.split(","):
    fn, inp = {"encode": (encode, x), "decode": (decode, z)}[phase]
    sec, compile_s = time_calls(fn, (params, inp), args.iters, args.warmup)
    ips = args.batch / sec
    results[phase] = dict(sec_per_batch=sec, images_per_s=ips,
                          images_per_s_per_device=ips / n_dev, compile_s=compile_s)
    print(f"{phase}: {sec * 1e3:.1f} ms/batch, {ips:.3f} images/s, "
          f"{ips / n_dev:.3f} images/s/device (compile+first call {compile_s:.1f} s)")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
