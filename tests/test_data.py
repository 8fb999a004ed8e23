"""Digits data, grain pipelines (order, sharding, resume), REPA/ArrayRecord readers, errors."""
import json
import os

import numpy as np
import pytest

from deepflow_jax.data import config as data_config
from deepflow_jax.data import digits, pipeline, records
from deepflow_jax.errors import UserError


def take(it, n):
  return [next(it) for _ in range(n)]


def digits_iter(seed=3, *, process_index=0, process_count=1, global_batch_size=8, **cfg):
  return pipeline.make_train_iterator(
      {"name": "digits", "include_index": True, **cfg}, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed)


# ---------------------------------------------------------------------------- digits


def test_resume_with_another_process_count_keeps_the_global_position():
  """2 processes -> 1 -> 4 -> 2 with global batch 8: the union of every process's examples,
  global batch by global batch, is the stream of one uninterrupted process (an epoch of
  1797 digits: nothing skipped or repeated)."""
  def global_batches(count, state, n):
    its = [digits_iter(5, process_index=p, process_count=count) for p in range(count)]
    for it in its:
      if state:
        it.set_state(state)
    rows = [np.concatenate([next(it)["index"] for it in its]) for _ in range(n)]
    states = {json.dumps(it.get_state()) for it in its}
    assert len(states) == 1  # every process saves the same state
    return rows, json.loads(states.pop())

  want, _ = global_batches(1, None, 12)
  got, state = global_batches(2, None, 3)
  for count in (1, 4, 2):
    more, state = global_batches(count, state, 3)
    got += more
  assert state == {"global_index": 12 * 8}
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w, g)


@pytest.mark.parametrize("size", [8, 16])
def test_digits_split(size):
  (xt, yt), (xh, yh) = digits.load_digits_split(size)
  assert xt.shape == (1438, size, size, 1) and xh.shape == (359, size, size, 1)
  assert xt.dtype == xh.dtype == np.float32 and yt.dtype == yh.dtype == np.int32
  assert xt.min() == -1.0 and xt.max() == 1.0 and xh.min() >= -1.0 and xh.max() <= 1.0
  assert set(yt) == set(yh) == set(range(10))
  counts = np.bincount(yh, minlength=10) / np.bincount(np.concatenate([yt, yh]), minlength=10)
  assert np.all(np.abs(counts - 0.2) < 0.02)  # stratified
  train_idx, heldout_idx = digits.split_indices()
  assert not set(train_idx) & set(heldout_idx)
  assert len(train_idx) + len(heldout_idx) == digits.num_examples() == 1797
  (xt2, _), (xh2, _) = digits.load_digits_split(size)
  np.testing.assert_array_equal(xt, xt2)
  np.testing.assert_array_equal(xh, xh2)


def test_digits_native_values():
  from sklearn.datasets import load_digits
  raw = load_digits()
  (xt, yt), _ = digits.load_digits_split(8)
  train_idx, _ = digits.split_indices()
  np.testing.assert_array_equal(xt[..., 0], (raw.images[train_idx] / 8.0 - 1.0).astype(np.float32))
  np.testing.assert_array_equal(yt, raw.target[train_idx])


# ---------------------------------------------------------------------------- pipeline


def test_digits_batches_and_info():
  b = next(digits_iter(global_batch_size=8, image_size=16))
  assert b["image"].shape == (8, 16, 16, 1) and b["image"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  info = pipeline.dataset_info({"name": "digits", "image_size": 16})
  assert (info.shape, info.channels, info.num_classes, info.is_latent) == ((16, 16, 1), 1, 10, False)
  assert info.num_examples == 1438


def test_deterministic_order_and_reshuffle():
  a = [b["index"] for b in take(digits_iter(3), 4)]
  b = [b["index"] for b in take(digits_iter(3, num_threads=2), 4)]
  c = [b["index"] for b in take(digits_iter(4), 4)]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Two epochs of the held-out split (359 examples): each a permutation, in different orders.
  it = digits_iter(5, split="heldout", global_batch_size=1, num_epochs=2)
  idx = np.concatenate([x["index"] for x in it])
  assert len(idx) == 718
  assert sorted(idx[:359]) == sorted(idx[359:]) == list(range(359))
  assert not np.array_equal(idx[:359], idx[359:])


def test_process_sharding():
  n = 1438
  shards = [np.concatenate([x["index"] for x in digits_iter(
      7, process_index=p, process_count=2, global_batch_size=2, num_epochs=1)]) for p in (0, 1)]
  assert len(shards[0]) == len(shards[1]) == n // 2
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(n))
  # The global batch (process blocks stacked in process order) does not depend on the
  # process count, row for row.
  single = take(digits_iter(7, global_batch_size=8), 3)
  split = [take(digits_iter(7, process_index=p, process_count=2, global_batch_size=8), 3)
           for p in (0, 1)]
  for k in range(3):
    assert split[0][k]["index"].shape == (4,)
    stacked = np.concatenate([split[0][k]["index"], split[1][k]["index"]])
    np.testing.assert_array_equal(stacked, single[k]["index"])


