"""The training system: sharded step, multi-process, checkpoints and exact resume, configs, main.

Runs of ``python -m deepflow_jax.main`` use a tiny DeepFlow on the digits data
(width 32, depth 2, one split) so each takes seconds.
"""
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_MAIN as TINY
from conftest import cpu_env
from conftest import main_command
from conftest import restore_state

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DIGITS = os.path.join(ROOT, "configs", "digits.py")



def _env(devices=1):
  return cpu_env(devices, compile_cache=True)


def run_main(workdir, *overrides, devices=1, timeout=300, check=True, config=DIGITS, tiny=True,
             kill_at=None):
  """``python -m deepflow_jax.main`` (``kill_at``: ``tests/sigkill_worker.py``, which runs the
  same and SIGKILLs itself after that step, once the newest checkpoint before it is saved)."""
  # One flag per key, later wins (absl would concatenate a repeated tuple override).
  merged = dict(a.split("=", 1) for a in (*(TINY if tiny else []), *overrides))
  cmd = [*main_command(kill_at), f"--config={config}",
         f"--workdir={workdir}", *(f"{k}={v}" for k, v in merged.items())]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(devices),
                     cwd=ROOT)
  if check and r.returncode != 0:
    raise AssertionError(f"main failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
  return r


def assert_trees_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


# ---------------------------------------------------------------------------


def test_sharded_step_equals_single_device_and_is_really_sharded():
  """(a) data=2 x fsdp=4 equals 1 device after 3 steps; (b) params and Adam state are split.

  Tolerance 1e-5 on parameters: sharded reductions sum in a different order
  (~1e-7 relative on gradients) and Adam's normalisation can turn that into
  ~1e-6 on a 1e-3 step; a real sharding bug moves parameters by ~lr = 1e-3.
  """
  r = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py")],
                     capture_output=True, text=True, timeout=600, env=_env(8), cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["param_change"] > 1e-3  # training really moved the parameters
  assert out["max_param_diff"] < 1e-5, out
  assert out["max_ema_diff"] < 1e-5, out
  np.testing.assert_allclose(out["losses_sharded"], out["losses_single"], rtol=1e-5)
  assert all(np.isfinite(out["losses_accum"]))
  # qkv kernel (64, 192): its embed axis split over fsdp=4, replicated over data=2.
  assert out["qkv_shape"] == [64, 192]
  assert out["qkv_shards"] == [[16, 192]] and out["qkv_spec"] == "P('fsdp', None)"
  assert out["num_devices_holding_qkv"] == 8
  assert out["mu_shards"] == [[16, 192]]  # Adam's first moment is sharded like the parameter
  assert out["acc_mid_shards"] == [[8, 64]]  # hidden-to-hidden VeRA matrix split on its hidden side


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  """(c) 2 processes x 2 devices (gloo on loopback) give the loss trajectory of 1 x 4."""
  steps = ["--config.train.num_steps=3", "--config.train.ckpt_every=100"]
  single = tmp_path / "single"
  run_main(single, *steps, devices=4)
  port = _free_port()
  multi = tmp_path / "multi"
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "deepflow_jax.main", f"--config={DIGITS}", f"--workdir={multi}",
           *TINY, *steps, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(2), cwd=ROOT))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, f"{o[-2000:]}\n{e[-3000:]}"
  assert "processes: 2" in outs[0][0] and "'data': 4" in outs[0][0]
  a, b = metrics(single), metrics(multi)
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
  np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
  assert_trees_equal_close(restore_state(single, 3), restore_state(multi, 3), atol=1e-5)


