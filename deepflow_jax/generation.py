"""Data-parallel, resumable sample generation into a folder (latents, images, ADM ``.npz``).

``generate_to_folder(model, params, output, settings)`` is what
``python -m deepflow_jax.generate`` runs; notebooks can call it directly.

Determinism: sample ``i`` uses ``k = fold_in(key(seed), i)`` split into three
keys: its starting noise ``normal(k0, (H, W, C))``, its per-step SDE noise
(``fold_in(k1, step)``, see ``deepflow_jax.sampling``) and, with
``labels="random"``, its label ``randint(k2, 0, num_classes)``
(``labels="cycle"``: ``i mod num_classes``). Nothing depends on the batch a
sample lands in. What is exact:

* the labels and the order of samples are identical for any device count,
  host count and ``per_device_batch``;
* the latents (final sampler states) are identical as long as the backend runs
  the same kernels: on CPU they are bitwise identical once every device holds at
  least 4 samples (1-3 samples per device differ by ~1e-6); accelerators may
  pick other kernels for other per-device batch shapes;
* decoded images (``arr_0``, PNGs) of a latent model come from the VAE decoder,
  whose output also depends on the batch shape by ~1e-6, and a value that lands
  on a uint8 boundary then truncates to a neighbouring integer: a few pixels in
  a million differ by 1 between batch sizes (seen: 17 of 491,520).

Parallelism: a 1-D mesh over every device of every host with axis ``"data"``;
the global batch is ``per_device_batch x device_count``, the sampler is jitted
with the batch sharded over ``"data"`` and the parameters replicated. Every
process builds its own shards of the sample-index array; process 0 gathers the
results and writes every file; other processes only compute. With several
processes only process 0 touches the output directory (it reads the manifest
and the finished batches and broadcasts which samples remain), so the directory
need only be reachable from process 0. If process 0 refuses to run (e.g.
mismatched settings), the other processes block at that broadcast until the
job is torn down.

Output directory (rules of ``deepflow_jax.outputs``):

* ``manifest.json``: the settings that determine the samples (checkpoint,
  architecture, a digest of the parameters, sampler, steps, guidance, seed,
  labels, count, VAE, dtype; the time grid and its parameter when it is not the
  sampler's default). A rerun with different settings is refused and
  nothing is touched; batch size and device count may change between runs.
* ``latents/batch_SSSSSSSS.npy`` (final states, NHWC float32) and
  ``labels/batch_SSSSSSSS.npy`` (int32) for the samples ``SSSSSSSS ..``, each
  written atomically (the latents file is written last and marks the batch
  done). A rerun skips every finished sample, so an interrupted run resumed
  with the same settings ends with the same samples as an uninterrupted run;
  stale temporary files of a killed run are removed.
* ``images/NNNNNN.png`` (RGB, one per sample) when images are produced: for
  pixel-space models (``in_channels`` 1 or 3; samples are images in [-1, 1],
  1-channel samples replicated to RGB) or when a VAE decodes latents
  (``image = vae.decode(z / latent_scale)``). Pixels follow the reference:
  ``uint8(clip((x + 1) / 2 * 255, 0, 255))`` (truncation).
* ``samples.npz`` when every sample is done: ``latents`` (N, H, W, C) float32,
  ``labels`` (N,) int32 and, with images, ``arr_0`` (N, H', W', 3) uint8 in
  sample order (the ADM evaluation suite reads ``arr_0``). Written by streaming
  the shards, so memory stays at one batch.
"""
from __future__ import annotations

