"""generate, convert and evaluate with gs:// paths (a local fake-gcs-server; only
STORAGE_EMULATOR_HOST is set)."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from conftest import TINY2T_PT
from conftest import cpu_env
from deepflow_jax import convert
from deepflow_jax import storage
from deepflow_jax.models import loading
from test_train import assert_trees_equal
from test_train import run_main

GEN = ["--num_samples=24", "--sampler=euler", "--num_steps=2", "--per_device_batch=2",
       "--labels=cycle"]


def _generate(*args, wait_for_batch=None):
  """``python -m deepflow_jax.generate``; ``wait_for_batch``: a gs:// folder, SIGKILL the run
  as soon as its first finished batch is there."""
  cmd = [sys.executable, "-m", "deepflow_jax.generate", *args]
  env = cpu_env(1, compile_cache=True)
  if wait_for_batch is None:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                       cwd=ROOT)
  deadline = time.time() + 200
  while not storage.listdir(f"{wait_for_batch}/latents") and time.time() < deadline:
    assert p.poll() is None, p.communicate()
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.communicate()
  return p


def _npz(path):
  with np.load(io.BytesIO(storage.read_bytes(path))) as f:
    return {k: f[k] for k in f.files}


def test_generate_from_gs_workdir_into_gs_resumed_after_sigkill(tmp_path, gcs):
  wd, out = f"{gcs}/run", f"{gcs}/samples"
  run_main(wd, "--config.train.num_steps=1", "--config.train.ckpt_every=1")
  local = tmp_path / "local"
  r = _generate(f"--checkpoint={wd}", f"--output={local}", *GEN)
  assert r.returncode == 0, r.stderr[-2000:]
  p = _generate(f"--checkpoint={wd}", f"--output={out}", *GEN, wait_for_batch=out)
  assert p.returncode == -signal.SIGKILL
  done = storage.listdir(f"{out}/latents")
  assert 0 < len(done) < 12 and not storage.exists(f"{out}/samples.npz")
  assert storage.exists(f"{out}/.writer.lock")  # the killed run's: stale (dead pid, this host)
  r = _generate(f"--checkpoint={wd}", f"--output={out}", *GEN)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "(resumed)" in r.stdout and "took over the stale lock" in r.stdout
  a, b = _npz(str(local / "samples.npz")), _npz(f"{out}/samples.npz")
  assert a.keys() == b.keys() == {"arr_0", "latents", "labels"}
  for k in a:  # the same program on the same device: the same bits
    np.testing.assert_array_equal(a[k], b[k])
  assert storage.listdir(f"{out}/images")[:2] == ["000000.png", "000001.png"]
  assert not storage.exists(f"{out}/.writer.lock")


def test_convert_to_gs_and_load_back(gcs, tiny2t, capsys):
  out = f"{gcs}/tiny2t"
  assert convert.main([f"--checkpoint={TINY2T_PT}", f"--output={out}"]) == 0
  assert loading.is_converted_dir(out)
  model, params = loading.load_model(out)
  assert model == tiny2t[0].clone(dtype=model.dtype) or model.hidden_size == tiny2t[0].hidden_size
  assert_trees_equal(params, tiny2t[1])
  # A second conversion is refused without --force, and replaces it with --force.
  assert convert.main([f"--checkpoint={TINY2T_PT}", f"--output={out}"]) == 2
  assert "already holds a converted checkpoint" in capsys.readouterr().err
  assert convert.main([f"--checkpoint={TINY2T_PT}", f"--output={out}", "--force"]) == 0
  assert_trees_equal(loading.load_model(out)[1], tiny2t[1])


def test_evaluate_reads_gs_inputs_through_local_copies(tmp_path, gcs, capsys):
  """evaluate downloads gs:// inputs (storage.local_copy) and writes --output to gs://. A
  full evaluation from gs:// inputs (the golden FID of test_evaluate_end_to_end) passed once
  in 148 s on this 2-core machine; the Inception compile makes it too slow for the suite, so
  this checks the path layer evaluate uses, and the one-line errors naming URLs."""
  from deepflow_jax import evaluate  # pylint: disable=g-import-not-at-top
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from deepflow_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  local = tmp_path / "samples.npz"
  np.savez(local, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
  storage.upload(str(local), f"{gcs}/samples.npz")
  with storage.local_copy(f"{gcs}/samples.npz", "--samples") as path:
    assert not storage.is_url(path)
    with np.load(path) as f:
      assert f["arr_0"].shape == (4, 8, 8, 3)
    with pytest.raises(UserError) as e:
      with storage.local_copy(f"{gcs}/samples.npz", "--samples") as again:
        raise UserError(f"{again}: has no 'arr_0' array")
    assert str(e.value) == f"{gcs}/samples.npz: has no 'arr_0' array"  # the URL, not the copy
  assert not os.path.exists(path)  # the copy is removed
  suite.write_metrics_json(f"{gcs}/out/metrics.json", {"fid": 1.5, "is": float("nan")})
  assert json.loads(storage.read_text(f"{gcs}/out/metrics.json")) == {"fid": 1.5, "is": None}
  rc = evaluate.main([f"--samples={gcs}/missing.npz", f"--reference={gcs}/samples.npz",
                      f"--inception={gcs}/samples.npz"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err == [f"error: --samples={gcs}/missing.npz: no such file"], err
  rc = evaluate.main(["--samples=gs://no-such-bkt/s.npz", f"--reference={gcs}/samples.npz",
                      f"--inception={gcs}/samples.npz"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and "no bucket 'no-such-bkt'" in err[0] and len(err) == 1, err


def test_storage_lost_during_generation_is_one_line_naming_the_url(tmp_path, monkeypatch):
  """The emulator stops after the first batch: gcsfs retries with bounded back-off (6 tries),
  then the run ends with one line naming the object; the finished batch is kept. The
  back-off's sleeps (about 30 s per request) are skipped here: the retries still happen."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import gcsfs.retry  # pylint: disable=g-import-not-at-top

  async def no_wait(_):
    await asyncio.sleep(0)

  shim = types.SimpleNamespace(**{k: getattr(asyncio, k) for k in dir(asyncio)
                                  if not k.startswith("_")})
  shim.sleep = no_wait
  monkeypatch.setattr(gcsfs.retry, "asyncio", shim)
  from gcs_emulator import Emulator  # pylint: disable=g-import-not-at-top
  from deepflow_jax import generation  # pylint: disable=g-import-not-at-top
  from deepflow_jax import sampling  # pylint: disable=g-import-not-at-top
  from deepflow_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from deepflow_jax.models import DeepFlow  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  server = Emulator()
  server.start()
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = server.url
  try:
    out = f"gs://{server.make_bucket()}/samples"
    model = DeepFlow(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                     num_heads=2, num_classes=10, df_idxs=(1,), projector_dim=32)
    params = flax.linen.unbox(model.init(
        jax.random.key(0), np.zeros((1, 8, 8, 1)), [np.ones((1,))] * 2,
        np.zeros((1,), np.int32))["params"])
    settings = generation.GenerationSettings(4, sampling.SamplerSettings("euler", 2), seed=0)
    calls = []

    def stop_storage():
      calls.append(1)
      server.stop()
      return False

    with pytest.raises(UserError) as e:
      generation.generate_to_folder(model, params, out, settings, per_device_batch=2,
                                    should_stop=stop_storage)
    msg = str(e.value)
    assert msg.startswith(f"{out}/") and "cannot" in msg and "\n" not in msg, msg
    assert calls == [1]
  finally:
    server.close()
    if old is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old
