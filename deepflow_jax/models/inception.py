"""The FID Inception-v3 network in Flax linen, computing the ADM evaluation suite's features.

Every FID / sFID / Inception Score that DeepFlow, SiT and REPA report comes from
the ADM evaluation suite, which runs the 2015 TensorFlow Inception graph
(``classify_image_graph_def.pb``). This module is that network: the
architecture of pytorch-fid's ``fid_inception_v3`` (torchvision's Inception-v3
with the FID patches: the average pools of the A, C and first E blocks ignore
the zero padding, and the last E block's pool branch is a *max* pool),
evaluation-mode batch norm (eps 1e-3), loaded from pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth`` or from the TF graph itself
(:mod:`deepflow_jax.models.inception_tf`).

``FIDInception().apply({"params": params}, images)`` takes NHWC images of any
size, ``uint8`` or float in ``[0, 255]``, 3 channels, and returns a dict of
float32 arrays:

* ``"pool"`` ``(N, 2048)``: the global average pool after ``Mixed_7c``
  (TF ``pool_3:0``), the FID features;
* ``"spatial"`` ``(N, 2023)``: the sFID features: ``Mixed_6d.branch1x1``'s output
  (1x1 conv + BN + ReLU, TF ``mixed_6/conv:0``), NHWC ``17 x 17 x 192``, its first
  7 channels, flattened in (h, w, c) order;
* ``"logits"`` ``(N, 1008)``: ``pool @ fc.weight.T`` *without* the fc bias (TF
  ``softmax/logits/MatMul``), what ADM feeds to the softmax for the Inception
  Score;
* ``"probs"`` ``(N, 1008)``: ``softmax(logits)``.

Preprocessing (``preprocessing=``):

* ``"adm"`` (default; what the ADM suite's numbers use): the float32 ``[0, 255]``
  image is resized to 299x299 with TF1's legacy bilinear resize
  (``align_corners=False``, ``half_pixel_centers=False``: source coordinate
  ``dst * in / out``, no half-pixel offset), then ``(x - 128) * 0.0078125``;
* ``"pytorch_fid"``: ``x / 255``, torch's bilinear resize to 299x299
  (``align_corners=False``: half-pixel centres, coordinates clamped at 0, no
  antialiasing), then ``2 x - 1``. Features differ from ADM's by a few percent
  (pool) to ~20% (spatial) on the same image, so FIDs are not comparable;
* ``"none"``: the images already are the network input (float, 299x299 for the
  feature sizes above, in the network's range), e.g. from :func:`preprocess`.

Both resizes are separable interpolation matrices built in numpy at trace time
(:func:`resize_tf1_bilinear`, :func:`resize_torch_bilinear`), applied with
float32 matmuls at ``Precision.HIGHEST``: exact, jittable and batch-shardable.

Parameter names follow the checkpoint keys: ``Mixed_6d.branch1x1.conv.weight``
-> ``params["Mixed_6d"]["branch1x1"]["conv"]["kernel"]`` (OIHW -> HWIO);
``<layer>.bn.{weight, bias, running_mean, running_var}`` ->
``params[...][layer]["bn"]["scale" | "bias" | "mean" | "var"]``; ``fc.weight``
``(1008, 2048)`` -> ``params["fc"]["kernel"]`` ``(2048, 1008)``; ``fc.bias`` ->
``params["fc"]["bias"]`` (kept, unused by the outputs). ``*.num_batches_tracked``
buffers are ignored. Batch norm uses the running statistics:
``y = conv(x) * a + b`` with ``a = scale / sqrt(var + 1e-3)``,
``b = bias - mean * a`` (computed in float32), then ReLU.

Intermediate maps are sown into the ``"intermediates"`` collection (only when
the caller makes it mutable, so the plain call pays nothing):
``model.apply(v, x, mutable=["intermediates"])`` adds ``maxpool1``
``(N, 73, 73, 64)``, ``maxpool2`` ``(N, 35, 35, 192)``, every block's output as
``Mixed_5b_output`` .. ``Mixed_7c_output`` (NHWC), and ``input`` (the preprocessed
299x299 network input).

The network's convolutions and matmuls run at ``precision="highest"`` by
default, so float32 features are float32-exact on GPUs (no TF32) and TPUs (no
single-pass bf16) as on CPUs; the network is ~11 GFLOP per image, small
next to generating the image. ``dtype=jnp.bfloat16`` computes the network in
bfloat16 (preprocessing and outputs stay float32).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepflow_jax.errors import UserError
from deepflow_jax.models import inception_tf
from deepflow_jax.sharding import data_mesh
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import check_state_dict
from deepflow_jax.torch_io import flat_state_dict
from deepflow_jax.torch_io import flatten_tree
from deepflow_jax.torch_io import load_weights_file
from deepflow_jax.torch_io import to_torch_layout
from deepflow_jax.torch_io import torch_shape
from deepflow_jax.torch_io import tree_from_state_dict

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7  # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3
PREPROCESSINGS = ("adm", "pytorch_fid", "none")
_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# ---------------------------------------------------------------------------
# Resizing: separable interpolation matrices.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def tf1_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out_size, in_size)`` float32 matrix of TF1's legacy bilinear resize along one axis.

  ``align_corners=False, half_pixel_centers=False``: source coordinate
  ``src = dst * (in / out)`` (float32), ``i0 = floor(src)``,
  ``i1 = min(i0 + 1, in - 1)``, weights ``1 - f`` and ``f`` with ``f = src - i0``
  (a single weight 1 where ``i0 == i1``).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0.astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  same = i0 == i1
  m[rows, i0] = np.where(same, np.float32(1), np.float32(1) - frac)
  m[rows[~same], i1[~same]] = frac[~same]
  return m


@functools.lru_cache(maxsize=64)
def torch_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out_size, in_size)`` float32 matrix of torch's bilinear ``F.interpolate`` along one axis.

  ``align_corners=False``, no antialiasing: ``src = max((dst + 0.5) * (in / out)
  - 0.5, 0)`` (float32, one rounding), ``i0 = floor(src)``, ``i1 = i0 + 1`` unless ``i0`` is the
  last index, weights ``1 - f`` and ``f`` with ``f = src - i0`` (both on the last
  index when ``i0 == i1``, as torch adds the two products).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  # torch's kernel rounds scale * (dst + 0.5) - 0.5 once (a fused multiply-add): the
  # float64 product of two float32 values is exact, so one rounding to float32 follows.
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * np.float64(scale) - 0.5
  src = np.maximum(src.astype(np.float32), np.float32(0))
  i0 = src.astype(np.int64)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  frac = src - i0.astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), np.float32(1) - frac)
  np.add.at(m, (rows, i1), frac)
  return m


def _resize_separable(x, mh: np.ndarray, mw: np.ndarray):
  """Applies ``mw`` along W, then ``mh`` along H, of NHWC float32 ``x`` (exact f32 matmuls)."""
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("nhwc,ow->nhoc", x, jnp.asarray(mw), precision=hi)
  return jnp.einsum("nhwc,oh->nowc", x, jnp.asarray(mh), precision=hi)


def resize_tf1_bilinear(x, size: int = INPUT_SIZE):
  """TF1 ``ResizeBilinear`` (legacy grid) of NHWC float32 ``x`` to ``size x size``."""
  x = jnp.asarray(x, jnp.float32)
  return _resize_separable(x, tf1_resize_matrix(x.shape[1], size),
                           tf1_resize_matrix(x.shape[2], size))


def resize_torch_bilinear(x, size: int = INPUT_SIZE):
  """torch ``F.interpolate(mode="bilinear", align_corners=False)`` of NHWC float32 ``x``."""
  x = jnp.asarray(x, jnp.float32)
  return _resize_separable(x, torch_resize_matrix(x.shape[1], size),
                           torch_resize_matrix(x.shape[2], size))


def preprocess(images, preprocessing: str = "adm"):
  """uint8 / float ``[0, 255]`` NHWC images -> the float32 299x299 network input.

  ``"adm"``: ``(resize_tf1_bilinear(x) - 128) * 0.0078125``, range ``[-1, 0.9921875]``.
  ``"pytorch_fid"``: ``2 * resize_torch_bilinear(x / 255) - 1``, range ``[-1, 1]``.
  ``"none"``: ``x`` as float32, unchanged.
  """
  if preprocessing not in PREPROCESSINGS:
    raise UserError(f"preprocessing={preprocessing!r}: expected one of {PREPROCESSINGS}")
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise UserError(f"Inception input has shape {tuple(x.shape)}: expected NHWC images "
                    "(N, H, W, 3), uint8 or float in [0, 255]")
  x = x.astype(jnp.float32)
  if preprocessing == "none":
    return x
  if preprocessing == "adm":
    return (resize_tf1_bilinear(x) - np.float32(128.0)) * np.float32(0.0078125)
  x = resize_torch_bilinear(x / np.float32(255.0))
  return np.float32(2.0) * x - np.float32(1.0)


# ---------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class _Conv(nn.Module):
  """Bias-free 2-D convolution, HWIO ``kernel``, explicit symmetric padding."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[int, int]
  dtype: Any
  precision: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.zeros_init(),
                        self.kernel_size + (x.shape[-1], self.features), jnp.float32)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
        [(p, p) for p in self.padding], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision)


