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


def write_latent_dataset(
    directory,
    examples,
    *,
    num_examples: int,
    num_classes: int,
    split: str = "train",
    num_shards: int = 1,
    resolution: int = 0,
    vae: str = "",
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes a latent dataset in this schema; returns the metadata written.

  ``examples`` yields ``(mean, std, label)`` with mean/std float32 (h, w, c) NHWC,
  in the order that defines each record's ``index`` (0, 1, ...). Example ``i``
  goes to shard ``i * num_shards // num_examples`` (contiguous, near-equal
  shards). Records are written with ``group_size:1`` (grain's random access) and
  ``metadata.json`` is written last, through a temporary file and a rename, so a
  directory with ``metadata.json`` is complete. Errors (wrong count, mismatched
  shapes, labels out of range) raise ``UserError``; existing shards of the same
  names are overwritten.
  """
  import os  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  directory = os.fspath(directory)
  if num_examples <= 0 or not 1 <= num_shards <= num_examples:
    raise UserError(f"need num_examples > 0 and 1 <= num_shards <= num_examples, "
                    f"got {num_examples} examples, {num_shards} shards")
  os.makedirs(directory, exist_ok=True)
  names = [shard_name(split, s, num_shards) for s in range(num_shards)]
  latent_shape = None
  writer, current, count = None, -1, 0
  try:
    for i, (mean, std, label) in enumerate(examples):
      if i >= num_examples:
        raise UserError(f"{directory}: more than num_examples={num_examples} examples given")
      mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
      if latent_shape is None:
        latent_shape = tuple(int(d) for d in mean.shape)
      if mean.shape != latent_shape or std.shape != latent_shape:
        raise UserError(f"example {i}: mean {mean.shape} / std {std.shape}, expected {latent_shape}")
      if not 0 <= int(label) < num_classes:
        raise UserError(f"example {i}: label {label} not in [0, {num_classes})")
      shard = i * num_shards // num_examples
      if shard != current:
        if writer is not None:
          writer.close()
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(directory, names[shard]), "group_size:1")
        current = shard
      writer.write(encode_record(mean, std, int(label), i))
      count += 1
  finally:
    if writer is not None:
      writer.close()
  if count != num_examples:
    raise UserError(f"{directory}: got {count} examples, num_examples={num_examples}")
  return write_metadata(directory, num_examples=num_examples, shards=names,
                        latent_shape=latent_shape, num_classes=num_classes,
                        resolution=resolution, vae=vae, extra=extra_metadata)


def write_metadata(directory, *, num_examples: int, shards, latent_shape, num_classes: int,
                   resolution: int = 0, vae: str = "", scaling_factor: float = 0.18215,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``metadata.json`` (last, through a temporary file and a rename); returns it."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  metadata = {
      "schema": SCHEMA, "num_examples": int(num_examples), "shards": list(shards),
      "latent_shape": [int(d) for d in latent_shape], "num_classes": int(num_classes),
      "resolution": int(resolution), "vae": str(vae), "scaling_factor": float(scaling_factor),
  }
  metadata.update(extra or {})
  path = os.path.join(os.fspath(directory), METADATA_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return metadata
