"""The ADM evaluation suite's metric arithmetic: FID/sFID, Inception Score, precision/recall.

Every function reproduces the arithmetic of the evaluator the DeepFlow paper's
numbers come from (the ADM / guided-diffusion ``evaluator.py``), including its
dtypes and its corner cases, so that the same activations give the same
numbers:

* :func:`activation_statistics`: ``mu`` is the mean in the activations' dtype
  (float32 for float32 activations), ``sigma`` is ``np.cov`` (float64, ddof 1).
* :func:`frechet_distance`: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 @ s2))``
  with ``scipy.linalg.sqrtm`` of the non-symmetric product; an ``eps * I``
  offset only if that square root is not finite; a complex square root is
  accepted (real part) only if its diagonal's imaginary part is within 1e-3 of
  0. Not clipped: identical statistics can give ~-1e-12.
* :func:`inception_score`: ``exp(E[KL(p(y|x) || p(y))])`` per chunk of
  ``split_size`` (5,000) *samples*, averaged over chunks (a short last chunk
  counts as a full one); float32 arithmetic for float32 probabilities; an exact
  zero probability gives ``0 * log 0 = nan`` and a nan score, as ADM.
* :func:`precision_recall`: the improved precision/recall manifold estimator
  (k = 3): squared euclidean distances ``max(|u|^2 - 2 u.v + |v|^2, 0)``
  computed from float16-rounded features (the whole block recomputed in float32
  if any float16 entry overflows), radius of a point = squared distance to its
  k-th nearest *other* point. Computed in (row, column) blocks with jitted JAX
  on the devices of a ``("data",)`` mesh, so 50k x 10k features never need a
  full distance matrix.

The float16 path emulates what a GPU does (float16 operands, products summed
in float32, every result rounded to float16); TF on CPU sums in another order,
so single borderline comparisons can flip: precision and recall agree with
ADM's to about 0.005 at 500 points, and to 1/N with exact arithmetic when
``distance="float32"``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import NamedSharding, PartitionSpec as P

from deepflow_jax.errors import UserError
from deepflow_jax.sharding import host_array

# ADM's FID offset when the first matrix square root is not finite.
FID_EPS = 1e-6
# ADM: the complex square root's diagonal must be within this of real.
FID_IMAG_ATOL = 1e-3
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
# ADM's ManifoldEstimator row/column batch size.
PR_BLOCK_SIZE = 10000
DISTANCE_MODES = ("float16", "float32")

# float16: smallest normal 2**-14, subnormal spacing 2**-24.
_F16_MIN_NORMAL = 2.0**-14
_F16_SUBNORMAL_STEP = 2.0**-24


def _as_2d_features(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise UserError(f"{name}: expected a 2-D (N, D) array of activations, got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise UserError(f"{name}: expected floating-point activations, got dtype {x.dtype}")
  return x


def activation_statistics(acts) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of (N, D) activations, as ADM's ``compute_statistics``.

  Returns:
    ``mu`` (D,) in the activations' dtype (``np.mean(acts, axis=0)``: float32
    for float32 activations, as ADM keeps them) and ``sigma`` (D, D) float64
    (``np.cov(acts, rowvar=False)``, ddof 1).
  """
  acts = _as_2d_features(acts, "activations")
  if acts.shape[0] < 2:
    raise UserError(f"activations: the covariance needs at least 2 rows, got {acts.shape[0]}")
  return np.mean(acts, axis=0), np.cov(acts, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # scipy >= 1.16 deprecates `disp`; without it sqrtm returns the same matrix that
  # ADM's `sqrtm(..., disp=False)[0]` is. Singular products (rank-deficient or
  # zero-variance statistics) are normal here and only warned about by scipy.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    warnings.simplefilter("ignore", RuntimeWarning)
    return scipy.linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between two Gaussians, with ADM's arithmetic (FID, sFID).

  ``diff.dot(diff) + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``.
  ``mu*`` keep their dtype (float32 means give a float32 ``diff.dot(diff)``, as
  ADM); ``sigma*`` are used in float64 (ADM's are float64; float32 linear
  algebra moves a 2048-d FID by ~1e-6 relative). If the square root is not
  finite it is recomputed with ``1e-6 * I`` added to both covariances; a
  complex square root whose diagonal has an imaginary part above 1e-3 raises
  :class:`UserError`, otherwise its real part is used. Not clipped at 0.

  Args:
    mu1, mu2: (D,) means.
    sigma1, sigma2: (D, D) covariances.

  Returns:
    The distance as a Python float.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise UserError(f"frechet_distance: expected means (D,) and covariances (D, D) of one D, got "
                    f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(d) * FID_EPS
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_IMAG_ATOL):
      m = np.max(np.abs(covmean.imag))
      raise UserError(f"frechet_distance: the matrix square root of sigma1 @ sigma2 has an "
                      f"imaginary component of {m:.3g} (above {FID_IMAG_ATOL} on the diagonal): "
                      "the covariances are not valid (not symmetric positive semi-definite?)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def split_score(part: np.ndarray) -> np.floating:
  """One Inception-Score split: ``exp(mean_i sum_c p log(p / mean_i p))`` in ``part``'s dtype."""
  with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log(0) = nan, as ADM
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    return np.exp(np.mean(np.sum(kl, 1)))


def mean_split_scores(scores: Sequence[np.floating]) -> float:
  """The Inception Score from per-split scores: their plain mean (ADM: ``np.mean(scores)``)."""
  if not len(scores):
    raise UserError("inception_score: no samples")
  return float(np.mean(scores))


def inception_score(probs, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score of (N, C) class probabilities (softmax of the logits without bias).

  Chunks of ``split_size`` consecutive samples (not a number of splits: 50,000
  samples give 10); each chunk's ``exp(E[KL(p(y|x) || p(y))])``, averaged with
  equal weights (a short last chunk counts fully). Arithmetic is in ``probs``'
  dtype (float32 for ADM); an exact 0 probability makes the result nan.
  """
  probs = _as_2d_features(probs, "probabilities")
  split_size = int(split_size)
  if split_size < 1:
    raise UserError(f"inception_score: split_size must be >= 1, got {split_size}")
  scores = [split_score(probs[i:i + split_size]) for i in range(0, len(probs), split_size)]
  return mean_split_scores(scores)


# ---------------------------------------------------------------------------
# Precision / recall (ADM's ManifoldEstimator), blocked and jitted.
# ---------------------------------------------------------------------------


def _round_f16(x: jax.Array) -> jax.Array:
  """Rounds float32 values to the nearest float16 value (overflow -> inf), keeping float32.

  ``lax.reduce_precision`` is an explicit op XLA never elides (a convert pair
  may be, under excess-precision simplification) but it flushes float16
  subnormals to zero; those are rounded on their fixed 2**-24 grid instead.
  """
  normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
  sub = jnp.round(x / _F16_SUBNORMAL_STEP) * _F16_SUBNORMAL_STEP
  return jnp.where(jnp.abs(x) < _F16_MIN_NORMAL, sub, normal)


def _sq_distances(u: jax.Array, v: jax.Array, dtype: str) -> jax.Array:
  """``max(|u|^2 - 2 u.v + |v|^2, 0)`` for (M, D) x (K, D) -> (M, K) float32.

  ``dtype="float16"`` rounds the operands and every intermediate result to
  float16 (products summed in float32, as a GPU's float16 matmul and reduction
  do); ``"float32"`` is the same formula in float32 (ADM's fallback branch).
  """
  hi = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on GPUs/TPUs
  r = _round_f16 if dtype == "float16" else (lambda a: a)
  u, v = r(u.astype(jnp.float32)), r(v.astype(jnp.float32))
  nu = r(jnp.sum(r(u * u), axis=1))
  nv = r(jnp.sum(r(v * v), axis=1))
  uv = r(jnp.matmul(u, v.T, precision=hi))
  d = r(r(nu[:, None] - r(2.0 * uv)) + nv[None, :])
  return jnp.maximum(d, 0.0)


def _adm_distances(u: jax.Array, v: jax.Array, dtype: str) -> jax.Array:
  """ADM's DistanceBlock: the float16 block, or the float32 one if a float16 entry is not finite."""
  if dtype == "float32":
    return _sq_distances(u, v, "float32")
  d16 = _sq_distances(u, v, "float16")
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16,
                      lambda: _sq_distances(u, v, "float32"))


def pairwise_sq_distances(u, v, distance: str = "float16") -> np.ndarray:
  """(M, D) x (K, D) -> (M, K) float32 squared distances exactly as the P/R blocks use them."""
  _check_distance(distance)
  return np.asarray(jax.jit(_adm_distances, static_argnums=2)(
      jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), distance))


def _check_distance(distance: str) -> None:
  if distance not in DISTANCE_MODES:
    raise UserError(f"precision_recall: distance must be one of {DISTANCE_MODES}, got {distance!r}")


@functools.partial(jax.jit, static_argnums=(4, 5))
def _block_smallest(rows, cols, n_cols, best, dtype: str, k1: int):
  """Merges the ``k1`` smallest distances of ``rows`` to the first ``n_cols`` ``cols``."""
  d = _adm_distances(rows, cols, dtype)
  d = jnp.where(jnp.arange(d.shape[1])[None, :] < n_cols, d, jnp.inf)
  cand = jnp.concatenate([best, -jax.lax.top_k(-d, k1)[0]], axis=1)
  return -jax.lax.top_k(-cand, k1)[0]


@functools.partial(jax.jit, static_argnums=(6,))
def _block_inside(rows, rows_radii, n_rows, cols, cols_radii, n_cols, dtype: str):
  """ADM's ``less_thans`` on one block: (row in some column's ball, column in some row's)."""
  d = _adm_distances(rows, cols, dtype)
  row_ok = jnp.arange(d.shape[0]) < n_rows
  col_ok = jnp.arange(d.shape[1]) < n_cols
  rows_in = jnp.any((d <= cols_radii[None, :]) & col_ok[None, :], axis=1)
  cols_in = jnp.any((d <= rows_radii[:, None]) & row_ok[:, None], axis=0)
  return rows_in, cols_in


class _Blocks:
  """Fixed-shape, zero-padded blocks of a host feature array, placed on a ``("data",)`` mesh.

  Row blocks are split over the mesh (each device owns whole rows); column
  blocks are replicated. One block shape means one compilation.
  """

  def __init__(self, feats: np.ndarray, block: int, mesh, row: bool):
    if block < 1:
      raise UserError(f"precision_recall: block_size must be >= 1, got {block}")
    self.feats, self.n = feats, len(feats)
    n_dev = mesh.size if (row and mesh is not None) else 1
    size = min(block, self.n)
    self.size = -(-size // n_dev) * n_dev
    self.sharding = None
    if mesh is not None:
      self.sharding = NamedSharding(mesh, P("data") if row else P())

  def starts(self) -> range:
    return range(0, self.n, self.size)

  def get(self, start: int, values: np.ndarray | None = None) -> tuple[jax.Array, int]:
    src = self.feats if values is None else values
    chunk = np.asarray(src[start:start + self.size], np.float32)
    count = len(chunk)
    if count < self.size:
      chunk = np.concatenate([chunk, np.zeros((self.size - count,) + chunk.shape[1:], np.float32)])
    return _put(chunk, self.sharding), count


def _put(x: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def manifold_radii(feats, k: int = PR_NEIGHBOURHOOD, *, distance: str = "float16",
                   block_size: int = PR_BLOCK_SIZE, mesh=None) -> np.ndarray:
  """(N,) float32 squared distance of every point to its k-th nearest other point.

  The (k+1)-th smallest entry of its row of ``D(feats, feats)`` (the smallest is
  the point itself), as ADM's ``manifold_radii`` with ``nhood_sizes=(k,)``.
  """
  _check_distance(distance)
  feats = _as_2d_features(feats, "features")
  if len(feats) < k + 1:
    raise UserError(f"precision_recall: the k={k} nearest-neighbour radius needs at least {k + 1} "
                    f"points, got {len(feats)}")
  block_size = max(int(block_size), k + 1)  # a column block must hold k + 1 candidates
  rows, cols = _Blocks(feats, block_size, mesh, True), _Blocks(feats, block_size, mesh, False)
  radii = np.empty(len(feats), np.float32)
  for r0 in rows.starts():
    r, nr = rows.get(r0)
    best = _put(np.full((rows.size, k + 1), np.inf, np.float32), rows.sharding)
    for c0 in cols.starts():
      c, nc = cols.get(c0)
      best = _block_smallest(r, c, jnp.int32(nc), best, distance, k + 1)
    radii[r0:r0 + nr] = host_array(best)[:nr, k]
  return radii


def precision_recall_from_radii(ref_feats, ref_radii, sample_feats, sample_radii, *,
                                distance: str = "float16", block_size: int = PR_BLOCK_SIZE,
                                mesh=None) -> tuple[float, float]:
  """ADM's ``evaluate_pr``: (fraction of samples inside some reference ball, of references
  inside some sample ball); a point is inside a ball if its squared distance to the
  centre is <= the centre's radius."""
  _check_distance(distance)
  ref_feats = _as_2d_features(ref_feats, "reference features")
  sample_feats = _as_2d_features(sample_feats, "sample features")
  if ref_feats.shape[1] != sample_feats.shape[1]:
    raise UserError(f"precision_recall: reference features have {ref_feats.shape[1]} dimensions, "
                    f"samples {sample_feats.shape[1]}")
  rows = _Blocks(ref_feats, block_size, mesh, True)
  cols = _Blocks(sample_feats, block_size, mesh, False)
  ref_in = np.zeros(len(ref_feats), bool)
  sample_in = np.zeros(len(sample_feats), bool)
  for r0 in rows.starts():
    r, nr = rows.get(r0)
    rr, _ = rows.get(r0, ref_radii)
    for c0 in cols.starts():
      c, nc = cols.get(c0)
      cr, _ = cols.get(c0, sample_radii)
      r_in, c_in = _block_inside(r, rr, jnp.int32(nr), c, cr, jnp.int32(nc), distance)
      ref_in[r0:r0 + nr] |= host_array(r_in)[:nr]
      sample_in[c0:c0 + nc] |= host_array(c_in)[:nc]
  return float(np.mean(sample_in.astype(np.float64))), float(np.mean(ref_in.astype(np.float64)))


def precision_recall(ref_feats, sample_feats, k: int = PR_NEIGHBOURHOOD, *,
                     distance: str = "float16", block_size: int = PR_BLOCK_SIZE,
                     mesh=None) -> tuple[float, float]:
  """Improved precision and recall (ADM's ``compute_prec_recall``) of (N, D) feature sets.

  Args:
    ref_feats: (N_ref, D) reference features (ADM: the reference batch's pool features).
    sample_feats: (N_sample, D) sample features.
    k: neighbourhood size; a point's radius is the squared distance to its
      k-th nearest other point.
    distance: ``"float16"`` (default; ADM's float16 distances with the float32
      retry of a block that overflows) or ``"float32"`` (the same formula in
      float32: equal to exact arithmetic up to ties).
    block_size: rows and columns per distance block (ADM: 10,000; one block
      holds ``block_size**2`` float32 on the devices).
    mesh: a ``("data",)`` mesh to split each block's rows over (default: one device).

  Returns:
    ``(precision, recall)``: precision = fraction of samples within the
    k-NN ball of some reference point; recall = fraction of reference points
    within the k-NN ball of some sample.
  """
  ref_radii = manifold_radii(ref_feats, k, distance=distance, block_size=block_size, mesh=mesh)
  sample_radii = manifold_radii(sample_feats, k, distance=distance, block_size=block_size,
                                mesh=mesh)
  return precision_recall_from_radii(ref_feats, ref_radii, sample_feats, sample_radii,
                                     distance=distance, block_size=block_size, mesh=mesh)
