"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax linen, with loading.

DeepFlow, like REPA and SiT, trains on SD-VAE latents and decodes its samples with
``stabilityai/sd-vae-ft-ema``. This module re-implements the architecture of
diffusers' ``AutoencoderKL`` (``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks,
a mid block with one single-head self-attention, diagonal Gaussian posterior) and
loads diffusers weight folders directly; diffusers itself is not needed.

Public arrays are NHWC:

* ``vae.apply({'params': p}, x, method=vae.encode)``: images ``(N, H, W, 3)`` in
  ``[-1, 1]`` -> ``(mean, std)``, each ``(N, H/f, W/f, latent_channels)`` with
  ``f = 2 ** (len(block_out_channels) - 1)`` and
  ``std = exp(0.5 * clip(logvar, -30, 20))``.
* ``vae.apply({'params': p}, z, method=vae.decode)``: the VAE's own (unscaled)
  latents -> images ``(N, H, W, 3)``. Diffusion latents are divided by
  ``LATENT_SCALE`` (0.18215; diffusers' ``scaling_factor``) by the caller first;
  ``encode``/``decode`` never apply it (neither does diffusers).
* ``deepflow_jax.images.to_uint8(images)``: the reference's decode formula to uint8.

Parameter names (diffusers key -> Flax path) are a mechanical rename:

* ``.`` separates path components (``encoder.mid_block.resnets.0.conv1.weight``
  -> ``('encoder', 'mid_block', 'resnets_0', 'conv1', 'kernel')``);
* a numeric component is glued to the one before it with ``_``
  (``down_blocks.1`` -> ``down_blocks_1``, ``attentions.0`` -> ``attentions_0``,
  ``to_out.0`` -> ``to_out_0``, ``downsamplers.0`` -> ``downsamplers_0``);
* the leaf ``weight`` becomes ``kernel`` for convolutions and linear layers and
  ``scale`` for GroupNorm; ``bias`` stays ``bias``;
* values: conv weights OIHW -> HWIO (``transpose(2, 3, 1, 0)``), linear weights
  ``(out, in)`` -> ``(in, out)``; everything else as is.

Attention keys from old diffusers files (``query``, ``key``, ``value``,
``proj_attn``) are first renamed to the current ones (``to_q``, ``to_k``,
``to_v``, ``to_out.0``), as diffusers does on load; attention projections stored
as 1x1 conv weights ``(C, C, 1, 1)`` are squeezed to ``(C, C)``. The table of
expected keys and shapes is derived from the Flax model itself
(``expected_state_dict_shapes``), so the rename can never drift from the modules.

Numerics follow diffusers: GroupNorm ``eps=1e-6`` (statistics computed in at least
float32, two-pass variance); downsampling convs pad right/bottom only
(``F.pad(x, (0, 1, 0, 1))`` then a 3x3 stride-2 conv with no padding);
upsampling is nearest-neighbour x2 then a 3x3 conv; attention uses one head of
width C, scale ``1/sqrt(C)``, softmax in float32, residual added; resnets add an
un-scaled residual (1x1 ``conv_shortcut`` only when channel counts differ).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deepflow_jax import outputs
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import check_state_dict
from deepflow_jax.torch_io import flat_state_dict
from deepflow_jax.torch_io import flatten_tree
from deepflow_jax.torch_io import load_weights_file
from deepflow_jax.torch_io import torch_shape
from deepflow_jax.torch_io import tree_from_state_dict

Dtype = Any

LATENT_SCALE = 0.18215
"""Diffusion latents = VAE latents * LATENT_SCALE (sd-vae-ft-ema / ft-mse; diffusers' config
calls it ``scaling_factor``). The one place this number is written."""
DOWNSAMPLING = 8
"""Image side / latent side of the SD-VAE."""

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
GROUPNORM_EPS = 1e-6

# Constructor arguments of the real stabilityai/sd-vae-ft-ema (and sd-vae-ft-mse).
# Usable wherever a config.json is not at hand (benchmarks, shape checks).
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 256,
    "scaling_factor": LATENT_SCALE,
}

