"""A tiny stand-in for the FID Inception: same interface, row-exact arithmetic.

``StandInFeatures().apply({"params": p}, uint8 NHWC)`` returns ``pool`` (N, 24),
``spatial`` (N, 12 for 8x8 images) and ``logits`` (N, 10), like the real
network's dict. Integer weights on integer pixels keep every sum exact in
float32 (all partial sums stay below 2**24), ``abs`` is exact and the scalings
are powers of two, so a row's outputs do not depend on how many rows XLA's CPU
kernels process at once (a float conv/dense does: measured 1e-8..1e-7
differences between batch sizes). That is what lets the device/batch-invariance
tests assert float64 noise. ``abs`` rather than ReLU, and few spatial features,
keep the covariances of 40-50 images full rank: the matrix square root of a
singular product would turn float64 rounding into ~1e-8 FID noise.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _int_init(lo, hi):
  return lambda key, shape, dtype=jnp.float32: jax.random.randint(key, shape, lo, hi).astype(dtype)


class StandInFeatures(nn.Module):
  """Conv3x3/2 -> abs (spatial: every other position, 3 channels) -> Dense -> abs -> Dense."""

  @nn.compact
  def __call__(self, images):
    x = images.astype(jnp.float32)
    h = jnp.abs(nn.Conv(6, (3, 3), strides=(2, 2), use_bias=False,
                        kernel_init=_int_init(-2, 3))(x))
    n = h.shape[0]
    spatial = h[:, ::2, ::2, :3].reshape(n, -1) / 256.0
    pool = jnp.abs(nn.Dense(24, use_bias=False, kernel_init=_int_init(-1, 2))(
        h.reshape(n, -1))) / 2.0**16
    logits = nn.Dense(10, use_bias=False, kernel_init=_int_init(-1, 2))(pool) * 8.0
    return {"pool": pool, "spatial": spatial, "logits": logits}


def standin(seed=0, size=8):
  """(model, params) of the stand-in for ``size`` x ``size`` RGB images."""
  model = StandInFeatures()
  init = jax.jit(model.init)  # one compilation instead of op-by-op eager init
  params = init(jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.uint8))["params"]
  return model, params


def images(seed, n, size=8, shift=0):
  """Deterministic uint8 (n, size, size, 3) images; ``shift`` moves their brightness."""
  rng = np.random.default_rng(seed)
  return np.clip(rng.integers(0, 256, (n, size, size, 3)) + shift, 0, 255).astype(np.uint8)
