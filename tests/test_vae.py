"""SD-VAE (deepflow_jax.vae) parity with diffusers, weight conversion, convert_vae CLI.

Golden data in tests/data/ (copied from the reference run, see vae_tiny.json):
vae_tiny/ is a diffusers folder of a small AutoencoderKL with random weights,
vae_tiny.npz holds its float32 outputs (NCHW) and vae_tiny_f64.npz the same
outputs computed in float64; sd_vae_ft_ema_keys.json lists every key and shape
of the real stabilityai/sd-vae-ft-ema.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow_jax import convert_vae
from deepflow_jax import images as images_lib
from deepflow_jax.models import vae as V
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import flatten_tree

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY_DIR = os.path.join(DATA, "vae_tiny")
INPUTS = ("x", "z", "eps", "extreme_moments")


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def _nchw(a):
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(DATA, "vae_tiny.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def golden_meta():
  with open(os.path.join(DATA, "vae_tiny.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def keys_json():
  with open(os.path.join(DATA, "sd_vae_ft_ema_keys.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def tiny():
  return V.load_diffusers_vae(TINY_DIR)


@pytest.fixture(scope="module")
def tiny_state_dict():
  sd, _ = V.load_diffusers_state_dict(TINY_DIR)
  return sd


def _flax_names(dotted):
  out = []
  for part in dotted.split("."):
    if part.isdigit():
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return out


def compute_outputs(vae, params, g, names_wanted):
  """Runs the model like the reference recording; returns {name: NCHW array}."""
  p = {"params": params}
  dt = vae.dtype
  x, z, eps = (jnp.asarray(_nhwc(g[k]), dt) for k in ("x", "z", "eps"))
  out = {}
  moments, enc_state = vae.apply(p, x, method=vae.encode_moments,
                                 capture_intermediates=True,
                                 mutable=["intermediates"])
  enc_inter = enc_state["intermediates"]["encoder"]
  out["enc_raw"] = enc_inter["__call__"][0]
  out["enc_moments"] = moments
  mean, std = vae.apply(p, x, method=vae.encode)
  post = V.posterior_from_moments(moments)
  np.testing.assert_array_equal(np.asarray(mean), np.asarray(post.mean))
  np.testing.assert_array_equal(np.asarray(std), np.asarray(post.std))
  out.update(latent_mean=mean, latent_std=std, latent_logvar=post.logvar,
             latent_var=post.var, latent_sample=post.sample(eps))
  clamp = V.posterior_from_moments(jnp.asarray(_nhwc(g["extreme_moments"]), dt))
  out.update(clamp_mean=clamp.mean, clamp_logvar=clamp.logvar,
             clamp_std=clamp.std)
  pqc = lambda m, v: m.post_quant_conv(v)
  out["post_quant_conv_z"] = vae.apply(p, z, method=pqc)
  dec, dec_state = vae.apply(p, z, method=vae.decode, capture_intermediates=True,
                             mutable=["intermediates"])
  dec_inter = dec_state["intermediates"]["decoder"]
  out["decode_z"] = dec
  z_scaled = z / V.LATENT_SCALE
  out["z_div_scaling"] = z_scaled
  out["post_quant_conv_z_div_scaling"] = vae.apply(p, z_scaled, method=pqc)
  out["decode_z_div_scaling"] = vae.apply(p, z_scaled, method=vae.decode)
  out["decode_mean"] = vae.apply(p, mean, method=vae.decode)
  out["forward_mean"] = vae.apply(p, x)
  for name in names_wanted:
    for prefix, tree in (("enc_inter.", enc_inter), ("dec_inter.", dec_inter)):
      if name.startswith(prefix):
        node = tree
        for part in _flax_names(name[len(prefix):]):
          node = node[part]
        out[name] = node["__call__"][0]
  return {k: _nchw(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def outputs_f32(tiny, golden):
  vae, params = tiny
  return compute_outputs(vae, params, golden, golden)


# ----------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------


def test_every_golden_array_is_covered(golden, golden_meta, outputs_f32):
  assert set(golden_meta["arrays"]) == set(golden)
  assert set(outputs_f32) == set(golden) - set(INPUTS)


@pytest.mark.parametrize("name", sorted(
    set(np.load(os.path.join(DATA, "vae_tiny.npz")).files) - set(INPUTS)))
def test_float32_parity(name, golden, outputs_f32):
  got, want = outputs_f32[name], golden[name]
  assert got.shape == want.shape and got.dtype == np.float32
  if name.startswith("clamp_"):
    # logvar spans [-60, 50]: std runs from exp(-15) to exp(10); compare relatively.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_logvar_clamp(golden, outputs_f32):
  logvar = outputs_f32["clamp_logvar"]
  assert logvar.min() == -30.0 and logvar.max() == 20.0
  raw = golden["extreme_moments"][:, 4:]
  assert raw.min() < -30 and raw.max() > 20  # the clamp is really exercised
  np.testing.assert_array_equal(outputs_f32["clamp_mean"], golden["extreme_moments"][:, :4])


def test_float64_parity(golden):
  with np.load(os.path.join(DATA, "vae_tiny_f64.npz")) as f:
    want = {k: f[k] for k in f.files}
  with jax.enable_x64(True):
    vae, params = V.load_diffusers_vae(TINY_DIR, dtype=jnp.float64)
    assert vae.dtype == jnp.float64 and vae.param_dtype == jnp.float64
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(params))
    g64 = {k: golden[k].astype(np.float64) for k in INPUTS}
    got = compute_outputs(vae, params, g64, ())
  assert set(want) <= set(got)
  for name, ref in want.items():
    assert got[name].dtype == np.float64, name
    np.testing.assert_allclose(got[name], ref, rtol=1e-12, atol=1e-9, err_msg=name)
  assert not jax.config.jax_enable_x64  # restored for the other tests


def test_sample_posterior_call(tiny, golden):
  vae, params = tiny
  x = jnp.asarray(_nhwc(golden["x"]))
  out = vae.apply({"params": params}, x, sample_posterior=True,
                  rngs={"sample": jax.random.PRNGKey(0)})
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------
# Decode formula and constants
# ----------------------------------------------------------------------------


def test_images_to_uint8_truncates():
  x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, np.nan, 2 * 77.9 / 255 - 1],
               np.float32)
  want = np.array([0, 0, 127, 254, 255, 255, 0, 77], np.uint8)
  got_np = images_lib.to_uint8(x)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == np.uint8
  np.testing.assert_array_equal(got_np, want)
  got_jax = images_lib.to_uint8(jnp.asarray(x))
  assert got_jax.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(got_jax), want)


def test_images_to_uint8_on_decoded(golden):
  img = _nhwc(golden["decode_z_div_scaling"])
  want = np.clip((img + 1) / 2 * 255, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(images_lib.to_uint8(jnp.asarray(img))), want)


def test_constants(keys_json, tiny):
  assert V.LATENT_SCALE == 0.18215
  cfg = {k: v for k, v in V.SD_VAE_CONFIG.items() if not k.startswith("_")}
  cfg.pop("scaling_factor")
  assert cfg == keys_json["constructor_kwargs"]
  vae, _ = tiny
  assert vae.latent_scale == V.LATENT_SCALE and vae.downsample_factor == 4


# ----------------------------------------------------------------------------
# Conversion of the real sd-vae-ft-ema key list
# ----------------------------------------------------------------------------


def _fake_state_dict(key_shapes):
  """{key: constant array} where the constant is the key's index; no memory used."""
  return {k: np.broadcast_to(np.float32(i), tuple(s))
          for i, (k, s) in enumerate(key_shapes)}