class _BatchNorm(nn.Module):
  """Evaluation-mode batch norm on the last axis: ``x * a + b`` from the running statistics."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    mean = self.param("mean", nn.initializers.zeros_init(), (c,), jnp.float32)
    var = self.param("var", nn.initializers.ones_init(), (c,), jnp.float32)
    a = scale / jnp.sqrt(var + np.float32(BN_EPS))
    b = bias - mean * a
    return x * a.astype(self.dtype) + b.astype(self.dtype)


class BasicConv2d(nn.Module):
  """torchvision's ``BasicConv2d``: conv (no bias) -> batch norm (eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Any
  strides: Any = 1
  padding: Any = 0
  dtype: Any = jnp.float32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    x = _Conv(self.features, _pair(self.kernel_size), _pair(self.strides), _pair(self.padding),
              self.dtype, self.precision, name="conv")(x)
    return nn.relu(_BatchNorm(self.dtype, name="bn")(x))


def _max_pool(x, window=3, stride=2, padding=0):
  return nn.max_pool(x, (window, window), (stride, stride), [(padding, padding)] * 2)


def _avg_pool_no_pad(x):
  """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF's AvgPool SAME)."""
  return nn.avg_pool(x, (3, 3), (1, 1), [(1, 1), (1, 1)], count_include_pad=False)


