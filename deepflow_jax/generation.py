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
  (``image = vae.decode(z / scaling_factor)``). Pixels follow the reference:
  ``uint8(clip((x + 1) / 2 * 255, 0, 255))`` (truncation).
* ``samples.npz`` when every sample is done: ``latents`` (N, H, W, C) float32,
  ``labels`` (N,) int32 and, with images, ``arr_0`` (N, H', W', 3) uint8 in
  sample order (the ADM evaluation suite reads ``arr_0``). Written by streaming
  the shards, so memory stays at one batch.
"""
from __future__ import annotations

import dataclasses
import os
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
from deepflow_jax import sharding as shd
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
  """What determines the samples (besides the model and its weights); see the module docstring."""
  num_samples: int
  sampler: str = "sde"
  num_steps: int = 250
  cfg_scale: float = 1.0
  guidance_low: float = 0.0
  guidance_high: float = 1.0
  seed: int = 0
  labels: str = "random"  # "random" | "cycle"
  dtype: str = "float32"  # the model's compute dtype (recorded; the model already has it)
  grid: str = ""  # time grid (sampling.GRIDS); "" = the sampler's default
  grid_shift: float = sampling.DEFAULT_GRID_SHIFT  # s of the "shifted" grid
  grid_rho: float = sampling.DEFAULT_GRID_RHO  # rho of the "poly" grid

  def grid_kwargs(self) -> dict[str, Any]:
    """The grid as keyword arguments of the sampling functions."""
    return dict(grid=self.grid or None, grid_shift=float(self.grid_shift),
                grid_rho=float(self.grid_rho))

  def grid_manifest(self) -> dict[str, Any]:
    """The grid as recorded in the manifest: nothing for the sampler's default grid (so
    folders written before grids existed resume), else its name and its one parameter."""
    grid = self.grid or sampling.default_grid(self.sampler)
    if grid == sampling.default_grid(self.sampler):
      return {}
    param = {"shifted": "grid_shift", "poly": "grid_rho"}.get(grid)
    return {"grid": grid, **({param: float(getattr(self, param))} if param else {})}

  def problems(self) -> list[str]:
    """Every invalid value, named by its command-line flag."""
    out = []
    if self.num_samples < 1:
      out.append(f"--num_samples must be >= 1, got {self.num_samples}")
    if self.sampler not in sampling.SAMPLERS:
      out.append(f"--sampler must be one of {', '.join(sampling.SAMPLERS)}, got {self.sampler!r}")
    else:
      out += sampling.step_problems(self.sampler, self.num_steps, flag="--num_steps")
    out += sampling.grid_problems(self.grid, self.grid_shift, self.grid_rho, prefix="--")
    if not 0 <= self.seed < 2**31:
      out.append(f"--seed must be in [0, 2**31), got {self.seed}")
    out += sampling.guidance_problems(self.cfg_scale, self.guidance_low, self.guidance_high,
                                      prefix="--")
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


def _batch_file(kind: str, start: int) -> str:
  return os.path.join(kind, f"batch_{start:08d}.npy")


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

  def shards(kind):
    for start, _ in ranges:
      yield np.load(os.path.join(out, _batch_file(kind, start)))

  def pngs():
    for i in range(num_samples):
      with Image.open(os.path.join(out, IMAGES_DIR, f"{i:06d}.png")) as im:
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
  """The manifest's settings: everything that determines the samples."""
  d = dataclasses.asdict(settings)
  return {
      "checkpoint": os.path.abspath(checkpoint) if checkpoint else "",
      "model": model_to_dict(model),
      "params_digest": outputs.tree_digest(params),
      **{k: d[k] for k in ("dtype", "sampler", "num_steps", "cfg_scale", "guidance_low",
                           "guidance_high", "seed", "labels", "num_samples")},
      **settings.grid_manifest(),
      "vae": os.path.abspath(vae_path) if vae_path else None,
      "images": with_images,
  }


