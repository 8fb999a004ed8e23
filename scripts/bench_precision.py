"""What bfloat16 sampling changes: the same noise sampled with float32 and bfloat16 compute.

Parameters, the sampler state, drift and noise stay float32 in both cases; only the
network's compute dtype differs (``model.dtype``: matmuls, attention and activations
in bf16, LayerNorm statistics in float32), as ``generate --dtype`` chooses it.
Every sample's starting noise and SDE noise come from (seed, index), so the two
runs see identical random numbers.

* ``--workdir=DIR`` (a finished digits run, e.g. the embedded default): for each
  of ``--seeds``, ``--num_samples`` digits (labels cycling over the classes) with
  the run's own sampler settings, scored by the digits evaluator
  (``evaluation.digits.sample_and_evaluate``): class accuracy and Fréchet distance
  in each dtype, and the relative difference of the samples
  ``||x_bf16 - x_f32|| / ||x_f32||``.
* ``--checkpoint=FILE.pt`` (a reference-layout checkpoint, converted on the fly,
  e.g. ``tests/data/tiny2t.pt``) or ``--preset=NAME`` (random weights, every
  zero-initialised matrix drawn N(0, 0.02) so that every path does real work, as
  ``torch_ref_bench.py`` does): relative difference of the final latents for
  each of ``--samplers`` and ``--cfg_scales``, over ``--num_samples`` samples.

    python scripts/bench_precision.py --workdir=runs/digits --seeds=0,1,2
    python scripts/bench_precision.py --checkpoint=tests/data/tiny2t.pt
    python scripts/bench_precision.py --preset=DeepFlow-XL/2-3T --input_size=32 \\
        --num_samples=64 --samplers=sde:250          # on an accelerator

The last line of output is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from deepflow_jax import sampling
from deepflow_jax import workdir
from deepflow_jax.evaluation import digits as digits_eval
from deepflow_jax.models import loading
from deepflow_jax.models.presets import get_model
# pylint: enable=wrong-import-position


def rel_diff(a, b) -> dict[str, float]:
  """||a - b|| / ||b|| over everything, and the per-sample ratio's median and max."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = (a - b).reshape(len(a), -1)
  r = np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(b.reshape(len(b), -1), axis=1), 1e-30)
  return {"relative_l2": float(np.linalg.norm(d) / np.linalg.norm(b)),
          "per_sample_median": float(np.median(r)), "per_sample_max": float(r.max()),
          "max_abs": float(np.abs(d).max())}


def digits_part(a) -> dict:
  settings = sampling.SamplerSettings.from_config(workdir.read_config(a.workdir).sample)
  cache = os.path.join(a.workdir, "eval", "classifier.msgpack")
  if not os.path.exists(cache):
    cache = None  # trained afresh (seed 0) rather than written into someone's workdir
  models = {d: loading.load_workdir_ema(a.workdir, dtype=d) for d in ("float32", "bfloat16")}
  rows = []
  for seed in a.seeds:
    out = {"seed": seed}
    images = {}
    for dtype, (model, params) in models.items():
      t0 = time.perf_counter()
      m, x, _ = digits_eval.sample_and_evaluate(model, params, settings,
                                                num_samples=a.num_samples, seed=seed,
                                                per_device_batch=a.per_device_batch,
                                                cache_path=cache)
      images[dtype] = x
      out[dtype] = {"class_accuracy": m["class_accuracy"],
                    "frechet_distance": m["frechet_distance"],
                    "seconds": round(time.perf_counter() - t0, 1)}
    out["samples"] = rel_diff(images["bfloat16"], images["float32"])
    rows.append(out)
    print(f"digits seed {seed}: class accuracy f32 {out['float32']['class_accuracy']:.3f} "
          f"bf16 {out['bfloat16']['class_accuracy']:.3f} | Frechet f32 "
          f"{out['float32']['frechet_distance']:.3f} bf16 {out['bfloat16']['frechet_distance']:.3f}"
          f" | samples rel. L2 {out['samples']['relative_l2']:.2e} (per sample median "
          f"{out['samples']['per_sample_median']:.2e}, max {out['samples']['per_sample_max']:.2e})",
          flush=True)

  def stats(dtype, key):
    v = np.array([r[dtype][key] for r in rows])
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

  summary = {k: {d: stats(d, k) for d in models} for k in ("class_accuracy", "frechet_distance")}
  for k in ("class_accuracy", "frechet_distance"):
    diffs = [r["bfloat16"][k] - r["float32"][k] for r in rows]
    summary[k]["bf16_minus_f32"] = {"mean": float(np.mean(diffs)), "values": diffs}
  print(json.dumps({"digits_summary": summary}), flush=True)
  return {"workdir": a.workdir, "sampler": dataclasses.asdict(settings), "num_samples": a.num_samples, "seeds": rows,
          "summary": summary}