CONFIG_NAME = "config.json"
ORBAX_PARAMS_DIR = "params"  # what convert_vae writes next to config.json
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)

_ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


# ----------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------


class _Layers:
  """Mixin: the conv / norm / dense factories every block shares."""

  norm_num_groups: int
  act_fn: str
  dtype: Dtype
  param_dtype: Dtype
  precision: Any

  def _conv(self, features, kernel=3, stride=1, padding=1, name=None):
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=padding, dtype=self.dtype,
                   param_dtype=self.param_dtype, precision=self.precision,
                   name=name)

  def _norm(self, name):
    return nn.GroupNorm(num_groups=self.norm_num_groups, epsilon=GROUPNORM_EPS,
                        use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  def _dense(self, features, name):
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                    precision=self.precision, name=name)

  def _act(self, x):
    return _ACTIVATIONS[self.act_fn](x)

  def _sub_kw(self) -> dict:
    """The fields every sub-block inherits from its parent."""
    return dict(norm_num_groups=self.norm_num_groups, act_fn=self.act_fn, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision)


class ResnetBlock(nn.Module, _Layers):
  """diffusers ``ResnetBlock2D`` without time embedding (``temb=None``)."""

  out_channels: int
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = self._conv(self.out_channels, name="conv1")(self._act(self._norm("norm1")(x)))
    # Dropout (p=0 in every released VAE) is the identity at inference.
    h = self._conv(self.out_channels, name="conv2")(self._act(self._norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = self._conv(self.out_channels, kernel=1, padding=0, name="conv_shortcut")(x)
    return x + h


class MidAttention(nn.Module, _Layers):
  """The VAE mid-block ``Attention``: GroupNorm, one head of width C, residual."""

  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    y = self._norm("group_norm")(x).reshape(n, h * w, c)
    q = self._dense(c, "to_q")(y)
    k = self._dense(c, "to_k")(y)
    v = self._dense(c, "to_v")(y)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=self.precision)
    softmax_dtype = jnp.promote_types(logits.dtype, jnp.float32)
    weights = jax.nn.softmax(logits.astype(softmax_dtype) / math.sqrt(c), axis=-1)
    out = jnp.einsum("nqk,nkc->nqc", weights.astype(v.dtype), v,
                     precision=self.precision)
    out = self._dense(c, "to_out_0")(out)
    return x + out.reshape(n, h, w, c)


class MidBlock(nn.Module, _Layers):
  """diffusers ``UNetMidBlock2D`` with one layer: resnet, [attention], resnet."""

  add_attention: bool = True
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = self._sub_kw()
    c = x.shape[-1]
    x = ResnetBlock(c, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = MidAttention(name="attentions_0", **kw)(x)
    return ResnetBlock(c, name="resnets_1", **kw)(x)


class Downsample(nn.Module, _Layers):
  """diffusers ``Downsample2D(padding=0)``: pad right/bottom by 1, 3x3 stride 2."""

  channels: int
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    return self._conv(self.channels, stride=2, padding=((0, 1), (0, 1)),
                      name="conv")(x)


class Upsample(nn.Module, _Layers):
  """diffusers ``Upsample2D``: nearest-neighbour x2, then a 3x3 conv (pad 1)."""

  channels: int
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self._conv(self.channels, name="conv")(x)


class ResnetStage(nn.Module, _Layers):
  """diffusers ``DownEncoderBlock2D`` (``resample="down"``) or ``UpDecoderBlock2D``
  (``resample="up"``): ``num_layers`` resnets, then the resampler if ``resample``."""

  out_channels: int
  num_layers: int
  resample: Optional[str] = None  # "down", "up" or None (the last level)
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = self._sub_kw()
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, name=f"resnets_{i}", **kw)(x)
    if self.resample == "down":
      x = Downsample(self.out_channels, name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module, _Layers):
  """diffusers ``Encoder`` with ``double_z=True``: images -> 2*latent channels."""

  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  mid_block_add_attention: bool = True
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = self._sub_kw()
    x = self._conv(self.block_out_channels[0], name="conv_in")(x)
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      x = ResnetStage(ch, self.layers_per_block, resample="down" if i != last else None,
                      name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(self.mid_block_add_attention, name="mid_block", **kw)(x)
    x = self._act(self._norm("conv_norm_out")(x))
    return self._conv(2 * self.latent_channels, name="conv_out")(x)


class Decoder(nn.Module, _Layers):
  """diffusers ``Decoder`` (group norm): latents -> images."""

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  mid_block_add_attention: bool = True
  norm_num_groups: int = 32
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    kw = self._sub_kw()
    x = self._conv(self.block_out_channels[-1], name="conv_in")(z)
    x = MidBlock(self.mid_block_add_attention, name="mid_block", **kw)(x)
    widths = list(reversed(self.block_out_channels))
    for i, ch in enumerate(widths):
      x = ResnetStage(ch, self.layers_per_block + 1,
                      resample="up" if i != len(widths) - 1 else None,
                      name=f"up_blocks_{i}", **kw)(x)
    x = self._act(self._norm("conv_norm_out")(x))
    return self._conv(self.out_channels, name="conv_out")(x)


class DiagonalGaussian(NamedTuple):
  """The VAE posterior. ``logvar`` is already clamped to [-30, 20]."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, eps):
    """``mean + std * eps`` for given standard-normal noise ``eps``."""
    return self.mean + self.std * eps


def posterior_from_moments(moments) -> DiagonalGaussian:
  """Splits ``(..., 2L)`` moments (mean || logvar) and clamps logvar to [-30, 20].

  Computed in at least float32 whatever the input dtype.
  """
  moments = jnp.asarray(moments)
  moments = moments.astype(jnp.promote_types(moments.dtype, jnp.float32))
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return DiagonalGaussian(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` in Flax linen (NHWC).

  Build it from a diffusers ``config.json`` dict with ``AutoencoderKL.from_config``.
  ``dtype`` is the computation dtype and ``param_dtype`` the parameters' dtype
  (both float32 by default; GroupNorm statistics, the attention softmax and the
  posterior are computed in at least float32). ``precision`` goes to every conv
  and matmul (e.g. ``jax.lax.Precision.HIGHEST`` to rule out TF32 on GPUs).
  """

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  norm_num_groups: int = 32
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  latent_scale: float = LATENT_SCALE  # diffusers' config key: scaling_factor
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @classmethod
  def from_config(cls, config: Mapping[str, Any], dtype: Dtype = jnp.float32,
                  param_dtype: Dtype | None = None,
                  precision: Any = None) -> "AutoencoderKL":
    """Builds the model from a diffusers ``AutoencoderKL`` config dict.

    Missing fields take diffusers' defaults (old hub configs, e.g. the one of
    sd-vae-ft-ema written by diffusers 0.4.2, lack ``scaling_factor``,
    ``use_quant_conv``, ...). Unknown fields are ignored, as diffusers does.
    Raises ``ConversionError`` for configs this implementation cannot honour.
    """
    cfg = dict(config)
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ConversionError(
          f"config.json describes a {name}, expected an AutoencoderKL")
    channels = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    if not channels:
      raise ConversionError("config.json: block_out_channels is empty")
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * len(channels)))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * len(channels)))
    if len(down) != len(channels) or len(up) != len(channels):
      raise ConversionError(
          f"config.json: {len(channels)} block_out_channels but "
          f"{len(down)} down_block_types and {len(up)} up_block_types")
    bad = sorted({t for t in down if t != "DownEncoderBlock2D"} |
                 {t for t in up if t != "UpDecoderBlock2D"})
    if bad:
      raise ConversionError(
          f"config.json: unsupported block types {bad} (only DownEncoderBlock2D/"
          "UpDecoderBlock2D)")
    act = cfg.get("act_fn", "silu")
    if act not in _ACTIVATIONS:
      raise ConversionError(
          f"config.json: unsupported act_fn {act!r} (supported: "
          f"{', '.join(sorted(_ACTIVATIONS))})")
    groups = int(cfg.get("norm_num_groups", 32))
    uneven = [c for c in channels if c % groups]
    if uneven:
      raise ConversionError(
          f"config.json: block_out_channels {uneven} not divisible by "
          f"norm_num_groups={groups}")
    return cls(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        block_out_channels=channels,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=groups,
        act_fn=act,
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        latent_scale=float(cfg.get("scaling_factor") or LATENT_SCALE),
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        precision=precision,
    )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    kw = dict(norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
              mid_block_add_attention=self.mid_block_add_attention,
              dtype=self.dtype, param_dtype=self.param_dtype,
              precision=self.precision)
    channels = tuple(self.block_out_channels)
    self.encoder = Encoder(self.latent_channels, channels,
                           self.layers_per_block, **kw)
    self.decoder = Decoder(self.out_channels, channels, self.layers_per_block,
                           **kw)
    conv = lambda f: nn.Conv(f, (1, 1), dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             precision=self.precision)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * self.latent_channels)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels)

  def encode_moments(self, x):
    """Images (N,H,W,in) -> posterior moments (N,h,w,2L): mean || unclamped logvar."""
    h = self.encoder(x)
    return self.quant_conv(h) if self.use_quant_conv else h

  def encode_posterior(self, x) -> DiagonalGaussian:
    """Images -> ``DiagonalGaussian`` (mean, clamped logvar; .std, .var, .sample)."""
    return posterior_from_moments(self.encode_moments(x))

  def encode(self, x):
    """Images (N,H,W,in) in [-1, 1] -> ``(mean, std)``, each (N,h,w,latent)."""
    posterior = self.encode_posterior(x)
    return posterior.mean, posterior.std

  def decode(self, z):
    """Unscaled VAE latents (N,h,w,latent) -> images (N,H,W,out), roughly [-1, 1]."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x, sample_posterior: bool = False, rng=None):
    """Reconstruction: decode(mean) or, with ``sample_posterior``, decode(sample)."""
    posterior = self.encode_posterior(x)
    z = posterior.mean
    if sample_posterior:
      if rng is None:
        rng = self.make_rng("sample")
      z = posterior.sample(jax.random.normal(rng, z.shape, z.dtype))
    return self.decode(z.astype(self.dtype))


# ----------------------------------------------------------------------------
# Weight conversion
# ----------------------------------------------------------------------------

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v",
                "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(
    r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_LINEAR_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def abstract_params(vae: AutoencoderKL) -> dict:
  """The parameter tree of ``vae`` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  f = vae.downsample_factor
  x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, vae.in_channels), vae.dtype)
  variables = jax.eval_shape(vae.init, jax.random.PRNGKey(0), x)
  return variables["params"]


