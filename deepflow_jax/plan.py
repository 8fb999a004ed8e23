"""Will a config fit a Cloud TPU slice, and how fast can it go? Compiled here, no TPU needed.

    python -m deepflow_jax.plan --config=configs/xl3t.py --topology=v5e:2x4 \\
        [--config.model.remat=block ...] [--per_chip_batch=N] [--find_max_batch] \\
        [--num_slices=N] [--sample_batch=16] [--noinit] [--mfu=0.4] [--hbm_gib=G] [--json]

Compiles, for the named topology (``v5e:2x4`` is a v5litepod-8, ``v4:2x2x1`` a
v4-8, ``v5p:2x2x1`` a v5p-8, ``v6e:2x4`` a v6e-8, ``v5e:1x1`` one chip), the
programs ``python -m deepflow_jax.main`` runs with that config (train step, fresh
state) and generate's sampling step, and prints per chip: state, batch and
temporary bytes against the HBM and whether they fit; XLA's FLOPs beside the
analytic count; a step-time lower bound and the images/s at ``--mfu``; compile
times (``deepflow_jax/planning.py``). Needs libtpu: ``pip install -e ".[tpu]"``.

``--find_max_batch``: the largest per-chip batch that fits, by compiling (a
linear fit, doubling where it was low, then bisection; with ``--per_chip_batch=N``
the search starts at N instead), then the plan at twice it. ``--json``: the last
line is one JSON object. ``--config.mesh.fsdp=0`` is ``auto``: the smallest fsdp
size whose train step fits (docs/tpu.md).

Exit status: 0 whether the program fits or not (the report says which); 2 with
one ``error:`` line for an unknown topology, a missing libtpu or a bad flag.
"""
from __future__ import annotations

import json
import os
import sys

# Compile-only: the programs are compiled for the topology's devices; the default
# backend stays the CPU (no TPU runtime is started, no chip lock taken).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepflow_jax import config_lib
from deepflow_jax import planning
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.flags_lib import config_flags_parser
from deepflow_jax.training import fit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("topology", None, "Cloud TPU topology, e.g. v5e:2x4, v4:2x2x1, v5e:1x1.")
flags.DEFINE_integer("per_chip_batch", None,
                     "Training examples per chip (default: train.global_batch_size / chips); "
                     "with --find_max_batch, where the search starts.")
flags.DEFINE_bool("find_max_batch", False, "Find the largest per-chip batch that fits.")
flags.DEFINE_integer("batch_multiple", 8,
                     "--find_max_batch: per-chip batches tried are multiples of this.")
flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multi-slice; data spans them).")
flags.DEFINE_integer("sample_batch", 16,
                     "Per-chip batch of generate's sampling step to compile (0: skip).")
flags.DEFINE_bool("init", True, "Also compile the fresh-state initialiser.")
flags.DEFINE_float("mfu", planning.DEFAULT_MFU, "MFU at which images/s are stated.")
flags.DEFINE_float("hbm_gib", None,
                   "HBM per chip to fit into (default: the chip's, deepflow_jax/hardware.py).")
flags.DEFINE_bool("json", False, "End with one JSON line holding every number.")


def _gib(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f} GiB"


def _print_report(r: dict) -> None:
  print(f"{r['topology']}: {r['chips']} x {r['generation']} chips ({r['devices']} devices), "
        f"{r['hosts']} host(s), {r['num_slices']} slice(s); mesh {r['mesh']}")
  print(f"model {r['preset'] or 'custom'}: {r['params']:,} params, {r['compute_dtype']} compute, "
        f"remat {r['remat']}, ssl_align {r['ssl_align']}; per-chip batch {r['per_chip_batch']} "
        f"(global {r['global_batch']}, grad_accum {r['grad_accum_steps']})")
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  print(f"train step per chip: state {_gib(r['state_bytes_per_chip'])} + batch "
        f"{_gib(r['batch_bytes_per_chip'])} + temporaries {_gib(r['temp_bytes_per_chip'])}"
        + (f" + encoder {_gib(r['encoder_bytes_per_chip'])}" if r["encoder_bytes_per_chip"] else "")
        + f" -> {_gib(r['bytes_per_chip'])} of {_gib(r['hbm_bytes_per_chip'])} HBM: {verdict} "
        f"(compile {r['compile_s']:.1f} s)")
  if "compile_error" in r:
    print(f"  XLA: {r['compile_error']}")
  else:
    print(f"FLOPs per chip per step: XLA {r['flops_per_chip_step'] / 1e12:.2f} T, analytic "
          f"{r['analytic_flops_per_chip_step'] / 1e12:.2f} T (x{r['xla_over_analytic']}); step "
          f">= {1e3 * r['step_time_lower_bound_s']:.1f} ms ({r['bound_by']}-bound, <= "
          f"{r['images_per_s_upper_bound']:.0f} img/s); at {100 * r['mfu']:.0f}% MFU "
          f"{1e3 * r['step_s_at_mfu']:.1f} ms/step, {r['images_per_s_at_mfu']:.0f} img/s")
  if "init_compile_s" in r:
    print(f"fresh-state init: {_gib(r['init_bytes_per_chip'])} per chip, "
          f"{'fits' if r['init_fits'] else 'DOES NOT FIT'} (compile {r['init_compile_s']:.1f} s)")
  if "sample" in r:
    s = r["sample"]
    extra = (f", >= {1e3 * s['time_lower_bound_s']:.0f} ms per batch (analytic FLOPs)"
             if "time_lower_bound_s" in s else "")
    print(f"sampling ({s['sampler']}) at per-chip batch {s['per_chip_batch']}: "
          f"{_gib(s['bytes_per_chip'])} per chip, {'fits' if s['fits'] else 'DOES NOT FIT'}"
          f"{extra} (compile {s['compile_s']:.1f} s)")


