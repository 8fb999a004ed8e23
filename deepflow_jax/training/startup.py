"""Everything a training run does before its first step, in order, and what it holds.

``prepare(config, workdir, log, signals)`` checks the config and the paths,
builds the mesh, the model, the data source and the ``Trainer``, points JAX's
persistent compilation cache at the workdir, restores the newest readable
checkpoint (or initialises, or fine-tunes from ``train.init_from``) and only
then writes into the workdir: the resolved config and, once, the parameter
table. A run refused by any check has written nothing. The result is a ``Run``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from deepflow_jax import config_lib
from deepflow_jax import locks
from deepflow_jax import sharding as shd
from deepflow_jax import storage
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.data import pipeline
from deepflow_jax.data.common import DatasetInfo
from deepflow_jax.errors import UserError
from deepflow_jax.models.loading import ARCH_FIELDS
from deepflow_jax.models.loading import is_converted_dir
from deepflow_jax.models.loading import load_model
from deepflow_jax.models.loading import model_from_config
from deepflow_jax.signals import StopRequests
from deepflow_jax.training import alignment
from deepflow_jax.training import fit
from deepflow_jax.training.checkpoints import Checkpointer
from deepflow_jax.training.checkpoints import tree_shapes
from deepflow_jax.training.step import Trainer
from deepflow_jax.training.writer import MetricWriter


@dataclasses.dataclass
class Run:
  """A prepared training run: what the loop and its hooks use.

  ``state`` and ``step`` are where training starts (restored, fine-tuned or
  fresh); ``last_saved`` is the step of the checkpoint it was restored from
  (-1 when none).
  """
  config: Any
  workdir: str
  log: Callable[[str], None]
  is_main: bool
  mesh: Any
  model: Any
  info: DatasetInfo
  trainer: Trainer
  ckpt: Checkpointer
  data_it: Any
  writer: MetricWriter
  signals: StopRequests
  state: Any
  step: int
  last_saved: int
  lock: Optional[locks.WriterLock] = None

  def stop_requested(self) -> bool:
    """True once SIGTERM / SIGINT arrived (what long hooks ask between batches)."""
    return self.signals.requested

  def close(self) -> None:
    """Waits for pending checkpoint writes; closes the metric writer and the data workers."""
    self.ckpt.close()
    self.writer.close()
    if hasattr(self.data_it, "close"):
      self.data_it.close()
    if self.lock is not None:
      self.lock.release()


def compilation_cache_dir(config, workdir: str) -> Optional[str]:
  """Where JAX's persistent compilation cache lives for this run (None: off).

  ``JAX_COMPILATION_CACHE_DIR`` in the environment wins (JAX reads it itself);
  otherwise ``train.compile_cache_dir``: ``""`` is ``WORKDIR/.jax_cache``,
  ``"none"`` turns the cache off, anything else is the directory to use.
  """
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if env:
    return env
  setting = str(config.train.compile_cache_dir)
  if setting == "none":
    return None
  return storage.absolute(setting or storage.join(workdir, workdir_lib.COMPILE_CACHE_DIR))


def setup_compilation_cache(config, workdir: str) -> Optional[str]:
  """Points JAX's persistent compilation cache at ``compilation_cache_dir``; returns it.

  Called before the run's first large compilation (the initialiser, the train
  step): a restarted job then loads the compiled programs instead of compiling
  them again. Every program is stored, not only those that took JAX's default of a
  second to compile (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` in the
  environment wins): the many small ones of a start-up add up (digits restart 12.9 s
  -> 12.1 s, 1 -> 3 of 3 programs loaded; docs/benchmarks.md). A notebook's second
  run with another directory switches the cache over.
  """
  path = compilation_cache_dir(config, workdir)
  if path != jax.config.jax_compilation_cache_dir:
    jax_compilation_cache.reset_cache()  # the cache is opened once; forget an earlier one
    jax.config.update("jax_compilation_cache_dir", path)
  if path and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


def check_data_matches_model(info: DatasetInfo, model, shape_from: Optional[str] = None) -> None:
  """``shape_from``: the file the data's shape was read from (REPA: the first .npy), named."""
  want = (model.input_size, model.input_size, model.in_channels)
  if tuple(info.shape) != want:
    source = (f" (read from {shape_from}; if only that file is odd, replace it: the model "
              f"expects ({2 * want[2]}, {want[0]}, {want[1]}) moments)" if shape_from else "")
    raise UserError(f"the data's examples are {tuple(info.shape)} (h, w, c){source} but the "
                    f"model expects {want}: set model.input_size / model.in_channels to match")
  if info.num_classes > model.num_classes:
    raise UserError(f"the data has {info.num_classes} classes but model.num_classes="
                    f"{model.num_classes}")


def check_writable_dir(path: str, name: str) -> None:
  """Refuses (``UserError``) a local directory that could not be created or written: one
  under a regular file, on a read-only mount, or without permission. Creates nothing."""
  if "://" in path:  # remote storage: its client reports its own errors
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"{name} {path}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"{name} {path}: cannot write into {existing} (read-only file system or "
                    "permission denied)")


def _check_paths(config, workdir: str) -> None:
  """The workdir and the files the config names, before anything is built."""
  storage.check_bucket(workdir, "--workdir")
  if not storage.is_url(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir}: exists and is not a directory")
  check_writable_dir(workdir, "--workdir")
  t = config.train
  if t.init_from and not (is_converted_dir(t.init_from) or workdir_lib.is_workdir(t.init_from)):
    raise UserError(f"train.init_from={t.init_from!r}: not a converted checkpoint directory "
                    "(python -m deepflow_jax.convert writes one) or a training workdir")
  if config.sample.vae and not storage.exists(config.sample.vae):
    raise UserError(f"sample.vae={config.sample.vae!r}: no such VAE folder")


def _build(config, workdir: str, log) -> tuple[Any, Any, Any, Trainer]:
  """(mesh, model, data source, trainer); the SSL encoder is read here when the model aligns."""
  platform = jax.default_backend()
  auto_fsdp = int(config.mesh.fsdp) == 0  # the smallest fsdp whose step fits the devices
  mesh = None if auto_fsdp else shd.make_mesh(config)
  model = model_from_config(config, platform, log=log)
  encoder = encoder_params = None
  if model.ssl_align:  # the frozen DINOv2 of model.encoder_path (checked before any compile)
    encoder, encoder_params = alignment.load_alignment_encoder(config, model)
  # Built once: the REPA layout walks its folder. SSL alignment reads the raw images too.
  source = pipeline.make_source(config.data, images=model.ssl_align)
  info = source.info
  check_data_matches_model(info, model,
                           source.file_path(0) if hasattr(source, "file_path") else None)
  if auto_fsdp:
    config.mesh.fsdp = fit.resolve_auto_fsdp(
        config, lambda c, m: Trainer(c, model, m, latent=info.is_latent, encoder=encoder,
                                     encoder_params=encoder_params), log=log)
    config.mesh.data = -1
    mesh = shd.make_mesh(config)
  log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}), "
      f"processes: {jax.process_count()}, mesh: {dict(mesh.shape)}; data: {info.name} "
      f"({info.num_examples:,} examples of {tuple(info.shape)}); compute dtype "
      f"{np.dtype(model.dtype).name}")
  if encoder is not None:
    log(f"SSL alignment: DINOv2 ({encoder.depth} blocks, width {encoder.embed_dim}) from "
        f"{config.model.encoder_path} on {encoder.pos_grid}x{encoder.pos_grid} patches of "
        f"{encoder.patch_size * encoder.pos_grid}-pixel inputs (images {info.image_shape}), "
        f"projection weight {float(config.loss.proj_coeff)}")
  trainer = Trainer(config, model, mesh, latent=info.is_latent, latent_scale=info.latent_scale,
                    encoder=encoder, encoder_params=encoder_params)
  return mesh, model, source, trainer


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(config, workdir: str, sections=("model", "optim", "loss")) -> list[str]:
  """``key: old -> new`` for the keys under ``sections`` (top-level sections or dotted keys,
  e.g. ``model.hidden_size``) that differ from ``workdir/config.json``."""
  if not storage.exists(storage.join(workdir, workdir_lib.CONFIG_JSON)):
    return []
  old = _flat(workdir_lib.read_config(workdir).to_dict())
  new = _flat(config_lib.to_json_dict(config.copy_and_resolve_references()))
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if any(k == s or k.startswith(s + ".") for s in sections)
          and norm(old.get(k)) != norm(new.get(k))]


@contextlib.contextmanager
def _quiet_absl():
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def check_resumable(config, workdir: str, trainer: Trainer, ckpt: Checkpointer) -> None:
  """Refuses (``UserError``, nothing moved or written) a resume whose state shapes differ
  from the newest checkpoint's whose metadata can be read (same arrays of other shapes, or
  other arrays with changed model/optimiser/loss keys in ``config.json``); unreadable ones
  are left to the restore's fallback. A workdir whose previous run saved no checkpoint
  (diverged or stopped before its first save) is refused for another architecture too: its
  config.json, metrics and parameter table belong to that model."""
  steps = ckpt.all_steps()
  if not steps:  # a run that saved nothing (diverged, stopped early) still owns the workdir
    arch = config_changes(config, workdir, sections=tuple(f"model.{f}" for f in ARCH_FIELDS))
    if arch:
      raise UserError(
          f"--workdir {workdir}: its previous run (config.json, no checkpoint yet) trained "
          f"another architecture ({'; '.join(arch)}); rerun with its model settings or use "
          "another --workdir (nothing was changed)")
    return
  want = tree_shapes(trainer.abstract_state)
  for step in reversed(steps):
    try:
      with _quiet_absl():  # Orbax warns of missing optional metadata files
        saved = ckpt.saved_shapes(step)
    except Exception:  # pylint: disable=broad-except  # unreadable: restore_latest falls back
      continue
    if saved == want:
      return
    changes = config_changes(config, workdir)
    if not changes and set(saved) != set(want):
      continue  # another tree and no changed setting: a damaged file, the restore falls back
    paths = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    what = ("; ".join(changes) if changes else
            f"state arrays {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}")
    raise UserError(
        f"--workdir {workdir}: its checkpoint {ckpt.directory}/{step} has other model or "
        f"optimiser shapes than this config ({what}); resume with the settings it was trained "
        "with (config.json) or use another --workdir (nothing was changed)")


def _initial_state(config, trainer: Trainer, ckpt: Checkpointer, data_it, log
                   ) -> tuple[Any, int, int]:
  """(state, step, last_saved): the newest readable checkpoint, else fine-tuned or fresh."""
  restored = ckpt.restore_latest(trainer.abstract_state)
  if restored is not None:
    step, state, data_state = restored
    data_it.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{step}")
    return state, step, step
  return fresh_state(config, trainer, log), 0, -1


def fresh_state(config, trainer: Trainer, log) -> Any:
  """The state at step 0: fine-tuned from ``train.init_from``, else freshly initialised."""
  t = config.train
  if t.init_from:
    # A converted checkpoint, or a training workdir's newest EMA weights. The sin-cos
    # positions are not parameters: weights of another input_size (256 -> 512) fit.
    _, params = load_model(t.init_from)
    log(f"initialised from {t.init_from} (fine-tuning)")
    return trainer.state_from_params(params, int(t.seed))
  return trainer.init_state(int(t.seed))


def _write_workdir(config, workdir: str, info: DatasetInfo, params, log) -> None:
  """The resolved config (with what the data really used) and, once, the parameter table."""
  storage.makedirs(workdir)
  resolved = config.copy_and_resolve_references()
  if info.is_latent:  # what the run really used (the dataset's record or the default)
    resolved.data.latent_scale = float(info.latent_scale)
    resolved.data.vae_downsampling = int(info.vae_downsampling)
  workdir_lib.write_config(workdir, config_lib.to_json_dict(resolved), log)
  path = storage.join(workdir, workdir_lib.OVERVIEW_FILE)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if storage.exists(path):
    log(f"parameters: {n:,} (table in {path})")
    return
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  storage.write_text(path, table + "\n")
  log(f"parameters: {n:,} in {len(jax.tree.leaves(params))} arrays (table in {path})")


def prepare(config, workdir: str, log: Callable[[str], None], signals: StopRequests) -> Run:
  """Checks, builds, restores or initialises; then writes the config into the workdir.

  ``config`` must have passed ``config_lib.validate``.
  """
  workdir = storage.absolute(workdir)
  _check_paths(config, workdir)
  lock = _hold_workdir(workdir, log)  # before anything is built: a refused run touches nothing
  try:
    return _prepare(config, workdir, log, signals, lock)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def _hold_workdir(workdir: str, log) -> Optional[locks.WriterLock]:
  """Process 0 takes the workdir's writer lock (``deepflow_jax.locks``); every process of
  the run learns whether it was refused, and all stop with one line if so."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = locks.WriterLock(workdir, flag="--workdir", log=log).acquire()
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if refused and error is None:
      error = UserError(f"--workdir {workdir}: refused by process 0 (another run holds it; "
                        "see process 0's error line)")
  if error is not None:
    raise error
  return lock


def _prepare(config, workdir: str, log, signals: StopRequests,
             lock: Optional[locks.WriterLock]) -> Run:
  is_main = jax.process_index() == 0
  mesh, model, source, trainer = _build(config, workdir, log)
  t = config.train
  ckpt = Checkpointer(workdir, keep=int(t.keep_ckpts))  # creates nothing until the first save
  data_it = pipeline.make_train_iterator(
      config.data, global_batch_size=int(t.global_batch_size), process_index=jax.process_index(),
      process_count=jax.process_count(), seed=int(t.seed), source=source)
  # The last checks; then the compilation cache (it writes into the workdir) before the
  # first large compilation (the initialiser, the step).
  check_resumable(config, workdir, trainer, ckpt)
  cache_dir = setup_compilation_cache(config, workdir)
  log(f"compilation cache: {cache_dir or 'off'}")
  state, step, last_saved = _initial_state(config, trainer, ckpt, data_it, log)
  if hasattr(data_it, "start_prefetch"):
    data_it.start_prefetch()  # workers read the first batches while XLA compiles
  # Everything the run needs is in hand: only now is anything written into the workdir.
  if is_main:
    _write_workdir(config, workdir, source.info, state.params, log)
  writer = MetricWriter(storage.join(workdir, workdir_lib.TB_DIR), enabled=is_main)
  writer.drop_rows_after(step)  # rows a stopped run logged after its last checkpoint
  return Run(config, workdir, log, is_main, mesh, model, source.info, trainer, ckpt, data_it,
             writer, signals, state, step, last_saved, lock)