def flax_path_to_torch_key(path: Sequence[str]) -> str:
  """``('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel')`` -> diffusers key."""
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    parts.extend([m.group(1), m.group(2)] if m else [name])
  parts.append({"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1]))
  return ".".join(parts)


def expected_state_dict_shapes(vae: AutoencoderKL) -> dict[str, tuple[int, ...]]:
  """Every diffusers key the model needs and its PyTorch shape."""
  return {flax_path_to_torch_key(p): torch_shape(p, a.shape)
          for p, a in flatten_tree(abstract_params(vae))}


def normalize_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Legacy attention names -> current ones; 1x1-conv attention weights -> (C, C).

  A legacy key whose current name is also present is left alone, so that the
  duplicate shows up as unexpected instead of silently shadowing a tensor.
  """
  out = dict(state_dict)
  for key in list(out):
    m = _LEGACY_RE.match(key)
    if m:
      new = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
      if new not in out:
        out[new] = out.pop(key)
  for key, value in out.items():
    if (_ATTN_LINEAR_RE.search(key) and value.ndim == 4
        and value.shape[2:] == (1, 1)):
      out[key] = value.reshape(value.shape[:2])
  return out


def convert_state_dict(state_dict: Mapping[str, np.ndarray], vae: AutoencoderKL,
                       source: str = "state_dict") -> dict:
  """diffusers ``{key: array}`` -> Flax params (nested dict of numpy arrays).

  Validates every key and shape first (one ``ConversionError`` naming all missing,
  unexpected and mis-shaped keys). Arrays keep their dtype; weights are transposed
  views, nothing is copied.
  """
  if any(k.startswith(("first_stage_model.", "encoder.mid.", "decoder.mid."))
         for k in state_dict):
    raise ConversionError(
        f"{source}: looks like an original CompVis/LDM checkpoint, not a diffusers "
        "AutoencoderKL; save it with diffusers (AutoencoderKL.from_single_file("
        "...).save_pretrained(dir)) first")
  sd = normalize_state_dict(state_dict)
  abstract = abstract_params(vae)
  expected = {flax_path_to_torch_key(p): torch_shape(p, a.shape)
              for p, a in flatten_tree(abstract)}
  check_state_dict(expected, sd, source)
  return tree_from_state_dict(sd, (p for p, _ in flatten_tree(abstract)),
                              flax_path_to_torch_key)


def count_params(params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def resolve_vae_dir(path: str) -> str:
  """The VAE folder for ``path``: itself, the folder of a weights file, or ``vae/``."""
  path = os.fspath(path)
  if os.path.isfile(path):  # a weights file: its folder must hold config.json
    path = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such directory")
  if (not os.path.exists(os.path.join(path, CONFIG_NAME))
      and os.path.exists(os.path.join(path, "vae", CONFIG_NAME))):
    path = os.path.join(path, "vae")  # a full diffusers pipeline folder
  if not os.path.exists(os.path.join(path, CONFIG_NAME)):
    raise ConversionError(
        f"{path}: no {CONFIG_NAME}; expected a diffusers AutoencoderKL folder or a "
        "folder written by python -m deepflow_jax.convert_vae")
  return path


def read_config(path: str) -> dict:
  """Reads ``config.json`` of a VAE folder (diffusers or convert_vae output)."""
  file = os.path.join(resolve_vae_dir(path), CONFIG_NAME)
  try:
    with open(file, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{file}: not a readable JSON file ({first_line(e)})") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{file}: expected a JSON object")
  return config


def is_orbax_vae_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, ORBAX_PARAMS_DIR))


def load_diffusers_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights of a diffusers folder -> (``{key: np.ndarray}``, file)."""
  path = resolve_vae_dir(path)
  for name in WEIGHT_NAMES:
    file = os.path.join(path, name)
    if os.path.exists(file):
      break
  else:
    hint = ""
    if any(n.endswith(".index.json") for n in os.listdir(path)):
      hint = " (sharded checkpoints are not supported)"
    raise ConversionError(
        f"{path}: no {' or '.join(WEIGHT_NAMES[:2])}{hint}")
  obj = load_weights_file(file)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{file}: expected a state_dict, got {type(obj).__name__}")
  return flat_state_dict(obj, file), file


class _Shaped:
  """Stands in for an array in ``check_state_dict`` (only ``.shape`` is read)."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def _restore_orbax(path: str, vae: AutoencoderKL) -> dict:
  ckpt = os.path.abspath(os.path.join(path, ORBAX_PARAMS_DIR))
  abstract = abstract_params(vae)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      item = checkpointer.metadata(ckpt).item_metadata
    except Exception as e:  # orbax raises many types for damaged folders
      raise ConversionError(
          f"{ckpt}: not a readable Orbax checkpoint ({first_line(e)})") from e
    tree = getattr(item, "tree", None)
    if not isinstance(tree, Mapping):
      raise ConversionError(
          f"{ckpt}: not an Orbax checkpoint written by deepflow_jax.convert_vae")
    want = {"/".join(p): tuple(a.shape) for p, a in flatten_tree(abstract)}
    got = {"/".join(p): m for p, m in flatten_tree(dict(tree))}
    check_state_dict(want, {k: _Shaped(m.shape) for k, m in got.items()}, ckpt)
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, np.float32), abstract)
    try:
      return checkpointer.restore(ckpt, target)
    except Exception as e:
      raise ConversionError(f"{ckpt}: could not restore ({first_line(e)})") from e


def load_diffusers_vae(path: str, dtype: Dtype = jnp.float32,
                       precision: Any = None) -> tuple[AutoencoderKL, dict]:
  """Loads a VAE from a diffusers folder or a ``convert_vae`` Orbax folder.

  ``path``: a folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (or ``.bin``, read without unpickling code), or a folder written by
  ``python -m deepflow_jax.convert_vae`` (``config.json`` + ``params/``). A full
  pipeline folder with a ``vae/`` subfolder works too.

  Returns ``(vae, params)``: the model (computation and parameter dtype ``dtype``)
  and its parameters cast to ``dtype``; use as
  ``vae.apply({'params': params}, x, method=vae.encode)``.
  Raises ``ConversionError`` (one line) for anything that does not fit.
  """
  path = resolve_vae_dir(path)
  vae = AutoencoderKL.from_config(read_config(path), dtype=dtype,
                                  param_dtype=dtype, precision=precision)
  if is_orbax_vae_dir(path):
    params = _restore_orbax(path, vae)
  else:
    state_dict, file = load_diffusers_state_dict(path)
    params = convert_state_dict(state_dict, vae, source=file)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a, dtype=dtype)), params)
  return vae, params


def convert_diffusers_vae(input_dir: str, output_dir: str, force: bool = False,
                          log: Callable[[str], None] = print) -> int:
  """Converts a diffusers folder into ``OUTPUT/config.json`` + ``OUTPUT/params`` (Orbax).

  Returns the number of parameters written. A non-empty ``output_dir`` is
  refused unless ``force``; then its ``config.json`` and ``params/`` are
  replaced and any other file is left alone. ``params/`` is written under a
  temporary name and swapped in, ``config.json`` atomically, so an interrupted
  run leaves the previous conversion (or nothing) and can simply be rerun.
  """
  input_dir = resolve_vae_dir(input_dir)
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output {output_dir} exists and is not a directory")
  if os.path.realpath(output_dir) == os.path.realpath(input_dir):
    raise UserError("--output must differ from --input")
  leftovers = [n for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
               if outputs.is_tmp_name(n) or ".old-" in n]
  others = [n for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
            if n not in leftovers]
  if others and not force:
    raise UserError(f"--output {output_dir} is not empty; pass --force to replace its "
                    f"{CONFIG_NAME} and {ORBAX_PARAMS_DIR}/")
  if is_orbax_vae_dir(input_dir):
    raise UserError(f"--input {input_dir} is already a converted (Orbax) VAE folder")
  config = read_config(input_dir)
  model = AutoencoderKL.from_config(config)
  state_dict, weights_file = load_diffusers_state_dict(input_dir)
  log(f"read {len(state_dict)} tensors from {weights_file}")
  params = convert_state_dict(state_dict, model, source=weights_file)
  params = jax.tree_util.tree_map(lambda a: np.ascontiguousarray(a, dtype=np.float32), params)
  n_params = count_params(params)

  os.makedirs(output_dir, exist_ok=True)
  for name in leftovers:  # what an interrupted conversion left
    path = os.path.join(output_dir, name)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      os.remove(path)
  ckpt_dir = os.path.join(output_dir, ORBAX_PARAMS_DIR)
  tmp = outputs.tmp_name(ckpt_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp, params)
    checkpointer.wait_until_finished()
  if os.path.lexists(ckpt_dir):  # only reachable with --force
    old = f"{ckpt_dir}.old-{os.getpid()}"
    os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, ckpt_dir)
  with open(os.path.join(input_dir, CONFIG_NAME), "rb") as f:
    outputs.atomic_write_bytes(os.path.join(output_dir, CONFIG_NAME), f.read())
  log(f"converted {len(jax.tree_util.tree_leaves(params))} arrays, {n_params:,} parameters "
      f"({len(model.block_out_channels)} levels, widths {tuple(model.block_out_channels)}) "
      f"-> {output_dir}")
  return n_params
