"""Scalar metrics to TensorBoard event files (tensorboardX, no TensorFlow) and ``metrics.jsonl``.

On a ``gs://`` workdir both are staged: the event files are written to a local
temporary folder and uploaded after every flush, and ``metrics.jsonl`` is kept
in memory and rewritten as one object per flush (object storage has no append;
a single-object upload is atomic, so a reader sees whole lines only).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from tensorboardX import SummaryWriter

from deepflow_jax import storage


class MetricWriter:
  """Writes scalars to ``logdir`` (TensorBoard) and as JSON lines next to it; process 0 only.

  ``enabled=False`` (other processes) makes every call a no-op.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    logdir = storage.absolute(logdir)
    self._jsonl = storage.join(storage.dirname(logdir), "metrics.jsonl")
    self._remote = logdir if storage.is_url(logdir) else None
    self._staging = tempfile.mkdtemp(prefix="deepflow-tb-") if enabled and self._remote else None
    self._w = SummaryWriter(logdir=self._staging or logdir) if enabled else None
    self._lines = None
    if enabled and self._remote:
      try:
        self._lines = storage.read_text(self._jsonl)
      except FileNotFoundError:
        self._lines = ""

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One step's scalars; NaN / Inf are left out of TensorBoard and are ``null`` in the JSON."""
    if self._w is None:
      return
    values = {k: _finite_or_none(v) for k, v in values.items()}
    for k, v in values.items():
      if v is not None:  # tensorboardX warns once per non-finite value
        self._w.add_scalar(k, v, global_step=step)
    self._w.flush()
    line = json.dumps({"step": int(step), **values}, allow_nan=False) + "\n"
    if self._remote is None:
      with open(self._jsonl, "a") as f:
        f.write(line)
      return
    self._lines += line
    storage.write_text(self._jsonl, self._lines)
    self._upload()

  def _upload(self) -> None:
    """Copies the staged event files (each whole) to the gs:// logdir."""
    for name in sorted(os.listdir(self._staging)):
      with open(os.path.join(self._staging, name), "rb") as f:
        storage.write_bytes(storage.join(self._remote, name), f.read())

  def drop_rows_after(self, step: int) -> int:
    """Removes the ``metrics.jsonl`` rows of steps after ``step`` (a resume from an earlier
    checkpoint logs them again) and a torn last line; returns how many were dropped."""
    if self._w is None:
      return 0
    if self._remote is not None:
      lines = self._lines.splitlines(keepends=True)
    elif os.path.exists(self._jsonl):
      with open(self._jsonl) as f:
        lines = f.readlines()
    else:
      return 0
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if int(row.get("step", 0)) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      if self._remote is not None:
        self._lines = "".join(keep)
      storage.write_text(self._jsonl, "".join(keep))  # atomic: temporary file, then rename
    return len(lines) - len(keep)

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
      if self._remote is not None:
        self._upload()
        shutil.rmtree(self._staging, ignore_errors=True)
      self._w = None


def _finite_or_none(v) -> "float | None":
  v = float(v)
  return v if math.isfinite(v) else None
