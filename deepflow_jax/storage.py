"""One path layer for local paths and ``gs://`` URLs (Cloud Storage).

Every file the project reads or writes outside of Orbax goes through here, so a
workdir, an output folder or a data folder may be a local path or a
``gs://bucket/prefix`` URL. Local paths use ``os``; URLs use fsspec's gcsfs
(the same backend ``etils.epath``, Orbax's path type, uses when TensorFlow is
not installed). Checkpoints themselves are Orbax's: tensorstore writes
``gs://`` natively.

Guarantees kept on object storage:

* **Atomic files.** :func:`write_bytes` writes a local file under a temporary
  name and renames it; on ``gs://`` a single-object upload is atomic (readers
  see the old object or the new one), so it is uploaded directly. Nothing here
  renames a directory: object stores have none to rename.
* **Create if absent.** :func:`create_exclusive` is a hard link locally and an
  upload with the precondition ``ifGenerationMatch=0`` on ``gs://``: of several
  writers exactly one wins.
* **Emulators.** ``STORAGE_EMULATOR_HOST`` (what Google's libraries and gcsfs
  read) is enough: :func:`configure_emulator` passes it on to tensorstore as
  ``TENSORSTORE_GCS_HTTP_URL`` unless that is set (and gives tensorstore the
  placeholder token ``GOOGLE_AUTH_TOKEN_FOR_TESTING``, so it does not look for
  credentials an emulator does not check).
* **Faults.** gcsfs retries a failed request with bounded exponential back-off
  (6 tries, about half a minute); what still fails becomes one line naming the
  URL (:class:`StorageError`, a ``UserError``: exit 2).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
from typing import Any, Callable, Iterator

from deepflow_jax.errors import UserError
from deepflow_jax.errors import debug
from deepflow_jax.errors import first_line

GS = "gs://"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
TENSORSTORE_ENV = "TENSORSTORE_GCS_HTTP_URL"


class StorageError(UserError):
  """A request to object storage failed after gcsfs's retries; the message names the URL."""


def is_url(path: Any) -> bool:
  """True for ``gs://...`` (any ``scheme://``): a path that is not on a local disk."""
  return "://" in os.fspath(path) if path is not None else False


def absolute(path: Any) -> str:
  """A URL unchanged (trailing ``/`` dropped); a local path made absolute (``~`` expanded)."""
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{rest.rstrip('/')}"
  return os.path.abspath(os.path.expanduser(path))


