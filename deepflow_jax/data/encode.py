"""Encoding an image dataset to SD-VAE latent moments: sharded over devices and hosts, resumable.

:func:`encode_dataset` is the whole job (what ``python -m deepflow_jax.preprocess``
runs): open the source (:mod:`deepflow_jax.data.image_sources`), load the VAE,
record or check the settings in the output folder
(:mod:`deepflow_jax.data.latent_writer`), encode this process's unfinished
shards (:func:`encode_shards`) and write the final files when every shard is
done. Per image: the reference's centre crop, ``x / 127.5 - 1``, the VAE
encoder's posterior mean and ``std = exp(0.5 * clip(logvar, -30, 20))``, float32
NHWC. Unreadable images are reported on stderr by name, skipped and listed in
the summary.

Devices: a 1-D mesh ``"data"`` over this process's local devices; each batch
(``batch_size`` per device, uint8 ``(B, res, res, 3)``) is placed with
``NamedSharding(mesh, P("data"))`` and the jitted encoder has explicit in/out
shardings (parameters replicated). The last batch is padded with zeros and the
padding dropped. Images are decoded and cropped by ``num_workers`` threads ahead
of the device, in order.

Hosts: shard ``s`` belongs to process ``s mod P`` (round-robin), so each process
reads only its share of the images and writes only its own shards. Process
index and count come from JAX (after ``jax.distributed.initialize()``) or are
given (``process_index`` / ``process_count``) for independent launches that
share the output folder. The final files are written when every shard is done:

* under JAX's multi-process runtime (index and count not given, several JAX
  processes), process 0 records the settings first; every process waits at a
  barrier after its shards, then process 0 writes the final files;
* with independent launches, each process checks after its own shards; the one
  that finds every shard done writes them (several may, harmlessly: the content
  is the same and written atomically). Otherwise it says what is missing;
  :func:`deepflow_jax.data.latent_writer.finalize_output` writes them later.

Determinism: a rerun with the same settings skips finished shards and redoes
unfinished ones, so an interrupted run resumed ends with the same files as an
uninterrupted one. Batch size, worker and device counts may change between runs:
crops, order and labels stay identical; latents of redone shards may differ by
float32 noise when the per-device batch shape changes (the backend's kernels
depend on it: up to 6e-6 seen on CPU).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepflow_jax import outputs
from deepflow_jax.models import vae as vae_lib
from deepflow_jax.data import image_sources
from deepflow_jax.data import latent_writer
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line
from deepflow_jax.progress import Progress
from deepflow_jax.signals import StopRequests
from deepflow_jax.sharding import data_mesh

PRECISIONS = ("highest", "default")


def _print(line: str) -> None:
  print(line, flush=True)


@functools.lru_cache(maxsize=8)
def _make_encoder(vae, devices: tuple):
  """(jitted ``(params, uint8 images) -> (mean, std)``, data sharding, replicated sharding)."""
  mesh = data_mesh(devices)
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())

  def encode(params, images_u8):
    return vae.apply({"params": params}, image_sources.to_model_input(images_u8),
                     method=vae.encode)

  fn = jax.jit(encode, in_shardings=(repl, data), out_shardings=(data, data))
  return fn, data, repl


@dataclasses.dataclass
class _Loaded:
  shard: int
  index: int
  crop: np.ndarray | None
  label: int | None
  error: str | None


def _ordered_parallel(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
  """``map(fn, items)`` run by ``workers`` threads, in order, at most ``ahead`` in flight."""
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    queue = collections.deque()
    try:
      for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
          yield queue.popleft().result()
      while queue:
        yield queue.popleft().result()
    finally:
      for f in queue:
        f.cancel()


class _ShardEncoder:
  """The state of one :func:`encode_shards` run: shard writers, the batch being filled, the
  batch on the devices, and the progress counters."""

  def __init__(self, source, settings: dict, out: str, shards: Sequence[int], vae, params, *,
               batch_size: int, log: Callable[[str], None], tag: str,
               should_stop: Callable[[], bool] | None, log_every_s: float, devices):
    self.source, self.settings, self.out = source, settings, out
    self.encode, self.data_sharding, repl = _make_encoder(vae, devices)
    self.params = jax.device_put(params, repl)
    self.global_batch = batch_size * len(devices)
    self.res = settings["resolution"]
    self.items = [(s, i) for s in shards for i in range(*latent_writer.shard_range(s, settings))]
    self.total_shards, self.should_stop = len(shards), should_stop
    self.finished = 0  # shards published this run
    self.skipped = 0  # unreadable images so far
    self.uncounted_skips = 0  # skipped but not yet passed to the progress counter
    self.status = f"0/{self.total_shards} shards this run"
    self.progress = Progress(len(self.items), tag, "images", every_s=log_every_s,
                             log=lambda line: log(f"{line} | skipped {self.skipped} | "
                                                  f"{self.status}"))
    self.writers: collections.OrderedDict[int, latent_writer.ShardWriter] = (
        collections.OrderedDict())
    self.batch: list[_Loaded] = []
    self.inflight = None  # (mean, std, items) of the batch on the devices

  def count(self, n: int, force: bool = False) -> None:
    # Skips are counted with the next written batch, so that the first update the
    # rate is measured from is a real batch (it includes compilation).
    self.progress.update(n + self.uncounted_skips, force=force)
    self.uncounted_skips = 0

  def load(self, item) -> _Loaded:
    s, i = item
    try:
      crop, label = self.source.load(i, self.res)
      return _Loaded(s, i, crop, label, None)
    except Exception as e:  # pylint: disable=broad-except  # any decode/crop failure
      return _Loaded(s, i, None, None, f"{type(e).__name__}: {first_line(e)}")

  def add(self, x: _Loaded) -> None:
    """Takes one loaded image (or its failure); a full batch goes to the devices."""
    if x.shard not in self.writers:
      self.writers[x.shard] = latent_writer.ShardWriter(self.out, self.settings, x.shard)
    if x.error is not None:
      name = self.source.name(x.index)
      print(f"warning: skipping unreadable image {name} (example {x.index}): {x.error}",
            file=sys.stderr, flush=True)
      self.writers[x.shard].skip(x.index, name, x.error)
      self.skipped += 1
      self.uncounted_skips += 1
    else:
      self.batch.append(x)
    if len(self.batch) == self.global_batch:
      self.dispatch()

  def dispatch(self) -> None:
    """Sends the batch in hand to the devices and writes the one that was there."""
    arr = np.zeros((self.global_batch, self.res, self.res, 3), np.uint8)  # zero padding
    for k, x in enumerate(self.batch):
      arr[k] = x.crop
    mean, std = self.encode(self.params, jax.device_put(arr, self.data_sharding))
    flight, self.batch = (mean, std, self.batch), []
    self.drain()
    self.inflight = flight

  def drain(self) -> None:
    """Writes the batch on the devices (if any) into its shards."""
    if self.inflight is None:
      return
    mean, std, loaded = self.inflight
    self.inflight = None
    mean, std = np.asarray(mean), np.asarray(std)
    for k, x in enumerate(loaded):
      self.writers[x.shard].write(x.index, x.label, mean[k], std[k], x.crop)
    self.count(len(loaded))

  def finish_ready(self) -> bool:
    """Publishes complete shards; True when ``should_stop`` asks to stop after one."""
    for s in [s for s, w in self.writers.items() if w.pending == 0]:
      self.writers.pop(s).finish()
      self.finished += 1
      self.status = f"shard {s} done ({self.finished}/{self.total_shards} this run)"
      self.count(0, force=True)
      self.status = f"{self.finished}/{self.total_shards} shards this run"
      if self.should_stop is not None and self.should_stop():
        return True
    return False

  def flush(self) -> bool:
    """Encodes and writes what is left; True when ``should_stop`` asked to stop."""
    if self.batch:
      self.dispatch()
    self.drain()
    return self.finish_ready() and self.finished < self.total_shards

  def abandon(self) -> None:
    for w in self.writers.values():  # only unfinished shards remain here
      w.abandon()


def encode_shards(source, settings: dict, out: str, shards: Sequence[int], vae, params, *,
                  batch_size: int, num_workers: int, log: Callable[[str], None] = _print,
                  tag: str = "preprocess", should_stop: Callable[[], bool] | None = None,
                  log_every_s: float = 10.0, devices=None) -> tuple[int, bool, int]:
  """Encodes and writes ``shards`` (in order); returns (shards finished, stopped early, status).

  SIGTERM / SIGINT stop it before the next image (status 143 / 130): unfinished
  shards are abandoned (their temporary files removed), finished ones kept.

  ``batch_size`` is per device; the batch is split over ``devices`` (default:
  ``jax.local_devices()``). Unreadable images are reported on stderr, skipped,
  and recorded in their shard's marker. Progress lines
  (:class:`deepflow_jax.progress.Progress`, plus the skipped count and the
  shards finished) go to ``log``, prefixed ``[tag]``, at most every
  ``log_every_s`` seconds and after every shard. ``should_stop()`` is asked
  after every finished shard; True stops there (as a signal would, status 0).
  """
  devices = tuple(devices if devices is not None else jax.local_devices())
  run = _ShardEncoder(source, settings, out, shards, vae, params, batch_size=batch_size,
                      log=log, tag=tag, should_stop=should_stop, log_every_s=log_every_s,
                      devices=devices)
  stopped = False
  loader = _ordered_parallel(run.load, run.items, num_workers,
                             ahead=max(2 * run.global_batch, 8))
  signals = StopRequests(sigterm=jax.process_count() == 1)
  try:
    signals.__enter__()
    for x in loader:
      if signals.requested:  # the shards in hand are abandoned; finished ones are kept
        stopped = True
        break
      run.add(x)
      if run.finish_ready() and run.finished < run.total_shards:
        stopped = True
        break
    if not stopped:
      stopped = run.flush()
  finally:
    signals.__exit__()
    loader.close()  # stops the decoding threads
    run.abandon()
  if signals.requested:
    log(signals.message(tag, f"stopped after {run.finished} shard(s) this run; finished shards "
                        "are kept, rerun the same command to resume"))
    return run.finished, True, signals.exit_status
  if stopped:
    log(f"[{tag}] stopping after {run.finished} shard(s) (asked to); finished shards are kept")
  return run.finished, stopped, 0


@dataclasses.dataclass
class EncodeResult:
  """What :func:`encode_dataset` did in this process.

  Attributes:
    output: the output folder (absolute).
    shards_written: shards this process finished in this run.
    stopped: True when it stopped early (``should_stop``, or a signal).
    exit_status: 143 / 130 when SIGTERM / SIGINT stopped it, else 0.
    missing: shards not done yet (other processes' shards of independent
      launches); empty when the final files were written.
  """
  output: str
  shards_written: int
  stopped: bool
  missing: list[int]
  exit_status: int = 0

  @property
  def complete(self) -> bool:
    return not self.stopped and not self.missing


def encode_dataset(source: str, vae: str, output: str, *, split: str = "train",
                   resolution: int = 256,
                   format: str = latent_writer.ARRAYRECORD,  # pylint: disable=redefined-builtin
                   save_images: bool = False, batch_size: int = 32,
                   examples_per_shard: int = 5000, limit: int | None = None,
                   num_workers: int | None = None, precision: str = "highest",
                   tfds_data_dir: str | None = None, process_index: int | None = None,
                   process_count: int | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   log_every_s: float = 10.0,
                   log: Callable[[str], None] = _print) -> EncodeResult:
  """Encodes the images of ``source`` to VAE latent moments in ``output`` (see the module doc).

  Args:
    source: ``imagefolder:PATH`` or ``tfds:NAME``.
    vae: a diffusers ``AutoencoderKL`` folder or a ``convert_vae`` folder.
    output: the output folder (created; resumable; refused if it holds other
      settings or unrelated files, with nothing changed).
    split: the TFDS split; the shard-name prefix in both cases.
    resolution: crop side in pixels; a multiple of the VAE's downsampling factor.
    format: ``"arrayrecord"`` or ``"repa"`` (:mod:`latent_writer`).
    save_images: also store the crops (for SSL alignment): ``repa``: PNGs in
      ``output/images/`` (the reference's layout); ``arrayrecord``: inside each
      record (its ``image`` field).
    batch_size: images per device per batch.
    examples_per_shard: source examples per shard (the unit of work, of
      resumption and of the split between hosts).
    limit: only the first ``limit`` source examples.
    num_workers: image decoding threads (default: the CPU count).
    precision: ``"highest"`` (full float32 convolutions) or ``"default"`` (the
      backend's: TF32 / bf16 passes, faster).
    tfds_data_dir: TFDS ``data_dir`` for ``tfds:`` sources.
    process_index, process_count: this launch among independent launches
      sharing ``output`` (both or neither; default: JAX's, coordinated with
      barriers when JAX has several processes).
    should_stop: asked after every finished shard; True stops there, the finished
      shards kept (as SIGTERM / SIGINT do, with status 0).
    log_every_s: seconds between progress lines.
    log: where lines go (print by default).

  Returns:
    An :class:`EncodeResult`. Bad input raises ``UserError`` (one line).
  """
  if format not in latent_writer.FORMATS:
    raise UserError(f"format must be one of {', '.join(latent_writer.FORMATS)}, got {format!r}")
  if precision not in PRECISIONS:
    raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
  if (process_index is None) != (process_count is None):
    raise UserError("give both process_index and process_count, or neither")
  out = os.path.abspath(output)
  coordinated = process_count is None and jax.process_count() > 1
  pidx = jax.process_index() if process_index is None else process_index
  pcount = jax.process_count() if process_count is None else process_count
  tag = "preprocess" if pcount == 1 else f"preprocess p{pidx}/{pcount}"
  say = lambda msg: log(f"[{tag}] {msg}")

  src = image_sources.open_source(source, split, limit=limit, tfds_data_dir=tfds_data_dir)
  vae_model, params = vae_lib.load_diffusers_vae(
      vae, precision=jax.lax.Precision.HIGHEST if precision == "highest" else None)
  f = vae_model.downsample_factor
  if resolution % f:
    raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                    f"factor {f}")
  n = len(src)
  settings = {
      "source": src.spec(), "source_digest": src.digest, "split": split,
      "limit": limit, "num_source_examples": n, "num_classes": src.num_classes,
      "resolution": resolution, "vae_digest": outputs.tree_digest(params),
      "latent_shape": [resolution // f, resolution // f, int(vae_model.latent_channels)],
      "precision": precision, "format": format, "examples_per_shard": examples_per_shard,
      "num_shards": -(-n // examples_per_shard), "save_images": bool(save_images),
  }
  if save_images and format == latent_writer.ARRAYRECORD:
    # Earlier versions wrote PNGs for this format: such a folder is not resumed.
    settings["images_in_records"] = True
  info = {"vae": os.path.abspath(vae), "scaling_factor": float(vae_model.latent_scale),
          "class_names": src.class_names, "source": src.describe()}
  if coordinated and pidx != 0:
    multihost_utils.sync_global_devices("preprocess-settings")  # process 0 writes them first
    doc = latent_writer.open_output(out, settings, info)
  else:
    doc = latent_writer.open_output(out, settings, info)
    if coordinated:
      multihost_utils.sync_global_devices("preprocess-settings")

  num_shards = settings["num_shards"]
  done = latent_writer.done_shards(out, settings)
  mine = [s for s in range(num_shards) if s % pcount == pidx and s not in done]
  ignored = getattr(src, "ignored", {})
  if ignored:
    say("ignored: " + ", ".join(f"{v} {k}" for k, v in sorted(ignored.items())))
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  devices = jax.local_devices()
  say(f"{src.spec()} ({n} examples, {src.num_classes} classes) -> {out} "
      f"[{format}{', images' if save_images else ''}], {resolution}px, latents "
      f"{settings['latent_shape']}; {num_shards} shards, {len(done)} already done, "
      f"{len(mine)} for this process; {len(devices)} device(s) x {batch_size} per batch, "
      f"{num_workers} decoding threads")
  written, stopped, status = encode_shards(
      src, settings, out, mine, vae_model, params, batch_size=batch_size,
      num_workers=num_workers, log=log, tag=tag, should_stop=should_stop,
      log_every_s=log_every_s, devices=devices)
  if stopped:
    done = latent_writer.done_shards(out, settings)
    return EncodeResult(out, written, True, [s for s in range(num_shards) if s not in done],
                        exit_status=status)
  if coordinated:
    multihost_utils.sync_global_devices("preprocess-shards-done")
    if pidx == 0:
      missing = latent_writer.finalize(out, doc, log=log, tag=tag)
      if missing:
        raise UserError(f"{out}: shards {missing[:5]} are missing after every process finished")
    multihost_utils.sync_global_devices("preprocess-finalized")
    return EncodeResult(out, written, False, [])
  missing = latent_writer.finalize(out, doc, log=log, tag=tag)
  if missing:
    say(f"this process's shards are done; {len(missing)} shard(s) of other processes are not "
        f"(first: {missing[:5]}). The last process to finish writes the final files; "
        f"or run: python -m deepflow_jax.preprocess --output={out} --finalize")
  return EncodeResult(out, written, False, missing)
