"""grain input pipelines: per-process batches of numpy arrays, resumable by state.

Sources (``data_config.name``)
------------------------------
``"digits"``
  scikit-learn's 8x8 digits (:mod:`deepflow_jax.data.digits`), pixel space.
  Batch: ``{"image": float32 (B, H, W, 1) in [-1, 1], "label": int32 (B,)}``.
  Keys: ``image_size`` (default 8), ``split`` ("train" (default) or "heldout"),
  ``heldout_fraction`` (0.2), ``split_seed`` (0).
``"repa"``
  The REPA/reference latent layout: ``path`` is the dataset root holding
  ``vae-sd/`` (or the ``vae-sd`` folder itself) with
  ``00000/img-mean-std-00000000.npy`` files, float32 (2c, h, w) = (8, 32, 32)
  (channels 0..c-1 the posterior mean, c..2c-1 its std), and ``dataset.json``
  ``{"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}``. As in the
  reference, the folder is walked, the ``.npy`` file names (relative, "/"
  separated) are sorted, and that sorted order is the example order; labels are
  looked up by name. Every file needs a label and every labelled name a file
  (otherwise a ``UserError`` names ``dataset.json`` and an example). ``"labels":
  null`` is an error by default (the model is class-conditional); with
  ``missing_labels="zero"`` every example gets label 0. Files are read with
  ``np.load(allow_pickle=False)`` and transposed CHW -> HWC. Keys:
  ``num_classes`` (default: max label + 1), ``latent_shape`` ([h, w, c]; default:
  from the first file), ``missing_labels``.
``"arrayrecord"``
  The project's ArrayRecord schema (:mod:`deepflow_jax.data.records`): ``path``
  holds ``metadata.json`` and the shards it lists, read through
  ``grain.sources.ArrayRecordDataSource``.

Latent sources yield ``{"mean": float32 (B, h, w, c), "std": float32 (B, h, w, c),
"label": int32 (B,)}`` (NHWC); the train step draws ``z = (mean + std * eps) *
0.18215`` itself: nothing is sampled here. ``include_index=True`` adds
``"index": int32 (B,)``, each example's position in the source order.

Order, sharding, batching
-------------------------
``MapDataset.source(src).shuffle(seed).repeat(num_epochs)``: a global
permutation of all examples, reshuffled every epoch (grain mixes the epoch into
the seed), then process ``p`` of ``P`` takes, from every global batch of ``G``
stream positions, its contiguous block of ``B = G / P`` (positions
``[b G + p B, b G + (p + 1) B)`` for batch ``b``) and reads only those
examples. Consequences:
within one epoch the processes' examples are disjoint and together cover the
dataset (up to ``N mod P`` examples at epoch boundaries when ``P`` does not
divide ``N``), and global batch ``b`` (the union over processes of their batch
``b``) is stream positions ``[b * G, (b + 1) * G)`` for global batch size ``G``,
in that order once the processes' rows are stacked in process order (what
``jax.make_array_from_process_local_data`` does): the same global batch, row
for row, whatever the process count. Elements are read by ``num_threads`` threads
(``to_iter_dataset(ReadOptions(...))``, ``prefetch_buffer_size`` elements ahead),
then batched with ``drop_remainder=True``. ``num_workers > 0`` adds grain's
``mp_prefetch`` (worker processes, each batching a slice of the stream; the batch
order then depends on ``num_workers``).

Iterator state
--------------
:func:`make_train_iterator` returns grain's own ``DatasetIterator`` (so
``grain.checkpoint.CheckpointSave/CheckpointRestore`` work with Orbax). With
``num_workers == 0`` (default), ``get_state()`` is ``{"next_index": n}``, ``n`` the
number of this process's *examples* consumed so far (batches x per-process batch
size): a plain JSON-serialisable dict. ``set_state`` on a fresh iterator built
with the same config, seed and process index/count resumes at the exact next
batch. All processes step in lockstep, so their states are identical: saving
process 0's state (e.g. an Orbax ``JsonSave``) and restoring it in every
process is exact. With ``num_workers > 0`` the state is grain's multiprocess state (a nested
dict of ints and lists, also JSON-serialisable), not interchangeable with the
former.

Config keys
-----------
``name``, ``path``, ``image_size``, ``split``, ``heldout_fraction``,
``split_seed``, ``num_classes``, ``latent_shape``, ``missing_labels``,
``num_threads`` (default 0 for digits, 8 for latents), ``prefetch_buffer_size``
(elements; default 2 x per-process batch, at least 16), ``num_workers`` (0),
``num_epochs`` (None: repeat forever), ``shuffle`` (True), ``include_index``
(False). Unknown keys are a ``UserError`` (to catch typos).
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import os
from typing import Any, Mapping

import grain
import numpy as np

from deepflow_jax.data import digits as digits_lib
from deepflow_jax.data import records
from deepflow_jax.errors import UserError

DIGITS, REPA, ARRAYRECORD = "digits", "repa", "arrayrecord"
SOURCES = (DIGITS, REPA, ARRAYRECORD)
REPA_FEATURE_DIR = "vae-sd"
REPA_LABEL_FILE = "dataset.json"
VAE_DOWNSAMPLING = 8  # SD VAE: latent side = image side / 8

_DEFAULTS = {
    "name": None, "path": None, "image_size": digits_lib.NATIVE_SIZE, "split": "train",
    "heldout_fraction": digits_lib.DEFAULT_HELDOUT_FRACTION,
    "split_seed": digits_lib.DEFAULT_SPLIT_SEED, "num_classes": None, "latent_shape": None,
    "missing_labels": "error", "num_threads": None, "prefetch_buffer_size": None,
    "num_workers": 0, "num_epochs": None, "shuffle": True, "include_index": False,
}
KNOWN_KEYS = tuple(_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model needs to know about a dataset.

  Attributes:
    name: the source kind, one of ``SOURCES``.
    is_latent: True for VAE-latent sources (batches hold ``mean``/``std``),
      False for pixel sources (batches hold ``image``).
    shape: one example's (h, w, c), NHWC without the batch axis.
    channels: ``shape[-1]``.
    num_classes: number of class labels (labels lie in [0, num_classes)).
    num_examples: examples in the whole source (all processes).
    resolution: pixel side length (latents: of the images the VAE encoded).
  """
  name: str
  is_latent: bool
  shape: tuple[int, int, int]
  channels: int
  num_classes: int
  num_examples: int
  resolution: int