def test_batch_size_errors():
  with pytest.raises(UserError, match="multiple of the process count"):
    digits_iter(global_batch_size=10, process_count=4)
  with pytest.raises(UserError, match="unknown data config"):
    digits_iter(imagesize=8)
  with pytest.raises(UserError, match="data.name"):
    pipeline.make_train_iterator({"name": "cifar"}, global_batch_size=8, process_index=0,
                                 process_count=1, seed=0)


def check_resume(make):
  it = make()
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  want = take(it, 3)
  fresh = make()
  fresh.set_state(state)
  got = take(fresh, 3)
  for w, g in zip(want, got):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  return state


def test_resume_digits():
  state = check_resume(lambda: digits_iter(11, process_index=1, process_count=2,
                                           global_batch_size=6, num_threads=2))
  assert state == {"global_index": 30}  # 5 global batches of 6
  # The state does not depend on the process: one process's saved state restores all.
  p0 = digits_iter(11, process_index=0, process_count=2, global_batch_size=6)
  take(p0, 5)
  assert p0.get_state() == state


def test_orbax_grain_checkpoint(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  it = digits_iter(2)
  take(it, 5)
  mngr = ocp.CheckpointManager(os.fspath(tmp_path / "ckpt"), item_names=("data",))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = take(it, 3)
  fresh = digits_iter(2)
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for w, g in zip(want, take(fresh, 3)):
    np.testing.assert_array_equal(w["image"], g["image"])
  mngr.close()


# ---------------------------------------------------------------------------- REPA layout


def write_repa(root, n=7, shape=(8, 4, 4), labels=None, per_folder=4):
  """Writes n .npy files in REPA's layout; returns {relative name: (array, label)}."""
  rng = np.random.default_rng(0)
  feat = os.path.join(root, "vae-sd")
  items = {}
  for i in range(n):
    name = f"{i // per_folder:05d}/img-mean-std-{i:08d}.npy"
    os.makedirs(os.path.join(feat, os.path.dirname(name)), exist_ok=True)
    arr = rng.normal(size=shape).astype(np.float32)
    arr[shape[0] // 2:] = np.abs(arr[shape[0] // 2:])
    np.save(os.path.join(feat, name), arr)
    items[name] = (arr, (3 * i + 1) % 5)
  entries = [[k, v[1]] for k, v in reversed(list(items.items()))]  # order must not matter
  with open(os.path.join(feat, "dataset.json"), "w") as f:
    json.dump({"labels": entries if labels is None else labels}, f)
  return items


def repa_iter(path, batch=1, seed=0, **cfg):
  return pipeline.make_train_iterator(
      {"name": "repa", "path": os.fspath(path), "include_index": True, **cfg},
      global_batch_size=batch, process_index=0, process_count=1, seed=seed)


def test_repa_layout(tmp_path):
  items = write_repa(tmp_path)
  names = sorted(items)
  for path in (tmp_path, tmp_path / "vae-sd"):
    batches = list(repa_iter(path, shuffle=False, num_epochs=1))
    assert len(batches) == len(names)
    for i, (b, name) in enumerate(zip(batches, names)):
      arr, label = items[name]
      assert b["mean"].shape == b["std"].shape == (1, 4, 4, 4)
      assert b["mean"].dtype == np.float32 and b["label"].dtype == np.int32
      np.testing.assert_array_equal(b["mean"][0], arr[:4].transpose(1, 2, 0))
      np.testing.assert_array_equal(b["std"][0], arr[4:].transpose(1, 2, 0))
      assert b["mean"][0, 1, 2, 3] == arr[3, 1, 2]
      assert b["label"][0] == label and b["index"][0] == i
  info = pipeline.dataset_info({"name": "repa", "path": os.fspath(tmp_path)})
  assert (info.shape, info.channels, info.num_classes, info.num_examples) == ((4, 4, 4), 4, 5, 7)
  assert info.is_latent and info.resolution == 32
  check_resume(lambda: repa_iter(tmp_path, batch=2, seed=1, num_threads=2))


def test_repa_label_file_errors(tmp_path):
  items = write_repa(tmp_path)
  label_file = os.path.join(tmp_path, "vae-sd", "dataset.json")
  os.remove(label_file)
  with pytest.raises(UserError, match="dataset.json: missing"):
    repa_iter(tmp_path)
  entries = [[k, v[1]] for k, v in items.items()]
  for bad, msg in [(entries[1:], "no label for 1 of 7"),
                   (entries + [["00009/x.npy", 1]], "not present"),
                   (None, "null")]:
    with open(label_file, "w") as f:
      json.dump({"labels": bad}, f)
    with pytest.raises(UserError, match=msg) as e:
      repa_iter(tmp_path)
    assert label_file in str(e.value)
  b = next(repa_iter(tmp_path, missing_labels="zero", shuffle=False))
  assert b["label"][0] == 0
  with open(label_file, "w") as f:
    json.dump({"labels": entries}, f)
  with pytest.raises(UserError, match="label 4 not in"):
    repa_iter(tmp_path, num_classes=4)


@pytest.mark.parametrize("kind", ["truncated", "wrong_shape", "pickled"])
def test_repa_bad_npy_names_file_and_index(tmp_path, kind):
  items = write_repa(tmp_path)
  name = sorted(items)[5]
  path = os.path.join(tmp_path, "vae-sd", name)
  if kind == "truncated":
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:-40])
  elif kind == "wrong_shape":
    np.save(path, np.zeros((8, 4, 5), np.float32))
  else:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  it = repa_iter(tmp_path, batch=2, shuffle=False, num_threads=2)
  take(it, 2)
  with pytest.raises(UserError) as e:
    take(it, 1)  # examples 4, 5
  assert path in str(e.value) and "example 5" in str(e.value)


