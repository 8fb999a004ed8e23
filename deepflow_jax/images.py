"""Image helpers: samples to uint8 pixels, class grids, PNG files.

* ``to_uint8(images)``: the reference's formula from [-1, 1] to uint8
  (truncation, not rounding);
* ``decode(samples, vae=None, latent_scale=...)``: samples as the model draws
  them (pixels in [-1, 1], or diffusion latents) -> uint8 NHWC images;
* ``grid(images, rows)`` / ``save_grid(images, rows, path)``: one picture with a
  row per class;
* ``save_png(path, image)``: an atomic PNG write (temporary name, then rename);
* ``sample_grid(model, params, classes, per_class, ...)``: sample and decode a class
  grid in one call (notebooks).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepflow_jax import outputs
from deepflow_jax import storage
from deepflow_jax import sampling
from deepflow_jax.models.vae import LATENT_SCALE
from deepflow_jax.errors import UserError


def to_uint8(images, *, rgb: bool = False):
  """Images in [-1, 1] (N, H, W, C) -> uint8 with the reference's formula.

  ``clip((images + 1) / 2 * 255, 0, 255)`` then a cast to uint8, which truncates
  toward zero (as ``torch.Tensor.to(torch.uint8)`` in REPA/DeepFlow's sampler:
  ``(s + 1) / 2``; ``clamp(255 * s, 0, 255)``; ``.to(uint8)``). It does NOT round:
  0.999 * 255 -> 254. NaNs become 0. numpy in -> numpy out, otherwise a jax
  array. ``rgb=True`` replicates a single channel to three (for PNGs and the
  ADM ``arr_0``).
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  x = xp.clip((images + 1) / 2 * 255, 0, 255)
  x = xp.where(xp.isnan(x), 0, x)
  x = x.astype(xp.uint8)
  if rgb and x.shape[-1] == 1:
    x = xp.repeat(x, 3, axis=-1)
  return x


def decode(samples, vae: Optional[tuple[Any, Any]] = None, *, latent_scale: float = LATENT_SCALE,
           rgb: bool = False) -> np.ndarray:
  """Samples -> uint8 NHWC images (numpy).

  Pixel-space samples are in [-1, 1]; latent samples are decoded by
  ``vae = (module, params)`` as ``vae.decode(z / latent_scale)`` first.
  """
  x = samples
  if vae is not None:
    module, params = vae
    x = module.apply({"params": params}, jnp.asarray(x) / latent_scale, method=module.decode)
  return to_uint8(np.asarray(x, np.float32), rgb=rgb)


def make_decoder(vae: tuple[Any, Any], mesh, *, latent_scale: Optional[float] = None):
  """A jitted, batch-sharded ``decode(z) -> images in [-1, 1]`` for diffusion latents ``z``.

  ``vae = (module, params)``; ``z`` (B, h, w, c) sharded (or shardable) over the
  mesh's axes, B a multiple of ``mesh.size``. ``latent_scale`` defaults to the
  VAE's own ``latent_scale``. The VAE's parameters are replicated once here.
  """
  module, params = vae
  scale = float(module.latent_scale if latent_scale is None else latent_scale)
  data = NamedSharding(mesh, P(mesh.axis_names))
  repl = NamedSharding(mesh, P())
  params = jax.device_put(params, repl)
  fn = jax.jit(lambda p, z: module.apply({"params": p}, z / scale, method=module.decode),
               in_shardings=(repl, data), out_shardings=data)
  return lambda z: fn(params, z)


def grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
  """uint8 (rows * cols, H, W, C) -> one (H', W', C) picture, ``rows`` rows, white gaps."""
  n, h, w, c = images.shape
  cols = n // rows
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(rows * cols):
    r, k = divmod(i, cols)
    y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
    out[y0:y0 + h, x0:x0 + w] = images[i]
  return out


def save_png(path: str, image: np.ndarray, *, min_side: int = 0) -> None:
  """Writes a uint8 (H, W, C) image as PNG atomically (temporary name, then rename).

  ``min_side`` enlarges small pictures (nearest neighbour, integer factor) so
  the longer side reaches about that many pixels.
  """
  scale = max(1, min_side // max(image.shape[:2])) if min_side else 1
  if scale > 1:
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)  # nearest neighbour
  parent = storage.dirname(path)
  if parent:
    storage.makedirs(parent)
  outputs.atomic_save_png(path, image[..., 0] if image.shape[-1] == 1 else image[..., :3])


def save_grid(images: np.ndarray, rows: int, path: str) -> None:
  """uint8 (rows * cols, H, W, C) -> one PNG with ``rows`` rows (small images enlarged)."""
  save_png(path, grid(images, rows), min_side=512)


def sample_grid(model, params, classes: Sequence[int], per_class: int = 8,
                settings: sampling.SamplerSettings = sampling.SamplerSettings(), *,
                vae: Optional[tuple[Any, Any]] = None, latent_scale: float = LATENT_SCALE,
                seed: int = 0, per_device_batch: int = 16) -> np.ndarray:
  """Samples ``per_class`` images of every class in ``classes``; a uint8 RGB picture
  (H, W, 3), a row per class (1-channel models are shown grey).

  ``settings`` (``sampling.SamplerSettings``), ``seed`` and ``per_device_batch``
  go to ``deepflow_jax.sampling.sample_many``. Latent models need ``vae =
  (module, params)`` (``deepflow_jax.models.vae.load_diffusers_vae``) to become
  pictures. Show it with ``PIL.Image.fromarray(picture)`` or save it with
  ``save_png``.
  """
  if model.in_channels not in (1, 3) and vae is None:
    raise UserError("this model samples VAE latents: pass vae=load_diffusers_vae(path) to see "
                    "them as images")
  labels = sampling.class_grid_labels(classes, per_class)
  samples = sampling.sample_many(model, params, labels, settings, seed=seed,
                                 per_device_batch=per_device_batch)
  return grid(decode(samples, vae, latent_scale=latent_scale, rgb=True), len(list(classes)))
