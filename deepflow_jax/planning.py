"""Will it fit, and how fast can it go: the training and sampling programs compiled for a TPU slice.

With libtpu installed (``pip install -e ".[tpu]"``) JAX compiles for a Cloud TPU
topology on any machine: ``tpu_topology("v5e:2x4")`` gives the compile-only
devices of an 8-chip v5e slice. ``plan(config, topology)`` builds, over those
devices, the mesh and the ``Trainer`` that ``main`` builds for the config, and
compiles the very programs ``main`` runs (``Trainer.programs``: the train step
with its shardings, donation, gradient accumulation, remat and SSL encoder; the
fresh-state initialiser) and ``generate``'s sampling step (guidance included:
its scale is a traced value, both branches are compiled). Nothing is allocated.

What comes back (``Plan``), per chip: the bytes of the train state, the batch
and XLA's temporaries against the chip's HBM (``hardware.CHIPS``) and whether
they fit; the step's FLOPs from XLA's cost analysis beside the analytic count
(``training.meter``); a lower bound on the step time from the chip's peak bf16
FLOP/s and HBM bandwidth, the images/s that a stated MFU would give; compile
times. ``find_max_batch`` bisects the per-chip batch by compiling, seeded by a
linear fit of two compiled memory analyses. ``mesh.fsdp=0`` (auto) is
``training.fit.smallest_fitting_fsdp`` over these plans (``main`` resolves it the
same way against its own devices' memory).

A program that does not fit either compiles with bytes over the HBM or fails to
compile with XLA's out-of-memory error; both are ``fits=False``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepflow_jax import hardware
from deepflow_jax import sampling
from deepflow_jax import sharding as shd
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line
from deepflow_jax.models import dinov2
from deepflow_jax.models.loading import model_from_config
from deepflow_jax.training import alignment
from deepflow_jax.training import meter
from deepflow_jax.training.fit import compile_program
from deepflow_jax.training.step import Trainer

# libtpu's environment for compile-only use: no lock on the (absent) chips, so
# several planning processes can run at once; no metadata-server look-ups.
LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_SKIP_MDS_QUERY": "1", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3"}

DEFAULT_MFU = 0.4  # the MFU at which images/s are stated


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given: "v5e:2x4"
  chip: hardware.Chip
  devices: tuple  # compile-only jax devices
  chips: int
  hosts: int
  num_slices: int

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.chips

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.chip.hbm_bytes // self.devices_per_chip


def with_hbm(topo: Topology, hbm_bytes: int) -> Topology:
  """The topology with another HBM per chip (headroom for the runtime, or a test's tiny chip)."""
  return dataclasses.replace(topo, chip=dataclasses.replace(topo.chip, hbm_bytes=int(hbm_bytes)))


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


_TOPOLOGY_RE = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+){1,2})$")


def _single_host_bounds(chip: hardware.Chip, dims: list[int]) -> Optional[tuple[int, ...]]:
  """chips_per_host_bounds for topologies that are one host on Cloud TPU but not libtpu's default.

  Slices of fewer than 4 chips (``v5e:1x1``, Colab's single chip) and the 8-chip
  v5e / v6e hosts (v5litepod-8, v6e-8: one VM with 8 chips; libtpu's default
  host is 2x2).
  """
  n = int(np.prod(dims))
  if n < 4 or (chip.name in ("v5e", "v6e") and n == 8 and len(dims) == 2):
    return tuple(dims) + (1,) * (3 - len(dims))
  return None


