"""Training that survives its own numbers (issue 21): skipped non-finite steps, NaN-safe
outputs, divergence rollback and stop, refused restarts, file-system faults.

In-process tests use a tiny DeepFlow on one CPU device; runs of ``python -m
deepflow_jax.main`` use test_train's tiny digits flags so each takes seconds.
"""
import json
import os

import numpy as np
import pytest

from conftest import TINY_MAIN as TINY
from conftest import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny_config(**train):
  from deepflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.model.update(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, df_idxs=(1,), projector_dim=32, dtype="float32")
  c.loss.scale_weight = (0.2, 1.0)
  c.data.name = "digits"
  c.data.image_size = 8
  c.train.global_batch_size = 8
  c.train.ema_decay = 0.9
  c.train.update(train)
  c.optim.learning_rate = 1e-3
  config_lib.validate(c)
  return c


def _trainer(c, latent):
  import jax  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models.loading import model_from_config  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  return Trainer(c, model_from_config(c), shd.make_mesh(c, jax.devices()[:1]), latent=latent)


def _latent_batch(rng, poison=False):
  mean = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
  if poison:
    mean[3, 2, 1, 0] = np.nan
  return {"mean": mean, "std": np.full_like(mean, 0.1),
          "label": rng.integers(0, 10, 8).astype(np.int32)}


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_poisoned_batch_is_skipped_with_the_state_unchanged():
  """A batch with one NaN latent: params, EMA and Adam state stay bitwise the same (the same
  process, the same program: jnp.where selects the old arrays), the step and the skip
  counters advance; the next good batch trains again and resets the streak."""
  tr = _trainer(tiny_config(), latent=True)
  rng = np.random.default_rng(0)
  state = tr.init_state(0)
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng)))
  assert np.isfinite(float(m["loss"])) and int(m["skipped_steps"]) == 0
  before = [_leaves(state.params), _leaves(state.ema_params), _leaves(state.opt_state)]
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng, poison=True)))
  assert not np.isfinite(float(m["loss"]))
  assert (int(state.step), int(state.skipped_steps), int(state.skip_streak)) == (2, 1, 1)
  assert (int(m["skipped_steps"]), int(m["skip_streak"])) == (1, 1)
  after = [_leaves(state.params), _leaves(state.ema_params), _leaves(state.opt_state)]
  for b, a in zip(before, after):
    for x, y in zip(b, a):
      np.testing.assert_array_equal(x, y)
  assert tr.state_is_finite(state)
  state, m = tr.step(state, tr.global_batch(_latent_batch(rng)))
  assert (int(state.skipped_steps), int(state.skip_streak)) == (1, 0)
  assert not np.array_equal(_leaves(state.params)[0], before[0][0])


DIGITS = os.path.join(ROOT, "configs", "digits.py")