class _Block(nn.Module):
  """Shared fields of the Inception blocks."""
  dtype: Any = jnp.float32
  precision: Any = "highest"

  def conv(self, name, features, kernel_size, strides=1, padding=0):
    return BasicConv2d(features, kernel_size, strides, padding, self.dtype, self.precision,
                       name=name)


class InceptionA(_Block):
  """``FIDInceptionA`` (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad)-1x1."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_1", 48, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """torchvision ``InceptionB`` (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(_Block):
  """``FIDInceptionC`` (Mixed_6b..6e): 1x1 | 1x7-7x1 towers | avgpool(no pad)-1x1."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """torchvision ``InceptionD`` (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_1", 192, 1)(x)
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(_Block):
  """``FIDInceptionE_1`` (Mixed_7b, ``pool="avg"``) / ``FIDInceptionE_2`` (Mixed_7c, ``"max"``)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], -1)
    # FIDInceptionE_2: the 2015 graph's last pool branch is a 3x3/1 max pool (padded with -inf).
    pooled = _max_pool(x, 3, 1, 1) if self.pool == "max" else _avg_pool_no_pad(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _FC(nn.Module):
  """The 2048 -> 1008 classifier; returns ``x @ kernel`` without the bias (ADM's IS logits)."""
  precision: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.zeros_init(), (x.shape[-1], NUM_LOGITS),
                        jnp.float32)
    self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,), jnp.float32)
    return jnp.dot(x, kernel, precision=self.precision)


