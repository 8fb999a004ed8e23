"""python -m deepflow_jax.generate: device/batch invariance, resume, refusals, image outputs.

Runs that need fake CPU devices go through a subprocess, because
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is
imported. Samples are compared bitwise where every device runs blocks of at least
4 samples (8 model rows under CFG); with fewer rows per device XLA's CPU matmul
takes a different kernel (measured: 1-3 rows vs 4+ rows differ by ~1e-6 in one
model call), so that case is compared to 1e-4 (measured max difference 3.8e-6 on
outputs up to ~15 after 4 guided SDE steps).
"""
import json
import os
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cpu_env
from deepflow_jax import generate
from deepflow_jax import generation
from deepflow_jax import images as images_lib
from deepflow_jax import sampling
from deepflow_jax.models import loading
from deepflow_jax.models.loading import save_converted
from deepflow_jax.models import DeepFlow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--num_samples=10", "--num_steps=4", "--cfg_scale=3.0", "--guidance_high=0.7",
          "--seed=7"]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent XLA cache shared by this module's subprocesses (same programs compile once)."""
  global _CACHE_DIR
  _CACHE_DIR = str(tmp_path_factory.mktemp("xla_cache"))
  yield
  _CACHE_DIR = None


_CACHE_DIR = None


def _run(args, devices=1, check=True):
  env = cpu_env(devices)
  if _CACHE_DIR:
    env.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, "-m", "deepflow_jax.generate"] + list(args), cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f"generate failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def _random_params(model, scale):
  """N(0, scale^2) for every parameter of ``model`` (shapes via eval_shape: no eager init)."""
  c, k = model.in_channels, model.num_branches
  shapes = flax.linen.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, model.input_size, model.input_size, c)),
      [jnp.ones((1,))] * k, jnp.zeros((1,), jnp.int32))["params"])
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(key, l.shape)
                                      for key, l in zip(keys, leaves)])