def assert_trees_equal_close(a, b, atol):
  import jax  # pylint: disable=g-import-not-at-top
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_sigkill_and_resume_is_bit_identical(tmp_path):
  """2N steps straight == N, SIGKILL between saves, resume to 2N: every array bit for bit."""
  n = 3
  common = [f"--config.train.num_steps={2 * n}", f"--config.train.ckpt_every={n}"]
  straight = tmp_path / "straight"
  run_main(straight, *common)
  killed = tmp_path / "killed"
  r = run_main(killed, *common, kill_at=n + 1, check=False)
  assert r.returncode == -signal.SIGKILL
  assert sorted(os.listdir(killed / "checkpoints")) == [str(n)]  # killed after step n+1, before 2n
  r = run_main(killed, *common)
  assert f"resumed from {killed / 'checkpoints'}/{n}" in r.stdout
  a, b = restore_state(straight, 2 * n), restore_state(killed, 2 * n)
  assert_trees_equal(a, b)
  assert int(a["step"]) == 2 * n
  # The data iterator resumed too: the steps after the resume saw the same batches.
  la = {m["step"]: m["loss"] for m in metrics(straight)}
  lb = {m["step"]: m["loss"] for m in metrics(killed)}
  assert all(la[s] == lb[s] for s in range(n + 1, 2 * n + 1))
  # A corrupt latest checkpoint is skipped, with a warning naming it.
  state_dir = killed / "checkpoints" / str(2 * n) / "state"
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  r = run_main(killed, *common)
  assert f"checkpoint {killed / 'checkpoints' / str(2 * n)} is unreadable" in r.stdout
  assert f"resumed from {killed / 'checkpoints'}/{n}" in r.stdout
  assert (killed / "unreadable_checkpoints" / str(2 * n)).is_dir()  # set aside, not deleted
  assert_trees_equal(restore_state(straight, 2 * n), restore_state(killed, 2 * n))


def test_sigterm_saves_and_exits(tmp_path):
  wd = tmp_path / "run"
  cmd = [sys.executable, "-u", "-m", "deepflow_jax.main", f"--config={DIGITS}", f"--workdir={wd}",
         *TINY, "--config.train.num_steps=100000", "--config.train.ckpt_every=100000"]
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=_env(), cwd=ROOT)
  lines = []
  for line in p.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      p.send_signal(signal.SIGTERM)
      break
  rest, _ = p.communicate(timeout=120)
  out = "".join(lines) + rest
  assert p.returncode == 143, out[-2000:]
  saved = [int(s) for s in os.listdir(wd / "checkpoints")]
  assert len(saved) == 1 and saved[0] >= 3, saved
  assert f"[train] SIGTERM: saved step {saved[0]} to {wd / 'checkpoints'}" in out
  r = run_main(wd, f"--config.train.num_steps={saved[0] + 2}")
  assert f"resumed from {wd / 'checkpoints'}/{saved[0]}" in r.stdout


