"""Periodic actions of the training loop, one small class each, each with its own interval.

A hook runs every ``every`` steps during training (0: never) and, with
``at_end``, once after the last step; ``run(step, state)`` returns the metrics
it produced (the loop logs them and yields them) or None. Hooks that sample
raise ``sampling.StopSampling`` when a stop was requested mid-way; the loop then
saves and stops.

* ``CheckpointHook``: Orbax checkpoints (``train.ckpt_every``; the loop also
  calls ``save`` on a stop and at the end);
* ``SampleGridHook``: a PNG grid of EMA samples, one row per class
  (``train.sample_every``; latent models decoded with ``sample.vae``, else the
  latents saved as ``.npy``);
* ``FidHook``: the ADM metrics of ``eval.fid_num_samples`` EMA samples
  (``eval.fid_every``);
* ``DigitsEvalHook``: the digits default's class accuracy and Fréchet distance
  (``eval.num_samples``, at the end only).
"""
from __future__ import annotations


from typing import Any, Callable, Optional

import numpy as np

from deepflow_jax import images as images_lib
from deepflow_jax import outputs
from deepflow_jax import sampling
from deepflow_jax import sharding as shd
from deepflow_jax import storage
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.evaluation import digits as digits_eval
from deepflow_jax.evaluation import reference as reference_lib
from deepflow_jax.evaluation import suite
from deepflow_jax.models import inception
from deepflow_jax.models import vae as vae_lib
from deepflow_jax.training.checkpoints import Checkpointer

# Seeds of the samples each hook draws, offset from train.seed (kept from earlier
# releases so that grids and scores are comparable across versions).
GRID_SEED, DIGITS_SEED, FID_SEED = 1, 2, 3


class Hook:
  """A periodic action: ``run(step, state)`` every ``every`` steps and, with ``at_end``, at
  the end."""
  every: int = 0
  at_end: bool = False

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def run(self, step: int, state) -> Optional[dict[str, float]]:
    raise NotImplementedError