# ---------------------------------------------------------------------------- ArrayRecord


def make_examples(n, shape=(4, 4, 4), seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape).astype(np.float32),
           np.abs(rng.normal(size=shape)).astype(np.float32), i % 3) for i in range(n)]


def ar_iter(path, batch=1, seed=0, **cfg):
  return pipeline.make_train_iterator(
      {"name": "arrayrecord", "path": os.fspath(path), "include_index": True, **cfg},
      global_batch_size=batch, process_index=0, process_count=1, seed=seed)


def test_arrayrecord_roundtrip(tmp_path):
  ex = make_examples(10)
  meta = records.write_latent_dataset(tmp_path, ex, num_examples=10, num_classes=3, num_shards=3,
                                      resolution=32, vae="test")
  assert meta["shards"] == [records.shard_name("train", s, 3) for s in range(3)]
  batches = list(ar_iter(tmp_path, shuffle=False, num_epochs=1))
  assert len(batches) == 10
  for i, b in enumerate(batches):
    np.testing.assert_array_equal(b["mean"][0], ex[i][0])
    np.testing.assert_array_equal(b["std"][0], ex[i][1])
    assert b["label"][0] == ex[i][2] and b["index"][0] == i
  info = pipeline.dataset_info({"name": "arrayrecord", "path": os.fspath(tmp_path)})
  assert (info.shape, info.num_classes, info.num_examples, info.resolution) == ((4, 4, 4), 3, 10, 32)
  shuffled = np.concatenate([b["index"] for b in ar_iter(tmp_path, batch=5, num_epochs=1)])
  assert sorted(shuffled) == list(range(10)) and list(shuffled) != list(range(10))
  check_resume(lambda: ar_iter(tmp_path, batch=2, seed=4, num_threads=2))


def test_arrayrecord_bad_record_names_shard_and_position(tmp_path):
  from array_record.python import array_record_module
  ex = make_examples(6)
  records.write_latent_dataset(tmp_path, ex, num_examples=6, num_classes=3, num_shards=2)
  shard = os.path.join(tmp_path, records.shard_name("train", 1, 2))
  w = array_record_module.ArrayRecordWriter(shard, "group_size:1")
  for i in range(3, 6):
    w.write(b"\xc1 not msgpack" if i == 4 else records.encode_record(*ex[i], i))
  w.close()
  it = ar_iter(tmp_path, batch=2, shuffle=False, num_threads=2)
  take(it, 1)
  with pytest.raises(UserError) as e:
    take(it, 2)  # examples 2..5
  assert shard in str(e.value) and "record 1 (example 4)" in str(e.value)


