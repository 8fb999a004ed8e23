"""Start-up and restart: seconds from launching ``python -m deepflow_jax.main`` to its first step.

Runs the training job twice in one fresh workdir, exactly as a user would:

1. **first start**: an empty workdir (so an empty ``WORKDIR/.jax_cache``);
   ``train.num_steps=--num_steps`` (3), a checkpoint every ``--ckpt_every`` (1)
   steps; this script SIGKILLs the job as soon as it logs step ``--kill_at`` (2),
   as a preemption without warning would;
2. **restart**: the same command: it resumes from the newest checkpoint the
   first start committed, loads the compiled train step from the persistent
   compilation cache and runs to the end.

Each run's output lines are time-stamped as they arrive; "to first step" is launch
to the first progress line (``train.log_every=1``), which is printed after the
step's metrics reached the host. Phases: ``start`` = launch to the ``devices:``
line (imports, flags, model, data source), ``state`` = to the ``compilation
cache:`` line plus the fresh state or restore (up to the line that follows),
``step`` = the rest (compiling or loading the train step, running it). With
``JAX_LOG_COMPILES=1`` set for the runs, persistent-cache hits are counted too.
Each run's steady throughput (median ``images_per_sec`` of its logged steps after
the first, and MFU, data wait and peak memory where logged) comes from
``metrics.jsonl``; ``--num_steps=60 --kill_at=40 --ckpt_every=30`` makes this a
60-step training run with a preemption in the middle.

    python scripts/bench_startup.py --config=configs/digits.py
    python scripts/bench_startup.py --config=configs/xl3t.py --make_fake=64 \\
        --override model.input_size=8 train.global_batch_size=2

Latent configs need data: ``--make_fake=N`` writes N random examples in the
config's layout (``scripts/bench_data.py``'s writer) into ``WORKDIR_data``, else
pass ``--override data.path=DIR``. ``--init_options`` also times the fresh-state
program in this process with XLA's default options and with
``train.init_compiler_options`` (what ``Trainer`` uses). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def _run(cmd, env, timeout, kill_pattern=None):
  """Runs ``cmd``; returns (returncode, [(seconds since launch, line)], stderr text).

  ``kill_pattern``: SIGKILL the job when a line matches it.
  """
  lines, err = [], []
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=ROOT, bufsize=1)
  reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
  reader.start()
  try:
    for line in p.stdout:
      lines.append((time.perf_counter() - t0, line.rstrip("\n")))
      if kill_pattern is not None and re.search(kill_pattern, line):
        p.kill()
    p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
  reader.join(timeout=10)
  return p.returncode, lines, "".join(err)


def _first(lines, pattern):
  for t, line in lines:
    if re.search(pattern, line):
      return t
  return None


def _phases(lines, first_step_pattern):
  t_dev = _first(lines, r"^devices: ")
  t_cache = _first(lines, r"^compilation cache: ")
  t_step = _first(lines, first_step_pattern)
  after_cache = next((t for t, _ in lines if t_cache is not None and t > t_cache), None)
  return {"to_first_step_s": t_step, "start_s": t_dev,
          "state_s": None if None in (after_cache, t_dev) else after_cache - t_dev,
          "step_s": None if None in (t_step, after_cache) else t_step - after_cache}


def _throughput(metrics_path, skip_lines, first_step, last_step) -> dict:
  """Medians over a run's logged steps in (first_step, last_step] (lines after skip_lines)."""
  if not os.path.exists(metrics_path):
    return {}
  with open(metrics_path) as f:
    rows = [json.loads(l) for l in f.readlines()[skip_lines:] if l.strip()]
  rows = [r for r in rows if first_step < r.get("step", 0) <= last_step]
  out = {}
  for key in ("images_per_sec", "mfu", "tflops_per_device", "data_wait_ms", "peak_memory_gib"):
    vals = [r[key] for r in rows if key in r]
    if vals:
      out[key] = float(max(vals)) if key == "peak_memory_gib" else float(np.median(vals))
  out["logged_steps"] = len(rows)
  return out


