"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and ``metrics.jsonl``."""
from __future__ import annotations

import json
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
    if self._w is None:
      return
    for k, v in values.items():
      self._w.add_scalar(k, float(v), global_step=step)
    self._w.flush()
    with open(self._jsonl, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