class CheckpointHook(Hook):
  """Saves the state and the data iterator's position every ``every`` steps.

  ``is_finite(state)`` is asked first: a state whose parameters or EMA hold
  NaN or Inf is never saved (one line says so).
  """

  def __init__(self, ckpt: Checkpointer, data_it, every: int, last_saved: int, *,
               is_finite: Callable[[Any], bool] = lambda state: True,
               log: Callable[[str], None] = print):
    self.ckpt, self.data_it, self.every, self.at_end = ckpt, data_it, int(every), True
    self.last_saved, self.is_finite, self.log = last_saved, is_finite, log

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts the save of ``step``; False when the state is not finite (nothing written)."""
    if step == self.last_saved:
      return True
    if not self.is_finite(state):
      self.log(f"WARNING: not saving step {step}: parameters or EMA hold NaN or Inf")
      return False
    self.ckpt.save(step, state, self.data_it.get_state(), force=force)
    self.last_saved = step
    return True

  def run(self, step, state):
    self.save(step, state)


class LatentDecoder:
  """Latent samples -> uint8 RGB images through the VAE of ``sample.vae`` (loaded at first use)."""

  def __init__(self, vae_path: str, mesh, latent_scale: float):
    self.vae_path, self.mesh, self.latent_scale = vae_path, mesh, latent_scale
    self._fn = None

  def __call__(self, x: np.ndarray) -> np.ndarray:
    if self._fn is None:
      self._fn = images_lib.make_decoder(vae_lib.load_diffusers_vae(self.vae_path), self.mesh,
                                         latent_scale=self.latent_scale)
    count = len(x)
    batch = -(-count // self.mesh.size) * self.mesh.size
    x = np.pad(np.asarray(x, np.float32), [(0, batch - count)] + [(0, 0)] * 3)
    return images_lib.to_uint8(shd.host_array(self._fn(x))[:count], rgb=True)


def _to_images(x: np.ndarray, decode: Optional[LatentDecoder]) -> np.ndarray:
  return decode(x) if decode is not None else images_lib.to_uint8(x, rgb=True)


class SampleGridHook(Hook):
  """A grid of EMA samples, one row per class, written to ``WORKDIR/samples/``."""

  def __init__(self, model, settings: sampling.SamplerSettings, sample_config, *, seed: int,
               mesh, workdir: str, decode: Optional[LatentDecoder], latent: bool, is_main: bool,
               log: Callable[[str], None], should_stop: Callable[[], bool], every: int):
    self.model, self.settings, self.mesh, self.decode = model, settings, mesh, decode
    self.rows = min(int(sample_config.grid_classes), model.num_classes)
    self.per_class = int(sample_config.grid_per_class)
    self.seed, self.latent, self.is_main, self.log = seed + GRID_SEED, latent, is_main, log
    self.dir = storage.join(workdir, workdir_lib.SAMPLES_DIR)
    self.should_stop = should_stop
    self.every, self.at_end = int(every), True

  def run(self, step, state):
    if self.rows <= 0:
      return None
    labels = sampling.class_grid_labels(range(self.rows), self.per_class)
    self.log(f"[samples] {len(labels)} EMA samples for the grid at step {step} "
             f"({self.settings.describe()})")
    x = sampling.sample_many(self.model, state.ema_params, labels, self.settings, seed=self.seed,
                             per_device_batch=-(-len(labels) // self.mesh.size), mesh=self.mesh,
                             should_stop=self.should_stop)
    if self.latent and self.decode is None:
      if self.is_main:
        path = storage.join(self.dir, f"latents_{step:08d}.npy")
        storage.makedirs(self.dir)
        outputs.atomic_save_npy(path, x)
        self.log(f"[samples] wrote {path} (set sample.vae to decode grids to PNG)")
      return None
    pictures = _to_images(x, self.decode)  # decoding runs on every process
    if self.is_main:
      path = storage.join(self.dir, f"grid_{step:08d}.png")
      images_lib.save_grid(pictures, self.rows, path)
      self.log(f"[samples] wrote {path}")
    return None


class FidHook(Hook):
  """FID, sFID and IS of ``eval.fid_num_samples`` EMA samples against ``eval.reference``."""

  def __init__(self, model, settings: sampling.SamplerSettings, eval_config, *, seed: int,
               mesh, decode: Optional[LatentDecoder], log: Callable[[str], None],
               should_stop: Callable[[], bool]):
    self.model, self.settings, self.e, self.mesh, self.decode = (model, settings, eval_config,
                                                                  mesh, decode)
    self.seed, self.log, self.should_stop = seed + FID_SEED, log, should_stop
    self.every, self.at_end = int(eval_config.fid_every), int(eval_config.fid_every) > 0
    self._inception = self._reference = None

  def _batches(self, params, n: int):
    """uint8 NHWC batches of ``n`` EMA samples, labels cycling over the classes."""
    per_device = max(1, int(self.e.batch_size) // self.mesh.size)
    batch = per_device * self.mesh.size
    labels = np.arange(n) % self.model.num_classes
    for start in range(0, n, batch):
      x = sampling.sample_many(self.model, params, labels[start:start + batch], self.settings,
                               seed=self.seed, per_device_batch=per_device, mesh=self.mesh,
                               start_index=start)
      yield _to_images(x, self.decode)
      if self.should_stop() and start + batch < n:
        raise sampling.StopSampling(f"stopped after {start + batch} of {n} samples")

  def run(self, step, state):
    if self._inception is None:
      self._inception = inception.load_fid_inception(self.e.inception)
      self._reference = reference_lib.load_reference(self.e.reference, *self._inception,
                                                     precision_recall=False, log=self.log)
    n = int(self.e.fid_num_samples)
    self.log(f"[eval] ADM metrics of {n:,} EMA samples at step {step} "
             f"({self.settings.describe()})")
    res = suite.evaluate_samples(*self._inception, self._batches(state.ema_params, n),
                                 self._reference, num_samples=n, precision_recall=False,
                                 log=self.log)
    self.log(f"[eval] step {step}: FID {res['fid']:.3f}, sFID {res['sfid']:.3f}, IS "
             f"{res['inception_score']:.3f} ({n:,} samples)")
    return {f"eval/{k}": float(v) for k, v in res.items() if v is not None}


class DigitsEvalHook(Hook):
  """Class accuracy and Fréchet distance of generated digits -> ``WORKDIR/eval/metrics.json``."""

  def __init__(self, model, settings: sampling.SamplerSettings, eval_config, *, seed: int,
               mesh, workdir: str, is_main: bool, log: Callable[[str], None],
               should_stop: Callable[[], bool]):
    self.model, self.settings, self.e, self.mesh = model, settings, eval_config, mesh
    self.seed, self.is_main, self.log, self.should_stop = seed + DIGITS_SEED, is_main, log, should_stop
    self.eval_dir = storage.join(workdir, workdir_lib.EVAL_DIR)
    self.grid_path = storage.join(workdir, workdir_lib.SAMPLES_DIR, "eval_grid.png")
    self.every, self.at_end = 0, int(eval_config.num_samples) > 0

  def run(self, step, state):
    n, s = int(self.e.num_samples), self.settings
    self.log(f"[eval] scoring {n} generated digits ({s.describe()})")
    metrics, images, labels = digits_eval.sample_and_evaluate(
        self.model, state.ema_params, s, num_samples=n, seed=self.seed,
        per_device_batch=max(1, int(self.e.batch_size) // self.mesh.size),
        cache_path=storage.join(self.eval_dir, "classifier.msgpack"), mesh=self.mesh,
        should_stop=self.should_stop)
    metrics.update(step=int(step), sampler=s.sampler, num_steps=int(s.num_steps),
                   cfg_scale=float(s.cfg_scale))
    if self.is_main:
      storage.makedirs(self.eval_dir)
      path = storage.join(self.eval_dir, "metrics.json")
      outputs.atomic_write_json(path, metrics)
      self.log(f"[eval] class_accuracy {metrics['class_accuracy']:.4f}, frechet_distance "
               f"{metrics['frechet_distance']:.4f} (real vs real "
               f"{metrics['frechet_distance_real_vs_real']:.4f}) -> {path}")
      rows = digits_eval.class_rows(images, labels, self.model.num_classes)
      if rows is not None:
        images_lib.save_grid(images_lib.to_uint8(rows), self.model.num_classes, self.grid_path)
        self.log(f"[eval] wrote {self.grid_path}")
    return {f"eval/{k}": v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def make_hooks(run) -> tuple[CheckpointHook, list[Hook]]:
  """The checkpoint hook and the sampling/evaluation hooks of a prepared run, in loop order."""
  c, t = run.config, run.config.train
  settings = sampling.SamplerSettings.from_config(c.sample)
  decode = (LatentDecoder(c.sample.vae, run.mesh, run.info.latent_scale)
            if run.info.is_latent and c.sample.vae else None)
  common = dict(seed=int(t.seed), mesh=run.mesh, should_stop=run.stop_requested)
  ckpt = CheckpointHook(run.ckpt, run.data_it, int(t.ckpt_every), run.last_saved,
                        is_finite=run.trainer.state_is_finite, log=run.log)
  others: list[Hook] = [
      SampleGridHook(run.model, settings, c.sample, workdir=run.workdir, decode=decode,
                     latent=run.info.is_latent, is_main=run.is_main, log=run.log,
                     every=int(t.sample_every), **common),
      FidHook(run.model, settings, c.eval, decode=decode, log=run.log, **common)]
  if run.info.name == "digits":
    others.append(DigitsEvalHook(run.model, settings, c.eval, workdir=run.workdir,
                                 is_main=run.is_main, log=run.log, **common))
  return ckpt, others


def run_hooks(hooks: list[Hook], step: int, state, *, final: bool,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs the hooks due at ``step`` (``final``: those that run at the end); their metrics.

  A hook whose EMA samples hold NaN or Inf is skipped with one line (nothing is
  written from them); the others still run.
  """
  out = []
  for h in hooks:
    if (h.at_end if final else h.due(step)):
      try:
        m = h.run(step, state)
      except sampling.NonFiniteSamples as e:
        log(f"WARNING: {type(h).__name__} at step {step} skipped: {e}")
        continue
      if m:
        out.append(m)
  return out
