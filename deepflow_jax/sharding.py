"""One device mesh with named axes, logical-axis rules as config data, global batches.

Mesh axes are ``("data", "fsdp")``. Parameters carry logical axis names (see
``deepflow_jax.models.deepflow.LOGICAL_AXES``); ``config.mesh.rules`` maps them
to mesh axes: ``("embed", "fsdp")`` shards every matrix's model-width dimension
over the fsdp devices (FSDP / ZeRO-3 style: XLA all-gathers weights where they
are used), ``("embed", None)`` replicates (pure data parallel). The batch is
always split over both axes.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepflow_jax.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` when this run has several processes.

  Explicit ``config.distributed.{coordinator_address,num_processes,process_id}``
  start a manual run (e.g. several processes on one machine); otherwise JAX's
  cluster auto-detection is used when the environment shows a multi-process
  launch (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS or TPU_WORKER_HOSTNAMES set),
  or always with ``config.distributed.initialize="always"`` (Cloud TPU VM pod
  slices: JAX reads the workers from the VM's metadata); never with ``"never"``.
  """
  d = config.distributed
  mode = d.get("initialize", "auto")
  if mode == "never":
    return
  if d.coordinator_address:
    # Only affects the CPU backend (several processes on one machine); must be set
    # before any JAX call initialises a backend.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id)
    return
  env = os.environ
  multi = (
      int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
      or "JAX_COORDINATOR_ADDRESS" in env
      or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
  if multi or mode == "always":
    jax.distributed.initialize()


def build_mesh(sizes: Sequence[int], axes: Sequence[str],
               devices: Sequence[Any] | None = None) -> Mesh:
  """The one place a ``Mesh`` is built: axis ``sizes`` (one may be -1: the rest) over ``devices``.

  ``devices`` defaults to every device of every host, ordered by
  ``jax.make_mesh`` (each process's devices together, physical topology where
  JAX knows it). Axes are ``Auto``: XLA's partitioner propagates shardings.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  shape = [int(s) for s in sizes]
  names = "/".join(f"mesh.{a}" for a in axes)
  if shape.count(-1) > 1:
    raise UserError(f"mesh: at most one of {names} may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise UserError(f"mesh: {names} must be positive or -1, got {shape}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n % known:
      raise UserError(f"mesh: {n} devices are not divisible by the fixed axis size {known}")
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    sizes_text = " x ".join(f"{a}={s}" for a, s in zip(axes, shape))
    raise UserError(f"mesh: {sizes_text} needs {int(np.prod(shape))} devices, but {n} are present")
  axis_types = (AxisType.Auto,) * len(axes)
  if devices == list(jax.devices()) and n > 1:
    return jax.make_mesh(tuple(shape), tuple(axes), devices=devices, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes), axis_types=axis_types)


def make_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The training mesh ("data", "fsdp") from ``config.mesh``; a -1 entry takes the remaining devices."""
  return build_mesh((config.mesh.data, config.mesh.fsdp), MESH_AXES, devices)


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D ``("data",)`` mesh over ``devices`` (default: all): sampling, encoding, evaluation."""
  return build_mesh((-1,), ("data",), devices)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  return tuple((str(a), (None if b in (None, "", "none", "None") else str(b)))
               for a, b in config.mesh.rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly ``nn.Partitioned``) abstract values.

  Leaves without logical names are replicated; a dimension a mesh axis does not
  divide is replicated rather than refused.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(lambda s, a: NamedSharding(mesh, _fit_spec(s, a.shape, mesh)), mesh_specs,
                      shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_array(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) sharded array -> the whole array as numpy on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process batch rows -> one global array per key, sharded over the batch axes.

  Each process passes only the rows it read (its contiguous share of the
  global batch, in process order).
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                    global_shape)
  return out
