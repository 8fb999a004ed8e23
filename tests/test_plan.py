"""python -m deepflow_jax.plan: main's programs compiled for Cloud TPU topologies, on this CPU.

libtpu (the ``tpu`` extra) compiles for a topology's compile-only devices; a tiny
DeepFlow keeps each compilation to seconds. Memory numbers are XLA's, so the
tests check their relations (state bytes against the parameter count, the
verdict against a given HBM), never exact temporaries.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cpu_env

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")

from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from deepflow_jax import planning  # pylint: disable=g-import-not-at-top,wrong-import-position

DIGITS = os.path.join(ROOT, "configs", "digits.py")
TINY = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.df_idxs": (1,),
        "model.projector_dim": 32, "loss.scale_weight": (0.2, 1.0), "sample.num_steps": 4}
TINY_FLAGS = [f"--config.{k}={v}".replace(" ", "") for k, v in TINY.items()]
# A chip with 64 MiB of HBM: the tiny model's step needs ~25 MB per chip at a per-chip
# batch of 4 and ~27 MB at 384 (XLA's fixed scratch dominates), ~207 MB at 1,024.
SMALL_HBM = 64 * 2**20
BIG_BATCH = 1024
# State per parameter: float32 params, EMA, Adam mu and nu; plus the int32 step, the
# uint32[2] RNG key, two int32 counts (Adam's and the learning-rate schedule's) and the
# health counters skipped_steps and skip_streak (int32 each).
STATE_BYTES_PER_PARAM, STATE_EXTRA = 16, 28


def _plan_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "deepflow_jax.plan", *args],
                        capture_output=True, text=True, env=env or cpu_env(), timeout=600,
                        cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_config():
  return config_lib.load_config(DIGITS, **TINY)


@pytest.fixture(scope="module")
def single_host(tiny_config):
  """v5e:2x2 (one host, 4 chips) with a 64 MiB HBM, per-chip batch 4, sampling step too."""
  topo = planning.with_hbm(planning.tpu_topology("v5e:2x2"), SMALL_HBM)
  return topo, planning.plan(tiny_config, topo, 4, sample_batch=2, init=False)


def test_single_host_plan_fits_and_counts_the_state(single_host):
  _, r = single_host
  assert (r["chips"], r["hosts"], r["devices_per_chip"]) == (4, 1, 1)
  assert r["mesh"] == {"data": 4, "fsdp": 1}
  assert r["fits"] and r["bytes_per_chip"] <= r["hbm_bytes_per_chip"] == SMALL_HBM
  # Data parallel: every chip holds the whole state.
  assert r["state_bytes_per_chip"] == STATE_BYTES_PER_PARAM * r["params"] + STATE_EXTRA
  assert r["bytes_per_chip"] >= r["state_bytes_per_chip"] + r["temp_bytes_per_chip"]
  # XLA counts element-wise work the analytic count leaves out, and no more than
  # that (2x is generous for a 32-wide model whose norms and softmax weigh more).
  assert 1.0 <= r["xla_over_analytic"] < 2.0
  assert r["step_time_lower_bound_s"] > 0 and r["images_per_s_at_mfu"] > 0
  assert r["sample"]["fits"] and r["sample"]["analytic_flops_per_chip"] > 0


def test_fits_flips_with_the_batch(single_host, tiny_config):
  topo, small = single_host
  big = planning.plan(tiny_config, topo, BIG_BATCH, init=False)
  assert small["fits"] and not big["fits"], (small["bytes_per_chip"], big["bytes_per_chip"])
  assert big["bytes_per_chip"] > SMALL_HBM > small["bytes_per_chip"]


@pytest.mark.parametrize("shape", ["linear", "flat", "convex"])
@pytest.mark.parametrize("edge", [8, 56, 184, 1000])
def test_find_max_batch_is_the_edge_of_what_fits(monkeypatch, tiny_config, shape, edge):
  """The search alone, on a stand-in for the compiler (a compile is tens of seconds; the
  verdict's flip on real compiles is test_fits_flips_with_the_batch). Bytes grow with the
  batch as a linear fit predicts, stay flat until the edge (XLA's TPU auto-remat: the fit
  overshoots), or grow slower at first (the fit undershoots: doubling). The batch found is
  the largest multiple of 8 at or below the edge; every verdict agrees with it."""
  hbm = 16 * 2**30
  bytes_at = {"linear": lambda b: 10 * 2**30 + b * (hbm - 10 * 2**30) / (edge + 4),
              "flat": lambda b: 15 * 2**30,
              "convex": lambda b: 10 * 2**30 + (hbm - 10 * 2**30) * (b / (edge + 4)) ** 2}[shape]

  def fake_plan(config, topo, b, init=True, **kw):
    del config, topo, init, kw
    r = {"per_chip_batch": b, "fits": b <= edge, "bytes_per_chip": int(bytes_at(b)),
         "hbm_bytes_per_chip": hbm, "compile_s": 0.0}
    if b > edge:
      r.update(compile_error="RESOURCE_EXHAUSTED", bytes_per_chip=2 * hbm)
    return r

  monkeypatch.setattr(planning, "plan", fake_plan)
  topo = planning.tpu_topology("v5e:2x2")
  # start: None (probes and a linear fit), at the edge (two compiles), far below or above it.
  for start in (None, edge // 8 * 8, 8, 4 * edge + 8):
    best, runs = planning.find_max_batch(tiny_config, topo, start=start, multiple=8,
                                         log=lambda m: None)
    verdicts = [(r["per_chip_batch"], r["fits"]) for r in runs]
    assert best["per_chip_batch"] == edge // 8 * 8 and best["fits"], (start, verdicts)
    assert all(f == (b <= edge) for b, f in verdicts)
    assert (edge // 8 * 8 + 8, False) in verdicts
    assert len(runs) == len(set(b for b, _ in verdicts)) <= 4 + 2 * int(np.log2(edge)), verdicts
    if start == edge // 8 * 8:
      assert [b for b, _ in verdicts] == [start, start + 8], verdicts


def test_multi_host_cli_json_and_fsdp_state(tiny_config):
  """v5e:4x4 (4 hosts of 4 chips), fsdp=2, run as the command (JSON last line)."""
  r = _plan_cli(f"--config={DIGITS}", *TINY_FLAGS, "--topology=v5e:4x4", "--config.mesh.fsdp=2",
                "--per_chip_batch=2", "--sample_batch=0", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("topology", "chips", "hosts", "mesh", "per_chip_batch", "fits",
              "hbm_bytes_per_chip", "bytes_per_chip", "state_bytes_per_chip",
              "flops_per_chip_step", "compile_s"):
    assert key in out, key
  assert (out["topology"], out["chips"], out["hosts"]) == ("v5e:4x4", 16, 4)
  assert out["mesh"] == {"data": 8, "fsdp": 2} and out["per_chip_batch"] == 2
  assert out["fits"] and out["init_fits"]
  # What the parameter count implies for fsdp=2: each parameter array (x4 copies) is
  # split in two where the rules shard it and a dimension divides, else replicated.
  config = config_lib.with_mesh_fsdp(tiny_config, 2)
  topo = planning.tpu_topology("v5e:4x4")
  trainer = planning.build_trainer(config, planning.topology_mesh(config, topo))
  params = trainer.abstract_state.params
  import jax  # pylint: disable=g-import-not-at-top
  split = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)
              if p.sharding.shard_shape(p.shape) != p.shape)
  whole = out["params"] - split
  assert split > whole  # the matrices are split
  assert out["state_bytes_per_chip"] == (STATE_BYTES_PER_PARAM * (split // 2 + whole)
                                         + STATE_EXTRA)


@pytest.mark.parametrize("args,needle", [
    (["--topology=v9z:2x2"], "unknown TPU generation"),
    (["--topology=v5e:3x3"], "libtpu refuses it"),
    (["--topology=v5e-8"], "expected GENERATION:AxB"),
    (["--topology=v5e:2x2", "--per_chip_batch=0"], "per-chip batch 0: must be a positive"),
    (["--topology=v5e:2x2", "--per_chip_batch=x"], "per_chip_batch"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
  r = _plan_cli(f"--config={DIGITS}", *args)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
  assert not r.stdout.strip()


def test_missing_libtpu_is_one_line_and_exit_2():
  code = ("import sys, runpy; sys.modules['libtpu'] = None; "  # find_spec('libtpu') -> None
          "sys.argv = ['plan'] + sys.argv[1:]; "
          "runpy.run_module('deepflow_jax.plan', run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", code, f"--config={DIGITS}", "--topology=v5e:2x2"],
                     capture_output=True, text=True, env=cpu_env(), timeout=120, cwd=ROOT)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "libtpu is not installed" in errors[0], r.stderr


def test_auto_fsdp_is_the_smallest_that_fits(tiny_config):
  from deepflow_jax.training import fit  # pylint: disable=g-import-not-at-top
  tried = []

  def fits(c):
    tried.append(int(c.mesh.fsdp))
    return int(c.mesh.fsdp) >= 3

  assert fit.smallest_fitting_fsdp(tiny_config, 12, fits, log=lambda _: None) == 3
  assert tried == [1, 2, 3]
  # main on CPU: no device memory to fit, fsdp 1 (nothing compiled).
  assert fit.resolve_auto_fsdp(tiny_config, None, log=lambda _: None) == 1
  config_lib.validate(config_lib.with_mesh_fsdp(tiny_config, 0))  # 0 (auto) is a valid value


def test_auto_fsdp_cli_reports_the_plan_it_chose():
  """--config.mesh.fsdp=0 through the command: the search's own compile is the report
  (fsdp 1 fits the tiny model), the sampler is compiled beside it, --noinit skips the
  initialiser."""
  r = _plan_cli(f"--config={DIGITS}", *TINY_FLAGS, "--topology=v5e:2x2", "--config.mesh.fsdp=0",
                "--per_chip_batch=4", "--sample_batch=2", "--noinit", "--json")
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert "mesh.fsdp=auto: fsdp=1 fits" in r.stdout and "chose fsdp=1" in r.stdout, r.stdout
  assert out["mesh"] == {"data": 4, "fsdp": 1} and out["fits"] and out["compile_s"] > 0
  assert out["sample"]["fits"] and "init_compile_s" not in out


def test_out_of_memory_keeps_the_temporaries_xla_named():
  """libtpu's message for XL/2-3T at 256 on one v5e chip (docs/tpu.md): the report adds the
  arguments to the temporaries XLA says it needed, rather than printing 0 bytes."""
  from deepflow_jax.training import fit  # pylint: disable=g-import-not-at-top

  class Program:
    def lower(self):
      raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                         "required for HLO temporaries (37.25G) exceeds available HBM (15.75G).")

  c = fit.compile_program(Program())
  assert c.oom and c.oom_bytes is None and c.temp_bytes == int(37.25 * 2**30)


def test_two_slices_data_spans_them(tiny_config):
  topo = planning.tpu_topology("v5e:2x2", num_slices=2)
  r = planning.plan(tiny_config, topo, 2, init=False)
  assert (r["chips"], r["num_slices"], r["mesh"]) == (8, 2, {"data": 8, "fsdp": 1})
  assert r["fits"] and r["state_bytes_per_chip"] == STATE_BYTES_PER_PARAM * r["params"] + STATE_EXTRA