def tpu_topology(name: str, num_slices: int = 1) -> Topology:
  """The compile-only devices of a Cloud TPU topology (``v5e:2x4``, ``v4:2x2x1``, ``v5p:2x2x2``)."""
  if not libtpu_installed():
    raise UserError("libtpu is not installed: pip install -e \".[tpu]\" (it pins the libtpu "
                    f"matching jax {jax.__version__})")
  m = _TOPOLOGY_RE.match(name.strip().lower())
  if not m:
    raise UserError(f"--topology={name!r}: expected GENERATION:AxB or GENERATION:AxBxC, e.g. "
                    f"v5e:2x4, v4:2x2x1 (generations: {', '.join(hardware.CHIPS)})")
  chip = hardware.chip_for(m.group(1))
  if chip is None:
    raise UserError(f"--topology={name!r}: unknown TPU generation {m.group(1)!r} (expected one "
                    f"of {', '.join(hardware.CHIPS)})")
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices}: must be >= 1")
  dims = [int(x) for x in m.group(2).split("x")]
  for k, v in LIBTPU_ENV.items():
    os.environ.setdefault(k, v)
  kw = {}
  bounds = _single_host_bounds(chip, dims)
  if bounds is not None:
    kw["chips_per_host_bounds"] = bounds
  if num_slices > 1:
    kw["num_slices"] = num_slices
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    devices = tuple(topologies.get_topology_desc(
        platform="tpu", topology_name=f"{chip.name}:{m.group(2)}", **kw).devices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu refuses the name
    raise UserError(f"--topology={name!r}: libtpu refuses it: {first_line(e)}") from None
  kinds = {d.device_kind for d in devices}
  if kinds != {chip.device_kind}:
    raise UserError(f"--topology={name!r}: libtpu gave {sorted(kinds)} devices, expected "
                    f"{chip.device_kind!r}")
  chips = len({(getattr(d, "slice_index", 0),) + tuple(d.coords) for d in devices})
  hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
  return Topology(name, chip, devices, chips, hosts, num_slices)


def topology_mesh(config, topo: Topology):
  """The training mesh of ``config.mesh`` over the topology's devices (as ``main`` builds it).

  Several slices: the data axis spans them (each slice holds whole fsdp groups).
  """
  if topo.num_slices == 1:
    return shd.make_mesh(config, topo.devices)
  n = len(topo.devices)
  fsdp = int(config.mesh.fsdp)
  data = int(config.mesh.data)
  data = n // fsdp if data == -1 else data
  if data * fsdp != n or data % topo.num_slices:
    raise UserError(f"mesh: data={data} x fsdp={fsdp} over {n} devices in {topo.num_slices} "
                    "slices: the data axis must be a multiple of the slice count")
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devs = mesh_utils.create_hybrid_device_mesh((data // topo.num_slices, fsdp),
                                              (topo.num_slices, 1), devices=list(topo.devices))
  return jax.sharding.Mesh(devs, shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _shard_bytes(tree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += int(np.prod(shape)) * np.dtype(a.dtype).itemsize
  return total


_ENCODER_BY_WIDTH = {int(v["embed_dim"]): k for k, v in dinov2.VARIANTS.items()}


def abstract_encoder(config, model):
  """SSL alignment's frozen DINOv2 (the official variant of width ``model.z_dim``) and its
  parameters as shapes: what ``main`` loads from ``model.encoder_path``, without the file."""
  width = int(model.z_dim)
  if width not in _ENCODER_BY_WIDTH:
    raise UserError(f"model.z_dim={width}: no DINOv2 variant has that width (expected one of "
                    f"{sorted(_ENCODER_BY_WIDTH)})")
  heads = int(config.model.encoder_num_heads)
  over = {"num_heads": heads} if heads else {}
  encoder = dinov2.variant(_ENCODER_BY_WIDTH[width], pos_grid=alignment.alignment_grid(model),
                           dtype=model.dtype, **over)
  side = encoder.patch_size * encoder.pos_grid
  params = jax.eval_shape(encoder.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))["params"]
  return encoder, params


def build_trainer(config, mesh) -> Trainer:
  """The Trainer ``main`` builds for ``config`` on ``mesh`` (abstract encoder weights)."""
  platform = mesh.devices.flat[0].platform
  model = model_from_config(config, platform, log=lambda _: None)
  encoder = enc_params = None
  if model.ssl_align:
    encoder, enc_params = abstract_encoder(config, model)
  return Trainer(config, model, mesh, latent=config.data.name != "digits", encoder=encoder,
                 encoder_params=enc_params)


def sampler_program(model, params_shapes, topo: Topology, per_chip_batch: int, settings):
  """generate's jitted sampling step (``sampling.make_batch_sampler``) on abstract inputs."""
  mesh = shd.data_mesh(list(topo.devices))
  fn = sampling.make_batch_sampler(model, mesh, settings, labels_mode="cycle")
  n = per_chip_batch * topo.chips
  repl = shd.replicated(mesh)
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        params_shapes)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=repl)  # pylint: disable=unnecessary-lambda-assignment
  vec = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data)
  args = (params, scalar(jnp.int32), vec, vec, scalar(jnp.float32), scalar(jnp.float32),
          scalar(jnp.float32))

  class _P:
    def lower(self):
      return fn.lower(*args)
  return _P()


