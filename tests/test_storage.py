"""deepflow_jax.storage on local folders and on gs:// (a local fake-gcs-server)."""
import concurrent.futures
import os

import pytest

from deepflow_jax import storage
from deepflow_jax.errors import UserError


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs") + "/root"


def test_read_write_list_remove(root):
  assert not storage.exists(root) and storage.listdir(root) == []
  storage.makedirs(storage.join(root, "a"))
  storage.write_bytes(storage.join(root, "a", "x.bin"), b"xyz")
  storage.write_text(storage.join(root, "b.txt"), "hi")
  assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"xyz"
  assert storage.read_text(storage.join(root, "b.txt")) == "hi"
  assert storage.listdir(root) == ["a", "b.txt"]
  assert storage.isdir(storage.join(root, "a")) and storage.isfile(storage.join(root, "b.txt"))
  assert storage.walk_files(root) == [os.path.join("a", "x.bin"), "b.txt"]
  with storage.open_file(storage.join(root, "b.txt"), "r") as f:
    assert f.read() == "hi"
  storage.write_bytes(storage.join(root, "b.txt"), b"new")  # overwrite
  assert storage.read_text(storage.join(root, "b.txt")) == "new"
  assert storage.remove(storage.join(root, "b.txt")) and not storage.remove(storage.join(root, "b.txt"))
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(storage.join(root, "b.txt"))
  storage.move_tree(storage.join(root, "a"), storage.join(root, "c"))
  assert storage.listdir(root) == ["c"]
  storage.rmtree(root)
  assert storage.listdir(root) == []


def _create(path, i):
  return storage.create_exclusive(path, str(i).encode())


def test_create_exclusive_one_winner(root):
  path = storage.join(root, "lock")
  storage.makedirs(root)
  with concurrent.futures.ProcessPoolExecutor(4) as pool:  # processes: one temporary name each
    won = list(pool.map(_create, [path] * 4, range(4)))
  assert sum(won) == 1
  assert storage.read_text(path) == str(won.index(True))
  gen = storage.generation(path)
  if not storage.is_url(root):  # fake-gcs-server ignores ifGenerationMatch on DELETE; GCS honours it
    assert not storage.remove_if_generation(path, "1" if gen != "1" else "2")
  assert storage.remove_if_generation(path, gen) and not storage.exists(path)


def test_emulator_host_alone_configures_tensorstore(gcs, monkeypatch):
  storage.listdir(gcs)
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == os.environ["STORAGE_EMULATOR_HOST"]
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://elsewhere:1")
  storage.configure_emulator()
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://elsewhere:1"  # an explicit one wins


def test_missing_bucket_is_one_line(gcs):
  storage.check_bucket(gcs + "/run", "--workdir")
  with pytest.raises(UserError, match=r"--workdir=gs://no-such-bkt/run: no bucket 'no-such-bkt'"):
    storage.check_bucket("gs://no-such-bkt/run", "--workdir")
  with pytest.raises(UserError, match="only local paths and gs://"):
    storage.check_bucket("s3://x/y", "--workdir")


def test_training_data_urls_are_refused_with_the_alternative():
  from deepflow_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"data.path=gs://b/latents: training data is read from "
                     r"local paths only .*gcloud storage rsync"):
    data_config.resolve({"name": "repa", "path": "gs://b/latents"})


def test_an_uncommitted_gs_checkpoint_is_never_taken(gcs):
  """Orbax on gs:// commits a step by writing commit_success.txt last: a step folder without
  it (a save cut short by a kill or a storage fault) is neither listed nor restored."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from deepflow_jax import workdir  # pylint: disable=g-import-not-at-top
  from deepflow_jax.training.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/run"
  state = {"w": np.arange(4.0, dtype=np.float32)}
  ckpt = Checkpointer(wd, async_save=False)
  ckpt.save(1, state, {"global_index": 8})
  ckpt.close()
  ckpt_dir = workdir.checkpoint_dir(wd)
  assert storage.exists(f"{ckpt_dir}/1/{workdir.COMMIT_FILE}")
  storage.copy_tree(f"{ckpt_dir}/1", f"{ckpt_dir}/2")  # step 2: every file but the commit
  storage.remove(f"{ckpt_dir}/2/{workdir.COMMIT_FILE}")
  assert workdir.checkpoint_steps(ckpt_dir) == [1]
  ckpt = Checkpointer(wd)
  assert ckpt.all_steps() == [1]
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, restored, data = ckpt.restore_latest(
      {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=dev)})
  ckpt.close()
  assert step == 1 and data == {"global_index": 8}
  np.testing.assert_array_equal(restored["w"], state["w"])
