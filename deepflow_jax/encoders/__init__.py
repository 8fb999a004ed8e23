"""Frozen image encoders for SSL (REPA) alignment: DINOv2 in Flax linen."""
from deepflow_jax.encoders.dinov2 import DinoVisionTransformer
from deepflow_jax.encoders.dinov2 import load_dinov2
from deepflow_jax.encoders.dinov2 import preprocess_raw_image
from deepflow_jax.encoders.dinov2 import repa_input_size

__all__ = ["DinoVisionTransformer", "load_dinov2", "preprocess_raw_image", "repa_input_size"]
