"""Evaluating generated digits with a classifier trained on real digits.

The project trains a small Flax linen CNN (:class:`DigitsClassifier`) with optax
on the digits *train* split (:mod:`deepflow_jax.data.digits`) at the image size
being generated, and uses it two ways:

* **class accuracy**: the fraction of generated images that the classifier
  assigns to their conditioning label (a class-conditional sampler that ignores
  its label scores ~0.1);
* **Frechet distance** between the classifier's penultimate-layer features
  (128-d, after ReLU) of generated images and of held-out real images: the FID
  formula on a domain-specific feature extractor. Its absolute value has no
  meaning across classifiers or sample sizes, so :func:`evaluate_generated` also
  reports the same distance between real train-split and held-out images, with
  the same number of train images as generated ones, as the floor to compare to.

Training (30 epochs, random 1-2 pixel shifts) takes ~5-10 s on a 2-core CPU, is
deterministic given the seed (init key, minibatch order, shifts), and reaches
~0.97-0.99 held-out accuracy on real digits at sizes 8 and 16.
Images everywhere are float NHWC (N, S, S, 1) in [-1, 1], the digits pipeline's
format; inputs outside [-1, 1] are clipped.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from deepflow_jax import sampling
from deepflow_jax import storage
from deepflow_jax.data import digits as digits_lib
from deepflow_jax.evaluation import metrics
from deepflow_jax.errors import UserError

FEATURE_DIM = 128
_CACHE_VERSION = 1


class DigitsClassifier(nn.Module):
  """Small CNN for (N, S, S, 1) digits: returns ``(logits (N, 10), features (N, 128))``.

  Conv3x3(32) -> ReLU -> Conv3x3(64, stride 2) -> ReLU -> Conv3x3(64, stride 2)
  -> ReLU -> flatten -> Dense(128) -> ReLU (= features) -> Dense(10) (= logits).
  """
  num_classes: int = digits_lib.NUM_CLASSES
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim)(x))
    logits = nn.Dense(self.num_classes)(features)
    return logits, features


def _check_images(images, image_size: int | None = None, what: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
    raise UserError(f"{what}: expected NHWC (N, S, S, 1) digits, got shape {images.shape}")
  if image_size is not None and images.shape[1] != image_size:
    raise UserError(f"{what}: size {images.shape[1]}, but the classifier was trained at {image_size}")
  if not np.issubdtype(images.dtype, np.floating):
    raise UserError(f"{what}: expected float images in [-1, 1], got dtype {images.dtype}")
  return np.clip(images.astype(np.float32), -1.0, 1.0)


@functools.lru_cache(maxsize=8)
def _jitted_init(model: nn.Module):
  # One jitted init compiles faster than Flax's op-by-op eager init.
  return jax.jit(model.init)


def _init_params(model: nn.Module, seed: int, image_size: int):
  return _jitted_init(model)(jax.random.PRNGKey(seed),
                             jnp.zeros((1, image_size, image_size, 1)))["params"]


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(model: nn.Module, total_steps: int, learning_rate: float):
  """(optax transform, jitted train step); cached so repeated trainings reuse the compile."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, total_steps), weight_decay=1e-4)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def random_shifts(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Translates each (N, S, S, C) image by up to ``max_shift`` pixels per axis.

  Pixels shifted in are background (-1). Used as training augmentation, so the
  classifier tolerates slightly off-centre generated digits.
  """
  if max_shift <= 0:
    return images
  n, s = images.shape[:2]
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)),
                  constant_values=-1.0)
  dy, dx = rng.integers(-max_shift, max_shift + 1, (2, n))
  rows = (max_shift + dy)[:, None] + np.arange(s)
  cols = (max_shift + dx)[:, None] + np.arange(s)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _train(image_size: int, seed: int, epochs: int, batch_size: int, learning_rate: float):
  (x, y), _ = digits_lib.load_digits_split(image_size)
  model = DigitsClassifier()
  params = _init_params(model, seed, image_size)
  steps_per_epoch = len(y) // batch_size
  tx, step = _optimizer_and_step(model, epochs * steps_per_epoch, learning_rate)
  opt_state = tx.init(params)

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(y))
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      xb = random_shifts(x[idx], max(1, image_size // 8), rng)
      params, opt_state = step(params, opt_state, xb, y[idx])
  return model, jax.device_get(params)


def train_classifier(image_size: int, seed: int = 0, *, cache_path: str | os.PathLike | None = None,
                     epochs: int = 30, batch_size: int = 64,
                     learning_rate: float = 2e-3) -> tuple[DigitsClassifier, Any]:
  """Trains :class:`DigitsClassifier` on the real digits train split; returns ``(model, params)``.

  Args:
    image_size: side length of the images (digits are resized as in
      :func:`deepflow_jax.data.digits.load_digits_split`).
    seed: initialisation key and minibatch order; the result is deterministic
      given the seed (and the other arguments) on a given backend.
    cache_path: optional file. If it holds a classifier trained with the same
      image size, seed and hyper-parameters, its params are loaded instead of
      training; otherwise the trained params are written there (msgpack via
      ``flax.serialization``, no pickle).
    epochs, batch_size, learning_rate: AdamW with cosine decay, weight decay
      1e-4; each training batch is randomly translated by up to
      ``max(1, image_size // 8)`` pixels (:func:`random_shifts`).
  """
  image_size = int(image_size)
  key = {"version": _CACHE_VERSION, "image_size": image_size, "seed": int(seed),
         "epochs": int(epochs), "batch_size": int(batch_size),
         "learning_rate": float(learning_rate)}
  model = DigitsClassifier()
  if cache_path is not None and storage.isfile(os.fspath(cache_path)):
    try:
      cached = serialization.msgpack_restore(storage.read_bytes(os.fspath(cache_path)))
    except Exception:  # pylint: disable=broad-except  (garbage file: retrain, overwrite)
      cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
      target = jax.eval_shape(lambda: _init_params(model, 0, image_size))
      try:
        return model, serialization.from_state_dict(target, cached["params"])
      except (KeyError, ValueError, TypeError):
        pass
  model, params = _train(image_size, int(seed), int(epochs), int(batch_size), float(learning_rate))
  if cache_path is not None:
    cache_path = storage.absolute(cache_path)
    storage.makedirs(storage.dirname(cache_path))
    storage.write_bytes(cache_path, serialization.msgpack_serialize(
        {"key": key, "params": serialization.to_state_dict(params)}))
  return model, params


@functools.lru_cache(maxsize=8)
def _jitted_apply(model: nn.Module):
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


def classify(model: DigitsClassifier, params, images, *,
             batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(logits (N, 10), features (N, 128))`` as float32 numpy arrays.

  ``images``: float NHWC (N, S, S, 1) in [-1, 1] (clipped). Runs in batches of
  ``batch_size`` (the last one zero-padded), so one compilation per image size
  serves any N.
  """
  images = _check_images(images)
  n = images.shape[0]
  if n == 0:
    raise UserError("classify: no images")
  apply = _jitted_apply(model)
  bs = int(batch_size)
  logits, feats = [], []
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    lo, fe = apply(params, chunk)
    logits.append(np.asarray(lo)[:bs - pad])
    feats.append(np.asarray(fe)[:bs - pad])
  return (np.concatenate(logits).astype(np.float32),
          np.concatenate(feats).astype(np.float32))


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased, ``ddof=1``) covariance of (N, D) features, float64."""
  feats = np.asarray(feats, np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise UserError(f"need (N >= 2, D) features, got shape {feats.shape}")
  return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], -1)


def frechet_distance(feats_a, feats_b) -> float:
  """Frechet (FID-formula) distance between two (N, D) feature sets.

  Gaussians fitted by mean and ``ddof=1`` covariance (float64), then the ADM
  evaluator's formula, ``deepflow_jax.evaluation.metrics.frechet_distance``
  (the same arithmetic as the FID numbers). Identical sets give ~0 (to float64
  round-off, either sign); sets differing by a constant shift ``d`` give ``|d|^2``.
  """
  mu_a, s_a = feature_stats(feats_a)
  mu_b, s_b = feature_stats(feats_b)
  return metrics.frechet_distance(mu_a, s_a, mu_b, s_b)


def evaluate_generated(images, labels, heldout_images, *, model: DigitsClassifier | None = None,
                       params=None, train_images=None, heldout_labels=None, seed: int = 0,
                       cache_path: str | os.PathLike | None = None) -> dict[str, float]:
  """Scores class-conditionally generated digits against real ones.

  Args:
    images: generated images, float NHWC (N, S, S, 1) in [-1, 1].
    labels: (N,) ints, the label each image was generated for.
    heldout_images: real held-out images at the same size (e.g. from
      :func:`deepflow_jax.data.digits.load_digits_split`).
    model, params: a classifier from :func:`train_classifier`; if omitted, one
      is trained at size S with ``seed`` (cached at ``cache_path`` if given).
    train_images: real images for the real-vs-real reference; default the
      digits train split at size S.
    heldout_labels: if given, the classifier's accuracy on the held-out images
      is reported too.

  Returns:
    dict with
    ``class_accuracy``: fraction of generated images classified as their label;
    ``frechet_distance``: generated vs held-out real features;
    ``frechet_distance_real_vs_real``: ``min(N, len(train_images))`` real train
    images (a fixed ``default_rng(0)`` subset, matching the generated sample
    size since the estimate is biased by sample size) vs held-out real features:
    the value a perfect generator would get, roughly;
    ``num_images``: N; and ``classifier_heldout_accuracy`` when
    ``heldout_labels`` is given.
  """
  images = _check_images(images, what="generated images")
  size = images.shape[1]
  heldout_images = _check_images(heldout_images, size, what="held-out images")
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != images.shape[0]:
    raise UserError(f"{images.shape[0]} generated images but {labels.shape[0]} labels")
  if model is None or params is None:
    model, params = train_classifier(size, seed, cache_path=cache_path)
  if train_images is None:
    train_images = digits_lib.load_digits_split(size)[0][0]
  train_images = _check_images(train_images, size, what="train images")

  logits, feats = classify(model, params, images)
  heldout_logits, feats_heldout = classify(model, params, heldout_images)
  n_ref = min(images.shape[0], train_images.shape[0])
  ref = train_images[np.sort(np.random.default_rng(0).permutation(train_images.shape[0])[:n_ref])]
  _, feats_ref = classify(model, params, ref)
  out = {
      "class_accuracy": float(np.mean(logits.argmax(-1) == labels)),
      "frechet_distance": frechet_distance(feats, feats_heldout),
      "frechet_distance_real_vs_real": frechet_distance(feats_ref, feats_heldout),
      "num_images": int(images.shape[0]),
  }
  if heldout_labels is not None:
    out["classifier_heldout_accuracy"] = float(
        np.mean(heldout_logits.argmax(-1) == np.asarray(heldout_labels).reshape(-1)))
  return out


def sample_and_evaluate(model, params, settings: sampling.SamplerSettings, *,
                        num_samples: int = 1000, seed: int = 0, per_device_batch: int = 250,
                        cache_path: str | os.PathLike | None = None, mesh=None,
                        should_stop=None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Generates ``num_samples`` digits (labels cycling over the classes) and scores them.

  Samples come from ``deepflow_jax.sampling.sample_many`` with ``settings``
  (data-parallel; ``should_stop`` as there). Returns ``(metrics, images,
  labels)`` with the metrics of :func:`evaluate_generated` plus
  ``sampling_seconds``, and the generated images (N, S, S, 1) clipped to [-1, 1].
  """
  labels = np.arange(int(num_samples)) % model.num_classes
  t0 = time.perf_counter()
  x = sampling.sample_many(model, params, labels, settings, seed=seed,
                           per_device_batch=per_device_batch, mesh=mesh,
                           progress="eval: sampling", should_stop=should_stop)
  seconds = time.perf_counter() - t0
  (_, _), (heldout_x, heldout_y) = digits_lib.load_digits_split(model.input_size)
  images = np.clip(x, -1, 1)
  metrics = evaluate_generated(images, labels, heldout_x, heldout_labels=heldout_y, seed=0,
                               cache_path=cache_path)
  metrics["sampling_seconds"] = round(seconds, 2)
  return metrics, images, labels


def class_rows(images: np.ndarray, labels: np.ndarray, num_classes: int,
               per_class: int = 10) -> np.ndarray | None:
  """The first ``per_class`` images of every class, class-major (a grid with a row per class)."""
  idx = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
  if any(len(i) < per_class for i in idx):
    return None
  return images[np.concatenate(idx)]
