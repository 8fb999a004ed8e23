"""The divergence policy: when a run rolls back to its last good checkpoint, and when it stops.

Every logged step (``train.log_every``) and every checkpoint step the loop asks
``DivergencePolicy.check``. A run has diverged at that step when

* its last ``train.max_skip_streak`` (K) steps or more were all skipped (the
  step drops updates whose loss or gradients are not finite, ``training.step``), or
* its loss is above ``train.loss_spike_factor`` times the median of the last
  ``train.loss_spike_window`` logged losses (once half the window is filled), or
* its parameters or EMA hold NaN / Inf (asked before every save).

The loop then rolls back (the PaLM recipe): it restores the newest checkpoint
whose parameters and EMA are finite (the fresh initial state when there is
none) and keeps reading the data where it is, so the batches that led to the
divergence are skipped and a resumed run still reads what the uninterrupted
one would. After ``train.max_rollbacks`` (R) rollbacks without progress (no
healthy check past the step of the last divergence) the run stops:
``errors.Diverged``, one ``error: training diverged at step S ...`` line, exit 3;
the workdir keeps its finite checkpoints and can be resumed.
"""
from __future__ import annotations

import collections
import math
from typing import Optional


class DivergencePolicy:
  """Host-side bookkeeping of the divergence checks (the settings are ``train.``'s)."""

  def __init__(self, max_skip_streak: int = 20, loss_spike_factor: float = 10.0,
               loss_spike_window: int = 20, max_rollbacks: int = 3):
    self.max_skip_streak = int(max_skip_streak)
    self.spike_factor = float(loss_spike_factor)
    self.window = max(int(loss_spike_window), 1)
    self.max_rollbacks = int(max_rollbacks)
    self.losses: collections.deque = collections.deque(maxlen=self.window)
    self.rollbacks = 0  # rollbacks since the last progress
    self.diverged_at = -1  # the step of the last divergence

  @classmethod
  def from_config(cls, config) -> "DivergencePolicy":
    t = config.train
    return cls(t.max_skip_streak, t.loss_spike_factor, t.loss_spike_window, t.max_rollbacks)

  def check(self, step: int, *, loss: Optional[float] = None, skip_streak: int = 0,
            finite_state: bool = True) -> Optional[str]:
    """Why the run diverged at ``step`` (one phrase), or None when it is healthy."""
    if not finite_state:
      return "parameters or EMA hold NaN or Inf"
    if self.max_skip_streak > 0 and skip_streak >= self.max_skip_streak:
      return f"the last {int(skip_streak)} steps had a non-finite loss or gradient"
    if loss is not None and math.isfinite(loss):
      if (self.spike_factor > 0 and len(self.losses) >= max(self.window // 2, 1)):
        median = sorted(self.losses)[len(self.losses) // 2]
        if loss > self.spike_factor * median:
          return f"loss {loss:.4g} > {self.spike_factor:g} x the running median {median:.4g}"
      if skip_streak == 0:
        self.losses.append(loss)
    if skip_streak == 0 and step > self.diverged_at:
      self.rollbacks = 0  # past the last divergence: progress
    return None

  def diverged(self, step: int) -> bool:
    """Records a divergence at ``step``; True when a rollback is allowed, False: stop."""
    self.diverged_at = max(self.diverged_at, int(step))
    self.losses.clear()  # the median restarts with the restored run
    if self.rollbacks >= self.max_rollbacks:
      return False
    self.rollbacks += 1
    return True
