"""The ADM evaluation suite, streaming and sharded: FID, sFID, Inception Score, precision, recall.

A feature network (the FID Inception, :mod:`deepflow_jax.evaluation.inception`,
or any Flax module with the same outputs) runs jitted and data-parallel over
every device of every host; its outputs are folded batch by batch into
accumulators on the host, so no image buffer of the whole set is ever held:

* :class:`RunningStatistics`: float64 running mean and centred sum of outer
  products (the sums of ``x`` and ``x x^T``, kept centred to avoid cancellation),
  plus ADM's float32 sum for the mean; ``statistics()`` gives ``(mu, sigma)``
  equal to :func:`~deepflow_jax.evaluation.metrics.activation_statistics` of
  all rows (``mu`` bit for bit, ``sigma`` to float64 rounding);
* :class:`RunningInceptionScore`: consumes class probabilities in sample order
  and closes one 5,000-sample split at a time (one split in memory);
* :class:`FeaturePool`: the float32 pool features precision/recall needs
  (50,000 x 2048 float32 = 410 MB, the largest host buffer of an evaluation).

:func:`run_feature_pass` feeds them from uint8 NHWC batches (an array, a
:class:`NpzArray` read in chunks, or any iterable of batches of any sizes):
rows are regrouped into fixed global batches (one compilation; the last batch
padded and its padding dropped), sharded over the ``"data"`` axis, parameters
replicated, and outputs gathered back to every process in sample order, so the
results do not depend on the device count or batch size. Every process must
pass the same images (each places only its own devices' rows).

:func:`evaluate_samples` is the one call that scores a sample set against
:class:`ReferenceStatistics` (from :func:`compute_reference_statistics`, or
:func:`load_reference` for an ADM reference batch ``.npz``, cached next to it)
and returns ``{"fid", "sfid", "inception_score", "precision", "recall",
"num_samples"}``, each number computed as the ADM evaluator does
(:mod:`deepflow_jax.evaluation.metrics`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import zipfile
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepflow_jax import npy_io
from deepflow_jax import outputs
from deepflow_jax.errors import UserError, first_line
from deepflow_jax.evaluation import inception as inception_lib
from deepflow_jax.evaluation import metrics
from deepflow_jax.progress import Progress, format_duration
from deepflow_jax.sharding import data_mesh
from deepflow_jax.sharding import host_array

IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
DEFAULT_PER_DEVICE_BATCH = 32
_CACHE_VERSION = 1

Log = Optional[Callable[[str], None]]


def _log_fn(log: Log) -> Callable[[str], None]:
  """``log`` on process 0, nothing elsewhere (every process runs the same loop)."""
  if log is None or jax.process_index() != 0:
    return lambda msg: None
  return log


def _print(msg: str) -> None:
  print(msg, flush=True)


# ---------------------------------------------------------------------------
# Accumulators.
# ---------------------------------------------------------------------------


def _check_rows(x, name: str, dim: int | None = None) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise UserError(f"{name}: expected a float (N, D) array, got {x.dtype} {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise UserError(f"{name}: expected {dim} features per row, got {x.shape[1]}")
  return x


class RunningStatistics:
  """Mean and covariance of activations that arrive in batches, merged across accumulators.

  Keeps the count, the float64 mean and the float64 centred sum of outer
  products ``M = sum (x - mean)(x - mean)^T`` (updated per batch with Chan et
  al.'s pairwise formula: the same information as sums of ``x`` and ``x x^T``
  without their cancellation), and the sum of rows in the activations' dtype,
  accumulated row after row as ``np.mean(acts, axis=0)`` does, so that ``mu``
  is ADM's float32 mean bit for bit. Host memory: two (D, D) float64 matrices'
  worth (34 MB at D = 2048).
  """

  def __init__(self):
    self.count = 0
    self._mean: Optional[np.ndarray] = None   # (D,) float64
    self._m2: Optional[np.ndarray] = None     # (D, D) float64
    self._sum: Optional[np.ndarray] = None    # (D,) in the activations' dtype

  @property
  def dim(self) -> Optional[int]:
    return None if self._mean is None else self._mean.shape[0]

  def update(self, acts) -> "RunningStatistics":
    """Adds (B, D) activation rows (float; B may be 0)."""
    acts = _check_rows(acts, "activations", self.dim)
    if not len(acts):
      return self
    x = acts.astype(np.float64)
    mean = x.mean(axis=0)
    c = x - mean
    # np.add.reduce over axis 0 adds row after row: carrying the running sum as the
    # first row reproduces np.mean(all_rows, axis=0)'s float32 accumulation exactly.
    carry = self._sum if self._sum is not None else np.zeros(acts.shape[1], acts.dtype)
    dtype = np.result_type(carry.dtype, acts.dtype)
    total = np.add.reduce(np.concatenate([carry[None].astype(dtype), acts.astype(dtype)]), axis=0)
    self._combine(len(x), mean, c.T @ c, total)
    return self

  def _combine(self, n: int, mean: np.ndarray, m2: np.ndarray, total: np.ndarray) -> None:
    """Chan et al.: M = M_a + M_b + delta delta^T n_a n_b / n (in place: one (D, D) temporary)."""
    if self.count == 0:
      self.count, self._mean, self._m2, self._sum = n, mean, m2.copy(), total
      return
    both = self.count + n
    delta = mean - self._mean
    self._m2 += m2
    self._m2 += np.multiply.outer(delta, delta * (self.count * n / both))
    self._mean = self._mean + delta * (n / both)
    self._sum = total
    self.count = both

  def merge(self, other: "RunningStatistics") -> "RunningStatistics":
    """Adds another accumulator's rows (as if they came after this one's)."""
    if other.count == 0:
      return self
    if self.count and other.dim != self.dim:
      raise UserError(f"RunningStatistics.merge: {self.dim} vs {other.dim} features")
    total = other._sum if self._sum is None else self._sum + other._sum.astype(self._sum.dtype)
    self._combine(other.count, other._mean, other._m2, total)
    return self

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,) in the activations' dtype, sigma (D, D) float64, ddof 1)``."""
    if self.count < 2:
      raise UserError(f"statistics: the covariance needs at least 2 images, got {self.count}")
    mu = np.true_divide(self._sum, self._sum.dtype.type(self.count))
    return mu, self._m2 / (self.count - 1)


