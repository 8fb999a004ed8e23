"""grain input pipelines: per-process batches of numpy arrays, resumable by state.

The keys of ``config.data`` are this module's keys (:func:`default_config` lists
them with their defaults); :func:`make_source` and :func:`make_train_iterator`
take that ``ConfigDict`` (or a plain dict with a subset of the keys) directly.

Sources (``data.name``)
-----------------------
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
  ``{"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}`` (optionally
  also ``"scaling_factor"`` and ``"vae_downsampling"``, see below). As in the
  reference, the folder is walked, the ``.npy`` file names (relative, "/"
  separated) are sorted, and that sorted order is the example order; labels are
  looked up by name. Every file needs a label and every labelled name a file
  (otherwise a ``UserError`` names ``dataset.json`` and an example). ``"labels":
  null`` is an error by default (the model is class-conditional); with
  ``missing_labels="zero"`` every example gets label 0. Files are decoded as
  ``np.load(allow_pickle=False)`` does (never unpickling), CHW -> HWC. Keys:
  ``num_classes`` (default: max label + 1), ``latent_shape`` ([h, w, c]; default:
  from the first file), ``missing_labels``.
``"arrayrecord"``
  The project's ArrayRecord schema (:mod:`deepflow_jax.data.records`): ``path``
  holds ``metadata.json`` and the shards it lists, read through
  ``grain.sources.ArrayRecordDataSource``. Keys: ``num_classes`` (default: the
  metadata's), ``latent_shape`` (checked against the metadata's).

Latent sources yield ``{"mean": float32 (B, h, w, c), "std": float32 (B, h, w, c),
"label": int32 (B,)}`` (NHWC); the train step draws ``z = (mean + std * eps) *
info.latent_scale`` itself: nothing is sampled here. ``include_index=True`` adds
``"index": int32 (B,)``, each example's position in the source order.

Raw images (SSL alignment)
--------------------------
``make_source(config, images=True)`` (what training with ``model.ssl_align``
asks for; not a ``config.data`` key: the model decides) adds ``"image": uint8
(B, H, W, 3)`` NHWC, the centre crop the latents were encoded from
(``info.image_shape = (H, W, 3)``, ``H = W = info.resolution``). Without it no
image is read or decoded.

* ``repa``: the reference's layout, ``images/`` beside ``vae-sd/``. As the
  reference's loader does, every file under ``images/`` with an image extension
  PIL knows (``.png``, ``.jpg``, ...) or ``.npy`` (uint8 CHW) is listed, the
  relative names are sorted, and image ``k`` of that order belongs to latent
  file ``k`` of the sorted ``vae-sd/`` order (``images/dataset.json`` is not
  read). Different counts are a ``UserError``. Images are decoded per batch
  (PIL, which releases the GIL while decoding, so the reading threads overlap)
  straight into the stacked array; each must be RGB of the first image's
  shape, and that shape must be ``(resolution, resolution, 3)``.
* ``arrayrecord``: the records' optional ``image`` field
  (:mod:`deepflow_jax.data.records`), present when ``metadata.json`` records
  ``image_shape``; copied from the record's bytes.

Latent scale and VAE downsampling
---------------------------------
:class:`DatasetInfo` carries ``latent_scale`` (what the VAE's latents are
multiplied by; training multiplies by it, decoding divides by it) and
``vae_downsampling`` (image side / latent side). Both come from the dataset
where it records them (ArrayRecord ``metadata.json``: ``scaling_factor``,
``vae_downsampling`` or else ``resolution / h``; REPA ``dataset.json``: the
optional ``scaling_factor`` / ``vae_downsampling``), otherwise from
``data.latent_scale`` / ``data.vae_downsampling``, otherwise the SD-VAE's 0.18215
and 8. A config value that contradicts the dataset's record is a ``UserError``.
Pixel sources (digits) have 1.0 and 1.

Order, sharding, batching
-------------------------
The example order is grain's ``MapDataset.range(N).shuffle(seed).repeat(num_epochs)``
(:class:`BatchIndices` computes it batch by batch): a global permutation of all
examples, reshuffled every epoch (grain mixes the epoch into the seed);
process ``p`` of ``P`` takes, from every global batch of ``G``
stream positions, its contiguous block of ``B = G / P`` (positions
``[b G + p B, b G + (p + 1) B)`` for batch ``b``). Consequences:
within one epoch the processes' examples are disjoint and together cover the
dataset (up to ``N mod P`` examples at epoch boundaries when ``P`` does not
divide ``N``), and global batch ``b`` (the union over processes of their batch
``b``) is stream positions ``[b * G, (b + 1) * G)`` for global batch size ``G``,
in that order once the processes' rows are stacked in process order (what
``jax.make_array_from_process_local_data`` does): the same global batch, row
for row, whatever the process count.

Reading is per batch: batch ``b`` is first its ``B`` source indices, then ONE
call ``source.read_batch(indices)`` that reads, decodes, checks (one finiteness
check per batch) and stacks them (REPA: whole files read and, when their
``.npy`` header is byte-identical to the first file's, decoded without parsing
it again, then one CHW -> HWC transpose per batch; ArrayRecord: one batched
read of the records, each decoded straight into the stacked arrays). Batches
are read ahead by ``num_threads`` threads (``prefetch_batches`` in flight),
optionally inside ``num_workers`` worker processes (grain's ``mp_prefetch``:
worker ``i`` reads batches ``i, i + W, ...`` and the batches are interleaved
back in order). The batch stream is therefore the same, batch for batch and
row for row, whatever ``num_threads`` and ``num_workers`` are; only the speed
changes.

Parallelism defaults (:func:`default_parallelism`): a pure function of the
source kind and the number of cores this process may use
(``os.sched_getaffinity``): in-memory digits read in the caller's thread;
file sources use reading threads and, on hosts with many cores, worker
processes (see the function for the rule and the measurements behind it).

Iterator state
--------------
:func:`make_train_iterator` returns a :class:`BatchIterator` (a grain
``DatasetIterator``, so ``grain.checkpoint.CheckpointSave/CheckpointRestore``
work with Orbax). ``get_state()`` is ``{"next_index": n}``, ``n`` the number of
this process's *examples* consumed so far (batches x per-process batch size): a
plain JSON-serialisable dict, the same whatever the threads and workers (a run
may resume on a host with another core count). ``set_state`` on a fresh
iterator built with the same config, seed and process index/count resumes at
the exact next batch. All processes step in lockstep, so their states are
identical: saving process 0's state (e.g. an Orbax ``JsonSave``) and restoring
it in every process is exact.

Config keys
-----------
See :func:`default_config`. Unknown keys are a ``UserError`` (to catch typos).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import math
import os
import sys
from typing import Any, Mapping, NamedTuple

import grain
import ml_collections
import numpy as np
from absl import flags
from array_record.python import array_record_module
from ml_collections import config_dict
from PIL import Image

from deepflow_jax import npy_io
from deepflow_jax.data import digits as digits_lib
from deepflow_jax.data import records
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line

DIGITS, REPA, ARRAYRECORD = "digits", "repa", "arrayrecord"
SOURCES = (DIGITS, REPA, ARRAYRECORD)
FILE_SOURCES = (REPA, ARRAYRECORD)
REPA_FEATURE_DIR = "vae-sd"
REPA_IMAGE_DIR = "images"
REPA_LABEL_FILE = "dataset.json"


def default_config() -> ml_collections.ConfigDict:
  """Every data key with its default: the ``config.data`` block of the training config.

  ``None`` defaults are typed ``ml_collections`` placeholders, so command-line
  overrides (``--config.data.num_workers=4``) type-check.
  """
  c = ml_collections.ConfigDict()
  c.name = config_dict.placeholder(str)  # "digits" | "repa" | "arrayrecord" (required)
  c.path = ""  # dataset root (repa, arrayrecord)
  # digits only
  c.image_size = digits_lib.NATIVE_SIZE  # side length (8 = native; larger is resized)
  c.split = "train"  # "train" | "heldout"
  c.heldout_fraction = digits_lib.DEFAULT_HELDOUT_FRACTION
  c.split_seed = digits_lib.DEFAULT_SPLIT_SEED
  # latent sources
  c.num_classes = config_dict.placeholder(int)  # None: the dataset's (metadata / max label + 1)
  c.latent_shape = config_dict.placeholder(tuple)  # (h, w, c); None: the dataset's
  c.missing_labels = "error"  # repa with "labels": null: "error" | "zero" (label 0 for all)
  c.latent_scale = config_dict.placeholder(float)  # None: the dataset's record, else 0.18215
  c.vae_downsampling = config_dict.placeholder(int)  # None: the dataset's record, else 8
  # order and reading
  c.shuffle = True
  c.num_epochs = config_dict.placeholder(int)  # None: repeat forever
  c.include_index = False  # add "index": each example's position in the source order
  c.num_workers = config_dict.placeholder(int)  # worker processes; None: default_parallelism
  c.num_threads = config_dict.placeholder(int)  # reading threads per process/worker; None: same
  c.prefetch_batches = config_dict.placeholder(int)  # batches read ahead; None: 2 x readers
  return c


_DEFAULTS = default_config().to_dict()
KNOWN_KEYS = tuple(_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model, the train step and the sample decoding need to know about a dataset.

  Attributes:
    name: the source kind, one of ``SOURCES``.
    is_latent: True for VAE-latent sources (batches hold ``mean``/``std``),
      False for pixel sources (batches hold ``image``).
    shape: one example's (h, w, c), NHWC without the batch axis.
    channels: ``shape[-1]``.
    num_classes: number of class labels (labels lie in [0, num_classes)).
    num_examples: examples in the whole source (all processes).
    resolution: pixel side length (latents: of the images the VAE encoded).
    latent_scale: the model sees ``latents * latent_scale`` (training draws
      ``z = (mean + std * eps) * latent_scale``; decoding divides by it). 1.0
      for pixel sources.
    vae_downsampling: image side / latent side (``resolution = h *
      vae_downsampling``); 1 for pixel sources.
    image_shape: (H, W, 3) of the raw images the batches carry as ``"image"``
      (sources built with ``images=True``); None when they carry none.
  """
  name: str
  is_latent: bool
  shape: tuple[int, int, int]
  channels: int
  num_classes: int
  num_examples: int
  resolution: int
  latent_scale: float = 1.0
  vae_downsampling: int = 1
  image_shape: tuple[int, int, int] | None = None


