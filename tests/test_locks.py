"""One writer per workdir / output folder (deepflow_jax.locks), on local disks and gs://."""
import json
import os
import subprocess
import sys
import time

import pytest

from deepflow_jax import locks
from deepflow_jax import storage
from deepflow_jax.errors import UserError
from test_train import run_main


@pytest.fixture(params=["local", "gs"])
def folder(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("gcs") + "/run"


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_writer_refused_naming_the_holder(folder):
  logs = []
  with locks.WriterLock(folder, flag="--workdir", log=logs.append) as held:
    assert storage.exists(held.path)
    with pytest.raises(UserError) as e:
      locks.WriterLock(folder, flag="--workdir").acquire()
    msg = str(e.value)
    assert f"--workdir {folder} is in use by another run: host {held.record['host']}, " in msg
    assert f"process id {os.getpid()}, started " in msg and "UTC" in msg
    assert held.heartbeat()
  assert not storage.exists(held.path)  # released
  if not storage.is_url(folder):
    assert not os.path.exists(folder)  # created for the lock, left empty: removed again


def test_stale_locks_are_taken_over(folder):
  path = storage.join(folder, locks.LOCK_FILE)
  storage.makedirs(folder)
  now = time.time()
  dead = {"host": __import__("socket").gethostname(), "pid": _dead_pid(), "started": now,
          "heartbeat": now, "token": "a"}
  storage.write_text(path, json.dumps(dead))
  logs = []
  with locks.WriterLock(folder, flag="--output", log=logs.append) as lock:
    assert json.loads(storage.read_text(path))["token"] == lock.record["token"]
  assert "took over the stale lock" in logs[0] and f"process id {dead['pid']}" in logs[0]
  # Another host's lock: stale only once its heartbeat is older than STALE_S.
  other = {"host": "elsewhere", "pid": 1, "started": now, "heartbeat": now, "token": "b"}
  storage.write_text(path, json.dumps(other))
  with pytest.raises(UserError, match="host elsewhere, process id 1"):
    locks.WriterLock(folder, flag="--output").acquire()
  other["heartbeat"] = now - locks.STALE_S - 1
  storage.write_text(path, json.dumps(other))
  with locks.WriterLock(folder, flag="--output", log=logs.append):
    pass
  assert "host elsewhere" in logs[-1]


def test_a_lost_lock_stops_the_heartbeat(folder):
  logs = []
  lock = locks.WriterLock(folder, flag="--workdir", log=logs.append).acquire()
  storage.write_text(lock.path, json.dumps({"host": "x", "pid": 2, "token": "other",
                                            "heartbeat": time.time()}))
  assert not lock.heartbeat() and "now held by host x" in logs[-1]
  lock.release()
  assert storage.exists(lock.path)  # not ours any more: left alone


def test_training_on_a_held_workdir_is_refused_and_touches_nothing(folder):
  """A live holder (this test process) -> the second training exits 2 with one line."""
  with locks.WriterLock(folder, flag="--workdir") as held:
    before = {p: storage.read_bytes(storage.join(folder, p)) for p in storage.walk_files(folder)}
    r = run_main(folder, "--config.train.num_steps=1", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --workdir {folder} is in use"), lines
    assert f"process id {os.getpid()}" in lines[0]
    assert "devices:" not in r.stdout  # refused before anything was built
    after = {p: storage.read_bytes(storage.join(folder, p)) for p in storage.walk_files(folder)}
    assert after == before
    assert json.loads(before[locks.LOCK_FILE])["token"] == held.record["token"]