def join(base: Any, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joining for URLs."""
  base = os.fspath(base)
  if is_url(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def bucket(url: str) -> str:
  """``gs://bkt/a/b`` -> ``bkt``."""
  return url.split("://", 1)[1].split("/", 1)[0]


# ----------------------------------------------------------------------------
# The gcsfs file system.


def configure_emulator() -> None:
  """With ``STORAGE_EMULATOR_HOST`` set, points tensorstore at it too (unless already set)."""
  host = os.environ.get(EMULATOR_ENV, "")
  if host and host != "default" and TENSORSTORE_ENV not in os.environ:
    os.environ[TENSORSTORE_ENV] = host if "://" in host else f"http://{host}"
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def _fs():
  """The gcsfs file system (listings not cached: other processes write the same bucket)."""
  configure_emulator()
  if not debug():  # gcsfs logs every retry and its bucket-type probe; errors here are one line
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.filesystem("gs", use_listings_cache=False)
  except ImportError as e:
    raise UserError("gs:// paths need gcsfs: pip install 'deepflow-jax[gcs]' (or gcsfs)") from e


def _key(url: str) -> str:
  return url.split("://", 1)[1]


@contextlib.contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
  """Turns what gcsfs raises after its retries into one line naming ``url``.

  FileNotFoundError / FileExistsError pass through (callers handle them).
  """
  try:
    yield
  except (FileNotFoundError, FileExistsError):
    raise
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # aiohttp, google.auth, OSError...
    raise StorageError(f"{url}: cannot {what} ({type(e).__name__}: {first_line(e)})") from e


# ----------------------------------------------------------------------------
# Queries.


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  with _errors(path, "read"):
    return _fs().exists(_key(path))


def isdir(path: str) -> bool:
  """A local directory; on ``gs://``, a prefix holding at least one object."""
  if not is_url(path):
    return os.path.isdir(path)
  with _errors(path, "list"):
    return _fs().isdir(_key(path))


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  with _errors(path, "read"):
    return _fs().isfile(_key(path))


def listdir(path: str) -> list[str]:
  """The names in a folder (sorted); ``[]`` for a missing one."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  with _errors(path, "list"):
    try:
      entries = _fs().ls(_key(path), detail=False)
    except FileNotFoundError:
      return []
  key = _key(path).rstrip("/")
  return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != key})


def generation(path: str) -> str | None:
  """The object's generation (``gs://``), or the file's mtime in ns (local); None if absent."""
  if not is_url(path):
    try:
      return str(os.stat(path).st_mtime_ns)
    except FileNotFoundError:
      return None
  with _errors(path, "read"):
    try:
      return str(_fs().info(_key(path)).get("generation"))
    except FileNotFoundError:
      return None


# ----------------------------------------------------------------------------
# Reads and writes.


def read_bytes(path: str) -> bytes:
  """The file's bytes; FileNotFoundError if there is none."""
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  with _errors(path, "read"):
    return _fs().cat_file(_key(path))


def read_head(path: str, size: int) -> bytes:
  """The first ``size`` bytes (fewer if the file is shorter): a header without the body."""
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read(size)
  with _errors(path, "read"):
    return _fs().cat_file(_key(path), start=0, end=size)


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb"):
  """A file object for reading (``gs://``: downloaded whole first, so seeks are free)."""
  if not is_url(path):
    with open(path, mode) as f:
      yield f
    return
  if "r" not in mode:
    raise ValueError(f"open_file({path!r}, {mode!r}): only reads; write with write_bytes")
  data = read_bytes(path)
  yield io.StringIO(data.decode("utf-8")) if "b" not in mode else io.BytesIO(data)


@contextlib.contextmanager
def local_copy(path: str, what: str) -> Iterator[str]:
  """A local path for ``path``: itself, or for a URL a downloaded copy in a temporary folder
  (removed afterwards) for readers that need a file (zip members, memory maps, torch).

  A missing URL is a one-line UserError (``what``: the flag, for the message), and
  UserErrors raised inside name the URL instead of the copy.
  """
  if not is_url(path):
    yield path
    return
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="deepflow-download-") as d:
    local = os.path.join(d, basename(path))
    with _errors(path, "read"):
      try:
        _fs().get_file(_key(path), local)
      except FileNotFoundError as e:
        raise UserError(f"{what}={path}: no such file") from e
    try:
      yield local
    except UserError as e:
      raise type(e)(str(e).replace(local, path)) from e


def tmp_name(path: str) -> str:
  """``<path>.tmp-<pid>``: this process's temporary name for a local ``path``."""
  return f"{path}.tmp-{os.getpid()}"


