"""Feature accumulators and the data-parallel feature pass of the ADM evaluation suite.

A feature network (the FID Inception, :mod:`deepflow_jax.models.inception`, or
any Flax module with the same outputs) runs jitted and data-parallel over every
device of every host; its outputs are folded batch by batch into accumulators on
the host, so no image buffer of the whole set is ever held:

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
``npy_io.NpzArray`` read in chunks, or any iterable of batches of any sizes):
rows are regrouped into fixed global batches (one compilation; the last batch
padded and its padding dropped), sharded over the ``"data"`` axis, parameters
replicated, and outputs gathered back to every process in sample order, so the
results do not depend on the device count or batch size. Every process must
pass the same images (each places only its own devices' rows).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import metrics
from deepflow_jax.npy_io import NpzArray
from deepflow_jax.progress import Progress, format_duration
from deepflow_jax.sharding import data_mesh
from deepflow_jax.sharding import host_array

DEFAULT_PER_DEVICE_BATCH = 32

Log = Optional[Callable[[str], None]]


def log_fn(log: Log) -> Callable[[str], None]:
  """``log`` on process 0, nothing elsewhere (every process runs the same loop)."""
  if log is None or jax.process_index() != 0:
    return lambda msg: None
  return log


def print_log(msg: str) -> None:
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
                     log: Log = print_log) -> FeatureAccumulator:
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
  log = log_fn(log)
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


def count_images(images, num_images: Optional[int]) -> Optional[int]:
  """The number of images: ``num_images`` if given, else ``len(images)`` where it has one."""
  if num_images is not None:
    return int(num_images)
  return len(images) if hasattr(images, "__len__") else None