def _per_chip_batch_default(config, topo: Topology) -> int:
  b = int(config.train.global_batch_size)
  if b % topo.chips:
    raise UserError(f"train.global_batch_size={b} does not split over {topo.chips} chips; pass "
                    "--per_chip_batch")
  return b // topo.chips


def _check_batch(config, topo: Topology, per_chip_batch: int) -> None:
  accum = int(config.train.grad_accum_steps)
  unit = topo.devices_per_chip * accum
  if per_chip_batch < 1 or per_chip_batch % unit:
    raise UserError(f"per-chip batch {per_chip_batch}: must be a positive multiple of {unit} "
                    f"({topo.devices_per_chip} device(s) per chip x train.grad_accum_steps="
                    f"{accum})")


def batch_unit(config, topo: Topology) -> int:
  """The per-chip batch must be a multiple of this (devices per chip x accumulation steps)."""
  return topo.devices_per_chip * int(config.train.grad_accum_steps)


def _mesh_shape(mesh) -> dict[str, int]:
  return {k: int(v) for k, v in mesh.shape.items()}


def _train_step_report(config, topo: Topology, trainer: Trainer, programs,
                       per_chip_batch: int, mfu: float) -> dict[str, Any]:
  """Compiles the train step; ``plan``'s report of it."""
  model, dpc, mesh = trainer.model, topo.devices_per_chip, trainer.mesh
  step = compile_program(programs["train_step"])
  state_b = _shard_bytes(trainer.abstract_state) * dpc
  batch_b = _shard_bytes(programs["train_step"].args[1]) * dpc
  enc_b = _shard_bytes(trainer.encoder_params) * dpc if trainer.images else 0
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainer.abstract_state.params))
  hbm = topo.chip.hbm_bytes
  need = step.bytes * dpc
  if step.oom and step.oom_bytes is None and step.temp_bytes:  # XLA named the temporaries
    need = state_b + batch_b + enc_b + step.temp_bytes * dpc
  fits = (not step.oom) and need <= hbm
  analytic = meter.train_flops_per_example(model) * per_chip_batch
  out = {
      "topology": topo.name, "generation": topo.chip.name, "num_slices": topo.num_slices,
      "chips": topo.chips, "hosts": topo.hosts, "devices": len(topo.devices),
      "devices_per_chip": dpc, "mesh": _mesh_shape(mesh),
      "preset": config.model.preset, "params": n_params, "remat": model.remat,
      "compute_dtype": np.dtype(model.dtype).name, "ssl_align": bool(model.ssl_align),
      "grad_accum_steps": int(config.train.grad_accum_steps),
      "per_chip_batch": per_chip_batch, "global_batch": per_chip_batch * topo.chips,
      "fits": bool(fits), "hbm_bytes_per_chip": hbm, "bytes_per_chip": need,
      "state_bytes_per_chip": state_b, "batch_bytes_per_chip": batch_b,
      "encoder_bytes_per_chip": enc_b, "temp_bytes_per_chip": step.temp_bytes * dpc,
      "compile_s": round(step.compile_s, 2),
  }
  if step.oom:
    out.update(compile_error=step.error)
  else:
    flops = step.flops * dpc
    compute_s = flops / topo.chip.peak_bf16_flops
    memory_s = step.bytes_accessed * dpc / topo.chip.hbm_bytes_per_s
    bound = max(compute_s, memory_s, analytic / topo.chip.peak_bf16_flops)
    out.update(
        flops_per_chip_step=flops, analytic_flops_per_chip_step=analytic,
        xla_over_analytic=round(flops / analytic, 3) if analytic else None,
        bytes_accessed_per_chip_step=step.bytes_accessed * dpc,
        step_time_lower_bound_s=bound,
        bound_by="compute" if max(compute_s, analytic / topo.chip.peak_bf16_flops) >= memory_s
        else "memory",
        images_per_s_upper_bound=per_chip_batch * topo.chips / bound if bound else None,
        mfu=mfu, images_per_s_at_mfu=mfu * topo.chip.peak_bf16_flops * topo.chips
        / meter.train_flops_per_example(model),
        step_s_at_mfu=analytic / (mfu * topo.chip.peak_bf16_flops))
  return out