def test_config_errors_name_the_values(tmp_path):
  """config_lib.validate names the value and what was expected; main prints it as one line.

  The values are checked in-process (main runs exactly this validate before anything
  else); one case goes through ``python -m deepflow_jax.main`` end to end.
  """
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  tiny = {k[len("--config."):]: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in TINY)}
  cases = [
      ({"model.df_idxs": (1, 5), "loss.scale_weight": (0.2, 0.2, 1.0)},
       "split layer(s) [5] beyond the depth"),
      ({"model.num_heads": 3}, "model.hidden_size=32 is not divisible by model.num_heads=3"),
      ({"loss.scale_weight": (0.2, 0.2, 1.0)}, "loss.scale_weight=(0.2, 0.2, 1.0) has 3 weights"),
      ({"data.name": "cifar"}, "data.name='cifar'"),
  ]
  for overrides, msg in cases:
    config = config_lib.load_config(DIGITS, **{**tiny, **overrides})
    with pytest.raises(UserError, match=re.escape(msg)):
      config_lib.validate(config)
  r = run_main(tmp_path / "bad", "--config.model.df_idxs=(1,5)",
               "--config.loss.scale_weight=(0.2,0.2,1.0)", check=False, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "split layer(s) [5] beyond the depth" in r.stderr and "Traceback" not in r.stderr
  assert not (tmp_path / "bad" / "config.json").exists()


def test_sit_baseline_config():
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  for name in ("digits", "b2t", "xl3t"):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    df, sit = config_lib.load_config(path), config_lib.load_config(path + ":sit")
    if name != "digits":
      df.data.path = sit.data.path = "/data"
    config_lib.validate(df)
    config_lib.validate(sit)
    assert tuple(sit.model.df_idxs) == () and tuple(sit.loss.scale_weight) == (1.0,)
    for k in ("hidden_size", "depth", "num_heads", "patch_size"):
      assert sit.model[k] == df.model[k]
    assert sit.train.to_dict() == df.train.to_dict() and sit.optim.to_dict() == df.optim.to_dict()
  xl = config_lib.load_config(os.path.join(ROOT, "configs", "xl3t.py"))
  assert (xl.model.hidden_size, xl.model.depth, tuple(xl.model.df_idxs)) == (1152, 24, (8, 16))
  assert tuple(xl.loss.scale_weight) == (0.2, 0.2, 1.0) and xl.loss.beta == 0.01
  assert xl.train.global_batch_size == 256 and xl.model.dtype == "auto"
  short = config_lib.load_config(DIGITS, **{"train.num_steps": 7})
  assert short.train.num_steps == 7
  with pytest.raises(Exception, match="unknown config key 'train.num_stepz'"):
    config_lib.load_config(DIGITS, **{"train.num_stepz": 7})


def test_finetune_from_converted_reference_checkpoint(tmp_path):
  """A converted reference checkpoint initialises training on the project's latent format."""
  from conftest import TINY2T_PT  # pylint: disable=g-import-not-at-top
  from deepflow_jax import convert  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models import loading  # pylint: disable=g-import-not-at-top
  from deepflow_jax.data import records  # pylint: disable=g-import-not-at-top
  model, params = convert.load_torch_checkpoint(TINY2T_PT)
  ckpt = tmp_path / "converted"
  loading.save_converted(str(ckpt), model, params)
  rng = np.random.default_rng(0)
  examples = [(rng.standard_normal((8, 8, 4)).astype(np.float32),
               rng.uniform(0.1, 0.5, (8, 8, 4)).astype(np.float32), int(i % 10)) for i in range(32)]
  data = tmp_path / "latents"
  records.write_latent_dataset(str(data), examples, num_examples=32, num_classes=10)
  arch = [f"--config.model.{k}={v}" for k, v in loading.model_to_dict(model).items()
          if k not in ("df_idxs", "z_dim")] + ["--config.model.df_idxs=(2,)"]
  wd = tmp_path / "ft"
  r = run_main(wd, *arch, "--config.data.name=arrayrecord", f"--config.data.path={data}",
               "--config.data.num_classes=10", f"--config.train.init_from={ckpt}",
               "--config.train.num_steps=1", "--config.train.ckpt_every=1",
               "--config.optim.learning_rate=0", "--config.train.global_batch_size=8",
               "--config.loss.scale_weight=(0.2,1.0)",
               # The final grid of a latent model is decoded through a VAE.
               f"--config.sample.vae={os.path.join(HERE, 'data', 'vae_tiny')}",
               "--config.sample.grid_classes=2", "--config.sample.grid_per_class=2",
               "--config.sample.num_steps=2", "--config.sample.sampler=euler",
               config=os.path.join(ROOT, "configs", "b2t.py"), tiny=False)
  assert f"initialised from {ckpt}" in r.stdout
  restored = restore_state(wd, 1)
  # With a zero learning rate the step leaves the converted weights in place.
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored["params"], jax.device_get(params))
  assert np.isfinite(metrics(wd)[0]["loss"])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = Image.open(wd / "samples" / "grid_00000001.png")
  assert grid.mode == "RGB" and grid.size[0] >= 2 * 32


