"""The training loop: what ``python -m deepflow_jax.main`` runs, callable from a notebook.

    from deepflow_jax import config_lib, train_loop
    config = config_lib.load_config("configs/digits.py", **{"train.num_steps": 300})
    status = train_loop.train(config, "runs/digits", callback=lambda step, m: print(step, m))
    for metrics in train_loop.iterate_training(config, "runs/digits"):   # the same, as an iterator
      ...

Runs on every device of every host (a ``("data", "fsdp")`` mesh from the
config), resumes from the newest checkpoint in the workdir by itself, saves on
SIGTERM (preemption) and returns. Writes into the workdir:

* ``config.json``: the resolved config (an earlier, different one is kept as
  ``config.<n>.json``);
* ``checkpoints/<step>/``: Orbax checkpoints (state + data iterator);
* ``tb/``: TensorBoard event files (written without TensorFlow), and the same
  scalars as JSON lines in ``metrics.jsonl``;
* ``samples/``: PNG grids of EMA samples, one row per class;
* ``eval/metrics.json``: for the digits default, class accuracy and Fréchet
  distance of generated digits.

Return status: 0 when the run finished, 143 after a preemption save.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
from clu import parameter_overview
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from deepflow_jax import config_lib
from deepflow_jax import images as images_lib
from deepflow_jax import sampling
from deepflow_jax import sharding as shd
from deepflow_jax import train as train_lib
from deepflow_jax import vae as vae_lib
from deepflow_jax.checkpointing import Checkpointer
from deepflow_jax.data import pipeline
from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import digits as digits_eval
from deepflow_jax.evaluation import inception
from deepflow_jax.evaluation import suite
from deepflow_jax.metric_writer import MetricWriter
from deepflow_jax.models.loading import is_converted_dir
from deepflow_jax.models.loading import is_workdir
from deepflow_jax.models.loading import load_model
from deepflow_jax.models.loading import model_from_config
from deepflow_jax.progress import Progress
from deepflow_jax.progress import format_duration
from deepflow_jax.progress import format_rate
from deepflow_jax.signals import StopRequests

EXIT_PREEMPTED = 143
OVERVIEW_FILE = "parameter_overview.txt"


def write_config(workdir: str, config) -> None:
  """Writes the resolved config; a different earlier one is kept, not overwritten."""
  path = os.path.join(workdir, "config.json")
  text = json.dumps(config_lib.to_json_dict(config), indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == text:
      return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    print(f"config differs from the previous run's; kept that one as config.{n}.json", flush=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


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
  return os.path.abspath(os.path.expanduser(setting or os.path.join(workdir, ".jax_cache")))


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


def peak_memory_bytes() -> Optional[int]:
  """The largest peak device memory of this process's devices (None where not reported: CPU)."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except  # backends without allocator stats
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def check_data_matches_model(info, model) -> None:
  want = (model.input_size, model.input_size, model.in_channels)
  if tuple(info.shape) != want:
    raise UserError(f"the data's examples are {tuple(info.shape)} (h, w, c) but the model expects "
                    f"{want}: set model.input_size / model.in_channels to match")
  if info.num_classes > model.num_classes:
    raise UserError(f"the data has {info.num_classes} classes but model.num_classes="
                    f"{model.num_classes}")


def sample_kwargs(config) -> dict[str, Any]:
  """The sampler settings of ``config.sample`` as keyword arguments of the sampling functions."""
  s = config.sample
  out = dict(sampler=s.sampler, num_steps=int(s.num_steps), cfg_scale=float(s.cfg_scale),
             guidance_low=float(s.guidance_low), guidance_high=float(s.guidance_high))
  # Time grid; configs written before the grid settings existed sample on the default grid.
  out.update(grid=s.get("grid", "") or None,
             grid_shift=float(s.get("grid_shift", sampling.DEFAULT_GRID_SHIFT)),
             grid_rho=float(s.get("grid_rho", sampling.DEFAULT_GRID_RHO)))
  return out


