"""Images/s of the jitted FID Inception feature extractor on the present backend.

Times ``deepflow_jax.models.inception.make_feature_fn`` (ADM preprocessing:
TF1 bilinear resize to 299, then the network; outputs pool 2048, spatial 2023,
logits and probs) on uint8 NHWC images, batch-sharded over every device of a
``("data",)`` mesh with the parameters replicated, for each per-device batch
size. The images are on the devices before timing; compilation and ``--warmup``
runs are excluded. Weights are random unless ``--weights`` names the real file
(the speed does not depend on the values).

    python scripts/bench_inception.py                          # CPU: batches 4, 16
    python scripts/bench_inception.py --per_device_batch=64,256 --iters=10   # GPU/TPU

Prints one line per batch size, a table, and a last line of JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from deepflow_jax.models import inception as inc  # pylint: disable=wrong-import-position
from deepflow_jax.sharding import data_mesh  # pylint: disable=wrong-import-position

GFLOP_PER_IMAGE = 11.0  # network at 299x299: 5.5 G multiply-adds (XLA cost analysis: 10.99 GFLOP)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--per_device_batch", default="4,16", help="comma list of per-device batches")
  p.add_argument("--image_size", type=int, default=256, help="input images are S x S x 3 uint8")
  p.add_argument("--preprocessing", default="adm", choices=("adm", "pytorch_fid"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--precision", default="highest", choices=("highest", "default"),
                 help="conv/matmul precision (highest: float32-exact; default: TF32/bf16 passes)")
  p.add_argument("--weights", default=None, help="pt_inception-*.pth or .pb (default: random)")
  p.add_argument("--iters", type=int, default=3, help="timed runs per batch size")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
  return p.parse_args(argv)


def _random_params(seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in inc.expected_state_dict_shapes().items():
    if key.endswith("running_var"):
      sd[key] = (0.5 + rng.random(shape)).astype(np.float32)
    elif key.endswith(("conv.weight", "fc.weight")):
      fan_in = int(np.prod(shape[1:]))
      sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return inc.params_from_state_dict(sd, "random")


def main(argv=None):
  a = _parse(argv)
  precision = None if a.precision == "default" else a.precision
  if a.weights:
    model, params = inc.load_fid_inception(a.weights, preprocessing=a.preprocessing,
                                           dtype=a.dtype, precision=precision)
  else:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    model = inc.FIDInception(preprocessing=a.preprocessing, dtype=dtype, precision=precision)
    params = _random_params()
  devices = jax.devices()
  mesh = data_mesh(devices)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  fn = inc.make_feature_fn(model, mesh)
  rng = np.random.default_rng(1)

  results = []
  for per_device in [int(b) for b in a.per_device_batch.split(",") if b.strip()]:
    n = per_device * len(devices)
    images = rng.integers(0, 256, (n, a.image_size, a.image_size, 3), dtype=np.uint8)
    images = jax.device_put(images, NamedSharding(mesh, P("data")))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(params, images))  # compile + one run
    first_s = time.perf_counter() - t0
    for _ in range(a.warmup):
      jax.block_until_ready(fn(params, images))
    t0 = time.perf_counter()
    for _ in range(a.iters):
      out = fn(params, images)
    jax.block_until_ready(out)
    per_run = (time.perf_counter() - t0) / a.iters
    r = {"per_device_batch": per_device, "batch": n, "devices": len(devices),
         "seconds_per_batch": round(per_run, 4), "images_per_s": round(n / per_run, 2),
         "images_per_s_per_device": round(n / per_run / len(devices), 2),
         "tflops_per_device": round(n * GFLOP_PER_IMAGE / per_run / len(devices) / 1e3, 3),
         "first_call_s (compile+run)": round(first_s, 2),
         "finite": bool(np.isfinite(np.asarray(out["pool"])).all())}
    results.append(r)
    print(json.dumps(r), flush=True)

  print(f"\n{'per-device batch':>16} {'batch':>6} {'s/batch':>9} {'images/s':>10} "
        f"{'images/s/dev':>12} {'TFLOP/s/dev':>11}")
  for r in results:
    print(f"{r['per_device_batch']:>16} {r['batch']:>6} {r['seconds_per_batch']:>9.3f} "
          f"{r['images_per_s']:>10.2f} {r['images_per_s_per_device']:>12.2f} "
          f"{r['tflops_per_device']:>11.3f}")
  summary = {
      "benchmark": "fid_inception_features", "image_size": a.image_size,
      "preprocessing": a.preprocessing, "dtype": a.dtype, "precision": a.precision,
      "weights": a.weights or "random", "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind, "devices": len(devices),
      "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "results": results,
  }
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
