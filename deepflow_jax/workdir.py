"""A training workdir: its layout, its recorded config, and its newest readable checkpoint.

The one place that knows what ``python -m deepflow_jax.main --workdir=DIR`` writes::

    DIR/config.json                 the resolved config (earlier, different ones: config.<n>.json)
    DIR/parameter_overview.txt      the parameter table, written once
    DIR/checkpoints/<step>/state    Orbax item: the TrainState (params, EMA, optimiser, step, RNG)
    DIR/checkpoints/<step>/data     Orbax item: the data iterator's state (JSON)
    DIR/unreadable_checkpoints/     checkpoints set aside because they could not be read
    DIR/tb/, DIR/metrics.jsonl      TensorBoard events and the same scalars as JSON lines
    DIR/samples/, DIR/eval/         sample grids; end-of-run evaluation
    DIR/.jax_cache/                 JAX's persistent compilation cache (by default)
    DIR/.writer.lock                the run writing DIR now (deepflow_jax.locks)

``DIR`` may be a ``gs://`` URL (``deepflow_jax.storage``). Training
(``deepflow_jax.training``) writes it; model loading
(``deepflow_jax.models.loading``) and generation read it. Both sit above this
module, which imports nothing of the project but ``errors`` and ``storage``.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

import ml_collections

from deepflow_jax import storage
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line

CONFIG_JSON = "config.json"
OVERVIEW_FILE = "parameter_overview.txt"
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
STATE_ITEM = "state"  # Orbax item names inside checkpoints/<step>/
DATA_ITEM = "data"
ITEM_NAMES = (STATE_ITEM, DATA_ITEM)
TB_DIR = "tb"
METRICS_JSONL = "metrics.jsonl"
SAMPLES_DIR = "samples"
EVAL_DIR = "eval"
COMPILE_CACHE_DIR = ".jax_cache"
# Orbax on gs:// writes a checkpoint in place and commits it with this file last.
COMMIT_FILE = "commit_success.txt"


def checkpoint_dir(workdir: str) -> str:
  """``WORKDIR/checkpoints`` as an absolute path or URL (Orbax refuses relative ones)."""
  return storage.join(storage.absolute(workdir), CHECKPOINT_DIR)


def is_workdir(path: str) -> bool:
  """A training workdir: ``config.json`` plus ``checkpoints/``."""
  return (storage.isfile(storage.join(path, CONFIG_JSON))
          and storage.isdir(storage.join(path, CHECKPOINT_DIR)))


def read_config(path: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to ``path/config.json``."""
  cfg_path = storage.join(path, CONFIG_JSON)
  try:
    return ml_collections.ConfigDict(json.loads(storage.read_text(cfg_path)))
  except (OSError, ValueError) as e:
    raise UserError(f"{cfg_path}: unreadable training config ({e})") from e


def latent_scale(path: str) -> Optional[float]:
  """The latent scale a training workdir's data used (its config.json), or None if unknown."""
  if not is_workdir(path):
    return None
  scale = read_config(path).data.get("latent_scale")
  return float(scale) if scale is not None else None


def write_config(workdir: str, config_json: dict[str, Any], log: Callable[[str], None]) -> None:
  """Writes the resolved config; a different earlier one is kept as ``config.<n>.json``."""
  path = storage.join(workdir, CONFIG_JSON)
  text = json.dumps(config_json, indent=2, sort_keys=True)
  try:
    old = storage.read_text(path)
  except FileNotFoundError:
    old = None
  if old == text:
    return
  if old is not None:  # copied, not renamed: gs:// has no rename; config.json is rewritten below
    names = set(storage.listdir(workdir))
    n = 1
    while f"config.{n}.json" in names:
      n += 1
    storage.write_text(storage.join(workdir, f"config.{n}.json"), old)
    log(f"config differs from the previous run's; kept that one as config.{n}.json")
  storage.write_text(path, text)


def checkpoint_steps(directory: str) -> list[int]:
  """The steps of the committed checkpoints in ``directory`` (``WORKDIR/checkpoints``), sorted.

  Locally Orbax renames a finished checkpoint to its step; on ``gs://`` it
  writes ``<step>/`` in place and commits it with ``COMMIT_FILE``, so a step
  folder without that file is an uncommitted save and is not listed.
  """
  steps = [s for s in storage.listdir(directory) if s.isdigit()]
  if storage.is_url(directory):
    steps = [s for s in steps if storage.exists(storage.join(directory, s, COMMIT_FILE))]
  return sorted(int(s) for s in steps)


def restore_newest(directory: str, steps: list[int], restore: Callable[[int], Any]
                   ) -> tuple[Optional[int], Any, list[int]]:
  """``restore(step)`` for the newest step that can be read: ``(step, result, unreadable)``.

  Steps are tried newest first; one that raises is reported with one warning
  line naming its folder and skipped for the previous one. ``unreadable`` lists
  the skipped steps (newest first). ``(None, None, unreadable)`` when none could
  be read. While trying, asyncio's logger is silenced: a failed Orbax restore
  leaves pending reads to die with their event loop, each logging an "Event loop
  is closed" traceback; the warning line says what happened.
  """
  asyncio_log = logging.getLogger("asyncio")
  level = asyncio_log.level
  asyncio_log.setLevel(logging.CRITICAL)
  unreadable = []
  try:
    for step in sorted(steps, reverse=True):
      try:
        return step, restore(step), unreadable
      except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
        print(f"WARNING: checkpoint {storage.join(directory, str(step))} is unreadable "
              f"({type(e).__name__}: {first_line(e)}); falling back to the previous one",
              flush=True)
        unreadable.append(step)
    return None, None, unreadable
  finally:
    asyncio_log.setLevel(level)