@cli_main
def _plan(argv) -> int:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  if FLAGS.config is None:
    raise UserError("--config is required (e.g. --config=configs/xl3t.py)")
  if not FLAGS.topology:
    raise UserError("--topology is required (e.g. --topology=v5e:2x4)")
  if FLAGS.sample_batch < 0:
    raise UserError(f"--sample_batch={FLAGS.sample_batch}: must be >= 0")
  if not 0 < FLAGS.mfu <= 1:
    raise UserError(f"--mfu={FLAGS.mfu}: must be in (0, 1]")
  config = FLAGS.config.copy_and_resolve_references()
  if not config.data.path:  # nothing is read: the batch is shapes
    config.data.path = "(not read by plan)"
  auto_fsdp = int(config.mesh.fsdp) == 0
  if auto_fsdp:
    config = config_lib.with_mesh_fsdp(config, 1)
  config_lib.validate(config, files=False)
  topo = planning.tpu_topology(FLAGS.topology, FLAGS.num_slices)
  if FLAGS.hbm_gib is not None:
    if not FLAGS.hbm_gib > 0:
      raise UserError(f"--hbm_gib={FLAGS.hbm_gib}: must be > 0")
    topo = planning.with_hbm(topo, FLAGS.hbm_gib * 2**30)
  kw = dict(sample_batch=FLAGS.sample_batch, mfu=FLAGS.mfu)
  log = lambda m: print(m, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  searched = {}  # fsdp -> the train step's report, compiled by the search
  if auto_fsdp:
    def fits(c) -> bool:
      searched[int(c.mesh.fsdp)] = planning.plan(c, topo, FLAGS.per_chip_batch, init=False,
                                                 mfu=FLAGS.mfu)
      return searched[int(c.mesh.fsdp)]["fits"]
    fsdp = fit.smallest_fitting_fsdp(config, len(topo.devices), fits, log=log)
    config = config_lib.with_mesh_fsdp(config, fsdp)
  if FLAGS.find_max_batch:
    if FLAGS.batch_multiple < 1:
      raise UserError(f"--batch_multiple={FLAGS.batch_multiple}: must be >= 1")
    best, runs = planning.find_max_batch(config, topo, start=FLAGS.per_chip_batch,
                                         multiple=FLAGS.batch_multiple, log=log, **kw)
    result = dict(best)
    if best["fits"]:
      twice = planning.plan(config, topo, 2 * best["per_chip_batch"], init=False, mfu=FLAGS.mfu)
      result["twice"] = {k: twice[k] for k in ("per_chip_batch", "fits", "bytes_per_chip",
                                               "compile_s") if k in twice}
      result["twice"]["compile_error"] = twice.get("compile_error", "")
      need = "XLA: out of memory" if "compile_error" in twice else _gib(twice["bytes_per_chip"])
      log(f"twice that, {twice['per_chip_batch']}: {need} -> "
          f"{'fits' if twice['fits'] else 'does not fit'}")
    result["max_per_chip_batch"] = best["per_chip_batch"] if best["fits"] else 0
    result["probes"] = [{k: r[k] for k in ("per_chip_batch", "fits", "bytes_per_chip",
                                           "compile_s", "compile_error") if k in r}
                        for r in runs]
  else:
    result = planning.plan(config, topo, FLAGS.per_chip_batch, init=FLAGS.init,
                           train_report=searched.get(int(config.mesh.fsdp)), **kw)
  _print_report(result)
  if auto_fsdp and not any(r["fits"] for r in searched.values()):
    remedies = "a smaller --per_chip_batch or train.grad_accum_steps" + (
        "" if config.model.remat == "block" else " or model.remat=block")
    print(f"mesh.fsdp=auto: no fsdp size fits per-chip batch {searched[1]['per_chip_batch']}; "
          f"the largest, fsdp={max(searched)}, is reported ({remedies} may fit)")
  elif auto_fsdp:
    print(f"mesh.fsdp=auto chose fsdp={result['mesh']['fsdp']}")
  if FLAGS.json:
    print(json.dumps(result), flush=True)
  return 0


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  sys.exit(_plan(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_parser("deepflow_jax.plan"))