def test_analytic_flops_match_xla_count():
  import jax  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models import DeepFlow  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training.meter import forward_flops_per_example  # pylint: disable=g-import-not-at-top
  m = DeepFlow(input_size=16, in_channels=4, hidden_size=256, depth=4, num_heads=4, num_classes=10,
               df_idxs=(2,), projector_dim=256)
  x = jax.ShapeDtypeStruct((1, 16, 16, 4), np.float32)
  t = [jax.ShapeDtypeStruct((1,), np.float32)] * 2
  y = jax.ShapeDtypeStruct((1,), np.int32)
  params = jax.eval_shape(m.init, jax.random.key(0), x, t, y)
  cost = jax.jit(m.apply).lower(params, x, t, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = forward_flops_per_example(m)
  assert abs(analytic - cost["flops"]) / cost["flops"] < 0.05, (analytic, cost["flops"])


def test_digits_main_short_run(tmp_path, monkeypatch):
  """The embedded default, shortened: checkpoints, TB events without TF, grid, eval metrics."""
  wd = tmp_path / "digits"
  r = run_main(wd, "--config.train.num_steps=40", "--config.train.ckpt_every=20",
               "--config.sample.grid_classes=10", "--config.sample.grid_per_class=2",
               "--config.eval.num_samples=100", "--config.eval.batch_size=100",
               "--config.sample.num_steps=5", "--config.train.log_every=10")
  assert "step 40/40" in r.stdout and "done: 40 steps" in r.stdout
  assert "ETA" in r.stdout and "img/s" in r.stdout
  assert "parameters: " in r.stdout and "Total:" not in r.stdout  # one line; the table:
  assert "Total:" in (wd / "parameter_overview.txt").read_text()
  assert sorted(os.listdir(wd / "checkpoints")) == ["20", "40"]
  events = [f for f in os.listdir(wd / "tb") if f.startswith("events.out.tfevents")]
  assert events
  with open(wd / "config.json") as f:
    cfg = json.load(f)
  assert cfg["train"]["num_steps"] == 40 and cfg["model"]["hidden_size"] == 32
  assert (wd / "samples" / "grid_00000040.png").exists()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(wd / "eval" / "metrics.json") as f:
    m = json.load(f)
  for k in ("class_accuracy", "frechet_distance", "frechet_distance_real_vs_real"):
    assert np.isfinite(m[k])
  assert m["num_images"] == 100
  assert Image.open(wd / "samples" / "eval_grid.png").size[0] > 0
  # TensorBoard events were written without TensorFlow being importable or imported.
  code = ("import sys, deepflow_jax.main, tensorboardX; "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), cwd=ROOT)
  assert out.stdout.strip() == "False"
  # generate samples from the training workdir (EMA weights of the newest checkpoint).
  out = tmp_path / "gen"
  g = subprocess.run([sys.executable, "-m", "deepflow_jax.generate", f"--checkpoint={wd}",
                      f"--output={out}", "--num_samples=4", "--num_steps=2", "--sampler=euler"],
                     capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
  assert g.returncode == 0, g.stderr[-2000:]
  with np.load(out / "samples.npz") as z:
    assert z["arr_0"].shape == (4, 8, 8, 3) and z["arr_0"].dtype == np.uint8
  # The workdir loader takes relative paths too (Orbax itself refuses them).
  from deepflow_jax.models.loading import load_workdir_ema  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  _, ema_abs = load_workdir_ema(str(wd))
  monkeypatch.chdir(tmp_path)
  _, ema_rel = load_workdir_ema("digits", step=20)
  _, ema_last = load_workdir_ema("digits")
  assert_trees_equal(ema_abs, ema_last)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema_rel),
                                                      jax.tree.leaves(ema_last)))
  # A second run with a different config keeps the first config file.
  run_main(wd, "--config.train.num_steps=41", "--config.train.ckpt_every=20")
  assert (wd / "config.1.json").exists()
