"""One writer per folder: a lock file naming the run that writes a workdir or an output folder.

``FOLDER/.writer.lock`` is a JSON record ``{host, pid, started, heartbeat,
token}``. A run creates it if absent (``storage.create_exclusive``: a hard link
locally, an upload with ``ifGenerationMatch=0`` on ``gs://``, so of two runs
starting at once exactly one wins), rewrites ``heartbeat`` every
``HEARTBEAT_S`` seconds while it runs, and removes the file when it ends.

A second run finding the lock is refused with one line naming the holder
(host, process id, start time) before it touches anything. The lock of a run
that died without removing it (SIGKILL, a lost host) is **stale** and is taken
over when either

* it names this host and its process id is not running, or
* its heartbeat is older than ``STALE_S`` seconds (10 minutes; the clocks of
  the hosts are assumed to agree within a minute, as NTP keeps them).

Takeover deletes the stale lock only if it is still the version that was read
(a generation precondition on ``gs://``), then creates a new one as above.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from deepflow_jax import storage
from deepflow_jax.errors import UserError

LOCK_FILE = ".writer.lock"  # hidden: a fresh output folder may hold it (outputs.OutputFolder)
HEARTBEAT_S = 60.0
STALE_S = 600.0


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def _when(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def is_stale(record: dict, now: Optional[float] = None, host: Optional[str] = None) -> bool:
  """True when the holder is gone (see the module docstring for the rule)."""
  now = time.time() if now is None else now
  host = socket.gethostname() if host is None else host
  try:
    if record.get("host") == host and not _pid_running(int(record["pid"])):
      return True
    return now - float(record["heartbeat"]) > STALE_S
  except (KeyError, TypeError, ValueError):  # not a lock we wrote: a heartbeat that never was
    return True


def describe(record: dict) -> str:
  """``host H, process id P, started T (last heartbeat Ns ago)``."""
  try:
    ago = f"{time.time() - float(record['heartbeat']):.0f} s ago"
  except (KeyError, TypeError, ValueError):
    ago = "unknown"
  started = record.get("started")
  started = _when(float(started)) if isinstance(started, (int, float)) else "unknown"
  return (f"host {record.get('host', '?')}, process id {record.get('pid', '?')}, started "
          f"{started} (last heartbeat {ago})")


class WriterLock:
  """The lock of ``folder`` (a local path or ``gs://`` URL); ``acquire`` / ``release``.

  Args:
    folder: the workdir or output folder.
    flag: how the refusal names the folder (``--workdir``, ``--output``).
    log: where a takeover is reported.
  """

  def __init__(self, folder: str, *, flag: str, log: Callable[[str], None] = print):
    self.folder = storage.absolute(folder)
    self.path = storage.join(self.folder, LOCK_FILE)
    self.flag, self.log = flag, log
    self.record: Optional[dict] = None
    self._created_folder = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _read(self) -> tuple[Optional[dict], Optional[str]]:
    """(record, generation) of the lock on disk; (None, None) if there is none."""
    gen = storage.generation(self.path)
    if gen is None:
      return None, None
    try:
      return json.loads(storage.read_text(self.path)), gen
    except FileNotFoundError:
      return None, None
    except ValueError:
      return {}, gen  # a torn or foreign file: stale by is_stale's rule

  def acquire(self) -> "WriterLock":
    """Holds the lock or raises UserError naming the holder (nothing written then)."""
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
              "heartbeat": now, "token": uuid.uuid4().hex}
    if not storage.is_url(self.folder) and not os.path.isdir(self.folder):
      if os.path.exists(self.folder):
        raise UserError(f"{self.flag} {self.folder}: exists and is not a directory")
      storage.makedirs(self.folder)
      self._created_folder = True
    try:
      for _ in range(5):
        if storage.create_exclusive(self.path, json.dumps(record).encode()):
          self.record = record
          self._start_heartbeat()
          return self
        held, gen = self._read()
        if held is None:
          continue  # released between the two calls
        if not is_stale(held):
          raise UserError(f"{self.flag} {self.folder} is in use by another run: "
                          f"{describe(held)}; lock {self.path}. Wait for it to end, or remove "
                          f"the lock if that run is gone (it counts as stale after "
                          f"{STALE_S:.0f} s without heartbeat)")
        if storage.remove_if_generation(self.path, gen):
          self.log(f"took over the stale lock {self.path} of {describe(held)}")
      raise UserError(f"{self.flag} {self.folder}: could not take the lock {self.path} "
                      "(other runs keep taking it); try again")
    except BaseException:
      self._undo_folder()
      raise

  def _undo_folder(self) -> None:
    if self._created_folder:
      try:
        os.rmdir(self.folder)  # only if still empty: a refused run creates nothing
      except OSError:
        pass

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="deepflow-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self.heartbeat()
      except Exception as e:  # pylint: disable=broad-except  # a transient storage fault
        self.log(f"WARNING: lock heartbeat to {self.path} failed ({e}); retrying")

  def heartbeat(self) -> bool:
    """Rewrites the heartbeat; False (and a warning) when another run took the lock over."""
    if self.record is None:
      return False
    held, _ = self._read()
    if not held or held.get("token") != self.record["token"]:
      self.log(f"WARNING: {self.path} is now held by {describe(held or {})}; this run no "
               "longer holds its folder")
      self._stop.set()
      return False
    self.record["heartbeat"] = time.time()
    storage.write_text(self.path, json.dumps(self.record))
    return True

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if this run still holds it; safe to call twice."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
    if self.record is None:
      return
    try:
      held, gen = self._read()
      if held and held.get("token") == self.record["token"]:
        storage.remove_if_generation(self.path, gen)
    finally:
      self.record = None
      self._undo_folder()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