def makedirs(path: str) -> None:
  """Creates a local folder and its parents; nothing on ``gs://`` (prefixes need no creation)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (local: temporary + rename; gs://: one upload)."""
  if is_url(path):
    with _errors(path, "write"):
      _fs().pipe_file(_key(path), bytes(data))
    return
  tmp = tmp_name(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def upload(local: str, path: str) -> None:
  """Copies the local file ``local`` to ``path`` as a whole (gs://: one upload, resumable for
  big files, so the object appears complete or not at all)."""
  if not is_url(path):
    import shutil  # pylint: disable=g-import-not-at-top
    tmp = tmp_name(path)
    try:
      shutil.copyfile(local, tmp)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
      raise
    return
  with _errors(path, "write"):
    _fs().put_file(local, _key(path))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_with(path: str, write: Callable[[Any], None]) -> None:
  """``write(file object)`` into memory, then :func:`write_bytes` (e.g. PIL, ``np.save``)."""
  buf = io.BytesIO()
  write(buf)
  write_bytes(path, buf.getvalue())


def create_exclusive(path: str, data: bytes) -> bool:
  """Creates ``path`` holding ``data`` unless it exists; True if this call created it.

  Atomic among processes and hosts: locally a temporary file hard-linked to
  ``path`` (check-then-rename where links are missing); on ``gs://`` an upload
  with ``ifGenerationMatch=0``.
  """
  if is_url(path):
    with _errors(path, "write"):
      try:
        _fs().pipe_file(_key(path), bytes(data), mode="create")
        return True
      except FileExistsError:
        return False
  tmp = tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # no hard links here
    if os.path.exists(path):
      return False
    os.replace(tmp, path)
    return True
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def remove(path: str) -> bool:
  """Removes the file ``path``; True if there was one."""
  if not is_url(path):
    try:
      os.remove(path)
      return True
    except FileNotFoundError:
      return False
  with _errors(path, "remove"):
    try:
      _fs().rm_file(_key(path))
      return True
    except FileNotFoundError:
      return False


def remove_if_generation(path: str, gen: str) -> bool:
  """Removes ``path`` only if it is still the version ``gen`` (:func:`generation`); True if so.

  On ``gs://`` the delete carries ``ifGenerationMatch``; locally it is
  check-then-remove (a race there is between processes of one host).
  """
  if not is_url(path):
    if generation(path) != gen:
      return False
    return remove(path)
  fs = _fs()
  b, key = _key(path).split("/", 1)
  with _errors(path, "remove"):
    try:
      fs.call("DELETE", "b/{}/o/{}", b, key, ifGenerationMatch=gen)
      return True
    except (FileNotFoundError, OSError) as e:
      if isinstance(e, FileNotFoundError) or "412" in str(e) or "recondition" in str(e):
        return False
      raise


def copy_tree(src: str, dst: str) -> None:
  """Copies every file under ``src`` to the same relative path under ``dst``."""
  if not is_url(src) and not is_url(dst):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.copytree(src, dst)
    return
  for rel in walk_files(src):
    write_bytes(join(dst, rel), read_bytes(join(src, rel)))


def walk_files(path: str) -> list[str]:
  """Every file under ``path``, relative to it, sorted."""
  if not is_url(path):
    out = []
    for dirpath, _, files in os.walk(path):
      out += [os.path.relpath(os.path.join(dirpath, f), path) for f in files]
    return sorted(out)
  with _errors(path, "list"):
    key = _key(path).rstrip("/") + "/"
    return sorted(p[len(key):] for p in _fs().find(key))


def rmtree(path: str) -> None:
  """Removes a folder (a prefix's objects on ``gs://``); nothing if it is missing."""
  if not is_url(path):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path, ignore_errors=True)
    return
  with _errors(path, "remove"):
    fs = _fs()
    files = fs.find(_key(path).rstrip("/") + "/")
    if files:
      fs.rm(files)


def move_tree(src: str, dst: str) -> None:
  """Moves a folder: a rename locally; on ``gs://`` copy then delete (not atomic: for setting
  aside unreadable data only, never for committing)."""
  if not is_url(src) and not is_url(dst):
    os.replace(src, dst)
    return
  copy_tree(src, dst)
  rmtree(src)


def check_bucket(url: str, flag: str) -> None:
  """Refuses, with one line, a ``gs://`` URL whose bucket is missing or not readable.

  Called before anything is built or compiled; local paths pass.
  """
  if not is_url(url):
    return
  if not url.startswith(GS):
    raise UserError(f"{flag}={url}: only local paths and gs:// URLs are supported")
  name = bucket(url)
  if not name:
    raise UserError(f"{flag}={url}: no bucket name (expected gs://BUCKET/PATH)")
  try:
    fs = _fs()
    fs.ls(name, detail=False)  # lists the bucket: needs it to exist and to be readable
  except FileNotFoundError as e:
    raise UserError(f"{flag}={url}: no bucket {name!r} (create it first: gcloud storage "
                    f"buckets create gs://{name})") from e
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # refused credentials, network
    raise StorageError(f"{flag}={url}: cannot read bucket {name!r} ({type(e).__name__}: "
                       f"{first_line(e)}); check the credentials (gcloud auth "
                       "application-default login) and the bucket's permissions") from e
