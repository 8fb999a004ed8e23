"""DINOv2 encoder (deepflow_jax.models.dinov2): golden parity, registers, loader checks.

Golden data in tests/data/ (copied from the reference run, dinov2_tiny):
dinov2_tiny.pth is a small DINOv2 (width 64, depth 3, 4 heads, patch 14,
stored 7x7 position grid, no registers) built with the official DINOv2 code and
random non-trivial weights, saved in the layout of the official
dinov2_vitb14_pretrain.pth; dinov2_tiny.npz holds every array of the
reference's float32 run (NCHW images): the preprocessed inputs, the native path
(stored table, 98 px input), the REPA path (table resampled at load to 4x4 with
timm's resample_abs_pos_embed, 56 px input), DINOv2's own position
interpolation (stored table, 56 px input), block-0 internals, and the real-size
256 -> 224 preprocessing and 37 -> 16 / 32 table resamples.

Tolerances are the ones the golden data states, absolute: tokens 1e-4,
block-0 internals 2e-5, inputs 1e-4, the 256 -> 224 input 3e-4, position tables
1e-5. They sit about 10x above the float32 noise of an independent port (tokens
<= 7e-6, inputs <= 3e-6, tables <= 1e-6) and far below what a structural
mistake moves (tanh GELU: 4e-4 on tokens; every other mistake tried >= 0.15).

No golden exists for register tokens or SwiGLU: those checkpoints are built from
the same recipe as dinov2_tiny.pth (``_recipe_state_dict``, which reproduces
the golden checkpoint bit for bit) and compared with ``_torch_forward``, an
independent restatement of DINOv2's forward_features in PyTorch written from
the official semantics (itself checked against the golden arrays first).

Takes ~50 s wall (30 s of CPU) on the shared 2-core machine, most of it XLA
compilation and one subprocess with 8 fake devices.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cpu_env
from deepflow_jax.models import dinov2 as D
from deepflow_jax.errors import UserError
from deepflow_jax.torch_io import ConversionError

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY_PTH = os.path.join(DATA, "dinov2_tiny.pth")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20250711  # the golden recipe's seed
HEADS = 4  # the tiny model's heads (width 64 is no official width)

TOKENS_ATOL = 1e-4
BLOCK0_ATOL = 2e-5
INPUT_ATOL = 1e-4
REAL_INPUT_ATOL = 3e-4
POS_ATOL = 1e-5
# Our JAX model vs the PyTorch restatement, both float32 on CPU: the golden's
# token tolerance (independent float32 implementations agree to ~5e-6 here).
RESTATE_ATOL = 1e-4


def _nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


def _err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(DATA, "dinov2_tiny.npz")) as f:
    return {k: f[k] for k in f.files}


def _run(encoder, params, x):
  """Jitted apply with the intermediates collection -> (outputs, intermediates)."""
  fn = jax.jit(lambda p, x: encoder.apply({"params": p}, x, mutable=["intermediates"]))
  out, state = fn(params, x)
  return out, state["intermediates"]


@pytest.fixture(scope="module")
def native(golden):
  encoder, params = D.load_dinov2(TINY_PTH, num_heads=HEADS)
  return encoder, params, _run(encoder, params, _nhwc(golden["native_input"]))


@pytest.fixture(scope="module")
def repa(golden):
  encoder, params = D.load_dinov2(TINY_PTH, grid=4, num_heads=HEADS)
  return encoder, params, _run(encoder, params, _nhwc(golden["repa_input"]))


# ---------------------------------------------------------------------------
# Preprocessing and position tables.
# ---------------------------------------------------------------------------


def test_preprocess_matches_reference(golden):
  images = _nhwc(golden["images_uint8"])
  got = D.preprocess_raw_image(images, 98)
  assert got.dtype == jnp.float32 and got.shape == (2, 98, 98, 3)
  assert _err(got, _nhwc(golden["native_input"])) < INPUT_ATOL  # 64 -> 98 (upsampling)
  assert _err(D.preprocess_raw_image(images, 56), _nhwc(golden["repa_input"])) < INPUT_ATOL
  # The reference's own preprocess_raw_image at full size, 256 -> 224.
  real = D.preprocess_raw_image(_nhwc(golden["real_prep_image_uint8"]), 224)
  assert _err(real, _nhwc(golden["real_prep_input"])) < REAL_INPUT_ATOL
  # jax.image.resize's bicubic is another filter: 0.3 and more apart (this must fail).
  x = jnp.asarray(images, jnp.float32) / 255
  x = (x - jnp.asarray(D.IMAGENET_MEAN)) / jnp.asarray(D.IMAGENET_STD)
  other = jax.image.resize(x, (2, 56, 56, 3), "bicubic", antialias=False)
  assert _err(other, _nhwc(golden["repa_input"])) > 0.1


def test_preprocess_jits_and_refuses_bad_input(golden):
  images = _nhwc(golden["images_uint8"])
  eager = D.preprocess_raw_image(images, 56)
  jitted = jax.jit(D.preprocess_raw_image, static_argnums=1)(images, 56)
  assert _err(eager, jitted) < 1e-6  # same float32 ops, compiled
  with pytest.raises(UserError, match="uint8"):
    D.preprocess_raw_image(images.astype(np.float32), 56)
  with pytest.raises(UserError, match=r"\(N, H, W, 3\)"):
    D.preprocess_raw_image(np.transpose(images, (0, 3, 1, 2)), 56)


def test_bicubic_matrices_match_torch_interpolate():
  """The weight matrices against F.interpolate itself, plain and antialiased, up and down."""
  rng = np.random.default_rng(0)
  for n_in, n_out in [(64, 98), (256, 224), (7, 4), (37, 16), (5, 9)]:
    x = rng.standard_normal((n_in, n_in)).astype(np.float32).astype(np.float64)
    for aa in (False, True):
      w = D.torch_bicubic_matrix(n_in, n_out, antialias=aa)
      # The plain weights are PyTorch's float32 ones: compare with its float32 resize
      # (its float32 sums leave ~2e-6 on N(0, 1) data). The antialiased weights are
      # exact: compare with its float64 resize, to rounding.
      t = torch.from_numpy(x if aa else x.astype(np.float32))[None, None]
      want = F.interpolate(t, size=n_out, mode="bicubic", antialias=aa)[0, 0].numpy()
      assert _err(w @ x @ w.T, want) < (1e-12 if aa else 1e-5), (n_in, n_out, aa)
  # scale_factor path (DINOv2's interpolate_offset): coordinates use 1/scale_factor.
  sf = (4 + 0.1) / 7
  x = rng.standard_normal((7, 7)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x)[None, None], scale_factor=(sf, sf),
                       mode="bicubic")[0, 0].numpy()
  w = D.torch_bicubic_matrix(7, 4, scale_factor=sf)
  assert _err(w @ x @ w.T, want) < 1e-5
  # A wrong scale (in/out instead of 1/scale_factor) is visibly different.
  assert _err(D.torch_bicubic_matrix(7, 4) @ x @ D.torch_bicubic_matrix(7, 4).T, want) > 1e-2


def test_pos_embed_resampling(golden, repa):
  _, params, _ = repa
  assert _err(params["pos_embed"], golden["repa_pos_embed"]) < POS_ATOL
  for g in (16, 32):
    got = D.resample_abs_pos_embed(golden["real_posembed_37"], g)
    assert got.shape == (1, 1 + g * g, 8)
    assert _err(got, golden[f"real_posembed_{g}"]) < POS_ATOL
  same = D.resample_abs_pos_embed(golden["real_posembed_37"], 37)
  assert np.array_equal(same, golden["real_posembed_37"])


def test_repa_input_size():
  assert D.repa_input_size(256) == (224, 16)
  assert D.repa_input_size(512) == (448, 32)
  for bad in (0, 128, 300):
    with pytest.raises(UserError, match="multiple of 256"):
      D.repa_input_size(bad)


# ---------------------------------------------------------------------------
# The encoder against the golden arrays.
# ---------------------------------------------------------------------------


def test_loaded_architecture(native, repa):
  encoder, params, _ = native
  assert (encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.patch_size) == (64, 3, 4, 14)
  assert (encoder.pos_grid, encoder.num_register_tokens, encoder.ffn_hidden) == (7, 0, 256)
  assert (encoder.interpolate_offset, encoder.interpolate_antialias) == (0.1, False)
  assert params["blocks_0"]["attn"]["qkv"]["kernel"].shape == (64, 192)
  assert params["patch_embed"]["proj"]["kernel"].shape == (14, 14, 3, 64)
  assert "mask_token" not in params and "register_tokens" not in params
  assert repa[0].pos_grid == 4 and repa[1]["pos_embed"].shape == (1, 17, 64)


@pytest.mark.parametrize("path", ["native", "repa"])
def test_forward_matches_golden(golden, native, repa, path):
  _, _, (out, inter) = native if path == "native" else repa
  g = lambda k: golden[f"{path}_{k}"]  # noqa: E731
  n_tok = g("x_prenorm").shape[1]
  assert out["x_norm_patchtokens"].shape == (2, n_tok - 1, 64)
  assert out["x_norm_regtokens"].shape == (2, 0, 64)
  for k in ("x_prenorm", "x_norm_clstoken", "x_norm_patchtokens"):
    assert out[k].dtype == jnp.float32
    assert _err(out[k], g(k)) < TOKENS_ATOL, k
  assert _err(inter["patches"][0], g("patch_embed")) < TOKENS_ATOL
  assert _err(inter["tokens0"][0], g("tokens0")) < TOKENS_ATOL
  blocks = np.stack([inter[f"blocks_{i}"]["out"][0] for i in range(3)])
  assert _err(blocks, g("blocks")) < TOKENS_ATOL


def test_block0_internals_match_golden(golden, repa):
  b0 = repa[2][1]["blocks_0"]
  got = {"norm1": b0["norm1_out"], "attn": b0["attn_out"], "after_attn": b0["after_attn"],
         "norm2": b0["norm2_out"], "fc1": b0["mlp"]["fc1_out"], "act": b0["mlp"]["act"],
         "mlp": b0["mlp_out"]}
  for k, v in got.items():
    assert _err(v[0], golden[f"repa_b0_{k}"]) < BLOCK0_ATOL, k


def test_dinov2_own_pos_interpolation(golden, native):
  """Stored 7x7 table, 56 px input: DINOv2's interpolate_pos_encoding (offset 0.1, no antialias)."""
  encoder, params, _ = native
  out, inter = _run(encoder, params, _nhwc(golden["repa_input"]))
  assert _err(inter["pos"][0], golden["selfinterp_pos_embed"]) < POS_ATOL
  assert _err(out["x_norm_patchtokens"], golden["selfinterp_x_norm_patchtokens"]) < TOKENS_ATOL
  assert _err(out["x_norm_clstoken"], golden["selfinterp_x_norm_clstoken"]) < TOKENS_ATOL
  # The REPA table is a different one (the json: ~1.1 apart on the tokens).
  assert _err(out["x_norm_patchtokens"], golden["repa_x_norm_patchtokens"]) > 0.1