class RunningInceptionScore:
  """ADM's Inception Score over probabilities that arrive in sample order.

  Rows are copied into one ``split_size`` buffer; each full split is scored and
  dropped (:func:`metrics.split_score`), a short last split is scored at the end
  and weighted like the others. Equal to :func:`metrics.inception_score` of all
  rows, bit for bit.
  """

  def __init__(self, split_size: int = metrics.IS_SPLIT_SIZE):
    if int(split_size) < 1:
      raise UserError(f"inception score: split_size must be >= 1, got {split_size}")
    self.split_size = int(split_size)
    self.count = 0
    self.scores: list[np.floating] = []
    self._buf: Optional[np.ndarray] = None
    self._fill = 0

  def update(self, probs) -> "RunningInceptionScore":
    probs = _check_rows(probs, "probabilities", None if self._buf is None else self._buf.shape[1])
    if self._buf is None:
      self._buf = np.empty((self.split_size, probs.shape[1]), probs.dtype)
    i = 0
    while i < len(probs):
      take = min(self.split_size - self._fill, len(probs) - i)
      self._buf[self._fill:self._fill + take] = probs[i:i + take]
      self._fill += take
      i += take
      if self._fill == self.split_size:
        self.scores.append(metrics.split_score(self._buf))
        self._fill = 0
    self.count += len(probs)
    return self

  def result(self) -> float:
    scores = list(self.scores)
    if self._fill:
      scores.append(metrics.split_score(self._buf[:self._fill]))
    return metrics.mean_split_scores(scores)


class FeaturePool:
  """The rows precision/recall needs, kept as float32 (preallocated when the count is known)."""

  def __init__(self, capacity: Optional[int] = None):
    self.capacity = capacity
    self.count = 0
    self._buf: Optional[np.ndarray] = None
    self._chunks: list[np.ndarray] = []

  def update(self, feats) -> "FeaturePool":
    feats = _check_rows(feats, "features")
    n = len(feats)
    if self.capacity is not None:
      if self._buf is None:
        self._buf = np.empty((self.capacity, feats.shape[1]), np.float32)
      if self.count + n > self.capacity:
        raise UserError(f"features: more than the announced {self.capacity} images")
      self._buf[self.count:self.count + n] = feats
    else:
      self._chunks.append(np.asarray(feats, np.float32))
    self.count += n
    return self

  def features(self) -> np.ndarray:
    """(N, D) float32."""
    if self._buf is not None:
      return self._buf[:self.count]
    if len(self._chunks) != 1:
      self._chunks = [np.concatenate(self._chunks)] if self._chunks else []
    if not self._chunks:
      raise UserError("features: no images")
    return self._chunks[0]


