"""Train-step throughput: steps/s, images/s, TFLOP/s per device and MFU on the present backend.

Builds the jitted, sharded train step exactly as ``python -m deepflow_jax.main`` does
(``deepflow_jax.train.Trainer``) on random latents, excludes compilation and warm-up,
and times ``--steps`` steps.

    python scripts/bench_train.py --config=configs/xl3t.py --batch=256 [--dtype=bfloat16]
        [--mesh_fsdp=1] [--override model.depth=12 ...]

``--ssl`` adds SSL alignment (REPA) and reports what the frozen encoder costs: the
step with alignment (DINOv2 on random uint8 images of ``8 x`` the latent side,
the projectors, the projection loss), the encoder alone (``train.alignment_features``
jitted on the same sharded images: preprocessing + forward), its share of the
step, and the step of the same model without alignment. The encoder is
``--encoder=FILE`` (a DINOv2 checkpoint) or, by default, randomly initialised
weights of ``--encoder_variant`` (vitb14: DINOv2-B/14, the reference's; the cost
does not depend on the values):

    python scripts/bench_train.py --config=configs/xl3t.py --batch=256 --ssl
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
from deepflow_jax.encoders import dinov2
from deepflow_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(value: str):
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def _time(fn, warmup: int, steps: int) -> tuple[float, float]:
  """(seconds of the first ``warmup`` calls, seconds per call after them)."""
  t0 = time.perf_counter()
  for _ in range(warmup):
    out = fn()
  jax.block_until_ready(out)
  warm = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return warm, (time.perf_counter() - t0) / steps


def _encoder_flops(encoder, image_side: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of preprocessing + one DINOv2 forward, one image."""
  d, p, g = encoder.embed_dim, encoder.patch_size, encoder.pos_grid
  s, t = p * g, g * g
  n = t + encoder.num_prefix_tokens
  f = 2 * 3 * (s * image_side * image_side + s * s * image_side)  # the bicubic resize
  f += 2 * t * 3 * p * p * d  # patch embedding
  ffn = 2 * encoder.ffn_hidden if encoder.ffn_layer == "swiglu" else encoder.ffn_hidden
  block = (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d  # attention
           + 2 * n * d * ffn + 2 * n * encoder.ffn_hidden * d)  # FFN
  return float(f + encoder.depth * block)