def test_arrayrecord_corrupt_bytes(tmp_path):
  rng = np.random.default_rng(1)
  ex = [(rng.normal(size=(16, 16, 4)).astype(np.float32),) * 2 + (0,) for _ in range(20)]
  records.write_latent_dataset(tmp_path, ex, num_examples=20, num_classes=1)
  shard = os.path.join(tmp_path, records.shard_name("train", 0, 1))
  data = bytearray(open(shard, "rb").read())
  for k in range(len(data) // 3, len(data) // 3 + 64):
    data[k] ^= 0xFF
  with open(shard, "wb") as f:
    f.write(bytes(data))
  src = pipeline.make_source({"name": "arrayrecord", "path": os.fspath(tmp_path)})
  errors = []
  for i in range(len(src)):
    try:
      src[i]
    except UserError as e:
      errors.append(str(e))
  assert errors and all(shard in e and "(example " in e for e in errors)


def test_arrayrecord_metadata_errors(tmp_path):
  with pytest.raises(UserError, match="metadata.json: missing"):
    ar_iter(tmp_path)
  records.write_latent_dataset(tmp_path, make_examples(4), num_examples=4, num_classes=3)
  meta_file = os.path.join(tmp_path, records.METADATA_FILE)
  meta = json.load(open(meta_file))
  json.dump(dict(meta, num_examples=5), open(meta_file, "w"))
  with pytest.raises(UserError, match="num_examples 5, but the shards hold 4"):
    ar_iter(tmp_path)
  json.dump(dict(meta, shards=["nope.array_record"]), open(meta_file, "w"))
  with pytest.raises(UserError, match="nope.array_record: shard listed"):
    ar_iter(tmp_path)
  json.dump(dict(meta, latent_shape=[2, 2, 4]), open(meta_file, "w"))
  with pytest.raises(UserError, match=r"latent shape \(4, 4, 4\), expected \(2, 2, 4\)"):
    next(ar_iter(tmp_path))


# ---------------------------------------------------------------------------- batched reading


def test_default_parallelism_is_a_function_of_cores_and_source():
  P = pipeline.Parallelism
  for cores in (1, 2, 8, 64):  # in-memory digits: built in next(), never threads or workers
    assert pipeline.default_parallelism("digits", cores) == P(0, 0, 0)
  for name in ("repa", "arrayrecord"):
    for cores, want in [(1, P(0, 2, 4)), (2, P(0, 2, 4)), (7, P(0, 2, 4)), (8, P(1, 2, 4)),
                        (16, P(2, 2, 8)), (31, P(3, 2, 12)), (32, P(4, 2, 16)),
                        (224, P(4, 2, 16))]:
      assert pipeline.default_parallelism(name, cores) == want, (name, cores)
  # Explicit values win, each on its own.
  assert pipeline.default_parallelism("repa", 64, num_workers=0) == P(0, 2, 4)
  assert pipeline.default_parallelism("repa", 2, num_threads=0) == P(0, 0, 0)
  assert pipeline.default_parallelism("repa", 2, num_workers=2, num_threads=0) == P(2, 0, 4)
  assert pipeline.default_parallelism("digits", 2, num_threads=3) == P(0, 3, 6)
  assert pipeline.default_parallelism("repa", 2, prefetch_batches=9) == P(0, 2, 9)
  with pytest.raises(UserError, match="data.name"):
    pipeline.default_parallelism("cifar", 2)
  if hasattr(os, "sched_getaffinity"):
    assert pipeline.available_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("n,batch,procs,seed,shuffle,epochs", [
    (37, 4, 1, 3, True, None), (37, 4, 3, 5, True, 3), (1438, 8, 2, 7, True, None),
    (10, 5, 1, 0, False, 2), (11, 2, 2, 2**32 - 1, True, 4)])
def test_batch_indices_are_grains_order(n, batch, procs, seed, shuffle, epochs):
  """BatchIndices computes grain's range().shuffle(seed).repeat() order, process blocks of it."""
  import grain
  ref = grain.MapDataset.range(n)
  ref = (ref.shuffle(seed=seed) if shuffle else ref).repeat(epochs)
  g = batch * procs
  num = 25 if epochs is None else n * epochs // g
  for p in range(procs):
    idx = pipeline.BatchIndices(n, batch, process_index=p, process_count=procs, seed=seed,
                                shuffle=shuffle, num_epochs=epochs)
    if epochs is not None:
      assert len(idx) == num
    for b in range(min(num, 25)):
      assert idx[b].dtype == np.int64
      assert list(idx[b]) == [ref[b * g + p * batch + r] for r in range(batch)], (p, b)


class ElementwiseRepa:
  """The reference reader: one np.load + transpose per file (what the pipeline replaced)."""

  def __init__(self, src):
    self.src = src

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    arr = np.load(os.path.join(self.src.root, self.src.files[i]), allow_pickle=False)
    c = arr.shape[0] // 2
    return {"mean": arr[:c].transpose(1, 2, 0).astype(np.float32),
            "std": arr[c:].transpose(1, 2, 0).astype(np.float32),
            "label": np.int32(self.src.labels[i]), "index": np.int32(i)}


class ElementwiseArrayRecord:
  """The reference reader: one record read + flax msgpack_restore per example."""

  def __init__(self, src):
    self.src = src

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    from flax import serialization
    rec = serialization.msgpack_restore(self.src.records[i])
    return {"mean": np.asarray(rec["mean"], np.float32), "std": np.asarray(rec["std"], np.float32),
            "label": np.int32(rec["label"]), "index": np.int32(i)}


def elementwise_batches(ref, *, batch, seed, process_index=0, process_count=1, n):
  """The pre-batching pipeline: grain's per-example shuffle/repeat, process blocks, batching."""
  import grain
  ds = grain.MapDataset.source(ref).shuffle(seed=seed).repeat(None)
  g = batch * process_count
  out = []
  for b in range(n):
    rows = [ds[b * g + process_index * batch + r] for r in range(batch)]
    out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  return out


def assert_same_batches(want, got):
  assert len(want) == len(got)
  for w, g in zip(want, got):
    assert sorted(w) == sorted(g)
    for k in w:
      assert w[k].dtype == g[k].dtype and w[k].shape == g[k].shape, k
      np.testing.assert_array_equal(w[k], g[k])


def test_batched_reading_equals_elementwise_repa(tmp_path):
  write_repa(tmp_path, n=13, per_folder=5)
  feat = tmp_path / "vae-sd"
  # Files whose .npy header differs from the first file's take the general decoder:
  # Fortran order, float64, and a version-2.0 header.
  rng = np.random.default_rng(5)
  odd = {"00001/img-mean-std-00000006.npy": np.asfortranarray(rng.normal(size=(8, 4, 4))),
         "00001/img-mean-std-00000007.npy": rng.normal(size=(8, 4, 4))}
  for name, arr in odd.items():
    np.save(feat / name, arr.astype(np.float32) if name.endswith("6.npy") else arr)
  with open(feat / "00002/img-mean-std-00000011.npy", "wb") as f:
    np.lib.format.write_array(f, rng.normal(size=(8, 4, 4)).astype(np.float32), version=(2, 0))
  src = pipeline.make_source({"name": "repa", "path": os.fspath(tmp_path), "include_index": True})
  for p, procs in [(0, 1), (1, 2)]:
    want = elementwise_batches(ElementwiseRepa(src), batch=3, seed=4, process_index=p,
                               process_count=procs, n=10)
    got = take(pipeline.make_train_iterator(
        {"name": "repa", "path": os.fspath(tmp_path), "include_index": True},
        global_batch_size=3 * procs, process_index=p, process_count=procs, seed=4,
        source=src), 10)
    assert_same_batches(want, got)
  # One example is the batch of one.
  one = src[7]
  np.testing.assert_array_equal(one["mean"], odd["00001/img-mean-std-00000007.npy"][:4]
                                .transpose(1, 2, 0).astype(np.float32))
  assert one["mean"].shape == (4, 4, 4) and one["label"].shape == ()


def test_batched_reading_equals_elementwise_arrayrecord(tmp_path):
  ex = make_examples(11)
  records.write_latent_dataset(tmp_path, ex, num_examples=11, num_classes=3, num_shards=3)
  cfg = {"name": "arrayrecord", "path": os.fspath(tmp_path), "include_index": True}
  src = pipeline.make_source(cfg)
  want = elementwise_batches(ElementwiseArrayRecord(src), batch=4, seed=9, n=8)
  assert_same_batches(want, take(pipeline.make_train_iterator(
      cfg, global_batch_size=4, process_index=0, process_count=1, seed=9), 8))


def test_decode_records_general_path():
  """Arrays not stored as float32 of the expected shape go through flax's decoder."""
  from flax import serialization
  rng = np.random.default_rng(0)
  m16 = rng.normal(size=(2, 2, 3)).astype(np.float16)
  odd = serialization.msgpack_serialize({"mean": m16, "std": m16, "label": 2, "index": 7})
  m, s = rng.normal(size=(2, 2, 3)).astype(np.float32), rng.random((2, 2, 3)).astype(np.float32)
  batch = records.decode_records([records.encode_record(m, s, 1, 0), odd,
                                  records.encode_record(s, m, 0, 5)], where=str)
  np.testing.assert_array_equal(batch["mean"], np.stack([m, m16.astype(np.float32), s]))
  np.testing.assert_array_equal(batch["std"], np.stack([s, m16.astype(np.float32), m]))
  assert list(batch["label"]) == [1, 2, 0] and list(batch["index"]) == [0, 7, 5]
  with pytest.raises(UserError, match=r"record 1: latent shape \(2, 2, 3\), expected \(2, 2, 4\)"):
    z = np.zeros((2, 2, 4), np.float32)
    records.decode_records([records.encode_record(z, z, 0, 0), odd], where=lambda k: f"record {k}",
                           latent_shape=(2, 2, 4))


def test_non_finite_inside_a_batch_names_file_and_index(tmp_path):
  items = write_repa(tmp_path / "repa")
  name = sorted(items)[6]
  arr = items[name][0].copy()
  arr[5, 1, 1] = np.nan
  np.save(tmp_path / "repa" / "vae-sd" / name, arr)
  it = repa_iter(tmp_path / "repa", batch=4, shuffle=False)
  take(it, 1)
  with pytest.raises(UserError, match=r"img-mean-std-00000006.npy \(example 6\): non-finite"):
    next(it)  # examples 4..7
  ex = make_examples(8)
  ex[5] = (ex[5][0], np.full_like(ex[5][1], np.inf), ex[5][2])
  records.write_latent_dataset(tmp_path / "ar", ex, num_examples=8, num_classes=3, num_shards=2)
  it = ar_iter(tmp_path / "ar", batch=4, shuffle=False)
  take(it, 1)
  with pytest.raises(UserError, match=r"00001-of-00002.array_record record 1 \(example 5\): non-"):
    next(it)
  with pytest.raises(UserError, match=r"record 2 \(example 2\): label 2 not in \[0, 2\)"):
    next(ar_iter(tmp_path / "ar", batch=4, shuffle=False, num_classes=2))


def test_stream_and_resume_do_not_depend_on_threads_or_workers(tmp_path):
  write_repa(tmp_path, n=11)

  def make(**par):
    return repa_iter(tmp_path, batch=2, seed=3, **par)

  want = take(make(num_workers=0, num_threads=0), 9)
  assert_same_batches(want, take(make(num_threads=3), 9))
  # A state saved with one parallelism resumes exactly under another; two worker
  # processes (each reading every other batch) give the batches back in order.
  it = make(num_threads=2)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"global_index": 8}
  fresh = make(num_workers=2, num_threads=1)
  fresh.set_state(state)
  assert_same_batches(want[4:], take(fresh, 5))
  assert fresh.get_state() == {"global_index": 18}
  fresh.close()
  for bad in ({"global_index": 3}, {"global_index": -2}, {}, {"global_index": 2.0},
              {"next_index": 8}):
    with pytest.raises(UserError, match="data iterator state"):
      make().set_state(bad)