# ----------------------------------------------------------------------------
# Config handling.


def _config_dict(data_config) -> dict[str, Any]:
  if data_config is None:
    raise UserError("no data config given")
  if hasattr(data_config, "to_dict"):  # ml_collections.ConfigDict
    data_config = data_config.to_dict()
  if not isinstance(data_config, Mapping):
    raise UserError(f"data config must be a dict or ConfigDict, got {type(data_config).__name__}")
  unknown = sorted(set(data_config) - set(_DEFAULTS))
  if unknown:
    raise UserError(f"unknown data config key(s) {unknown}; known: {list(KNOWN_KEYS)}")
  cfg = dict(_DEFAULTS)
  cfg.update({k: v for k, v in data_config.items() if v is not None})
  if cfg["name"] not in SOURCES:
    raise UserError(f"data.name must be one of {list(SOURCES)}, got {cfg['name']!r}")
  if cfg["name"] != DIGITS and not cfg["path"]:
    raise UserError(f"data.path is required for data.name={cfg['name']!r}")
  return cfg


def _int_option(cfg, key, lo=0) -> int | None:
  v = cfg[key]
  if v is None:
    return None
  if isinstance(v, bool) or int(v) != v or int(v) < lo:
    raise UserError(f"data.{key} must be an integer >= {lo}, got {v!r}")
  return int(v)


def _latent_shape_option(cfg) -> tuple[int, int, int] | None:
  v = cfg["latent_shape"]
  if v is None:
    return None
  try:
    shape = tuple(int(d) for d in v)
  except (TypeError, ValueError):
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise UserError(f"data.latent_shape must be [h, w, c] positive integers, got {v!r}")
  return shape


# ----------------------------------------------------------------------------
# Sources: random access (``__len__`` / ``__getitem__``) returning one example.


class DigitsSource:
  """In-memory digits split; ``src[i] -> {"image": (H, W, 1) float32, "label": int32}``."""

  def __init__(self, image_size: int = 8, split: str = "train", *,
               heldout_fraction: float = digits_lib.DEFAULT_HELDOUT_FRACTION,
               split_seed: int = digits_lib.DEFAULT_SPLIT_SEED, include_index: bool = False):
    if split not in ("train", "heldout"):
      raise UserError(f"digits split must be 'train' or 'heldout', got {split!r}")
    train, heldout = digits_lib.load_digits_split(
        image_size, heldout_fraction=heldout_fraction, seed=split_seed)
    self.images, self.labels = train if split == "train" else heldout
    self.include_index = include_index
    h, w, c = self.images.shape[1:]
    self.info = DatasetInfo(DIGITS, False, (h, w, c), c, digits_lib.NUM_CLASSES,
                            len(self.labels), h)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    i = int(index)
    out = {"image": self.images[i], "label": np.int32(self.labels[i])}
    if self.include_index:
      out["index"] = np.int32(i)
    return out


