"""Data-parallel, resumable sample generation (latents, images, ADM ``.npz``).

Command line::

    python -m deepflow_jax.generate --checkpoint=DIR --output=OUT --num_samples=50000 \\
        [--sampler=sde|euler|heun] [--num_steps=250] [--cfg_scale=1.0] \\
        [--guidance_low=0.0] [--guidance_high=1.0] [--per_device_batch=16] [--seed=0] \\
        [--labels=random|cycle] [--vae=VAE_DIR] [--dtype=float32|bfloat16]

``--checkpoint`` is anything ``load_model_for_sampling`` accepts: a directory
written by ``python -m deepflow_jax.convert``, or a training workdir of
``python -m deepflow_jax.main`` (the EMA weights of its newest readable
checkpoint); other loaders can be registered with ``register_model_loader``.

Determinism: sample ``i`` uses ``k = fold_in(key(seed), i)`` split into three
keys: its starting noise ``normal(k0, (H, W, C))``, its per-step SDE noise
(``fold_in(k1, step)``, see ``deepflow_jax.sampling``) and, with
``--labels=random``, its label ``randint(k2, 0, num_classes)``
(``--labels=cycle``: ``i mod num_classes``). Nothing depends on the batch a
sample lands in, so the samples are the same for any device count, host count
and ``--per_device_batch``, up to the backend's kernels: XLA may pick different
matmul kernels for different per-device batch shapes (on CPU results are
bitwise identical once every device holds at least 4 samples; 1-3 samples per
device differ by ~1e-6).

Parallelism: a 1-D mesh over ``jax.devices()`` (every local device of every
host) with axis ``"data"``; the global batch is ``per_device_batch x
device_count``, the sampler is jitted with the batch sharded over ``"data"``
and the parameters replicated. Every process builds its own shards of the
sample-index array (``jax.make_array_from_callback``); process 0 gathers the
results and writes every file; other processes only compute. With several
processes only process 0 touches the output directory (it reads the manifest
and the finished batches and broadcasts which samples remain), so the directory
need only be reachable from process 0. If process 0 refuses to run (e.g.
mismatched settings), the other processes block at that broadcast until the
job is torn down.

Output directory:

* ``manifest.json``: the settings that determine the samples (checkpoint,
  architecture, a digest of the parameters, sampler, steps, guidance, seed,
  labels, count, VAE, dtype). A rerun with different settings is refused and
  nothing is overwritten; batch size and device count may change between runs.
* ``latents/batch_SSSSSSSS.npy`` (final states, NHWC float32) and
  ``labels/batch_SSSSSSSS.npy`` (int32) for the samples ``SSSSSSSS ..``, each
  written to a temporary name then ``os.replace``-d (the latents file is written
  last and marks the batch done). A rerun skips every finished sample, so an
  interrupted run resumed with the same settings ends with the same samples
  (``samples.npz``, PNGs) as an uninterrupted run; stale temporary files of a
  killed run are removed.
* ``images/NNNNNN.png`` (RGB, one per sample) when images are produced: for
  pixel-space models (``in_channels`` 1 or 3; samples are images in [-1, 1],
  1-channel samples are replicated to RGB) or when ``--vae`` decodes latents
  (``image = vae.decode(z / scaling_factor)``). Pixels follow the reference:
  ``uint8(clip((x + 1) / 2 * 255, 0, 255))`` (truncation).
* ``samples.npz`` when every sample is done: ``latents`` (N, H, W, C) float32,
  ``labels`` (N,) int32 and, with images, ``arr_0`` (N, H', W', 3) uint8 in
  sample order (the ADM evaluation suite reads ``arr_0``). Written by streaming
  the shards, so memory stays at one batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepflow_jax import sampling
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.models.deepflow import DTYPES
from deepflow_jax.progress import format_duration
from deepflow_jax.sharding import data_mesh

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "deepflow-jax/generate/v1"
LATENTS_DIR, LABELS_DIR, IMAGES_DIR = "latents", "labels", "images"
SAMPLES_NPZ = "samples.npz"
_BATCH_RE = re.compile(r"^batch_(\d{8})\.npy$")
_TMP_TAG = ".tmp-"
_DTYPES = {k: DTYPES[k] for k in ("float32", "bfloat16")}  # the choices offered here

# ---------------------------------------------------------------------------
# Model loading hook.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelLoader:
  """A way to turn a path into ``(model, params)`` for sampling.

  ``can_load(path) -> bool`` must be cheap (look at files, load nothing);
  ``load(path, dtype) -> (model, params)`` loads the weights to sample with (EMA
  weights where there are two sets), ``dtype`` being the compute dtype name
  (``"float32"`` or ``"bfloat16"``). Raise ``UserError`` for a bad file.
  """
  name: str
  can_load: Callable[[str], bool]
  load: Callable[[str, str], tuple[Any, Any]]


def _load_converted(path: str, dtype: str):
  from deepflow_jax.convert import load_converted  # pylint: disable=g-import-not-at-top
  return load_converted(path, dtype=_DTYPES[dtype])


def _is_converted(path: str) -> bool:
  from deepflow_jax.convert import is_converted_dir  # pylint: disable=g-import-not-at-top
  return is_converted_dir(path)


def _is_workdir(path: str) -> bool:
  from deepflow_jax.checkpointing import is_workdir  # pylint: disable=g-import-not-at-top
  return is_workdir(path)


def _load_workdir(path: str, dtype: str):
  from deepflow_jax.checkpointing import load_workdir_ema  # pylint: disable=g-import-not-at-top
  return load_workdir_ema(path, dtype)


MODEL_LOADERS: list[ModelLoader] = [
    ModelLoader("converted", _is_converted, _load_converted),
    ModelLoader("workdir", _is_workdir, _load_workdir),  # EMA weights of the newest checkpoint
]


def register_model_loader(name: str, can_load: Callable[[str], bool],
                          load: Callable[[str, str], tuple[Any, Any]]) -> None:
  """Adds (or replaces, by name) a loader; loaders are tried in registration order.

  E.g. the training code registers one for its work directories::

      register_model_loader("workdir", is_workdir, lambda p, dtype: restore_ema(p, dtype))
  """
  MODEL_LOADERS[:] = [l for l in MODEL_LOADERS if l.name != name]
  MODEL_LOADERS.append(ModelLoader(name, can_load, load))


def load_model_for_sampling(path: str, dtype: str = "float32") -> tuple[Any, Any]:
  """``(model, params)`` from the first registered loader that accepts ``path``.

  Raises ``UserError`` (one line) when the path is missing or no loader
  accepts it ("not a converted checkpoint or training workdir").
  """
  if dtype not in _DTYPES:
    raise UserError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
  if not os.path.exists(path):
    raise UserError(f"{path}: no such checkpoint (expected a converted checkpoint directory "
                    "written by python -m deepflow_jax.convert, or a training workdir)")
  for loader in MODEL_LOADERS:
    if loader.can_load(path):
      return loader.load(path, dtype)
  raise UserError(f"{path}: not a converted checkpoint or training workdir (expected model.json "
                  "and params/ from python -m deepflow_jax.convert)")


def params_digest(params) -> str:
  """A BLAKE2b digest of every parameter's path, dtype, shape and bytes (host side)."""
  h = hashlib.blake2b(digest_size=16)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in flat:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


