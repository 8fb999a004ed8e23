"""Every entry point, fed bad input, ends with exit 2 and ONE ``error:`` line, no traceback,
and leaves its output (workdir, output folder, file) exactly as it was.

One table per entry point. The argparse entry points run in-process (``main(argv)``
returns the status; stderr captured); ``python -m deepflow_jax.main`` (absl flags) runs
as a subprocess. ``{tmp}`` in an argument is the test's temporary folder; the fixture
``files`` builds the inputs the cases point at.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY2T_PT
from deepflow_jax import convert
from deepflow_jax import convert_vae
from deepflow_jax import evaluate
from deepflow_jax import generate
from deepflow_jax import preprocess
from deepflow_jax.models import loading

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIGITS = os.path.join(ROOT, "configs", "digits.py")
VAE_TINY = os.path.join(HERE, "data", "vae_tiny")


def snapshot(path):
  """Every file and folder under ``path`` with its size and mtime (None if absent)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)
  out = {}
  for root, dirs, names in os.walk(path):
    for n in dirs + names:
      p = os.path.join(root, n)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny2t):
  d = tmp_path_factory.mktemp("cli")
  (d / "notackpt.txt").write_text("hello, not a checkpoint\n")
  (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(100))
  (d / "garbage.pth").write_bytes(b"garbage")
  ck = torch.load(TINY2T_PT, weights_only=False)
  torch.save(ck["ema"], d / "bare.pt")  # a bare state_dict: num_heads, df_idxs, legacy_scaling?
  loading.save_converted(str(d / "converted"), *tiny2t)
  (d / "a_file").write_text("x")
  (d / "full").mkdir()
  (d / "full" / "mine.txt").write_text("user data")
  (d / "existing_dir").mkdir()
  (d / "existing_dir" / "keep.txt").write_text("user data")
  np.savez(d / "samples.npz", arr_0=np.zeros((8, 16, 16, 3), np.uint8))
  np.savez(d / "samples_f32.npz", arr_0=np.zeros((8, 16, 16, 3), np.float32))
  np.savez(d / "samples_few.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
  np.savez(d / "not_adm.npz", images=np.zeros((8, 16, 16, 3), np.uint8))
  (d / "images" / "cat").mkdir(parents=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(d / "images" / "cat" / "a.png")
  return d


# (argv, output path to watch, a phrase the error line must contain). Generate/convert
# cases cover the list: SDE steps, guidance interval, corrupt/unsafe files,
# --export onto a directory, a bare state_dict's missing facts, refused outputs.
GENERATE = [
    (["--checkpoint={tmp}/converted", "--output={tmp}/g1", "--num_samples=4", "--num_steps=0"],
     "{tmp}/g1", "--num_steps"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/g2", "--num_samples=4",
      "--guidance_low=0.8", "--guidance_high=0.2", "--cfg_scale=4"], "{tmp}/g2", "guidance_low"),
    (["--checkpoint={tmp}/nope", "--output={tmp}/g3", "--num_samples=4"], "{tmp}/g3",
     "no such checkpoint"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/a_file", "--num_samples=4"],
     "{tmp}/a_file", "not a directory"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/full", "--num_samples=4"], "{tmp}/full",
     "not empty"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/g4", "--num_samples=0"], "{tmp}/g4",
     "--num_samples"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/g5", "--num_samples=4",
      "--per_device_batch=0"], "{tmp}/g5", "--per_device_batch"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/g6", "--num_samples=4",
      "--reference={tmp}/samples.npz"], "{tmp}/g6", "--inception"),
    (["--checkpoint={tmp}/converted", "--output={tmp}/g7", "--num_samples=4", "--sampler=bogus"],
     "{tmp}/g7", "--sampler"),
    (["--output={tmp}/g8", "--num_samples=4"], "{tmp}/g8", "--checkpoint"),
]
CONVERT = [
    (["--checkpoint={tmp}/notackpt.txt", "--output={tmp}/c1"], "{tmp}/c1", "corrupt"),
    (["--checkpoint={tmp}/random.pt", "--output={tmp}/c2"], "{tmp}/c2", "corrupt"),
    (["--checkpoint={tmp}/bare.pt", "--output={tmp}/c3"], "{tmp}/c3",
     "--num_heads"),  # ... and --df_idxs and --legacy_scaling, in the same line
    (["--export", "--input={tmp}/converted", "--output={tmp}/existing_dir", "--force"],
     "{tmp}/existing_dir", "is a directory"),
    (["--checkpoint=" + TINY2T_PT, "--output={tmp}/full", "--force"], "{tmp}/full",
     "not a converted checkpoint"),
    (["--checkpoint=" + TINY2T_PT, "--output={tmp}/converted"], "{tmp}/converted", "--force"),
    (["--export", "--input={tmp}/nope", "--output={tmp}/c4.pt"], "{tmp}/c4.pt",
     "no such checkpoint (expected a converted checkpoint directory"),
    (["--checkpoint=" + TINY2T_PT], "{tmp}/converted", "--output"),
]
CONVERT_VAE = [
    (["--input={tmp}/nope", "--output={tmp}/v1"], "{tmp}/v1", "nope"),
    (["--input=" + VAE_TINY, "--output={tmp}/a_file"], "{tmp}/a_file", "not a directory"),
    (["--input=" + VAE_TINY, "--output={tmp}/full"], "{tmp}/full", "not empty"),
]
PREPROCESS = [
    (["--source=imagefolder:{tmp}/nope", "--vae=" + VAE_TINY, "--output={tmp}/p1"], "{tmp}/p1",
     "nope"),
    (["--source=imagefolder:{tmp}/images", "--vae=" + VAE_TINY, "--output={tmp}/p2",
      "--resolution=0"], "{tmp}/p2", "--resolution"),
    (["--source=imagefolder:{tmp}/images", "--vae=" + VAE_TINY, "--output={tmp}/full"],
     "{tmp}/full", "{tmp}/full"),
    (["--source=imagefolder:{tmp}/images", "--vae=" + VAE_TINY, "--output={tmp}/p3",
      "--format=bogus"], "{tmp}/p3", "--format"),
]
EVALUATE = [
    (["--samples={tmp}/nope.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth"], "{tmp}/e.json", "nope.npz"),
    (["--samples={tmp}/not_adm.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth"], "{tmp}/e.json", "arr_0"),
    (["--samples={tmp}/samples_f32.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth"], "{tmp}/e.json", "uint8"),
    (["--samples={tmp}/samples_few.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth"], "{tmp}/e.json", "samples_few.npz"),
    (["--samples={tmp}/samples.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/missing.pth"], "{tmp}/e.json", "--inception"),
    (["--samples={tmp}/samples.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth", "--output={tmp}/e.json"], "{tmp}/e.json", "garbage.pth"),
    (["--samples={tmp}/samples.npz", "--reference={tmp}/samples.npz",
      "--inception={tmp}/garbage.pth", "--output={tmp}/existing_dir"], "{tmp}/existing_dir",
     "is a directory"),
]
IN_PROCESS = ([(generate, c) for c in GENERATE] + [(convert, c) for c in CONVERT]
              + [(convert_vae, c) for c in CONVERT_VAE] + [(preprocess, c) for c in PREPROCESS]
              + [(evaluate, c) for c in EVALUATE])


