"""The project's ArrayRecord schema for VAE latent moments.

A dataset is a directory holding

* ``metadata.json``: ``{"schema": "deepflow-jax/latents/v1", "num_examples": int,
  "shards": [file names in order], "latent_shape": [h, w, c], "num_classes": int,
  "resolution": int, "vae": str, "scaling_factor": 0.18215, "vae_downsampling": 8,
  ...}`` (``scaling_factor``: what the VAE's latents are multiplied by for the
  model; ``vae_downsampling``: image side / latent side. Datasets written before
  ``vae_downsampling`` was recorded lack it; readers then use ``resolution / h``);
* ``<split>-SSSSS-of-NNNNN.array_record`` shards, each record one example.

A record is a msgpack map (written with ``flax.serialization.msgpack_serialize``,
which stores numpy arrays as raw bytes plus dtype/shape: no pickle) with keys

* ``mean``: float32 (h, w, c), the VAE posterior mean, NHWC;
* ``std``: float32 (h, w, c), the posterior std ``exp(0.5 * clip(logvar, -30, 20))``;
* ``label``: int, the class id (sorted class-folder order, as the reference);
* ``index``: int, the example's position in the source's deterministic file order;
* ``image`` (optional): uint8 (H, W, 3), the centre-cropped RGB image the latents were
  encoded from (``preprocess --save_images``; what SSL alignment feeds its image
  encoder). A dataset's records either all hold it or none do; ``metadata.json``
  then records ``"image_shape": [H, W, 3]``. Datasets written without images
  (and before the field existed) have no ``image_shape`` and read as before.

Training draws ``z = (mean + std * eps) * scaling_factor`` inside the jitted step.
:func:`decode_records` decodes a whole batch of records into stacked arrays
(what the input pipeline uses; the images only when asked for); :func:`decode_record`
is the one-record form.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_module
from flax import serialization

from deepflow_jax.errors import UserError
from deepflow_jax.models.vae import DOWNSAMPLING
from deepflow_jax.models.vae import LATENT_SCALE

SCHEMA = "deepflow-jax/latents/v1"
METADATA_FILE = "metadata.json"
RECORD_KEYS = ("mean", "std", "label", "index")
IMAGE_KEY = "image"  # optional: uint8 (H, W, 3) crop
# The SD-VAE's values (sd-vae-ft-ema / ft-mse), recorded when a writer does not say.


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(mean: np.ndarray, std: np.ndarray, label: int, index: int,
                  image: np.ndarray | None = None) -> bytes:
  """One record: mean/std float32 (h, w, c); ``image`` uint8 (H, W, 3) or None (no field)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != std.shape or mean.ndim != 3:
    raise ValueError(f"mean {mean.shape} and std {std.shape} must both be (h, w, c)")
  rec = {"mean": mean, "std": std, "label": int(label), "index": int(index)}
  if image is not None:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    rec[IMAGE_KEY] = np.ascontiguousarray(image)
  return serialization.msgpack_serialize(rec)