# ---------------------------------------------------------------------------
# Per-sample randomness.
# ---------------------------------------------------------------------------


def sample_inputs(model, seed: int, indices: jax.Array, labels_mode: str):
  """(latents (B,H,W,C), labels (B,), per-step noise keys (B,)) from (seed, index) alone."""
  shape = (model.input_size, model.input_size, model.in_channels)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
  parts = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(parts[:, 0])
  if labels_mode == "random":
    labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, model.num_classes, jnp.int32))(
        parts[:, 2])
  else:  # cycle
    labels = (indices % model.num_classes).astype(jnp.int32)
  return latents, labels, parts[:, 1]


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 with the reference's formula (truncation); RGB for 1 channel."""
  from deepflow_jax.vae import images_to_uint8  # pylint: disable=g-import-not-at-top
  x = images_to_uint8(np.asarray(images, np.float32))
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def _tmp_name(path: str) -> str:
  return f"{path}{_TMP_TAG}{os.getpid()}"


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)


def _atomic_save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tmp = _tmp_name(path)
  Image.fromarray(image).save(tmp, format="PNG")
  os.replace(tmp, path)


def _batch_file(kind: str, start: int) -> str:
  return os.path.join(kind, f"batch_{start:08d}.npy")


def _remove_stale_tmp(out: str) -> None:
  for sub in ("", LATENTS_DIR, LABELS_DIR, IMAGES_DIR):
    d = os.path.join(out, sub)
    if os.path.isdir(d):
      for name in os.listdir(d):
        if _TMP_TAG in name:
          os.remove(os.path.join(d, name))


