"""The DeepFlow network (SiT backbone split into K deeply supervised branches).

Pure Flax linen modules that return what they compute. Everything here follows
``docs/architecture.md`` (the reference PyTorch code) exactly; the parameter
tree is a mechanical rename of the reference ``state_dict``:

* ``ModuleList`` entries become ``<name>_<i>`` (``blocks.3`` -> ``blocks_3``,
  ``df_blocks.0`` -> ``df_blocks_0``, ``final_layer.1`` -> ``final_layer_1``,
  ``projectors.0`` -> ``projectors_0``);
* ``nn.Sequential`` entries become ``<name>/layers_<i>`` (``t_embedder.mlp.0`` ->
  ``t_embedder/mlp/layers_0``, ``adaLN_modulation.1`` ->
  ``adaLN_modulation/layers_1``, ``acc_mlp.6`` -> ``acc_mlp/layers_6``);
* Linear ``weight`` (out, in) -> Dense ``kernel`` (in, out); Conv2d ``weight``
  (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O); LayerNorm ``weight`` -> ``scale``;
  Embedding ``weight`` -> ``embedding``; ``multihead_attn.in_proj_weight`` ->
  ``multihead_attn/in_proj/kernel``.

``pos_embed`` is not a parameter: it is the fixed 2D sin-cos table, recomputed
here (the converter checks the checkpoint's copy against it).

Arrays are NHWC at the public boundary. ``dtype`` is the compute dtype,
``param_dtype`` the storage dtype of parameters. Parameters carry logical axis
names (see ``LOGICAL_AXES``) so sharding rules from the config can map them to
mesh axes.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Logical axis names used by the parameters (map them to mesh axes with rules):
#   "embed"  the model width D (or 2D for the time-gap path) on the input side
#   "mlp"    any expanded hidden width (4D MLP, 3D qkv, 6D adaLN, P projector)
#   "hidden" the other side of hidden-to-hidden matrices (no name twice in one array)
#   "vocab"  label-table rows;  "patch" patch features (p*p*C);  "freq" the
#   256 timestep frequency features;  "norm" LayerNorm vectors.
LOGICAL_AXES = ("embed", "mlp", "hidden", "vocab", "patch", "freq", "norm")

# Dtype names used by configs, model.json and command lines.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}

LN_EPS = 1e-6  # every non-affine LayerNorm of the reference
AFFINE_LN_EPS = 1e-5  # torch nn.LayerNorm default: cross-attention LN, qk-norm

# ``DeepFlow.remat``: what each SiT / VeRA block keeps from its forward pass for the
# backward pass. "none": everything XLA keeps; "block": only the block's inputs, the
# rest is recomputed (``jax.checkpoint`` per block); "dots": the outputs of matmuls
# without batch dimensions (every Dense: qkv, proj, MLP, adaLN) are kept, attention
# scores and element-wise results recomputed. Parameter names and values are the same
# under every policy.
REMAT_POLICIES = {"none": None, "block": None,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


# ---------------------------------------------------------------------------
# Initialisers (the reference's; docs/architecture.md) with logical axis annotations.
# ---------------------------------------------------------------------------

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()
normal_002 = nn.initializers.normal(stddev=0.02)


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str, str], *, name: str, dtype, param_dtype,
          zero_init: bool = False, kernel_init=None) -> nn.Dense:
  """nn.Dense with the reference's init (xavier / zero) and logical axes."""
  if kernel_init is None:
    kernel_init = zeros if zero_init else xavier_uniform
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=_part(kernel_init, names),
      bias_init=_part(zeros, (names[1],)),
      name=name,
  )


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x * (1 + scale) + shift, shift/scale (N, W) broadcast over tokens."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def layer_norm(name: str | None = None) -> nn.LayerNorm:
  """The reference's LayerNorm(eps=1e-6, no affine), statistics in float32."""
  return nn.LayerNorm(epsilon=LN_EPS, use_scale=False, use_bias=False, dtype=jnp.float32,
                      name=name)


def affine_layer_norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
  """torch nn.LayerNorm(eps=1e-5) with scale and bias."""
  del dtype  # statistics in float32, result cast by the caller
  return nn.LayerNorm(
      epsilon=AFFINE_LN_EPS,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      scale_init=_part(ones, ("norm",)),
      bias_init=_part(zeros, ("norm",)),
      name=name,
  )