# ----------------------------------------------------------------------------
# Config handling.


def _config_dict(data_config) -> dict[str, Any]:
  if data_config is None:
    raise UserError("no data config given")
  if hasattr(data_config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
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
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or (
      int(v) != v or int(v) < lo):
    raise UserError(f"data.{key} must be an integer >= {lo}, got {v!r}")
  return int(v)


def _scale_option(cfg) -> float | None:
  v = cfg["latent_scale"]
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
    raise UserError(f"data.latent_scale must be a positive number, got {v!r}")
  return float(v)


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


def _vae_fields(recorded_scale, recorded_downsampling, config_scale, config_downsampling,
                where: str) -> tuple[float, int]:
  """(latent_scale, vae_downsampling): the dataset's record, else the config, else the SD-VAE."""
  out = []
  for recorded, configured, key, rec_key, default in (
      (recorded_scale, config_scale, "latent_scale", "scaling_factor",
       records.SD_VAE_SCALING_FACTOR),
      (recorded_downsampling, config_downsampling, "vae_downsampling", "vae_downsampling",
       records.SD_VAE_DOWNSAMPLING)):
    if recorded is not None and configured is not None and not math.isclose(
        recorded, configured, rel_tol=1e-6):
      raise UserError(f"data.{key}={configured} but {where} records {rec_key}={recorded} (the "
                      f"VAE that encoded the data); leave data.{key} unset")
    out.append(recorded if recorded is not None else
               configured if configured is not None else default)
  return float(out[0]), int(out[1])


def _recorded_number(meta: Mapping, key: str, where: str, kind) -> Any:
  v = meta.get(key)
  if v is None:
    return None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf or (
      kind is int and int(v) != v):
    raise UserError(f"{where}: {key}={v!r} is not a positive {kind.__name__}")
  return kind(v)


# ----------------------------------------------------------------------------
# Parallelism defaults.


class Parallelism(NamedTuple):
  """How a process reads: worker processes, threads per reader, batches in flight."""
  num_workers: int
  num_threads: int
  prefetch_batches: int


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # macOS, Windows
    return max(1, os.cpu_count() or 1)


def default_parallelism(name: str, num_cores: int, *, num_workers: int | None = None,
                        num_threads: int | None = None,
                        prefetch_batches: int | None = None) -> Parallelism:
  """The reading parallelism for source kind ``name`` on a host with ``num_cores`` cores.

  A pure function; explicit values win, each independently:

  * ``digits`` (in memory; a batch is one fancy-indexing copy): no workers, no
    threads; the batch is built in ``next()``.
  * file sources (``repa``, ``arrayrecord``): ``num_threads = 2`` reading
    threads, so that reading overlaps the training step and one thread's file
    I/O and C++ decompression (which release the GIL) overlaps the other's
    Python. Worker processes only on hosts with at least 8 cores:
    ``num_workers = min(num_cores // 8, 4)``, each with its 2 threads, which
    takes the reading's Python (and its GIL) out of the process that drives
    the accelerators. On fewer cores, a worker costs more than it gains: it
    starts in ~2 s (a spawned process importing grain and JAX) and copying
    each batch back to the training process about doubles the CPU time per
    example (measured on 2 cores, ``docs/benchmarks.md``); one core reads
    latents several times faster than one accelerator trains on them.
  * ``prefetch_batches = 2 x`` the readers (threads, times workers when there
    are workers) when anything reads ahead, else 0.

  The batch stream does not depend on any of these (see the module docstring).
  """
  if name not in SOURCES:
    raise UserError(f"data.name must be one of {list(SOURCES)}, got {name!r}")
  num_cores = max(1, int(num_cores))
  if name == DIGITS:
    auto_workers, auto_threads = 0, 0
  else:
    auto_workers = min(num_cores // 8, 4)
    auto_threads = 2
  workers = auto_workers if num_workers is None else int(num_workers)
  threads = auto_threads if num_threads is None else int(num_threads)
  if prefetch_batches is None:
    prefetch_batches = 2 * max(threads, 1) * max(workers, 1) if (threads or workers) else 0
  return Parallelism(workers, threads, int(prefetch_batches))


# ----------------------------------------------------------------------------
# Sources: ``len(src)``, ``src.read_batch(indices) -> dict of stacked arrays``
# and ``src[i]`` (one example: ``read_batch([i])`` without the batch axis).


def _unbatch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v[0] for k, v in batch.items()}


def _index_array(indices) -> np.ndarray:
  return np.asarray(indices, np.int64).reshape(-1)


class DigitsSource:
  """In-memory digits split; ``src[i] -> {"image": (H, W, 1) float32, "label": int32}``."""

  def __init__(self, image_size: int = 8, split: str = "train", *,
               heldout_fraction: float = digits_lib.DEFAULT_HELDOUT_FRACTION,
               split_seed: int = digits_lib.DEFAULT_SPLIT_SEED, include_index: bool = False,
               images: bool = False):
    if images:
      raise UserError("data.name='digits' is pixel data with no latents and raw images beside "
                      "them; SSL alignment (model.ssl_align) needs a 'repa' or 'arrayrecord' "
                      "latent dataset with images")
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

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """``{"image": float32 (n, H, W, 1), "label": int32 (n,)[, "index": int32 (n,)]}``."""
    idx = _index_array(indices)
    out = {"image": self.images[idx], "label": self.labels[idx].astype(np.int32)}
    if self.include_index:
      out["index"] = idx.astype(np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return _unbatch(self.read_batch([int(index)]))


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


def _check_labels(labels: np.ndarray, num_classes: int, where) -> np.ndarray:
  """int32 labels; the first out of [0, num_classes) raises, named by ``where(k)``."""
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    k = int(np.argmax(bad))
    raise UserError(f"{where(k)}: label {int(labels[k])} not in [0, {num_classes})")
  return labels.astype(np.int32)


def _first_non_finite(*arrays: np.ndarray) -> int | None:
  """Row of the first example with a non-finite value in any of ``arrays`` (n, ...), or None."""
  if all(np.isfinite(a).all() for a in arrays):  # the common case: one pass per array
    return None
  bad = np.zeros(len(arrays[0]), bool)
  for a in arrays:
    bad |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
  return int(np.argmax(bad))


class _NpyLayout(NamedTuple):
  """A ``.npy`` file's header bytes and data dtype: files starting with the same bytes
  and of the same size hold an array of the same shape, dtype and memory order."""
  header: bytes
  dtype: np.dtype
  size: int


@functools.lru_cache(maxsize=1)
def _repa_image_extensions() -> frozenset[str]:
  """What the reference's loader lists in ``images/``: PIL's image extensions and ``.npy``."""
  Image.init()
  return frozenset(Image.EXTENSION) | {".npy"}


class RepaLatentSource:
  """The REPA ``vae-sd`` layout (see the module docstring); one example per ``.npy``.

  With ``images=True`` also the ``images/`` folder beside it, paired by sorted
  position (see the module docstring).
  """

  def __init__(self, path, *, num_classes: int | None = None,
               latent_shape: tuple[int, int, int] | None = None,
               missing_labels: str = "error", include_index: bool = False,
               latent_scale: float | None = None, vae_downsampling: int | None = None,
               images: bool = False):
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
    meta = _read_json(label_file, "the REPA layout needs it for the labels")
    labels = [_check_label(l, None, f"{label_file} entry {name!r}")
              for l, name in zip(self._read_labels(meta, label_file, missing_labels), self.files)]
    if num_classes is None:
      num_classes = int(max(labels)) + 1
    self.labels = np.asarray(
        [_check_label(l, num_classes, f"{label_file} entry {name!r}")
         for l, name in zip(labels, self.files)], np.int32)
    self.num_classes = int(num_classes)
    first_bytes = self._read_bytes(0)
    first = self._decode(0, first_bytes)
    if first.ndim != 3 or first.shape[0] % 2:
      raise UserError(f"{self._path(0)} (example 0): shape {first.shape}, expected (2c, h, w) "
                      "with channels 0..c-1 the mean and c..2c-1 the std")
    if latent_shape is None:
      c2, h, w = first.shape
      latent_shape = (h, w, c2 // 2)
    self.latent_shape = tuple(int(d) for d in latent_shape)
    self._layout = self._fast_layout(first_bytes)
    h, w, c = self.latent_shape
    scale, down = _vae_fields(
        _recorded_number(meta, "scaling_factor", label_file, float),
        _recorded_number(meta, "vae_downsampling", label_file, int),
        latent_scale, vae_downsampling, label_file)
    self.image_dir, self.image_files, self.image_shape = None, None, None
    if images:
      self._open_images(h * down, f"the latents' {h} x {w} times the VAE downsampling {down}")
    self.info = DatasetInfo(REPA, True, self.latent_shape, c, self.num_classes,
                            len(self.files), h * down, scale, down, self.image_shape)

  def _open_images(self, resolution: int, why: str) -> None:
    """Lists ``images/`` beside the latents (sorted, as the reference) and checks the first."""
    image_dir = os.path.join(os.path.dirname(os.path.abspath(self.root)), REPA_IMAGE_DIR)
    if not os.path.isdir(image_dir):
      raise UserError(f"{image_dir}: no such folder; SSL alignment (model.ssl_align) reads the "
                      f"raw images from {REPA_IMAGE_DIR}/ beside {self.root} (python -m "
                      "deepflow_jax.preprocess --format=repa --save_images writes them)")
    exts = _repa_image_extensions()
    names = []
    for dirpath, _, filenames in os.walk(image_dir):
      rel = os.path.relpath(dirpath, image_dir)
      for f in filenames:
        if os.path.splitext(f)[1].lower() in exts:
          names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
    names.sort()
    if len(names) != len(self.files):
      raise UserError(f"{image_dir}: {len(names)} image files but {self.root} holds "
                      f"{len(self.files)} latent files; the REPA layout pairs them by sorted "
                      "position, so the counts must match")
    self.image_dir, self.image_files = image_dir, names
    first = self._decode_image(0, self._read_image_bytes(0))
    want = (resolution, resolution, 3)
    if first.shape != want:
      raise UserError(f"{self._image_path(0)} (example 0): image of shape {first.shape}, "
                      f"expected {want} ({why})")
    self.image_shape = want

  def _image_path(self, i: int) -> str:
    return os.path.join(self.image_dir, self.image_files[i])

  def _read_image_bytes(self, i: int) -> bytes:
    return npy_io.read_bytes(self._image_path(i), f"example {i}", "image")

  def _decode_image(self, i: int, data: bytes) -> np.ndarray:
    """Image ``i`` as uint8 (H, W, 3): PIL for image files (RGB only), ``.npy`` as CHW uint8."""
    path = self._image_path(i)
    try:
      if path.lower().endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        arr = arr.reshape(-1, *arr.shape[-2:]).transpose(1, 2, 0)  # the reference's CHW view
      else:
        with Image.open(io.BytesIO(data)) as img:
          if img.mode != "RGB":
            raise UserError(f"{path} (example {i}): image mode {img.mode}, expected RGB")
          arr = np.asarray(img)
    except UserError:
      raise
    except Exception as e:  # truncated or garbage files: PIL and numpy raise several types
      raise UserError(f"{path} (example {i}): unreadable image "
                      f"({type(e).__name__}: {first_line(e)})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
      raise UserError(f"{path} (example {i}): image {arr.dtype} {arr.shape}, expected uint8 "
                      "(H, W, 3)")
    return arr

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

  def _read_labels(self, meta, label_file: str, missing_labels: str) -> list:
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

  def _fast_layout(self, data: bytes) -> _NpyLayout | None:
    """The header of a (2c, h, w) C-order float ``.npy`` like ``data``; None if it is not one."""
    try:
      fp = io.BytesIO(data)
      shape, fortran, dtype = npy_io.read_header(fp)
    except ValueError:
      return None
    h, w, c = self.latent_shape
    offset = fp.tell()
    if (fortran or dtype.kind != "f" or tuple(shape) != (2 * c, h, w)
        or len(data) != offset + dtype.itemsize * 2 * c * h * w):
      return None
    return _NpyLayout(bytes(data[:offset]), dtype, len(data))

  def _path(self, i: int) -> str:
    return os.path.join(self.root, self.files[i])

  def _read_bytes(self, i: int) -> bytes:
    return npy_io.read_bytes(self._path(i), f"example {i}", ".npy")

  def _decode(self, i: int, data: bytes) -> np.ndarray:
    """The general ``.npy`` decoder (``np.load(allow_pickle=False)``), with the checks."""
    path = self._path(i)
    try:
      arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # truncated, garbage, pickled object arrays
      raise UserError(f"{path} (example {i}): unreadable .npy ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
      raise UserError(f"{path} (example {i}): expected a float array, got "
                      f"{getattr(arr, 'dtype', type(arr).__name__)}")
    return arr

  def __len__(self) -> int:
    return len(self.files)

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """Reads examples ``indices`` (n,): ``{"mean", "std": float32 (n, h, w, c),
    "label": int32 (n,)[, "image": uint8 (n, H, W, 3)][, "index": int32 (n,)]}``.

    Each file is read whole; one whose first bytes are the first file's header
    (and of the same size) is decoded with ``np.frombuffer`` (same array as
    ``np.load``: same shape, dtype and order), any other goes through
    ``np.load`` and its checks. Raises ``UserError`` naming the file and the
    example index for an unreadable, non-float, mis-shaped or non-finite one.
    """
    idx = _index_array(indices)
    h, w, c = self.latent_shape
    chw = np.empty((len(idx), 2 * c, h, w), np.float32)
    layout = self._layout
    for k, i in enumerate(idx.tolist()):
      data = self._read_bytes(i)
      if layout is not None and len(data) == layout.size and data.startswith(layout.header):
        chw[k] = np.frombuffer(data, layout.dtype, offset=len(layout.header)).reshape(2 * c, h, w)
        continue
      arr = self._decode(i, data)
      if arr.shape != (2 * c, h, w):
        raise UserError(f"{self._path(i)} (example {i}): shape {arr.shape}, expected "
                        f"{(2 * c, h, w)}")
      chw[k] = arr
    bad = _first_non_finite(chw)
    if bad is not None:
      raise UserError(f"{self._path(int(idx[bad]))} (example {int(idx[bad])}): non-finite values")
    # CHW -> HWC for the whole batch, one channel plane at a time: a contiguous read
    # and a stride-c write per plane (about twice as fast as numpy's copy of a
    # transposed view, whose inner loop runs over only c elements).
    mean = np.empty((len(idx), h, w, c), np.float32)
    std = np.empty_like(mean)
    for j in range(c):
      mean[..., j] = chw[:, j]
      std[..., j] = chw[:, c + j]
    out = {"mean": mean, "std": std, "label": self.labels[idx]}
    if self.image_files is not None:
      images = np.empty((len(idx),) + self.image_shape, np.uint8)
      for k, i in enumerate(idx.tolist()):
        arr = self._decode_image(i, self._read_image_bytes(i))
        if arr.shape != self.image_shape:
          raise UserError(f"{self._image_path(i)} (example {i}): image of shape {arr.shape}, "
                          f"expected {self.image_shape}")
        images[k] = arr
      out["image"] = images
    if self.include_index:
      out["index"] = idx.astype(np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return _unbatch(self.read_batch([int(index)]))


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
    meta = _read_json(meta_file, "not a deepflow-jax ArrayRecord dataset")
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
    self._source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])
    self._starts = [0]
    for n in counts:
      self._starts.append(self._starts[-1] + n)
    self.latent_shape = meta_shape
    self.num_classes = int(num_classes if num_classes is not None else meta_classes)
    self.include_index = include_index
    h, w, c = meta_shape
    recorded_down = _recorded_number(meta, "vae_downsampling", meta_file, int)
    if recorded_down is None and resolution > 0 and resolution % h == 0:
      recorded_down = resolution // h  # written before vae_downsampling was recorded
    scale, down = _vae_fields(_recorded_number(meta, "scaling_factor", meta_file, float),
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
      return self._source[i]
    except Exception as e:  # corrupt chunk: RuntimeError from the reader
      raise UserError(f"{self.where(i)}: unreadable ({type(e).__name__}: {e})") from e

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """Reads examples ``indices`` (n,) with one batched read: ``{"mean", "std": float32
    (n, h, w, c), "label": int32 (n,)[, "image": uint8 (n, H, W, 3)][, "index": int32 (n,)]}``.

    Raises ``UserError`` naming the shard, the record's position in it and the
    example index for an unreadable, undecodable, mis-shaped, mislabelled or
    non-finite record.
    """
    idx = _index_array(indices).tolist()
    try:
      datas = self._source.__getitems__(idx)
    except Exception:  # pylint: disable=broad-except
      datas = [self._read_one(i) for i in idx]  # find the unreadable record and name it
    where = lambda k: self.where(idx[k])
    rec = records.decode_records(datas, where=where, latent_shape=self.latent_shape,
                                 image_shape=self.image_shape)
    bad = _first_non_finite(rec["mean"], rec["std"])
    if bad is not None:
      raise UserError(f"{where(bad)}: non-finite values")
    out = {"mean": rec["mean"], "std": rec["std"],
           "label": _check_labels(rec["label"], self.num_classes, where)}
    if self.image_shape is not None:
      out["image"] = rec["image"]
    if self.include_index:
      out["index"] = np.asarray(idx, np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return _unbatch(self.read_batch([int(index)]))


def make_source(data_config, *, images: bool = False):
  """Builds the source named by ``data_config`` (``config.data`` or a dict); has ``.info``.

  ``images=True`` makes its batches carry the raw images too (``"image"``, see
  the module docstring); training asks for them when ``model.ssl_align`` is set.
  """
  cfg = _config_dict(data_config)
  name = cfg["name"]
  if name == DIGITS:
    return DigitsSource(cfg["image_size"], cfg["split"], heldout_fraction=cfg["heldout_fraction"],
                        split_seed=cfg["split_seed"], include_index=bool(cfg["include_index"]),
                        images=images)
  kwargs = dict(num_classes=_int_option(cfg, "num_classes", lo=1),
                latent_shape=_latent_shape_option(cfg), include_index=bool(cfg["include_index"]),
                latent_scale=_scale_option(cfg),
                vae_downsampling=_int_option(cfg, "vae_downsampling", lo=1), images=bool(images))
  if name == REPA:
    return RepaLatentSource(cfg["path"], missing_labels=cfg["missing_labels"], **kwargs)
  return ArrayRecordLatentSource(cfg["path"], **kwargs)


def dataset_info(data_config, *, images: bool = False) -> DatasetInfo:
  """Shape, channels, classes, size, kind, latent scale and VAE downsampling of the dataset.

  Cheap for digits and ArrayRecord (metadata only); for the REPA layout it walks
  the folder, reads ``dataset.json`` and the first file (with ``images``, also
  lists ``images/`` and decodes the first image).
  """
  return make_source(data_config, images=images).info


# ----------------------------------------------------------------------------
# Pipeline.


def _check_sharding(global_batch_size, process_index, process_count) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"bad process_index {process_index} / process_count {process_count}")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"global batch size {global_batch_size} is not a positive multiple of the "
                    f"process count {process_count}")
  return global_batch_size // process_count


class BatchIndices(grain.MapDataset):
  """Element ``b``: int64 (B,), the source indices of process ``p``'s batch ``b``.

  Stream position ``q`` (of ``num_epochs * N``, or endless) holds source index
  ``index_shuffle(q mod N, max_index=N - 1, seed=(seed + q // N) mod 2**32,
  rounds=4)`` (``q mod N`` without shuffling): exactly the order of grain's
  ``MapDataset.range(N).shuffle(seed).repeat(num_epochs)``, computed with
  grain's public ``index_shuffle`` directly, without a dataset call per example.
  Process ``p`` of ``P`` reads positions ``[bG + pB, bG + (p + 1)B)``, ``G = PB``;
  a final partial global batch is dropped.
  """

  def __init__(self, num_examples: int, batch_size: int, *, process_index: int = 0,
               process_count: int = 1, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None):
    super().__init__()
    self._n, self._b, self._p = int(num_examples), int(batch_size), int(process_index)
    self._g = self._b * int(process_count)
    self._seed, self._shuffle = int(seed), bool(shuffle)
    total = None if num_epochs is None else self._n * int(num_epochs)
    self._len = sys.maxsize // self._g if total is None else total // self._g

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = int(index) * self._g + self._p * self._b
    n = self._n
    if not self._shuffle:
      return np.arange(start, start + self._b, dtype=np.int64) % n
    out = np.empty((self._b,), np.int64)
    for r, q in enumerate(range(start, start + self._b)):
      epoch, i = divmod(q, n)
      out[r] = grain.experimental.index_shuffle(i, n - 1, (self._seed + epoch) % 2**32, 4)
    return out

  def __str__(self) -> str:
    return f"BatchIndices(batch={self._b}, process={self._p}, global_batch={self._g})"


def build_dataset(source, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                  seed: int = 0, num_epochs: int | None = None,
                  shuffle: bool = True) -> grain.MapDataset:
  """The grain ``MapDataset`` of this process's batches over any batch-reading source.

  Element ``b`` is ``source.read_batch(indices of batch b)`` (read when
  accessed; the indices are :class:`BatchIndices`). Iterate with
  :class:`BatchIterator`.

  Args:
    source: object with ``__len__`` and ``read_batch(int64 (n,)) -> dict of
      stacked numpy arrays``.
    batch_size: per-process batch size (rows of each batch).
    process_index / process_count: this process's share: its contiguous block
      of ``batch_size`` rows of every global batch of
      ``batch_size * process_count`` stream positions.
    seed: shuffle seed, an integer in [0, 2**32); each epoch is reshuffled.
    num_epochs: None repeats forever; otherwise the stream ends after that many
      epochs (the last partial global batch is dropped).
    shuffle: False keeps the source order (still sharded and batched).
  """
  if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < 2**32:
    raise UserError(f"data seed must be an integer in [0, 2**32), got {seed!r}")
  if len(source) == 0:
    raise UserError("the dataset is empty")
  indices = BatchIndices(len(source), batch_size, process_index=process_index,
                         process_count=process_count, seed=int(seed), shuffle=shuffle,
                         num_epochs=num_epochs)
  if num_epochs is not None and len(indices) == 0:
    raise UserError(f"{num_epochs} epoch(s) of {len(source)} examples give this process fewer "
                    f"than one batch of {batch_size}")
  return indices.map(source.read_batch)


class BatchIterator(grain.DatasetIterator):
  """Iterates a :func:`build_dataset` result with threads / worker processes.

  The state is ``{"next_index": examples consumed}`` (batches x ``batch_size``),
  whatever the parallelism; ``set_state`` restarts reading at that batch.
  Reading (threads, workers) starts at the first ``next()`` or
  ``start_prefetch()``. ``close()`` stops worker processes.
  """

  def __init__(self, batches: grain.MapDataset, *, batch_size: int, parallelism: Parallelism):
    super().__init__()
    self._batches = batches
    self._batch_size = int(batch_size)
    self._par = parallelism
    self._start = 0  # batches skipped by set_state
    self._taken = 0  # batches returned since
    self._it = None

  def _inner(self):
    if self._it is None:
      w, t, p = self._par
      ds = self._batches[self._start:] if self._start else self._batches
      if w:
        per_worker = max(1, -(-p // w))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=t, prefetch_buffer_size=per_worker if t else 0))
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
          flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=w, per_worker_buffer_size=per_worker))
      else:
        it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=t, prefetch_buffer_size=p if t else 0))
      self._it = iter(it_ds)
    return self._it

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._inner())
    self._taken += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_index": (self._start + self._taken) * self._batch_size}

  def set_state(self, state: Mapping[str, Any]) -> None:
    n = state.get("next_index") if isinstance(state, Mapping) else None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or (
        n % self._batch_size):
      raise UserError(f"data iterator state {state!r}: expected {{'next_index': a multiple of "
                      f"the per-process batch size {self._batch_size}}} (was the checkpoint "
                      "written with another batch size or process count?)")
    n = int(n)
    if n // self._batch_size > len(self._batches):
      raise UserError(f"data iterator state {state!r}: beyond the end of the data "
                      f"({len(self._batches)} batches)")
    self._close_inner()
    self._start, self._taken = n // self._batch_size, 0

  def start_prefetch(self) -> None:
    it = self._inner()
    if hasattr(it, "start_prefetch"):
      it.start_prefetch()

  def _close_inner(self) -> None:
    if self._it is not None:
      if hasattr(self._it, "close"):
        self._it.close()
      self._it = None

  def close(self) -> None:
    self._close_inner()
    super().close()

  def __str__(self) -> str:
    return f"BatchIterator(batch={self._batch_size}, {self._par})"


def make_train_iterator(data_config, *, global_batch_size: int, process_index: int,
                        process_count: int, seed: int, source=None,
                        images: bool = False) -> BatchIterator:
  """Resumable iterator of this process's batches (``global_batch_size // process_count`` rows).

  ``data_config`` is ``config.data`` (or a dict of its keys). Returns a
  :class:`BatchIterator`: ``next(it)`` gives a dict of numpy arrays (keys per
  the module docstring); ``it.get_state()`` is ``{"next_index": examples
  consumed}`` and ``it.set_state(state)`` on an iterator built with the same
  arguments resumes at the exact next batch. Call ``it.close()`` when done
  (stops worker processes, if any). ``source`` is the
  ``make_source(data_config)`` result when the caller already built it (for
  ``.info``); otherwise it is built here (with ``images``: batches also carry
  the raw images). Threads and workers follow
  :func:`default_parallelism` unless ``num_threads`` / ``num_workers`` /
  ``prefetch_batches`` are set.
  Raises ``UserError`` for bad configs, a global batch not divisible by
  ``process_count``, and (when read) unreadable or mis-shaped examples, naming
  the file and index.
  """
  local = _check_sharding(global_batch_size, process_index, process_count)
  cfg = _config_dict(data_config)
  if source is None:  # callers that already built it for .info pass it (no second folder walk)
    source = make_source(cfg, images=images)
  parallelism = default_parallelism(
      cfg["name"], available_cores(), num_workers=_int_option(cfg, "num_workers"),
      num_threads=_int_option(cfg, "num_threads"),
      prefetch_batches=_int_option(cfg, "prefetch_batches"))
  batches = build_dataset(
      source, batch_size=local, process_index=process_index, process_count=process_count,
      seed=seed, num_epochs=_int_option(cfg, "num_epochs", lo=1), shuffle=bool(cfg["shuffle"]))
  return BatchIterator(batches, batch_size=local, parallelism=parallelism)
