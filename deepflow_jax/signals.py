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

Phases with nothing to save mid-way (evaluation) use ``raise_now=True``: the
signal raises ``Stopped`` at once, which ``errors.cli_main`` turns into one line
and the exit status. In a multi-process JAX job SIGTERM is left to JAX's
preemption notifier (``sigterm=False``), whose sync point makes every process
stop at the same step.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

from deepflow_jax.errors import Stopped

EXIT_SIGTERM = 143
EXIT_SIGINT = 130
_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


_EARLY: list[int] = []  # the first signal recorded by record_early_signals, not yet taken


def _record(signum, frame) -> None:
  del frame
  if not _EARLY:
    _EARLY.append(signum)


def record_early_signals() -> None:
  """Records the first SIGTERM / SIGINT from now on; the next ``StopRequests`` takes it.

  Entry points call this before importing JAX (seconds): a signal during the
  start-up is then honoured (the run stops before compiling, nothing saved)
  instead of being lost or showing an import traceback.
  """
  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGTERM, signal.SIGINT):
      signal.signal(s, _record)


class StopRequests:
  """Context manager recording the first SIGTERM / SIGINT received while it is active.

  Args:
    sigterm: also handle SIGTERM (False in multi-process jobs, see the module doc).
    raise_now: raise ``Stopped`` from the handler instead of only recording it;
      ``what`` says in that message what was (not) kept.
  """

  def __init__(self, *, sigterm: bool = True, raise_now: bool = False,
               what: str = "stopped; nothing was written"):
    self.signum: Optional[int] = None
    self._old: dict[int, object] = {}
    self._signals = (signal.SIGTERM, signal.SIGINT) if sigterm else (signal.SIGINT,)
    self._raise_now, self._what = raise_now, what

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._old[s] = signal.signal(s, self._on_signal)
      early = _EARLY.pop(0) if _EARLY and _EARLY[0] in self._signals else None
      if early is not None:  # arrived while the program was still starting
        self._on_signal(early, None)
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
      if self._raise_now:
        raise Stopped(f"{_NAMES.get(signum, 'signal')}: {self._what}", self.exit_status)

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def exit_status(self) -> int:
    return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM

  def message(self, tag: str, what: str) -> str:
    """One line for the log: ``[tag] SIGTERM: <what>``."""
    return f"[{tag}] {_NAMES.get(self.signum, 'signal')}: {what}"
