"""Training with SSL alignment (REPA): data with images, the frozen encoder in the step, configs.

A tiny SSL DeepFlow (width 32, depth 2, one split, projector 32 -> 64) trains on
a tiny REPA folder (16 examples: 8 x 8 x 4 latents and 64 x 64 PNG crops, the
resolution the latents stand for at VAE downsampling 8) with the tiny DINOv2 of
tests/data/dinov2_tiny.pth (width 64, so model.z_dim = 64; 4 heads). The model's
token grid is G = 8 / 2 = 4, so the encoder's position table is resampled at load
to 4 x 4 and the images are resized to 14 * 4 = 56 pixels: the same rule that
gives the reference's 224 (G = 16) at 256 pixels and 448 (G = 32) at 512.

The runs go through ``python -m deepflow_jax.main`` (1 and 8 fake CPU devices,
a SIGKILL and a resume, the ArrayRecord format). There the encoder is read from
a ``.safetensors`` copy of the tiny checkpoint (the same tensors; the in-process
tests read the ``.pth``), so both file kinds are exercised.

Wall time on the shared 2-core machine under a load average of ~4.8 (other
jobs): 3.6 min (150 s of CPU) with a cold compilation cache, 2.5 min (103 s of
CPU) with a warm one. Most of it is two XLA compilations (1 and 8 devices; the
other runs hit the persistent compilation cache) and the start-up of five
training processes (each ~6.5 s of CPU importing deepflow_jax.main).
"""
import json
import os
import shutil
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import cpu_env
from conftest import main_command
from conftest import restore_state
from deepflow_jax import config_lib
from deepflow_jax import losses
from deepflow_jax import training
from deepflow_jax.training import alignment
from deepflow_jax.data import records
from deepflow_jax.models import dinov2
from deepflow_jax.errors import UserError
from deepflow_jax.models.deepflow import DeepFlow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B2T = os.path.join(ROOT, "configs", "b2t.py")
XL3T = os.path.join(ROOT, "configs", "xl3t.py")
TINY_PTH = os.path.join(HERE, "data", "dinov2_tiny.pth")
N = 16  # examples
RES = 64  # image side: 8 x 8 latents at VAE downsampling 8
STEPS = 3  # checkpoint interval; runs are 2 * STEPS steps

# The tiny SSL model and run on top of configs/b2t.py:ssl.
TINY = {
    "model.input_size": 8, "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2,
    "model.df_idxs": (1,), "model.projector_dim": 32, "model.z_dim": 64,
    "model.encoder_num_heads": 4, "model.num_classes": 4, "train.global_batch_size": 8,
    "train.log_every": 1, "train.num_steps": 2 * STEPS, "train.ckpt_every": STEPS,
    "optim.learning_rate": 3e-3, "sample.grid_classes": 0, "data.num_classes": 4,
}


def _env(devices=1):
  return cpu_env(devices, compile_cache=True)


