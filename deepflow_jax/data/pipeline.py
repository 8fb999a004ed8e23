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

import os
import sys
from typing import Any, Mapping, NamedTuple

import grain
import numpy as np
from absl import flags

from deepflow_jax.data.arrayrecord import ArrayRecordLatentSource
from deepflow_jax.data.common import DIGITS
from deepflow_jax.data.common import REPA
from deepflow_jax.data.common import SOURCES
from deepflow_jax.data.common import DatasetInfo
from deepflow_jax.data.config import int_option
from deepflow_jax.data.config import latent_shape_option
from deepflow_jax.data.config import resolve
from deepflow_jax.data.config import scale_option
from deepflow_jax.data.digits import DigitsSource
from deepflow_jax.data.repa import RepaLatentSource
from deepflow_jax.errors import UserError


def make_source(data_config, *, images: bool = False):
  """Builds the source named by ``data_config`` (``config.data`` or a dict); has ``.info``.

  ``images=True`` makes its batches carry the raw images too (``"image"``, see
  the module docstring); training asks for them when ``model.ssl_align`` is set.
  """
  cfg = resolve(data_config)
  name = cfg["name"]
  if name == DIGITS:
    return DigitsSource(cfg["image_size"], cfg["split"], heldout_fraction=cfg["heldout_fraction"],
                        split_seed=cfg["split_seed"], include_index=bool(cfg["include_index"]),
                        images=images)
  kwargs = dict(num_classes=int_option(cfg, "num_classes", lo=1),
                latent_shape=latent_shape_option(cfg), include_index=bool(cfg["include_index"]),
                latent_scale=scale_option(cfg),
                vae_downsampling=int_option(cfg, "vae_downsampling", lo=1), images=bool(images))
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

  The state is ``{"global_index": the next global stream position}`` (global
  batches consumed x the global batch size), whatever the parallelism and the
  process count: a run resumed with another number of processes (a TPU slice of
  another size) continues at the same global batch, so no example of the epoch
  is skipped or repeated; each process then takes its new share of that batch.
  ``set_state`` restarts reading at that batch. Reading (threads, workers)
  starts at the first ``next()`` or ``start_prefetch()``. ``close()`` stops
  worker processes.
  """

  def __init__(self, batches: grain.MapDataset, *, batch_size: int, parallelism: Parallelism,
               global_batch_size: int | None = None):
    super().__init__()
    self._batches = batches
    self._batch_size = int(batch_size)
    self._global = int(global_batch_size or batch_size)
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
    return {"global_index": (self._start + self._taken) * self._global}

  def set_state(self, state: Mapping[str, Any]) -> None:
    n = state.get("global_index") if isinstance(state, Mapping) else None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or (n % self._global):
      raise UserError(f"data iterator state {state!r}: expected {{'global_index': a multiple of "
                      f"the global batch size {self._global}}} (was the checkpoint written with "
                      "another global batch size, or by an earlier version?)")
    n = int(n)
    if n // self._global > len(self._batches):
      raise UserError(f"data iterator state {state!r}: beyond the end of the data "
                      f"({len(self._batches)} batches)")
    self._close_inner()
    self._start, self._taken = n // self._global, 0

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
  the module docstring); ``it.get_state()`` is ``{"global_index": the next
  global stream position}`` and ``it.set_state(state)`` on an iterator built
  with the same global batch size and seed, for any process count, resumes at
  the exact next global batch. Call ``it.close()`` when done
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
  cfg = resolve(data_config)
  if source is None:  # callers that already built it for .info pass it (no second folder walk)
    source = make_source(cfg, images=images)
  parallelism = default_parallelism(
      cfg["name"], available_cores(), num_workers=int_option(cfg, "num_workers"),
      num_threads=int_option(cfg, "num_threads"),
      prefetch_batches=int_option(cfg, "prefetch_batches"))
  batches = build_dataset(
      source, batch_size=local, process_index=process_index, process_count=process_count,
      seed=seed, num_epochs=int_option(cfg, "num_epochs", lo=1), shuffle=bool(cfg["shuffle"]))
  return BatchIterator(batches, batch_size=local, parallelism=parallelism,
                       global_batch_size=global_batch_size)