@pytest.mark.parametrize("generation", ["current", "legacy"])
def test_real_sd_vae_keys_convert(keys_json, generation):
  keys = [(e["key"], e["shape"]) for e in keys_json["state_dict_keys"]]
  assert len(keys) == keys_json["num_keys"] == 248
  if generation == "legacy":
    to_old = {new: old for old, new in keys_json["legacy_attention_key_map"].items()}
    assert len(to_old) == 16
    keys = [(to_old.get(k, k), s) for k, s in keys]
    assert sum(k in keys_json["legacy_attention_key_map"] for k, _ in keys) == 16
  index = {V.normalize_state_dict({k: np.zeros(0)}).popitem()[0]: i
           for i, (k, _) in enumerate(keys)}
  vae = V.AutoencoderKL.from_config(keys_json["config_json_current_diffusers_would_write"])
  params = V.convert_state_dict(_fake_state_dict(keys), vae, source="sd-vae-ft-ema")
  abstract = V.abstract_params(vae)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
  for (path, leaf), (_, ref) in zip(flatten_tree(params), flatten_tree(abstract)):
    assert leaf.shape == ref.shape, path
    # Every Flax leaf holds the tensor of the key it is named after.
    assert float(leaf.flat[0]) == index[V.flax_path_to_torch_key(path)], path
  assert V.count_params(params) == keys_json["num_params"] == 83_653_863
  assert len(jax.tree_util.tree_leaves(params)) == 248


