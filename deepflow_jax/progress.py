"""Progress-line helpers shared by the long-running commands."""
from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
  """Seconds -> ``[Dd ]HH:MM:SS``; ``?`` when unknown (not finite)."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(max(seconds, 0))
  d, rem = divmod(seconds, 86400)
  h, rem = divmod(rem, 3600)
  m, s = divmod(rem, 60)
  return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
