"""Train-step throughput: steps/s, images/s, TFLOP/s per device and MFU on the present backend.

Builds the jitted, sharded train step exactly as ``python -m deepflow_jax.main`` does
(``deepflow_jax.train.Trainer``) on random latents, excludes compilation and warm-up,
and times ``--steps`` steps.

    python scripts/bench_train.py --config=configs/xl3t.py --batch=256 [--dtype=bfloat16]
        [--mesh_fsdp=1] [--override model.depth=12 ...]
"""
from __future__ import annotations

import argparse
import ast
import os
import time

import jax
import numpy as np

from deepflow_jax import config_lib
from deepflow_jax import sharding as shd
from deepflow_jax import train as train_lib
from deepflow_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "xl3t.py"))
  p.add_argument("--batch", type=int, default=256, help="global batch size")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on accelerators)")
  p.add_argument("--mesh_fsdp", type=int, default=1)
  p.add_argument("--override", nargs="*", default=[], help="config overrides, e.g. model.depth=4")
  a = p.parse_args()
  c = config_lib.load_config(a.config, **{
      k: _parse(v) for k, v in (o.split("=", 1) for o in a.override)})
  c.train.global_batch_size = a.batch
  c.model.dtype = a.dtype
  c.mesh.fsdp = a.mesh_fsdp
  c.data.path = c.data.path or "/unused"
  config_lib.validate(c)
  platform = jax.default_backend()
  model = loading.model_from_config(c, platform)
  mesh = shd.make_mesh(c)
  latent = c.data.name != "digits"
  trainer = train_lib.Trainer(c, model, mesh, latent=latent)
  state = trainer.init_state(0)
  rng = np.random.default_rng(0)
  h, ch = model.input_size, model.in_channels
  if latent:
    batch = {"mean": rng.standard_normal((a.batch, h, h, ch)).astype(np.float32),
             "std": np.full((a.batch, h, h, ch), 0.1, np.float32)}
  else:
    batch = {"image": rng.uniform(-1, 1, (a.batch, h, h, ch)).astype(np.float32)}
  batch["label"] = rng.integers(0, model.num_classes, a.batch).astype(np.int32)
  gbatch = trainer.global_batch(batch)
  t0 = time.perf_counter()
  for _ in range(a.warmup):
    state, m = trainer.step(state, gbatch)
  jax.block_until_ready(m)
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(a.steps):
    state, m = trainer.step(state, gbatch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / a.steps
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  flops = train_lib.train_flops_per_example(model) * a.batch
  tflops = flops / dt / jax.device_count() / 1e12
  peak = train_lib.peak_flops(jax.devices()[0])
  print(f"backend {platform}: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh "
        f"{dict(mesh.shape)}; model {c.model.preset or 'custom'} ({n_params:,} params, "
        f"{model.num_tokens} tokens, dtype {np.dtype(model.dtype).name}); global batch {a.batch}")
  print(f"compile + {a.warmup} warm-up steps: {warm:.1f} s")
  print(f"{1 / dt:.3f} steps/s | {a.batch / dt:.1f} images/s | {a.batch / dt / jax.device_count():.1f}"
        f" images/s/device | {tflops:.3f} TFLOP/s/device (analytic)"
        + (f" | MFU {100 * tflops * 1e12 / peak:.1f}%" if peak and platform != "cpu" else ""))


if __name__ == "__main__":
  main()