def test_real_sd_vae_hub_config_defaults(keys_json):
  # The hub config.json (diffusers 0.4.2) has none of the newer fields.
  old = {k: v for k, v in keys_json["constructor_kwargs"].items()}
  old.update(_class_name="AutoencoderKL", _diffusers_version="0.4.2")
  vae = V.AutoencoderKL.from_config(old)
  want = {e["key"]: tuple(e["shape"]) for e in keys_json["state_dict_keys"]}
  assert V.expected_state_dict_shapes(vae) == want
  assert vae.latent_scale == V.LATENT_SCALE


def test_optional_parts_follow_config(tiny):
  cfg = V.read_config(TINY_DIR)
  cfg.update(use_quant_conv=False, use_post_quant_conv=False,
             mid_block_add_attention=False)
  keys = V.expected_state_dict_shapes(V.AutoencoderKL.from_config(cfg))
  assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in keys)
  assert not any(".attentions." in k for k in keys)
  full = V.expected_state_dict_shapes(tiny[0])
  assert len(full) - len(keys) == 4 + 2 * 10  # 2 1x1 convs; 2 attentions (norm + 4 linears)


def test_unsupported_config_refused():
  cfg = V.read_config(TINY_DIR)
  with pytest.raises(ConversionError, match="AttnDownEncoderBlock2D"):
    V.AutoencoderKL.from_config(
        dict(cfg, down_block_types=["AttnDownEncoderBlock2D"] * 3))
  with pytest.raises(ConversionError, match="UNet2DConditionModel"):
    V.AutoencoderKL.from_config(dict(cfg, _class_name="UNet2DConditionModel"))


# ----------------------------------------------------------------------------
# Other weight files: legacy names, .bin, 1x1-conv attention
# ----------------------------------------------------------------------------


def _write_folder(path, state_dict, fmt="safetensors"):
  os.makedirs(path, exist_ok=True)
  shutil.copyfile(os.path.join(TINY_DIR, "config.json"), os.path.join(path, "config.json"))
  if fmt == "safetensors":
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(path, "diffusion_pytorch_model.safetensors"))
  else:
    import torch
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               os.path.join(path, "diffusion_pytorch_model.bin"))
  return path


def _assert_same_params(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _legacy(sd):
  rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  out = {}
  for k, v in sd.items():
    for new, old in rename.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    out[k] = v
  return out


def test_legacy_attention_names_bin_and_conv1x1(tmp_path, tiny, tiny_state_dict):
  legacy = _legacy(tiny_state_dict)
  assert sum(".query." in k or ".proj_attn." in k for k in legacy) == 8
  _, p = V.load_diffusers_vae(_write_folder(str(tmp_path / "legacy"), legacy))
  _assert_same_params(p, tiny[1])
  _, p = V.load_diffusers_vae(_write_folder(str(tmp_path / "bin"), legacy, fmt="bin"))
  _assert_same_params(p, tiny[1])
  conv = {k: (v[:, :, None, None] if ".attentions.0." in k and v.ndim == 2 else v)
          for k, v in legacy.items()}
  params = V.convert_state_dict(conv, tiny[0])
  _assert_same_params(jax.tree_util.tree_map(jnp.asarray, params), tiny[1])


# ----------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------


def test_refuses_missing_unexpected_misshaped_in_one_error(tiny, tiny_state_dict):
  sd = dict(tiny_state_dict)
  del sd["decoder.up_blocks.1.resnets.0.conv1.weight"]
  sd["encoder.extra.weight"] = np.zeros(3, np.float32)
  sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ConversionError) as e:
    V.convert_state_dict(sd, tiny[0], source="bad.safetensors")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("bad.safetensors")
  assert "missing keys: decoder.up_blocks.1.resnets.0.conv1.weight" in msg
  assert "unexpected keys: encoder.extra.weight" in msg
  assert "quant_conv.weight (8, 8, 3, 3) (expected (8, 8, 1, 1))" in msg