def test_end_to_end_from_uint8(golden, repa):
  """uint8 images -> preprocess -> encoder, jitted together, as a train step would."""
  encoder, params, _ = repa
  fn = jax.jit(lambda p, im: encoder.apply({"params": p}, D.preprocess_raw_image(im, 56)))
  out = fn(params, _nhwc(golden["images_uint8"]))
  assert _err(out["x_norm_patchtokens"], golden["repa_x_norm_patchtokens"]) < TOKENS_ATOL


def test_bfloat16_compute(golden):
  encoder, params = D.load_dinov2(TINY_PTH, grid=4, num_heads=HEADS, dtype=jnp.bfloat16)
  assert encoder.dtype == jnp.bfloat16 and params["norm"]["scale"].dtype == jnp.float32
  out = jax.jit(encoder.apply)({"params": params}, _nhwc(golden["repa_input"]))
  assert out["x_norm_patchtokens"].dtype == jnp.float32  # final LayerNorm in float32
  # bf16 matmul inputs (8-bit mantissa, ~4e-3 relative) through 3 blocks on
  # tokens of scale ~3: measured 0.03 here; 0.15 stays far below a wrong model
  # (the structural mistakes in the golden json move the tokens by >= 0.15 on
  # top of this, and no LayerScale by 1.7).
  assert _err(out["x_norm_patchtokens"], golden["repa_x_norm_patchtokens"]) < 0.15


