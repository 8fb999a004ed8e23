"""Progress lines with rate and ETA: the one helper every long loop uses.

Usage::

    progress = Progress(total=50_000, name="generate", unit="samples", done=already_done)
    for batch in batches:
      ...
      progress.update(len(batch))      # prints at most every `every_s` seconds, and at the end

A line reads ``[generate] 12,800/50,000 samples (25.6%) | 41.3 samples/s | ETA 00:15:01``.
The first update after construction usually includes compilation, so once a
second update exists the rate is measured from the first one (``skip_first``).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
  """Seconds -> ``[Dd ]HH:MM:SS``; ``?`` when unknown (not finite)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def format_rate(rate: float) -> str:
  """A rate with about three significant digits: ``1,234``, ``41.3``, ``2.57``, ``0.0123``."""
  if not math.isfinite(rate):
    return "?"
  if rate >= 100:
    return f"{rate:,.0f}"
  if rate >= 10:
    return f"{rate:.1f}"
  if rate >= 1:
    return f"{rate:.2f}"
  if rate <= 0:
    return "0"
  return f"{rate:.3g}"


def _print(msg: str) -> None:
  print(msg, flush=True)


class Progress:
  """Counts finished work towards ``total`` and logs ``[name] done/total | rate | ETA`` lines.

  Args:
    total: units of work in all (e.g. samples), including ``done``.
    name: the tag at the start of every line.
    unit: what is counted, for the line.
    done: units already finished before this run (resumed work); not part of the rate.
    log: where lines go (``print`` by default; pass a no-op on non-main processes).
    every_s: minimum seconds between two lines (the final update always logs).
    skip_first: measure the rate from the first update on (it usually holds compilation).
  """

  def __init__(self, total: int, name: str, unit: str = "items", *, done: int = 0,
               log: Optional[Callable[[str], None]] = _print, every_s: float = 10.0,
               skip_first: bool = True):
    self.total, self.name, self.unit = int(total), name, unit
    self.done = int(done)
    self._log = log or (lambda msg: None)
    self._every_s = float(every_s)
    self._skip_first = skip_first
    self._t0 = time.perf_counter()
    self._first: Optional[tuple[float, int]] = None  # (time, done) at the first update
    self._start_done = self.done
    self._last_log = -math.inf

  @property
  def rate(self) -> float:
    """Units per second this run (after the first update when ``skip_first`` and possible)."""
    now = time.perf_counter()
    if self._skip_first and self._first is not None and self.done > self._first[1]:
      t, d = self._first
    else:
      t, d = self._t0, self._start_done
    return (self.done - d) / max(now - t, 1e-9)

  @property
  def eta(self) -> float:
    rate = self.rate
    return (self.total - self.done) / rate if rate > 0 else math.inf

  @property
  def elapsed(self) -> float:
    return time.perf_counter() - self._t0

  def line(self) -> str:
    pct = 100.0 * self.done / self.total if self.total else 100.0
    return (f"[{self.name}] {self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%) | "
            f"{format_rate(self.rate)} {self.unit}/s | ETA {format_duration(self.eta)}")

  def update(self, n: int, *, force: bool = False) -> None:
    """Adds ``n`` finished units; logs when ``every_s`` has passed, at the end, or ``force``."""
    self.done += int(n)
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, self.done)
    if force or self.done >= self.total or now - self._last_log >= self._every_s:
      self._last_log = now
      self._log(self.line())