# ---------------------------------------------------------------------------
# Fixed positions and (un)patchify.
# ---------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """The reference's fixed 2D sin-cos table, (grid*grid, dim) float32.

  First half of the channels encodes the column index, second half the row
  index; each half is [sin | cos]. Token n sits at row n // grid, column n % grid.
  """
  if dim % 4:
    raise ValueError(f"hidden size {dim} must be divisible by 4 for 2D sin-cos positions")
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def unpatchify(x: Array, p: int, c: int) -> Array:
  """(N, T, p*p*C) tokens (row-major) -> (N, H, W, C); each token ordered (row off, col off, C)."""
  g = int(round(math.sqrt(x.shape[1])))
  return einops.rearrange(x, "n (h w) (p q c) -> n (h p) (w q) c", h=g, w=g, p=p, q=p, c=c)


# ---------------------------------------------------------------------------
# Embedders.
# ---------------------------------------------------------------------------


def timestep_features(t: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """[cos(t f_k) | sin(t f_k)], f_k = exp(-ln(max_period) k / (dim/2)); float32. t in [0,1], unscaled."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Frequency features (256) -> Linear(W) -> SiLU -> Linear(W). Keys: mlp/layers_{0,2}."""
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  frequency_dim: int = 256

  @nn.compact
  def __call__(self, t: Array) -> Array:
    f = timestep_features(t, self.frequency_dim).astype(self.dtype)
    mlp = MLPSeq(features=(self.width, self.width), names=(("freq", "embed"), ("embed", "hidden")),
                 indices=(0, 2), kernel_init=normal_002, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="mlp")
    return mlp(f)


class MLPSeq(nn.Module):
  """Linear layers with SiLU between them, named like an nn.Sequential (layers_<i>)."""
  features: Sequence[int]
  names: Sequence[tuple[str, str]]
  indices: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for n, (feat, names, idx) in enumerate(zip(self.features, self.names, self.indices)):
      if n:
        x = nn.silu(x)
      x = dense(feat, names, name=f"layers_{idx}", dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=self.kernel_init)(x)
    return x


class LabelEmbedder(nn.Module):
  """Label table (num_classes + 1, D); row ``num_classes`` is the null label.

  With ``train=True`` and ``dropout_prob > 0`` each label is replaced by the
  null label with probability ``dropout_prob``, drawn from the
  ``"label_dropout"`` rng stream.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array, train: bool) -> Array:
    table = nn.Embed(
        self.num_classes + 1,
        self.hidden_size,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=_part(normal_002, ("vocab", "embed")),
        name="embedding_table",
    )
    y = jnp.asarray(y, jnp.int32)
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    return table(y)


class PatchEmbed(nn.Module):
  """Conv(k=s=p) patch embedding; (N,H,W,C) -> (N, T, D), tokens row-major."""
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    # xavier over the reference's flattened (D, C*p*p) view: fan_in = p*p*C, fan_out = D.
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                            out_axis=3)
    x = nn.Conv(
        self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_part(init, (None, None, "patch", "embed")),
        bias_init=_part(zeros, ("embed",)), name="proj")(x)
    return einops.rearrange(x, "n h w d -> n (h w) d")


# ---------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------


def attention(q: Array, k: Array, v: Array, implementation: Optional[str]) -> Array:
  """softmax(q k^T / sqrt(hd)) v on (N, T, heads, hd) via jax.nn.dot_product_attention.

  ``implementation``: None (XLA picks), "xla", or "cudnn" (flash attention on
  NVIDIA GPUs; needs bf16/fp16 inputs).
  """
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nn.Module):
  """timm Attention: fused qkv, optional per-head qk LayerNorm, output proj."""
  hidden_size: int
  num_heads: int
  qk_norm: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, t, d = x.shape
    hd = d // self.num_heads
    qkv = dense(3 * d, ("embed", "mlp"), name="qkv", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)
    qkv = qkv.reshape(n, t, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q = affine_layer_norm("q_norm", self.dtype, self.param_dtype)(q).astype(self.dtype)
      k = affine_layer_norm("k_norm", self.dtype, self.param_dtype)(k).astype(self.dtype)
    o = attention(q, k, v, self.attention_impl).reshape(n, t, d)
    return dense(d, ("mlp", "embed"), name="proj", dtype=self.dtype,
                 param_dtype=self.param_dtype)(o)


class Mlp(nn.Module):
  """fc1 -> GELU(tanh) -> fc2."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = dense(self.hidden, ("embed", "mlp"), name="fc1", dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    x = nn.gelu(x, approximate=True)
    return dense(self.out, ("mlp", "embed"), name="fc2", dtype=self.dtype,
                 param_dtype=self.param_dtype)(x)


