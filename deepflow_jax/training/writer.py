"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and ``metrics.jsonl``."""
from __future__ import annotations

import json
import math
import os

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars to ``logdir`` (TensorBoard) and as JSON lines next to it; process 0 only.

  ``enabled=False`` (other processes) makes every call a no-op.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._w = SummaryWriter(logdir=logdir) if enabled else None
    self._jsonl = os.path.join(os.path.dirname(os.path.abspath(logdir)), "metrics.jsonl")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One step's scalars; NaN / Inf are left out of TensorBoard and are ``null`` in the JSON."""
    if self._w is None:
      return
    values = {k: _finite_or_none(v) for k, v in values.items()}
    for k, v in values.items():
      if v is not None:  # tensorboardX warns once per non-finite value
        self._w.add_scalar(k, v, global_step=step)
    self._w.flush()
    with open(self._jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")

  def drop_rows_after(self, step: int) -> int:
    """Removes the ``metrics.jsonl`` rows of steps after ``step`` (a resume from an earlier
    checkpoint logs them again) and a torn last line; returns how many were dropped."""
    if self._w is None or not os.path.exists(self._jsonl):
      return 0
    with open(self._jsonl) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if int(row.get("step", 0)) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      with open(self._jsonl + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(self._jsonl + ".tmp", self._jsonl)
    return len(lines) - len(keep)

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def _finite_or_none(v) -> "float | None":
  v = float(v)
  return v if math.isfinite(v) else None
