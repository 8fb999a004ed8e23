"""Checkpoint conversion: architectures, refusals, exact round trips, the CLI."""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from conftest import TINY2T_PT, nhwc
from deepflow_jax import convert
from deepflow_jax.models import loading
from deepflow_jax.torch_io import ConversionError
from torch_reference import DeepFlowTorch, randomize_

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

ATOL = 2e-5  # float32 parity; see test_model.py for the justification


def _load_ck(path=TINY2T_PT):
  with torch.serialization.safe_globals([argparse.Namespace]):
    return torch.load(path, weights_only=True)


def _save_reference(tmp_path, name, tmodel, args):
  sd = tmodel.state_dict()
  path = str(tmp_path / name)
  torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(**args),
              "steps": 7}, path)
  return path


VARIANTS = {
    # 3 branches, qk-norm, legacy scale clipping that really clips, SSL projectors.
    "3t_qknorm_legacy_ssl": dict(
        torch=dict(input_size=8, d=64, depth=6, heads=4, df_idxs=(2, 4), projector_dim=96,
                   ssl_align=True, z_dim=24, legacy=True, qk_norm=True, classes=7),
        args=dict(model="DeepFlow-custom", custom_num_heads=4, df_idxs="[2, 4]", ssl_align=True,
                  legacy_scaling=True, qk_norm=True, resolution=64),
        gain=12.0),
    # A reference model name fixes heads; 2 heads of width 32, patch 2, 16x16 latents.
    "named_model_2t": dict(
        torch=dict(input_size=16, d=384, depth=3, heads=6, df_idxs=(1,), projector_dim=64,
                   classes=5),
        args=dict(model="DeepFlow-S/2", df_idxs="[1]", ssl_align=False, legacy_scaling=False,
                  qk_norm=False, resolution=128),
        gain=1.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_any_reference_architecture_converts_and_matches(tmp_path, variant):
  spec = VARIANTS[variant]
  torch.manual_seed(0)
  tm = DeepFlowTorch(**spec["torch"]).eval()
  randomize_(tm, seed=1, vera_scale_gain=spec["gain"])
  path = _save_reference(tmp_path, "ref.pt", tm, spec["args"])
  model, params = convert.load_torch_checkpoint(path)
  tc = spec["torch"]
  assert (model.hidden_size, model.depth, model.num_heads) == (tc["d"], tc["depth"], tc["heads"])
  assert tuple(model.df_idxs) == tuple(tc["df_idxs"])
  assert model.qk_norm == tc.get("qk_norm", False)
  assert model.legacy_scaling == tc.get("legacy", False)
  assert model.ssl_align == tc.get("ssl_align", False)
  k = len(tc["df_idxs"]) + 1
  rng = np.random.default_rng(0)
  n, s = 3, tc["input_size"]
  x = rng.standard_normal((n, 4, s, s)).astype(np.float32)
  ts = [rng.uniform(size=n).astype(np.float32) for _ in range(k)]
  y = np.array([0, 3, tc.get("classes", 10)])  # the last is the null label
  with torch.no_grad():
    tv, ta, tz = tm(torch.from_numpy(x), [torch.from_numpy(t) for t in ts], torch.from_numpy(y))
  vs, accs, zs = model.apply({"params": params}, nhwc(x), ts, y)
  assert (len(vs), len(accs), len(zs)) == (k, k - 1, (k - 1) if tc.get("ssl_align") else 0)
  for a, b in zip(vs + accs, tv + ta):
    np.testing.assert_allclose(a, nhwc(b.numpy()), atol=ATOL, rtol=0)
  for a, b in zip(zs, tz):
    np.testing.assert_allclose(a, b.numpy(), atol=ATOL, rtol=0)
  if spec["gain"] > 1:  # the clip is active, so legacy_scaling matters for this checkpoint
    other = model.clone(legacy_scaling=False)
    v_other = other.apply({"params": params}, nhwc(x), ts, y)[0][-1]
    assert np.abs(v_other - vs[-1]).max() > 1e-3


def test_round_trip_torch_jax_torch_is_exact():
  ck = _load_ck()
  for w in ("ema", "model"):
    model, params = convert.load_torch_checkpoint(TINY2T_PT, w)
    sd = convert.params_to_state_dict(model, params)
    ref = {k: v.numpy() for k, v in ck[w].items()}
    assert sorted(sd) == sorted(ref)
    for k in ref:
      assert sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype, k
      np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


def test_bare_state_dict_and_safetensors_need_named_options(tmp_path):
  from safetensors.torch import save_file
  ck = _load_ck()
  path = str(tmp_path / "bare.safetensors")
  save_file({k: v.contiguous() for k, v in ck["ema"].items()}, path)
  # Every missing fact in one message, named by its flag.
  with pytest.raises(ConversionError, match="3 architecture fact") as e:
    convert.load_torch_checkpoint(path)
  assert all(f in str(e.value) for f in ("--num_heads", "--df_idxs", "--legacy_scaling"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConversionError, match="1 architecture fact.*--legacy_scaling"):
    convert.load_torch_checkpoint(path, num_heads=4, df_idxs=[2])
  model, params = convert.load_torch_checkpoint(path, num_heads=4, df_idxs=[2],
                                                legacy_scaling=False)
  ref_model, ref_params = convert.load_torch_checkpoint(TINY2T_PT)
  assert loading.model_to_dict(model) == loading.model_to_dict(ref_model)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # A bare .pt state_dict works the same way.
  pt = str(tmp_path / "bare.pt")
  torch.save(ck["ema"], pt)
  _, params_pt = convert.load_torch_checkpoint(pt, num_heads=4, df_idxs="[2]",
                                               legacy_scaling=False)
  jax.tree.map(np.testing.assert_array_equal, params_pt, ref_params)


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (self.target, "w"))


def test_refuses_pickle_that_runs_code(tmp_path):
  target = tmp_path / "pwned.txt"
  path = str(tmp_path / "evil.pt")
  ck = _load_ck()
  ck["payload"] = _Evil(str(target))
  torch.save(ck, path)
  with pytest.raises(ConversionError, match="refused as unsafe: its pickle asks for .*open") as e:
    convert.load_torch_checkpoint(path)
  assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
  assert not target.exists()
  # The payload is live: an unsafe load would have created the file.
  torch.load(path, weights_only=False)
  assert target.exists()


def _mutated(tmp_path, fn):
  ck = _load_ck()
  for w in ("ema", "model"):
    fn(ck[w])
  path = str(tmp_path / "mutated.pt")
  torch.save(ck, path)
  return path


def test_refuses_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
  def mutate(sd):
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    sd["df_blocks.0.acc_norm.mlp.fc1.weight"] = torch.zeros(128, 127)
  path = _mutated(tmp_path, mutate)
  with pytest.raises(ConversionError) as e:
    convert.load_torch_checkpoint(path)
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing keys: blocks.1.attn.proj.bias" in msg
  assert "unexpected keys: blocks.0.extra.weight" in msg
  assert "df_blocks.0.acc_norm.mlp.fc1.weight (128, 127) (expected (128, 128))" in msg


def test_refuses_wrong_shape(tmp_path):
  path = _mutated(tmp_path, lambda sd: sd.__setitem__("final_layer.1.linear.bias",
                                                      torch.zeros(17)))
  with pytest.raises(ConversionError, match=r"final_layer.1.linear.bias \(17,\) \(expected \(16,\)\)"):
    convert.load_torch_checkpoint(path)


def test_refuses_unknown_model_name(tmp_path):
  ck = _load_ck()
  args = vars(ck["args"])
  args["model"] = "DeepFlow-H/2"
  del args["custom_num_heads"]
  path = str(tmp_path / "unknown.pt")
  torch.save(ck, path)
  with pytest.raises(ConversionError, match=r"unknown model name 'DeepFlow-H/2'"):
    convert.load_torch_checkpoint(path)
  # A known name that contradicts the weights is refused too.
  args["model"] = "DeepFlow-XL/2"
  torch.save(ck, path)
  with pytest.raises(ConversionError, match="means width 1152"):
    convert.load_torch_checkpoint(path)


def test_refuses_corrupt_pos_embed_and_missing_weights(tmp_path):
  path = _mutated(tmp_path, lambda sd: sd["pos_embed"].add_(0.5))
  with pytest.raises(ConversionError, match="pos_embed differs"):
    convert.load_torch_checkpoint(path)
  ck = _load_ck()
  del ck["ema"]
  path = str(tmp_path / "noema.pt")
  torch.save(ck, path)
  with pytest.raises(ConversionError, match="no 'ema' weights"):
    convert.load_torch_checkpoint(path)
  with pytest.raises(ConversionError, match="no such file"):
    convert.load_torch_checkpoint(str(tmp_path / "absent.pt"))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "deepflow_jax.convert", *args],
                        capture_output=True, text=True, timeout=300)


