"""Training into a gs:// workdir (a local fake-gcs-server; only STORAGE_EMULATOR_HOST is set)."""
import json
import os
import signal

from deepflow_jax import storage
from test_train import assert_trees_equal
from test_train import run_main


def _run(workdir, *overrides, **kw):
  """run_main copies os.environ, where the ``gcs`` fixture set STORAGE_EMULATOR_HOST. This
  process's own storage calls also point tensorstore at the emulator there; main is run
  without that, so it must derive it from STORAGE_EMULATOR_HOST itself, as on a user's
  machine."""
  for k in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    os.environ.pop(k, None)  # the gcs_env fixture restores both afterwards
  return run_main(workdir, *overrides, **kw)


def _restore(workdir, step):
  from conftest import restore_state  # pylint: disable=g-import-not-at-top
  storage.configure_emulator()
  return restore_state(workdir, step)


def test_train_into_gs_killed_and_resumed_bit_identical(tmp_path, gcs):
  """2N steps locally == N into gs://, SIGKILL after N+1, resume from gs:// to 2N: bit for bit."""
  n = 3
  common = [f"--config.train.num_steps={2 * n}", f"--config.train.ckpt_every={n}"]
  straight = tmp_path / "straight"
  run_main(straight, *common)
  wd = f"{gcs}/run"
  r = _run(wd, *common, kill_at=n + 1, check=False)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  assert storage.listdir(f"{wd}/checkpoints") == [str(n)]
  assert storage.exists(f"{wd}/.writer.lock")  # the killed run's lock: stale (dead pid, this host)
  r = _run(wd, *common)
  assert f"resumed from {wd}/checkpoints/{n}" in r.stdout
  assert "took over the stale lock" in r.stdout
  assert_trees_equal(_restore(straight, 2 * n), _restore(wd, 2 * n))
  assert not storage.exists(f"{wd}/.writer.lock")  # released at the end
  names = storage.listdir(wd)
  assert {"config.json", "checkpoints", "metrics.jsonl", "tb", "parameter_overview.txt"} <= set(
      names), names
  rows = [json.loads(l) for l in storage.read_text(f"{wd}/metrics.jsonl").splitlines()]
  assert rows[-1]["step"] == 2 * n
  assert any(name.startswith("events.out.tfevents") for name in storage.listdir(f"{wd}/tb"))


def test_missing_bucket_is_refused_before_compiling(gcs_env):
  r = _run("gs://no-such-bucket/run", "--config.train.num_steps=1", check=False)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --workdir=gs://no-such-bucket/run: no bucket 'no-such-bucket' (create it first: "
      "gcloud storage buckets create gs://no-such-bucket)"], r.stderr
  assert "devices:" not in r.stdout  # nothing was built