def _read_json(path: str, why_needed: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: missing ({why_needed})") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def _check_label(label, num_classes: int | None, where: str) -> np.int32:
  if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
    raise UserError(f"{where}: label {label!r} is not an integer")
  if label < 0 or (num_classes is not None and label >= num_classes):
    raise UserError(f"{where}: label {label} not in [0, {num_classes})")
  return np.int32(label)


class RepaLatentSource:
  """The REPA ``vae-sd`` layout (see the module docstring); one example per ``.npy``."""

  def __init__(self, path, *, num_classes: int | None = None,
               latent_shape: tuple[int, int, int] | None = None,
               missing_labels: str = "error", include_index: bool = False):
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, REPA_FEATURE_DIR, REPA_LABEL_FILE)) or (
        os.path.isdir(os.path.join(path, REPA_FEATURE_DIR))):
      path = os.path.join(path, REPA_FEATURE_DIR)
    if not os.path.isdir(path):
      raise UserError(f"{path}: not a directory (expected a REPA dataset root with {REPA_FEATURE_DIR}/)")
    if missing_labels not in ("error", "zero"):
      raise UserError(f"data.missing_labels must be 'error' or 'zero', got {missing_labels!r}")
    self.root = path
    self.include_index = include_index
    label_file = os.path.join(path, REPA_LABEL_FILE)
    self.files = self._walk(path)
    if not self.files:
      raise UserError(f"{path}: no .npy files found")
    labels = [_check_label(l, None, f"{label_file} entry {name!r}")
              for l, name in zip(self._read_labels(label_file, missing_labels), self.files)]
    if num_classes is None:
      num_classes = int(max(labels)) + 1
    self.labels = np.asarray(
        [_check_label(l, num_classes, f"{label_file} entry {name!r}")
         for l, name in zip(labels, self.files)], np.int32)
    self.num_classes = int(num_classes)
    if latent_shape is None:
      latent_shape = self._shape_of_first()
    self.latent_shape = tuple(int(d) for d in latent_shape)
    h, w, c = self.latent_shape
    self.info = DatasetInfo(REPA, True, self.latent_shape, c, self.num_classes,
                            len(self.files), h * VAE_DOWNSAMPLING)

  @staticmethod
  def _walk(root: str) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      rel = os.path.relpath(dirpath, root)
      for f in filenames:
        if f.endswith(".npy"):
          names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
    return sorted(names)

  def _read_labels(self, label_file: str, missing_labels: str) -> list:
    meta = _read_json(label_file, "the REPA layout needs it for the labels")
    if not isinstance(meta, dict) or "labels" not in meta:
      raise UserError(f"{label_file}: no 'labels' key")
    entries = meta["labels"]
    if entries is None:
      if missing_labels == "zero":
        return [0] * len(self.files)
      raise UserError(f"{label_file}: 'labels' is null; class-conditional training needs labels "
                      "(set data.missing_labels='zero' to use label 0 for all)")
    if not isinstance(entries, list) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) for e in entries):
      raise UserError(f"{label_file}: 'labels' must be a list of [file name, label] pairs")
    table = {name.replace("\\", "/"): label for name, label in entries}
    missing = [f for f in self.files if f not in table]
    if missing:
      raise UserError(f"{label_file}: no label for {len(missing)} of {len(self.files)} .npy files "
                      f"(first: {missing[0]!r}); it does not match the files in {self.root}")
    on_disk = set(self.files)
    extra = [n for n in table if n not in on_disk]
    if extra:
      raise UserError(f"{label_file}: lists {len(extra)} file(s) not present in {self.root} "
                      f"(first: {extra[0]!r})")
    return [table[f] for f in self.files]

  def _shape_of_first(self) -> tuple[int, int, int]:
    arr = self._load(0)
    if arr.ndim != 3 or arr.shape[0] % 2:
      raise UserError(f"{self._path(0)} (example 0): shape {arr.shape}, expected (2c, h, w) "
                      "with channels 0..c-1 the mean and c..2c-1 the std")
    c2, h, w = arr.shape
    return (h, w, c2 // 2)

  def _path(self, i: int) -> str:
    return os.path.join(self.root, self.files[i])

  def _load(self, i: int) -> np.ndarray:
    path = self._path(i)
    try:
      arr = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, garbage, pickled object arrays, I/O errors
      raise UserError(f"{path} (example {i}): unreadable .npy ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
      raise UserError(f"{path} (example {i}): expected a float array, got "
                      f"{getattr(arr, 'dtype', type(arr).__name__)}")
    return arr

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    i = int(index)
    arr = self._load(i)
    h, w, c = self.latent_shape
    if arr.shape != (2 * c, h, w):
      raise UserError(f"{self._path(i)} (example {i}): shape {arr.shape}, expected {(2 * c, h, w)}")
    arr = np.asarray(arr, np.float32)
    if not np.isfinite(arr).all():
      raise UserError(f"{self._path(i)} (example {i}): non-finite values")
    out = {"mean": np.ascontiguousarray(arr[:c].transpose(1, 2, 0)),
           "std": np.ascontiguousarray(arr[c:].transpose(1, 2, 0)),
           "label": self.labels[i]}
    if self.include_index:
      out["index"] = np.int32(i)
    return out


class ArrayRecordLatentSource:
  """The project's ArrayRecord latent schema, via ``grain.sources.ArrayRecordDataSource``."""

  def __init__(self, path, *, num_classes: int | None = None,
               latent_shape: tuple[int, int, int] | None = None, include_index: bool = False):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    path = os.fspath(path)
    meta_file = os.path.join(path, records.METADATA_FILE)
    meta = _read_json(meta_file, "not a deepflow-jax ArrayRecord dataset")
    if not isinstance(meta, dict) or meta.get("schema") != records.SCHEMA:
      got = meta.get("schema") if isinstance(meta, dict) else None
      raise UserError(f"{meta_file}: schema {got!r}, expected {records.SCHEMA!r}")
    try:
      shards = [str(s) for s in meta["shards"]]
      num_examples = int(meta["num_examples"])
      meta_shape = tuple(int(d) for d in meta["latent_shape"])
      meta_classes = int(meta["num_classes"])
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
    self._source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])
    self._starts = [0]
    for n in counts:
      self._starts.append(self._starts[-1] + n)
    self.latent_shape = meta_shape
    self.num_classes = int(num_classes if num_classes is not None else meta_classes)
    self.include_index = include_index
    h, w, c = meta_shape
    resolution = int(meta.get("resolution") or h * VAE_DOWNSAMPLING)
    self.info = DatasetInfo(ARRAYRECORD, True, meta_shape, c, self.num_classes, num_examples,
                            resolution)

  def __len__(self) -> int:
    return self._starts[-1]

  def where(self, index: int) -> str:
    """``"<shard> record <position> (example <index>)"`` for error messages."""
    s = bisect.bisect_right(self._starts, index) - 1
    return f"{self.paths[s]} record {index - self._starts[s]} (example {index})"

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    i = int(index)
    try:
      data = self._source[i]
    except Exception as e:  # corrupt chunk: RuntimeError from the reader
      raise UserError(f"{self.where(i)}: unreadable ({type(e).__name__}: {e})") from e
    rec = records.decode_record(data, where=self.where(i), latent_shape=self.latent_shape)
    if not (np.isfinite(rec["mean"]).all() and np.isfinite(rec["std"]).all()):
      raise UserError(f"{self.where(i)}: non-finite values")
    out = {"mean": rec["mean"], "std": rec["std"],
           "label": _check_label(rec["label"], self.num_classes, self.where(i))}
    if self.include_index:
      out["index"] = np.int32(i)
    return out


