"""Input-pipeline throughput alone, built exactly as ``python -m deepflow_jax.main`` builds it.

    python scripts/bench_data.py --config=configs/xl3t.py --config.data.path=DIR \\
        [--batches=N] [--repeats=R] [--process_count=P] [--make_fake=N]

``pipeline.make_source(config.data)`` and ``pipeline.make_train_iterator(config.data,
global_batch_size=config.train.global_batch_size, ...)`` as in ``main``, for process 0
of ``--process_count`` (its per-process batch). Each repeat builds a fresh iterator,
times its first batch (start-up: threads, worker processes), reads ``--warmup``
batches, then times ``--batches`` batches. In the same repeat, a plain
single-threaded loop reads the SAME examples in the same order and builds the same
arrays (REPA: ``np.load`` + transpose + stack per file; ArrayRecord: one
``ArrayRecordDataSource`` read + ``flax.serialization.msgpack_restore`` + stack per
record; digits: one fancy-indexing copy), so the ratio is measured under the same
machine load. Files are read once before timing (page cache warm for both sides).

``--make_fake=N`` first writes N random examples in the layout ``config.data.name``
names (shape from ``config.model``: ``input_size`` and ``in_channels``) into
``config.data.path``, which must be empty or absent.

Prints a table per repeat, then one last line of JSON: ``images_per_s`` and
``baseline_images_per_s`` (medians over repeats, with every repeat's value,
min and max), ``ratio``, ``images_per_s_per_core`` (over the cores this process may
use), the resolved parallelism, ``first_batch_s`` and the load average.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
from absl import app
from absl import flags
from flax import serialization
from ml_collections import config_flags

from deepflow_jax.data import arrayrecord
from deepflow_jax.data import config as data_config
from deepflow_jax.data import pipeline
from deepflow_jax.data import records
from deepflow_jax.data import repa
from deepflow_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_integer("batches", 40, "Timed batches per repeat.")
flags.DEFINE_integer("warmup", 3, "Batches read after the first one before timing.")
flags.DEFINE_integer("repeats", 3, "Fresh iterators (each timed against the plain loop).")
flags.DEFINE_integer("process_count", 1, "Time process 0's share of this many processes.")
flags.DEFINE_integer("make_fake", 0, "Write this many random examples into data.path first.")


def write_fake_dataset(config, n: int, seed: int = 0) -> str:
  """Writes ``n`` random examples of ``config.data.name``'s layout into ``config.data.path``.

  REPA: ``vae-sd/NNNNN/img-mean-std-NNNNNNNN.npy`` float32 (2c, h, w), 1,000 per
  folder, and ``vae-sd/dataset.json``; ArrayRecord: 4 shards through
  :func:`records.write_latent_dataset`. Shape (h, w, c) = (input_size,
  input_size, in_channels) of ``config.model``; label of example ``i``: ``i mod
  num_classes``. Returns the path.
  """
  d = config.data
  path = os.path.abspath(d.path)
  if os.path.isdir(path) and os.listdir(path):
    raise UserError(f"{path}: not empty (--make_fake writes a new dataset)")
  h, c = int(config.model.input_size), int(config.model.in_channels)
  num_classes = int(d.num_classes or config.model.num_classes)
  rng = np.random.default_rng(seed)

  def example():
    mean = rng.standard_normal((h, h, c), np.float32)
    return mean, np.abs(rng.standard_normal((h, h, c), np.float32)) + 0.1

  if d.name == "repa":
    feat = os.path.join(path, repa.REPA_FEATURE_DIR)
    labels = []
    for i in range(n):
      name = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
      os.makedirs(os.path.join(feat, os.path.dirname(name)), exist_ok=True)
      mean, std = example()
      np.save(os.path.join(feat, name), np.concatenate([mean, std], -1).transpose(2, 0, 1))
      labels.append([name, i % num_classes])
    with open(os.path.join(feat, repa.REPA_LABEL_FILE), "w") as f:
      json.dump({"labels": labels}, f)
  elif d.name == "arrayrecord":
    records.write_latent_dataset(
        path, ((*example(), i % num_classes) for i in range(n)), num_examples=n,
        num_classes=num_classes, num_shards=min(4, n), resolution=8 * h, vae="fake")
  else:
    raise UserError(f"--make_fake writes repa or arrayrecord data, not data.name={d.name!r}")
  return path


def plain_reader(source):
  """The plain single-threaded loop: ``read(indices) -> same arrays as the pipeline``."""
  if isinstance(source, repa.RepaLatentSource):
    c = source.latent_shape[-1]
    paths = [source.file_path(i) for i in range(len(source))]

    def read(idx):
      arrs = [np.load(paths[i], allow_pickle=False) for i in idx]
      return {"mean": np.stack([a[:c].transpose(1, 2, 0) for a in arrs]),
              "std": np.stack([a[c:].transpose(1, 2, 0) for a in arrs]),
              "label": source.labels[idx]}
  elif isinstance(source, arrayrecord.ArrayRecordLatentSource):
    ds = source.records

    def read(idx):
      recs = [serialization.msgpack_restore(ds[int(i)]) for i in idx]
      return {"mean": np.stack([r["mean"] for r in recs]),
              "std": np.stack([r["std"] for r in recs]),
              "label": np.asarray([r["label"] for r in recs], np.int32)}
  else:

    def read(idx):
      return {"image": source.images[idx], "label": source.labels[idx]}
  return read


def _cpu_s() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def run_once(config, source, batch_ds_indices, *, batches: int, warmup: int,
             process_count: int) -> dict:
  t = config.train
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config.data, global_batch_size=int(t.global_batch_size),
                                    process_index=0, process_count=process_count,
                                    seed=int(t.seed), source=source)
  b = next(it)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    b = next(it)
  rows = len(b["label"])
  t0, c0 = time.perf_counter(), _cpu_s()
  for _ in range(batches):
    next(it)
  wall = time.perf_counter() - t0
  it.close()
  cpu = _cpu_s() - c0
  read = plain_reader(source)
  t0, c0 = time.perf_counter(), _cpu_s()
  for k in range(1 + warmup, 1 + warmup + batches):  # the batches the pipeline timed
    read(batch_ds_indices[k])
  base = time.perf_counter() - t0
  base_cpu = _cpu_s() - c0
  n = rows * batches
  return {"images_per_s": n / wall, "baseline_images_per_s": n / base, "first_batch_s": first,
          "cpu_s_per_1000_images": 1000 * cpu / n,
          "baseline_cpu_s_per_1000_images": 1000 * base_cpu / n}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  if config is None:
    raise UserError("--config is required")
  if FLAGS.make_fake:
    print(f"writing {FLAGS.make_fake} fake examples to "
          f"{write_fake_dataset(config, FLAGS.make_fake)}", flush=True)
  t = config.train
  source = pipeline.make_source(config.data)
  info = source.info
  local = int(t.global_batch_size) // FLAGS.process_count
  cfg = data_config.resolve(config.data)
  option = lambda key: data_config.int_option(cfg, key)
  par = pipeline.default_parallelism(
      info.name, pipeline.available_cores(), num_workers=option("num_workers"),
      num_threads=option("num_threads"), prefetch_batches=option("prefetch_batches"))
  # The index batches the iterator reads (same construction as make_train_iterator).
  index_batches = pipeline.build_dataset(
      source, batch_size=local, process_index=0, process_count=FLAGS.process_count,
      seed=int(t.seed), num_epochs=cfg["num_epochs"], shuffle=bool(cfg["shuffle"])).parents[0]
  n_read = 1 + FLAGS.warmup + FLAGS.batches
  indices = [index_batches[k] for k in range(n_read)]
  read = plain_reader(source)
  for idx in indices:  # warm the page cache for both sides
    read(idx)
  cores = pipeline.available_cores()
  print(f"data: {info.name} at {config.data.path or '(in memory)'}: {info.num_examples:,} examples "
        f"of {info.shape}; per-process batch {local} (global {int(t.global_batch_size)}, "
        f"{FLAGS.process_count} process(es)); {cores} core(s); {par}; "
        f"load average {os.getloadavg()[0]:.2f}", flush=True)
  print(f"{'repeat':>6} {'pipeline img/s':>15} {'plain loop img/s':>17} {'ratio':>6} "
        f"{'first batch s':>14} {'CPU s/1k img':>13} {'(plain loop)':>13}", flush=True)
  runs = []
  for r in range(FLAGS.repeats):
    res = run_once(config, source, indices, batches=FLAGS.batches, warmup=FLAGS.warmup,
                   process_count=FLAGS.process_count)
    runs.append(res)
    print(f"{r:>6} {res['images_per_s']:>15.0f} {res['baseline_images_per_s']:>17.0f} "
          f"{res['images_per_s'] / res['baseline_images_per_s']:>6.2f} "
          f"{res['first_batch_s']:>14.2f} {res['cpu_s_per_1000_images']:>13.3f} "
          f"{res['baseline_cpu_s_per_1000_images']:>13.3f}", flush=True)
  ips = [r["images_per_s"] for r in runs]
  base = [r["baseline_images_per_s"] for r in runs]
  out = {
      "data": info.name, "path": config.data.path, "num_examples": info.num_examples,
      "example_shape": list(info.shape), "per_process_batch": local,
      "process_count": FLAGS.process_count, "batches": FLAGS.batches, "repeats": FLAGS.repeats,
      "cores": cores, "num_workers": par.num_workers, "num_threads": par.num_threads,
      "prefetch_batches": par.prefetch_batches,
      "images_per_s": statistics.median(ips), "images_per_s_all": [round(x, 1) for x in ips],
      "images_per_s_min": min(ips), "images_per_s_max": max(ips),
      "baseline_images_per_s": statistics.median(base),
      "baseline_images_per_s_all": [round(x, 1) for x in base],
      "ratio": statistics.median([a / b for a, b in zip(ips, base)]),
      "images_per_s_per_core": statistics.median(ips) / cores,
      "first_batch_s": statistics.median(r["first_batch_s"] for r in runs),
      "cpu_s_per_1000_images": statistics.median(r["cpu_s_per_1000_images"] for r in runs),
      "baseline_cpu_s_per_1000_images": statistics.median(
          r["baseline_cpu_s_per_1000_images"] for r in runs),
      "load_average_1min": os.getloadavg()[0],
  }
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  try:
    app.run(main)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