import dataclasses
import io
import re
import time
import zipfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from deepflow_jax import images as images_lib
from deepflow_jax import outputs
from deepflow_jax import sampling
from deepflow_jax import locks
from deepflow_jax import npy_io
from deepflow_jax import sharding as shd
from deepflow_jax import storage
from deepflow_jax.errors import UserError
from deepflow_jax.models.loading import model_to_dict
from deepflow_jax.progress import Progress
from deepflow_jax.signals import StopRequests

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "deepflow-jax/generate/v1"
LATENTS_DIR, LABELS_DIR, IMAGES_DIR = "latents", "labels", "images"
SAMPLES_NPZ = "samples.npz"
_BATCH_RE = re.compile(r"^batch_(\d{8})\.npy$")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """What determines the samples (besides the model and its weights); see the module docstring.

  ``sampler`` holds the sampler, steps, grid and guidance (checked by its own
  ``problems``); the rest is what generation adds: how many samples, the seed,
  how labels are chosen and the compute dtype the model was loaded with.
  """
  num_samples: int
  sampler: sampling.SamplerSettings = sampling.SamplerSettings()
  seed: int = 0
  labels: str = "random"  # "random" | "cycle"
  dtype: str = "float32"  # the model's compute dtype (recorded; the model already has it)

  def problems(self, accel_heads: Optional[bool] = None) -> list[str]:
    """Every invalid value, named by its command-line flag (``accel_heads``: as
    ``SamplerSettings.problems``)."""
    out = []
    if self.num_samples < 1:
      out.append(f"--num_samples must be >= 1, got {self.num_samples}")
    out += self.sampler.problems(prefix="--", accel_heads=accel_heads)
    if not 0 <= self.seed < 2**31:
      out.append(f"--seed must be in [0, 2**31), got {self.seed}")
    if self.labels not in sampling.LABEL_MODES:
      out.append(f"--labels must be one of {', '.join(sampling.LABEL_MODES)}, got "
                 f"{self.labels!r}")
    return out


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  output: str
  num_samples: int
  samples_npz: Optional[str]  # set when every sample is done
  stopped: Optional[int] = None  # exit status when a signal stopped the run


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def _batch_file(out: str, kind: str, start: int) -> str:
  return storage.join(out, kind, f"batch_{start:08d}.npy")


def _npy_rows(path: str) -> int:
  """The first dimension of a ``.npy`` file, from its header only (no body read; gs:// too)."""
  shape, _, _ = npy_io.read_header(io.BytesIO(storage.read_head(path, 4096)))
  return int(shape[0])


def _load_npy(path: str) -> np.ndarray:
  with storage.open_file(path, "rb") as f:
    return np.load(f, allow_pickle=False)


def finished_ranges(out: str, num_samples: int) -> list[tuple[int, int]]:
  """(start, count) of every finished batch, sorted; checks that they do not overlap."""
  d = storage.join(out, LATENTS_DIR)
  ranges = []
  labels = set(storage.listdir(storage.join(out, LABELS_DIR)))
  for name in storage.listdir(d):
    m = _BATCH_RE.match(name)
    if not m:
      continue
    start = int(m.group(1))
    if name not in labels:
      continue  # labels without latents cannot happen; latents without labels: redo
    ranges.append((start, _npy_rows(storage.join(d, name))))
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
  first = _load_npy(_batch_file(out, LATENTS_DIR, ranges[0][0]))
  path = storage.join(out, SAMPLES_NPZ)

  def shards(kind):
    for start, _ in ranges:
      yield _load_npy(_batch_file(out, kind, start))

  def pngs():
    for i in range(num_samples):
      with storage.open_file(storage.join(out, IMAGES_DIR, f"{i:06d}.png")) as f, \
          Image.open(f) as im:
        yield np.asarray(im.convert("RGB"))[None]

  def write(tmp):
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      if with_images:
        probe = next(pngs())
        _npz_stream_member(zf, "arr_0", np.uint8, (num_samples,) + probe.shape[1:], pngs())
      _npz_stream_member(zf, "latents", np.float32, (num_samples,) + first.shape[1:],
                         shards(LATENTS_DIR))
      _npz_stream_member(zf, "labels", np.int32, (num_samples,), shards(LABELS_DIR))

  outputs.atomic_write(path, write)
  return path


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


