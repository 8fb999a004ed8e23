"""Resumable output folders: settings manifest, atomic files, finished markers, digests.

A long job (encoding a dataset to latents, generating samples) writes into an
output folder, and rerunning the same command resumes it. The rules every such
job follows are kept here:

* **Manifest.** The settings that determine the output are recorded in a JSON
  manifest ``{<format key>: FORMAT, "settings": {...}, <info key>: {...}}``
  when the folder is first used (:meth:`OutputFolder.open`). A rerun compares
  its settings with the recorded ones; if any differ it is refused with one line
  that lists every differing key, and nothing in the folder is touched. ``info``
  (paths, class names, the first run's batch size, ...) is recorded but not
  compared.
* **Fresh folders only.** A folder without the manifest must be missing or
  empty (hidden entries such as ``.DS_Store`` aside; and the manifest's own
  folder holding only the manifest or its temporary files, which another process
  may be writing at the same moment). Anything else is refused, so a job never
  mixes its files with unrelated ones. A refused run creates nothing: the folder
  and the manifest are created only after every check has passed.
* **Atomic files.** Every file is written under a temporary name,
  :func:`tmp_name` ``(path) = <path>.tmp-<pid>``, then ``os.replace``-d to its
  name, so a file that exists under its final name is complete. A ``gs://``
  file is written to a local temporary file and uploaded in one request
  (``deepflow_jax.storage``: a single-object upload is atomic).
* **Stale temporaries.** A killed run leaves ``<name>.tmp-<pid>`` files (and
  older versions ``<name>.tmp``); :func:`remove_stale_tmp` removes those in a
  folder (or only those whose final name a predicate owns, for folders shared by
  several live processes).
* **Finished markers.** A unit of work (a shard, a batch) is done when its
  marker exists: a file written last and atomically (a JSON record via
  :func:`mark_finished`, or the unit's last data file itself).
* **Digests.** :func:`tree_digest` fingerprints a parameter tree for the
  manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
from PIL import Image

from deepflow_jax import storage
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line

TMP_TAG = ".tmp"
# "<name>.tmp-<pid>" (this module) or "<name>.tmp" (older preprocess versions).
_TMP_RE = re.compile(r"\.tmp(-\d+)?$")


# ----------------------------------------------------------------------------
# Temporary names and atomic writes.


def tmp_name(path: str) -> str:
  """``<path>.tmp-<pid>``: this process's temporary name for ``path``."""
  return f"{path}{TMP_TAG}-{os.getpid()}"


def is_tmp_name(name: str) -> bool:
  """True for ``<x>.tmp-<digits>`` and ``<x>.tmp`` (a temporary file of any run)."""
  return _TMP_RE.search(name) is not None


def final_name(name: str) -> str:
  """The name a temporary file would have been renamed to (``<x>.tmp-12`` -> ``<x>``)."""
  return _TMP_RE.sub("", name)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp)`` to write :func:`tmp_name` ``(path)``, then renames it to ``path``.

  If ``write`` raises, the temporary file is removed and ``path`` is untouched.
  A ``gs://`` path: ``write`` writes a local temporary file, uploaded in one request.
  """
  if storage.is_url(path):
    with tempfile.TemporaryDirectory(prefix="deepflow-upload-") as d:
      tmp = os.path.join(d, storage.basename(path))
      write(tmp)
      storage.upload(tmp, path)
    return
  tmp = tmp_name(path)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    remove_if_exists(tmp)
    raise


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""

  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)

  atomic_write(path, write)


def json_bytes(obj: Any) -> bytes:
  """The JSON text every file of this module holds: ``indent=1``, a final newline, UTF-8."""
  return (json.dumps(obj, indent=1) + "\n").encode()


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON (:func:`json_bytes`) to ``path`` atomically."""
  atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  """Saves ``array`` as ``.npy`` (no pickle) to ``path`` atomically."""

  def write(tmp):
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(array), allow_pickle=False)

  atomic_write(path, write)


def atomic_save_png(path: str, image: np.ndarray, *, compress_level: int | None = None) -> None:
  """Saves a uint8 ``(H, W, 3)`` (or ``(H, W)``) image as PNG to ``path`` atomically.

  ``compress_level`` is PIL's zlib level (0: uncompressed, as the reference
  stores its crops); None keeps PIL's default.
  """
  kw = {} if compress_level is None else {"compress_level": int(compress_level)}

  def write(tmp):
    Image.fromarray(np.asarray(image)).save(tmp, format="PNG", **kw)

  atomic_write(path, write)