def decode_record(data: bytes, *, where: str = "record",
                  latent_shape: tuple[int, ...] | None = None,
                  image_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Decodes one record; ``where`` (file and index) is named in any error.

  Returns ``{"mean": float32 (h, w, c), "std": float32 (h, w, c), "label": int,
  "index": int}``, plus ``"image": uint8 (H, W, 3)`` when ``image_shape`` is given.
  """
  batch = decode_records([data], where=lambda _: where, latent_shape=latent_shape,
                         image_shape=image_shape)
  out = {"mean": batch["mean"][0], "std": batch["std"][0], "label": int(batch["label"][0]),
         "index": int(batch["index"][0])}
  if image_shape is not None:
    out[IMAGE_KEY] = batch[IMAGE_KEY][0]
  return out


def _keep_ext(code: int, data: bytes) -> msgpack.ExtType:
  return msgpack.ExtType(code, data)


@functools.lru_cache(maxsize=8)
def _array_ext(shape: tuple[int, ...], dtype: str = "float32") -> tuple[int, bytes, int]:
  """(ext code, payload prefix, payload size) of a ``dtype`` ``shape`` array as written here.

  ``encode_record`` stores arrays as flax's msgpack extension: a payload of
  (shape, dtype name, raw bytes). A payload that starts with these bytes and
  has this size holds exactly such an array, whose data is its last bytes.
  """
  ref = msgpack.unpackb(serialization.msgpack_serialize(np.zeros(shape, dtype)),
                        ext_hook=_keep_ext)
  nbytes = np.dtype(dtype).itemsize * math.prod(shape)
  return ref.code, bytes(ref.data[:-nbytes]), len(ref.data)


def _is_ext(value, ext: tuple[int, bytes, int]) -> bool:
  return (isinstance(value, msgpack.ExtType) and value.code == ext[0]
          and len(value.data) == ext[2] and value.data.startswith(ext[1]))


def decode_records(datas: Sequence[bytes], *, where: Callable[[int], str],
                   latent_shape: tuple[int, ...] | None = None,
                   image_shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
  """Decodes a batch of records into stacked arrays.

  Args:
    datas: ``n >= 1`` serialised records.
    where: ``where(k)`` names record ``k`` (file and index) in an error; only
      called when raising.
    latent_shape: the expected (h, w, c); None takes the first record's.
    image_shape: the expected (H, W, 3) of the ``image`` field: every record
      must hold one, and the result has ``"image"``. None: an ``image`` field is
      not decoded (latent-only reading pays only for the bytes).

  Returns:
    ``{"mean": float32 (n, h, w, c), "std": float32 (n, h, w, c),
    "label": int64 (n,), "index": int64 (n,)}`` and, with ``image_shape``,
    ``"image": uint8 (n, H, W, 3)``. Arrays stored in the expected dtype and
    shape (every record ``encode_record`` writes) are copied straight from the
    record's bytes into the stacked arrays; anything else goes through
    ``flax.serialization.msgpack_restore`` and its checks.

  Raises:
    UserError: a record that is not this schema's msgpack map, or whose mean and
      std are not matching (h, w, c) arrays of the expected shape, or (with
      ``image_shape``) whose image is missing or not uint8 of that shape,
      naming ``where(k)``.
  """
  n = len(datas)
  labels = np.empty((n,), np.int64)
  indices = np.empty((n,), np.int64)
  mean_out = std_out = fast = None
  keys, with_image = set(RECORD_KEYS), set(RECORD_KEYS) | {IMAGE_KEY}
  image_out = image_ext = None
  if image_shape is not None:
    image_shape = tuple(int(d) for d in image_shape)
    image_out = np.empty((n,) + image_shape, np.uint8)
    image_ext = _array_ext(image_shape, "uint8")
  for k, data in enumerate(datas):
    try:
      rec = msgpack.unpackb(data, ext_hook=_keep_ext, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types on garbage
      raise UserError(f"{where(k)}: not a deepflow-jax latent record "
                      f"({type(e).__name__}: {e})") from e
    if not isinstance(rec, dict) or set(rec) not in (keys, with_image):
      got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
      raise UserError(f"{where(k)}: expected record keys {list(RECORD_KEYS)} (and optionally "
                      f"{IMAGE_KEY!r}), got {got}")
    full = None
    if fast is not None and _is_ext(rec["mean"], fast) and _is_ext(rec["std"], fast):
      offset = len(fast[1])
      mean_out[k] = np.frombuffer(rec["mean"].data, np.float32, offset=offset).reshape(latent_shape)
      std_out[k] = np.frombuffer(rec["std"].data, np.float32, offset=offset).reshape(latent_shape)
    else:
      full = serialization.msgpack_restore(data)  # it unpacked above: arrays may be odd
      mean, std = np.asarray(full["mean"]), np.asarray(full["std"])
      if mean.shape != std.shape or mean.ndim != 3:
        raise UserError(f"{where(k)}: mean {mean.shape} / std {std.shape} are not matching "
                        "(h, w, c) arrays")
      if mean_out is None:
        latent_shape = tuple(int(d) for d in (latent_shape or mean.shape))
        mean_out = np.empty((n,) + latent_shape, np.float32)
        std_out = np.empty_like(mean_out)
        fast = _array_ext(latent_shape)
      if tuple(mean.shape) != latent_shape:
        raise UserError(f"{where(k)}: latent shape {tuple(mean.shape)}, expected {latent_shape}")
      mean_out[k] = mean
      std_out[k] = std
    if image_out is not None:
      if IMAGE_KEY not in rec:
        raise UserError(f"{where(k)}: the record holds no image (the dataset's metadata says "
                        "its records do)")
      if _is_ext(rec[IMAGE_KEY], image_ext):
        image_out[k] = np.frombuffer(rec[IMAGE_KEY].data, np.uint8,
                                     offset=len(image_ext[1])).reshape(image_shape)
      else:
        full = full if full is not None else serialization.msgpack_restore(data)
        image = np.asarray(full[IMAGE_KEY])
        if image.dtype != np.uint8 or image.shape != image_shape:
          raise UserError(f"{where(k)}: image {image.dtype} {tuple(image.shape)}, expected uint8 "
                          f"{image_shape}")
        image_out[k] = image
    try:
      labels[k], indices[k] = int(rec["label"]), int(rec["index"])
    except (TypeError, ValueError, OverflowError) as e:
      raise UserError(f"{where(k)}: label {rec['label']!r} / index {rec['index']!r} are not "
                      "integers") from e
  out = {"mean": mean_out, "std": std_out, "label": labels, "index": indices}
  if image_out is not None:
    out[IMAGE_KEY] = image_out
  return out


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
    latent_scale: float = LATENT_SCALE,
    vae_downsampling: int = DOWNSAMPLING,
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Writes a latent dataset in this schema; returns the metadata written.

  ``examples`` yields ``(mean, std, label)`` with mean/std float32 (h, w, c) NHWC,
  or ``(mean, std, label, image)`` with the uint8 (H, W, 3) image too (all
  examples alike; ``image_shape`` is then recorded), in the order that defines
  each record's ``index`` (0, 1, ...). Example ``i``
  goes to shard ``i * num_shards // num_examples`` (contiguous, near-equal
  shards). Records are written with ``group_size:1`` (grain's random access) and
  ``metadata.json`` is written last, through a temporary file and a rename, so a
  directory with ``metadata.json`` is complete. Errors (wrong count, mismatched
  shapes, labels out of range) raise ``UserError``; existing shards of the same
  names are overwritten.
  """
  directory = os.fspath(directory)
  if num_examples <= 0 or not 1 <= num_shards <= num_examples:
    raise UserError(f"need num_examples > 0 and 1 <= num_shards <= num_examples, "
                    f"got {num_examples} examples, {num_shards} shards")
  os.makedirs(directory, exist_ok=True)
  names = [shard_name(split, s, num_shards) for s in range(num_shards)]
  latent_shape = image_shape = None
  writer, current, count = None, -1, 0
  try:
    for i, example in enumerate(examples):
      if i >= num_examples:
        raise UserError(f"{directory}: more than num_examples={num_examples} examples given")
      mean, std, label = example[:3]
      image = example[3] if len(example) > 3 else None
      mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
      if latent_shape is None:
        latent_shape = tuple(int(d) for d in mean.shape)
        image_shape = None if image is None else tuple(int(d) for d in np.shape(image))
      if mean.shape != latent_shape or std.shape != latent_shape:
        raise UserError(f"example {i}: mean {mean.shape} / std {std.shape}, expected {latent_shape}")
      if (None if image is None else tuple(np.shape(image))) != image_shape:
        raise UserError(f"example {i}: image {None if image is None else np.shape(image)}, "
                        f"expected {image_shape} (all examples with an image, or none)")
      if not 0 <= int(label) < num_classes:
        raise UserError(f"example {i}: label {label} not in [0, {num_classes})")
      shard = i * num_shards // num_examples
      if shard != current:
        if writer is not None:
          writer.close()
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(directory, names[shard]), "group_size:1")
        current = shard
      try:
        writer.write(encode_record(mean, std, int(label), i, image))
      except ValueError as e:
        raise UserError(f"example {i}: {e}") from e
      count += 1
  finally:
    if writer is not None:
      writer.close()
  if count != num_examples:
    raise UserError(f"{directory}: got {count} examples, num_examples={num_examples}")
  return write_metadata(directory, num_examples=num_examples, shards=names,
                        latent_shape=latent_shape, num_classes=num_classes,
                        resolution=resolution, vae=vae, latent_scale=latent_scale,
                        vae_downsampling=vae_downsampling, image_shape=image_shape,
                        extra=extra_metadata)


def write_metadata(directory, *, num_examples: int, shards, latent_shape, num_classes: int,
                   resolution: int = 0, vae: str = "",
                   latent_scale: float = LATENT_SCALE,
                   vae_downsampling: int = DOWNSAMPLING,
                   image_shape=None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes ``metadata.json`` (last, through a temporary file and a rename); returns it.

  ``scaling_factor`` and ``vae_downsampling`` are the encoding VAE's (defaults:
  the SD-VAE's 0.18215 and 8); readers train and decode with them.
  ``image_shape`` ([H, W, 3]) is recorded when the records hold images.
  """

  metadata = {
      "schema": SCHEMA, "num_examples": int(num_examples), "shards": list(shards),
      "latent_shape": [int(d) for d in latent_shape], "num_classes": int(num_classes),
      "resolution": int(resolution), "vae": str(vae), "scaling_factor": float(latent_scale),
      "vae_downsampling": int(vae_downsampling),
  }
  if image_shape is not None:
    metadata["image_shape"] = [int(d) for d in image_shape]
  metadata.update(extra or {})
  path = os.path.join(os.fspath(directory), METADATA_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(metadata, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return metadata