class AdaLN(nn.Module):
  """``adaLN_modulation`` = Sequential(SiLU, Linear(W, chunks*out)); zero-initialised."""
  out: int
  chunks: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c: Array) -> list[Array]:
    m = dense(self.chunks * self.out, ("embed", "mlp"), name="layers_1", dtype=self.dtype,
              param_dtype=self.param_dtype, zero_init=True)(nn.silu(c))
    return jnp.split(m, self.chunks, axis=-1)


# ---------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------


class SiTBlock(nn.Module):
  """adaLN-Zero transformer block."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLN(
        self.hidden_size, 6, name="adaLN_modulation", **kw)(c)
    h = modulate(layer_norm()(x).astype(self.dtype), shift_msa, scale_msa)
    x = x + gate_msa[:, None] * Attention(self.hidden_size, self.num_heads, self.qk_norm,
                                          self.attention_impl, name="attn", **kw)(h)
    h = modulate(layer_norm()(x).astype(self.dtype), shift_mlp, scale_mlp)
    x = x + gate_mlp[:, None] * Mlp(int(self.hidden_size * self.mlp_ratio), self.hidden_size,
                                    name="mlp", **kw)(h)
    return x


class FinalLayer(nn.Module):
  """Velocity / acceleration head: adaLN (shift, scale) -> LN -> Linear(p*p*C). Zero-initialised."""
  hidden_size: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale = AdaLN(self.hidden_size, 2, name="adaLN_modulation", **kw)(c)
    x = modulate(layer_norm()(x).astype(self.dtype), shift, scale)
    return dense(self.out_features, ("embed", "patch"), name="linear", zero_init=True, **kw)(x)


class CrossAttention(nn.Module):
  """VeRA cross-space attention: ONE shared affine LN on query and key/value.

  out = LN(s) + MHA(LN(s), LN(r), LN(r)) (the residual is the normalised query).
  torch nn.MultiheadAttention layout: in_proj rows [Wq; Wk; Wv].
  """
  hidden_size: int
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s: Array, r: Array) -> Array:
    d = self.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = affine_layer_norm("layer_norm", self.dtype, self.param_dtype)
    q_in = ln(s).astype(self.dtype)
    kv_in = ln(r).astype(self.dtype)
    mha = _MultiheadAttention(d, self.num_heads, self.attention_impl, name="multihead_attn", **kw)
    return q_in + mha(q_in, kv_in)


class _MultiheadAttention(nn.Module):
  hidden_size: int
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: Array, kv_in: Array) -> Array:
    d, nh = self.hidden_size, self.num_heads
    hd = d // nh
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # One (D, 3D) matrix, xavier-initialised as a whole (torch's in_proj_weight).
    q, k, v = _InProj(d, name="in_proj", **kw)(q_in, kv_in)
    n, tq, _ = q.shape
    tk = k.shape[1]
    o = attention(q.reshape(n, tq, nh, hd), k.reshape(n, tk, nh, hd), v.reshape(n, tk, nh, hd),
                  self.attention_impl).reshape(n, tq, d)
    return dense(d, ("mlp", "embed"), name="out_proj", **kw)(o)


class _InProj(nn.Module):
  """Packed q/k/v projection; kernel (D, 3D) = in_proj_weight^T, bias (3D,)."""
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: Array, kv_in: Array) -> tuple[Array, Array, Array]:
    d = self.hidden_size
    kernel = self.param("kernel", _part(xavier_uniform, ("embed", "mlp")), (d, 3 * d),
                        self.param_dtype)
    bias = self.param("bias", _part(zeros, ("mlp",)), (3 * d,), self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    bias = jnp.asarray(bias, self.dtype)
    q = q_in @ kernel[:, :d] + bias[:d]
    k = kv_in @ kernel[:, d:2 * d] + bias[d:2 * d]
    v = kv_in @ kernel[:, 2 * d:] + bias[2 * d:]
    return q, k, v


class TimeGapModulation(nn.Module):
  """VeRA ``acc_norm``: adaLN on concat([v, a]) by the time-gap embedding, then an MLP."""
  hidden_size: int
  legacy_scaling: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: Array, e: Array) -> Array:
    d2 = 2 * self.hidden_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale = AdaLN(d2, 2, name="adaLN_modulation", **kw)(e)
    if self.legacy_scaling:
      scale = jnp.clip(scale, -5.0, 5.0)
    h = modulate(layer_norm()(u).astype(self.dtype), shift, scale)
    return Mlp(d2, self.hidden_size, name="mlp", **kw)(h)


class VeRABlock(nn.Module):
  """Velocity refiner between branches: acceleration MLP, time-gap modulation, cross-space attention.

  Inputs: v the SiT stream (N,T,D), s the patch tokens (N,T,D), e the time-gap
  embedding (N,2D). Returns (a, s') with a the acceleration features and s' the
  new stream.
  """
  hidden_size: int
  num_heads: int
  projector_dim: int
  legacy_scaling: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, v: Array, s: Array, e: Array) -> tuple[Array, Array]:
    d, p = self.hidden_size, self.projector_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    a = MLPSeq(features=(p, 2 * p, p, d),
               names=(("embed", "mlp"), ("hidden", "mlp"), ("mlp", "hidden"), ("mlp", "embed")),
               indices=(0, 2, 4, 6), name="acc_mlp", **kw)(v)
    u = jnp.concatenate([v, a], axis=-1)
    r = TimeGapModulation(d, self.legacy_scaling, name="acc_norm", **kw)(u, e)
    return a, CrossAttention(d, self.num_heads, self.attention_impl, name="cross_attention",
                             **kw)(s, r)


# ---------------------------------------------------------------------------
# DeepFlow.
# ---------------------------------------------------------------------------


class DeepFlow(nn.Module):
  """DeepFlow: a SiT split into K = len(df_idxs) + 1 deeply supervised branches.

  ``df_idxs`` are 1-based layer counts after which a branch ends (a velocity
  head) and a VeRA block starts the next branch; ``df_idxs=()`` is plain SiT.

  ``__call__(x, t, y, train=False)``:
    x: (N, H, W, C) NHWC input at time t[0];
    t: a sequence of K arrays of shape (N,), one time per branch;
    y: (N,) int labels, ``num_classes`` = the null label;
  returns ``(velocities, accelerations, zs)``: lists of K, K-1 and (ssl_align)
  K-1 arrays; velocities and accelerations (N, H, W, C) float32, zs (N, T, z_dim).
  With ``train=True``, label dropout draws from the ``"label_dropout"`` rng stream.
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  df_idxs: Sequence[int] = (8, 16)
  projector_dim: int = 2048
  ssl_align: bool = False
  z_dim: int = 768
  legacy_scaling: bool = False
  qk_norm: bool = False
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # a key of REMAT_POLICIES (training memory; not architecture)

  @property
  def num_branches(self) -> int:
    return len(self.df_idxs) + 1

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch_size)**2

  def setup(self):
    validate_architecture(self)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.hidden_size
    out = self.patch_size**2 * self.in_channels
    sit_block, vera_block = SiTBlock, VeRABlock
    if self.remat != "none":  # same module names, so the same parameter tree
      policy = REMAT_POLICIES[self.remat]
      sit_block = nn.remat(SiTBlock, policy=policy)
      vera_block = nn.remat(VeRABlock, policy=policy)
    self.x_embedder = PatchEmbed(self.patch_size, d, **kw)
    self.t_embedder = TimestepEmbedder(d, **kw)
    self.y_embedder = LabelEmbedder(self.num_classes, d, self.class_dropout_prob, **kw)
    self.blocks = [
        sit_block(d, self.num_heads, self.mlp_ratio, self.qk_norm, self.attention_impl, **kw)
        for _ in range(self.depth)
    ]
    self.final_layer = [FinalLayer(d, out, **kw) for _ in range(2)]
    if self.df_idxs:
      self.dt_embedder = TimestepEmbedder(2 * d, **kw)
      self.df_blocks = [
          vera_block(d, self.num_heads, self.projector_dim, self.legacy_scaling,
                    self.attention_impl, **kw) for _ in self.df_idxs
      ]
      self.final_acc_layer = FinalLayer(d, out, **kw)
      if self.ssl_align:
        self.projectors = [
            MLPSeq(features=(self.projector_dim, self.projector_dim, self.z_dim),
                   names=(("embed", "mlp"), ("hidden", "mlp"), ("mlp", "embed")),
                   indices=(0, 2, 4), **kw) for _ in self.df_idxs
        ]

  def _embed(self, x: Array, y: Array, train: bool) -> tuple[Array, Array]:
    if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(
          f"x must be (N, {self.input_size}, {self.input_size}, {self.in_channels}) NHWC, "
          f"got {x.shape}")
    pos = sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
    s = self.x_embedder(x.astype(self.dtype)) + jnp.asarray(pos, self.dtype)[None]
    self.sow("intermediates", "patch_tokens", s)
    e_y = self.y_embedder(y, train)
    return s, e_y

  def _head(self, head: FinalLayer, h: Array, c: Array) -> Array:
    return unpatchify(head(h, c), self.patch_size, self.in_channels).astype(jnp.float32)

  def __call__(self, x: Array, t: Sequence[Array], y: Array, train: bool = False):
    t = list(t)
    if len(t) != self.num_branches:
      raise ValueError(f"t must hold {self.num_branches} time arrays (one per branch), got {len(t)}")
    s, e_y = self._embed(x, y, train)
    c = self.t_embedder(t[0]) + e_y
    h = s
    velocities, accelerations, zs = [], [], []
    j = 0
    for i, block in enumerate(self.blocks, start=1):
      h = block(h, c)
      if i in self.df_idxs:
        velocities.append(self._head(self.final_layer[0], h, c))
        a, h = self.df_blocks[j](h, s, self.dt_embedder(t[j + 1] - t[j]))
        accelerations.append(self._head(self.final_acc_layer, a, c))
        c = self.t_embedder(t[j + 1]) + e_y
        if self.ssl_align:
          zs.append(self.projectors[j](h).astype(jnp.float32))
        j += 1
    velocities.append(self._head(self.final_layer[1], h, c))
    return velocities, accelerations, zs

  def velocity(self, x: Array, t: Array, y: Array) -> Array:
    """Final-branch velocity with every branch at the same time t (N,); what samplers use.

    Skips the intermediate velocity heads, the acceleration head and the
    projectors: only the work the final velocity depends on is done.
    """
    s, e_y = self._embed(x, y, False)
    c = self.t_embedder(t) + e_y
    h = s
    if self.df_idxs:
      gap = self.dt_embedder(jnp.zeros_like(jnp.asarray(t, jnp.float32)))
    j = 0
    for i, block in enumerate(self.blocks, start=1):
      h = block(h, c)
      if i in self.df_idxs:
        _, h = self.df_blocks[j](h, s, gap)
        j += 1
    return self._head(self.final_layer[1], h, c)

  def velocity_and_acceleration(self, x: Array, t: Array,
                                y: Array) -> tuple[list[Array], list[Array]]:
    """Every velocity and acceleration head with every branch at the same time t (N,).

    What the acceleration-aware samplers use (``docs/sampling.md``): one
    forward pass with time gap 0 at every VeRA block, as ``velocity``, but also
    evaluating the intermediate velocity heads and the acceleration head after
    each VeRA block. Returns ``(velocities, accelerations)``: lists of K and
    K - 1 arrays (N, H, W, C) float32, equal to the first two outputs of
    ``__call__(x, [t] * K, y)``. The projectors are not computed; under ``jit``
    heads whose output is unused are dropped. Raises ValueError for a model
    without splits (plain SiT has no acceleration head).
    """
    if not self.df_idxs:
      raise ValueError("this model has no VeRA blocks (df_idxs=()), so it predicts no "
                       "acceleration: use a sampler without 'accel' in its name")
    s, e_y = self._embed(x, y, False)
    c = self.t_embedder(t) + e_y
    gap = self.dt_embedder(jnp.zeros_like(jnp.asarray(t, jnp.float32)))
    h = s
    velocities, accelerations = [], []
    j = 0
    for i, block in enumerate(self.blocks, start=1):
      h = block(h, c)
      if i in self.df_idxs:
        velocities.append(self._head(self.final_layer[0], h, c))
        a, h = self.df_blocks[j](h, s, gap)
        accelerations.append(self._head(self.final_acc_layer, a, c))
        j += 1
    velocities.append(self._head(self.final_layer[1], h, c))
    return velocities, accelerations