# ---------------------------------------------------------------------------- latent scale


def test_latent_scale_and_vae_downsampling_from_the_dataset_else_config(tmp_path):
  info = pipeline.dataset_info({"name": "digits"})
  assert (info.latent_scale, info.vae_downsampling) == (1.0, 1)  # pixels: no VAE
  # ArrayRecord: metadata.json records both (defaults: the SD-VAE's).
  ex = make_examples(4)
  records.write_latent_dataset(tmp_path / "sd", ex, num_examples=4, num_classes=3)
  meta = json.load(open(tmp_path / "sd" / records.METADATA_FILE))
  assert (meta["scaling_factor"], meta["vae_downsampling"]) == (0.18215, 8)
  info = pipeline.dataset_info({"name": "arrayrecord", "path": os.fspath(tmp_path / "sd")})
  assert (info.latent_scale, info.vae_downsampling, info.resolution) == (0.18215, 8, 32)
  records.write_latent_dataset(tmp_path / "f16", ex, num_examples=4, num_classes=3,
                               resolution=64, latent_scale=0.5, vae_downsampling=16)
  cfg = {"name": "arrayrecord", "path": os.fspath(tmp_path / "f16")}
  info = pipeline.dataset_info(cfg)
  assert (info.latent_scale, info.vae_downsampling, info.resolution) == (0.5, 16, 64)
  assert pipeline.dataset_info(dict(cfg, latent_scale=0.5, vae_downsampling=16)) == info
  with pytest.raises(UserError, match=r"data.latent_scale=0.18215 but .*metadata.json records "
                                      r"scaling_factor=0.5"):
    pipeline.dataset_info(dict(cfg, latent_scale=0.18215))
  with pytest.raises(UserError, match="data.vae_downsampling=8 but .* vae_downsampling=16"):
    pipeline.dataset_info(dict(cfg, vae_downsampling=8))
  # Written before vae_downsampling was recorded: resolution / h, else the config, else 8.
  meta_file = tmp_path / "f16" / records.METADATA_FILE
  meta = json.load(open(meta_file))
  del meta["vae_downsampling"]
  json.dump(meta, open(meta_file, "w"))
  assert pipeline.dataset_info(cfg).vae_downsampling == 16
  json.dump(dict(meta, resolution=0), open(meta_file, "w"))
  assert pipeline.dataset_info(cfg).vae_downsampling == 8
  info = pipeline.dataset_info(dict(cfg, vae_downsampling=4))
  assert (info.vae_downsampling, info.resolution) == (4, 16)
  # REPA: dataset.json holds labels; the config (or the SD-VAE's values) fills in,
  # unless dataset.json records them too.
  write_repa(tmp_path / "repa")
  cfg = {"name": "repa", "path": os.fspath(tmp_path / "repa")}
  info = pipeline.dataset_info(cfg)
  assert (info.latent_scale, info.vae_downsampling, info.resolution) == (0.18215, 8, 32)
  info = pipeline.dataset_info(dict(cfg, latent_scale=0.25, vae_downsampling=16))
  assert (info.latent_scale, info.vae_downsampling, info.resolution) == (0.25, 16, 64)
  label_file = tmp_path / "repa" / "vae-sd" / "dataset.json"
  labels = json.load(open(label_file))["labels"]
  json.dump({"labels": labels, "scaling_factor": 0.13025}, open(label_file, "w"))
  assert pipeline.dataset_info(cfg).latent_scale == 0.13025
  json.dump({"labels": labels, "scaling_factor": "big"}, open(label_file, "w"))
  with pytest.raises(UserError, match="dataset.json: scaling_factor='big' is not a positive float"):
    pipeline.dataset_info(cfg)
  with pytest.raises(UserError, match="data.latent_scale must be a positive number"):
    pipeline.dataset_info({"name": "repa", "path": os.fspath(tmp_path / "repa"),
                           "latent_scale": -1.0})