def test_cli_convert_load_export_and_refusals(tmp_path, tiny2t):
  out = tmp_path / "converted"
  r = _cli(f"--checkpoint={TINY2T_PT}", f"--output={out}")
  assert r.returncode == 0, r.stderr
  assert "converted" in r.stdout
  model, params = convert.load_converted(str(out))
  ref_model, ref_params = tiny2t
  assert loading.model_to_dict(model) == loading.model_to_dict(ref_model)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  # A non-empty output directory is refused: one line, no traceback, non-zero exit,
  # and the existing conversion is untouched.
  before = sorted(os.listdir(out))
  r = _cli(f"--checkpoint={TINY2T_PT}", f"--output={out}", "--weights=model")
  assert r.returncode != 0
  assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
  assert "already holds a converted checkpoint" in r.stderr
  assert sorted(os.listdir(out)) == before
  _, again = convert.load_converted(str(out))
  jax.tree.map(np.testing.assert_array_equal, again, ref_params)
  # Export back to a reference state_dict: exact.
  pt = tmp_path / "back.pt"
  r = _cli("--export", f"--input={out}", f"--output={pt}")
  assert r.returncode == 0, r.stderr
  back = torch.load(str(pt), weights_only=True)
  ema = _load_ck()["ema"]
  assert sorted(back) == sorted(ema)
  for k in ema:
    assert torch.equal(back[k], ema[k]), k
  # The reference's own layout: {'model', 'ema', 'args' (a plain dict), 'steps'}, read back
  # with weights_only=True as its generate.py does, and converted again without any flag.
  ref_pt = tmp_path / "ref_layout.pt"
  r = _cli("--export", f"--input={out}", f"--output={ref_pt}", "--layout=reference")
  assert r.returncode == 0, r.stderr
  ck = torch.load(str(ref_pt), weights_only=True)
  assert set(ck) == {"model", "ema", "args", "steps"} and isinstance(ck["args"], dict)
  for k in ema:
    assert torch.equal(ck["ema"][k], ema[k]), k
  model2, params2 = convert.load_torch_checkpoint(str(ref_pt))
  assert loading.model_to_dict(model2) == loading.model_to_dict(ref_model)
  jax.tree.map(np.testing.assert_array_equal, params2, ref_params)
  # --force replaces an existing converted checkpoint atomically (nothing left beside it).
  r = _cli(f"--checkpoint={ref_pt}", f"--output={out}", "--force")
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(tmp_path)) == sorted(["back.pt", "converted", "ref_layout.pt"])
  # Export onto a directory is refused in one line and writes nothing.
  r = _cli("--export", f"--input={out}", f"--output={tmp_path}", "--force")
  assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
  assert sorted(os.listdir(tmp_path)) == sorted(["back.pt", "converted", "ref_layout.pt"])
  # A bad input is one line.
  r = _cli(f"--checkpoint={tmp_path / 'nope.pt'}", f"--output={tmp_path / 'o2'}")
  assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr
