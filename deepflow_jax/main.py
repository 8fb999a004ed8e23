"""The training job: ``python -m deepflow_jax.main --config=configs/xl3t.py --workdir=DIR``.

Runs on every device of every host (a ``("data", "fsdp")`` mesh from the
config), resumes from the newest checkpoint in ``DIR`` by itself, saves on
SIGTERM (preemption) and exits. Writes into ``DIR``:

* ``config.json``: the resolved config (an earlier, different one is kept as
  ``config.<n>.json``);
* ``checkpoints/<step>/``: Orbax checkpoints (state + data iterator);
* ``tb/``: TensorBoard event files (written without TensorFlow), and the same
  scalars as JSON lines in ``metrics.jsonl``;
* ``samples/``: PNG grids of EMA samples, one row per class;
* ``eval/metrics.json``: for the digits default, class accuracy and Fréchet
  distance of 1,000 generated digits.

Exit status: 0 on success, 2 on a configuration or input error (one line on
stderr), 143 after a preemption save.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from deepflow_jax.progress import format_duration

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the config.")

EXIT_PREEMPTED = 143


def write_config(workdir: str, config) -> None:
  """Writes the resolved config; a different earlier one is kept, not overwritten."""
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
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


class MetricWriter:
  """TensorBoard scalars through tensorboardX (no TensorFlow), plus ``metrics.jsonl``; process 0 only."""

  def __init__(self, logdir: str, enabled: bool):
    self._w = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._w = SummaryWriter(logdir=logdir)
      self._jsonl = os.path.join(os.path.dirname(logdir), "metrics.jsonl")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._w is not None:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), global_step=step)
      self._w.flush()
      with open(self._jsonl, "a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

  def close(self):
    if self._w is not None:
      self._w.close()


def _data_config(config) -> dict[str, Any]:
  d = config.data
  out = {"name": d.name}
  if d.name == "digits":
    out["image_size"] = int(d.image_size)
  else:
    out["path"] = d.path
    out["num_classes"] = int(d.num_classes)
  out["num_threads"] = int(d.num_threads)
  out["prefetch_buffer_size"] = None
  return out


def _check_data_matches_model(info, model) -> None:
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  want = (model.input_size, model.input_size, model.in_channels)
  if tuple(info.shape) != want:
    raise UserError(f"the data's examples are {tuple(info.shape)} (h, w, c) but the model expects "
                    f"{want}: set model.input_size / model.in_channels to match")
  if info.num_classes > model.num_classes:
    raise UserError(f"the data has {info.num_classes} classes but model.num_classes="
                    f"{model.num_classes}")


def _to_images(x, vae=None):
  """Samples in [-1, 1] (pixels) or VAE latents -> uint8 NHWC images (the reference's formula)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from deepflow_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  if vae is not None:
    module, params = vae
    x = module.apply({"params": params}, x / vae_lib.SCALING_FACTOR, method=module.decode)
  return vae_lib.images_to_uint8(np.asarray(x, np.float32))


def save_grid(images, rows: int, path: str) -> None:
  """uint8 (rows * cols, H, W, C) -> one PNG, ``rows`` rows, 2-pixel gaps."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, h, w, c = images.shape
  cols = n // rows
  pad = 2
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(rows * cols):
    r, k = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
  scale = max(1, 512 // max(grid.shape[:2]))  # small images: enlarge, nearest neighbour
  img = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)


def generate_samples(model, params, config, labels, seed: int, batch_size: int):
  """Samples for ``labels`` with config.sample settings, in batches; numpy (N, H, W, C).

  Sample ``i``'s starting noise and SDE noise come from (seed, i) exactly as in
  ``python -m deepflow_jax.generate``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sampling  # pylint: disable=g-import-not-at-top
  from deepflow_jax.generate import sample_inputs  # pylint: disable=g-import-not-at-top
  s = config.sample
  out = []
  for start in range(0, len(labels), batch_size):
    y = np.asarray(labels[start:start + batch_size], np.int32)
    z, _, noise_keys = sample_inputs(model, seed, np.arange(start, start + len(y)), "cycle")
    x = sampling.sample(model, params, z, y, sampler=s.sampler, num_steps=int(s.num_steps),
                        cfg_scale=float(s.cfg_scale), guidance_low=float(s.guidance_low),
                        guidance_high=float(s.guidance_high), rng=noise_keys)
    if not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    out.append(np.asarray(x))
  return np.concatenate(out)


def run(config, workdir: str) -> int:
  """Trains with ``config`` in ``workdir`` (usable from a notebook); returns the exit status."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top

  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from deepflow_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  from deepflow_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config_lib.validate(config)
  shd.maybe_initialize_distributed(config)
  pid, nproc = jax.process_index(), jax.process_count()
  is_main = pid == 0
  log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    write_config(workdir, config)

  platform = jax.default_backend()
  mesh = shd.make_mesh(config)
  model = config_lib.build_model(config, platform)
  data_cfg = _data_config(config)
  source = pipeline.make_source(data_cfg)  # built once: the REPA layout walks its folder
  info = source.info
  _check_data_matches_model(info, model)
  t = config.train
  log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}), "
      f"processes: {nproc}, mesh: {dict(mesh.shape)}; data: {info.name} "
      f"({info.num_examples:,} examples of {tuple(info.shape)}); compute dtype "
      f"{np.dtype(model.dtype).name}")

  trainer = train_lib.Trainer(config, model, mesh, latent=info.is_latent)
  ckpt = Checkpointer(workdir, keep=int(t.keep_ckpts))
  data_it = pipeline.make_train_iterator(data_cfg, global_batch_size=int(t.global_batch_size),
                                         process_index=pid, process_count=nproc,
                                         seed=int(t.seed), source=source)
  restored = ckpt.restore_latest(trainer.abstract_state)
  if restored is not None:
    step, state, data_state = restored
    data_it.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{step}")
  elif t.init_from:
    from deepflow_jax.convert import load_converted  # pylint: disable=g-import-not-at-top
    src_model, params = load_converted(t.init_from)
    state = trainer.state_from_params(params, int(t.seed))
    step = 0
    log(f"initialised from {t.init_from} (fine-tuning)")
    del src_model
  else:
    state = trainer.init_state(int(t.seed))
    step = 0
  if is_main:
    print(parameter_overview.get_parameter_overview(state.params, include_stats=False), flush=True)

  writer = MetricWriter(os.path.join(workdir, "tb"), enabled=is_main)
  preempted = {"flag": False}

  def on_sigterm(signum, frame):
    del signum, frame
    preempted["flag"] = True

  signal.signal(signal.SIGTERM, on_sigterm)

  flops = train_lib.train_flops_per_example(model) * int(t.global_batch_size)
  peak = train_lib.peak_flops(jax.devices()[0]) if platform != "cpu" else None
  num_steps = int(t.num_steps)
  sample_every = int(t.sample_every)

  def sample_grid(at_step):
    s = config.sample
    rows = min(int(s.grid_classes), model.num_classes)
    if rows <= 0:
      return
    labels = np.repeat(np.arange(rows), int(s.grid_per_class))
    x = generate_samples(model, state.ema_params, config, labels, int(t.seed) + 1, len(labels))
    if not is_main:
      return
    vae = None
    if info.is_latent:
      if not s.vae:
        np.save(os.path.join(workdir, "samples", f"latents_{at_step:08d}.npy"), x)
        return
      from deepflow_jax.vae import load_diffusers_vae  # pylint: disable=g-import-not-at-top
      vae = load_diffusers_vae(s.vae)
    path = os.path.join(workdir, "samples", f"grid_{at_step:08d}.png")
    save_grid(_to_images(x, vae), rows, path)
    log(f"wrote {path}")

  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  last_log_time, last_log_step, data_wait = time.perf_counter(), step, 0.0
  start_time, start_step = last_log_time, step
  last_saved = step if restored is not None else -1
  while step < num_steps:
    t0 = time.perf_counter()
    batch = next(data_it)
    data_wait += time.perf_counter() - t0
    state, metrics = trainer.step(state, trainer.global_batch(batch))
    step += 1
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
      writer.scalars(step, metrics)
      overall = (step - start_step) / (now - start_time)
      log(f"step {step}/{num_steps} | loss {metrics['loss']:.4f} (denoise "
          f"{metrics['loss_denoise']:.4f} acc {metrics['loss_acc']:.4f}) | grad {metrics['grad_norm']:.3f}"
          f" | {sps:.2f} steps/s {metrics['images_per_sec']:.0f} img/s | data "
          f"{metrics['data_wait_ms']:.1f} ms/step{extra} | ETA {format_duration((num_steps - step) / overall)}")
      last_log_time, last_log_step, data_wait = now, step, 0.0
    if step == int(t.debug_sigkill_at_step):
      ckpt.wait()
      os.kill(os.getpid(), signal.SIGKILL)
    if step % int(t.ckpt_every) == 0 or step == num_steps:
      ckpt.save(step, state, data_it.get_state())
      last_saved = step
    if sample_every and step % sample_every == 0 and step != num_steps:
      sample_grid(step)
    stop = preempted["flag"]
    if nproc > 1:
      stop = stop or ckpt.manager.reached_preemption(step)
    if stop:
      if last_saved != step:
        ckpt.save(step, state, data_it.get_state(), force=True)
      ckpt.close()
      log(f"preempted: saved step {step} to {ckpt.directory}; exiting")
      writer.close()
      return EXIT_PREEMPTED
  if last_saved != step:
    ckpt.save(step, state, data_it.get_state(), force=True)
  ckpt.close()
  sample_grid(step)
  if int(config.eval.num_samples) > 0 and info.name == "digits":
    evaluate_digits(model, state.ema_params, config, workdir, writer, step, is_main)
  writer.close()
  log(f"done: {step} steps in {workdir}")
  return 0


def evaluate_digits(model, params, config, workdir, writer, step, is_main) -> dict:
  """Class accuracy and Fréchet distance of generated digits -> eval/metrics.json."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from deepflow_jax.data import digits as digits_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax.evaluation import digits as digits_eval  # pylint: disable=g-import-not-at-top
  n = int(config.eval.num_samples)
  labels = np.arange(n) % model.num_classes
  t0 = time.perf_counter()
  x = generate_samples(model, params, config, labels, int(config.train.seed) + 2,
                       int(config.eval.batch_size))
  sample_time = time.perf_counter() - t0
  if not is_main:
    return {}
  size = model.input_size
  (_, _), (heldout_x, heldout_y) = digits_lib.load_digits_split(size)
  cache = os.path.join(workdir, "eval", "classifier.msgpack")
  images = np.clip(x, -1, 1)
  metrics = digits_eval.evaluate_generated(images, labels, heldout_x, heldout_labels=heldout_y,
                                           seed=0, cache_path=cache)
  s = config.sample
  metrics.update(step=int(step), sampler=s.sampler, num_steps=int(s.num_steps),
                 cfg_scale=float(s.cfg_scale), sampling_seconds=round(sample_time, 2))
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
  print(f"eval: class_accuracy {metrics['class_accuracy']:.4f}, frechet_distance "
        f"{metrics['frechet_distance']:.4f} (real vs real "
        f"{metrics['frechet_distance_real_vs_real']:.4f}) -> {path}", flush=True)
  grid_labels = np.repeat(np.arange(model.num_classes), 10)
  idx = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(model.num_classes)])
  if len(idx) == len(grid_labels):
    save_grid(_to_images(images[idx]), model.num_classes,
              os.path.join(workdir, "samples", "eval_grid.png"))
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if FLAGS.workdir is None:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  if FLAGS.config is None:
    print("error: --config is required (e.g. --config=configs/digits.py)", file=sys.stderr)
    sys.exit(2)
  try:
    rc = run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  sys.exit(rc)


if __name__ == "__main__":
  app.run(main)