def test_config_data_is_the_pipeline_schema():
  from deepflow_jax import config_lib
  data = config_lib.base_config().data
  want = data_config.default_config()
  assert sorted(data.keys()) == sorted(want.keys()) == sorted(data_config.KNOWN_KEYS)
  assert data.name == "repa" and want.name is None  # the pipeline requires one
  data.num_workers = 4  # placeholders keep their type: overrides are type-checked
  data.latent_shape = (32, 32, 4)
  with pytest.raises(TypeError):
    data.num_workers = "four"
  with pytest.raises(TypeError):
    data.latent_scale = "big"
  # make_source / make_train_iterator take config.data itself.
  c = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
  assert pipeline.make_source(c.data).info.shape == (8, 8, 1)
  b = next(pipeline.make_train_iterator(c.data, global_batch_size=8, process_index=0,
                                        process_count=1, seed=0))
  assert b["image"].shape == (8, 8, 8, 1) and sorted(b) == ["image", "label"]


# ---------------------------------------------------------------------------- raw images (SSL)


def _image(rng, size=16):
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_repa_images_are_paired_by_sorted_position(tmp_path):
  """images/ beside vae-sd/: every image file (PIL extensions, .npy) sorted, paired by position."""
  from PIL import Image
  write_repa(tmp_path, n=7, shape=(8, 2, 2))  # 2 x 2 latents: 16-pixel images at downsampling 8
  rng = np.random.default_rng(3)
  # Written out of order, in subfolders, mixed formats; sorted names decide the pairing.
  names = ["f.png", "b/d.png", "a.png", "e.PNG", "c.bmp", "b/c.npy", "d.png"]
  arrays = {}
  for name in names:
    path = tmp_path / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays[name] = _image(rng)
    if name.endswith(".npy"):
      np.save(path, arrays[name].transpose(2, 0, 1))  # the reference reads .npy images as CHW
    else:
      Image.fromarray(arrays[name]).save(path, format="BMP" if name.endswith("bmp") else "PNG")
  (tmp_path / "images" / "dataset.json").write_text("{}")  # not an image: not listed
  (tmp_path / "images" / "notes.txt").write_text("x")
  order = sorted(names)
  assert order[:3] == ["a.png", "b/c.npy", "b/d.png"]
  src = pipeline.make_source({"name": "repa", "path": os.fspath(tmp_path), "include_index": True},
                             images=True)
  assert src.info.image_shape == (16, 16, 3) and src.info.resolution == 16
  batches = list(repa_iter(tmp_path, batch=1, shuffle=False, num_epochs=1, num_threads=0))
  assert "image" not in batches[0]  # latent-only training reads no image
  it = pipeline.make_train_iterator({"name": "repa", "path": os.fspath(tmp_path / "vae-sd"),
                                     "include_index": True, "shuffle": False},
                                    global_batch_size=7, process_index=0, process_count=1, seed=0,
                                    images=True)
  b = next(it)
  assert b["image"].dtype == np.uint8 and b["image"].shape == (7, 16, 16, 3)
  for k in range(7):
    np.testing.assert_array_equal(b["image"][k], arrays[order[k]])
    np.testing.assert_array_equal(b["mean"][k], batches[k]["mean"][0])  # latents unchanged
  # The batch stream does not depend on the reading threads (images included).
  def make(threads):
    return pipeline.make_train_iterator(
        {"name": "repa", "path": os.fspath(tmp_path), "num_threads": threads},
        global_batch_size=3, process_index=0, process_count=1, seed=5, images=True)
  assert_same_batches(take(make(0), 4), take(make(2), 4))

  def err(**kw):
    with pytest.raises(UserError) as e:
      next(pipeline.make_train_iterator({"name": "repa", "path": os.fspath(tmp_path),
                                         "shuffle": False, **kw}, global_batch_size=7,
                                        process_index=0, process_count=1, seed=0, images=True))
    assert "\n" not in str(e.value)
    return str(e.value)

  Image.fromarray(_image(rng)).save(tmp_path / "images" / "g.png")  # one image too many
  assert "8 image files but" in err() and "holds 7 latent files" in err()
  os.remove(tmp_path / "images" / "g.png")
  Image.fromarray(_image(rng).mean(-1).astype(np.uint8)).save(tmp_path / "images" / "d.png")
  assert "d.png (example 4): image mode L, expected RGB" in err()
  (tmp_path / "images" / "d.png").write_bytes(b"\x89PNG garbage")
  assert "d.png (example 4): unreadable image" in err()
  Image.fromarray(_image(rng, 32)).save(tmp_path / "images" / "a.png")
  assert "a.png (example 0): image of shape (32, 32, 3), expected (16, 16, 3)" in err()
  os.rename(tmp_path / "images", tmp_path / "pictures")
  assert "images: no such folder" in err()
  with pytest.raises(UserError, match="digits.*no latents and raw images"):
    pipeline.make_source({"name": "digits"}, images=True)


