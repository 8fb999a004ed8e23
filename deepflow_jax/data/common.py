"""What every data source shares: ``DatasetInfo``, the recorded VAE fields, label and
finiteness checks, and the batch helpers.

A source has ``len(src)``, ``src.read_batch(indices) -> dict of stacked arrays``,
``src[i]`` (one example: ``read_batch([i])`` without the batch axis) and
``src.info`` (a :class:`DatasetInfo`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from deepflow_jax.errors import UserError
from deepflow_jax.models.vae import DOWNSAMPLING
from deepflow_jax.models.vae import LATENT_SCALE

DIGITS, REPA, ARRAYRECORD = "digits", "repa", "arrayrecord"  # the sources (data.name)
SOURCES = (DIGITS, REPA, ARRAYRECORD)

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, the train step and the sample decoding need to know about a dataset.

  Attributes:
    name: the source kind, one of ``SOURCES``.
    is_latent: True for VAE-latent sources (batches hold ``mean``/``std``),
      False for pixel sources (batches hold ``image``).
    shape: one example's (h, w, c), NHWC without the batch axis.
    channels: ``shape[-1]``.
    num_classes: number of class labels (labels lie in [0, num_classes)).
    num_examples: examples in the whole source (all processes).
    resolution: pixel side length (latents: of the images the VAE encoded).
    latent_scale: the model sees ``latents * latent_scale`` (training draws
      ``z = (mean + std * eps) * latent_scale``; decoding divides by it). 1.0
      for pixel sources.
    vae_downsampling: image side / latent side (``resolution = h *
      vae_downsampling``); 1 for pixel sources.
    image_shape: (H, W, 3) of the raw images the batches carry as ``"image"``
      (sources built with ``images=True``); None when they carry none.
  """
  name: str
  is_latent: bool
  shape: tuple[int, int, int]
  channels: int
  num_classes: int
  num_examples: int
  resolution: int
  latent_scale: float = 1.0
  vae_downsampling: int = 1
  image_shape: tuple[int, int, int] | None = None


def vae_fields(recorded_scale, recorded_downsampling, config_scale, config_downsampling,
                where: str) -> tuple[float, int]:
  """(latent_scale, vae_downsampling): the dataset's record, else the config, else the SD-VAE."""
  out = []
  for recorded, configured, key, rec_key, default in (
      (recorded_scale, config_scale, "latent_scale", "scaling_factor",
       LATENT_SCALE),
      (recorded_downsampling, config_downsampling, "vae_downsampling", "vae_downsampling",
       DOWNSAMPLING)):
    if recorded is not None and configured is not None and not math.isclose(
        recorded, configured, rel_tol=1e-6):
      raise UserError(f"data.{key}={configured} but {where} records {rec_key}={recorded} (the "
                      f"VAE that encoded the data); leave data.{key} unset")
    out.append(recorded if recorded is not None else
               configured if configured is not None else default)
  return float(out[0]), int(out[1])


def recorded_number(meta: Mapping, key: str, where: str, kind) -> Any:
  v = meta.get(key)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf or (
      kind is int and int(v) != v):
    raise UserError(f"{where}: {key}={v!r} is not a positive {kind.__name__}")
  return kind(v)


def unbatch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v[0] for k, v in batch.items()}


def index_array(indices) -> np.ndarray:
  return np.asarray(indices, np.int64).reshape(-1)


def read_json(path: str, why_needed: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: missing ({why_needed})") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def check_label(label, num_classes: int | None, where: str) -> np.int32:
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
    raise UserError(f"{where}: label {label!r} is not an integer")
  if label < 0 or (num_classes is not None and label >= num_classes):
    raise UserError(f"{where}: label {label} not in [0, {num_classes})")
  return np.int32(label)


def check_labels(labels: np.ndarray, num_classes: int, where) -> np.ndarray:
  """int32 labels; the first out of [0, num_classes) raises, named by ``where(k)``."""
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    k = int(np.argmax(bad))
    raise UserError(f"{where(k)}: label {int(labels[k])} not in [0, {num_classes})")
  return labels.astype(np.int32)


def first_non_finite(*arrays: np.ndarray) -> int | None:
  """Row of the first example with a non-finite value in any of ``arrays`` (n, ...), or None."""
  if all(np.isfinite(a).all() for a in arrays):  # the common case: one pass per array
    return None
  bad = np.zeros(len(arrays[0]), bool)
  for a in arrays:
    bad |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
  return int(np.argmax(bad))