def finished_ranges(out: str, num_samples: int) -> list[tuple[int, int]]:
  """(start, count) of every finished batch, sorted; checks that they do not overlap."""
  d = os.path.join(out, LATENTS_DIR)
  ranges = []
  if os.path.isdir(d):
    for name in sorted(os.listdir(d)):
      m = _BATCH_RE.match(name)
      if not m:
        continue
      start = int(m.group(1))
      if not os.path.exists(os.path.join(out, _batch_file(LABELS_DIR, start))):
        continue  # labels without latents cannot happen; latents without labels: redo
      count = np.load(os.path.join(d, name), mmap_mode="r").shape[0]
      ranges.append((start, count))
  ranges.sort()
  end = 0
  for start, count in ranges:
    if start < end or start + count > num_samples:
      raise UserError(f"{out}/{LATENTS_DIR}: batch files overlap or exceed --num_samples="
                      f"{num_samples} (batch_{start:08d}.npy holds {count}); the directory was "
                      "modified by hand")
    end = start + count
  return ranges


def pending_batches(done: list[tuple[int, int]], num_samples: int,
                    batch: int) -> list[tuple[int, int]]:
  """(start, count) batches covering every sample index not in ``done``; count <= batch."""
  covered = np.zeros(num_samples, bool)
  for start, count in done:
    covered[start:start + count] = True
  todo = []
  i = 0
  while i < num_samples:
    if covered[i]:
      i += 1
      continue
    j = i
    while j < num_samples and not covered[j] and j - i < batch:
      j += 1
    todo.append((i, j - i))
    i = j
  return todo