def _fill(x, tmp):
  return x.replace("{tmp}", str(tmp))


def _check_one_error_line(err, phrase):
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err, err
  assert phrase in lines[0], (phrase, lines[0])


@pytest.mark.parametrize("module,case", IN_PROCESS,
                         ids=[f"{m.__name__.split('.')[-1]}-{i}" for i, (m, _) in
                              enumerate(IN_PROCESS)])
def test_bad_input_is_one_line_and_touches_nothing(module, case, files, capsys):
  argv, watched, phrase = case
  argv = [_fill(a, files) for a in argv]
  watched = _fill(watched, files)
  before = snapshot(watched)
  try:
    rc = module.main(argv)
  except SystemExit as e:  # argparse's own errors (missing/invalid flags) exit directly
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2, err
  _check_one_error_line(err, _fill(phrase, files))
  assert snapshot(watched) == before


def test_bare_state_dict_lists_every_missing_fact_with_flag_names(files, capsys):
  rc = convert.main([f"--checkpoint={files}/bare.pt", f"--output={files}/c9"])
  err = capsys.readouterr().err
  assert rc == 2 and all(f in err for f in ("--num_heads", "--df_idxs", "--legacy_scaling"))


# python -m deepflow_jax.main: absl flags, so each case is a process of its own.
TINY = ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.model.df_idxs=(1,)", "--config.model.projector_dim=32",
        "--config.loss.scale_weight=(0.2,1.0)", "--config.train.global_batch_size=16"]