def _grid_text(settings: GenerationSettings) -> str:
  g = settings.grid_manifest()
  return "".join(f" {k}={v}" for k, v in g.items()) if g else ""


def generate_to_folder(model, params, output: str, settings: GenerationSettings, *,
                       per_device_batch: int = 16, vae: Optional[tuple[Any, Any]] = None,
                       vae_path: Optional[str] = None, latent_scale: Optional[float] = None,
                       checkpoint: str = "",
                       stop_after_batches: Optional[int] = None,
                       log: Callable[[str], None] = _print0) -> GenerationResult:
  """Generates ``settings.num_samples`` samples into ``output``, resuming what is there.

  Args:
    model, params: the network and the weights to sample with.
    output: the output folder (created; resumable; see the module docstring).
    settings: the sampler and sample settings (recorded in the manifest).
    per_device_batch: samples per device per step (free to change between runs).
    vae: ``(module, params)`` of an SD-VAE to decode latents into images;
      ``vae_path`` is recorded in the manifest. ``latent_scale``: images are
      ``vae.decode(z / latent_scale)``; default the VAE's own scaling factor (pass
      the training data's, ``load_model``'s workdirs record it, when it differs).
    checkpoint: where the weights came from (recorded).
    stop_after_batches: stop after that many batches (testing aid).
    log: where progress lines go (process 0 prints by default).

  Returns a ``GenerationResult``; ``samples_npz`` is None when the run stopped
  early (a signal: ``stopped`` holds the exit status, 143 or 130).
  SIGTERM / SIGINT stop the run after the batch in hand (finished batches are
  kept; rerunning resumes).
  """
  problems = settings.problems()
  if per_device_batch < 1:
    problems.append(f"--per_device_batch must be >= 1, got {per_device_batch}")
  problems += sampling.accel_problems(model, settings.sampler, prefix="--")
  if problems:
    raise UserError("; ".join(problems))
  pixel_space = model.in_channels in (1, 3)
  if pixel_space and vae is not None:
    raise UserError(f"the model samples {model.in_channels}-channel images (pixel space); "
                    "--vae is for latent-space models")
  if vae is not None and vae[0].latent_channels != model.in_channels:
    raise UserError(f"{vae_path}: the VAE has {vae[0].latent_channels} latent channels but the "
                    f"model samples {model.in_channels}")
  with_images = pixel_space or vae is not None
  n = settings.num_samples
  folder = output_folder(output)
  out = folder.path
  manifest = folder_settings(model, params, settings, checkpoint=checkpoint, vae_path=vae_path,
                             with_images=with_images)
  if vae is not None and latent_scale is not None:
    manifest["latent_scale"] = float(latent_scale)
  mesh = shd.data_mesh()
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = shd.replicated(mesh)
  batch = per_device_batch * mesh.size

  # Process 0 owns the directory; every process learns the same plan from it.
  resumed = False
  if jax.process_index() == 0:
    _, resumed = folder.open(manifest, {"per_device_batch": per_device_batch,
                                        "devices": mesh.size, "processes": jax.process_count(),
                                        "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for sub in (LATENTS_DIR, LABELS_DIR) + ((IMAGES_DIR,) if with_images else ()):
      os.makedirs(os.path.join(out, sub), exist_ok=True)
    outputs.remove_stale_tmp(out, recursive=True)
    done = finished_ranges(out, n)
  else:
    done = []
  if jax.process_count() > 1:
    covered = np.zeros(n, np.int32)
    for s, c in done:
      covered[s:s + c] = 1
    covered = np.asarray(multihost_utils.broadcast_one_to_all(covered))
    done = [(int(i), 1) for i in np.flatnonzero(covered)]
  todo = pending_batches(done, n, batch)
  n_done = n - sum(c for _, c in todo)
  log(f"[generate] {n} samples -> {out}: {n_done} already done, {len(todo)} batches of up to "
      f"{batch} ({mesh.size} devices x {per_device_batch}) to go; sampler {settings.sampler}, "
      f"{settings.num_steps} steps{_grid_text(settings)}, cfg {settings.cfg_scale} in "
      f"[{settings.guidance_low}, "
      f"{settings.guidance_high}]" + (" (resumed)" if resumed else ""))
  if not with_images:
    log("[generate] latent model and no --vae: writing latents only (no PNGs, no arr_0); "
        "pass --vae=DIR to decode them into images")

  gen = sampling.make_batch_sampler(model, mesh, sampler=settings.sampler,
                                    num_steps=settings.num_steps, seed=settings.seed,
                                    labels_mode=settings.labels, **settings.grid_kwargs())
  decode = (images_lib.make_decoder(vae, mesh, latent_scale=latent_scale)
            if vae is not None else None)
  params = jax.device_put(params, repl)
  scalars = [jnp.asarray(v, jnp.float32)
             for v in (settings.cfg_scale, settings.guidance_low, settings.guidance_high)]
  no_labels = jax.make_array_from_callback((batch,), data, lambda s: np.zeros(batch, np.int32)[s])

  t_start = time.perf_counter()
  progress = Progress(n, "generate", "samples", done=n_done, every_s=0.0, log=log)
  with StopRequests() as stop:
    for b, (start, count) in enumerate(todo):
      idx = np.arange(start, start + batch, dtype=np.int32)  # the tail past `count` is padding
      indices = jax.make_array_from_callback((batch,), data, lambda s, idx=idx: idx[s])
      x, y = gen(params, indices, no_labels, *scalars)
      images = decode(x) if decode is not None else None
      x, y = shd.host_array(x)[:count], shd.host_array(y)[:count]
      if images is not None:
        images = shd.host_array(images)[:count]
      elif pixel_space:
        images = x
      if jax.process_index() == 0:
        if images is not None:
          u8 = images_lib.to_uint8(images, rgb=True)
          for i in range(count):
            outputs.atomic_save_png(os.path.join(out, IMAGES_DIR, f"{start + i:06d}.png"), u8[i])
        outputs.atomic_save_npy(os.path.join(out, _batch_file(LABELS_DIR, start)),
                                y.astype(np.int32))
        outputs.atomic_save_npy(os.path.join(out, _batch_file(LATENTS_DIR, start)),
                                x.astype(np.float32))  # written last: marks the batch done
      progress.update(count)
      stop_now = stop.requested
      if jax.process_count() > 1:
        stop_now = bool(multihost_utils.broadcast_one_to_all(np.int32(stop_now)))
      if stop_now and b + 1 < len(todo):
        _sync("generate-stop")
        log(stop.message("generate", f"stopped after {progress.done:,} of {n:,} samples; "
                         "finished batches are kept, rerun the same command to resume"))
        return GenerationResult(out, n, None, stopped=stop.exit_status)
      if stop_after_batches is not None and b + 1 >= stop_after_batches and b + 1 < len(todo):
        _sync("generate-stop")
        log(f"[generate] stopping after {b + 1} batches (--stop_after_batches)")
        return GenerationResult(out, n, None)
  _sync("generate-batches-done")

  path = os.path.join(out, SAMPLES_NPZ)
  if jax.process_index() == 0:
    ranges = finished_ranges(out, n)
    if sum(c for _, c in ranges) != n:
      raise UserError(f"{out}: only {sum(c for _, c in ranges)} of {n} samples are on disk after "
                      "the run; rerun to finish")
    if not os.path.exists(path):
      log(f"[generate] writing {path}")
      write_samples_npz(out, ranges, n, with_images)
    log(f"[generate] done: {n} samples in {path} ({time.perf_counter() - t_start:.1f}s this run)")
  _sync("generate-done")
  return GenerationResult(out, n, path)