def plan(config, topo: Topology, per_chip_batch: Optional[int] = None, *,
         sample_batch: int = 0, sample_settings=None, init: bool = True,
         mfu: float = DEFAULT_MFU, train_report: Optional[dict] = None) -> dict[str, Any]:
  """Compiles ``main``'s programs for ``topo`` at ``per_chip_batch``; the report as a dict.

  ``per_chip_batch`` None: the config's ``train.global_batch_size`` over the
  chips. ``sample_batch`` > 0 also compiles generate's sampling step at that
  per-chip batch with ``sample_settings`` (default: the config's ``sample``
  block with classifier-free guidance on). ``train_report``: this config's plan
  at this batch already compiled (``mesh.fsdp=auto``'s search has one): its
  train-step numbers are kept and only the initialiser and sampler are
  compiled. The config is not changed.
  """
  config = config.copy_and_resolve_references()
  if per_chip_batch is None:
    per_chip_batch = _per_chip_batch_default(config, topo)
  _check_batch(config, topo, per_chip_batch)
  config.train.global_batch_size = per_chip_batch * topo.chips
  mesh = topology_mesh(config, topo)
  trainer = build_trainer(config, mesh)
  programs = trainer.programs(config.train.global_batch_size)
  if train_report is not None:
    if (train_report["per_chip_batch"], train_report["mesh"]) != (
        per_chip_batch, _mesh_shape(mesh)):
      raise ValueError(f"train_report is for per-chip batch {train_report['per_chip_batch']} "
                       f"on {train_report['mesh']}, not {per_chip_batch} on {dict(mesh.shape)}")
    out = dict(train_report)
  else:
    out = _train_step_report(config, topo, trainer, programs, per_chip_batch, mfu)
  hbm, dpc, model = topo.chip.hbm_bytes, topo.devices_per_chip, trainer.model
  if init:
    c = compile_program(programs["init"])
    out.update(init_compile_s=round(c.compile_s, 2), init_bytes_per_chip=c.bytes * dpc,
               init_fits=(not c.oom) and c.bytes * dpc <= hbm)
  if sample_batch:
    settings = sample_settings or dataclasses.replace(
        sampling.SamplerSettings.from_config(config.sample),
        cfg_scale=max(float(config.sample.cfg_scale), 1.5))
    params = nn.unbox(trainer.abstract_state.params)
    c = compile_program(sampler_program(model, params, topo, sample_batch, settings))
    s = {"per_chip_batch": sample_batch, "sampler": settings.describe(),
         "compile_s": round(c.compile_s, 2), "bytes_per_chip": c.bytes * dpc,
         "fits": (not c.oom) and c.bytes * dpc <= hbm}
    if not c.oom:
      # XLA's cost analysis counts a loop's body once, not per step: the sampler's time
      # bound is analytic, network evaluations x forward FLOPs, guided steps doubled.
      nfe = sampling.num_evaluations(settings.sampler, int(settings.num_steps))
      guided = 2 if float(settings.cfg_scale) > 1 else 1
      flops = nfe * guided * sample_batch * meter.forward_flops_per_example(model)
      s.update(xla_flops_per_chip_one_iteration=c.flops * dpc, analytic_flops_per_chip=flops,
               time_lower_bound_s=flops / topo.chip.peak_bf16_flops)
    out["sample"] = s
  return out