def run_main(workdir, *overrides, timeout=300, module="deepflow_jax.main"):
  """``python -m deepflow_jax.main`` on the tiny digits model (later flags win)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  merged = dict(a.split("=", 1) for a in (*TINY, *overrides))
  cmd = [sys.executable, "-m", module, f"--config={DIGITS}", f"--workdir={workdir}",
         *(f"{k}={v}" for k, v in merged.items())]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env=cpu_env(1, compile_cache=True), cwd=ROOT)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.strip()]


def _all_finite(tree):
  return all(np.isfinite(x).all() for x in _leaves(tree) if x.dtype.kind == "f")


def test_forced_divergence_rolls_back_then_stops_with_exit_3(tmp_path):
  """lr=1e6 without warmup: the loss is NaN from step 3 on; a streak of 2 skipped steps rolls
  back to the newest (finite) checkpoint, the second divergence without progress stops with
  one error line and exit 3. Every checkpoint left is finite, metrics.jsonl is strict JSON."""
  from conftest import restore_state  # pylint: disable=g-import-not-at-top
  w = tmp_path / "w"
  r = run_main(w, "--config.optim.learning_rate=1e6", "--config.train.ckpt_every=1",
               "--config.train.max_skip_streak=2", "--config.train.max_rollbacks=1",
               "--config.train.num_steps=20")
  assert r.returncode == 3, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("error: training diverged at step "), lines
  assert "last good checkpoint: step" in lines[0] and str(w / "checkpoints") in lines[0]
  assert "rolled back to step" in r.stdout
  steps = sorted(int(s) for s in os.listdir(w / "checkpoints") if s.isdigit())
  assert steps and all(not s.startswith("tmp") for s in os.listdir(w / "checkpoints"))
  for s in steps:
    state = restore_state(w, s)
    assert _all_finite(state["params"]) and _all_finite(state["ema_params"]), s
  with open(w / "metrics.jsonl") as f:
    rows = [json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
            for l in f]
  assert any(row["loss"] is None for row in rows) and rows[-1]["skip_streak"] >= 2


def _listing(root):
  """{relative path: md5} of every file under ``root`` (a workdir's full state)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.md5(fh.read()).hexdigest()
  return out


def test_changed_architecture_resume_is_refused_and_allowed_changes_resume(tmp_path):
  """A resume with another hidden_size: one line naming the key, exit 2, the workdir's files
  (names and bytes) unchanged. A resume changing only num_steps / intervals continues."""
  w = tmp_path / "w"
  r = run_main(w, "--config.train.num_steps=2", "--config.train.ckpt_every=1")
  assert r.returncode == 0, r.stderr[-3000:]
  before = _listing(w)
  r = run_main(w, "--config.train.num_steps=2", "--config.train.ckpt_every=1",
               "--config.model.hidden_size=48")
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and "model.hidden_size: 32 -> 48" in lines[0], lines
  assert _listing(w) == before
  r = run_main(w, "--config.train.num_steps=3", "--config.train.ckpt_every=2",
               "--config.train.log_every=3")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "3 steps done" in r.stdout
  with open(w / "metrics.jsonl") as f:
    steps = [json.loads(l)["step"] for l in f]
  assert steps == sorted(set(steps)), steps  # no duplicate rows


def test_run_that_saved_nothing_keeps_its_architecture(tmp_path):
  """A run that diverged before its first checkpoint (exit 3, "none yet"): rerunning its
  workdir with another hidden_size is refused (exit 2, one line, files unchanged); a rerun
  with only the learning rate changed starts afresh, as the error line says."""
  w = tmp_path / "w"
  r = run_main(w, "--config.optim.learning_rate=1e6", "--config.train.ckpt_every=100",
               "--config.train.max_skip_streak=2", "--config.train.max_rollbacks=1",
               "--config.train.num_steps=20")
  assert r.returncode == 3 and "none yet" in r.stderr, r.stderr[-3000:]
  assert not os.path.exists(w / "checkpoints") or not os.listdir(w / "checkpoints")
  before = _listing(w)
  r = run_main(w, "--config.model.hidden_size=48", "--config.train.num_steps=2")
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and "model.hidden_size: 32 -> 48" in lines[0], lines
  assert _listing(w) == before
  r = run_main(w, "--config.train.num_steps=2")
  assert r.returncode == 0 and "2 steps done" in r.stdout, r.stderr[-3000:]


def test_workdir_that_cannot_be_written_is_refused_before_compiling(tmp_path):
  """A workdir under a regular file (works as root too) and, when not root, in a read-only
  directory: one error line, exit 2, nothing created."""
  plain = tmp_path / "plain"
  plain.write_text("x")
  r = run_main(plain / "w", "--config.train.num_steps=1")
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and f"{plain} is a file, not a directory" in lines[0], lines
  assert "compilation cache" not in r.stdout
  if os.geteuid() != 0:  # root writes through permission bits
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
      r = run_main(ro / "w", "--config.train.num_steps=1")
      assert r.returncode == 2 and "cannot write into" in r.stderr, r.stderr[-3000:]
      assert os.listdir(ro) == []
    finally:
      ro.chmod(0o755)


def _run_enospc(workdir, fail, *overrides):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  merged = dict(a.split("=", 1) for a in (*TINY, *overrides))
  cmd = [sys.executable, os.path.join(HERE, "enospc_worker.py"), f"--fail={fail}",
         f"--config={DIGITS}", f"--workdir={workdir}", *(f"{k}={v}" for k, v in merged.items())]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                        env=cpu_env(1, compile_cache=True), cwd=ROOT)


