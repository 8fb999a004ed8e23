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

import contextlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from deepflow_jax import storage
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    storage.configure_emulator()  # tensorstore reads TENSORSTORE_GCS_HTTP_URL
    self.directory = workdir_lib.checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=False,  # the directory appears with the first save, not before
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=workdir_lib.ITEM_NAMES)
    self._closed = False

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Optional[dict], *, force: bool = False
           ) -> bool:
    """Starts saving ``state`` and the data iterator state at ``step`` (asynchronously)."""
    with self._storage_errors(f"save checkpoint {step}"):
      return self.manager.save(
          int(step),
          args=ocp.args.Composite(**{workdir_lib.STATE_ITEM: ocp.args.StandardSave(state),
                                     workdir_lib.DATA_ITEM: ocp.args.JsonSave(data_state or {})}),
          force=force)

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
    """Waits for pending saves and releases the manager; safe to call twice."""
    if self._closed:
      return
    self._closed = True
    with self._storage_errors("finish saving"):
      self.manager.wait_until_finished()
    self.manager.close()
