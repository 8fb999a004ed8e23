"""Compiling a program for its analyses, and ``mesh.fsdp=0`` (auto): the smallest fsdp that fits.

``compile_program`` lowers and compiles a jitted program on abstract inputs and
keeps XLA's per-device memory analysis (arguments + outputs - donated aliases +
temporaries + code) and cost analysis (FLOPs, bytes accessed); a compilation
that runs out of memory (TPU compilers refuse programs over the HBM) is a result
with ``oom=True``, not an exception. ``smallest_fitting_fsdp`` tries the fsdp
sizes in ascending order; ``resolve_auto_fsdp`` is what ``main`` does with
``mesh.fsdp=0``: on accelerators the budget is the device's own memory (its
allocator's ``bytes_limit``), on CPU (no memory limit to fit) fsdp is 1.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Optional

import jax

from deepflow_jax import sharding as shd
from deepflow_jax.errors import first_line


_OOM_RE = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.I)
# TPU: "the total memory required for HLO temporaries (37.25G) exceeds available HBM".
_OOM_TEMP_RE = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", re.I)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _is_oom(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or bool(_OOM_RE.search(text))


def _oom_bytes(e: BaseException, pattern: re.Pattern = _OOM_RE) -> Optional[int]:
  m = pattern.search(str(e))
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else None


@dataclasses.dataclass
class Compiled:
  """One compiled program's per-device numbers (``error``: it did not compile).

  Out of memory: ``oom_bytes`` is the total XLA said it needed where its message
  has one, else ``temp_bytes`` the temporaries it named (the arguments are the
  caller's to add)."""
  compile_s: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  error: str = ""
  oom: bool = False
  oom_bytes: Optional[int] = None

  @property
  def bytes(self) -> int:
    """Device memory the program needs: arguments + outputs - donated aliases + temporaries."""
    if self.oom_bytes is not None:
      return self.oom_bytes
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


def compile_program(program) -> Compiled:
  """Lowers and compiles a ``Program`` (or anything with ``lower()``); XLA's analyses."""
  t0 = time.perf_counter()
  try:
    exe = program.lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # XLA: out of memory
    if not _is_oom(e):
      raise
    return Compiled(time.perf_counter() - t0, error=first_line(e)[:300], oom=True,
                    oom_bytes=_oom_bytes(e), temp_bytes=_oom_bytes(e, _OOM_TEMP_RE) or 0)
  dt = time.perf_counter() - t0
  m = exe.memory_analysis()
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return Compiled(dt, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                  int(m.generated_code_size_in_bytes), float(cost.get("flops", 0.0)),
                  float(cost.get("bytes accessed", 0.0)))


def smallest_fitting_fsdp(config, devices: int, fits: Callable[[Any], bool],
                          log: Callable[[str], None] = print) -> int:
  """``mesh.fsdp=auto``: the smallest fsdp size (a divisor of ``devices``, ascending) for
  which ``fits(config with mesh.fsdp set)`` holds; the largest divisor if none does."""
  sizes = [d for d in range(1, devices + 1) if devices % d == 0]
  for f in sizes:
    c = config.copy_and_resolve_references()
    c.mesh.fsdp = f
    c.mesh.data = -1
    ok = fits(c)
    log(f"mesh.fsdp=auto: fsdp={f} {'fits' if ok else 'does not fit'}")
    if ok:
      return f
  return sizes[-1]


def device_memory_limit(device) -> Optional[int]:
  """The bytes an accelerator's allocator may use (None where unknown: CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without allocator stats
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def resolve_auto_fsdp(config, make_trainer: Callable[[Any, Any], Any],
                      log: Callable[[str], None] = print) -> int:
  """``mesh.fsdp=0`` for ``main``: the smallest fsdp whose train step fits every device's memory.

  ``make_trainer(config, mesh)`` builds the run's Trainer; each candidate's
  step is compiled on abstract inputs (nothing allocated). CPU, or a device
  that reports no memory limit: 1 (host memory is not a fit constraint).
  """
  devices = jax.devices()
  limit = device_memory_limit(devices[0]) if devices[0].platform != "cpu" else None
  if limit is None:
    log("mesh.fsdp=0 (auto): no device memory limit on this backend; fsdp=1")
    return 1
  batch = int(config.train.global_batch_size)

  def fits(c) -> bool:
    trainer = make_trainer(c, shd.make_mesh(c))
    r = compile_program(trainer.programs(batch)["train_step"])
    return not r.oom and r.bytes <= limit

  fsdp = smallest_fitting_fsdp(config, len(devices), fits, log=log)
  log(f"mesh.fsdp=0 (auto): fsdp={fsdp} ({limit / 2**30:.1f} GiB per device)")
  return fsdp