def _print0(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def output_folder(output: str) -> outputs.OutputFolder:
  """The generation output folder (manifest rules of ``deepflow_jax.outputs``)."""
  return outputs.OutputFolder(output, manifest=MANIFEST, format=MANIFEST_FORMAT,
                              what="a generate output", info_key="first_run",
                              labels={"params_digest": "the model's parameters differ"})


def folder_settings(model, params, settings: GenerationSettings, *, checkpoint: str = "",
                    vae_path: Optional[str] = None, with_images: bool) -> dict[str, Any]:
  """The manifest's settings: everything that determines the samples (the grid only when
  it is not the sampler's default, so folders written before grids existed resume)."""
  s = settings.sampler
  return {
      "checkpoint": storage.absolute(checkpoint) if checkpoint else "",
      "model": model_to_dict(model),
      "params_digest": outputs.tree_digest(params),
      "dtype": settings.dtype, "sampler": s.sampler, "num_steps": s.num_steps,
      "cfg_scale": s.cfg_scale, "guidance_low": s.guidance_low, "guidance_high": s.guidance_high,
      "seed": settings.seed, "labels": settings.labels, "num_samples": settings.num_samples,
      **s.grid_record(),
      "vae": storage.absolute(vae_path) if vae_path else None,
      "images": with_images,
  }


def _check(model, settings: GenerationSettings, per_device_batch: int, vae, vae_path) -> None:
  """Every refusal before anything is written or compiled (one ``UserError`` line)."""
  problems = settings.problems(accel_heads=bool(tuple(getattr(model, "df_idxs", ()))))
  if per_device_batch < 1:
    problems.append(f"--per_device_batch must be >= 1, got {per_device_batch}")
  if problems:
    raise UserError("; ".join(problems))
  if model.in_channels in (1, 3) and vae is not None:
    raise UserError(f"the model samples {model.in_channels}-channel images (pixel space); "
                    "--vae is for latent-space models")
  if vae is not None and vae[0].latent_channels != model.in_channels:
    raise UserError(f"{vae_path}: the VAE has {vae[0].latent_channels} latent channels but the "
                    f"model samples {model.in_channels}")


def _hold_folder(folder: outputs.OutputFolder, manifest: dict, log
                 ) -> Optional[locks.WriterLock]:
  """Process 0 takes the folder's writer lock (``deepflow_jax.locks``) once the folder passed
  its checks (a refused folder is not touched); None on other processes."""
  if jax.process_index() != 0:
    return None
  folder.check(manifest)
  return locks.WriterLock(folder.path, flag="--output", log=log).acquire()


def _open_and_plan(folder: outputs.OutputFolder, manifest: dict, info: dict, num_samples: int,
                   batch: int, with_images: bool) -> tuple[list[tuple[int, int]], bool]:
  """Opens the folder on process 0 and returns every process the same pending batches.

  Process 0 checks (or writes) the manifest, removes stale temporaries and reads
  which samples are finished; with several processes it broadcasts that, so the
  folder need only be reachable from process 0.
  """
  resumed, done = False, []
  if jax.process_index() == 0:
    _, resumed = folder.open(manifest, info)
    for sub in (LATENTS_DIR, LABELS_DIR) + ((IMAGES_DIR,) if with_images else ()):
      storage.makedirs(folder.join(sub))
    outputs.remove_stale_tmp(folder.path, recursive=True)
    done = finished_ranges(folder.path, num_samples)
  if jax.process_count() > 1:
    covered = np.zeros(num_samples, np.int32)
    for s, c in done:
      covered[s:s + c] = 1
    covered = np.asarray(multihost_utils.broadcast_one_to_all(covered))
    done = [(int(i), 1) for i in np.flatnonzero(covered)]
  return pending_batches(done, num_samples, batch), resumed


def _save_batch(out: str, start: int, x: np.ndarray, y: np.ndarray,
                images: Optional[np.ndarray]) -> None:
  """Writes one finished batch (process 0): PNGs, labels, then the latents that mark it done."""
  if images is not None:
    u8 = images_lib.to_uint8(images, rgb=True)
    for i in range(len(x)):
      outputs.atomic_save_png(storage.join(out, IMAGES_DIR, f"{start + i:06d}.png"), u8[i])
  outputs.atomic_save_npy(_batch_file(out, LABELS_DIR, start), y.astype(np.int32))
  outputs.atomic_save_npy(_batch_file(out, LATENTS_DIR, start),
                          x.astype(np.float32))  # written last: marks the batch done


def _finish(out: str, n: int, with_images: bool, t_start: float, log) -> str:
  """Concatenates the finished batches into ``samples.npz`` (process 0); returns its path."""
  path = storage.join(out, SAMPLES_NPZ)
  if jax.process_index() == 0:
    ranges = finished_ranges(out, n)
    if sum(c for _, c in ranges) != n:
      raise UserError(f"{out}: only {sum(c for _, c in ranges)} of {n} samples are on disk after "
                      "the run; rerun to finish")
    if not storage.exists(path):
      log(f"[generate] writing {path}")
      write_samples_npz(out, ranges, n, with_images)
    log(f"[generate] done: {n} samples in {path} ({time.perf_counter() - t_start:.1f}s this run)")
  _sync("generate-done")
  return path


def generate_to_folder(model, params, output: str, settings: GenerationSettings, *,
                       per_device_batch: int = 16, vae: Optional[tuple[Any, Any]] = None,
                       vae_path: Optional[str] = None, latent_scale: Optional[float] = None,
                       checkpoint: str = "", should_stop: Optional[Callable[[], bool]] = None,
                       log: Callable[[str], None] = _print0) -> GenerationResult:
  """Generates ``settings.num_samples`` samples into ``output``, resuming what is there.

  Args:
    model, params: the network and the weights to sample with.
    output: the output folder (created; resumable; see the module docstring).
    settings: the sampler and sample settings (recorded in the manifest).
    per_device_batch: samples per device per step (free to change between runs).
    vae: ``(module, params)`` of an SD-VAE to decode latents into images;
      ``vae_path`` is recorded in the manifest. ``latent_scale``: images are
      ``vae.decode(z / latent_scale)``; default the VAE's own latent scale (pass
      the training data's, ``workdir.latent_scale`` reads a workdir's, when it differs).
    checkpoint: where the weights came from (recorded).
    should_stop: asked after every batch (with SIGTERM / SIGINT); True stops the
      run there as a signal would, the finished batches kept.
    log: where progress lines go (process 0 prints by default).

  Returns a ``GenerationResult``; ``samples_npz`` is None when the run stopped
  early (``stopped`` holds the exit status: 143 or 130 for a signal, 0 when
  ``should_stop`` asked). SIGTERM / SIGINT stop the run after the batch in hand
  (finished batches are kept; rerunning resumes).
  """
  _check(model, settings, per_device_batch, vae, vae_path)
  pixel_space = model.in_channels in (1, 3)
  with_images = pixel_space or vae is not None
  n = settings.num_samples
  folder = output_folder(output)
  out = folder.path
  manifest = folder_settings(model, params, settings, checkpoint=checkpoint, vae_path=vae_path,
                             with_images=with_images)
  if vae is not None and latent_scale is not None:
    manifest["latent_scale"] = float(latent_scale)
  lock = _hold_folder(folder, manifest, log)  # process 0: one run writes a folder at a time
  try:
    mesh = shd.data_mesh()
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = per_device_batch * mesh.size
    todo, resumed = _open_and_plan(
        folder, manifest, {"per_device_batch": per_device_batch, "devices": mesh.size,
                           "processes": jax.process_count(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, n, batch, with_images)
    n_done = n - sum(c for _, c in todo)
    log(f"[generate] {n} samples -> {out}: {n_done} already done, {len(todo)} batches of up to "
        f"{batch} ({mesh.size} devices x {per_device_batch}) to go; sampler "
        f"{settings.sampler.describe()}" + (" (resumed)" if resumed else ""))
    if not with_images:
      log("[generate] latent model and no --vae: writing latents only (no PNGs, no arr_0); "
          "pass --vae=DIR to decode them into images")
    gen = sampling.make_batch_sampler(model, mesh, settings.sampler, labels_mode=settings.labels)
    decode = (images_lib.make_decoder(vae, mesh, latent_scale=latent_scale)
              if vae is not None else None)
    params = jax.device_put(params, shd.replicated(mesh))
    seed = jnp.asarray(settings.seed, jnp.int32)
    guidance = settings.sampler.guidance()
    no_labels = jax.make_array_from_callback((batch,), data, lambda s: np.zeros(batch, np.int32)[s])
    t_start = time.perf_counter()
    progress = Progress(n, "generate", "samples", done=n_done, every_s=0.0, log=log)
    with StopRequests() as stop:
      for b, (start, count) in enumerate(todo):
        idx = np.arange(start, start + batch, dtype=np.int32)  # the tail past `count` is padding
        indices = jax.make_array_from_callback((batch,), data, lambda s, idx=idx: idx[s])
        x, y = gen(params, seed, indices, no_labels, *guidance)
        images = decode(x) if decode is not None else (x if pixel_space else None)
        if images is not None:
          images = shd.host_array(images)[:count]
        if jax.process_index() == 0:
          _save_batch(out, start, shd.host_array(x)[:count], shd.host_array(y)[:count], images)
        progress.update(count)
        asked = bool(should_stop and should_stop())
        stop_now = stop.requested or asked
        if jax.process_count() > 1:
          stop_now = bool(multihost_utils.broadcast_one_to_all(np.int32(stop_now)))
        if stop_now and b + 1 < len(todo):
          _sync("generate-stop")
          log(stop.message("generate", f"stopped after {progress.done:,} of {n:,} samples; "
                           "finished batches are kept, rerun the same command to resume")
              if stop.requested else f"[generate] stopped after {progress.done:,} of {n:,} "
              "samples (asked to); finished batches are kept")
          return GenerationResult(out, n, None, stopped=stop.exit_status if stop.requested else 0)
    _sync("generate-batches-done")
    return GenerationResult(out, n, _finish(out, n, with_images, t_start, log))
  finally:
    if lock is not None:
      lock.release()