# ---------------------------------------------------------------------------
# Registers and SwiGLU: checkpoints from the golden recipe vs a torch restatement.
# ---------------------------------------------------------------------------


def _recipe_state_dict(*, depth=3, d=64, m=7, registers=0, ffn_hidden=256, swiglu=False,
                       seed=SEED):
  """The golden recipe: torch.Generator(seed + 1), float64 randn cast to float32, in
  named_parameters() order; tokens 0.5*N, gamma 0.5+0.1*N, LayerNorm weights 1+0.1*N,
  biases 0.02*N, Linear/Conv weights N(0, 1/fan_in)."""
  gen = torch.Generator().manual_seed(seed + 1)
  shapes = [("cls_token", (1, 1, d)), ("pos_embed", (1, 1 + m * m, d))]
  if registers:
    shapes.append(("register_tokens", (1, registers, d)))
  shapes += [("mask_token", (1, d)), ("patch_embed.proj.weight", (d, 3, 14, 14)),
             ("patch_embed.proj.bias", (d,))]
  for i in range(depth):
    b = f"blocks.{i}."
    shapes += [(b + "norm1.weight", (d,)), (b + "norm1.bias", (d,)),
               (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
               (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
               (b + "ls1.gamma", (d,)), (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,))]
    if swiglu:
      shapes += [(b + "mlp.w12.weight", (2 * ffn_hidden, d)),
                 (b + "mlp.w12.bias", (2 * ffn_hidden,)),
                 (b + "mlp.w3.weight", (d, ffn_hidden)), (b + "mlp.w3.bias", (d,))]
    else:
      shapes += [(b + "mlp.fc1.weight", (ffn_hidden, d)), (b + "mlp.fc1.bias", (ffn_hidden,)),
                 (b + "mlp.fc2.weight", (d, ffn_hidden)), (b + "mlp.fc2.bias", (d,))]
    shapes.append((b + "ls2.gamma", (d,)))
  shapes += [("norm.weight", (d,)), ("norm.bias", (d,))]
  sd = {}
  for key, shape in shapes:
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    if key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
      v = 0.5 * z
    elif key.endswith(".gamma"):
      v = 0.5 + 0.1 * z
    elif key.endswith(".bias"):
      v = 0.02 * z
    elif "norm" in key:
      v = 1 + 0.1 * z
    else:
      v = z / math.sqrt(math.prod(shape[1:]))
    sd[key] = v.float()
  return sd


@torch.no_grad()
def _torch_forward(sd, x_nchw, *, num_heads, offset, antialias, repa_grid=None):
  """DINOv2 forward_features restated in PyTorch from the official semantics.

  repa_grid: first resample pos_embed as the reference does (timm's
  resample_abs_pos_embed = F.interpolate(size, bicubic, antialias=True) of the
  patch table, cls slot kept).
  """
  t = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)) for k, v in sd.items()}
  x = torch.from_numpy(np.ascontiguousarray(x_nchw))
  w = t["patch_embed.proj.weight"]
  d, p = w.shape[0], w.shape[-1]
  n, _, hh, ww = x.shape
  h0, w0 = hh // p, ww // p
  pos = t["pos_embed"]
  m = math.isqrt(pos.shape[1] - 1)

  def resize_table(size=None, scale_factor=None, aa=False):
    grid = pos[:, 1:].reshape(1, m, m, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, scale_factor=scale_factor, mode="bicubic", antialias=aa)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)

  if repa_grid is not None:
    pos = resize_table(size=(repa_grid, repa_grid), aa=True)
    m = repa_grid
  if (h0, w0) != (m, m):
    if offset:
      pos = resize_table(scale_factor=((h0 + offset) / m, (w0 + offset) / m), aa=antialias)
    else:
      pos = resize_table(size=(h0, w0), aa=antialias)
  tok = F.conv2d(x, w, t["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
  tok = torch.cat([t["cls_token"].expand(n, -1, -1), tok], dim=1) + pos
  r = t["register_tokens"].shape[1] if "register_tokens" in t else 0
  if r:
    tok = torch.cat([tok[:, :1], t["register_tokens"].expand(n, -1, -1), tok[:, 1:]], dim=1)
  depth = 1 + max(int(k.split(".")[1]) for k in t if k.startswith("blocks."))
  hd = d // num_heads
  for i in range(depth):
    b = lambda name: t[f"blocks.{i}.{name}"]  # noqa: E731
    h = F.layer_norm(tok, (d,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
    qkv = F.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias"))
    qkv = qkv.reshape(n, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale hd**-0.5
    a = F.linear(a.transpose(1, 2).reshape(n, -1, d), b("attn.proj.weight"), b("attn.proj.bias"))
    tok = tok + a * b("ls1.gamma")
    h = F.layer_norm(tok, (d,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
    if f"blocks.{i}.mlp.w12.weight" in t:
      x1, x2 = F.linear(h, b("mlp.w12.weight"), b("mlp.w12.bias")).chunk(2, dim=-1)
      h = F.linear(F.silu(x1) * x2, b("mlp.w3.weight"), b("mlp.w3.bias"))
    else:
      h = F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias")))  # exact erf GELU
      h = F.linear(h, b("mlp.fc2.weight"), b("mlp.fc2.bias"))
    tok = tok + h * b("ls2.gamma")
  xn = F.layer_norm(tok, (d,), t["norm.weight"], t["norm.bias"], eps=1e-6)
  return {"x_norm_clstoken": xn[:, 0].numpy(), "x_norm_regtokens": xn[:, 1:1 + r].numpy(),
          "x_norm_patchtokens": xn[:, 1 + r:].numpy(), "x_prenorm": tok.numpy()}


def test_recipe_and_restatement_reproduce_golden(golden):
  """Trust anchors for the register/SwiGLU tests: the recipe rebuilds dinov2_tiny.pth bit
  for bit, and the torch restatement reproduces the golden arrays on all three paths."""
  sd = _recipe_state_dict()
  ref = torch.load(TINY_PTH, weights_only=True)
  assert list(sd) == list(ref)
  assert all(torch.equal(sd[k], ref[k]) for k in ref)
  kw = dict(num_heads=HEADS, offset=0.1, antialias=False)
  cases = [("native", golden["native_input"], None), ("repa", golden["repa_input"], 4),
           ("selfinterp", golden["repa_input"], None)]
  for name, x, grid in cases:
    out = _torch_forward(sd, x, repa_grid=grid, **kw)
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
      assert _err(out[k], golden[f"{name}_{k}"]) < TOKENS_ATOL, (name, k)


@pytest.fixture(scope="module")
def reg4_file(tmp_path_factory):
  sd = _recipe_state_dict(registers=4)
  path = str(tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_reg4.pth")
  torch.save(sd, path)
  return path, {k: v.numpy() for k, v in sd.items()}


def test_register_tokens(golden, reg4_file):
  path, sd = reg4_file
  encoder, params = D.load_dinov2(path, num_heads=HEADS)
  assert encoder.num_register_tokens == 4
  # The _reg hub models' interpolation settings are inferred from the registers.
  assert (encoder.interpolate_offset, encoder.interpolate_antialias) == (0.0, True)
  x = _nhwc(golden["native_input"])
  out, inter = _run(encoder, params, x)
  assert out["x_prenorm"].shape == (2, 1 + 4 + 49, 64)
  assert out["x_norm_regtokens"].shape == (2, 4, 64)
  assert out["x_norm_patchtokens"].shape == (2, 49, 64)
  # Token layout: [cls + pos0, registers (no position embedding), patches + pos].
  tokens0, patches = np.asarray(inter["tokens0"][0]), np.asarray(inter["patches"][0])
  pos = sd["pos_embed"]
  np.testing.assert_array_equal(tokens0[:, 1:5], np.broadcast_to(sd["register_tokens"], (2, 4, 64)))
  cls_pos = np.broadcast_to(sd["cls_token"][0, 0] + pos[0, 0], (2, 64))
  np.testing.assert_allclose(tokens0[:, 0], cls_pos, rtol=0, atol=1e-6)  # one float32 addition
  np.testing.assert_allclose(tokens0[:, 5:], patches + pos[:, 1:], rtol=0, atol=1e-6)
  # Outputs vs the torch restatement: native, REPA (resampled at load), and DINOv2's
  # own interpolation with the _reg settings (antialias, size instead of scale).
  kw = dict(num_heads=HEADS, offset=0.0, antialias=True)
  want = _torch_forward(sd, golden["native_input"], **kw)
  for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
    assert _err(out[k], want[k]) < RESTATE_ATOL, k
  self_out, _ = _run(encoder, params, _nhwc(golden["repa_input"]))
  want = _torch_forward(sd, golden["repa_input"], **kw)
  for k in ("x_norm_regtokens", "x_norm_patchtokens"):
    assert _err(self_out[k], want[k]) < RESTATE_ATOL, k
  enc4, params4 = D.load_dinov2(path, grid=4, num_heads=HEADS)
  repa_out, _ = _run(enc4, params4, _nhwc(golden["repa_input"]))
  want = _torch_forward(sd, golden["repa_input"], repa_grid=4, **kw)
  for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
    assert _err(repa_out[k], want[k]) < RESTATE_ATOL, k
  # With the _reg settings DINOv2's own interpolation IS timm's resample (antialiased
  # bicubic to the output size), so both paths agree to float32 noise.
  assert _err(repa_out["x_norm_patchtokens"], self_out["x_norm_patchtokens"]) < 1e-5


def test_swiglu_ffn(golden, tmp_path):
  """ViT-g's FFN layout (mlp.w12 / mlp.w3), hidden width as SwiGLUFFNFused rounds it."""
  hidden = (int(4 * 64 * 2 / 3) + 7) // 8 * 8  # 176
  sd = _recipe_state_dict(depth=2, ffn_hidden=hidden, swiglu=True)
  path = str(tmp_path / "swiglu.pth")
  torch.save(sd, path)
  encoder, params = D.load_dinov2(path, num_heads=HEADS)
  assert (encoder.ffn_layer, encoder.ffn_hidden) == ("swiglu", hidden)
  out = jax.jit(encoder.apply)({"params": params}, _nhwc(golden["native_input"]))
  want = _torch_forward(sd, golden["native_input"], num_heads=HEADS, offset=0.1, antialias=False)
  assert _err(out["x_norm_patchtokens"], want["x_norm_patchtokens"]) < RESTATE_ATOL


def test_official_layouts_and_heads():
  """Key lists/shapes of the official ViT-B/14 and ViT-g/14 (reg) files, without weights."""
  vitb = D.expected_state_dict_shapes(D.variant("vitb14"))
  assert vitb["pos_embed"] == (1, 1370, 768) and vitb["blocks.11.mlp.fc1.weight"] == (3072, 768)
  assert len(vitb) + 1 == 3 + 2 + 12 * 14 + 2  # + mask_token: the official file's 175 keys
  # ViT-g's per-block layout (2 of its 40 blocks, to keep tracing cheap).
  vitg = D.expected_state_dict_shapes(D.variant("dinov2_vitg14_reg", depth=2))
  assert vitg["register_tokens"] == (1, 4, 1536)
  assert vitg["blocks.1.mlp.w12.weight"] == (8192, 1536)
  assert vitg["blocks.1.mlp.w3.weight"] == (1536, 4096)
  assert not any(k.startswith("blocks.1.mlp.fc") for k in vitg)
  shapes = {k: np.zeros(v, np.float32) for k, v in vitb.items()}
  assert D.config_from_state_dict(shapes, "x")["num_heads"] == 12


# ---------------------------------------------------------------------------
# Loader refusals.
# ---------------------------------------------------------------------------


def _save(sd, tmp_path, name="bad.pth"):
  path = str(tmp_path / name)
  torch.save(sd, path)
  return path


def test_loader_lists_keys_that_do_not_fit(tmp_path):
  sd = torch.load(TINY_PTH, weights_only=True)
  del sd["blocks.1.attn.proj.bias"]
  sd["head.weight"] = torch.zeros(10, 64)
  sd["blocks.0.ls1.gamma"] = torch.zeros(63)
  sd["mask_token"] = torch.zeros(1, 65)
  path = _save(sd, tmp_path)
  with pytest.raises(ConversionError) as e:
    D.load_dinov2(path, num_heads=HEADS)
  msg = str(e.value)
  assert "\n" not in msg and path in msg
  for part in ("missing keys: blocks.1.attn.proj.bias", "unexpected keys: head.weight",
               "blocks.0.ls1.gamma (63,) (expected (64,))",
               "mask_token (1, 65) (expected (1, 64))"):
    assert part in msg, part


def test_loader_accepts_missing_mask_token_and_chunked_blocks(tmp_path, golden):
  sd = torch.load(TINY_PTH, weights_only=True)
  del sd["mask_token"]
  chunked = {(f"blocks.0.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
             for k, v in sd.items()}  # block_chunks=1 layout: blocks.0.<N>.*
  encoder, params = D.load_dinov2(_save(chunked, tmp_path), grid=4, num_heads=HEADS)
  out = jax.jit(encoder.apply)({"params": params}, _nhwc(golden["repa_input"]))
  assert _err(out["x_norm_patchtokens"], golden["repa_x_norm_patchtokens"]) < TOKENS_ATOL


def test_loader_refuses_unreadable_and_odd_files(tmp_path):
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"this is not a checkpoint")
  cases = [
      (str(garbage), "corrupt or not a PyTorch checkpoint"),
      (str(tmp_path / "absent.pth"), "no such file"),
      (_save([torch.zeros(3)], tmp_path, "list.pth"), "expected a flat DINOv2 state_dict"),
      (_save({"model": {"a": torch.zeros(1)}}, tmp_path, "nested.pth"), "expected a tensor"),
      (_save({"a": torch.zeros(1)}, tmp_path, "other.pth"), "not a DINOv2 backbone"),
  ]
  for path, text in cases:
    with pytest.raises(ConversionError, match=text) as e:
      D.load_dinov2(path, num_heads=HEADS)
    assert "\n" not in str(e.value)
  sd = torch.load(TINY_PTH, weights_only=True)
  with pytest.raises(ConversionError, match="pass num_heads"):
    D.load_dinov2(TINY_PTH)  # width 64 is not an official width
  sd["pos_embed"] = torch.zeros(1, 51, 64)
  with pytest.raises(ConversionError, match="not 1 \\+ M\\*M"):
    D.load_dinov2(_save(sd, tmp_path, "pos.pth"), num_heads=HEADS)
  with pytest.raises(UserError, match="grid must be a positive integer"):
    D.load_dinov2(TINY_PTH, grid=0, num_heads=HEADS)


def test_encoder_refuses_bad_input_shapes(native):
  encoder, params, _ = native
  with pytest.raises(UserError, match="multiple of the patch size 14"):
    encoder.apply({"params": params}, np.zeros((1, 50, 56, 3), np.float32))
  with pytest.raises(UserError, match="NHWC"):
    encoder.apply({"params": params}, np.zeros((1, 3, 56, 56), np.float32))


# ---------------------------------------------------------------------------
# Sharded over 8 fake devices: the same numbers as on one device.
# ---------------------------------------------------------------------------

_SHARDED = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from deepflow_jax import sharding
from deepflow_jax.models import dinov2 as D
encoder, params = D.load_dinov2(sys.argv[1], grid=4, num_heads=4)
images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
fn = jax.jit(lambda p, im: encoder.apply({"params": p}, D.preprocess_raw_image(im, 56)))
one = fn(params, images)["x_norm_patchtokens"]
mesh = sharding.data_mesh()
sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
out = fn(params, sharded)["x_norm_patchtokens"]
diff = float(np.abs(np.asarray(out) - np.asarray(one)).max())
print(json.dumps({"devices": len(jax.devices()), "diff": diff,
                  "shards": sorted({s.data.shape[0] for s in out.addressable_shards})}))
"""


def test_sharded_batch_matches_single_device():
  env = cpu_env(8)
  r = subprocess.run([sys.executable, "-c", _SHARDED, TINY_PTH], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["devices"] == 8 and res["shards"] == [1]  # one image per device
  # Same float32 ops on other shapes: only reduction-order noise.
  assert res["diff"] < 1e-5


def test_repa_features_at_real_size(golden, repa):
  """256-pixel uint8 images -> 224 input, grid 16 (the reference's 256 setup), end to end."""
  encoder, params = D.load_dinov2(TINY_PTH, grid=16, num_heads=HEADS)
  images = _nhwc(golden["real_prep_image_uint8"])
  got = jax.jit(lambda p, im: D.repa_features(encoder, p, im))(params, images)
  assert got.shape == (1, 256, 64)
  # Reference: the golden 224 input through the torch restatement, table resampled 7 -> 16.
  want = _torch_forward(torch.load(TINY_PTH, weights_only=True), golden["real_prep_input"],
                        num_heads=HEADS, offset=0.1, antialias=False, repa_grid=16)
  assert _err(got, want["x_norm_patchtokens"]) < TOKENS_ATOL
  with pytest.raises(UserError, match="grid=16"):
    D.repa_features(repa[0], repa[1], images)  # an encoder resampled to grid 4
