"""Elastic restore: a checkpoint saved on one mesh restores on others, and a run resumes with
another device or process count keeping the data order."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import TINY_MAIN as TINY
from conftest import cpu_env
from deepflow_jax import storage
from test_train import DIGITS
from test_train import ROOT
from test_train import _free_port
from test_train import assert_trees_equal_close
from test_train import metrics
from test_train import run_main

HERE = os.path.dirname(os.path.abspath(__file__))


def test_checkpoint_of_8_devices_restores_on_4_2_1_and_fsdp_4(tmp_path):
  """Saved on 8 devices (data 4 x fsdp 2); restored on data 4 (4 devices), data 2 (2), 1
  device and data 2 x fsdp 4 (8): params, EMA and optimiser state equal bit for bit (a
  restore copies bytes; nothing is recomputed), each array on the new mesh's layout."""
  wd = tmp_path / "wd"
  run_main(wd, "--config.train.num_steps=2", "--config.train.ckpt_every=2",
           "--config.mesh.data=4", "--config.mesh.fsdp=2", devices=8)
  layouts = ["8:4:2", "4:4:1", "2:2:1", "1:1:1", "8:2:4"]
  r = subprocess.run([sys.executable, os.path.join(HERE, "elastic_worker.py"), str(wd), *layouts],
                     capture_output=True, text=True, timeout=300, env=cpu_env(8), cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  assert [row["layout"] for row in rows] == layouts
  for row in rows:
    assert row["step"] == 2 and row["same_step"], row
    assert row["diff"] == {"params": 0.0, "ema_params": 0.0, "opt_state": 0.0}, row
    assert row["data_state"] == {"global_index": 2 * 16}, row
  assert [r["mesh"] for r in rows] == [{"data": 4, "fsdp": 2}, {"data": 4, "fsdp": 1},
                                       {"data": 2, "fsdp": 1}, {"data": 1, "fsdp": 1},
                                       {"data": 2, "fsdp": 4}]
  # hidden 32 split over fsdp: 16 rows per shard at fsdp 2, 8 at fsdp 4, whole without fsdp.
  assert [r["shard"][0] for r in rows] == [16, 32, 32, 32, 8]


def _two_processes(workdir, *overrides):
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "deepflow_jax.main", f"--config={DIGITS}",
           f"--workdir={workdir}", *TINY, *overrides,
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=cpu_env(2, compile_cache=True), cwd=ROOT))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, f"{o[-2000:]}\n{e[-3000:]}"
  return outs[0][0]


def test_two_processes_to_one_and_back_keep_the_data_order(tmp_path, gcs):
  """2 processes x 2 devices for 2 steps, then 1 process x 4 devices to step 4, then 2
  processes again to 6, all in one gs:// workdir: the losses and the final state are those
  of one uninterrupted local 1 x 4 run (same global batches in the same order). Tolerance:
  the multi-process gradient all-reduce sums in another order (1e-5, as
  test_two_processes_match_one_process)."""
  # A constant learning rate: the cosine schedule depends on num_steps, which the segments change.
  steps = lambda n: [f"--config.train.num_steps={n}", "--config.train.ckpt_every=2",
                     "--config.optim.schedule=constant"]
  straight = tmp_path / "straight"
  run_main(straight, *steps(6), devices=4)
  wd = f"{gcs}/elastic"
  assert "processes: 2" in _two_processes(wd, *steps(2))
  r = run_main(wd, *steps(4), devices=4)
  assert "processes: 1" in r.stdout and f"resumed from {wd}/checkpoints/2" in r.stdout
  out = _two_processes(wd, *steps(6))
  assert f"resumed from {wd}/checkpoints/4" in out
  a = {m["step"]: m["loss"] for m in metrics(straight)}
  b = {m["step"]: m["loss"] for m in map(json.loads, storage.read_text(
      f"{wd}/metrics.jsonl").splitlines())}
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-5)
  from conftest import restore_state  # pylint: disable=g-import-not-at-top
  storage.configure_emulator()
  assert_trees_equal_close(restore_state(straight, 6), restore_state(wd, 6), atol=1e-5)
