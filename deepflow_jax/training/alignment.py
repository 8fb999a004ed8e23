"""SSL alignment (REPA): the frozen DINOv2 whose patch features the projection loss targets.

With ``model.ssl_align`` the batch also carries the raw images, ``"image"`` uint8
(B, H, W, 3). ``load_alignment_encoder`` reads the frozen DINOv2 of
``model.encoder_path`` at start-up (its position table resampled to the model's
token grid G, as the reference does for REPA); inside the jitted train step
``alignment_features`` preprocesses the images (``x / 255``, ImageNet mean/std,
PyTorch's bicubic resize to ``14 G`` pixels: 224 for 256-pixel ImageNet latents,
448 at 512, as the reference) and runs the encoder under ``stop_gradient`` in the
model's compute dtype; its patch tokens (B, G*G, z_dim) are the projection loss's
targets (``losses.projection_loss``, weight ``loss.proj_coeff``). The encoder's
parameters are a replicated, non-differentiated argument of the step: not part of
the train state and not checkpointed.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepflow_jax.errors import UserError
from deepflow_jax.models import dinov2
from deepflow_jax.models.deepflow import DeepFlow


def alignment_grid(model: DeepFlow) -> int:
  """G: the model's token grid is G x G; the encoder's patch grid must be the same."""
  return model.input_size // model.patch_size


def load_alignment_encoder(config, model: DeepFlow) -> tuple[dinov2.DinoVisionTransformer, Any]:
  """The frozen DINOv2 of ``model.encoder_path`` for SSL alignment -> ``(encoder, params)``.

  Its position table is resampled at load to the model's token grid G (as the
  reference does for REPA), its compute dtype is the model's, parameters are
  float32 (host arrays). ``model.encoder_num_heads`` (0: the official DINOv2
  width table) sets the heads. Raises ``UserError`` (one line) for a missing or
  unreadable file, or an encoder whose width is not ``model.z_dim``.
  """
  m = config.model
  path = str(m.encoder_path)
  heads = int(m.encoder_num_heads) or None
  try:
    encoder, params = dinov2.load_dinov2(path, grid=alignment_grid(model), num_heads=heads,
                                         dtype=model.dtype)
  except UserError as e:
    raise UserError(f"model.encoder_path: {e}") from e
  if encoder.embed_dim != model.z_dim:
    raise UserError(f"model.encoder_path={path!r}: the encoder's features have width "
                    f"{encoder.embed_dim} but model.z_dim={model.z_dim}; set "
                    f"--config.model.z_dim={encoder.embed_dim}")
  return encoder, jax.device_get(params)


def alignment_features(encoder: dinov2.DinoVisionTransformer, params, images: jax.Array
                       ) -> jax.Array:
  """uint8 images (N, H, W, 3) -> the encoder's patch tokens (N, G*G, D) float32, no gradient.

  ``G = encoder.pos_grid``: the images are preprocessed to ``patch * G`` pixels
  (``dinov2.preprocess_raw_image``), which is ``dinov2.repa_input_size`` for
  256 and 512 pixels with the models' G of 16 and 32 (the reference's
  ``preprocess_raw_image`` + ``forward_features``), so this equals
  ``dinov2.repa_features`` there; tiny test models use a smaller G.
  """
  size = encoder.patch_size * encoder.pos_grid
  x = dinov2.preprocess_raw_image(images, size)
  out = encoder.apply({"params": params}, x)["x_norm_patchtokens"]
  return jax.lax.stop_gradient(out.astype(jnp.float32))
