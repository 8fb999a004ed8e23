"""Cloud TPU chips: peak dense bf16 FLOP/s, HBM capacity and bandwidth, with their sources.

Figures are per chip, as Google publishes them on each generation's Cloud TPU
system-architecture page (``source``). A JAX device is one chip on v5e, v5p and
v6e; the compile-only v4 topology of libtpu has one device per TensorCore (two
per chip, each with half the chip's HBM and FLOP/s) where a v4 VM runs
"megacore" (one device per chip): ``deepflow_jax.planning`` divides the chip's
figures by the devices per chip it finds.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the topology prefix: "v5e" in "v5e:2x4"
  device_kind: str  # jax's Device.device_kind of its devices
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes: int  # HBM per chip
  hbm_bytes_per_s: float  # HBM bandwidth per chip
  source: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1228e9,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, "
               "1,228 GB/s)"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s)"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e, "
                "2,765 GB/s)"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM, 1,640 GB/s)"),
}

# Other spellings of a generation in topology names (the Cloud TPU accelerator types).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


def chip_for(name: str) -> Optional[Chip]:
  """The chip of a topology prefix (``v5e``, ``v5litepod``, ...), None if unknown."""
  key = name.strip().lower()
  return CHIPS.get(ALIASES.get(key, key))


def chip_of_device_kind(kind: str) -> Optional[Chip]:
  """The chip whose devices report ``kind`` (exact match: "TPU v5" is v5p, not v5e)."""
  return next((c for c in CHIPS.values() if c.device_kind == kind), None)
