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

Training (``deepflow_jax.training``) writes it; model loading
(``deepflow_jax.models.loading``) and generation read it. Both sit above this
module, which imports nothing of the project but ``errors``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

import ml_collections

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


def checkpoint_dir(workdir: str) -> str:
  """``WORKDIR/checkpoints`` as an absolute path (Orbax refuses relative ones)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def is_workdir(path: str) -> bool:
  """A training workdir: ``config.json`` plus ``checkpoints/``."""
  return (os.path.isfile(os.path.join(path, CONFIG_JSON))
          and os.path.isdir(os.path.join(path, CHECKPOINT_DIR)))


def read_config(path: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to ``path/config.json``."""
  cfg_path = os.path.join(path, CONFIG_JSON)
  try:
    with open(cfg_path) as f:
      return ml_collections.ConfigDict(json.load(f))
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
  path = os.path.join(workdir, CONFIG_JSON)
  text = json.dumps(config_json, indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    log(f"config differs from the previous run's; kept that one as config.{n}.json")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def checkpoint_steps(directory: str) -> list[int]:
  """The steps of the committed checkpoints in ``directory`` (``WORKDIR/checkpoints``), sorted."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


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
        print(f"WARNING: checkpoint {os.path.join(directory, str(step))} is unreadable "
              f"({type(e).__name__}: {first_line(e)}); falling back to the previous one",
              flush=True)
        unreadable.append(step)
    return None, None, unreadable
  finally:
    asyncio_log.setLevel(level)