def test_full_disk_during_a_checkpoint_save_then_resume(tmp_path):
  """ENOSPC in checkpoint 2's background save: one line naming checkpoints/2, exit 2, no
  temporary checkpoint left; the rerun resumes from checkpoint 1 with one metrics row a step."""
  w = tmp_path / "w"
  flags = ("--config.train.num_steps=4", "--config.train.ckpt_every=1")
  r = _run_enospc(w, "ckpt:2", *flags)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1, lines
  assert str(w / "checkpoints" / "2") in lines[0] and "No space left on device" in lines[0]
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]
  r = run_main(w, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  with open(w / "metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3, 4]


def test_full_disk_writing_metrics_is_one_line(tmp_path):
  """ENOSPC appending to metrics.jsonl: one line naming the file, exit 2."""
  w = tmp_path / "w"
  r = _run_enospc(w, "metrics:2", "--config.train.num_steps=3")
  assert r.returncode == 2, r.stderr[-3000:]
  lines = _error_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith(f"error: {w / 'metrics.jsonl'}: No space"), lines


def test_file_system_errors_of_any_entry_point_are_one_line(capsys):
  """The shared error path: an OSError of a full disk / read-only mount anywhere in an entry
  point (generate, preprocess, convert outputs) is one line naming the file, exit 2."""
  import errno  # pylint: disable=g-import-not-at-top
  from deepflow_jax import errors  # pylint: disable=g-import-not-at-top

  @errors.cli_main
  def entry(argv):
    try:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/out/samples.npz.tmp-1")
    except OSError as e:
      raise RuntimeError("writer failed") from e

  hooks = (__import__("sys").excepthook, __import__("sys").unraisablehook)
  try:
    assert entry(None) == 2
  finally:
    __import__("sys").excepthook, __import__("sys").unraisablehook = hooks
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: /out/samples.npz.tmp-1: Read-only"), err


def test_bfloat16_and_float32_digits_losses_agree_over_the_first_steps():
  """The tiny digits model with model.dtype=bfloat16 vs float32: same seed, same batches,
  4 steps. Tolerance 3% relative per step: bf16 keeps 8 mantissa bits (0.4% per rounding);
  norms, softmax, the loss, AdamW and the EMA stay float32 (docs/numerics.md), so the
  losses (means over 16x64 values) differ by well under 1% here; a float32 island lost
  (e.g. LayerNorm statistics in bf16) or a bf16 optimiser drifts past that within steps."""
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(4)]
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c = tiny_config()
    c.model.dtype = dtype
    tr = _trainer(c, latent=False)
    state = tr.init_state(0)
    out = []
    for b in batches:
      state, m = tr.step(state, tr.global_batch(b))
      out.append(float(m["loss"]))
    assert all(x.dtype == np.float32 for x in _leaves((state.params, state.ema_params)))
    losses[dtype] = np.array(out)
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.03)


def test_evaluate_refuses_a_resolution_mismatch_unless_allowed(tmp_path):
  """32x32 samples against an 8x8 reference: one UserError naming both sizes and the flag;
  with allow_resolution_mismatch the check passes."""
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from deepflow_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  samples, ref, inc = tmp_path / "s.npz", tmp_path / "r.npz", tmp_path / "inception.pth"
  np.savez(samples, arr_0=np.zeros((8, 32, 32, 3), np.uint8))
  np.savez(ref, arr_0=np.zeros((8, 8, 8, 3), np.uint8))
  inc.write_bytes(b"x")
  with pytest.raises(UserError, match=r"samples are 32x32 .* holds 8x8 .*--allow_resolution"):
    suite.check_inputs(str(samples), str(ref), str(inc))
  assert suite.check_inputs(str(samples), str(ref), str(inc),
                            allow_resolution_mismatch=True).shape == (8, 32, 32, 3)


def test_data_shape_message_names_the_file_it_was_read_from():
  """A REPA folder whose first .npy has the wrong shape: the message names that file and the
  expected moments' shape, not only the model settings."""
  import types  # pylint: disable=g-import-not-at-top
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training import startup  # pylint: disable=g-import-not-at-top
  info = types.SimpleNamespace(shape=(16, 16, 4), num_classes=10)
  model = types.SimpleNamespace(input_size=32, in_channels=4, num_classes=1000)
  with pytest.raises(UserError, match=r"read from /d/00000/img-mean-std-00000000\.npy.*"
                                      r"\(8, 32, 32\)"):
    startup.check_data_matches_model(info, model, "/d/00000/img-mean-std-00000000.npy")


def test_a_signal_during_start_up_is_taken_by_the_run():
  """record_early_signals (main calls it before importing JAX): a SIGTERM that arrives before
  the run's StopRequests is installed is not lost; the run sees it as requested (143)."""
  import signal  # pylint: disable=g-import-not-at-top
  from deepflow_jax import signals  # pylint: disable=g-import-not-at-top
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    signals.record_early_signals()
    os.kill(os.getpid(), signal.SIGTERM)
    with signals.StopRequests() as stop:
      assert stop.requested and stop.exit_status == 143
    with signals.StopRequests() as stop:  # taken once
      assert not stop.requested
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def test_orbax_save_wait_warning_is_not_printed(tmp_path, monkeypatch, caplog):
  """Orbax warns "Waiting for previous save to complete took N seconds" at a save that waits
  on the previous one (frequent saves on a slow disk: one extra stderr line per such save in
  a loaded run, breaking the one-error-line tests). With its threshold at -1 every save would
  warn; the Checkpointer's filter drops it, and other warnings still pass."""
  import logging  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", -1.0)
  caplog.set_level(logging.WARNING)
  ckpt = Checkpointer(str(tmp_path / "w"), keep=3)
  try:
    for step in (1, 2, 3):
      ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"pos": step})
    ckpt.wait()
    absl_logging.warning("another warning")  # logged outside Orbax: the filter keeps it
  finally:
    ckpt.close()
  texts = [r.getMessage() for r in caplog.records]
  assert not [t for t in texts if "Waiting for previous save" in t], texts
  assert "another warning" in texts
  assert ckpt.all_steps() == [1, 2, 3]