class FeatureAccumulator:
  """Everything the suite needs from one image set, folded in batch by batch.

  ``update`` takes the feature network's outputs for consecutive images:
  ``pool`` (B, 2048), ``spatial`` (B, 2023) and ``probs`` (B, 1008) (any
  widths). Which parts are kept is chosen at construction: FID/sFID
  statistics, the Inception Score, the pool features for precision/recall.
  """

  def __init__(self, *, statistics: bool = True, spatial: bool = True,
               inception_score: bool = True, keep_pool: bool = True,
               split_size: int = metrics.IS_SPLIT_SIZE, capacity: Optional[int] = None):
    self.pool_stats = RunningStatistics() if statistics else None
    self.spatial_stats = RunningStatistics() if (statistics and spatial) else None
    self.inception = RunningInceptionScore(split_size) if inception_score else None
    self.pool = FeaturePool(capacity) if keep_pool else None
    self.count = 0

  @property
  def outputs(self) -> tuple[str, ...]:
    """The network outputs ``update`` needs."""
    need = []
    if self.pool_stats is not None or self.pool is not None:
      need.append("pool")
    if self.spatial_stats is not None:
      need.append("spatial")
    if self.inception is not None:
      need.append("probs")
    return tuple(need)

  def update(self, out: dict[str, np.ndarray]) -> "FeatureAccumulator":
    if self.pool_stats is not None:
      self.pool_stats.update(out["pool"])
    if self.spatial_stats is not None:
      self.spatial_stats.update(out["spatial"])
    if self.inception is not None:
      self.inception.update(out["probs"])
    if self.pool is not None:
      self.pool.update(out["pool"])
    self.count += len(next(iter(out.values())))
    return self


# ---------------------------------------------------------------------------
# ADM-format .npz batches, read in row chunks.
# ---------------------------------------------------------------------------


class NpzArray:
  """One array of an ``.npz`` (stored or deflated) read in row chunks, never whole.

  ``len()``, ``shape`` and ``dtype`` come from the member's ``.npy`` header;
  ``chunks(rows)`` streams (rows, ...) arrays from the start (each call reopens
  the member, so several passes hold one chunk at a time).
  """

  def __init__(self, path: str, key: str = IMAGES_KEY):
    self.path, self.key = os.fspath(path), key
    zf = _open_npz(self.path)
    with zf:
      name = key + ".npy"
      if name not in zf.namelist():
        have = ", ".join(sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))) or "none"
        raise UserError(f"{self.path}: has no {key!r} array (arrays: {have}); expected an "
                        f"ADM-format batch with {key} uint8 (N, H, W, 3)")
      with zf.open(name) as f:
        self.shape, fortran, self.dtype, self._offset = _read_npy_header(f, self.path, key)
    if fortran:
      raise UserError(f"{self.path}: {key} is stored in Fortran order; expected a C-ordered array")

  def __len__(self) -> int:
    return int(self.shape[0]) if self.shape else 0

  def chunks(self, rows: int) -> Iterator[np.ndarray]:
    row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
    with _open_npz(self.path) as zf, zf.open(self.key + ".npy") as f:
      f.read(self._offset)
      left = len(self)
      while left:
        n = min(rows, left)
        data = f.read(n * row_bytes)
        if len(data) != n * row_bytes:
          raise UserError(f"{self.path}: {self.key} is truncated (expected {len(self)} rows)")
        yield np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))
        left -= n


def _open_npz(path: str) -> zipfile.ZipFile:
  if not os.path.exists(path):
    raise UserError(f"{path}: no such file")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected an .npz file")
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f"{path}: not a readable .npz (zip) file ({first_line(e)})") from e


def _read_npy_header(f, path: str, key: str):
  try:
    shape, fortran, dtype = npy_io.read_header(f)
  except ValueError as e:
    raise UserError(f"{path}: {key} is not a readable .npy array ({first_line(e)})") from e
  return shape, fortran, dtype, f.tell()


def npz_keys(path: str) -> tuple[str, ...]:
  """The array names in an ``.npz``."""
  with _open_npz(path) as zf:
    return tuple(n[:-4] for n in zf.namelist() if n.endswith(".npy"))