MAIN = [
    (["--config.train.num_stpes=10"], "did you mean --config.train.num_steps"),
    # An unknown key beside valid overrides (TINY): the line names that key alone.
    (["--config.eval.digits_every=0"],
     "error: --config.eval.digits_every: unknown config key (did you mean --config.eval."),
    (["--config.train.global_batch_size=abc"], "global_batch_size"),
    (["--config.train.log_every=0"], "train.log_every=0"),
    (["--config.train.ckpt_every=0"], "train.ckpt_every=0"),
    (["--config.train.keep_ckpts=0"], "train.keep_ckpts=0"),
    (["--config.optim.learning_rate=-1"], "optim.learning_rate"),
    (["--config.sample.guidance_low=0.8", "--config.sample.guidance_high=0.2"], "guidance_low"),
    (["--config.sample.num_steps=0"], "sample.num_steps"),
    (["--config.model.df_idxs=(1,x)"], "model.df_idxs"),
    (["--config.train.init_from=/nonexistent"], "train.init_from"),
    (["--bogus=1"], "bogus"),
]


def _main(argv, workdir, config=DIGITS):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "deepflow_jax.main", f"--workdir={workdir}"]
  if config:
    cmd += [f"--config={config}"] + TINY
  return subprocess.run(cmd + argv, capture_output=True, text=True, timeout=300, env=env,
                        cwd=ROOT)


@pytest.mark.parametrize("argv,phrase", MAIN, ids=[a[0].split("=")[0] for a, _ in MAIN])
def test_main_bad_input(argv, phrase, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("the user's")
  before = snapshot(str(workdir))
  r = _main(argv, workdir)
  assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
  _check_one_error_line(r.stderr, phrase)
  assert snapshot(str(workdir)) == before  # no config.json, no checkpoints/, no tb/


@pytest.mark.parametrize("config,phrase", [
    (DIGITS + ":foo", "unknown config argument 'foo'"),
    (os.path.join(ROOT, "configs", "nope.py"), "no such config file"),
    (None, "--config is required"),
])
def test_main_bad_config_file(config, phrase, tmp_path):
  r = _main([], tmp_path / "run", config=config)
  assert r.returncode == 2, r.stderr[-2000:]
  _check_one_error_line(r.stderr, phrase)
  assert not (tmp_path / "run").exists()


def test_cudnn_attention_where_it_cannot_run_falls_back_with_one_warning():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  lines = []
  assert loading.attention_implementation("cudnn", "cpu", jnp.bfloat16, lines.append) is None
  assert len(lines) == 1 and lines[0].startswith("warning: model.attention_impl='cudnn'")
  assert loading.attention_implementation("", "cpu", jnp.float32, lines.append) is None
  assert loading.attention_implementation("xla", "cpu", jnp.float32, lines.append) == "xla"
  assert len(lines) == 1  # auto and xla say nothing
