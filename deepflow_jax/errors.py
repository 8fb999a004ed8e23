"""User-facing errors and the one-line CLI error convention."""
from __future__ import annotations

import functools
import sys


class UserError(ValueError):
  """Bad input from the user (a file, key, flag or value). One-line message."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """The first line of an exception's message (its type name if empty), for one-line errors."""
  lines = str(e).strip().splitlines()
  return lines[0][:limit] if lines else type(e).__name__


def cli_main(fn):
  """Wraps a CLI ``main(argv) -> int|None``: UserErrors become one line on stderr, exit 2."""

  @functools.wraps(fn)
  def wrapper(argv=None):
    try:
      rc = fn(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130
    return 0 if rc is None else rc

  return wrapper