def open_image_batch(path: str, *, min_images: int = 1, why: str = "") -> NpzArray:
  """An ADM-format batch's images (``arr_0`` uint8 (N, H, W, 3)), checked, to read in chunks.

  ``why`` is appended to the message when there are fewer than ``min_images``.
  """
  arr = NpzArray(path, IMAGES_KEY)
  if arr.dtype != np.uint8:
    raise UserError(f"{path}: {IMAGES_KEY} has dtype {arr.dtype}; expected uint8 images "
                    "(ADM-format batch)")
  if len(arr.shape) != 4 or arr.shape[-1] != 3 or min(arr.shape[1:3]) < 1:
    raise UserError(f"{path}: {IMAGES_KEY} has shape {arr.shape}; expected (N, H, W, 3) NHWC "
                    "RGB images")
  if len(arr) < min_images:
    raise UserError(f"{path}: {IMAGES_KEY} holds {len(arr)} images; at least {min_images} are "
                    "needed" + (f" ({why})" if why else ""))
  return arr


# ---------------------------------------------------------------------------
# The feature pass.
# ---------------------------------------------------------------------------


def _batch_rows(images, batch: int) -> Iterator[np.ndarray]:
  """Re-cuts any source of image rows into (batch, ...) arrays (the last one may be short)."""
  if isinstance(images, NpzArray):
    yield from images.chunks(batch)
    return
  if isinstance(images, np.ndarray):
    for i in range(0, len(images), batch):
      yield images[i:i + batch]
    return
  pending: list[np.ndarray] = []
  have = 0
  shape = None
  for b in images:
    b = np.asarray(b)
    _check_image_batch(b, shape)
    shape = b.shape[1:]
    while len(b):
      take = min(batch - have, len(b))
      pending.append(b[:take])
      have += take
      b = b[take:]
      if have == batch:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]
        pending, have = [], 0
  if have:
    yield np.concatenate(pending)


def _check_image_batch(b: np.ndarray, image_shape: Optional[tuple[int, ...]]) -> None:
  if b.dtype != np.uint8 or b.ndim != 4:
    raise UserError(f"images: expected uint8 NHWC (N, H, W, C) batches, got {b.dtype} {b.shape}")
  if image_shape is not None and b.shape[1:] != image_shape:
    raise UserError(f"images: every image must have one size, got {image_shape} then "
                    f"{b.shape[1:]}")


def global_batch_size(mesh, batch_size: Optional[int] = None,
                      per_device_batch: int = DEFAULT_PER_DEVICE_BATCH) -> int:
  """``batch_size`` rounded up to a multiple of the device count (default per_device x devices)."""
  n = mesh.size
  if batch_size is None:
    return int(per_device_batch) * n
  if int(batch_size) < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  return -(-int(batch_size) // n) * n


@functools.lru_cache(maxsize=16)
def make_feature_fn(model, mesh, outputs: tuple[str, ...]):
  """Jitted ``(params, uint8 images) -> {output: float32 (B, ...)}``, batch split over "data".

  ``probs`` is ``softmax(logits)`` in float32 (ADM's IS input: logits without
  the fc bias); the other outputs are the model's own.
  """
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())

  def features(params, images):
    out = model.apply({"params": params}, images)
    res = {}
    for k in outputs:
      if k == "probs":
        res[k] = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
      else:
        res[k] = out[k].astype(jnp.float32)
    return res

  return jax.jit(features, in_shardings=(repl, data), out_shardings=data)


def run_feature_pass(model, params, images, accumulator: FeatureAccumulator, *,
                     batch_size: Optional[int] = None,
                     per_device_batch: int = DEFAULT_PER_DEVICE_BATCH, mesh=None,
                     num_images: Optional[int] = None, name: str = "features",
                     log: Log = _print) -> FeatureAccumulator:
  """Runs ``model`` over ``images`` on every device and folds its outputs into ``accumulator``.

  Args:
    model, params: the feature network (``model.apply({"params": params}, uint8 NHWC)``
      returns a dict with ``pool``/``spatial``/``logits``), e.g. from
      ``inception.load_fid_inception``.
    images: uint8 NHWC images: an array (also a memmap), an :class:`NpzArray`,
      or an iterable of (B, H, W, C) batches of any sizes. Every process passes
      the same images.
    accumulator: what to keep (see :class:`FeatureAccumulator`).
    batch_size: global batch (rounded up to a multiple of the devices); default
      ``per_device_batch`` x devices.
    mesh: a ``("data",)`` mesh; default every device of every host.
    num_images: the number of images, for progress lines when ``images`` has no ``len``.
    name, log: progress line tag and sink (process 0 only; ``None`` for silence).

  Returns:
    ``accumulator``, updated with every image in order.
  """
  mesh = mesh if mesh is not None else data_mesh()
  batch = global_batch_size(mesh, batch_size, per_device_batch)
  total = num_images if num_images is not None else (
      len(images) if hasattr(images, "__len__") else None)
  log = _log_fn(log)
  fn = make_feature_fn(model, mesh, accumulator.outputs)
  data = NamedSharding(mesh, P("data"))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  progress = Progress(total, name, "images", log=log) if total else None
  t0, done = time.perf_counter(), 0
  image_shape = None
  pending = None

  def consume(item):
    nonlocal done
    out, count = item
    accumulator.update({k: host_array(v)[:count] for k, v in out.items()})
    done += count
    if progress is not None:
      progress.update(count)
    elif time.perf_counter() - consume.last >= 10.0:
      consume.last = time.perf_counter()
      log(f"[{name}] {done:,} images | {format_duration(consume.last - t0)}")

  consume.last = t0
  for b in _batch_rows(images, batch):
    _check_image_batch(b, image_shape)
    image_shape = b.shape[1:]
    count = len(b)
    if count < batch:  # pad the last batch to the compiled shape; padding rows are dropped
      b = np.concatenate([b, np.zeros((batch - count,) + b.shape[1:], b.dtype)])
    x = jax.make_array_from_callback(b.shape, data, lambda idx, b=b: b[idx])
    out = fn(params, x)  # dispatched asynchronously: the host folds the previous batch meanwhile
    if pending is not None:
      consume(pending)
    pending = (out, count)
  if pending is not None:
    consume(pending)
  if progress is None and done:
    log(f"[{name}] {done:,} images in {format_duration(time.perf_counter() - t0)}")
  return accumulator