def make_source(data_config):
  """Builds the random-access source named by ``data_config`` (has ``.info``)."""
  cfg = _config_dict(data_config)
  name = cfg["name"]
  if name == DIGITS:
    return DigitsSource(cfg["image_size"], cfg["split"], heldout_fraction=cfg["heldout_fraction"],
                        split_seed=cfg["split_seed"], include_index=bool(cfg["include_index"]))
  kwargs = dict(num_classes=_int_option(cfg, "num_classes", lo=1),
                latent_shape=_latent_shape_option(cfg), include_index=bool(cfg["include_index"]))
  if name == REPA:
    return RepaLatentSource(cfg["path"], missing_labels=cfg["missing_labels"], **kwargs)
  return ArrayRecordLatentSource(cfg["path"], **kwargs)


def dataset_info(data_config) -> DatasetInfo:
  """Shape, channels, classes, size and kind of the configured dataset.

  Cheap for digits and ArrayRecord (metadata only); for the REPA layout it walks
  the folder, reads ``dataset.json`` and the first file.
  """
  return make_source(data_config).info


# ----------------------------------------------------------------------------
# Pipeline.


def _check_sharding(global_batch_size, process_index, process_count) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"bad process_index {process_index} / process_count {process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} is not a positive multiple of the "
                    f"process count {process_count}")
  return global_batch_size // process_count


