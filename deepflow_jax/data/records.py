"""The project's ArrayRecord schema for VAE latent moments.

A dataset is a directory holding

* ``metadata.json``: ``{"schema": "deepflow-jax/latents/v1", "num_examples": int,
  "shards": [file names in order], "latent_shape": [h, w, c], "num_classes": int,
  "resolution": int, "vae": str, "scaling_factor": 0.18215, ...}``;
* ``<split>-SSSSS-of-NNNNN.array_record`` shards, each record one example.

A record is a msgpack map (written with ``flax.serialization.msgpack_serialize``,
which stores numpy arrays as raw bytes plus dtype/shape: no pickle) with keys

* ``mean``: float32 (h, w, c), the VAE posterior mean, NHWC;
* ``std``: float32 (h, w, c), the posterior std ``exp(0.5 * clip(logvar, -30, 20))``;
* ``label``: int, the class id (sorted class-folder order, as the reference);
* ``index``: int, the example's position in the source's deterministic file order.

Training draws ``z = (mean + std * eps) * scaling_factor`` inside the jitted step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax import serialization

from deepflow_jax.errors import UserError

SCHEMA = "deepflow-jax/latents/v1"
METADATA_FILE = "metadata.json"
RECORD_KEYS = ("mean", "std", "label", "index")


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(mean: np.ndarray, std: np.ndarray, label: int, index: int) -> bytes:
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != std.shape or mean.ndim != 3:
    raise ValueError(f"mean {mean.shape} and std {std.shape} must both be (h, w, c)")
  return serialization.msgpack_serialize(
      {"mean": mean, "std": std, "label": int(label), "index": int(index)})


def decode_record(data: bytes, *, where: str = "record",
                  latent_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Decodes one record; ``where`` (file and index) is named in any error."""
  try:
    rec = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types on garbage
    raise UserError(f"{where}: not a deepflow-jax latent record ({type(e).__name__}: {e})") from e
  if not isinstance(rec, dict) or set(rec) != set(RECORD_KEYS):
    got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise UserError(f"{where}: expected record keys {list(RECORD_KEYS)}, got {got}")
  mean, std = np.asarray(rec["mean"]), np.asarray(rec["std"])
  if mean.shape != std.shape or mean.ndim != 3:
    raise UserError(f"{where}: mean {mean.shape} / std {std.shape} are not matching (h, w, c) arrays")
  if latent_shape is not None and tuple(mean.shape) != tuple(latent_shape):
    raise UserError(f"{where}: latent shape {tuple(mean.shape)}, expected {tuple(latent_shape)}")
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32),
          "label": int(rec["label"]), "index": int(rec["index"])}