def test_arrayrecord_images(tmp_path):
  rng = np.random.default_rng(4)
  ex = [e + (_image(rng, 8),) for e in make_examples(6)]
  meta = records.write_latent_dataset(tmp_path / "img", ex, num_examples=6, num_classes=3,
                                      num_shards=2, resolution=8, vae_downsampling=2)
  assert meta["image_shape"] == [8, 8, 3]
  cfg = {"name": "arrayrecord", "path": os.fspath(tmp_path / "img"), "shuffle": False}
  b = next(pipeline.make_train_iterator(cfg, global_batch_size=6, process_index=0,
                                        process_count=1, seed=0, images=True))
  assert b["image"].dtype == np.uint8
  np.testing.assert_array_equal(b["image"], np.stack([e[3] for e in ex]))
  np.testing.assert_array_equal(b["mean"], np.stack([e[0] for e in ex]))
  plain = next(pipeline.make_train_iterator(cfg, global_batch_size=6, process_index=0,
                                            process_count=1, seed=0))
  assert sorted(plain) == ["label", "mean", "std"]  # no image unless asked for
  np.testing.assert_array_equal(plain["mean"], b["mean"])
  assert pipeline.dataset_info(cfg, images=True).image_shape == (8, 8, 3)
  assert pipeline.dataset_info(cfg).image_shape is None
  meta_file = tmp_path / "img" / records.METADATA_FILE
  json.dump(dict(meta, image_shape=[16, 16, 3]), open(meta_file, "w"))
  with pytest.raises(UserError, match=r"image_shape \[16, 16, 3\] does not match the latents' "
                                      "resolution 8"):
    pipeline.dataset_info(cfg, images=True)
  json.dump(meta, open(meta_file, "w"))
  # Datasets without images (older ones included) read as before, and refuse images=True.
  records.write_latent_dataset(tmp_path / "old", make_examples(4), num_examples=4, num_classes=3)
  assert "image_shape" not in json.load(open(tmp_path / "old" / records.METADATA_FILE))
  with pytest.raises(UserError, match="records hold no images .*--save_images"):
    pipeline.make_source({"name": "arrayrecord", "path": os.fspath(tmp_path / "old")}, images=True)
  # Record level: the image is decoded only when asked for, and checked.
  m, s, label = make_examples(1)[0]
  img = _image(rng, 8)
  with_img = records.encode_record(m, s, label, 0, img)
  without = records.encode_record(m, s, label, 1)
  one = records.decode_record(with_img, image_shape=(8, 8, 3))
  np.testing.assert_array_equal(one["image"], img)
  assert "image" not in records.decode_record(with_img)
  with pytest.raises(UserError, match="record 1: the record holds no image"):
    records.decode_records([with_img, without], where=lambda k: f"record {k}",
                           image_shape=(8, 8, 3))
  with pytest.raises(UserError, match=r"record 0: image uint8 \(8, 8, 3\), expected uint8 "
                                      r"\(4, 4, 3\)"):
    records.decode_records([with_img], where=lambda k: f"record {k}", image_shape=(4, 4, 3))
  with pytest.raises(UserError, match="all examples with an image, or none"):
    records.write_latent_dataset(tmp_path / "mixed", [ex[0], ex[1][:3]], num_examples=2,
                                 num_classes=3)
