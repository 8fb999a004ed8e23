"""DINOv2 (the official ViT/14 backbones) in Flax linen, its loader and REPA's input pipeline.

DeepFlow's SSL alignment (REPA) pulls projected branch tokens towards the patch
features that a frozen DINOv2 computes from the clean image. This module holds:

* ``preprocess_raw_image(images, size)``: uint8 NHWC images -> float32 NHWC
  encoder input, as the reference computes it: ``x / 255``, ImageNet mean/std
  (``(x - mean) / std`` per channel), then PyTorch's plain bicubic resize
  (``F.interpolate(x, size, mode='bicubic')``: Keys cubic with a = -0.75,
  half-pixel centres, edge samples clamped, no antialiasing, no clipping of the
  result) to ``size x size``. The resize is a product with two constant weight
  matrices (``jax.image.resize`` computes a different bicubic); it is jittable
  and works on batch-sharded arrays.
* ``repa_input_size(resolution) -> (size, grid)``: the reference's encoder input
  size and patch grid for generated images of ``resolution`` pixels,
  ``224 * (resolution // 256)`` and ``16 * (resolution // 256)``.
* ``load_dinov2(path, grid=None)``: the encoder and its parameters from an
  official ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` (a flat state_dict).
  ``grid=G`` resamples the position embedding once, at load, to G x G as the
  reference does (timm's ``resample_abs_pos_embed``: antialiased bicubic of the
  patch table, the cls slot kept).
* ``DinoVisionTransformer``: ``encoder.apply({'params': p}, x)`` with ``x``
  ``(N, H, W, C)`` preprocessed (H, W multiples of the patch size) returns
  ``{'x_norm_clstoken': (N, D), 'x_norm_regtokens': (N, R, D),
  'x_norm_patchtokens': (N, H/p * W/p, D), 'x_prenorm': (N, 1 + R + H/p * W/p, D)}``,
  all float32; patch tokens are row-major over the (H/p, W/p) grid.

Architecture (DINOv2's ``DinoVisionTransformer`` as the hub builds it,
``block_chunks=0``): a convolution with kernel = stride = p embeds the patches;
the input tokens are ``[cls + pos_0, reg_1 .. reg_R, patch_k + pos_k]`` (register
tokens carry no position embedding; ``pos_embed`` has a single prefix slot);
pre-norm blocks compute ``x + ls1 * attn(norm1(x))`` then
``x + ls2 * ffn(norm2(x))``, with a fused qkv projection split as
(3, heads, head_dim), softmax attention scaled by head_dim**-0.5, LayerScale
vectors ``gamma``, and the FFN ``fc2(GELU(fc1(x)))`` with the exact (erf) GELU
(ViT-g: SwiGLU, ``w3(silu(a) * b)`` with ``a, b`` the two halves of ``w12(x)``);
every LayerNorm has eps 1e-6 and the final ``norm`` is applied to all tokens.
There is no head; the checkpoint's ``mask_token`` is accepted and unused.

When the input's patch grid differs from the stored position grid M x M, the
patch position table is interpolated at apply time as DINOv2's
``interpolate_pos_encoding`` does (in float32): bicubic from M x M to
(H/p, W/p); with ``interpolate_offset > 0`` (0.1, the plain models) the source
coordinates use the scale M / (H/p + offset) instead of M / (H/p), with 0 (the
``_reg`` models) the output size alone; ``interpolate_antialias`` selects
PyTorch's antialiased bicubic (a = -0.5, weights renormalised at the borders;
the ``_reg`` models) instead of the plain one (the plain models). The REPA path
never interpolates: its table is resampled at load to the input's grid.

Parameters are named after the checkpoint keys: ``blocks.3.attn.qkv.weight``
``(out, in)`` -> ``blocks_3/attn/qkv/kernel`` ``(in, out)``;
``patch_embed.proj.weight`` ``(D, C, p, p)`` -> ``patch_embed/proj/kernel``
``(p, p, C, D)``; LayerNorm ``weight`` -> ``scale``; ``blocks.N.ls1.gamma`` ->
``blocks_N/ls1/gamma``; ``cls_token``, ``pos_embed`` and ``register_tokens`` at
the top, unchanged. Training checkpoints saved with ``block_chunks > 0``
(``blocks.<chunk>.<N>.``) are read too.

Dtypes: ``dtype`` is the compute dtype of the matmuls, the patch convolution and
attention (bfloat16 on accelerators); the residual stream, LayerNorms,
LayerScale and position embeddings stay float32, as under the reference's
``autocast``. For float32 parity on TPU/GPU run under
``jax.default_matmul_precision('highest')`` (or pass ``precision``): default
accelerator matmuls round to bfloat16/TF32.

Intermediate values are recorded with ``sow`` into the ``'intermediates'``
collection when the caller makes it mutable (a plain ``apply`` ignores them):
``patches`` (the patch embedding, (N, T, D)), ``pos`` (the position table
used, (1, 1 + T, D)), ``tokens0`` (the input tokens), and under ``blocks_<i>``: ``norm1_out``,
``attn_out`` (before LayerScale), ``after_attn``, ``norm2_out``, ``mlp_out``
(the FFN output before LayerScale; ``mlp/fc1_out`` and ``mlp/act`` inside the
GELU FFN) and ``out``. Each is a 1-tuple, as ``sow`` stores them.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepflow_jax.errors import UserError
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import check_state_dict
from deepflow_jax.torch_io import flat_state_dict
from deepflow_jax.torch_io import flatten_tree
from deepflow_jax.torch_io import load_weights_file
from deepflow_jax.torch_io import torch_shape
from deepflow_jax.torch_io import tree_from_state_dict

Array = jax.Array
Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6

# Heads of the official variants, by width (all have head_dim 64).
OFFICIAL_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}
OFFICIAL_POS_GRID = 37  # the hub models' img_size 518 / patch 14

# The official backbones (hub names without the "dinov2_" prefix); ``_reg``
# variants add num_register_tokens=4, interpolate_antialias=True,
# interpolate_offset=0.0 (see ``variant``).
VARIANTS: dict[str, dict[str, Any]] = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp", ffn_hidden=1536),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp", ffn_hidden=3072),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp", ffn_hidden=4096),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu", ffn_hidden=4096),
}

HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# PyTorch's bicubic resampling as weight matrices.
# ---------------------------------------------------------------------------


def _plain_bicubic_weights(in_size: int, out_size: int,
                           scale_factor: Optional[float]) -> np.ndarray:
  """torch ``F.interpolate(mode='bicubic', align_corners=False, antialias=False)`` along one axis.

  Computed in float32 the way PyTorch does for float32 inputs: scale
  ``in/out`` (or ``1/scale_factor``), source ``scale * (dst + 0.5) - 0.5`` (not
  clamped), base index ``min(floor(src), in - 1)``, fraction clamped to [0, 1],
  Keys weights with a = -0.75 at the four taps ``base - 1 .. base + 2``, tap
  indices clamped to ``[0, in - 1]`` (a clamped tap's weight adds to the edge).
  """
  f = np.float32
  a = f(-0.75)
  if scale_factor:
    scale = f(1.0 / scale_factor)
  else:
    scale = f(in_size) / f(out_size)
  src = scale * (np.arange(out_size, dtype=f) + f(0.5)) - f(0.5)
  base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - base.astype(f), f(0), f(1)).astype(f)

  def near(x):  # |x| <= 1
    return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

  def far(x):  # 1 < |x| < 2
    return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

  taps = (far(t + f(1)), near(t), near(f(1) - t), far((f(1) - t) + f(1)))
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k, wk in enumerate(taps):
    np.add.at(w, (rows, np.clip(base - 1 + k, 0, in_size - 1)), wk.astype(np.float64))
  return w


def _antialiased_bicubic_weights(in_size: int, out_size: int,
                                 scale_factor: Optional[float]) -> np.ndarray:
  """torch ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` along one axis.

  PIL-style, in float64: scale ``s = in/out`` (or ``1/scale_factor``), support
  ``2 * max(s, 1)``, centre ``s * (i + 0.5)``, taps
  ``[int(centre - support + 0.5), int(centre + support + 0.5))`` clipped to the
  input, Keys filter with a = -0.5 evaluated at
  ``(j - centre + 0.5) / max(s, 1)``, weights renormalised to sum 1.
  """
  s = (1.0 / scale_factor) if scale_factor else in_size / out_size
  support = 2.0 * s if s >= 1.0 else 2.0
  inv = 1.0 / s if s >= 1.0 else 1.0
  a = -0.5

  def keys(x):
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))

  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    centre = s * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    wi = keys((np.arange(lo, hi) - centre + 0.5) * inv)
    total = wi.sum()
    w[i, lo:hi] = wi / total if total != 0 else wi
  return w


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                         scale_factor: Optional[float] = None) -> np.ndarray:
  """The (out_size, in_size) float64 matrix W of PyTorch's bicubic resize along one axis.

  ``resize(x)`` along an axis of length ``in_size`` is ``W @ x``; a 2D resize
  applies it to rows and to columns (the filter is separable). ``antialias``
  and ``scale_factor`` mean what they mean for ``F.interpolate`` (with a
  ``scale_factor``, source coordinates use ``1 / scale_factor``, not
  ``in/out``). The plain weights hold PyTorch's float32 values exactly. The
  returned array is shared: read-only.
  """
  in_size, out_size = int(in_size), int(out_size)
  if in_size < 1 or out_size < 1:
    raise UserError(f"bicubic resize: sizes must be positive, got {in_size} -> {out_size}")
  fn = _antialiased_bicubic_weights if antialias else _plain_bicubic_weights
  w = fn(in_size, out_size, scale_factor)
  w.flags.writeable = False
  return w


def _resize_2d(x: Array, wh: np.ndarray, ww: np.ndarray, precision) -> Array:
  """(N, H, W, C) -> (N, H', W', C) with row and column weight matrices, float32."""
  x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(wh, jnp.float32), x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", jnp.asarray(ww, jnp.float32), x, precision=precision)


# ---------------------------------------------------------------------------
# Input preprocessing (the reference's preprocess_raw_image for DINOv2).
# ---------------------------------------------------------------------------


def repa_input_size(resolution: int) -> tuple[int, int]:
  """(encoder input size, patch grid) for generated images of ``resolution`` pixels.

  The reference's ``224 * (resolution // 256)`` and ``16 * (resolution // 256)``:
  (224, 16) at 256, (448, 32) at 512. ``resolution`` must be a positive
  multiple of 256 (the reference trains at 256 and 512).
  """
  r = int(resolution)
  if r < 256 or r % 256:
    raise UserError(f"REPA encoder input: resolution {resolution} is not a positive "
                    "multiple of 256 (the reference supports 256 and 512)")
  return 224 * (r // 256), 16 * (r // 256)


def preprocess_raw_image(images: Array, size: int, *, precision: Any = HIGHEST) -> Array:
  """uint8 images (N, H, W, 3) -> float32 DINOv2 input (N, size, size, 3), as the reference.

  ``x / 255``, then ``(x - mean) / std`` with the ImageNet mean and std, then
  PyTorch's plain bicubic resize to ``size x size`` (see the module docstring).
  Normalising before resizing is the reference's order. Pure and jittable;
  ``size`` and the shapes are static. ``precision`` is the matmul precision
  of the resize (the default keeps it float32 on accelerators too).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(f"preprocess_raw_image: expected uint8 images (N, H, W, 3), got shape "
                    f"{tuple(images.shape)}")
  if images.dtype != jnp.uint8:
    raise UserError(f"preprocess_raw_image: expected uint8 images, got {images.dtype}")
  size = int(size)
  if size < 1:
    raise UserError(f"preprocess_raw_image: size must be positive, got {size}")
  _, h, w, _ = images.shape
  x = jnp.asarray(images).astype(jnp.float32) / jnp.float32(255.0)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return _resize_2d(x, torch_bicubic_matrix(h, size), torch_bicubic_matrix(w, size), precision)


# ---------------------------------------------------------------------------
# Position embeddings.
# ---------------------------------------------------------------------------


def _square_side(n: int, what: str) -> int:
  m = math.isqrt(max(n, 0))
  if m < 1 or m * m != n:
    raise UserError(f"{what}: {n} patch positions do not form a square grid")
  return m


def resample_abs_pos_embed(pos_embed: np.ndarray, grid: int | Sequence[int],
                           num_prefix_tokens: int = 1) -> np.ndarray:
  """timm's ``resample_abs_pos_embed``: the (1, P + M*M, D) table -> (1, P + gh*gw, D).

  The M x M patch table (row-major) is resized to ``grid`` with PyTorch's
  antialiased bicubic (align_corners=False), the ``num_prefix_tokens`` prefix
  slots are kept as they are; a square table already of that size is returned
  unchanged. Computed in float64 with numpy, returned in the input's dtype.
  """
  pos = np.asarray(pos_embed)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise UserError(f"resample_abs_pos_embed: expected a (1, T, D) table, got {pos.shape}")
  gh, gw = (int(grid), int(grid)) if np.ndim(grid) == 0 else (int(grid[0]), int(grid[1]))
  if gh < 1 or gw < 1:
    raise UserError(f"resample_abs_pos_embed: grid must be positive, got {grid}")
  _, t, d = pos.shape
  if gh * gw + num_prefix_tokens == t and gh == gw:
    return pos.copy()
  m = _square_side(t - num_prefix_tokens, "resample_abs_pos_embed")
  prefix, table = pos[:, :num_prefix_tokens], pos[0, num_prefix_tokens:]
  table = table.astype(np.float64).reshape(m, m, d)
  table = np.einsum("hm,mnd,wn->hwd", torch_bicubic_matrix(m, gh, antialias=True), table,
                    torch_bicubic_matrix(m, gw, antialias=True))
  return np.concatenate([prefix, table.reshape(1, gh * gw, d).astype(pos.dtype)], axis=1)


def interpolate_pos_encoding(pos_embed: Array, grid_hw: tuple[int, int], *,
                             offset: float = 0.1, antialias: bool = False) -> Array:
  """DINOv2's ``interpolate_pos_encoding``: the (1, 1 + M*M, D) table for a (h0, w0) patch grid.

  Returns float32 ``(1, 1 + h0 * w0, D)``; the stored table (as float32) when
  ``(h0, w0) == (M, M)``. Otherwise the patch table is resized with PyTorch's
  bicubic (``antialias`` as given); with ``offset > 0`` the resize is called with
  ``scale_factor = (h0 + offset) / M`` (so source coordinates use that scale),
  with ``offset == 0`` with the output size. The cls slot is kept.
  """
  pos = jnp.asarray(pos_embed).astype(jnp.float32)
  _, t, d = pos.shape
  m = _square_side(t - 1, "pos_embed")
  h0, w0 = int(grid_hw[0]), int(grid_hw[1])
  if (h0, w0) == (m, m):
    return pos

  def weights(out):
    if not offset:
      return torch_bicubic_matrix(m, out, antialias=antialias)
    sf = float(out + offset) / m
    if math.floor(m * sf) != out:  # DINOv2 asserts the same
      raise UserError(f"interpolate_offset {offset}: a {m}-grid scaled by {sf} is not {out} wide")
    return torch_bicubic_matrix(m, out, antialias=antialias, scale_factor=sf)

  table = pos[0, 1:].reshape(m, m, d)
  table = jnp.einsum("hm,mnd,wn->hwd", jnp.asarray(weights(h0), jnp.float32), table,
                     jnp.asarray(weights(w0), jnp.float32), precision=HIGHEST)
  return jnp.concatenate([pos[:, :1], table.reshape(1, h0 * w0, d)], axis=1)


# ---------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------


def _layer_norm(name: str, param_dtype) -> nn.LayerNorm:
  """nn.LayerNorm(eps=1e-6) with scale and bias; two-pass statistics in float32, float32 out."""
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=param_dtype,
                      use_fast_variance=False, name=name)


class _Layers:
  """Fields and layer factories every DINOv2 module shares."""
  dtype: Dtype
  param_dtype: Dtype
  precision: Any

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    precision=self.precision,
                    kernel_init=nn.initializers.truncated_normal(0.02), name=name)


class LayerScale(nn.Module):
  """``x * gamma`` in float32 (``gamma`` (D,), initialised to 1.0 like the hub models)."""
  dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param("gamma", nn.initializers.ones_init(), (self.dim,), self.param_dtype)
    return x.astype(jnp.float32) * gamma.astype(jnp.float32)


class Attention(nn.Module, _Layers):
  """Fused qkv -> (3, heads, head_dim) -> softmax(q k^T / sqrt(head_dim)) v -> proj."""
  dim: int
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, t, d = x.shape
    hd = d // self.num_heads
    qkv = self._dense(3 * d, "qkv")(x).reshape(n, t, 3, self.num_heads, hd)
    o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                      implementation=self.attention_impl)
    return self._dense(d, "proj")(o.reshape(n, t, d))


class Mlp(nn.Module, _Layers):
  """fc1 -> exact (erf) GELU -> fc2."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = self._dense(self.hidden, "fc1")(x)
    self.sow("intermediates", "fc1_out", h)
    h = nn.gelu(h, approximate=False)
    self.sow("intermediates", "act", h)
    return self._dense(self.out, "fc2")(h)


class SwiGLUFFN(nn.Module, _Layers):
  """ViT-g's FFN: ``w3(silu(a) * b)`` with ``a, b = split(w12(x), 2)``."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a, b = jnp.split(self._dense(2 * self.hidden, "w12")(x), 2, axis=-1)
    return self._dense(self.out, "w3")(nn.silu(a) * b)


class Block(nn.Module):
  """``x + ls1 * attn(norm1(x))``, then ``x + ls2 * ffn(norm2(x))``; x float32 in and out."""
  dim: int
  num_heads: int
  ffn_layer: str = "mlp"
  ffn_hidden: int = 3072
  layerscale: bool = True
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def scaled(y, name):
      if self.layerscale:
        return LayerScale(self.dim, self.param_dtype, name=name)(y)
      return y.astype(jnp.float32)

    h = _layer_norm("norm1", self.param_dtype)(x)
    self.sow("intermediates", "norm1_out", h)
    h = Attention(self.dim, self.num_heads, self.attention_impl, name="attn", **kw)(h)
    self.sow("intermediates", "attn_out", h)
    x = x + scaled(h, "ls1")
    self.sow("intermediates", "after_attn", x)
    h = _layer_norm("norm2", self.param_dtype)(x)
    self.sow("intermediates", "norm2_out", h)
    ffn = SwiGLUFFN if self.ffn_layer == "swiglu" else Mlp
    h = ffn(self.ffn_hidden, self.dim, name="mlp", **kw)(h)
    self.sow("intermediates", "mlp_out", h)
    x = x + scaled(h, "ls2")
    self.sow("intermediates", "out", x)
    return x


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = p, no norm; (N, H, W, C) -> (N, H/p * W/p, D) row-major."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="proj")(x)
    n, h, w, d = x.shape
    return x.reshape(n, h * w, d)


class DinoVisionTransformer(nn.Module):
  """DINOv2 backbone; ``__call__(x)`` is the official ``forward_features`` (see module docstring).

  ``pos_grid`` is the side M of the stored position table ``(1, 1 + M*M, D)``;
  inputs whose patch grid is not M x M interpolate it (``interpolate_offset``,
  ``interpolate_antialias``). ``ffn_layer`` is ``"mlp"`` (``ffn_hidden`` = fc1
  width) or ``"swiglu"`` (``ffn_hidden`` = half of w12's width).
  """
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  patch_size: int = 14
  in_chans: int = 3
  pos_grid: int = OFFICIAL_POS_GRID
  num_register_tokens: int = 0
  ffn_layer: str = "mlp"
  ffn_hidden: int = 3072
  layerscale: bool = True
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @property
  def num_prefix_tokens(self) -> int:
    """cls + registers: the patch tokens start at this index of ``x_prenorm``."""
    return 1 + self.num_register_tokens

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    p, d, r = self.patch_size, self.embed_dim, self.num_register_tokens
    if x.ndim != 4 or x.shape[-1] != self.in_chans:
      raise UserError(f"DINOv2: expected input (N, H, W, {self.in_chans}) NHWC, got shape "
                      f"{tuple(x.shape)}")
    n, h, w, _ = x.shape
    if h % p or w % p or h < p or w < p:
      raise UserError(f"DINOv2: input {h}x{w} is not a multiple of the patch size {p}")
    if self.ffn_layer not in ("mlp", "swiglu"):
      raise UserError(f"DINOv2: ffn_layer {self.ffn_layer!r} is not 'mlp' or 'swiglu'")
    if d % self.num_heads:
      raise UserError(f"DINOv2: width {d} is not divisible by {self.num_heads} heads")
    m = self.pos_grid
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d),
                           self.param_dtype)
    pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                           (1, 1 + m * m, d), self.param_dtype)
    registers = (self.param("register_tokens", nn.initializers.normal(1e-6), (1, r, d),
                            self.param_dtype) if r else None)

    patches = PatchEmbed(p, d, self.dtype, self.param_dtype, self.precision,
                         name="patch_embed")(x).astype(jnp.float32)
    self.sow("intermediates", "patches", patches)
    pos = interpolate_pos_encoding(pos_embed, (h // p, w // p), offset=self.interpolate_offset,
                                   antialias=self.interpolate_antialias)
    self.sow("intermediates", "pos", pos)
    parts = [jnp.broadcast_to(cls_token.astype(jnp.float32) + pos[:, :1], (n, 1, d))]
    if registers is not None:
      parts.append(jnp.broadcast_to(registers.astype(jnp.float32), (n, r, d)))
    parts.append(patches + pos[:, 1:])
    tokens = jnp.concatenate(parts, axis=1)
    self.sow("intermediates", "tokens0", tokens)

    for i in range(self.depth):
      tokens = Block(d, self.num_heads, self.ffn_layer, self.ffn_hidden, self.layerscale,
                     self.attention_impl, self.dtype, self.param_dtype, self.precision,
                     name=f"blocks_{i}")(tokens)
    x_norm = _layer_norm("norm", self.param_dtype)(tokens)
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1:1 + r],
        "x_norm_patchtokens": x_norm[:, 1 + r:],
        "x_prenorm": tokens,
    }


def variant(name: str, **overrides) -> DinoVisionTransformer:
  """An official architecture by hub name (``vitb14``, ``dinov2_vitl14_reg``, ...), unloaded.

  ``_reg`` names get 4 register tokens and the ``_reg`` hub models' position
  interpolation (antialias, offset 0). ``overrides`` set any other field
  (``pos_grid``, ``dtype``, ...). For benchmarks and shape checks.
  """
  key = name.removeprefix("dinov2_")
  reg = key.endswith("_reg")
  key = key.removesuffix("_reg")
  if key not in VARIANTS:
    raise UserError(f"DINOv2 variant {name!r}: expected one of {sorted(VARIANTS)} "
                    "(optionally with a dinov2_ prefix and a _reg suffix)")
  fields = dict(VARIANTS[key])
  if reg:
    fields.update(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
  fields.update(overrides)
  return DinoVisionTransformer(**fields)


def repa_features(encoder: DinoVisionTransformer, params, images: Array) -> Array:
  """REPA's target features: uint8 images (N, R, R, 3) -> ``x_norm_patchtokens`` (N, G*G, D).

  Preprocesses to ``repa_input_size(R)`` (the reference reads R from the image
  width) and runs the encoder, whose position grid must already be G (load with
  ``grid=G``). Gradients are stopped: the encoder is frozen.
  """
  size, grid = repa_input_size(images.shape[2])
  if encoder.pos_grid != grid:
    raise UserError(f"DINOv2: {images.shape[2]}-pixel images need an encoder loaded with "
                    f"grid={grid}, this one has grid {encoder.pos_grid}")
  x = preprocess_raw_image(images, size)
  out = encoder.apply({"params": params}, x)["x_norm_patchtokens"]
  return jax.lax.stop_gradient(out)


# ---------------------------------------------------------------------------
# Checkpoint conversion and loading.
# ---------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^blocks_(\d+)$")
_CHUNKED_RE = re.compile(r"^blocks\.\d+\.(\d+)\.")
_BLOCK_KEY_RE = re.compile(r"^blocks\.(\d+)\.")


def abstract_params(encoder: DinoVisionTransformer) -> dict:
  """The parameter tree of ``encoder`` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  s = encoder.patch_size * encoder.pos_grid
  x = jax.ShapeDtypeStruct((1, s, s, encoder.in_chans), jnp.float32)
  return jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x)["params"]


def flax_path_to_torch_key(path: Sequence[str]) -> str:
  """``('blocks_3', 'attn', 'qkv', 'kernel')`` -> ``'blocks.3.attn.qkv.weight'``."""
  parts = []
  for name in path[:-1]:
    mt = _BLOCK_RE.match(name)
    parts.extend(["blocks", mt.group(1)] if mt else [name])
  leaf = path[-1]
  parts.append("weight" if (leaf in ("kernel", "scale") and len(path) > 1) else leaf)
  return ".".join(parts)


def expected_state_dict_shapes(encoder: DinoVisionTransformer) -> dict[str, tuple[int, ...]]:
  """Every checkpoint key the encoder needs and its PyTorch shape (``mask_token`` excluded)."""
  return {flax_path_to_torch_key(p): torch_shape(p, a.shape)
          for p, a in flatten_tree(abstract_params(encoder))}


def _unchunk(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """``blocks.<chunk>.<N>.x`` (saved with block_chunks > 0) -> ``blocks.<N>.x``.

  Only when no ``blocks.<N>.<module>`` key exists, so a flat file is never
  renamed.
  """
  keys = [k for k in state_dict if k.startswith("blocks.")]
  if not keys or not all(_CHUNKED_RE.match(k) for k in keys):
    return dict(state_dict)
  return {_CHUNKED_RE.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str,
                           num_heads: Optional[int] = None) -> dict[str, Any]:
  """Architecture fields of ``DinoVisionTransformer`` read from the tensor shapes.

  Width, patch size and channels from ``patch_embed.proj.weight`` (else
  ``cls_token``), position grid from ``pos_embed``, depth from the ``blocks.N``
  keys, registers from ``register_tokens``, the FFN kind and width from
  ``blocks.0.mlp.fc1`` / ``blocks.0.mlp.w12``, LayerScale from ``ls1.gamma``;
  heads from the official width table unless ``num_heads`` is given. Register
  models get the ``_reg`` hub models' position interpolation (antialias,
  offset 0), the others the plain models' (offset 0.1, no antialias).
  Anything missing here is reported by the key check that follows.
  """
  sd = state_dict

  def shape(key):
    return tuple(sd[key].shape) if key in sd else None

  proj = shape("patch_embed.proj.weight")
  if proj is not None and len(proj) == 4 and proj[2] == proj[3]:
    d, in_chans, patch = proj[0], proj[1], proj[2]
  else:
    in_chans, patch = 3, 14
    cls = shape("cls_token")
    if cls is None or not cls:
      raise ConversionError(
          f"{source}: not a DINOv2 backbone state_dict (no usable patch_embed.proj.weight or "
          f"cls_token; {len(sd)} keys, e.g. {', '.join(sorted(sd)[:5]) or 'none'})")
    d = cls[-1]
  depth = 1 + max((int(mt.group(1)) for mt in map(_BLOCK_KEY_RE.match, sd) if mt), default=-1)
  if depth == 0:
    raise ConversionError(f"{source}: not a DINOv2 backbone state_dict (no blocks.N.* keys)")
  pos = shape("pos_embed")
  if pos is not None:
    if len(pos) != 3:
      raise ConversionError(f"{source}: pos_embed has shape {pos}, expected (1, 1 + M*M, {d})")
    m = math.isqrt(max(pos[1] - 1, 0))
    if m < 1 or m * m != pos[1] - 1:
      raise ConversionError(f"{source}: pos_embed has {pos[1]} slots: not 1 + M*M for a square "
                            "grid (one prefix slot, the cls token)")
  else:
    m = OFFICIAL_POS_GRID
  reg = shape("register_tokens")
  r = reg[1] if reg is not None and len(reg) == 3 else 0
  fc1, w12 = shape("blocks.0.mlp.fc1.weight"), shape("blocks.0.mlp.w12.weight")
  if w12 is not None and fc1 is None:
    ffn_layer, ffn_hidden = "swiglu", w12[0] // 2
  else:
    ffn_layer, ffn_hidden = "mlp", (fc1[0] if fc1 is not None else 4 * d)
  if num_heads is None:
    if d not in OFFICIAL_NUM_HEADS:
      table = ", ".join(f"{k}->{v} heads" for k, v in OFFICIAL_NUM_HEADS.items())
      raise ConversionError(
          f"{source}: width {d} is not an official DINOv2 width ({table}); pass num_heads")
    num_heads = OFFICIAL_NUM_HEADS[d]
  num_heads = int(num_heads)
  if num_heads < 1 or d % num_heads:
    raise ConversionError(f"{source}: width {d} is not divisible by num_heads={num_heads}")
  return dict(embed_dim=int(d), depth=int(depth), num_heads=num_heads, patch_size=int(patch),
              in_chans=int(in_chans), pos_grid=int(m), num_register_tokens=int(r),
              ffn_layer=ffn_layer, ffn_hidden=int(ffn_hidden),
              layerscale="blocks.0.ls1.gamma" in sd,
              interpolate_offset=0.0 if r else 0.1, interpolate_antialias=bool(r))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], encoder: DinoVisionTransformer,
                       source: str = "state_dict") -> dict:
  """Official DINOv2 ``{key: array}`` -> Flax params (nested dict of numpy arrays).

  Checks every key and shape first: one ``ConversionError`` lists the missing,
  unexpected and mis-shaped keys. ``mask_token`` (1, D) is accepted and
  dropped. Weights are transposed to Flax layouts; dtypes are kept.
  """
  abstract = abstract_params(encoder)
  expected = {flax_path_to_torch_key(p): torch_shape(p, a.shape) for p, a in flatten_tree(abstract)}
  if "mask_token" in state_dict:
    expected["mask_token"] = (1, encoder.embed_dim)
  check_state_dict(expected, state_dict, source)
  return tree_from_state_dict(state_dict, (p for p, _ in flatten_tree(abstract)),
                              flax_path_to_torch_key)


def load_dinov2(path: str, grid: Optional[int] = None, *, num_heads: Optional[int] = None,
                dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                precision: Any = None, attention_impl: Optional[str] = None,
                interpolate_offset: Optional[float] = None,
                interpolate_antialias: Optional[bool] = None
                ) -> tuple[DinoVisionTransformer, dict]:
  """Loads an official DINOv2 backbone file -> ``(encoder, params)``.

  ``path``: a ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` (flat state_dict,
  read without unpickling code) or a ``.safetensors`` with the same keys. The
  architecture comes from the tensors (see ``config_from_state_dict``);
  ``num_heads`` overrides the official width -> heads table (needed for other
  widths). ``grid=None`` keeps the stored position table (inputs of another
  size interpolate it at apply time, as DINOv2 does); ``grid=G`` resamples it
  once, here, to G x G as the reference does for REPA (G = 16 at 256 pixels,
  see ``repa_input_size``), and inputs are then ``14 * G`` pixels square.
  ``dtype`` is the compute dtype, ``param_dtype`` the dtype of the returned
  parameters; ``interpolate_offset`` / ``interpolate_antialias`` override the
  apply-time interpolation inferred from the registers.

  Raises ``ConversionError`` (one line) for an unreadable file or keys and
  shapes that do not fit (missing, unexpected and mis-shaped keys listed).
  """
  path_str = str(path)
  obj = load_weights_file(path_str)
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path_str}: expected a flat DINOv2 state_dict, got "
                          f"{type(obj).__name__}")
  state_dict = _unchunk(flat_state_dict(obj, path_str))
  config = config_from_state_dict(state_dict, path_str, num_heads)
  if interpolate_offset is not None:
    config["interpolate_offset"] = float(interpolate_offset)
  if interpolate_antialias is not None:
    config["interpolate_antialias"] = bool(interpolate_antialias)
  encoder = DinoVisionTransformer(**config, attention_impl=attention_impl,
                                  dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                  precision=precision)
  params = convert_state_dict(state_dict, encoder, path_str)
  if grid is not None:
    if isinstance(grid, bool) or int(grid) != grid or int(grid) < 1:
      raise UserError(f"load_dinov2: grid must be a positive integer, got {grid!r}")
    params["pos_embed"] = resample_abs_pos_embed(params["pos_embed"], int(grid))
    encoder = encoder.clone(pos_grid=int(grid))
  pdt = jnp.dtype(param_dtype)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, dtype=pdt)), params)
  return encoder, params