class FIDInception(nn.Module):
  """FID Inception-v3: NHWC images of any size -> ``{"pool", "spatial", "logits", "probs"}``.

  Attributes:
    preprocessing: ``"adm"`` (TF1 legacy bilinear resize, ``(x - 128) / 128``; the
      ADM suite's), ``"pytorch_fid"`` (torch bilinear resize, ``2 x / 255 - 1``) or
      ``"none"`` (the input is already the preprocessed 299x299 network input).
    dtype: compute dtype of the network (preprocessing and outputs are float32).
    precision: ``jax.lax`` precision of the convolutions and matmuls (default
      ``"highest"``: float32-exact on every backend; ``None`` for the backend default).

  ``__call__(images)``: ``(N, H, W, 3)`` uint8 or float in ``[0, 255]`` -> dict of
  float32 ``pool (N, 2048)``, ``spatial (N, 2023)``, ``logits (N, 1008)`` (no fc
  bias) and ``probs (N, 1008)`` (softmax of ``logits``).

  The network only makes sense with loaded weights (:func:`load_fid_inception`);
  ``init`` gives all-zero kernels (it is used for the parameter shapes).
  """
  preprocessing: str = "adm"
  dtype: Any = jnp.float32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, images) -> dict[str, jax.Array]:
    x = preprocess(images, self.preprocessing)
    self.sow("intermediates", "input", x)
    kw = dict(dtype=self.dtype, precision=self.precision)

    def conv(name, features, kernel, strides=1, padding=0):
      return BasicConv2d(features, kernel, strides, padding, name=name, **kw)

    x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
    x = conv("Conv2d_2a_3x3", 32, 3)(x)
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
    x = _max_pool(x)
    self.sow("intermediates", "maxpool1", x)
    x = conv("Conv2d_3b_1x1", 80, 1)(x)
    x = conv("Conv2d_4a_3x3", 192, 3)(x)
    x = _max_pool(x)
    self.sow("intermediates", "maxpool2", x)
    blocks = (
        InceptionA(pool_features=32, name="Mixed_5b", **kw),
        InceptionA(pool_features=64, name="Mixed_5c", **kw),
        InceptionA(pool_features=64, name="Mixed_5d", **kw),
        InceptionB(name="Mixed_6a", **kw),
        InceptionC(channels_7x7=128, name="Mixed_6b", **kw),
        InceptionC(channels_7x7=160, name="Mixed_6c", **kw),
        InceptionC(channels_7x7=160, name="Mixed_6d", **kw),
        InceptionC(channels_7x7=192, name="Mixed_6e", **kw),
        InceptionD(name="Mixed_7a", **kw),
        InceptionE(pool="avg", name="Mixed_7b", **kw),
        InceptionE(pool="max", name="Mixed_7c", **kw),
    )
    spatial = None
    for block in blocks:
      x = block(x)
      self.sow("intermediates", f"{block.name}_output", x)
      if block.name == "Mixed_6d":
        # Mixed_6d's first 192 channels are branch1x1 (TF mixed_6/conv); ADM keeps 7 of them.
        spatial = x[..., :7].astype(jnp.float32).reshape(x.shape[0], -1)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = _FC(self.precision, name="fc")(pool)
    return {"pool": pool, "spatial": spatial, "logits": logits,
            "probs": jax.nn.softmax(logits, axis=-1)}


# ---------------------------------------------------------------------------
# Parameters <-> pytorch-fid state_dict.
# ---------------------------------------------------------------------------

_LEAF_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight",
                  ("bn", "bias"): "bn.bias", ("bn", "mean"): "bn.running_mean",
                  ("bn", "var"): "bn.running_var", ("fc", "kernel"): "fc.weight",
                  ("fc", "bias"): "fc.bias"}


def flax_path_to_torch_key(path: Sequence[str]) -> str:
  """``("Mixed_6d", "branch1x1", "bn", "var")`` -> ``"Mixed_6d.branch1x1.bn.running_var"``."""
  return ".".join(tuple(path[:-2]) + (_LEAF_TO_TORCH[tuple(path[-2:])],))


