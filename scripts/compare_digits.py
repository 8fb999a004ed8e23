"""DeepFlow vs the plain SiT baseline on the digits default, at equal steps, several seeds.

Trains ``configs/digits.py`` (DeepFlow, 3 branches) and ``configs/digits.py:sit``
(the same width, depth, optimiser, schedule, batches and seeds, no splits) for
each seed, keeping the checkpoints at the evaluation steps, then scores the EMA
weights at each of those steps with the digits evaluator (class accuracy and
Fréchet distance of 1,000 generated digits, the real-vs-real value beside it).

    python scripts/compare_digits.py --out=runs/compare --seeds=0,1,2 --eval_steps=500,1000,1500

Writes ``OUT/results.json`` and prints a markdown table (used in docs/results.md).
Runs that already finished (their final checkpoint exists) are not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from deepflow_jax import sampling
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.evaluation import digits as digits_eval
from deepflow_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir: str, variant: str, seed: int, steps: int, ckpt_every: int, extra: list[str]):
  config = os.path.join(ROOT, "configs", "digits.py") + (":sit" if variant == "sit" else "")
  cmd = [sys.executable, "-m", "deepflow_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.train.seed={seed}", f"--config.train.num_steps={steps}",
         f"--config.train.ckpt_every={ckpt_every}", "--config.train.keep_ckpts=100",
         "--config.train.sample_every=0", "--config.eval.num_samples=0", *extra]
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return time.time() - t0


def evaluate(workdir: str, step: int, sample_overrides: dict) -> dict:
  model, params = loading.load_workdir_ema(workdir, step=step)
  config = workdir_lib.read_config(workdir)
  config.sample.update(sample_overrides)
  metrics, _, _ = digits_eval.sample_and_evaluate(
      model, params, sampling.SamplerSettings.from_config(config.sample),
      num_samples=int(config.eval.num_samples) or 1000, seed=12345, per_device_batch=500,
      cache_path=os.path.join(ROOT, ".cache", "digits_classifier.msgpack"))
  return metrics


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--eval_steps", default="500,1000,1500")
  p.add_argument("--sampler", default="", help="override config.sample.sampler")
  p.add_argument("--num_steps", type=int, default=0, help="override config.sample.num_steps")
  p.add_argument("--extra", default="", help="extra --config overrides, space separated")
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  eval_steps = [int(s) for s in a.eval_steps.split(",")]
  steps = max(eval_steps)
  ckpt_every = int(np.gcd.reduce(eval_steps))
  sample = {}
  if a.sampler:
    sample["sampler"] = a.sampler
  if a.num_steps:
    sample["num_steps"] = a.num_steps
  os.makedirs(a.out, exist_ok=True)
  results_path = os.path.join(a.out, "results.json")
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}
  for variant in ("deepflow", "sit"):
    for seed in seeds:
      wd = os.path.join(a.out, f"{variant}_seed{seed}")
      key = f"{variant}/{seed}"
      if not os.path.isdir(os.path.join(wd, "checkpoints", str(steps))):
        secs = train(wd, variant, seed, steps, ckpt_every, a.extra.split())
        print(f"trained {key} in {secs:.0f} s", flush=True)
      for s in eval_steps:
        if f"{key}/{s}" in results:
          continue
        m = evaluate(wd, s, sample)
        results[f"{key}/{s}"] = m
        print(f"{key} step {s}: class_accuracy {m['class_accuracy']:.4f} frechet_distance "
              f"{m['frechet_distance']:.3f}", flush=True)
        with open(results_path, "w") as f:
          json.dump(results, f, indent=2, sort_keys=True)
  print("\n| model | step | class accuracy (mean ± std over seeds) | Fréchet distance | real vs real |")
  print("| --- | ---: | --- | --- | ---: |")
  for variant in ("deepflow", "sit"):
    for s in eval_steps:
      acc = [results[f"{variant}/{seed}/{s}"]["class_accuracy"] for seed in seeds]
      fd = [results[f"{variant}/{seed}/{s}"]["frechet_distance"] for seed in seeds]
      rr = results[f"{variant}/{seeds[0]}/{s}"]["frechet_distance_real_vs_real"]
      name = "DeepFlow (3 branches)" if variant == "deepflow" else "SiT baseline"
      print(f"| {name} | {s} | {np.mean(acc):.3f} ± {np.std(acc):.3f} "
            f"({', '.join(f'{x:.3f}' for x in acc)}) | {np.mean(fd):.2f} ± {np.std(fd):.2f} "
            f"({', '.join(f'{x:.2f}' for x in fd)}) | {rr:.2f} |")


if __name__ == "__main__":
  main()