def _samples(out):
  with np.load(os.path.join(out, "samples.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny2t):
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny2t")
  save_converted(path, *tiny2t)
  return path


@pytest.fixture(scope="module")
def base_run(ckpt, tmp_path_factory):
  """1 device, 4 per device: three batches (4, 4, 2 + 2 padding)."""
  out = str(tmp_path_factory.mktemp("gen") / "base")
  proc = _run([f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=4"] + COMMON)
  return out, proc


def test_output_layout_and_progress(base_run, tiny2t):
  out, proc = base_run
  s = _samples(out)
  assert set(s) == {"latents", "labels"}  # latent model, no --vae: no images
  assert s["latents"].shape == (10, 8, 8, 4) and s["latents"].dtype == np.float32
  assert s["labels"].dtype == np.int32 and s["labels"].min() >= 0 and s["labels"].max() < 10
  assert sorted(os.listdir(os.path.join(out, "latents"))) == [
      "batch_00000000.npy", "batch_00000004.npy", "batch_00000008.npy"]
  assert "samples/s" in proc.stdout and "ETA" in proc.stdout
  # Each sample is the library sampler run on its own (seed, index) inputs.
  model, params = tiny2t
  idx = jnp.arange(10, dtype=jnp.int32)
  z, y, keys = sampling.sample_inputs(model, 7, idx, "random")
  np.testing.assert_array_equal(s["labels"], y)
  ref = sampling.sample(model, params, z, y,
                        sampling.SamplerSettings("sde", 4, cfg_scale=3.0, guidance_high=0.7),
                        rng=keys)
  np.testing.assert_allclose(s["latents"], ref, atol=1e-4, rtol=0)
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert manifest["settings"]["cfg_scale"] == 3.0 and manifest["settings"]["num_samples"] == 10


def test_same_samples_for_any_device_count_and_batch(base_run, ckpt, tmp_path):
  base = _samples(base_run[0])
  for devices, per_device in ((8, 4), (1, 8)):
    out = str(tmp_path / f"d{devices}_b{per_device}")
    _run([f"--checkpoint={ckpt}", f"--output={out}", f"--per_device_batch={per_device}"]
         + COMMON, devices=devices)
    s = _samples(out)
    np.testing.assert_array_equal(s["labels"], base["labels"])
    np.testing.assert_array_equal(s["latents"], base["latents"])
  out = str(tmp_path / "d8_b1")  # 1 sample per device: other CPU matmul kernels
  _run([f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=1"] + COMMON, devices=8)
  s = _samples(out)
  np.testing.assert_array_equal(s["labels"], base["labels"])
  np.testing.assert_allclose(s["latents"], base["latents"], atol=1e-4, rtol=0)


def test_interrupted_run_resumes_to_the_same_output(base_run, ckpt, tmp_path):
  out = str(tmp_path / "resume")
  args = [f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=4"] + COMMON
  # The run of COMMON's settings stopped after its first batch, as a signal would stop it.
  model, params = loading.load_model(ckpt)
  settings = generation.GenerationSettings(
      10, sampling.SamplerSettings("sde", 4, cfg_scale=3.0, guidance_high=0.7), seed=7)
  res = generation.generate_to_folder(model, params, out, settings, per_device_batch=4,
                                      checkpoint=ckpt, should_stop=lambda: True)
  assert res.samples_npz is None and res.stopped == 0
  assert os.listdir(os.path.join(out, "latents")) == ["batch_00000000.npy"]
  assert not os.path.exists(os.path.join(out, "samples.npz"))
  first = np.load(os.path.join(out, "latents", "batch_00000000.npy"))
  # A write cut short leaves only a temporary file; the resumed run ignores and removes it.
  with open(os.path.join(out, "latents", "batch_00000004.npy.tmp-999"), "wb") as f:
    f.write(b"partial")
  # Resume with another batch size (8): only samples 4..9 are made, in one batch.
  proc = _run(args[:2] + ["--per_device_batch=8"] + COMMON)
  assert "4 already done" in proc.stdout and "(resumed)" in proc.stdout
  np.testing.assert_array_equal(np.load(os.path.join(out, "latents", "batch_00000000.npy")), first)
  assert not any(".tmp" in n for n in os.listdir(os.path.join(out, "latents")))
  s, base = _samples(out), _samples(base_run[0])
  np.testing.assert_array_equal(s["labels"], base["labels"])
  np.testing.assert_array_equal(s["latents"], base["latents"])


def test_refuses_different_settings(base_run, ckpt, capsys):
  out = base_run[0]
  before = {n: os.path.getmtime(os.path.join(out, "latents", n))
            for n in os.listdir(os.path.join(out, "latents"))}
  manifest = open(os.path.join(out, "manifest.json")).read()
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=4",
                      "--num_samples=10", "--num_steps=4", "--cfg_scale=4.0",
                      "--guidance_high=0.7", "--seed=7"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1
  assert "other settings" in err and "cfg_scale: 3.0 there, 4.0 now" in err
  assert open(os.path.join(out, "manifest.json")).read() == manifest
  assert before == {n: os.path.getmtime(os.path.join(out, "latents", n))
                    for n in os.listdir(os.path.join(out, "latents"))}


def test_missing_or_wrong_checkpoint_is_one_line(tmp_path, capsys):
  for path, msg in ((tmp_path / "nope", "no such checkpoint"),
                    (tmp_path, "not a converted checkpoint or training workdir")):
    rc = generate.main([f"--checkpoint={path}", f"--output={tmp_path / 'o'}", "--num_samples=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and msg in err, err
    assert err.startswith("error: ")


def test_model_loader_hook(tmp_path, tiny2t):
  marker = tmp_path / "workdir"
  marker.mkdir()
  loading.register_model_loader("test-workdir", lambda p: os.path.basename(p) == "workdir",
                                 lambda p, dtype: tiny2t)
  try:
    model, _ = loading.load_model(str(marker))
    assert model is tiny2t[0]
  finally:
    loading.MODEL_LOADERS[:] = [l for l in loading.MODEL_LOADERS if l.name != "test-workdir"]


def test_pixel_space_model_writes_pngs_and_adm_npz(tmp_path):
  from PIL import Image
  model = DeepFlow(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                   num_heads=2, num_classes=10, df_idxs=(1,), projector_dim=32)
  params = _random_params(model, 0.1)
  ckpt, out = str(tmp_path / "digits"), str(tmp_path / "out")
  save_converted(ckpt, model, params)
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--num_samples=3",
                      "--sampler=euler", "--num_steps=2", "--per_device_batch=2",
                      "--labels=cycle"])
  assert rc == 0
  s = _samples(out)
  assert s["arr_0"].shape == (3, 8, 8, 3) and s["arr_0"].dtype == np.uint8
  assert s["latents"].shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(s["labels"], [0, 1, 2])
  expect = np.clip((s["latents"] + 1) / 2 * 255, 0, 255).astype(np.uint8).repeat(3, axis=-1)
  np.testing.assert_array_equal(s["arr_0"], expect)
  for i in range(3):
    png = np.asarray(Image.open(os.path.join(out, "images", f"{i:06d}.png")))
    np.testing.assert_array_equal(png, s["arr_0"][i])
  assert len(np.unique(s["arr_0"])) > 10  # not a constant image


def test_pixel_model_with_vae_is_refused(tmp_path, capsys):
  model = DeepFlow(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                   num_heads=2, num_classes=10, df_idxs=())
  params = _random_params(model, 0.0)
  ckpt = str(tmp_path / "rgb")
  save_converted(ckpt, model, params)
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={tmp_path / 'o'}", "--num_samples=1",
                      f"--vae={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "pixel space" in err
  assert not os.path.exists(tmp_path / "o")


def test_vae_decodes_latents_to_pngs_and_adm_npz(ckpt, tmp_path):
  from PIL import Image
  from deepflow_jax.models import vae as vae_lib
  vae_dir = os.path.join(ROOT, "tests", "data", "vae_tiny")  # 4 latent channels, 4x upsampling
  out = str(tmp_path / "out")
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--num_samples=2",
                      "--sampler=euler", "--num_steps=1", "--per_device_batch=2",
                      f"--vae={vae_dir}"])
  assert rc == 0
  s = _samples(out)
  assert s["arr_0"].shape == (2, 32, 32, 3) and s["arr_0"].dtype == np.uint8
  vae, vparams = vae_lib.load_diffusers_vae(vae_dir)
  decoded = vae.apply({"params": vparams}, jnp.asarray(s["latents"]) / 0.18215,
                      method=vae.decode)
  expect = np.asarray(images_lib.to_uint8(np.asarray(decoded)))
  # Same formula; jit vs eager float32 may flip a truncation by one level.
  assert np.abs(s["arr_0"].astype(int) - expect).max() <= 1
  assert (s["arr_0"] == expect).mean() > 0.99
  for i in range(2):
    np.testing.assert_array_equal(
        np.asarray(Image.open(os.path.join(out, "images", f"{i:06d}.png"))), s["arr_0"][i])


def test_evaluation_at_the_end(tmp_path, capsys, monkeypatch):
  """--reference/--inception: suite.evaluate_files on samples.npz, metrics JSON in the output.

  The metrics themselves are tested in test_evaluate.py / test_metrics.py; this checks the
  wiring (what is passed, what is written) with the evaluation replaced by a recorder.
  """
  from deepflow_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  model = DeepFlow(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                   num_heads=2, num_classes=10, df_idxs=())
  ckpt = str(tmp_path / "rgb")
  save_converted(ckpt, model, _random_params(model, 0.02))
  ref = str(tmp_path / "ref.npz")
  np.savez(ref, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
  weights = tmp_path / "pt_inception.pth"
  weights.write_bytes(b"not read by the recorder")
  calls = []

  def record(samples, reference, inception, **kw):
    calls.append((samples, reference, inception))
    with np.load(samples) as f:
      n = len(f["arr_0"])
    return {"fid": 1.5, "sfid": 2.5, "inception_score": float("nan"), "precision": 0.5,
            "recall": 0.25, "num_samples": n, "settings": {"samples": samples}}

  monkeypatch.setattr(suite, "evaluate_files", record)
  out = tmp_path / "out"
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--num_samples=5",
                      "--num_steps=2", f"--reference={ref}", f"--inception={weights}"])
  assert rc == 0, capsys.readouterr().err
  assert calls == [(str(out / "samples.npz"), ref, str(weights))]
  res = json.load(open(out / "metrics.json"))
  assert res["fid"] == 1.5 and res["inception_score"] is None and res["num_samples"] == 5
  assert "FID" in capsys.readouterr().out  # the table
  # Checked before any sampling: a latent model without --vae, a missing weights file.
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={tmp_path / 'o2'}", "--num_samples=5",
                      f"--reference={ref}", f"--inception={tmp_path / 'missing.pth'}"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "--inception" in err
  assert not os.path.exists(tmp_path / "o2")


def test_sigterm_keeps_finished_batches_and_the_rerun_completes(base_run, ckpt, tmp_path, capsys,
                                                                monkeypatch):
  """SIGTERM after the first batch: exit 143, one line, the batch kept; the rerun = clean run."""
  from deepflow_jax import generation, outputs  # pylint: disable=g-import-not-at-top
  save = outputs.atomic_save_npy
  calls = []

  def save_then_sigterm(path, array):
    save(path, array)
    if "latents" in path:
      calls.append(path)
      if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by generation's StopRequests

  monkeypatch.setattr(generation.outputs, "atomic_save_npy", save_then_sigterm)
  out = str(tmp_path / "out")
  rc = generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=4"] + COMMON)
  cap = capsys.readouterr()
  assert rc == 143 and "SIGTERM" in cap.out and "rerun the same command" in cap.out
  assert os.listdir(os.path.join(out, "latents")) == ["batch_00000000.npy"]
  assert not os.path.exists(os.path.join(out, "samples.npz"))
  monkeypatch.setattr(generation.outputs, "atomic_save_npy", save)
  assert generate.main([f"--checkpoint={ckpt}", f"--output={out}", "--per_device_batch=4"]
                       + COMMON) == 0
  a, b = _samples(base_run[0]), _samples(out)
  np.testing.assert_array_equal(a["labels"], b["labels"])
  np.testing.assert_array_equal(a["latents"], b["latents"])


def test_sampling_dtype_auto_is_bf16_on_accelerators_only():
  """--dtype=auto (the default): float32 on CPU, bfloat16 on GPU/TPU; names pass through."""
  assert loading.sampling_dtype("auto", "cpu") == "float32"
  assert loading.sampling_dtype("auto", "gpu") == "bfloat16"
  assert loading.sampling_dtype("auto", "tpu") == "bfloat16"
  assert loading.sampling_dtype("auto") == "float32"  # this suite runs on the CPU
  assert loading.sampling_dtype("float32", "gpu") == "float32"
  assert loading.sampling_dtype("bfloat16", "cpu") == "bfloat16"
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="got 'float16'"):
    loading.sampling_dtype("float16")
  args = generate._parser().parse_args(  # pylint: disable=protected-access
      ["--checkpoint=c", "--output=o", "--num_samples=1"])
  assert args.dtype == "auto"