def feature_dims(model, params, image_shape) -> dict[str, int]:
  """Widths of the network's outputs for (H, W, C) uint8 images (traced, nothing computed)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(int(s) for s in image_shape), jnp.uint8)
  out = jax.eval_shape(lambda p, im: model.apply({"params": p}, im), params, x)
  return {k: int(v.shape[-1]) for k, v in out.items()}


# ---------------------------------------------------------------------------
# Reference statistics and the metrics dict.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ReferenceStatistics:
  """What samples are compared with: FID (``mu``, ``sigma``) and sFID (``mu_s``,
  ``sigma_s``) statistics and, for precision/recall, the reference's (N, 2048)
  float32 pool features (ADM: its 10,000 images). Missing parts are ``None``
  and their metrics come out ``None``."""
  mu: Optional[np.ndarray] = None
  sigma: Optional[np.ndarray] = None
  mu_s: Optional[np.ndarray] = None
  sigma_s: Optional[np.ndarray] = None
  pool: Optional[np.ndarray] = None

  @property
  def num_images(self) -> Optional[int]:
    return None if self.pool is None else len(self.pool)

  def arrays(self) -> dict[str, np.ndarray]:
    """The arrays that are present, by field name (no copies)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}


def check_reference_dims(reference: "ReferenceStatistics", dims: dict[str, int],
                         name: str) -> None:
  """Refuses reference statistics whose widths differ from the network's outputs ``dims``."""
  for key, out in (("mu", "pool"), ("mu_s", "spatial"), ("pool", "pool")):
    v = getattr(reference, key)
    if v is not None and out in dims and v.shape[-1] != dims[out]:
      raise UserError(f"{name}: {key} has {v.shape[-1]} features but the network's {out!r} "
                      f"output has {dims[out]}: the reference was made with another network")


def reference_from_accumulator(acc: FeatureAccumulator) -> ReferenceStatistics:
  ref = ReferenceStatistics()
  if acc.pool_stats is not None:
    ref.mu, ref.sigma = acc.pool_stats.statistics()
  if acc.spatial_stats is not None:
    ref.mu_s, ref.sigma_s = acc.spatial_stats.statistics()
  if acc.pool is not None:
    ref.pool = acc.pool.features()
  return ref


def compute_reference_statistics(model, params, images, *, precision_recall: bool = True,
                                 **pass_kwargs) -> ReferenceStatistics:
  """Statistics (and pool features unless ``precision_recall=False``) of reference images.

  ``images`` and ``pass_kwargs`` as :func:`run_feature_pass`.
  """
  n = _length(images, pass_kwargs.get("num_images"))
  acc = FeatureAccumulator(inception_score=False, keep_pool=precision_recall, capacity=n)
  pass_kwargs.setdefault("name", "reference")
  run_feature_pass(model, params, images, acc, **pass_kwargs)
  return reference_from_accumulator(acc)


def _length(images, num_images: Optional[int]) -> Optional[int]:
  if num_images is not None:
    return int(num_images)
  return len(images) if hasattr(images, "__len__") else None