def architecture_problems(m, prefix: str = "") -> list[str]:
  """Every inconsistent architecture value of ``m`` (a DeepFlow or config.model), named.

  ``prefix`` is prepended to field names (``"model."`` for configs).
  """
  p, problems = prefix, []
  if m.hidden_size % m.num_heads:
    problems.append(f"{p}hidden_size={m.hidden_size} is not divisible by "
                    f"{p}num_heads={m.num_heads}")
  if m.hidden_size % 4:
    problems.append(f"{p}hidden_size={m.hidden_size} must be divisible by 4 (2D sin-cos "
                    "positions)")
  if m.input_size % m.patch_size:
    problems.append(f"{p}input_size={m.input_size} is not divisible by "
                    f"{p}patch_size={m.patch_size}")
  idxs = [int(i) for i in m.df_idxs]
  if idxs != sorted(set(idxs)):
    problems.append(f"{p}df_idxs={idxs} must be strictly increasing")
  bad = [i for i in idxs if not 1 <= i < m.depth]
  if bad:
    problems.append(f"{p}df_idxs={idxs}: split layer(s) {bad} beyond the depth "
                    f"(valid 1..{m.depth - 1} for {p}depth={m.depth})")
  return problems


def validate_architecture(m) -> None:
  """Raises ValueError naming every inconsistent architecture value."""
  problems = architecture_problems(m)
  if problems:
    raise ValueError("; ".join(problems))
