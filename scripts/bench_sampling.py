"""Sampling throughput (samples/s) of the DeepFlow samplers on the present backend.

Times the whole jitted sampling loop (``deepflow_jax.sampling.make_sampler``):
by default the reference's Euler-Maruyama SDE with 250 steps and Heun with 50
steps (99 model evaluations), on a named preset with random (initialiser)
weights. The batch is data-parallel over every local device (parameters
replicated), as in ``python -m deepflow_jax.generate``; throughput is reported in
total and per device. Compilation and ``--warmup`` runs are excluded.

    python scripts/bench_sampling.py --model=DeepFlow-XL/2-3T --per_device_batch=64 \\
        --cfg_scale=1.8 --guidance_high=0.7 --dtype=bfloat16

CPU-sized example (a small model on an 8x8 latent)::

    python scripts/bench_sampling.py --model=DeepFlow-B/2-2T --hidden_size=256 --depth=8 \\
        --num_heads=4 --input_size=8 --per_device_batch=4 --samplers=sde:250,heun:50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from deepflow_jax import sampling  # pylint: disable=wrong-import-position
from deepflow_jax.models.presets import get_model  # pylint: disable=wrong-import-position
from deepflow_jax.models.deepflow import DTYPES  # pylint: disable=wrong-import-position
from deepflow_jax.sharding import data_mesh  # pylint: disable=wrong-import-position

_DTYPES = {k: DTYPES[k] for k in ("float32", "bfloat16")}  # the choices offered here


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="DeepFlow-XL/2-3T", help="preset name (models/presets.py)")
  p.add_argument("--input_size", type=int, default=32, help="latent size (32 = 256px images)")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--hidden_size", type=int, default=None, help="override the preset's width")
  p.add_argument("--depth", type=int, default=None, help="override the preset's depth")
  p.add_argument("--num_heads", type=int, default=None, help="override the preset's heads")
  p.add_argument("--df_idxs", default=None, help="override the split layers, e.g. '4,8'")
  p.add_argument("--projector_dim", type=int, default=2048)
  p.add_argument("--per_device_batch", type=int, default=16)
  p.add_argument("--samplers", default="sde:250,heun:50", help="comma list of NAME:STEPS")
  p.add_argument("--cfg_scale", type=float, default=1.0, help="> 1 turns guidance on")
  p.add_argument("--guidance_low", type=float, default=0.0)
  p.add_argument("--guidance_high", type=float, default=1.0)
  p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES),
                 help="model compute dtype (params and sampler state stay float32)")
  p.add_argument("--attention_impl", default=None, choices=(None, "xla", "cudnn"))
  p.add_argument("--iters", type=int, default=2, help="timed runs per sampler")
  p.add_argument("--warmup", type=int, default=0, help="untimed runs after compiling")
  return p.parse_args(argv)


def _model(a):
  over = dict(input_size=a.input_size, num_classes=a.num_classes, projector_dim=a.projector_dim,
              dtype=_DTYPES[a.dtype], attention_impl=a.attention_impl)
  for k in ("hidden_size", "depth", "num_heads"):
    if getattr(a, k) is not None:
      over[k] = getattr(a, k)
  if a.df_idxs is not None:
    over["df_idxs"] = tuple(int(i) for i in a.df_idxs.split(",") if i.strip())
  return get_model(a.model, **over)


def _guided_steps(name, steps, a):
  if a.cfg_scale <= 1:
    return 0
  ts = sampling.time_grid(sampling.SamplerSettings(name, steps))[:-1]
  return int(((ts >= a.guidance_low) & (ts <= a.guidance_high)).sum())


def main(argv=None):
  a = _parse(argv)
  model = _model(a)
  devices = jax.devices()
  mesh = data_mesh(devices)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  n = a.per_device_batch * len(devices)
  shape = (n, model.input_size, model.input_size, model.in_channels)

  t0 = time.perf_counter()
  init = jax.jit(model.init, out_shardings=repl)
  params = init(jax.random.key(0), jnp.zeros((1,) + shape[1:]), [jnp.ones((1,))] *
                model.num_branches, jnp.zeros((1,), jnp.int32))["params"]
  params = jax.block_until_ready(flax.linen.unbox(params))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  init_s = time.perf_counter() - t0

  latents = jax.device_put(jax.random.normal(jax.random.key(1), shape), data)
  labels = jax.device_put(jnp.arange(n, dtype=jnp.int32) % model.num_classes, data)
  keys = jax.device_put(jax.random.split(jax.random.key(2), n), data)
  scalars = [jnp.asarray(v, jnp.float32) for v in (a.cfg_scale, a.guidance_low, a.guidance_high)]

  results = []
  for spec in a.samplers.split(","):
    name, steps = spec.split(":")
    steps = int(steps)
    fn = sampling.make_sampler(model, sampling.SamplerSettings(name, steps))
    noise = keys if sampling.num_noise_draws(name, steps) else None
    jitted = jax.jit(fn, in_shardings=(repl, data, data, data if noise is not None else None,
                                       repl, repl, repl), out_shardings=data)
    args = (params, latents, labels, noise, *scalars)
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))  # compile + one run
    first_s = time.perf_counter() - t0
    for _ in range(a.warmup):
      jax.block_until_ready(jitted(*args))
    t0 = time.perf_counter()
    for _ in range(a.iters):
      out = jitted(*args)
    jax.block_until_ready(out)
    per_run = (time.perf_counter() - t0) / a.iters
    nfe = steps if name != "heun" else 2 * steps - 1
    guided = _guided_steps(name, steps, a)
    r = {
        "sampler": name, "steps": steps, "model_evals": nfe, "guided_steps": guided,
        "batch": n, "devices": len(devices), "seconds_per_batch": round(per_run, 4),
        "samples_per_s": round(n / per_run, 4),
        "samples_per_s_per_device": round(n / per_run / len(devices), 4),
        "first_call_s (compile+run)": round(first_s, 2),
        "finite": bool(np.isfinite(np.asarray(out)).all()),
    }
    results.append(r)
    print(json.dumps(r), flush=True)
  summary = {
      "model": a.model, "overrides": {k: getattr(a, k) for k in ("hidden_size", "depth",
                                                                   "num_heads", "df_idxs")},
      "input_size": model.input_size, "params": n_params, "dtype": a.dtype,
      "cfg_scale": a.cfg_scale, "guidance": [a.guidance_low, a.guidance_high],
      "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
      "host": platform.processor() or platform.machine(), "init_s": round(init_s, 2),
  }
  print(json.dumps(summary), flush=True)
  return results


if __name__ == "__main__":
  main()