def metrics_from_features(acc: FeatureAccumulator, reference: ReferenceStatistics, *,
                          distance: str = "float16", block_size: int = metrics.PR_BLOCK_SIZE,
                          mesh=None, log: Log = _print) -> dict[str, Any]:
  """The metrics dict from a sample accumulator and reference statistics (ADM's arithmetic).

  FID/sFID are ``frechet_distance(samples, reference)`` (ADM's argument order);
  a metric whose inputs are missing on either side is ``None``.
  """
  log = _log_fn(log)
  out: dict[str, Any] = {"fid": None, "sfid": None, "inception_score": None, "precision": None,
                         "recall": None, "num_samples": int(acc.count)}
  for key, stats, mu, sigma in (("fid", acc.pool_stats, reference.mu, reference.sigma),
                                ("sfid", acc.spatial_stats, reference.mu_s, reference.sigma_s)):
    if stats is None or mu is None:
      continue
    t = time.perf_counter()
    if stats.dim is not None and stats.dim >= 512:
      log(f"[metrics] {key}: matrix square root of a {stats.dim}x{stats.dim} product (scipy, "
          "~20 s on 2 CPU cores at 2048)")
    out[key] = metrics.frechet_distance(*stats.statistics(), mu, sigma)
    log(f"[metrics] {key} {out[key]:.4f} ({time.perf_counter() - t:.1f}s)")
  if acc.inception is not None and acc.inception.count:
    out["inception_score"] = acc.inception.result()
  if acc.pool is not None and reference.pool is not None:
    t = time.perf_counter()
    out["precision"], out["recall"] = metrics.precision_recall(
        reference.pool, acc.pool.features(), distance=distance, block_size=block_size,
        mesh=mesh if mesh is not None else data_mesh())
    log(f"[metrics] precision {out['precision']:.4f}, recall {out['recall']:.4f} "
        f"({time.perf_counter() - t:.1f}s)")
  return out


def evaluate_samples(model, params, samples, reference: ReferenceStatistics, *,
                     num_samples: Optional[int] = None, batch_size: Optional[int] = None,
                     per_device_batch: int = DEFAULT_PER_DEVICE_BATCH, mesh=None,
                     precision_recall: bool = True, distance: str = "float16",
                     split_size: int = metrics.IS_SPLIT_SIZE, log: Log = _print) -> dict[str, Any]:
  """Scores uint8 NHWC samples against ``reference``: the ADM suite's metrics in one call.

  Args:
    model, params: the feature network (``inception.load_fid_inception(path)``).
    samples: uint8 (N, H, W, 3) images: an array, an :class:`NpzArray` or an
      iterable of batches (then pass ``num_samples`` for progress lines and a
      preallocated feature buffer).
    reference: from :func:`load_reference` / :func:`compute_reference_statistics`.
    batch_size, per_device_batch, mesh: as :func:`run_feature_pass`.
    precision_recall: keep the pool features and compute P/R (needs ``reference.pool``).
    distance: precision/recall distance arithmetic (``"float16"``: ADM's; ``"float32"``).
    split_size: Inception Score split (ADM: 5,000 samples).
    log: progress sink on process 0 (``None``: silent).

  Returns:
    ``{"fid", "sfid", "inception_score", "precision", "recall", "num_samples"}``
    (floats; ``None`` where the reference lacks what a metric needs).
  """
  mesh = mesh if mesh is not None else data_mesh()
  keep_pool = precision_recall and reference.pool is not None
  acc = FeatureAccumulator(spatial=reference.mu_s is not None, keep_pool=keep_pool,
                           split_size=split_size, capacity=_length(samples, num_samples))
  run_feature_pass(model, params, samples, acc, batch_size=batch_size,
                   per_device_batch=per_device_batch, mesh=mesh, num_images=num_samples,
                   name="samples", log=log)
  if acc.count < 2:
    raise UserError(f"samples: {acc.count} image(s); the statistics need at least 2 "
                    "(the paper's protocol: 50,000)")
  return metrics_from_features(acc, reference, distance=distance, mesh=mesh, log=log)


# ---------------------------------------------------------------------------
# ADM reference batches, with a feature cache next to them.
# ---------------------------------------------------------------------------


def _read_npz_arrays(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  keys = [k for k in keys if k in npz_keys(path)]
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: np.asarray(f[k]) for k in keys}
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise UserError(f"{path}: cannot read {', '.join(keys)} ({first_line(e)})") from e


