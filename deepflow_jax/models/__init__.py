"""DeepFlow networks."""
from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.deepflow import sincos_pos_embed
from deepflow_jax.models.deepflow import unpatchify
from deepflow_jax.models.presets import PRESETS
from deepflow_jax.models.presets import get_model

__all__ = ["DeepFlow", "PRESETS", "get_model", "sincos_pos_embed", "unpatchify"]