def find_max_batch(config, topo: Topology, *, probes: tuple[int, int] = (0, 0),
                   start: Optional[int] = None, multiple: int = 1,
                   log: Callable[[str], None] = print, **plan_kw) -> tuple[dict, list[dict]]:
  """The largest per-chip batch whose train step fits, by compiling: (its plan, every plan).

  Batches are multiples of ``unit = lcm(batch_unit, multiple)``. Two probe
  batches (default: 1 and 2 units) give a linear fit bytes = fixed + per_example
  x batch; its estimate and the unit above it are compiled next (when the fit
  holds, that settles it: four compiles). When it was low (XLA's TPU compiler
  rematerialises by itself near the HBM, so the bytes grow slower than the fit),
  the batch doubles until one does not fit (out-of-memory compiles are quick);
  then a bisection between the largest batch known to fit and the smallest known
  not to. With ``start`` (a batch believed near the edge, e.g. another config's
  edge) there are no probes: ``start`` and the unit above it are compiled first
  (when the edge lies between them, two compiles settle it), else the batch
  doubles up from there, or halves down until one fits. Returns the plan of the
  batch found (``fits`` False when even one unit does not fit) and every plan
  compiled, in order.
  """
  unit = int(np.lcm(batch_unit(config, topo), max(int(multiple), 1)))
  plan_kw = dict(plan_kw, sample_batch=0)  # the train step decides
  tried: dict[int, dict] = {}
  runs: list[dict] = []

  def at(b: int) -> dict:
    if b not in tried:
      tried[b] = plan(config, topo, b, init=False, **plan_kw)
      runs.append(tried[b])
      r = tried[b]
      need = ("XLA: out of memory" if "compile_error" in r
              else f"{r['bytes_per_chip'] / 2**30:.2f} GiB")
      log(f"per-chip batch {b}: {need} of {r['hbm_bytes_per_chip'] / 2**30:.2f} GiB -> "
          f"{'fits' if r['fits'] else 'does not fit'} (compile {r['compile_s']:.0f} s)")
    return tried[b]

  def above(b: int) -> tuple[int, Optional[int]]:  # b fits: (lo, hi) once b + unit is known
    return (b, b + unit) if not at(b + unit)["fits"] else (b + unit, None)

  if start is not None:
    b = max(int(start) // unit * unit, unit)
    lo, hi = None, None
    if at(b)["fits"]:
      lo, hi = above(b)
    else:
      hi = b
      while lo is None:  # halve down until one fits
        if b == unit:
          return tried[b], runs
        b = max(b // 2 // unit * unit, unit)
        if at(b)["fits"]:
          lo = b
        else:
          hi = b
  else:
    b1 = probes[0] or unit
    b2 = probes[1] or 2 * b1
    r1, r2 = at(b1), at(b2)
    if not r1["fits"]:
      return r1, runs
    lo = b1
    hi = None
    if not r2["fits"]:
      hi = b2
    else:
      lo = b2
      per_ex = (r2["bytes_per_chip"] - r1["bytes_per_chip"]) / (b2 - b1)
      fixed = r1["bytes_per_chip"] - per_ex * b1
      guess = (int((r1["hbm_bytes_per_chip"] - fixed) // per_ex) // unit * unit
               if per_ex > 0 else 0)
      log(f"linear fit: {fixed / 2**30:.2f} GiB + {per_ex / 2**20:.1f} MiB per example -> "
          f"estimate {guess}")
      if guess > lo:
        if at(guess)["fits"]:
          lo, hi = above(guess)
        else:
          hi = guess
  while hi is None:  # below the edge so far: double until something does not fit
    b = 2 * lo
    if at(b)["fits"]:
      lo = b
    else:
      hi = b
  while hi - lo > unit:
    mid = max((lo + hi) // 2 // unit * unit, lo + unit)
    if at(mid)["fits"]:
      lo = mid
    else:
      hi = mid
  return tried[lo], runs