def read_reference_statistics(path: str) -> ReferenceStatistics:
  """An ADM reference batch's precomputed mu/sigma/mu_s/sigma_s (where present), checked."""
  arrays = _read_npz_arrays(path, STATS_KEYS)
  ref = ReferenceStatistics(**arrays)
  for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
    mu, sigma = arrays.get(m), arrays.get(s)
    if (mu is None) != (sigma is None):
      raise UserError(f"{path}: has {m if mu is not None else s} without "
                      f"{s if mu is not None else m}")
    if mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2
                           or not np.issubdtype(mu.dtype, np.floating)
                           or not np.issubdtype(sigma.dtype, np.floating)):
      raise UserError(f"{path}: {m} {mu.dtype} {mu.shape} / {s} {sigma.dtype} {sigma.shape}: "
                      "expected float (D,) and (D, D)")
  return ref


def check_reference(path: str) -> tuple[ReferenceStatistics, Optional[NpzArray]]:
  """Checks an ADM reference batch without computing anything.

  Returns its precomputed statistics (fields ``None`` where absent) and its
  images (``None`` if it has no ``arr_0``); raises :class:`UserError` for a
  missing or malformed file, bad statistics, bad images, or neither.
  """
  ref = read_reference_statistics(path)
  images = None
  if IMAGES_KEY in npz_keys(path):
    images = open_image_batch(path, min_images=metrics.PR_NEIGHBOURHOOD + 1,
                              why="precision/recall need k + 1 reference images")
  elif ref.mu is None:
    raise UserError(f"{path}: has neither {IMAGES_KEY} (images) nor mu/sigma (statistics); "
                    "expected an ADM-format reference batch")
  return ref, images


def reference_cache_path(path: str, key: str) -> str:
  """Where :func:`load_reference` caches features computed from ``path`` (next to it)."""
  path = os.path.abspath(path)
  return f"{path[:-4] if path.endswith('.npz') else path}.features-{key}.npz"


def reference_cache_key(path: str, params, model=None, extra: Any = None) -> str:
  """What cached reference features depend on: the file (size, mtime) and the network."""
  st = os.stat(path)
  desc = {"version": _CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "params": outputs.tree_digest(params), "model": repr(model) if model is not None else None,
          "extra": extra}
  return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  outputs.atomic_write(path, write)


def load_reference(path: str, model, params, *, precision_recall: bool = True,
                   cache: bool = True, cache_extra: Any = None, log: Log = _print,
                   **pass_kwargs) -> ReferenceStatistics:
  """An ADM reference batch ``.npz`` as :class:`ReferenceStatistics`.

  The file's precomputed ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` are used when
  present (as ADM does); whatever else is needed (all statistics for a batch
  without them; the pool features of its ``arr_0`` images for precision/recall)
  is computed with ``model`` and, with ``cache``, stored next to the file as
  ``<name>.features-<key>.npz`` (written atomically; ``key`` covers the file's
  size and mtime, the parameters and the model's settings, plus
  ``cache_extra``) and reused by later calls. The reference file itself is
  never written.
  """
  log = _log_fn(log)
  ref, images = check_reference(path)
  if images is None and precision_recall:
    log(f"[reference] {path} has no {IMAGES_KEY}: precision/recall will not be computed")
  need_pool = precision_recall and images is not None
  if images is None or (ref.mu is not None and ref.mu_s is not None and not need_pool):
    return ref
  key = reference_cache_key(path, params, model, cache_extra)
  cache_path = reference_cache_path(path, key)
  computed = None
  if cache and os.path.exists(cache_path):
    try:
      with np.load(cache_path, allow_pickle=False) as f:
        computed = ReferenceStatistics(**{k: f[k] for k in ("pool",) + STATS_KEYS if k in f.files})
      if computed.pool is None or len(computed.pool) != len(images) or computed.mu_s is None:
        raise ValueError("incomplete")
      log(f"[reference] features of {path} from the cache {cache_path}")
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      log(f"[reference] ignoring the unreadable cache {cache_path} ({first_line(e)})")
      computed = None
  if computed is None:
    computed = compute_reference_statistics(model, params, images, log=log, **pass_kwargs)
    if cache and jax.process_index() == 0:
      try:
        _atomic_savez(cache_path, computed.arrays())
        log(f"[reference] cached the features of {path} in {cache_path}")
      except OSError as e:
        log(f"[reference] could not write the cache {cache_path} ({first_line(e)}); continuing")
  # The file's own statistics win (ADM uses them); computed ones fill what it lacks.
  if ref.mu is None:
    ref.mu, ref.sigma = computed.mu, computed.sigma
  if ref.mu_s is None:
    ref.mu_s, ref.sigma_s = computed.mu_s, computed.sigma_s
  if need_pool:
    ref.pool = computed.pool
  return ref


