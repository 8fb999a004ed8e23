"""User-facing errors and the one error path every entry point shares.

* ``UserError``: bad input from the user (a flag, config key or value, file or
  data). Its message is one line naming what was wrong and what was expected.
* ``cli_main``: wraps an entry point's ``main(argv)``: a ``UserError`` becomes
  ``error: ...`` on stderr and exit status 2; ``Stopped`` (SIGTERM / SIGINT in a
  phase with nothing to save) one ``stopped by ...`` line and 143 / 130; ``Diverged``
  (training gave up after its rollbacks) one ``error: ...`` line and exit 3; Ctrl-C
  outside a handled phase exits 130 with one line; any other exception is
  reported in one line (exit 1) unless ``DEEPFLOW_DEBUG=1`` is set, which shows
  the full traceback.
* ``ArgumentParser``: argparse with one-line errors (exit 2, no usage dump) and
  defaults shown in ``--help``.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import re
import sys
import threading

DEBUG_ENV = "DEEPFLOW_DEBUG"
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(ValueError):
  """Bad input from the user (a file, key, flag or value). One-line message."""


class Stopped(Exception):
  """A signal stopped the run (see ``deepflow_jax.signals``): one line, then ``exit_status``."""

  def __init__(self, message: str, exit_status: int):
    self.exit_status = exit_status
    super().__init__(message)


class Diverged(Exception):
  """Training diverged again after ``train.max_rollbacks`` rollbacks: one line, exit 3."""

  exit_status = EXIT_DIVERGED


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message (its type name if empty), for one-line errors."""
  lines = str(e).strip().splitlines()
  return lines[0][:limit] if lines else type(e).__name__


# OSErrors that are the machine's, not the program's: a full disk, a read-only
# mount, missing permission; reported in one line naming the file, exit 2.
_FILE_SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.ENOTDIR, errno.EFBIG)


def file_system_error(e: BaseException):
  """The OSError of a full disk / read-only mount / permission problem in ``e``'s chain, or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FILE_SYSTEM_ERRNOS:
      return e
    e = e.__cause__ or e.__context__
  return None


def file_system_message(e: OSError) -> str:
  """``PATH: No space left on device (...)``; Orbax's temporary names shown as the final ones."""
  path = re.sub(r"\.orbax-checkpoint-tmp[^/\\]*", "", str(e.filename)) if e.filename else None
  what = e.strerror or type(e).__name__
  return (f"{path + ': ' if path else ''}{what} (errno {errno.errorcode.get(e.errno, e.errno)}); "
          "nothing partial was kept: free space or fix the permissions, then rerun")


def _quiet_exit() -> None:
  """After a failed write was reported: the writers' background threads (Orbax,
  TensorStore) still failing at shutdown print nothing more."""
  sys.excepthook = lambda *args: None
  sys.unraisablehook = lambda *args: None
  threading.excepthook = lambda *args: None


def debug() -> bool:
  """True when ``DEEPFLOW_DEBUG`` asks for tracebacks instead of one-line errors."""
  return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def print_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


def cli_main(fn):
  """Wraps a CLI ``main(argv) -> int|None`` with the shared error path (see the module doc)."""

  @functools.wraps(fn)
  def wrapper(argv=None):
    try:
      rc = fn(argv)
    except UserError as e:
      if debug():
        raise
      print_error(str(e))
      return EXIT_USER_ERROR
    except Stopped as e:
      print(f"stopped by {e}", file=sys.stderr, flush=True)
      return e.exit_status
    except Diverged as e:
      print_error(str(e))
      return EXIT_DIVERGED
    except KeyboardInterrupt:
      if debug():
        raise
      print("interrupted (SIGINT)", file=sys.stderr, flush=True)
      return 130
    except Exception as e:  # pylint: disable=broad-except
      if debug():
        raise
      fs = file_system_error(e)
      if fs is not None:
        print_error(file_system_message(fs))
        _quiet_exit()
        return EXIT_USER_ERROR
      print_error(f"internal error ({type(e).__name__}: {first_line(e)}); rerun with "
                  f"{DEBUG_ENV}=1 for the traceback")
      return 1
    return 0 if rc is None else rc

  return wrapper


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the shared error path: one ``error:`` line, exit 2; defaults in --help."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    print_error(f"{message} (see {self.prog} --help)")
    sys.exit(EXIT_USER_ERROR)