def _example(rng, i):
  """(moments (8, 8, 8) CHW as REPA stores them, label, uint8 image (RES, RES, 3))."""
  mean = rng.normal(size=(4, 8, 8)).astype(np.float32)
  std = rng.uniform(0.05, 0.2, (4, 8, 8)).astype(np.float32)
  yy, xx = np.mgrid[0:RES, 0:RES]
  base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) * ((i % 3) + 1) / 3
  image = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
  return np.concatenate([mean, std]), i % 4, image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The same 16 examples as a REPA folder with images/ and as ArrayRecord with images."""
  root = tmp_path_factory.mktemp("ssl_data")
  rng = np.random.default_rng(0)
  examples = [_example(rng, i) for i in range(N)]
  repa = root / "repa"
  labels = []
  for i, (moments, label, image) in enumerate(examples):
    name = f"{i // 10:05d}/img-mean-std-{i:08d}.npy"
    (repa / "vae-sd" / name).parent.mkdir(parents=True, exist_ok=True)
    np.save(repa / "vae-sd" / name, moments)
    labels.append([name, label])
    png = repa / "images" / f"{i // 10:05d}" / f"img{i:08d}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(png, compress_level=0)
  with open(repa / "vae-sd" / "dataset.json", "w") as f:
    json.dump({"labels": labels}, f)
  with open(repa / "images" / "dataset.json", "w") as f:  # not an image: not listed
    json.dump({"labels": [[f"img{i:08d}.png", l] for i, (_, l) in enumerate(labels)]}, f)
  ar = root / "ar"
  records.write_latent_dataset(
      ar, [(m[:4].transpose(1, 2, 0), m[4:].transpose(1, 2, 0), l, im) for m, l, im in examples],
      num_examples=N, num_classes=4, num_shards=2, resolution=RES)
  # The tiny DINOv2's tensors as safetensors (what the training subprocesses read).
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from deepflow_jax import torch_io  # pylint: disable=g-import-not-at-top
  sd = torch_io.flat_state_dict(torch_io.load_weights_file(TINY_PTH), TINY_PTH)
  encoder = str(root / "dinov2_tiny.safetensors")
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, encoder)
  return {"repa": str(repa), "ar": str(ar), "encoder": encoder, "examples": examples}


def run_main(workdir, data, *extra, devices=1, check=True, name="repa", kill_at=None):
  """``python -m deepflow_jax.main`` (``kill_at``: ``tests/sigkill_worker.py``, which SIGKILLs
  itself after that step, once the newest checkpoint before it is saved)."""
  overrides = dict(TINY)
  overrides.update({"data.path": data[name], "data.name": {"ar": "arrayrecord"}.get(name, name),
                    "model.encoder_path": data["encoder"]})
  overrides.update(dict(e.split("=", 1) for e in extra))
  cmd = [*main_command(kill_at), f"--config={B2T}:ssl",
         f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(devices),
                     cwd=ROOT)
  if check and r.returncode != 0:
    raise AssertionError(f"main failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
  return r


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {m["step"]: m for m in map(json.loads, f)}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
  """2 * STEPS steps on 1 device, REPA folder with images: (workdir, stdout)."""
  wd = tmp_path_factory.mktemp("straight") / "run"
  r = run_main(wd, data)
  return wd, r.stdout


# ---------------------------------------------------------------------------- the loss


def _reference_projection_loss(zs, zs_tilde):
  """The reference's loop restated: per split and sample, mean over tokens of -cos; / (K * N)."""
  zs = [np.asarray(z, np.float64) for z in zs] * len(zs_tilde)
  total = 0.0
  for z, z_tilde in zip(zs, zs_tilde):
    for z_j, zt_j in zip(z, np.asarray(z_tilde, np.float64)):
      zt_j = zt_j / np.maximum(np.linalg.norm(zt_j, axis=-1, keepdims=True), 1e-12)
      z_j = z_j / np.maximum(np.linalg.norm(z_j, axis=-1, keepdims=True), 1e-12)
      total += np.mean(-(z_j * zt_j).sum(-1))
  return total / (len(zs) * zs[0].shape[0])


def test_projection_loss_is_the_reference_formula():
  """No golden array carries projections (tiny2t has ssl_align=False): a direct restatement.

  Tolerance 1e-6: float32 normalisation and means of O(1) values against float64.
  """
  rng = np.random.default_rng(1)
  target = rng.normal(size=(3, 16, 8)).astype(np.float32)
  zs = [rng.normal(size=(3, 16, 8)).astype(np.float32) for _ in range(2)]
  zs[1][0, 0] = 0  # a zero token: the 1e-12 floor of F.normalize, no NaN
  got = float(losses.projection_loss([jnp.asarray(z) for z in zs], jnp.asarray(target)))
  want = _reference_projection_loss([target], zs)
  assert abs(got - want) < 1e-6, (got, want)
  assert abs(want) > 1e-3  # random directions: small but not zero
  # Aligned projections give -1; the loss module adds proj_coeff times it to the total.
  assert abs(float(losses.projection_loss([jnp.asarray(target) * 3], jnp.asarray(target))) + 1
             ) < 1e-6
  x0 = jnp.zeros((3, 4, 4, 4))
  draws = losses.LossDraws(noise=jnp.asarray(rng.normal(size=x0.shape), jnp.float32),
                           time=jnp.asarray(rng.normal(size=3), jnp.float32),
                           direction=jnp.float32(0.3),
                           gaps=jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32))
  apply_fn = lambda x, t, y: ([x * 0] * 3, [x * 0] * 2, [jnp.asarray(z) for z in zs])
  cfg = losses.LossConfig(scale_weight=(0.2, 0.2, 1.0), proj_coeff=0.5)

  @jax.jit
  def loss(features):
    total, terms = losses.deepflow_loss(apply_fn, x0, jnp.zeros(3, jnp.int32), draws, cfg,
                                        encoder_features=features)
    return total, terms["denoise"], terms["acc"], terms["proj"]

  total, denoise, acc, proj = loss(jnp.asarray(target))
  assert abs(float(proj) - want) < 1e-6
  np.testing.assert_allclose(float(total), float(denoise) + float(acc) + 0.5 * want, rtol=1e-6)


