"""Train-step throughput: steps/s, images/s, TFLOP/s per device and MFU on the present backend.

Builds the jitted, sharded train step exactly as ``python -m deepflow_jax.main`` does
(``deepflow_jax.training.step.Trainer``) on random latents, excludes compilation and warm-up,
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

Memory: every run prints XLA's memory analysis of the compiled step (arguments +
outputs - donated aliases + temporaries: the step's device-memory need, on every
backend) and, on accelerators, the allocator's peak after the timed steps.
``--remat=none|block|dots`` sets ``model.remat``. ``--find_max_batch`` times
nothing: it compiles the step (abstract inputs, nothing allocated) at two
per-device batches, fits memory = fixed + per-example x batch, and prints the
largest per-device batch whose estimate fits ``--memory_gb`` (default 80, an
80 GB card; ``--memory_headroom`` is left for the runtime), then with
``--verify`` runs two steps at that batch. ``--profile_dir=DIR`` writes a
``jax.profiler`` trace of three more steps after the timed ones (``DIR/plugins/
profile/*/*.trace.json.gz`` opens in Perfetto):

    python scripts/bench_train.py --config=configs/xl3t.py --find_max_batch --remat=none
    python scripts/bench_train.py --config=configs/xl3t.py:512 --find_max_batch --remat=block

The last line of output is one JSON object with every number printed.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time

import jax
import numpy as np

from deepflow_jax import config_lib
from deepflow_jax import sharding as shd
from deepflow_jax.training import step as train_lib
from deepflow_jax.training import alignment
from deepflow_jax.training import meter
from deepflow_jax.models import dinov2
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


def _step_timer(trainer, gbatch, compiled=None):
  """A no-argument step function on a fresh state (``compiled``: a compiled Trainer step)."""
  state = [trainer.init_state(0)]
  step = trainer.step if compiled is None else (
      lambda st, b: compiled(st, b, trainer.encoder_params))

  def run():
    state[0], m = step(state[0], gbatch)
    return m
  return run


def compile_step(trainer, global_batch: int):
  """The Trainer's jitted step (the very program main runs) compiled for abstract inputs."""
  return trainer.programs(global_batch)["train_step"].lower().compile()