def _perturbed_random(model, seed: int):
  """Initialiser weights with every all-zero matrix drawn N(0, 0.02) (all paths active)."""
  params = loading.init_params(model, seed)
  flat = flax.traverse_util.flatten_dict(params)
  key = jax.random.key(seed + 1)
  for i, (k, v) in enumerate(sorted(flat.items())):
    if v.ndim > 1 and not np.any(np.asarray(v)):
      flat[k] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def latents_part(a) -> dict:
  if a.checkpoint:
    from deepflow_jax.models.conversion import load_torch_checkpoint  # pylint: disable=g-import-not-at-top
    model, params = load_torch_checkpoint(a.checkpoint, "ema")
    source = a.checkpoint
  else:
    model = get_model(a.preset, input_size=a.input_size, num_classes=a.num_classes)
    params = _perturbed_random(model, 0)
    source = f"{a.preset} (random, zero matrices drawn N(0, 0.02))"
  n = a.num_samples
  shape = (n, model.input_size, model.input_size, model.in_channels)
  latents = jax.random.normal(jax.random.key(10), shape, jnp.float32)
  labels = jnp.arange(n, dtype=jnp.int32) % model.num_classes
  rows = []
  for spec in a.samplers:
    name, steps = spec.split(":")
    for cfg_scale in a.cfg_scales:
      out = {}
      for dtype in (jnp.float32, jnp.bfloat16):
        m = model.clone(dtype=dtype)
        t0 = time.perf_counter()
        x = sampling.sample(m, params, latents, labels,
                            sampling.SamplerSettings(name, int(steps), cfg_scale=cfg_scale),
                            rng=jax.random.key(11))
        out[np.dtype(dtype).name] = np.asarray(jax.device_get(x))
        out[np.dtype(dtype).name + "_s"] = round(time.perf_counter() - t0, 2)
      r = {"sampler": name, "steps": int(steps), "cfg_scale": cfg_scale,
           **rel_diff(out["bfloat16"], out["float32"]),
           "final_latent_std_f32": float(out["float32"].std()),
           "seconds_f32_incl_compile": out["float32_s"],
           "seconds_bf16_incl_compile": out["bfloat16_s"]}
      rows.append(r)
      print(f"{source}: {name}:{steps} cfg {cfg_scale}: final latents rel. L2 "
            f"{r['relative_l2']:.2e} (per sample median {r['per_sample_median']:.2e}, max "
            f"{r['per_sample_max']:.2e}; max abs {r['max_abs']:.2e}, latent std "
            f"{r['final_latent_std_f32']:.3f})", flush=True)
  return {"source": source, "num_samples": n, "rows": rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="", help="a finished digits training workdir")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--checkpoint", default="", help="a reference-layout .pt checkpoint")
  p.add_argument("--preset", default="", help="random weights of a named preset instead")
  p.add_argument("--input_size", type=int, default=32)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--num_samples", type=int, default=None,
                 help="default 1000 (digits), 64 (latents)")
  p.add_argument("--per_device_batch", type=int, default=500, help="digits sampling batch")
  p.add_argument("--samplers", default="sde:250,euler:50", help="latents: NAME:STEPS,...")
  p.add_argument("--cfg_scales", default="1.0,4.0", help="latents: guidance scales")
  a = p.parse_args(argv)
  if not (a.workdir or a.checkpoint or a.preset):
    p.error("give --workdir, --checkpoint or --preset")
  a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  a.samplers = [s for s in a.samplers.split(",") if s.strip()]
  a.cfg_scales = [float(s) for s in a.cfg_scales.split(",") if s.strip()]
  result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}
  if a.workdir:
    a_d = argparse.Namespace(**vars(a))
    a_d.num_samples = a.num_samples or 1000
    result["digits"] = digits_part(a_d)
  if a.checkpoint or a.preset:
    a_l = argparse.Namespace(**vars(a))
    a_l.num_samples = a.num_samples or 64
    result["latents"] = latents_part(a_l)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