def time_init_options(config_path, overrides) -> dict:
  """Fresh-state program: compile + run with XLA defaults and with Trainer's options."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training import step as train_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models import loading  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)  # compile both for real
  c = config_lib.load_config(config_path, **overrides)
  c.data.path = c.data.path or "/unused"
  model = loading.model_from_config(c, jax.default_backend())
  mesh = shd.make_mesh(c)
  out = {}
  for name, opts in (("xla_default", {}), ("trainer", None)):
    t0 = time.perf_counter()
    tr = train_lib.Trainer(c, model, mesh, latent=c.data.name != "digits", init_options=opts)
    t1 = time.perf_counter()
    compiled = tr.jitted_init.lower(jax.random.key_data(jax.random.key(0))).compile()
    t2 = time.perf_counter()
    state = jax.block_until_ready(compiled(jax.random.key_data(jax.random.key(0))))
    t3 = time.perf_counter()
    del state
    out[name] = {"options": tr.init_options, "trainer_s": round(t1 - t0, 2),
                 "compile_s": round(t2 - t1, 2), "run_s": round(t3 - t2, 2)}
    print(f"fresh state, {name} options {tr.init_options}: Trainer() {t1 - t0:.1f} s, compile "
          f"{t2 - t1:.1f} s, run {t3 - t2:.1f} s", flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py"))
  p.add_argument("--override", nargs="*", default=[], help="config overrides KEY=VALUE")
  p.add_argument("--workdir", default="", help="a new directory (default: a temporary one)")
  p.add_argument("--make_fake", type=int, default=0, help="write N random latent examples first")
  p.add_argument("--keep", action="store_true", help="keep the workdir")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
  p.add_argument("--num_steps", type=int, default=3)
  p.add_argument("--kill_at", type=int, default=2, help="the first run SIGKILLs after this step")
  p.add_argument("--ckpt_every", type=int, default=1)
  p.add_argument("--init_options", action="store_true",
                 help="also time the fresh-state program with and without Trainer's options")
  p.add_argument("--init_only", action="store_true",
                 help="only --init_options (no training runs, no data needed)")
  a = p.parse_args(argv)
  from bench_train import _parse  # pylint: disable=g-import-not-at-top
  overrides = dict(o.split("=", 1) for o in a.override)
  if a.init_only:
    summary = {"config": a.config, "overrides": overrides, "init_options": time_init_options(
        a.config, {k: _parse(v) for k, v in overrides.items()})}
    print(json.dumps(summary), flush=True)
    return summary
  workdir = a.workdir or tempfile.mkdtemp(prefix="bench_startup_")
  if a.workdir and os.path.exists(workdir) and os.listdir(workdir):
    raise SystemExit(f"--workdir {workdir}: not empty")
  run_dir = os.path.join(workdir, "run")
  if a.make_fake:
    from bench_data import write_fake_dataset  # pylint: disable=g-import-not-at-top
    from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
    c = config_lib.load_config(a.config, **{k: _parse(v) for k, v in overrides.items()})
    c.data.path = os.path.join(workdir, "data")
    print(f"writing {a.make_fake} fake examples to {write_fake_dataset(c, a.make_fake)}",
          flush=True)
    overrides["data.path"] = c.data.path
  if not 0 < a.kill_at < a.num_steps or a.ckpt_every >= a.kill_at:
    raise SystemExit("need 0 < --kill_at < --num_steps and --ckpt_every < --kill_at")
  flags = {"train.num_steps": str(a.num_steps), "train.ckpt_every": str(a.ckpt_every),
           "train.log_every": "1",
           "train.sample_every": "0", "sample.grid_classes": "0", "eval.num_samples": "0",
           "eval.fid_every": "0", **overrides}
  base = [sys.executable, "-m", "deepflow_jax.main", f"--config={a.config}",
          f"--workdir={run_dir}"] + [f"--config.{k}={v}" for k, v in flags.items()]
  env = dict(os.environ, JAX_LOG_COMPILES="1", PYTHONUNBUFFERED="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own default: WORKDIR/.jax_cache
  results = {}
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  for name, kill, want_rc in (("first_start", rf"^step {a.kill_at}/", -9),
                              ("restart", None, 0)):
    seen = 0
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        seen = sum(1 for _ in f)
    # The restart resumes from the newest checkpoint the killed run committed.
    saved = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    resume = max([int(s) for s in saved if s.isdigit()] or [0])
    pattern, steps = ((r"^step 1/", (1, a.kill_at)) if kill else
                      (rf"^step {resume + 1}/", (resume + 1, a.num_steps)))
    rc, lines, err = _run(base, env, a.timeout, kill_pattern=kill)
    if rc != want_rc:
      print("\n".join(l for _, l in lines[-20:]), err[-3000:], sep="\n")
      raise SystemExit(f"{name}: exit status {rc}, expected {want_rc}")
    r = _phases(lines, pattern)
    r["cache_hits"] = len(re.findall(r"Persistent compilation cache hit", err))
    r["xla_programs"] = len(re.findall(r"Finished XLA compilation", err))  # compiled or loaded
    r["throughput"] = _throughput(metrics_path, seen, *steps)
    results[name] = r
    print(f"{name}: {r['to_first_step_s']:.1f} s to the first step (start {r['start_s']:.1f} s, "
          f"state {r['state_s']:.1f} s, step {r['step_s']:.1f} s; {r['xla_programs']} XLA "
          f"programs, {r['cache_hits']} of them from the persistent cache)", flush=True)
  first, again = results["first_start"]["to_first_step_s"], results["restart"]["to_first_step_s"]
  ratio = again / first
  verdict = "met" if ratio <= 0.5 else "NOT met"
  print(f"restart / first start = {ratio:.2f} (bar: <= 0.5: {verdict})", flush=True)
  summary = {"config": a.config, "overrides": overrides, **results, "ratio": round(ratio, 3),
             "load_average": os.getloadavg()}
  if a.init_options:
    summary["init_options"] = time_init_options(
        a.config, {k: _parse(v) for k, v in overrides.items()})
  if not a.keep and not a.workdir:
    shutil.rmtree(workdir, ignore_errors=True)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  main()