# ---------------------------------------------------------------------------
# Sample files against a reference file: what `evaluate` and `generate` run.
# ---------------------------------------------------------------------------

PREPROCESSINGS = ("adm", "pytorch_fid")
FEATURE_DIM = 2048  # a covariance from fewer samples is singular


def check_inputs(samples: str, reference: str, inception: str) -> NpzArray:
  """Checks the three files before anything runs; returns the samples' ``arr_0``."""
  min_samples = metrics.PR_NEIGHBOURHOOD + 1
  images = open_image_batch(
      samples, min_images=min_samples,
      why=f"the statistics need >= 2 and precision/recall >= {min_samples} (k = "
          f"{metrics.PR_NEIGHBOURHOOD} neighbours); the paper's protocol uses 50,000")
  check_reference(reference)
  if not os.path.isfile(inception):
    raise UserError(f"--inception={inception}: no such file (expected pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth or classify_image_graph_def.pb)")
  return images


def evaluate_files(samples: str, reference: str, inception: str, *,
                   preprocessing: str = "adm", distance: str = "float16",
                   batch_size: Optional[int] = None, cache: bool = True,
                   log: Log = _print) -> dict[str, Any]:
  """The ADM suite's metrics of an ADM-format sample ``.npz`` against a reference ``.npz``.

  ``inception`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or the
  TF graph ``classify_image_graph_def.pb``. Returns the metrics of
  :func:`evaluate_samples` plus ``settings`` (files, preprocessing, distance,
  reference size), ready to be written as JSON.
  """
  log = _log_fn(log)
  images = check_inputs(samples, reference, inception)
  if preprocessing not in PREPROCESSINGS:
    raise UserError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
  model, params = inception_lib.load_fid_inception(inception, preprocessing=preprocessing)
  dims = feature_dims(model, params, images.shape[1:])
  t0 = time.perf_counter()
  log(f"[evaluate] {len(images):,} samples {images.shape[1:]} from {samples} vs {reference}; "
      f"{jax.device_count()} devices, preprocessing {preprocessing}")
  if len(images) < FEATURE_DIM:
    log(f"[evaluate] note: {len(images):,} samples < {FEATURE_DIM:,} feature dimensions: the "
        "sample covariance is singular and FID is biased upwards; compare FIDs only at equal "
        "sample counts (the paper: 50,000 samples vs the 10,000-image reference)")
  ref = load_reference(reference, model, params, cache=cache, batch_size=batch_size, log=log)
  check_reference_dims(ref, dims, reference)
  res = evaluate_samples(model, params, images, ref, distance=distance, batch_size=batch_size,
                         log=log)
  log(f"[evaluate] done in {format_duration(time.perf_counter() - t0)}")
  res["settings"] = {
      "samples": os.path.abspath(samples), "reference": os.path.abspath(reference),
      "inception": os.path.abspath(inception), "preprocessing": preprocessing,
      "distance": distance, "reference_images": ref.num_images,
      "is_split_size": metrics.IS_SPLIT_SIZE, "pr_k": metrics.PR_NEIGHBOURHOOD}
  return res


def format_table(res: dict) -> str:
  """The metrics as a two-column text table (``-`` where a metric was not computed)."""
  rows = [("FID", res["fid"]), ("sFID", res["sfid"]), ("Inception Score", res["inception_score"]),
          ("Precision", res["precision"]), ("Recall", res["recall"]),
          ("samples", res["num_samples"])]
  lines = [f"{'metric':<16} {'value':>12}", f"{'-' * 16} {'-' * 12}"]
  for name, v in rows:
    if v is None:
      text = "-"
    elif isinstance(v, int):
      text = f"{v:,}"
    else:
      text = f"{v:.4f}"
    lines.append(f"{name:<16} {text:>12}")
  return "\n".join(lines)


def check_output_path(path: Optional[str], flag: str = "--output") -> None:
  """Refuses a metrics path that cannot be a JSON file, before any work."""
  if path is None:
    return
  if os.path.isdir(path):
    raise UserError(f"{flag}={path}: is a directory, expected a .json file path")
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise UserError(f"{flag}={path}: {parent} is not a directory")


def write_metrics_json(path: str, res: dict) -> None:
  """Writes the metrics as strict JSON atomically (a NaN, e.g. an undefined IS, becomes null)."""
  def clean(v):
    if isinstance(v, float) and not np.isfinite(v):
      return None
    return {k: clean(x) for k, x in v.items()} if isinstance(v, dict) else v
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  outputs.atomic_write_json(path, clean(res))