@pytest.mark.parametrize("edit,expect", [
    ("missing", "missing keys: encoder.mid_block.attentions.0.to_v.bias"),
    ("unexpected", "unexpected keys: decoder.mid_block.attentions.0.to_w.weight"),
    ("shape", "mis-shaped: encoder.conv_in.weight (32, 3, 5, 5)"),
    ("duplicate", "unexpected keys: encoder.mid_block.attentions.0.query.weight"),
])
def test_refusal_names_the_key(tmp_path, tiny_state_dict, edit, expect):
  sd = dict(tiny_state_dict)
  if edit == "missing":
    del sd["encoder.mid_block.attentions.0.to_v.bias"]
  elif edit == "unexpected":
    sd["decoder.mid_block.attentions.0.to_w.weight"] = np.zeros((64, 64), np.float32)
  elif edit == "shape":
    sd["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  else:  # a legacy key next to its current name must not be dropped silently
    sd["encoder.mid_block.attentions.0.query.weight"] = sd[
        "encoder.mid_block.attentions.0.to_q.weight"]
  with pytest.raises(ConversionError, match="state_dict does not match") as e:
    V.load_diffusers_vae(_write_folder(str(tmp_path / edit), sd))
  assert expect in str(e.value)


def test_refuses_non_vae_folders(tmp_path):
  with pytest.raises(ConversionError, match="no config.json"):
    V.load_diffusers_vae(str(tmp_path))
  shutil.copyfile(os.path.join(TINY_DIR, "config.json"), tmp_path / "config.json")
  with pytest.raises(ConversionError, match="no diffusion_pytorch_model"):
    V.load_diffusers_vae(str(tmp_path))


# ----------------------------------------------------------------------------
# convert_vae CLI
# ----------------------------------------------------------------------------


def test_cli_round_trip(tmp_path, tiny, capsys):
  out = str(tmp_path / "orbax")
  assert convert_vae.main([f"--input={TINY_DIR}", f"--output={out}"]) == 0
  printed = capsys.readouterr().out
  assert "954,567 parameters" in printed and "152 arrays" in printed
  assert sorted(os.listdir(out)) == ["config.json", "params"]
  with open(os.path.join(out, "config.json"), "rb") as f1, \
       open(os.path.join(TINY_DIR, "config.json"), "rb") as f2:
    assert f1.read() == f2.read()
  vae, params = V.load_diffusers_vae(out)
  assert vae == tiny[0]
  _assert_same_params(params, tiny[1])
  # --force rewrites in place.
  assert convert_vae.main([f"--input={TINY_DIR}", f"--output={out}", "--force"]) == 0
  _assert_same_params(V.load_diffusers_vae(out)[1], tiny[1])
  # A converted folder whose config no longer fits its params is refused.
  cfg = V.read_config(out)
  cfg["layers_per_block"] = 2
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  with pytest.raises(ConversionError, match="missing keys: decoder/up_blocks_0/resnets_2"):
    V.load_diffusers_vae(out)


def test_cli_refuses_non_empty_output(tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  assert convert_vae.main([f"--input={TINY_DIR}", f"--output={out}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "not empty" in err and "--force" in err
  assert os.listdir(out) == ["keep.txt"]


def test_cli_module_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "deepflow_jax.convert_vae",
       f"--input={tmp_path / 'nowhere'}", f"--output={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
  assert not os.path.exists(tmp_path / "out")