# ---------------------------------------------------------------------------- the encoder


def test_alignment_features_are_the_reference_pipeline_and_frozen():
  """14 G pixels for the model's G x G tokens (224 / 448 at 256 / 512), no gradient."""
  for cfg, res in ((B2T, 256), (XL3T, 256)):
    c = config_lib.load_config(cfg + ":ssl")
    model = DeepFlow(input_size=c.model.input_size, patch_size=c.model.patch_size)
    g = alignment.alignment_grid(model)
    assert (14 * g, g) == dinov2.repa_input_size(res) == (224, 16)
  assert (14 * 32, 32) == dinov2.repa_input_size(512)  # 64 x 64 latents, patch 2
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8))
  encoder, params = dinov2.load_dinov2(TINY_PTH, grid=16, num_heads=4)
  got = jax.jit(lambda p, x: alignment.alignment_features(encoder, p, x))(params, images)
  want = jax.jit(lambda p, x: dinov2.repa_features(encoder, p, x))(params, images)
  assert got.shape == (2, 256, 64) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the same computation
  # The tiny grid: 64-pixel images -> 56 pixels, 4 x 4 patches.
  encoder4, params4 = dinov2.load_dinov2(TINY_PTH, grid=4, num_heads=4)
  small = images[:, :RES, :RES]
  features = lambda p: alignment.alignment_features(encoder4, p, small)
  value, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(features(p) ** 2)))(params4)
  tokens = jax.jit(lambda p: encoder4.apply(
      {"params": p}, dinov2.preprocess_raw_image(small, 56))["x_norm_patchtokens"])(params4)
  assert tokens.shape == (2, 16, 64)
  # One program against another: float32 reassociation only (~1e-6 relative).
  np.testing.assert_allclose(float(value), float(jnp.sum(tokens ** 2)), rtol=1e-5)
  # Frozen: no gradient reaches the encoder's parameters.
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------- configs


def test_ssl_configs(tmp_path):
  for path in (B2T, XL3T):
    c = config_lib.load_config(path + ":ssl")
    plain = config_lib.load_config(path)
    m = c.model
    assert m.ssl_align and m.z_dim == 768 and m.projector_dim == 2048 and m.legacy_scaling
    assert c.loss.proj_coeff == 0.5 and not plain.model.ssl_align
    for k in ("hidden_size", "depth", "df_idxs", "num_heads"):
      assert m[k] == plain.model[k]
    c.data.path = "/data"
    with pytest.raises(UserError, match="model.ssl_align=True needs model.encoder_path"):
      config_lib.validate(c)
    c.model.encoder_path = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="nope.pth'?: no such file"):
      config_lib.validate(c)
    c.model.encoder_path = TINY_PTH
    config_lib.validate(c)
    c.model.df_idxs, c.loss.scale_weight = (), (1.0,)
    with pytest.raises(UserError, match="has no splits"):
      config_lib.validate(c)


def _config(data, overrides):
  c = config_lib.load_config(B2T + ":ssl", **TINY)
  c.data.path, c.model.encoder_path = data["repa"], data["encoder"]
  for k, v in overrides.items():
    sec, leaf = k.split(".")
    c[sec][leaf] = v
  return c


def test_startup_errors_are_one_line_and_leave_the_workdir_untouched(data, tmp_path):
  bad = tmp_path / "garbage.pth"
  bad.write_bytes(b"not a checkpoint at all")
  broken = tmp_path / "broken"
  os.symlink(os.path.join(data["repa"], "vae-sd"), tmp_path / "vae-sd")  # latents, no images/
  cases = [
      ({"model.encoder_path": str(tmp_path / "missing.pth")}, "missing.pth'?: no such file"),
      ({"model.encoder_path": str(bad)}, "model.encoder_path: .*garbage.pth: corrupt"),
      ({"model.z_dim": 32}, r"width 64 but model.z_dim=32; set --config.model.z_dim=64"),
      ({"data.path": str(tmp_path)}, "images: no such folder"),
  ]
  for kw, msg in cases:
    wd = tmp_path / "wd"
    with pytest.raises(UserError, match=msg) as e:
      training.train(_config(data, kw), str(wd))
    assert "\n" not in str(e.value)
    assert not wd.exists()  # refused before anything was written
  # Image and latent counts differ: the pairing by sorted position is refused.
  shutil.copytree(data["repa"], broken)
  os.remove(broken / "images" / "00001" / "img00000015.png")
  with pytest.raises(UserError, match=r"15 image files but .* holds 16 latent files"):
    training.train(_config(data, {"data.path": str(broken)}), str(tmp_path / "wd"))


