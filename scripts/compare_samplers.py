"""Few-step samplers on a trained digits workdir: sample quality against network evaluations.

    python scripts/compare_samplers.py --workdir=W --nfe=4,8,16,32 [--samplers=ab2,heun,...]
        [--grids=uniform,shifted,poly] [--grid_shift=3] [--grid_rho=2] [--seeds=0,1,2]
        [--num_samples=1000] [--json] [--plot=docs/results_samplers.png] [--probe_accel]

For every sampler, grid and evaluation budget it draws ``--num_samples`` digits
(labels cycling over the classes) from the workdir's newest EMA weights and scores
them with the digits evaluator (``deepflow_jax.evaluation.digits``: class accuracy
and Fréchet distance of the classifier's features to the held-out real digits).
Every sampler sees the same labels and the same starting noise for a given seed:
sample ``i`` of seed ``s`` starts from ``sampling.sample_inputs(model, s, i)``,
exactly what ``sample_and_evaluate`` / ``sample_many`` / ``generate`` use (the SDE's
per-step noise too), so rows differ only by the sampler.

Budgets count network evaluations honestly (``sampling.num_evaluations``): a
budget of B runs ``sampling.steps_for_evaluations(sampler, B)`` steps, i.e. B steps
for every one-evaluation-per-step sampler and ``(B + 1) // 2`` steps (``B - 1``
evaluations when B is even) for Heun, whose last step has no corrector; the
``nfe`` column is the count actually spent. The 250-step SDE on the reference grid
is always run as the reference row.

Each finished (sampler, grid, steps, seed) is stored in ``--results`` (default
``W/compare_samplers.json``), so an interrupted run continues where it stopped.
Prints a markdown table (mean ± std over seeds, std with ddof=0); with ``--json``
the last stdout line is a JSON list of ``{sampler, grid, grid_param, num_steps,
nfe, class_accuracy, frechet_distance, class_accuracy_std, frechet_distance_std,
seeds}`` (means over seeds), the reference row first. ``--plot`` draws the
curves (Fréchet distance against NFE, one panel per grid) into a small PNG with
PIL. ``--probe_accel`` prints what the acceleration heads add to the data
prediction on real held-out digits (docs/sampling.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepflow_jax import sampling
from deepflow_jax.data import digits as digits_lib
from deepflow_jax.evaluation import digits as digits_eval
from deepflow_jax.models import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = ("sde", "reference", None, 250)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def grid_specs(grids: list[str], shifts: list[float], rhos: list[float]):
  """[(grid, param)]: one entry per grid, or per value of its parameter."""
  out = []
  for g in grids:
    if g == "shifted":
      out += [(g, s) for s in shifts]
    elif g == "poly":
      out += [(g, r) for r in rhos]
    else:
      out.append((g, None))
  return out


def settings_of(sampler: str, steps: int, grid: str, param) -> sampling.SamplerSettings:
  kw = {"grid_shift": float(param)} if grid == "shifted" else (
      {"grid_rho": float(param)} if grid == "poly" else {})
  return sampling.SamplerSettings(sampler, steps, grid, **kw)


def grid_label(grid: str, param) -> str:
  return grid if param is None else f"{grid} ({'s' if grid == 'shifted' else 'rho'}={param:g})"


class Evaluator:
  """Draws and scores digits; the classifier is trained (or read from its cache) once."""

  def __init__(self, model, params, num_samples: int):
    self.model, self.params, self.n = model, params, int(num_samples)
    size = model.input_size
    cache = os.path.join(ROOT, ".cache", "digits_classifier.msgpack")
    self.clf, self.clf_params = digits_eval.train_classifier(size, 0, cache_path=cache)
    (self.train_x, _), (self.heldout_x, self.heldout_y) = digits_lib.load_digits_split(size)
    self.inputs = {}

  def _inputs(self, seed: int):
    if seed not in self.inputs:
      self.inputs[seed] = sampling.sample_inputs(self.model, seed, jnp.arange(self.n), "cycle")
    return self.inputs[seed]

  def run(self, sampler: str, grid: str, param, steps: int, seed: int) -> dict:
    latents, labels, keys = self._inputs(seed)
    t0 = time.perf_counter()
    x = sampling.sample(self.model, self.params, latents, labels,
                        settings_of(sampler, steps, grid, param),
                        rng=keys if sampler == "sde" else None)
    x = np.asarray(x)
    seconds = time.perf_counter() - t0
    m = digits_eval.evaluate_generated(np.clip(x, -1, 1), np.asarray(labels), self.heldout_x,
                                       model=self.clf, params=self.clf_params,
                                       train_images=self.train_x)
    m["seconds"] = round(seconds, 2)  # includes the compilation on a config's first seed
    return m


def key_of(sampler, grid, param, steps, seed, n) -> str:
  return f"{sampler}|{grid}|{'' if param is None else float(param)}|{steps}|{seed}|{n}"


def aggregate(results: dict, configs, seeds, n) -> list[dict]:
  rows = []
  for sampler, grid, param, steps in configs:
    ms = [results[key_of(sampler, grid, param, steps, s, n)] for s in seeds]
    acc = np.array([m["class_accuracy"] for m in ms])
    fd = np.array([m["frechet_distance"] for m in ms])
    rows.append({
        "sampler": sampler, "grid": grid, "grid_param": param, "num_steps": steps,
        "nfe": sampling.num_evaluations(sampler, steps),
        "class_accuracy": round(float(acc.mean()), 4),
        "frechet_distance": round(float(fd.mean()), 4),
        "class_accuracy_std": round(float(acc.std()), 4),
        "frechet_distance_std": round(float(fd.std()), 4),
        "seeds": list(seeds),
        "frechet_distance_per_seed": [round(float(v), 4) for v in fd],
        "frechet_distance_real_vs_real": round(float(ms[0]["frechet_distance_real_vs_real"]), 4),
    })
  return rows


def print_table(rows: list[dict]) -> None:
  ref = rows[0]
  print(f"\nreference: sde, reference grid, 250 steps: class accuracy {ref['class_accuracy']:.3f} "
        f"± {ref['class_accuracy_std']:.3f}, Fréchet distance {ref['frechet_distance']:.2f} ± "
        f"{ref['frechet_distance_std']:.2f} (real vs real "
        f"{ref['frechet_distance_real_vs_real']:.2f})\n")
  print("| sampler | grid | steps | NFE | class accuracy | Fréchet distance | FD / FD(SDE 250) |")
  print("| --- | --- | ---: | ---: | --- | --- | ---: |")
  for r in rows:
    print(f"| {r['sampler']} | {grid_label(r['grid'], r['grid_param'])} | {r['num_steps']} | "
          f"{r['nfe']} | {r['class_accuracy']:.3f} ± {r['class_accuracy_std']:.3f} | "
          f"{r['frechet_distance']:.2f} ± {r['frechet_distance_std']:.2f} | "
          f"{r['frechet_distance'] / ref['frechet_distance']:.2f} |")
  cheap = [r for r in rows[1:] if r["nfe"] <= 16]
  if cheap:
    best = min(cheap, key=lambda r: r["frechet_distance"])
    ratio = best["frechet_distance"] / ref["frechet_distance"]
    print(f"\nbest at <= 16 NFE: {best['sampler']} on {grid_label(best['grid'], best['grid_param'])}"
          f", {best['nfe']} NFE: Fréchet distance {best['frechet_distance']:.2f} = "
          f"{100 * (ratio - 1):+.1f}% vs the 250-step SDE (bar: within +15%: "
          f"{'met' if ratio <= 1.15 else 'NOT met'})")
  accel = [r for r in rows[1:] if "accel" in r["sampler"] and r["nfe"] <= 16]
  for r in sorted(accel, key=lambda r: r["frechet_distance"])[:3]:
    print(f"acceleration-aware: {r['sampler']} on {grid_label(r['grid'], r['grid_param'])}, "
          f"{r['nfe']} NFE: Fréchet distance {r['frechet_distance']:.2f} "
          f"({r['frechet_distance'] / ref['frechet_distance']:.2f}x the 250-step SDE)")


COLORS = {"sde": (0, 0, 0), "euler": (150, 150, 150), "heun": (31, 119, 180),
          "ab2": (255, 127, 14), "ab3": (44, 160, 44), "dpm2m": (214, 39, 40),
          "accel": (148, 103, 189), "accel-own": (140, 86, 75), "accel-ab2": (227, 119, 194)}


def plot(rows: list[dict], path: str) -> None:
  """FD against NFE (log-log), one panel per grid, the 250-step SDE as a band; PIL only."""
  ref = rows[0]
  grids = []
  for r in rows[1:]:
    g = (r["grid"], r["grid_param"])
    if g not in grids:
      grids.append(g)
  pw, ph, top, left, bottom = 300, 250, 22, 34, 26
  width, height = pw * len(grids) + 150, ph + top + bottom
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  nfes = sorted({r["nfe"] for r in rows[1:]})
  fds = [r["frechet_distance"] for r in rows]
  lo, hi = math.log(min(fds) * 0.9), math.log(min(max(fds), 20 * ref["frechet_distance"]) * 1.1)
  xlo, xhi = math.log2(min(nfes)) - 0.2, math.log2(max(nfes)) + 0.2

  def xy(panel, nfe, fd):
    x0 = panel * pw + left
    x = x0 + (math.log2(nfe) - xlo) / (xhi - xlo) * (pw - left - 8)
    y = top + (hi - math.log(min(max(fd, 1e-9), math.exp(hi)))) / (hi - lo) * ph
    return x, y

  for p, (g, param) in enumerate(grids):
    x0 = p * pw + left
    d.rectangle([x0, top, x0 + pw - left - 8, top + ph], outline=(0, 0, 0))
    d.text((x0 + 4, 4), grid_label(g, param) + " grid", fill=(0, 0, 0), font=font)
    ya = xy(p, 4, ref["frechet_distance"] + ref["frechet_distance_std"])[1]
    yb = xy(p, 4, max(ref["frechet_distance"] - ref["frechet_distance_std"], 1e-9))[1]
    d.rectangle([x0 + 1, ya, x0 + pw - left - 9, yb], fill=(225, 225, 225))
    yr = xy(p, 4, ref["frechet_distance"])[1]
    d.line([x0, yr, x0 + pw - left - 8, yr], fill=(0, 0, 0), width=1)
    y15 = xy(p, 4, 1.15 * ref["frechet_distance"])[1]
    for xx in range(int(x0), int(x0 + pw - left - 8), 6):
      d.line([xx, y15, xx + 2, y15], fill=(0, 0, 0))
    for n in nfes:
      x, _ = xy(p, n, 1)
      d.line([x, top + ph, x, top + ph + 3], fill=(0, 0, 0))
      d.text((x - 6, top + ph + 5), str(n), fill=(0, 0, 0), font=font)
    if p == 0:
      for v in (2, 5, 10, 20, 50, 100, 200):
        if lo <= math.log(v) <= hi:
          y = xy(0, 4, v)[1]
          d.line([x0 - 3, y, x0, y], fill=(0, 0, 0))
          d.text((x0 - 22, y - 5), str(v), fill=(0, 0, 0), font=font)
    for sampler, color in COLORS.items():
      pts = sorted((r["nfe"], r["frechet_distance"]) for r in rows[1:]
                   if r["sampler"] == sampler and (r["grid"], r["grid_param"]) == (g, param))
      xys = [xy(p, n, fd) for n, fd in pts]
      if len(xys) > 1:
        d.line(xys, fill=color, width=2)
      for x, y in xys:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
  d.text((left, height - 12), "network evaluations (NFE); Fréchet distance, log scale; band: "
         "250-step SDE ± std, dashed: +15%", fill=(0, 0, 0), font=font)
  lx = pw * len(grids) + 4
  for i, (sampler, color) in enumerate(COLORS.items()):
    d.line([lx, top + 8 + 14 * i, lx + 16, top + 8 + 14 * i], fill=color, width=3)
    d.text((lx + 20, top + 2 + 14 * i), sampler, fill=(0, 0, 0), font=font)
  img = img.convert("P", palette=Image.ADAPTIVE, colors=32)
  img.save(path, optimize=True)


def probe_accel(model, params, n: int = 350, seed: int = 0) -> None:
  """What the acceleration heads add: error of data predictions on held-out digits, per t.

  At time t with every branch at t (time gap 0, as the samplers), the
  one-jump prediction of the data from branch j is ``x_t - t v_j`` and with
  its acceleration ``x_t - t v_j + t^2 a_j / 2`` (what the loss trains towards
  x0). Prints mean squared errors against the true x0, the RMS of ``a_0`` and
  the cosine between ``a_j`` and ``2 (v_j - v_final) / t`` (the correction that
  would make branch j's jump as good as the final branch's).
  """
  _, (heldout_x, heldout_y) = digits_lib.load_digits_split(model.input_size)
  x0 = jnp.asarray(heldout_x[:n])
  y = jnp.asarray(heldout_y[:n])
  eps = jax.random.normal(jax.random.key(seed), x0.shape)
  heads = jax.jit(lambda xt, t: model.apply({"params": params}, xt, jnp.full((n,), t), y,
                                            method=model.velocity_and_acceleration))
  k = model.num_branches
  cols = ([f"v{j}" for j in range(k)] + [f"v{j}+a{j}" for j in range(k - 1)]
          + [f"v{k - 1}+a0"])
  print("\n| t | " + " | ".join(f"MSE {c}" for c in cols) + " | RMS a0 | RMS 2(v0-v_final)/t | "
        + " | ".join(f"cos(a{j}, 2(v{j}-v_final)/t)" for j in range(k - 1)) + " |")
  print("| ---: |" + " ---: |" * (len(cols) + 2 + k - 1))
  for t in (0.95, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05):
    xt = (1 - t) * x0 + t * eps
    vs, accs = heads(xt, t)
    mse = lambda p: float(jnp.mean((p - x0)**2))  # pylint: disable=cell-var-from-loop
    vals = [mse(xt - t * v) for v in vs]
    vals += [mse(xt - t * vs[j] + t * t / 2 * accs[j]) for j in range(k - 1)]
    vals.append(mse(xt - t * vs[-1] + t * t / 2 * accs[0]))
    ideal = [2 * (vs[j] - vs[-1]) / t for j in range(k - 1)]
    cos = [float(jnp.sum(a * b) / jnp.sqrt(jnp.sum(a * a) * jnp.sum(b * b)))
           for a, b in zip(accs, ideal)]
    rms = lambda a: float(jnp.sqrt(jnp.mean(a * a)))
    print(f"| {t} | " + " | ".join(f"{v:.4f}" for v in vals)
          + f" | {rms(accs[0]):.3f} | {rms(ideal[0]):.3f} | "
          + " | ".join(f"{c:.2f}" for c in cos) + " |")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a digits training workdir (its EMA weights)")
  p.add_argument("--nfe", default="4,8,16,32", help="evaluation budgets per sample")
  p.add_argument("--samplers", default=",".join(sampling.SAMPLERS))
  p.add_argument("--grids", default="uniform,shifted,poly",
                 help=f"any of {', '.join(sampling.GRIDS)}")
  p.add_argument("--grid_shift", default=str(sampling.DEFAULT_GRID_SHIFT),
                 help="s of the shifted grid (comma list: one grid per value)")
  p.add_argument("--grid_rho", default=str(sampling.DEFAULT_GRID_RHO),
                 help="rho of the poly grid (comma list: one grid per value)")
  p.add_argument("--sde_reference_grid", type=int, default=1,
                 help="1: also run sde on its reference grid at every budget")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--num_samples", type=int, default=1000)
  p.add_argument("--results", default="", help="cache of finished runs (default W/compare_samplers.json)")
  p.add_argument("--json", action="store_true", help="last stdout line: the rows as JSON")
  p.add_argument("--plot", default="", help="write the curves to this PNG")
  p.add_argument("--probe_accel", action="store_true",
                 help="only print the acceleration-head probe (docs/sampling.md)")
  a = p.parse_args()

  model, params = loading.load_workdir_ema(a.workdir)
  if a.probe_accel:
    probe_accel(model, params)
    return
  seeds = [int(s) for s in a.seeds.split(",")]
  budgets = [int(b) for b in a.nfe.split(",")]
  samplers = [s for s in a.samplers.split(",") if s]
  for s in samplers:
    if s not in sampling.SAMPLERS:
      p.error(f"--samplers: unknown sampler {s!r}; choose from {', '.join(sampling.SAMPLERS)}")
  skipped = [s for s in samplers if sampling.accel_problems(model, s)]
  if skipped:
    log(f"skipping {', '.join(skipped)}: the model has no acceleration heads (no splits)")
    samplers = [s for s in samplers if s not in skipped]
  specs = grid_specs(a.grids.split(","), [float(v) for v in a.grid_shift.split(",")],
                     [float(v) for v in a.grid_rho.split(",")])
  configs = [REFERENCE]
  for sampler in samplers:
    sg = specs + ([("reference", None)] if sampler == "sde" and a.sde_reference_grid
                  and ("reference", None) not in specs else [])
    for grid, param in sg:
      for b in budgets:
        c = (sampler, grid, param, sampling.steps_for_evaluations(sampler, b))
        if c not in configs:
          configs.append(c)
  path = a.results or os.path.join(a.workdir, "compare_samplers.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  ev = Evaluator(model, params, a.num_samples)
  todo = [(c, s) for c in configs for s in seeds
          if key_of(*c, s, a.num_samples) not in results]
  log(f"{len(configs)} configurations x {len(seeds)} seeds: {len(todo)} runs to do "
      f"({len(configs) * len(seeds) - len(todo)} cached in {path})")
  t_all = time.perf_counter()
  for i, ((sampler, grid, param, steps), seed) in enumerate(todo):
    m = ev.run(sampler, grid, param, steps, seed)
    results[key_of(sampler, grid, param, steps, seed, a.num_samples)] = m
    log(f"[{i + 1}/{len(todo)}] {sampler} {grid_label(grid, param)} {steps} steps seed {seed}: "
        f"acc {m['class_accuracy']:.3f} FD {m['frechet_distance']:.2f} ({m['seconds']:.0f} s; "
        f"{time.perf_counter() - t_all:.0f} s so far)")
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  rows = aggregate(results, configs, seeds, a.num_samples)
  print_table(rows)
  if a.plot:
    plot(rows, a.plot)
    log(f"wrote {a.plot}")
  if a.json:
    keys = ("sampler", "grid", "grid_param", "num_steps", "nfe", "class_accuracy",
            "frechet_distance", "class_accuracy_std", "frechet_distance_std", "seeds")
    print(json.dumps([{k: r[k] for k in keys} for r in rows]))


if __name__ == "__main__":
  main()