def check_file_path(path: str | None, name: str) -> None:
  """Refuses, before any work, a path that cannot become a file (``name``: the flag or
  key that gave it, for the message)."""
  if path is None or storage.is_url(path):
    return
  if os.path.isdir(path):
    raise UserError(f"{name}={path}: is a directory, expected a file path")
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f"{name}={path}: {parent} is not a directory")


def read_json(path: str) -> Any | None:
  """The JSON document at ``path``; None if there is no file; UserError if it is unreadable."""
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({first_line(e)}); remove it or use a new output "
                    "folder") from e


def remove_if_exists(path: str) -> bool:
  """Removes the file ``path``; True if there was one."""
  return storage.remove(path)


def remove_stale_tmp(directory: str, *, owned: Callable[[str], bool] | None = None,
                     recursive: bool = False) -> list[str]:
  """Removes temporary files (:func:`is_tmp_name`) left in ``directory`` by killed runs.

  Args:
    directory: the folder to clean (a missing folder is left alone).
    owned: if given, only temporaries whose final path (``os.path.join(directory,
      final_name(name))``) it accepts are removed: in a folder that several live
      processes write, each removes only the temporaries of files it owns.
    recursive: also clean every sub-folder.

  Returns:
    The removed paths.
  """
  removed = []
  if storage.is_url(directory) or not os.path.isdir(directory):
    return removed  # gs:// uploads leave no temporaries
  for dirpath, dirnames, filenames in os.walk(directory):
    if not recursive:
      dirnames[:] = []
    for name in filenames:
      if not is_tmp_name(name):
        continue
      if owned is not None and not owned(os.path.join(dirpath, final_name(name))):
        continue
      path = os.path.join(dirpath, name)
      if remove_if_exists(path):
        removed.append(path)
  return removed


def create_exclusive(path: str, data: bytes) -> bool:
  """Creates ``path`` holding ``data`` unless it exists; True if this call created it.

  Atomic among processes (the content is written to a temporary file, which is
  hard-linked to ``path``): of several processes creating the same file at once,
  exactly one wins and the others see its complete content. On a file system
  without hard links it falls back to check-then-rename (best effort); on
  ``gs://`` it is an upload with ``ifGenerationMatch=0`` (``storage``).
  """
  return storage.create_exclusive(path, data)


# ----------------------------------------------------------------------------
# Finished markers.


def mark_finished(path: str, record: Mapping[str, Any]) -> None:
  """Marks a unit of work done: writes its JSON ``record`` to ``path``, atomically, last."""
  atomic_write_json(path, dict(record))


def finished_record(path: str) -> dict | None:
  """The record of a finished unit (:func:`mark_finished`), None if it is not finished."""
  return read_json(path)


# ----------------------------------------------------------------------------
# Digests.


def tree_digest(tree: Any) -> str:
  """A 32-hex-digit BLAKE2b digest of a pytree's leaves (e.g. model parameters).

  Every leaf, in ``jax.tree_util`` flattening order, contributes its path
  (``keystr``), dtype, shape and bytes (C order, host copy), so any change of
  a value, a name, a dtype or a shape changes the digest. Works for numpy and
  jax arrays of any dtype (bfloat16 included) and for Python scalars.
  """
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(a.reshape(-1).view(np.uint8).data)
  return h.hexdigest()


# ----------------------------------------------------------------------------
# The manifest and the folder.

_ABSENT = object()


def _as_json(obj: Mapping[str, Any]) -> dict:
  """``obj`` as it reads back from JSON (tuples become lists), so comparisons are like for like."""
  return json.loads(json.dumps(dict(obj)))


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                  labels: Mapping[str, str] | None = None) -> list[str]:
  """One item per key whose value differs, sorted by key: ``"key: OLD there, NEW now"``.

  ``labels`` replaces the values of opaque keys (digests) with a phrase:
  ``{"vae_digest": "the VAE weights differ"}`` -> ``"vae_digest: the VAE weights differ"``.
  A key present on one side only shows as ``absent`` on the other.
  """
  labels = labels or {}
  show = lambda v: "absent" if v is _ABSENT else repr(v)
  items = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
    if a == b:  # _ABSENT equals only itself, and a key is never absent on both sides
      continue
    items.append(f"{k}: {labels[k]}" if k in labels else f"{k}: {show(a)} there, {show(b)} now")
  return items


