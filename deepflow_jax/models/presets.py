"""Named architectures: SiT widths and the reference's DeepFlow models."""
from __future__ import annotations

from typing import Any

from deepflow_jax.models.deepflow import DeepFlow

# (hidden_size, num_heads, sit_depth) by SiT width name.
WIDTHS = {
    "S": (384, 6, 12),
    "B": (768, 12, 12),
    "L": (1024, 16, 24),
    "XL": (1152, 16, 28),
}

PRESETS: dict[str, dict[str, Any]] = {}
for _w, (_d, _h, _depth) in WIDTHS.items():
  for _p in (2, 4, 8):
    PRESETS[f"SiT-{_w}/{_p}"] = dict(hidden_size=_d, num_heads=_h, depth=_depth, patch_size=_p,
                                     df_idxs=())
PRESETS["DeepFlow-B/2-2T"] = dict(hidden_size=768, num_heads=12, depth=12, patch_size=2,
                                  df_idxs=(6,))
PRESETS["DeepFlow-XL/2-3T"] = dict(hidden_size=1152, num_heads=16, depth=24, patch_size=2,
                                   df_idxs=(8, 16))

# The reference's model-name strings (args.model) fix width, heads and patch.
REFERENCE_MODEL_NAMES = {
    f"DeepFlow-{w}/{p}": dict(hidden_size=d, num_heads=h, patch_size=p)
    for w, (d, h, _) in WIDTHS.items() for p in (2, 4, 8)
}


def preset_kwargs(name: str) -> dict[str, Any]:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
  return dict(PRESETS[name])


def get_model(name: str, **overrides) -> DeepFlow:
  """A DeepFlow module for a preset name, e.g. get_model('DeepFlow-XL/2-3T', dtype=jnp.bfloat16)."""
  kw = preset_kwargs(name)
  kw.update(overrides)
  return DeepFlow(**kw)
