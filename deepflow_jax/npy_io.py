"""Whole-file reads, ``.npy`` headers and ``.npz`` arrays read in row chunks.

Shared by the latent pipeline and the evaluator: both read many ``.npy`` payloads
(latent files; arrays inside an ``.npz``) and parse the header themselves so the
data can be viewed without ``np.load``'s per-call cost, and the evaluator streams
50,000-image ``.npz`` batches without holding them (``NpzArray``).
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterator

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


class NpzArray:
  """One array of an ``.npz`` (stored or deflated) read in row chunks, never whole.

  ``len()``, ``shape`` and ``dtype`` come from the member's ``.npy`` header;
  ``chunks(rows)`` streams (rows, ...) arrays from the start (each call reopens
  the member, so several passes hold one chunk at a time).
  """

  def __init__(self, path: str, key: str = "arr_0"):
    self.path, self.key = os.fspath(path), key
    zf = open_npz(self.path)
    with zf:
      name = key + ".npy"
      if name not in zf.namelist():
        have = ", ".join(sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))) or "none"
        raise UserError(f"{self.path}: has no {key!r} array (arrays: {have}); expected an "
                        f"ADM-format batch with {key} uint8 (N, H, W, 3)")
      with zf.open(name) as f:
        self.shape, fortran, self.dtype, self._offset = _read_npz_member_header(f, self.path, key)
    if fortran:
      raise UserError(f"{self.path}: {key} is stored in Fortran order; expected a C-ordered array")

  def __len__(self) -> int:
    return int(self.shape[0]) if self.shape else 0

  def chunks(self, rows: int) -> Iterator[np.ndarray]:
    row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with open_npz(self.path) as zf, zf.open(self.key + ".npy") as f:
      f.read(self._offset)
      left = len(self)
      while left:
        n = min(rows, left)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
          raise UserError(f"{self.path}: {self.key} is truncated (expected {len(self)} rows)")
        yield np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))
        left -= n


def open_npz(path: str) -> zipfile.ZipFile:
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected an .npz file")
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f"{path}: not a readable .npz (zip) file ({first_line(e)})") from e


def _read_npz_member_header(f, path: str, key: str):
  try:
    shape, fortran, dtype = read_header(f)
  except ValueError as e:
    raise UserError(f"{path}: {key} is not a readable .npy array ({first_line(e)})") from e
  return shape, fortran, dtype, f.tell()


def npz_keys(path: str) -> tuple[str, ...]:
  """The array names in an ``.npz``."""
  with open_npz(path) as zf:
    return tuple(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