def _step_timer(trainer, gbatch):
  state = [trainer.init_state(0)]

  def run():
    state[0], m = trainer.step(state[0], gbatch)
    return m
  return run


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "xl3t.py"))
  p.add_argument("--batch", type=int, default=256, help="global batch size")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="auto", help="compute dtype (auto: bf16 on accelerators)")
  p.add_argument("--mesh_fsdp", type=int, default=1)
  p.add_argument("--override", nargs="*", default=[], help="config overrides, e.g. model.depth=4")
  p.add_argument("--ssl", action="store_true",
                 help="SSL alignment: time the step with the frozen encoder, the encoder alone, "
                      "and the step without alignment")
  p.add_argument("--encoder", default="", help="--ssl: a DINOv2 checkpoint file")
  p.add_argument("--encoder_variant", default="vitb14",
                 help="--ssl without --encoder: random weights of this DINOv2 variant")
  p.add_argument("--no_baseline", action="store_true",
                 help="--ssl: skip the step without alignment")
  a = p.parse_args()
  c = config_lib.load_config(a.config, **{
      k: _parse(v) for k, v in (o.split("=", 1) for o in a.override)})
  c.train.global_batch_size = a.batch
  c.model.dtype = a.dtype
  c.mesh.fsdp = a.mesh_fsdp
  c.data.path = c.data.path or "/unused"
  ssl = a.ssl or c.model.ssl_align
  c.model.ssl_align = False  # validated without it: the encoder comes from the flags
  config_lib.validate(c)
  platform = jax.default_backend()
  model = loading.model_from_config(c, platform)
  mesh = shd.make_mesh(c)
  latent = c.data.name != "digits"
  rng = np.random.default_rng(0)
  h, ch = model.input_size, model.in_channels
  if latent:
    batch = {"mean": rng.standard_normal((a.batch, h, h, ch)).astype(np.float32),
             "std": np.full((a.batch, h, h, ch), 0.1, np.float32)}
  else:
    batch = {"image": rng.uniform(-1, 1, (a.batch, h, h, ch)).astype(np.float32)}
  batch["label"] = rng.integers(0, model.num_classes, a.batch).astype(np.int32)
  encoder = enc_params = None
  if ssl:
    if not latent:
      raise SystemExit("--ssl needs a latent config (data.name repa or arrayrecord)")
    grid = train_lib.alignment_grid(model)
    if a.encoder:
      encoder, enc_params = dinov2.load_dinov2(
          a.encoder, grid=grid, num_heads=int(c.model.encoder_num_heads) or None,
          dtype=model.dtype)
    else:
      encoder = dinov2.variant(a.encoder_variant, pos_grid=grid, dtype=model.dtype)
      enc_params = jax.jit(encoder.init)(
          jax.random.key(0), np.zeros((1, 14 * grid, 14 * grid, 3), np.float32))["params"]
    base_model = model
    model = model.clone(ssl_align=True, z_dim=encoder.embed_dim)
    c.model.ssl_align, c.model.z_dim = True, encoder.embed_dim
    res = h * 8  # the SD-VAE's downsampling
    batch["image"] = rng.integers(0, 256, (a.batch, res, res, 3), dtype=np.uint8)
  trainer = train_lib.Trainer(c, model, mesh, latent=latent, encoder=encoder,
                              encoder_params=enc_params)
  gbatch = trainer.global_batch(batch)
  warm, dt = _time(_step_timer(trainer, gbatch), a.warmup, a.steps)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
  flops = train_lib.train_flops_per_example(model) * a.batch
  tflops = flops / dt / jax.device_count() / 1e12
  peak = train_lib.peak_flops(jax.devices()[0])
  print(f"backend {platform}: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh "
        f"{dict(mesh.shape)}; model {c.model.preset or 'custom'} ({n_params:,} params, "
        f"{model.num_tokens} tokens, dtype {np.dtype(model.dtype).name}); global batch {a.batch}")
  print(f"compile + {a.warmup} warm-up steps: {warm:.1f} s")
  print(f"{1 / dt:.3f} steps/s | {a.batch / dt:.1f} images/s | {a.batch / dt / jax.device_count():.1f}"
        f" images/s/device | {tflops:.3f} TFLOP/s/device (analytic, DeepFlow only)"
        + (f" | MFU {100 * tflops * 1e12 / peak:.1f}%" if peak and platform != "cpu" else ""))
  if not ssl:
    return
  feats = jax.jit(lambda p, x: train_lib.alignment_features(encoder, p, x),
                  in_shardings=(shd.replicated(mesh), trainer.batch_shardings["image"]))
  _, enc_dt = _time(lambda: feats(trainer.encoder_params, gbatch["image"]), a.warmup, a.steps)
  print(f"SSL alignment: DINOv2 width {encoder.embed_dim}, depth {encoder.depth}, "
        f"{grid}x{grid} patches of {14 * grid}-pixel inputs from {res}-pixel images")
  enc_flops = _encoder_flops(encoder, res)
  print(f"  analytic: encoder {enc_flops / 1e9:.1f} GFLOP per image (forward), DeepFlow "
        f"{train_lib.train_flops_per_example(model) / 1e9:.1f} GFLOP per image (train step): the "
        f"encoder is {100 * enc_flops / (enc_flops + train_lib.train_flops_per_example(model)):.1f}"
        "% of the step's FLOPs")
  print(f"  step with alignment   {1e3 * dt:9.1f} ms")
  print(f"  encoder alone         {1e3 * enc_dt:9.1f} ms  ({100 * enc_dt / dt:.1f}% of the step; "
        "preprocessing + forward, jitted apart)")
  if not a.no_baseline:
    c.model.ssl_align = False
    plain = train_lib.Trainer(c, base_model, mesh, latent=latent)
    _, base_dt = _time(_step_timer(plain, plain.global_batch(batch)), a.warmup, a.steps)
    print(f"  step without alignment {1e3 * base_dt:8.1f} ms  (alignment adds "
          f"{1e3 * (dt - base_dt):.1f} ms, {100 * (dt - base_dt) / dt:.1f}% of the step: "
          "encoder, projectors, projection loss)")


if __name__ == "__main__":
  main()