def step_memory_bytes(compiled) -> int:
  """XLA's device-memory need of a compiled step: arguments + outputs - aliases + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return int(max(total, getattr(m, "peak_memory_in_bytes", 0) or 0))


def _batch_arrays(rng, model, latent: bool, n: int) -> dict:
  h, ch = model.input_size, model.in_channels
  if latent:
    batch = {"mean": rng.standard_normal((n, h, h, ch)).astype(np.float32),
             "std": np.full((n, h, h, ch), 0.1, np.float32)}
  else:
    batch = {"image": rng.uniform(-1, 1, (n, h, h, ch)).astype(np.float32)}
  batch["label"] = rng.integers(0, model.num_classes, n).astype(np.int32)
  return batch


def find_max_batch(c, model, mesh, latent: bool, a) -> dict:
  """The largest per-device batch whose compiled step fits ``a.memory_gb`` (a linear fit)."""
  ndev = jax.device_count()
  budget = a.memory_gb * 1e9 - a.memory_headroom * 1e9
  b1, b2 = a.probe_batches
  mem = {}
  for b in (b1, b2):
    c.train.global_batch_size = b * ndev
    trainer = train_lib.Trainer(c, model, mesh, latent=latent)
    t0 = time.perf_counter()
    mem[b] = step_memory_bytes(compile_step(trainer, b * ndev))
    print(f"per-device batch {b}: compiled step needs {mem[b] / 1e9:.2f} GB per device "
          f"(compile {time.perf_counter() - t0:.1f} s)", flush=True)
  per_example = (mem[b2] - mem[b1]) / (b2 - b1)
  fixed = mem[b1] - per_example * b1
  best = int((budget - fixed) // per_example) if per_example > 0 else 0
  best = max(best // a.round_to * a.round_to if best >= a.round_to else best, 0)
  res = {"memory_gb": a.memory_gb, "headroom_gb": a.memory_headroom,
         "probe_gb": {str(b): round(v / 1e9, 3) for b, v in mem.items()},
         "fixed_gb": round(fixed / 1e9, 3), "per_example_gb": round(per_example / 1e9, 4),
         "max_per_device_batch": best, "remat": c.model.remat, "tokens": model.num_tokens}
  print(f"fit: {fixed / 1e9:.2f} GB fixed + {per_example / 1e9:.4f} GB per example -> largest "
        f"per-device batch for {a.memory_gb:g} GB ({a.memory_headroom:g} GB headroom): {best}",
        flush=True)
  if a.verify and best > 0:
    c.train.global_batch_size = best * ndev
    trainer = train_lib.Trainer(c, model, mesh, latent=latent)
    gbatch = trainer.global_batch(_batch_arrays(np.random.default_rng(0), model, latent,
                                                best * ndev))
    try:
      _, dt = _time(_step_timer(trainer, gbatch), 1, 1)
      res.update(verified=True, verify_step_s=round(dt, 3),
                 verify_peak_gb=round((meter.peak_memory_bytes() or 0) / 1e9, 2))
      print(f"verified: 2 steps at per-device batch {best} ran ({dt:.2f} s/step, allocator "
            f"peak {res['verify_peak_gb']} GB)", flush=True)
    except Exception as e:  # pylint: disable=broad-except  # out of memory
      res.update(verified=False, verify_error=str(e).splitlines()[0][:200])
      print(f"verify FAILED at per-device batch {best}: {res['verify_error']}", flush=True)
  return res


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
  p.add_argument("--remat", default=None, choices=("none", "block", "dots"),
                 help="model.remat (default: the config's)")
  p.add_argument("--find_max_batch", action="store_true",
                 help="largest per-device batch that fits --memory_gb (compiles, times nothing)")
  p.add_argument("--memory_gb", type=float, default=80.0, help="--find_max_batch: device GB")
  p.add_argument("--memory_headroom", type=float, default=2.0,
                 help="--find_max_batch: GB left for the runtime (CUDA context, allocator)")
  p.add_argument("--probe_batches", type=int, nargs=2, default=(16, 32),
                 help="--find_max_batch: the two per-device batches compiled for the fit")
  p.add_argument("--round_to", type=int, default=8, help="--find_max_batch: round down to")
  p.add_argument("--profile_dir", default="",
                 help="after timing, a jax.profiler trace (TensorBoard + Perfetto) of 3 steps")
  p.add_argument("--verify", action="store_true",
                 help="--find_max_batch: run two steps at the batch found")
  a = p.parse_args()
  c = config_lib.load_config(a.config, **{
      k: _parse(v) for k, v in (o.split("=", 1) for o in a.override)})
  c.train.global_batch_size = a.batch
  c.model.dtype = a.dtype
  c.mesh.fsdp = a.mesh_fsdp
  c.data.path = c.data.path or "/unused"
  if a.remat is not None:
    c.model.remat = a.remat
  ssl = a.ssl or c.model.ssl_align
  c.model.ssl_align = False  # validated without it: the encoder comes from the flags
  config_lib.validate(c)
  platform = jax.default_backend()
  model = loading.model_from_config(c, platform)
  mesh = shd.make_mesh(c)
  latent = c.data.name != "digits"
  header = {"backend": platform, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "config": a.config,
            "overrides": a.override, "dtype": np.dtype(model.dtype).name,
            "attention_impl": model.attention_impl or "auto", "remat": model.remat,
            "tokens": model.num_tokens}
  if a.find_max_batch:
    print(json.dumps({**header, **find_max_batch(c, model, mesh, latent, a)}), flush=True)
    return
  rng = np.random.default_rng(0)
  h = model.input_size
  batch = _batch_arrays(rng, model, latent, a.batch)
  encoder = enc_params = None
  if ssl:
    if not latent:
      raise SystemExit("--ssl needs a latent config (data.name repa or arrayrecord)")
    grid = alignment.alignment_grid(model)
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
  t0 = time.perf_counter()
  compiled = compile_step(trainer, a.batch)
  compile_s = time.perf_counter() - t0
  need = step_memory_bytes(compiled)
  timer = _step_timer(trainer, gbatch, compiled)
  warm, dt = _time(timer, a.warmup, a.steps)
  device_peak = meter.peak_memory_bytes()
  if a.profile_dir:  # after timing, so the trace does not slow the timed steps
    try:
      with jax.profiler.trace(a.profile_dir, create_perfetto_trace=True):
        for _ in range(3):
          out = timer()
        jax.block_until_ready(out)
      print(f"profile of 3 steps written under {a.profile_dir}", flush=True)
    except Exception as e:  # pylint: disable=broad-except  # no profiler support (CUPTI) here
      print(f"profiling failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
  flops = meter.train_flops_per_example(model) * a.batch
  tflops = flops / dt / jax.device_count() / 1e12
  peak = meter.peak_flops(jax.devices()[0])
  print(f"backend {platform}: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh "
        f"{dict(mesh.shape)}; model {c.model.preset or 'custom'} ({n_params:,} params, "
        f"{model.num_tokens} tokens, dtype {np.dtype(model.dtype).name}); global batch {a.batch}")
  print(f"remat {model.remat}; attention {model.attention_impl or 'auto'}; compile "
        f"{compile_s:.1f} s; init + {a.warmup} warm-up steps: {warm:.1f} s")
  mfu = 100 * tflops * 1e12 / peak if peak and platform != "cpu" else None
  print(f"{1 / dt:.3f} steps/s | {a.batch / dt:.1f} images/s | "
        f"{a.batch / dt / jax.device_count():.1f} images/s/device | {tflops:.3f} TFLOP/s/device "
        "(analytic, DeepFlow only)"
        + (f" | MFU {mfu:.1f}%" if mfu is not None else ""))
  print(f"memory per device: compiled step needs {need / 2**30:.2f} GiB (XLA's analysis)"
        + (f"; allocator peak {device_peak / 2**30:.2f} GiB" if device_peak is not None else
           "; no allocator statistics on this backend"))
  result = {**header, "params": n_params, "global_batch": a.batch, "compile_s": round(compile_s, 2),
            "step_s": round(dt, 5), "steps_per_s": round(1 / dt, 4),
            "images_per_s": round(a.batch / dt, 2), "tflops_per_device": round(tflops, 4),
            "mfu_percent": None if mfu is None else round(mfu, 2),
            "step_memory_gib": round(need / 2**30, 3),
            "peak_memory_gib": None if device_peak is None else round(device_peak / 2**30, 3)}
  if not ssl:
    print(json.dumps(result), flush=True)
    return
  feats = jax.jit(lambda p, x: alignment.alignment_features(encoder, p, x),
                  in_shardings=(shd.replicated(mesh), trainer.batch_shardings["image"]))
  _, enc_dt = _time(lambda: feats(trainer.encoder_params, gbatch["image"]), a.warmup, a.steps)
  print(f"SSL alignment: DINOv2 width {encoder.embed_dim}, depth {encoder.depth}, "
        f"{grid}x{grid} patches of {14 * grid}-pixel inputs from {res}-pixel images")
  enc_flops = _encoder_flops(encoder, res)
  print(f"  analytic: encoder {enc_flops / 1e9:.1f} GFLOP per image (forward), DeepFlow "
        f"{meter.train_flops_per_example(model) / 1e9:.1f} GFLOP per image (train step): the "
        f"encoder is {100 * enc_flops / (enc_flops + meter.train_flops_per_example(model)):.1f}"
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
