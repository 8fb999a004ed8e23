"""SIGTERM / SIGINT as stop requests that long loops check between units of work.

    with StopRequests() as stop:
      for batch in work:
        ...                                  # finish and save the unit in hand
        if stop.requested:
          log(stop.message("generate", "finished batches are kept; rerun to resume"))
          return stop.exit_status            # 143 for SIGTERM, 130 for SIGINT

Handlers are installed only in the main thread (``signal`` allows nothing else)
and the previous ones are restored on exit. A second SIGINT while a stop is
already pending raises ``KeyboardInterrupt`` as usual, so Ctrl-C twice still
breaks out of a stuck step.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_SIGTERM = 143
EXIT_SIGINT = 130
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopRequests:
  """Context manager recording the first SIGTERM / SIGINT received while it is active."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._old: dict[int, object] = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      self.signum = signum

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def exit_status(self) -> int:
    return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM

  def message(self, tag: str, what: str) -> str:
    """One line for the log: ``[tag] SIGTERM: <what>``."""
    return f"[{tag}] {_NAMES.get(self.signum, 'signal')}: {what}"