@functools.lru_cache(maxsize=1)
def _abstract_params() -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
  shapes = jax.eval_shape(FIDInception().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.uint8))["params"]
  return tuple((p, tuple(a.shape)) for p, a in flatten_tree(shapes))


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every pytorch-fid key (472) and its PyTorch shape, derived from :class:`FIDInception`."""
  return {flax_path_to_torch_key(p): torch_shape(p, s) for p, s in _abstract_params()}


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> dict:
  """pytorch-fid ``{key: array}`` -> :class:`FIDInception` params (nested dict, float32 numpy).

  ``*.num_batches_tracked`` entries are ignored. Any missing, unexpected or
  mis-shaped key raises one ``ConversionError`` naming ``source`` and listing them
  all. Conv weights OIHW -> HWIO, ``fc.weight`` ``(1008, 2048)`` -> ``(2048, 1008)``;
  float32 values are copied bit for bit (other float dtypes are cast to float32).
  """
  sd = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
  check_state_dict(expected_state_dict_shapes(), sd, source)
  bad = [k for k, v in sd.items() if not np.issubdtype(np.asarray(v).dtype, np.floating)]
  if bad:
    raise ConversionError(f"{source}: {bad[0]} has dtype {np.asarray(sd[bad[0]]).dtype}, "
                          "expected floating point")
  return tree_from_state_dict(sd, (p for p, _ in _abstract_params()), flax_path_to_torch_key,
                              lambda v: np.ascontiguousarray(v, dtype=np.float32))


def state_dict_from_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_state_dict`: pytorch-fid layout, float32 numpy."""
  out = {}
  for path, value in flatten_tree(params):
    value = to_torch_layout(path, np.asarray(value, dtype=np.float32))
    out[flax_path_to_torch_key(path)] = np.ascontiguousarray(value)
  return out


def _dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in _DTYPE_NAMES:
      raise UserError(f"dtype={dtype!r}: expected one of {tuple(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]
  return dtype


def load_fid_inception(path: str, *, preprocessing: str = "adm", dtype=jnp.float32,
                       precision: Any = "highest") -> tuple[FIDInception, dict]:
  """Loads the FID Inception weights -> ``(FIDInception model, params)``.

  ``path``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (any
  ``.pth``/``.pt``/``.bin``/``.safetensors`` holding its 472 tensors, read with
  the project's safe torch loader) or the TF graph ``classify_image_graph_def.pb``
  the ADM suite downloads (read without TensorFlow). Both give bitwise the same
  params for the same weights. An unreadable or non-matching file raises one
  ``ConversionError`` line naming it and what was expected.
  """
  if preprocessing not in PREPROCESSINGS:
    raise UserError(f"preprocessing={preprocessing!r}: expected one of {PREPROCESSINGS}")
  path = os.fspath(path)
  if path.endswith(".pb"):
    state_dict = inception_tf.fid_inception_state_dict(path)
  elif path.endswith((".pth", ".pt", ".bin", ".safetensors")):
    obj = load_weights_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path}: holds a {type(obj).__name__}, expected the FID Inception "
                            "state_dict (a dict of 472 tensors, pytorch-fid's pt_inception-*.pth)")
    state_dict = flat_state_dict(obj, path)
  else:
    raise ConversionError(f"{path}: unknown weights file type, expected pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth (.pth/.pt) or the TF graph "
                          "classify_image_graph_def.pb (.pb)")
  params = params_from_state_dict(state_dict, path)
  model = FIDInception(preprocessing=preprocessing, dtype=_dtype(dtype), precision=precision)
  return model, params


def make_feature_fn(model: FIDInception, mesh: jax.sharding.Mesh | None = None):
  """Jitted ``fn(params, images) -> features dict``, the batch split over ``mesh``'s "data" axis.

  ``mesh`` defaults to ``deepflow_jax.sharding.data_mesh()`` (every device).
  Params are replicated; images (global batch divisible by the device count) and
  outputs are sharded along the batch. Put params with
  ``jax.device_put(params, NamedSharding(mesh, P()))`` once to avoid re-sending.
  """
  if mesh is None:
    mesh = data_mesh()
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda p, x: model.apply({"params": p}, x), in_shardings=(repl, data),
                 out_shardings=data)
