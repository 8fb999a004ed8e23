"""The project's ArrayRecord latent schema as a data source (``data.name = "arrayrecord"``).

``path`` holds ``metadata.json`` and the shards it lists
(:mod:`deepflow_jax.data.records`), read through
``grain.sources.ArrayRecordDataSource``: one batched read of the records per
batch, each decoded straight into the stacked arrays. Keys: ``num_classes``
(default: the metadata's), ``latent_shape`` (checked against the metadata's).
With ``images=True`` also the records' ``image`` field (present when
``metadata.json`` records ``image_shape``), copied from the record's bytes.
"""
from __future__ import annotations

import bisect
import os

import grain
import numpy as np
from array_record.python import array_record_module

from deepflow_jax.data import records
from deepflow_jax.data.common import ARRAYRECORD
from deepflow_jax.data.common import DatasetInfo
from deepflow_jax.data.common import check_labels
from deepflow_jax.data.common import first_non_finite
from deepflow_jax.data.common import index_array
from deepflow_jax.data.common import read_json
from deepflow_jax.data.common import recorded_number
from deepflow_jax.data.common import unbatch
from deepflow_jax.data.common import vae_fields
from deepflow_jax.errors import UserError


class ArrayRecordLatentSource:
  """The project's ArrayRecord latent schema, via ``grain.sources.ArrayRecordDataSource``.

  With ``images=True`` also the records' ``image`` field (the dataset's
  ``metadata.json`` must record ``image_shape``).
  """

  def __init__(self, path, *, num_classes: int | None = None,
               latent_shape: tuple[int, int, int] | None = None, include_index: bool = False,
               latent_scale: float | None = None, vae_downsampling: int | None = None,
               images: bool = False):
    path = os.fspath(path)
    meta_file = os.path.join(path, records.METADATA_FILE)
    meta = read_json(meta_file, "not a deepflow-jax ArrayRecord dataset")
    if not isinstance(meta, dict) or meta.get("schema") != records.SCHEMA:
      got = meta.get("schema") if isinstance(meta, dict) else None
      raise UserError(f"{meta_file}: schema {got!r}, expected {records.SCHEMA!r}")
    try:
      shards = [str(s) for s in meta["shards"]]
      num_examples = int(meta["num_examples"])
      meta_shape = tuple(int(d) for d in meta["latent_shape"])
      meta_classes = int(meta["num_classes"])
      resolution = int(meta.get("resolution") or 0)
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f"{meta_file}: missing or bad field ({type(e).__name__}: {e})") from e
    if not shards or len(meta_shape) != 3:
      raise UserError(f"{meta_file}: needs a non-empty 'shards' list and a 3-d 'latent_shape'")
    if latent_shape is not None and tuple(latent_shape) != meta_shape:
      raise UserError(f"{meta_file}: latent_shape {list(meta_shape)}, but data.latent_shape is "
                      f"{list(latent_shape)}")
    self.paths = [os.path.join(path, s) for s in shards]
    counts = []
    for p in self.paths:
      if not os.path.isfile(p):
        raise UserError(f"{p}: shard listed in {meta_file} is missing")
      try:
        reader = array_record_module.ArrayRecordReader(p)
        counts.append(int(reader.num_records()))
        reader.close()
      except Exception as e:  # the C++ reader raises RuntimeError/ValueError
        raise UserError(f"{p}: unreadable ArrayRecord shard ({type(e).__name__}: {e})") from e
    if sum(counts) != num_examples:
      raise UserError(f"{meta_file}: num_examples {num_examples}, but the shards hold {sum(counts)}")
    # "path[start:end]" read instructions: grain does not reopen files to count.
    self.records = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])
    self._starts = [0]
    for n in counts:
      self._starts.append(self._starts[-1] + n)
    self.latent_shape = meta_shape
    self.num_classes = int(num_classes if num_classes is not None else meta_classes)
    self.include_index = include_index
    h, w, c = meta_shape
    recorded_down = recorded_number(meta, "vae_downsampling", meta_file, int)
    if recorded_down is None and resolution > 0 and resolution % h == 0:
      recorded_down = resolution // h  # written before vae_downsampling was recorded
    scale, down = vae_fields(recorded_number(meta, "scaling_factor", meta_file, float),
                              recorded_down, latent_scale, vae_downsampling, meta_file)
    self.image_shape = None
    if images:
      recorded = meta.get("image_shape")
      if recorded is None:
        raise UserError(f"{meta_file}: the records hold no images (no 'image_shape'); SSL "
                        "alignment (model.ssl_align) needs them: python -m deepflow_jax.preprocess "
                        "--save_images stores each crop in its record")
      try:
        shape = tuple(int(d) for d in recorded)
      except (TypeError, ValueError):
        shape = ()
      if len(shape) != 3 or shape[2] != 3 or min(shape) <= 0:
        raise UserError(f"{meta_file}: image_shape {recorded!r} is not [H, W, 3]")
      if shape[:2] != (resolution or h * down,) * 2:
        raise UserError(f"{meta_file}: image_shape {list(shape)} does not match the latents' "
                        f"resolution {resolution or h * down}")
      self.image_shape = shape
    self.info = DatasetInfo(ARRAYRECORD, True, meta_shape, c, self.num_classes, num_examples,
                            resolution or h * down, scale, down, self.image_shape)

  def __len__(self) -> int:
    return self._starts[-1]

  def where(self, index: int) -> str:
    """``"<shard> record <position> (example <index>)"`` for error messages."""
    s = bisect.bisect_right(self._starts, index) - 1
    return f"{self.paths[s]} record {index - self._starts[s]} (example {index})"

  def _read_one(self, i: int) -> bytes:
    try:
      return self.records[i]
    except Exception as e:  # corrupt chunk: RuntimeError from the reader
      raise UserError(f"{self.where(i)}: unreadable ({type(e).__name__}: {e})") from e

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """Reads examples ``indices`` (n,) with one batched read: ``{"mean", "std": float32
    (n, h, w, c), "label": int32 (n,)[, "image": uint8 (n, H, W, 3)][, "index": int32 (n,)]}``.

    Raises ``UserError`` naming the shard, the record's position in it and the
    example index for an unreadable, undecodable, mis-shaped, mislabelled or
    non-finite record.
    """
    idx = index_array(indices).tolist()
    try:
      datas = self.records.__getitems__(idx)
    except Exception:  # pylint: disable=broad-except
      datas = [self._read_one(i) for i in idx]  # find the unreadable record and name it
    where = lambda k: self.where(idx[k])
    rec = records.decode_records(datas, where=where, latent_shape=self.latent_shape,
                                 image_shape=self.image_shape)
    bad = first_non_finite(rec["mean"], rec["std"])
    if bad is not None:
      raise UserError(f"{where(bad)}: non-finite values")
    out = {"mean": rec["mean"], "std": rec["std"],
           "label": check_labels(rec["label"], self.num_classes, where)}
    if self.image_shape is not None:
      out["image"] = rec["image"]
    if self.include_index:
      out["index"] = np.asarray(idx, np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return unbatch(self.read_batch([int(index)]))
