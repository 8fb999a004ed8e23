"""Whole-file reads and ``.npy`` headers, shared by the latent pipeline and the evaluator.

Both read many ``.npy`` payloads (latent files; arrays inside an ``.npz``) and parse
the header themselves so the data can be viewed without ``np.load``'s per-call cost.
"""
from __future__ import annotations

import numpy as np

from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line


def read_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of the ``.npy`` array at ``fp``, which is left at the
  first data byte. ``ValueError`` if it is not a version 1.0/2.0 ``.npy`` header."""
  version = np.lib.format.read_magic(fp)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
  else:
    raise ValueError(f"unsupported .npy format version {version}")
  return tuple(shape), bool(fortran), np.dtype(dtype)


def read_bytes(path: str, where: str, kind: str) -> bytes:
  """The whole file (one unbuffered read); a ``UserError`` naming ``path (where)`` and
  ``kind`` if it cannot be read."""
  try:
    with open(path, "rb", buffering=0) as f:
      return f.readall()
  except OSError as e:
    raise UserError(f"{path} ({where}): unreadable {kind} "
                    f"({type(e).__name__}: {first_line(e)})") from e
