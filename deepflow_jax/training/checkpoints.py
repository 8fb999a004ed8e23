"""Training checkpoints: Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``.

Each checkpoint holds two items (names in ``deepflow_jax.workdir``):

* ``state``: the whole ``TrainState`` (parameters, EMA parameters, optimiser
  state, step, RNG), restored straight into its sharded layout;
* ``data``: the input iterator's state (JSON), so a resumed run reads exactly
  the batches an uninterrupted run would.

Saves are asynchronous (training continues while the previous save is written)
and atomic: locally Orbax writes into a temporary directory and renames it when
complete; on ``gs://`` (no directory rename there) it writes ``<step>/`` in
place and commits it by writing ``commit_success.txt`` last, and a step without
that file is never listed as a checkpoint. A run killed mid-save leaves no half
checkpoint that a resume would take. Only the
last ``keep`` are kept. ``restore_latest`` falls back to the previous
checkpoint, with a warning naming the bad one, when the newest cannot be read
(``workdir.restore_newest``), and sets the bad ones aside.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepflow_jax import storage
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"params/blocks_0/...": shape}`` of a state tree (arrays, shape structs or metadata)."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


TMP_MARK = ".orbax-checkpoint-tmp"  # in the names of Orbax's unfinished save directories


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    storage.configure_emulator()  # tensorstore reads TENSORSTORE_GCS_HTTP_URL
    self.directory = workdir_lib.checkpoint_dir(workdir)
    _quiet_orbax_errors()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=False,  # the directory appears with the first save, not before
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=workdir_lib.ITEM_NAMES)
    self._closed = False
    self._failed = False  # a save failed: close removes what it left

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict], *, force: bool = False
           ) -> bool:
    """Starts saving ``state`` and the data iterator state at ``step`` (asynchronously)."""
    try:  # also raises the previous save's failure (a full disk)
      with self._storage_errors(f"save checkpoint {step}"):
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(**{
                workdir_lib.STATE_ITEM: ocp.args.StandardSave(state),
                workdir_lib.DATA_ITEM: ocp.args.JsonSave(data_state or {})}),
            force=force)
    except BaseException:
      self._failed = True
      _drop_closed_loop_noise()
      raise

  @contextlib.contextmanager
  def _storage_errors(self, what: str):
    """On gs://, a save that failed after tensorstore's / gcsfs's retries (or Orbax's timeout)
    becomes one line naming the checkpoint folder; the step stays uncommitted (no commit
    file), so the next run resumes from the last committed one."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # tensorstore, aiohttp, Orbax
      if not storage.is_url(self.directory) or isinstance(e, UserError):
        raise
      raise storage.StorageError(
          f"{self.directory}: cannot {what} ({type(e).__name__}: {first_line(e)}); the last "
          "committed checkpoint is kept, rerun to resume from it") from e

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data_state) from the newest readable checkpoint, or None.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings:
    arrays come back in that layout. Unreadable checkpoints newer than the one
    restored are moved (not deleted) to ``WORKDIR/unreadable_checkpoints/`` so
    the resumed run can save those steps again.
    """
    def restore(step):
      return self.manager.restore(step, args=ocp.args.Composite(**{
          workdir_lib.STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          workdir_lib.DATA_ITEM: ocp.args.JsonRestore()}))

    step, restored, bad = workdir_lib.restore_newest(self.directory, self.all_steps(), restore)
    if bad:
      self._set_aside(bad)
    if step is None:
      return None
    return (step, restored[workdir_lib.STATE_ITEM],
            dict(restored[workdir_lib.DATA_ITEM] or {}))

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """``{"params/blocks_0/...": shape}`` of checkpoint ``step``'s state, from its metadata
    alone (nothing restored); raises when the metadata cannot be read."""
    path = storage.join(self.directory, str(step), workdir_lib.STATE_ITEM)
    with ocp.StandardCheckpointer() as c:
      meta = c.metadata(path).item_metadata
    return tree_shapes(meta)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The ``TrainState`` of checkpoint ``step`` alone (a rollback keeps the data where it is)."""
    self.manager.wait_until_finished()
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        workdir_lib.STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[workdir_lib.STATE_ITEM]

  def set_aside(self, steps: list[int]) -> None:
    """Moves checkpoints ``steps`` (not deleted) to ``WORKDIR/unreadable_checkpoints/``."""
    self._set_aside(steps)

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("deepflow_jax:unreadable_checkpoints")
    if jax.process_index() == 0:
      aside = storage.join(storage.dirname(self.directory), workdir_lib.UNREADABLE_DIR)
      storage.makedirs(aside)
      taken = set(storage.listdir(aside))
      for step in steps:
        name, n = str(step), 1
        while name in taken:
          name, n = f"{step}.{n}", n + 1
        dest = storage.join(aside, name)
        storage.move_tree(storage.join(self.directory, str(step)), dest)
        print(f"moved unreadable checkpoint {step} to {dest}", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("deepflow_jax:unreadable_checkpoints_moved")
    self.manager.reload()

  def wait(self) -> None:
    with self._storage_errors("finish saving"):
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager; safe to call twice.

    A save that failed (a full disk) raises its error here, once; its temporary
    directory is removed either way, so only committed checkpoints remain.
    """
    if self._closed:
      return
    self._closed = True
    try:
      with self._storage_errors("finish saving"):
        self.manager.wait_until_finished()
      self.manager.close()
    except BaseException:
      self._failed = True
      _drop_closed_loop_noise()
      raise
    finally:
      if self._failed:
        try:
          self.manager.close()
        except Exception:  # pylint: disable=broad-except  # the failed save's error is raised
          pass
        # The failed save's other writers (TensorStore threads) may still be finishing.
        self._remove_partial(settle_s=1.0)
        atexit.register(self._remove_partial)

  def _remove_partial(self, settle_s: float = 0.0) -> None:
    """Deletes the temporary directories of saves that did not complete (process 0), again
    until none has reappeared for ``settle_s`` seconds (at most 20 tries)."""
    if jax.process_index() != 0:
      return
    quiet_since = time.monotonic()
    for _ in range(20):
      names = [n for n in (os.listdir(self.directory) if os.path.isdir(self.directory) else [])
               if TMP_MARK in n]
      for name in names:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      if names:
        quiet_since = time.monotonic()
      if time.monotonic() - quiet_since >= settle_s:
        return
      time.sleep(0.1)


class _OrbaxErrorFilter(logging.Filter):
  """Drops Orbax's own error logs (with tracebacks, several per failed background save):
  the failure is raised to the caller, which reports it in one line. Also drops its
  "Waiting for previous save to complete took N seconds" warning, logged at every save
  that starts while the previous one is still writing (frequent saves, a slow disk or
  bucket): the wait is part of the step time the progress line reports, and the warning
  broke the one-line contract of a run's stderr."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return False
    return not str(record.msg).startswith("Waiting for previous save to complete")


_CLOSED_LOOP = ("Event loop is closed", "cannot schedule new futures after")


class _OrphanedWriteFilter(logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports (a traceback each): after a
  failed save, its sibling writes into the same temporary checkpoint fail too and nobody
  awaits them; the failure itself is raised and reported in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


def _drop_closed_loop_noise() -> None:
  """After a failed save: the writers it left (TensorStore callbacks into Orbax's closed event
  loops, orphaned asyncio tasks) print one traceback each, hundreds; those alone are
  dropped, nothing else."""
  if getattr(sys.excepthook, "drops_closed_loop", False):
    return
  logging.getLogger("asyncio").addFilter(_OrphanedWriteFilter())
  noise = lambda e: isinstance(e, RuntimeError) and str(e).startswith(_CLOSED_LOOP)
  excepthook, unraisable, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook

  def hook(kind, value, tb):
    if not noise(value):
      excepthook(kind, value, tb)

  hook.drops_closed_loop = True
  sys.excepthook = hook
  sys.unraisablehook = lambda a: None if noise(a.exc_value) else unraisable(a)
  threading.excepthook = lambda a: None if noise(a.exc_value) else thread_hook(a)


def _quiet_orbax_errors() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrorFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxErrorFilter())