def iterate_training(config, workdir: str, *, log: Optional[Callable[[str], None]] = None
                     ) -> Iterator[dict[str, float]]:
  """Trains with ``config`` in ``workdir``, yielding the metrics of every logged step.

  Each yielded dict holds ``step`` and the losses, gradient norm, learning rate
  and throughput of the last ``train.log_every`` steps (what the progress line
  shows). The generator's return value (``StopIteration.value``) is the exit
  status: 0 when finished, ``EXIT_PREEMPTED`` after a SIGTERM save. Closing the
  generator early waits for pending checkpoint writes.
  """
  config_lib.validate(config)
  shd.maybe_initialize_distributed(config)
  pid, nproc = jax.process_index(), jax.process_count()
  is_main = pid == 0
  if log is None:
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir}: exists and is not a directory")
  t = config.train
  if t.init_from and not (is_converted_dir(t.init_from) or is_workdir(t.init_from)):
    raise UserError(f"train.init_from={t.init_from!r}: not a converted checkpoint directory "
                    "(python -m deepflow_jax.convert writes one) or a training workdir")
  if config.sample.vae and not os.path.exists(config.sample.vae):
    raise UserError(f"sample.vae={config.sample.vae!r}: no such VAE folder")
  platform = jax.default_backend()
  mesh = shd.make_mesh(config)
  model = model_from_config(config, platform, log=log)
  encoder = encoder_params = None
  if model.ssl_align:  # the frozen DINOv2 of model.encoder_path (checked before any compile)
    encoder, encoder_params = train_lib.load_alignment_encoder(config, model)
  # Built once: the REPA layout walks its folder. SSL alignment reads the raw images too.
  source = pipeline.make_source(config.data, images=model.ssl_align)
  info = source.info
  check_data_matches_model(info, model)
  log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}), "
      f"processes: {nproc}, mesh: {dict(mesh.shape)}; data: {info.name} "
      f"({info.num_examples:,} examples of {tuple(info.shape)}); compute dtype "
      f"{np.dtype(model.dtype).name}")

  if encoder is not None:
    log(f"SSL alignment: DINOv2 ({encoder.depth} blocks, width {encoder.embed_dim}) from "
        f"{config.model.encoder_path} on {encoder.pos_grid}x{encoder.pos_grid} patches of "
        f"{encoder.patch_size * encoder.pos_grid}-pixel inputs (images {info.image_shape}), "
        f"projection weight {float(config.loss.proj_coeff)}")
  cache_dir = setup_compilation_cache(config, workdir)  # before the first large compilation
  log(f"compilation cache: {cache_dir or 'off'}")
  trainer = train_lib.Trainer(config, model, mesh, latent=info.is_latent,
                              latent_scale=info.latent_scale, encoder=encoder,
                              encoder_params=encoder_params)
  ckpt = Checkpointer(workdir, keep=int(t.keep_ckpts))  # creates nothing until the first save
  data_it = pipeline.make_train_iterator(config.data, global_batch_size=int(t.global_batch_size),
                                         process_index=pid, process_count=nproc,
                                         seed=int(t.seed), source=source)
  restored = ckpt.restore_latest(trainer.abstract_state)
  if restored is not None:
    step, state, data_state = restored
    data_it.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{step}")
  elif t.init_from:
    # A converted checkpoint, or a training workdir's newest EMA weights. The sin-cos
    # positions are not parameters: weights of another input_size (256 -> 512) fit.
    _, params = load_model(t.init_from)
    state = trainer.state_from_params(params, int(t.seed))
    step = 0
    log(f"initialised from {t.init_from} (fine-tuning)")
  else:
    state = trainer.init_state(int(t.seed))
    step = 0
  if hasattr(data_it, "start_prefetch"):
    data_it.start_prefetch()  # workers read the first batches while XLA compiles
  # Everything the run needs is in hand: only now is anything written into the workdir.
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    resolved = config.copy_and_resolve_references()
    if info.is_latent:  # what the run really used (the dataset's record or the default)
      resolved.data.latent_scale = float(info.latent_scale)
      resolved.data.vae_downsampling = int(info.vae_downsampling)
    write_config(workdir, resolved)
    _log_parameters(state.params, workdir, log)

  writer = MetricWriter(os.path.join(workdir, "tb"), enabled=is_main)
  flops = train_lib.train_flops_per_example(model) * int(t.global_batch_size)
  peak = train_lib.peak_flops(jax.devices()[0]) if platform != "cpu" else None
  num_steps = int(t.num_steps)
  sample_every = int(t.sample_every)
  # Multi-process: SIGTERM goes to JAX's preemption notifier (reached_preemption below).
  signals = StopRequests(sigterm=nproc == 1)

  fid_state = {}
  decoder = {}

  def decode_latents(x):
    """Latent samples -> uint8 images through sample.vae (a jitted, sharded decoder)."""
    if "fn" not in decoder:
      decoder["fn"] = images_lib.make_decoder(vae_lib.load_diffusers_vae(config.sample.vae), mesh,
                                              latent_scale=info.latent_scale)
    count = len(x)
    batch = -(-count // mesh.size) * mesh.size
    x = np.pad(np.asarray(x, np.float32), [(0, batch - count)] + [(0, 0)] * 3)
    return images_lib.to_uint8(shd.host_array(decoder["fn"](x))[:count], rgb=True)

  def fid_eval(at_step) -> dict[str, float]:
    """ADM metrics of eval.fid_num_samples EMA samples; logged and returned as eval/*."""
    e = config.eval
    if not fid_state:
      inc = inception.load_fid_inception(e.inception)
      fid_state["inception"] = inc
      fid_state["reference"] = suite.load_reference(e.reference, *inc, precision_recall=False,
                                                    log=log)
    n = int(e.fid_num_samples)
    log(f"[eval] ADM metrics of {n:,} EMA samples at step {at_step} ({config.sample.sampler}, "
        f"{int(config.sample.num_steps)} steps, cfg {float(config.sample.cfg_scale)})")
    res = suite.evaluate_samples(
        *fid_state["inception"],
        _fid_batches(model, state.ema_params, config, mesh, n,
                     decode_latents if info.is_latent else None, lambda: signals.requested),
        fid_state["reference"], num_samples=n, precision_recall=False, log=log)
    metrics = {f"eval/{k}": float(v) for k, v in res.items() if v is not None}
    writer.scalars(at_step, metrics)
    log(f"[eval] step {at_step}: FID {res['fid']:.3f}, sFID {res['sfid']:.3f}, IS "
        f"{res['inception_score']:.3f} ({n:,} samples)")
    return metrics

  def sample_grid(at_step):
    s = config.sample
    rows = min(int(s.grid_classes), model.num_classes)
    if rows <= 0:
      return
    labels = sampling.class_grid_labels(range(rows), int(s.grid_per_class))
    log(f"[samples] {len(labels)} EMA samples for the grid at step {at_step} "
        f"({s.sampler}, {int(s.num_steps)} steps)")
    x = sampling.sample_many(model, state.ema_params, labels, seed=int(t.seed) + 1,
                             per_device_batch=-(-len(labels) // mesh.size), mesh=mesh,
                             should_stop=lambda: signals.requested, **sample_kwargs(config))
    if info.is_latent and not s.vae:
      if is_main:
        path = os.path.join(workdir, "samples", f"latents_{at_step:08d}.npy")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, x)
        log(f"[samples] wrote {path} (set sample.vae to decode grids to PNG)")
      return
    pictures = decode_latents(x) if info.is_latent else images_lib.to_uint8(x)  # every process
    if not is_main:
      return
    path = os.path.join(workdir, "samples", f"grid_{at_step:08d}.png")
    images_lib.save_grid(pictures, rows, path)
    log(f"[samples] wrote {path}")

  last_log_time, last_log_step, data_wait = time.perf_counter(), step, 0.0
  # Rate and ETA over the whole run so far (the first step, with its compilation, excluded).
  progress = Progress(num_steps, "train", "steps", done=step, log=None)
  last_saved = step if restored is not None else -1
  with signals:
    try:
      while step < num_steps:
        t0 = time.perf_counter()
        batch = next(data_it)
        data_wait += time.perf_counter() - t0
        state, metrics = trainer.step(state, trainer.global_batch(batch))
        step += 1
        progress.update(1)
        if step % int(t.log_every) == 0 or step == num_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          n = step - last_log_step
          sps = n / (now - last_log_time)
          metrics.update(steps_per_sec=sps, images_per_sec=sps * int(t.global_batch_size),
                         data_wait_ms=1e3 * data_wait / n)
          extra = ""
          if peak is not None:
            tflops = flops * sps / jax.device_count() / 1e12
            metrics.update(tflops_per_device=tflops, mfu=tflops * 1e12 / peak)
            extra = f" | {tflops:.1f} TFLOP/s/dev MFU {100 * tflops * 1e12 / peak:.1f}%"
          peak_mem = peak_memory_bytes()  # accelerators; CPU reports nothing
          if peak_mem is not None:
            metrics["peak_memory_gib"] = peak_mem / 2**30
            extra += f" | peak mem {peak_mem / 2**30:.1f} GiB"
          writer.scalars(step, metrics)
          proj = f" proj {metrics['loss_proj']:.4f}" if model.ssl_align else ""
          log(f"step {step}/{num_steps} | loss {metrics['loss']:.4f} (denoise "
              f"{metrics['loss_denoise']:.4f} acc {metrics['loss_acc']:.4f}{proj}) | grad "
              f"{metrics['grad_norm']:.3f} | {format_rate(sps)} steps/s "
              f"{format_rate(metrics['images_per_sec'])} img/s | data "
              f"{metrics['data_wait_ms']:.1f} ms/step{extra} | ETA "
              f"{format_duration(progress.eta)}")
          last_log_time, last_log_step, data_wait = now, step, 0.0
          yield {"step": step, **metrics}
        if step == int(t.debug_sigkill_at_step):
          ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        if step % int(t.ckpt_every) == 0 or step == num_steps:
          ckpt.save(step, state, data_it.get_state())
          last_saved = step
        try:  # a signal during these stops them (StopSampling), then the check below saves
          if sample_every and step % sample_every == 0 and step != num_steps:
            sample_grid(step)
          fid_every = int(config.eval.fid_every)
          if fid_every and step % fid_every == 0 and step != num_steps:
            yield {"step": step, **fid_eval(step)}
        except sampling.StopSampling:
          pass
        stop = signals.requested
        if nproc > 1:
          stop = stop or ckpt.manager.reached_preemption(step)
        if stop:
          if last_saved != step:
            ckpt.save(step, state, data_it.get_state(), force=True)
          ckpt.close()
          log(signals.message("train", f"saved step {step} to {ckpt.directory}; rerun the same "
                              "command to resume") if signals.requested else
              f"preempted: saved step {step} to {ckpt.directory}; exiting")
          return signals.exit_status if signals.requested else EXIT_PREEMPTED
      if last_saved != step:
        ckpt.save(step, state, data_it.get_state(), force=True)
      ckpt.close()
      log(f"[train] {step} steps done; final checkpoint in {ckpt.directory}")
      try:
        sample_grid(step)
        if int(config.eval.fid_every):
          yield {"step": step, **fid_eval(step)}
        if int(config.eval.num_samples) > 0 and info.name == "digits":
          metrics = _evaluate_digits(model, state.ema_params, config, workdir, writer, step, mesh,
                                     is_main, log, should_stop=lambda: signals.requested)
          yield {"step": step, **{f"eval/{k}": v for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}}
      except sampling.StopSampling:
        log(signals.message("train", "end-of-run sampling/evaluation stopped; the final "
                            "checkpoint is saved, rerun the same command to redo them"))
        return signals.exit_status
      log(f"done: {step} steps in {workdir}")
      return 0
    finally:
      ckpt.close()
      writer.close()
      if hasattr(data_it, "close"):
        data_it.close()


def train(config, workdir: str, *, callback: Optional[Callable[[int, dict], Any]] = None,
          log: Optional[Callable[[str], None]] = None) -> int:
  """Trains with ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the status.

  ``callback(step, metrics)`` is called at every logged step (and once with the
  ``eval/...`` metrics at the end for the digits default). Returns 0 when the
  run finished, ``EXIT_PREEMPTED`` (143) after a SIGTERM save.
  """
  it = iterate_training(config, workdir, log=log)
  while True:
    try:
      metrics = next(it)
    except StopIteration as stop:
      return int(stop.value or 0)
    if callback is not None:
      callback(int(metrics["step"]), metrics)


def _fid_batches(model, params, config, mesh, n, decode, should_stop):
  """uint8 NHWC batches of ``n`` EMA samples (labels cycling over the classes), decoded."""
  per_device = max(1, int(config.eval.batch_size) // mesh.size)
  batch = per_device * mesh.size
  labels = np.arange(n) % model.num_classes
  for start in range(0, n, batch):
    x = sampling.sample_many(model, params, labels[start:start + batch],
                             seed=int(config.train.seed) + 3, per_device_batch=per_device,
                             mesh=mesh, start_index=start, **sample_kwargs(config))
    yield decode(x) if decode is not None else images_lib.to_uint8(x, rgb=True)
    if should_stop() and start + batch < n:
      raise sampling.StopSampling(f"stopped after {start + batch} of {n} samples")


def _log_parameters(params, workdir: str, log) -> None:
  """The full parameter table once per workdir (also saved there); a one-line summary after."""
  path = os.path.join(workdir, OVERVIEW_FILE)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  if os.path.exists(path):
    log(f"parameters: {n:,} (table in {path})")
    return
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  log(table)
  with open(path + ".tmp", "w") as f:
    f.write(table + "\n")
  os.replace(path + ".tmp", path)


def _evaluate_digits(model, params, config, workdir, writer, step, mesh, is_main, log,
                     should_stop=None) -> dict:
  """Class accuracy and Fréchet distance of generated digits -> eval/metrics.json."""
  n = int(config.eval.num_samples)
  log(f"[eval] scoring {n} generated digits (sampler {config.sample.sampler}, "
      f"{int(config.sample.num_steps)} steps)")
  per_device = max(1, int(config.eval.batch_size) // mesh.size)
  cache = os.path.join(workdir, "eval", "classifier.msgpack")
  metrics, images, labels = digits_eval.sample_and_evaluate(
      model, params, num_samples=n, seed=int(config.train.seed) + 2, per_device_batch=per_device,
      cache_path=cache, mesh=mesh, should_stop=should_stop, **sample_kwargs(config))
  if not is_main:
    return metrics
  s = config.sample
  metrics.update(step=int(step), sampler=s.sampler, num_steps=int(s.num_steps),
                 cfg_scale=float(s.cfg_scale))
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
  log(f"[eval] class_accuracy {metrics['class_accuracy']:.4f}, frechet_distance "
      f"{metrics['frechet_distance']:.4f} (real vs real "
      f"{metrics['frechet_distance_real_vs_real']:.4f}) -> {path}")
  rows = digits_eval.class_rows(images, labels, model.num_classes)
  if rows is not None:
    grid_path = os.path.join(workdir, "samples", "eval_grid.png")
    images_lib.save_grid(images_lib.to_uint8(rows), model.num_classes, grid_path)
    log(f"[eval] wrote {grid_path}")
  return metrics