class OutputFolder:
  """An output folder that a job fills and a rerun of the same job resumes.

  Args:
    path: the folder (made absolute; created by :meth:`open`).
    manifest: the manifest's path inside the folder, e.g. ``"manifest.json"``
      or ``"progress/settings.json"``.
    format: the format string recorded in the manifest; a manifest with another
      one is refused.
    what: how messages name the folder's content, e.g. ``"a preprocess output"``.
    format_key, info_key: the manifest's keys for the format string and for the
      recorded-but-not-compared information.
    labels: phrases for opaque settings in the mismatch message
      (see :func:`settings_diff`).
    flag: how messages name the option that chose the folder.

  Typical use (one process owns the folder)::

      folder = OutputFolder(out, manifest="manifest.json", format="me/v1", what="samples")
      doc, resumed = folder.open(settings, info)      # refuses, or records / checks settings
      remove_stale_tmp(folder.path, recursive=True)   # what a killed run left
  """

  def __init__(self, path: str, *, manifest: str,
               format: str,  # pylint: disable=redefined-builtin
               what: str, format_key: str = "format", info_key: str = "info",
               labels: Mapping[str, str] | None = None, flag: str = "--output"):
    self.path = storage.absolute(path)
    self.manifest = manifest
    self.format, self.what = format, what
    self.format_key, self.info_key = format_key, info_key
    self.labels = dict(labels or {})
    self.flag = flag

  @property
  def manifest_path(self) -> str:
    return storage.join(self.path, self.manifest)

  def join(self, *parts: str) -> str:
    """A path inside the folder."""
    return storage.join(self.path, *parts)

  def read_manifest(self) -> dict | None:
    """The manifest document; None if absent; UserError if unreadable or of another format."""
    doc = read_json(self.manifest_path)
    if doc is None:
      return None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
      raise UserError(f"{self.manifest_path}: not a manifest (no settings); use a new {self.flag}")
    if doc.get(self.format_key) != self.format:
      raise UserError(f"{self.manifest_path}: format {doc.get(self.format_key)!r}, expected "
                      f"{self.format!r} (written by another version?); use a new {self.flag}")
    return doc

  def is_fresh(self) -> bool:
    """True for a missing or empty folder (see the module docstring for what is tolerated)."""
    parts = self.manifest.replace(os.sep, "/").split("/")
    directory = self.path
    for depth, part in enumerate(parts):
      if not storage.isdir(directory):
        return True
      last = depth == len(parts) - 1
      for entry in storage.listdir(directory):
        if entry.startswith("."):
          continue
        if last and (entry == part or (is_tmp_name(entry) and final_name(entry) == part)):
          continue
        if not last and entry == part and storage.isdir(storage.join(directory, entry)):
          continue
        return False
      directory = storage.join(directory, part)
    return True

  def check(self, settings: Mapping[str, Any]) -> dict | None:
    """The manifest if the folder holds a run with ``settings``; None if the folder is fresh.

    Raises UserError (one line; nothing is written) if the path is not a folder,
    if the folder is neither fresh nor holds a manifest, or if its manifest
    records other settings (every differing key is listed).
    """
    if (not storage.is_url(self.path) and os.path.exists(self.path)
        and not os.path.isdir(self.path)):
      raise UserError(f"{self.flag} {self.path}: exists and is not a directory")
    settings = _as_json(settings)
    doc = self.read_manifest()
    if doc is None:
      if not self.is_fresh():
        raise UserError(f"{self.flag} {self.path}: not empty and not {self.what} (no "
                        f"{self.manifest}); choose an empty or new folder")
      return None
    diff = settings_diff(doc["settings"], settings, self.labels)
    if diff:
      raise UserError(f"{self.flag} {self.path} holds {self.what} made with other settings "
                      f"({'; '.join(diff)}); nothing was changed. Rerun with the same settings "
                      f"to resume, or use a new {self.flag}")
    return doc

  def open(self, settings: Mapping[str, Any],
           info: Mapping[str, Any] | None = None) -> tuple[dict, bool]:
    """Checks the folder (:meth:`check`), then records the settings if it is fresh.

    Returns ``(manifest document on disk, resumed)``, ``resumed`` being True when
    a manifest was already there. The folder and the manifest are created only
    after the checks pass. Several processes may open the same fresh folder at
    once: one manifest wins (:func:`create_exclusive`) and every process checks
    its settings against it.
    """
    doc = self.check(settings)
    if doc is not None:
      return doc, True
    storage.makedirs(storage.dirname(self.manifest_path))
    created = create_exclusive(self.manifest_path, json_bytes(
        {self.format_key: self.format, "settings": _as_json(settings),
         self.info_key: _as_json(info or {})}))
    doc = self.check(settings)
    if doc is None:  # cannot happen: the manifest was just created
      raise RuntimeError(f"{self.manifest_path}: missing right after it was written")
    return doc, not created