class ProcessBlocks(grain.MapDataset):
  """Process ``p``'s block of every global batch: positions ``[bG + pB, bG + (p+1)B)``."""

  def __init__(self, parent, batch_size: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._b, self._p = int(batch_size), int(process_index)
    self._g = self._b * int(process_count)
    self._len = (len(parent) // self._g) * self._b

  def __len__(self) -> int:
    return self._len

  def _parent_index(self, index: int) -> int:
    epoch, index = divmod(int(index), self._len)
    batch, row = divmod(index, self._b)
    return epoch * (self._len // self._b) * self._g + batch * self._g + self._p * self._b + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("ProcessBlocks does not support slicing")
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f"ProcessBlocks(batch={self._b}, process={self._p}, global_batch={self._g})"


def build_dataset(source, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
                  num_threads: int = 0, prefetch_buffer_size: int | None = None,
                  num_workers: int = 0):
  """The grain ``IterDataset`` of per-process batches over any random-access source.

  Args:
    source: object with ``__len__`` and ``__getitem__(i) -> dict of numpy``.
    batch_size: per-process batch size (rows of each batch).
    process_index / process_count: this process's share: its contiguous block
      of ``batch_size`` rows of every global batch of
      ``batch_size * process_count`` stream positions.
    seed: shuffle seed, an integer in [0, 2**32); each epoch is reshuffled.
    num_epochs: None repeats forever; otherwise the stream ends after that many
      epochs (the last partial batch is dropped).
    shuffle: False keeps the source order (still sharded and batched).
    num_threads / prefetch_buffer_size: grain ``ReadOptions`` (threads reading
      elements, elements buffered ahead).
    num_workers: > 0 adds ``mp_prefetch`` with that many worker processes.
  """

  if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**32:
    raise UserError(f"data seed must be an integer in [0, 2**32), got {seed!r}")
  if len(source) == 0:
    raise UserError("the dataset is empty")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(num_epochs)
  if process_count > 1:
    ds = ProcessBlocks(ds, batch_size, process_index, process_count)
  if num_epochs is not None and len(ds) < batch_size:
    raise UserError(f"{num_epochs} epoch(s) give this process {len(ds)} examples, fewer than one "
                    f"batch of {batch_size}")
  if prefetch_buffer_size is None:
    prefetch_buffer_size = max(2 * batch_size, 16)
  read = grain.ReadOptions(num_threads=int(num_threads),
                           prefetch_buffer_size=int(prefetch_buffer_size))
  it_ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
  if num_workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
  return it_ds


def make_train_iterator(data_config, *, global_batch_size: int, process_index: int,
                        process_count: int, seed: int, source=None):
  """Resumable iterator of this process's batches (``global_batch_size // process_count`` rows).

  Returns grain's ``DatasetIterator``: ``next(it)`` gives a dict of numpy arrays
  (keys per the module docstring); ``it.get_state()`` is a JSON-serialisable dict
  (``{"next_index": examples consumed}`` without worker processes) and
  ``it.set_state(state)`` on an iterator built with the same arguments resumes at
  the exact next batch. Call ``it.close()`` when using ``num_workers > 0``.
  ``source`` is the ``make_source(data_config)`` result when the caller already
  built it (for ``.info``); otherwise it is built here.
  Raises ``UserError`` for bad configs, a global batch not divisible by
  ``process_count``, and (when read) unreadable or mis-shaped examples, naming
  the file and index.
  """
  local = _check_sharding(global_batch_size, process_index, process_count)
  cfg = _config_dict(data_config)
  if source is None:  # callers that already built it for .info pass it (no second folder walk)
    source = make_source(cfg)
  num_threads = _int_option(cfg, "num_threads")
  if num_threads is None:
    num_threads = 0 if cfg["name"] == DIGITS else 8  # digits live in memory: no GIL contention
  return iter(build_dataset(
      source, batch_size=local, process_index=process_index, process_count=process_count,
      seed=seed, num_epochs=_int_option(cfg, "num_epochs", lo=1), shuffle=bool(cfg["shuffle"]),
      num_threads=num_threads, prefetch_buffer_size=_int_option(cfg, "prefetch_buffer_size"),
      num_workers=_int_option(cfg, "num_workers") or 0))