# ---------------------------------------------------------------------------- training


def test_ssl_training_logs_a_falling_projection_loss(straight):
  wd, out = straight
  assert "SSL alignment: DINOv2 (3 blocks, width 64)" in out and "56-pixel inputs" in out
  m = metrics(wd)
  proj = [m[s]["loss_proj"] for s in range(1, 2 * STEPS + 1)]
  assert all(-1 <= p <= 1 for p in proj)
  # From ~0 (unaligned random projections) clearly down; the step-to-step noise of
  # the batch is ~0.05 here.
  assert np.mean(proj[-2:]) < np.mean(proj[:2]) - 0.15, proj
  assert f" proj {proj[-1]:.4f})" in out  # the progress line shows it
  cfg = json.load(open(wd / "config.json"))
  assert cfg["model"]["ssl_align"] and cfg["model"]["encoder_path"].endswith(".safetensors")
  # The encoder is not part of the checkpoint: only the DeepFlow (with its projectors).
  state = restore_state(wd, 2 * STEPS)
  assert "projectors_0" in state["params"] and "blocks_0" in state["params"]
  assert not any("cls_token" in "/".join(map(str, p)) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state["params"])[0])


def test_eight_devices_match_one(straight, data, tmp_path):
  """The batch (images included) sharded over 8 fake devices gives the 1-device run.

  Tolerances: losses rtol 1e-5: sharded reductions sum in another order (~1e-7
  relative); a sharding bug (a device seeing another's images, say) moves the
  projection loss by > 1e-2. Parameters atol 2e-4 (lr / 15): where a gradient
  entry is ~0 (zero-initialised adaLN and head weights get ~1e-9 at first),
  Adam's m / sqrt(v) turns that reassociation noise into an update of up to
  +-lr = 3e-3; measured 8e-5. A wrong gradient moves parameters by ~lr per step.
  """
  wd, _ = straight
  wd8 = tmp_path / "eight"
  r = run_main(wd8, data, devices=8)
  assert "8 x cpu" in r.stdout and "'data': 8" in r.stdout
  a, b = metrics(wd), metrics(wd8)
  for s in range(1, 2 * STEPS + 1):
    for k in ("loss", "loss_proj", "loss_denoise"):
      np.testing.assert_allclose(b[s][k], a[s][k], rtol=1e-5, err_msg=f"step {s} {k}")
  for x, y in zip(jax.tree.leaves(restore_state(wd, 2 * STEPS)),
                  jax.tree.leaves(restore_state(wd8, 2 * STEPS))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-4, rtol=0)


def test_sigkill_and_resume_with_images_is_bit_identical(straight, data, tmp_path):
  wd, _ = straight
  killed = tmp_path / "killed"
  r = run_main(killed, data, kill_at=STEPS + 1, check=False)
  assert r.returncode == -signal.SIGKILL
  assert sorted(os.listdir(killed / "checkpoints")) == [str(STEPS)]
  r = run_main(killed, data)
  assert f"resumed from {killed / 'checkpoints'}/{STEPS}" in r.stdout
  a, b = restore_state(wd, 2 * STEPS), restore_state(killed, 2 * STEPS)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ma, mb = metrics(wd), metrics(killed)
  for s in range(STEPS + 1, 2 * STEPS + 1):  # the same images after the resume
    assert ma[s]["loss_proj"] == mb[s]["loss_proj"] and ma[s]["loss"] == mb[s]["loss"]


def test_arrayrecord_with_images_trains_like_the_repa_folder(straight, data, tmp_path):
  """The same examples in the project's format: the same batches, so the same losses exactly."""
  wd, _ = straight
  ar = tmp_path / "ar"
  run_main(ar, data, f"train.num_steps={STEPS}", name="ar")
  a, b = metrics(wd), metrics(ar)
  for s in range(1, STEPS + 1):
    for k in ("loss", "loss_proj", "loss_denoise", "loss_acc"):
      assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
