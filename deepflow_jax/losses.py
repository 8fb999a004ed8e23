"""The DeepFlow training loss (``docs/architecture.md``), with its random draws kept apart.

``draw_loss_randomness`` makes every random number the loss needs;
``deepflow_loss`` is pure arithmetic on those draws, so tests can feed the
reference's own draws and compare term by term.

Per batch:

* t_0 ~ lognormal (t = sigma / (1 + sigma), sigma = exp(N(0, 1)); the cosine
  path maps sigma with 2/pi * atan(sigma) as REPA does) or U(0, 1);
* one direction coin for the whole batch; t_j = clip(t_{j-1} + beta * g_j, max 1)
  when the coin is < 0.5, else clip(t_{j-1} - beta * g_j, min 0), g_j ~ U(0, 1)
  per sample;
* x_t = alpha_t x0 + sigma_t noise (linear: 1 - t, t; cosine: cos, sin of pi t/2);
  the target velocity is noise - x0 for every branch (the reference's choice, for
  both paths); only x_{t_0} enters the network;
* denoising = sum_j w_j mean_CHW((v_j - target)^2), per sample;
* acceleration = sum_{j < K-1} mean_CHW((x_{t_j} - t_j sg(v_j) + t_j^2/2 a_j - x0)^2);
* projection (REPA) = mean over (split, sample, token) of -cos(z, z~_j);
* total = mean(denoising) + acc_coeff mean(acceleration) + proj_coeff projection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  weighting: str = "lognormal"  # or "uniform"
  path_type: str = "linear"  # or "cosine"
  beta: float = 0.01  # tg_upper_bound: largest time gap between branches
  scale_weight: Sequence[float] = (0.2, 1.0)  # per-branch denoising weights
  acc_coeff: float = 1.0
  proj_coeff: float = 0.5

  def __post_init__(self):
    if self.weighting not in ("lognormal", "uniform"):
      raise ValueError(f"loss.weighting must be 'lognormal' or 'uniform', got {self.weighting!r}")
    if self.path_type not in ("linear", "cosine"):
      raise ValueError(f"loss.path_type must be 'linear' or 'cosine', got {self.path_type!r}")
    if not 0 <= self.beta <= 1:
      raise ValueError(f"loss.beta (time gap bound) must be in [0, 1], got {self.beta}")


@dataclasses.dataclass(frozen=True)
class LossDraws:
  """Every random number one loss evaluation uses.

  noise: (N, H, W, C) standard normal; time: (N,) standard normal (lognormal
  weighting) or uniform; direction: () uniform coin; gaps: (K-1, N) uniform.
  """
  noise: Array
  time: Array
  direction: Array
  gaps: Array


jax.tree_util.register_dataclass(LossDraws, data_fields=["noise", "time", "direction", "gaps"],
                                 meta_fields=[])


def draw_loss_randomness(rng: Array, x0_shape: Sequence[int], num_branches: int,
                         weighting: str) -> LossDraws:
  k_noise, k_time, k_dir, k_gap = jax.random.split(rng, 4)
  n = x0_shape[0]
  if weighting == "lognormal":
    time = jax.random.normal(k_time, (n,))
  else:
    time = jax.random.uniform(k_time, (n,))
  return LossDraws(
      noise=jax.random.normal(k_noise, tuple(x0_shape)),
      time=time,
      direction=jax.random.uniform(k_dir, ()),
      gaps=jax.random.uniform(k_gap, (num_branches - 1, n)),
  )


def initial_time(draw: Array, weighting: str, path_type: str) -> Array:
  if weighting == "uniform":
    return draw
  sigma = jnp.exp(draw)
  if path_type == "linear":
    return sigma / (1 + sigma)
  return 2 / math.pi * jnp.arctan(sigma)


def branch_times(t0: Array, direction: Array, gaps: Array, beta: float) -> list[Array]:
  """[t_0, ..., t_{K-1}]: one direction for the batch, per-sample gaps below beta, clipped."""
  up = direction < 0.5
  ts = [t0]
  for g in gaps:
    prev = ts[-1]
    ts.append(jnp.where(up, jnp.minimum(prev + beta * g, 1.0), jnp.maximum(prev - beta * g, 0.0)))
  return ts


def interpolant(t: Array, path_type: str) -> tuple[Array, Array]:
  """(alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t noise."""
  if path_type == "linear":
    return 1 - t, t
  return jnp.cos(t * math.pi / 2), jnp.sin(t * math.pi / 2)


def _bcast(t: Array) -> Array:
  return t[:, None, None, None]


def _mean_flat(x: Array) -> Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def projection_loss(zs: Sequence[Array], target: Array) -> Array:
  """Mean over (split, sample, token) of -cos(target, z~_j); target (N, T, z_dim)."""
  def normalize(z):
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  t = normalize(target.astype(jnp.float32))
  return jnp.mean(jnp.stack([-jnp.sum(normalize(z) * t, axis=-1) for z in zs]))


ApplyFn = Callable[[Array, Sequence[Array], Array], tuple[list, list, list]]


def deepflow_loss(apply_fn: ApplyFn, x0: Array, y: Array, draws: LossDraws, cfg: LossConfig,
                  encoder_features: Optional[Array] = None) -> tuple[Array, dict]:
  """The DeepFlow loss on one batch.

  Args:
    apply_fn: ``(x_t0, [t_0..t_{K-1}], y) -> (velocities, accelerations, zs)``.
    x0: clean data (N, H, W, C).
    y: labels (N,).
    draws: from ``draw_loss_randomness`` (or the reference's own draws).
    cfg: LossConfig.
    encoder_features: (N, T, z_dim) REPA targets; needed iff the model returns zs.

  Returns:
    (total, terms): scalars ``denoise``, ``acc``, ``proj`` (the three terms
    before their coefficients); per sample ``denoise_per_sample`` (weighted
    sum), ``acc_per_sample``, ``denoise_branch`` (K, N) and ``acc_branch``
    (K-1, N) unweighted; and the arrays ``t`` (K, N), ``x_t`` (K, N, H, W, C),
    ``target``, ``velocities``, ``accelerations``, ``next_sample`` (the
    second-order step to t = 0 per split). Under ``jit`` whatever the caller
    does not use is dead code and costs nothing.
  """
  x0 = x0.astype(jnp.float32)
  noise = draws.noise.astype(jnp.float32)
  k = len(cfg.scale_weight)
  if draws.gaps.shape[0] != k - 1:
    raise ValueError(f"{draws.gaps.shape[0]} gap draws for {k} branches")
  t0 = initial_time(draws.time, cfg.weighting, cfg.path_type)
  ts = branch_times(t0, draws.direction, draws.gaps, cfg.beta)
  xts = []
  for t in ts:
    alpha, sigma = interpolant(t, cfg.path_type)
    xts.append(_bcast(alpha) * x0 + _bcast(sigma) * noise)
  target = noise - x0
  velocities, accelerations, zs = apply_fn(xts[0], ts, y)
  if len(velocities) != k or len(accelerations) != k - 1:
    raise ValueError(f"model returned {len(velocities)} velocities / {len(accelerations)} "
                     f"accelerations; loss.scale_weight has {k} branch weights")
  denoise_branch = jnp.stack(
      [_mean_flat((v.astype(jnp.float32) - target)**2) for v in velocities])
  weights = jnp.asarray([float(w) for w in cfg.scale_weight], jnp.float32)
  denoise = jnp.sum(weights[:, None] * denoise_branch, axis=0)
  next_samples, acc_branch = [], []
  for j, a in enumerate(accelerations):
    t = _bcast(ts[j])
    v = jax.lax.stop_gradient(velocities[j].astype(jnp.float32))
    nxt = xts[j] - t * v + 0.5 * t**2 * a.astype(jnp.float32)
    next_samples.append(nxt)
    acc_branch.append(_mean_flat((nxt - x0)**2))
  acc = jnp.sum(jnp.stack(acc_branch), axis=0) if acc_branch else jnp.zeros_like(denoise)
  if zs:
    if encoder_features is None:
      raise ValueError("the model has SSL projectors (ssl_align) but no encoder features were given")
    proj = projection_loss(zs, encoder_features)
  else:
    proj = jnp.zeros((), jnp.float32)
  total = jnp.mean(denoise) + cfg.acc_coeff * jnp.mean(acc) + cfg.proj_coeff * proj
  terms = dict(
      denoise=jnp.mean(denoise), acc=jnp.mean(acc), proj=proj,
      denoise_per_sample=denoise, acc_per_sample=acc,
      denoise_branch=denoise_branch,
      acc_branch=jnp.stack(acc_branch) if acc_branch else jnp.zeros((0,) + denoise.shape),
      t=jnp.stack(ts), x_t=jnp.stack(xts), target=target, velocities=velocities,
      accelerations=accelerations, next_sample=next_samples)
  return total, terms