def _npz_stream_member(zf: zipfile.ZipFile, name: str, dtype, shape, chunks) -> None:
  """Writes one ``.npy`` member of an ``.npz`` from an iterator of arrays (no full copy in memory)."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(int(s) for s in shape)}
  with zf.open(name + ".npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(f, header)
    n = 0
    for chunk in chunks:
      chunk = np.ascontiguousarray(chunk, dtype=dtype)
      f.write(chunk.tobytes())
      n += chunk.shape[0]
    if n != shape[0]:
      raise RuntimeError(f"{name}: wrote {n} rows, expected {shape[0]}")


def write_samples_npz(out: str, ranges: list[tuple[int, int]], num_samples: int,
                      with_images: bool) -> str:
  """Concatenates the shards (and PNGs) into ``samples.npz`` atomically; returns its path."""
  first = np.load(os.path.join(out, _batch_file(LATENTS_DIR, ranges[0][0])), mmap_mode="r")
  path = os.path.join(out, SAMPLES_NPZ)
  tmp = _tmp_name(path)

  def shards(kind):
    for start, _ in ranges:
      yield np.load(os.path.join(out, _batch_file(kind, start)))

  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    if with_images:
      from PIL import Image  # pylint: disable=g-import-not-at-top

      def images():
        for i in range(num_samples):
          with Image.open(os.path.join(out, IMAGES_DIR, f"{i:06d}.png")) as im:
            yield np.asarray(im.convert("RGB"))[None]

      probe = next(images())
      _npz_stream_member(zf, "arr_0", np.uint8, (num_samples,) + probe.shape[1:], images())
    _npz_stream_member(zf, "latents", np.float32, (num_samples,) + first.shape[1:],
                       shards(LATENTS_DIR))
    _npz_stream_member(zf, "labels", np.int32, (num_samples,), shards(LABELS_DIR))
  os.replace(tmp, path)
  return path


# ---------------------------------------------------------------------------
# Settings and manifest.
# ---------------------------------------------------------------------------


def _check_manifest(out: str, settings: dict[str, Any]) -> bool:
  """True if ``out`` already holds a run with these settings; raises if it holds another."""
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    if os.path.isdir(out) and any(not n.startswith(".") for n in os.listdir(out)):
      raise UserError(f"{out}: not empty and has no {MANIFEST}; refusing to write samples into "
                      "it (use a new or empty --output)")
    return False
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)["settings"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: unreadable ({e}); use a new --output") from e
  diff = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now"
          for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
  if diff:
    raise UserError(f"{out} holds samples made with different settings ({'; '.join(diff)}); "
                    "rerun with the original settings to resume, or use another --output")
  return True


def _write_manifest(out: str, settings: dict[str, Any], info: dict[str, Any]) -> None:
  path = os.path.join(out, MANIFEST)
  tmp = _tmp_name(path)
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"format": MANIFEST_FORMAT, "settings": settings, "first_run": info}, f, indent=2,
              sort_keys=True)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m deepflow_jax.generate",
                              description="Generate DeepFlow samples (data-parallel, resumable).")
  p.add_argument("--checkpoint", required=True,
                 help="converted checkpoint directory (python -m deepflow_jax.convert)")
  p.add_argument("--output", required=True, help="output directory (created; resumable)")
  p.add_argument("--num_samples", type=int, required=True)
  p.add_argument("--sampler", default="sde", choices=sampling.SAMPLERS)
  p.add_argument("--num_steps", type=int, default=250)
  p.add_argument("--cfg_scale", type=float, default=1.0, help="<= 1 disables guidance")
  p.add_argument("--guidance_low", type=float, default=0.0)
  p.add_argument("--guidance_high", type=float, default=1.0)
  p.add_argument("--per_device_batch", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--labels", default="random", choices=("random", "cycle"),
                 help="random: uniform from (seed, index); cycle: index mod num_classes")
  p.add_argument("--vae", default=None,
                 help="VAE folder (diffusers or convert_vae) to decode latents into images")
  p.add_argument("--dtype", default="float32", choices=tuple(_DTYPES),
                 help="model compute dtype (the sampler state stays float32)")
  p.add_argument("--stop_after_batches", type=int, default=None, help=argparse.SUPPRESS)
  return p


def _validate(a) -> None:
  if a.num_samples < 1:
    raise UserError(f"--num_samples must be >= 1, got {a.num_samples}")
  if a.num_steps < 1:
    raise UserError(f"--num_steps must be >= 1, got {a.num_steps}")
  if a.per_device_batch < 1:
    raise UserError(f"--per_device_batch must be >= 1, got {a.per_device_batch}")
  if not 0 <= a.seed < 2**31:
    raise UserError(f"--seed must be in [0, 2**31), got {a.seed}")
  if not np.isfinite([a.cfg_scale, a.guidance_low, a.guidance_high]).all():
    raise UserError("--cfg_scale, --guidance_low and --guidance_high must be finite")
  if os.path.exists(a.output) and not os.path.isdir(a.output):
    raise UserError(f"{a.output}: exists and is not a directory")


def _load_vae(path: str, model):
  try:
    from deepflow_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"--vae needs deepflow_jax.vae, which cannot be imported ({e})") from e
  vae, vae_params = vae_lib.load_diffusers_vae(path)
  if vae.latent_channels != model.in_channels:
    raise UserError(f"{path}: the VAE has {vae.latent_channels} latent channels but the model "
                    f"samples {model.in_channels}")
  return vae, vae_params


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  _validate(a)
  model, params = load_model_for_sampling(a.checkpoint, a.dtype)
  pixel_space = model.in_channels in (1, 3)
  if pixel_space and a.vae:
    raise UserError(f"the model samples {model.in_channels}-channel images (pixel space); "
                    "--vae is for latent-space models")
  vae = vae_params = None
  if a.vae:
    vae, vae_params = _load_vae(a.vae, model)
  with_images = pixel_space or vae is not None

  from deepflow_jax.convert import model_to_dict  # pylint: disable=g-import-not-at-top
  settings = {
      "checkpoint": os.path.abspath(a.checkpoint),
      "model": model_to_dict(model),
      "params_digest": params_digest(params),
      "dtype": a.dtype,
      "sampler": a.sampler,
      "num_steps": a.num_steps,
      "cfg_scale": a.cfg_scale,
      "guidance_low": a.guidance_low,
      "guidance_high": a.guidance_high,
      "seed": a.seed,
      "labels": a.labels,
      "num_samples": a.num_samples,
      "vae": os.path.abspath(a.vae) if a.vae else None,
      "images": with_images,
  }
  out = os.path.abspath(a.output)
  mesh = data_mesh()
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = a.per_device_batch * mesh.size

  # Process 0 owns the directory; every process learns the same plan from it.
  resumed = False
  if jax.process_index() == 0:
    resumed = _check_manifest(out, settings)
    for sub in ("", LATENTS_DIR, LABELS_DIR) + ((IMAGES_DIR,) if with_images else ()):
      os.makedirs(os.path.join(out, sub), exist_ok=True)
    _remove_stale_tmp(out)
    if not resumed:
      _write_manifest(out, settings, {"per_device_batch": a.per_device_batch,
                                      "devices": mesh.size, "processes": jax.process_count(),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    done = finished_ranges(out, a.num_samples)
  else:
    done = []
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    covered = np.zeros(a.num_samples, np.int32)
    for s, c in done:
      covered[s:s + c] = 1
    covered = np.asarray(multihost_utils.broadcast_one_to_all(covered))
    done = [(int(i), 1) for i in np.flatnonzero(covered)]
  todo = pending_batches(done, a.num_samples, batch)
  n_done = a.num_samples - sum(c for _, c in todo)
  _log(f"[generate] {a.num_samples} samples -> {out}: {n_done} already done, {len(todo)} "
       f"batches of up to {batch} ({mesh.size} devices x {a.per_device_batch}) to go; "
       f"sampler {a.sampler}, {a.num_steps} steps, cfg {a.cfg_scale} in "
       f"[{a.guidance_low}, {a.guidance_high}]" + (" (resumed)" if resumed else ""))

  sample_fn = sampling.make_sampler(model, a.sampler, a.num_steps)
  uses_noise = sampling.num_noise_draws(a.sampler, a.num_steps) > 0

  def generate(params, indices, cfg_scale, low, high):
    z, y, keys = sample_inputs(model, a.seed, indices, a.labels)
    x = sample_fn(params, z, y, keys if uses_noise else None, cfg_scale, low, high)
    return x, y

  gen = jax.jit(generate, in_shardings=(repl, data, repl, repl, repl),
                out_shardings=(data, data))
  decode = None
  if vae is not None:
    scale = float(vae.scaling_factor)

    def decode_fn(p, z):
      return vae.apply({"params": p}, z / scale, method=vae.decode)

    decode = jax.jit(decode_fn, in_shardings=(repl, data), out_shardings=data)
    vae_params = jax.device_put(vae_params, repl)
  params = jax.device_put(params, repl)
  scalars = [jnp.asarray(v, jnp.float32) for v in (a.cfg_scale, a.guidance_low, a.guidance_high)]

  t_start = time.perf_counter()
  t_first = None
  n_first = 0
  produced = 0
  for b, (start, count) in enumerate(todo):
    idx = np.arange(start, start + batch, dtype=np.int32)  # the tail past `count` is padding
    indices = jax.make_array_from_callback((batch,), data, lambda s, idx=idx: idx[s])
    x, y = gen(params, indices, *scalars)
    images = None
    if decode is not None:
      images = decode(vae_params, x)
    x, y = _gather(x)[:count], _gather(y)[:count]
    if images is not None:
      images = _gather(images)[:count]
    elif pixel_space:
      images = x
    if jax.process_index() == 0:
      if images is not None:
        u8 = to_uint8(images)
        for i in range(count):
          _atomic_save_png(os.path.join(out, IMAGES_DIR, f"{start + i:06d}.png"), u8[i])
      _atomic_save_npy(os.path.join(out, _batch_file(LABELS_DIR, start)), y.astype(np.int32))
      _atomic_save_npy(os.path.join(out, _batch_file(LATENTS_DIR, start)),
                       x.astype(np.float32))  # written last: marks the batch done
    produced += count
    now = time.perf_counter()
    if t_first is None:  # the first batch includes compilation: time the rest
      t_first, n_first = now, produced
    if produced > n_first:
      rate = (produced - n_first) / (now - t_first)
    else:
      rate = produced / (now - t_start)
    total_done = n_done + produced
    eta = (a.num_samples - total_done) / rate if rate > 0 else float("inf")
    _log(f"[generate] {total_done}/{a.num_samples} samples ({100 * total_done / a.num_samples:.1f}"
         f"%) | {rate:.2f} samples/s | ETA {format_duration(eta)}")
    if a.stop_after_batches is not None and b + 1 >= a.stop_after_batches and b + 1 < len(todo):
      _sync("generate-stop")
      _log(f"[generate] stopping after {b + 1} batches (--stop_after_batches)")
      return 0
  _sync("generate-batches-done")

  if jax.process_index() == 0:
    ranges = finished_ranges(out, a.num_samples)
    if sum(c for _, c in ranges) != a.num_samples:
      raise UserError(f"{out}: only {sum(c for _, c in ranges)} of {a.num_samples} samples are "
                      "on disk after the run; rerun to finish")
    path = os.path.join(out, SAMPLES_NPZ)
    if not os.path.exists(path):
      write_samples_npz(out, ranges, a.num_samples, with_images)
    _log(f"[generate] done: {a.num_samples} samples in {path} "
         f"({time.perf_counter() - t_start:.1f}s this run)")
  _sync("generate-done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
