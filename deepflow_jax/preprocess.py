"""ImageNet (or any ImageFolder / TFDS image dataset) -> SD-VAE latent moments.

Command line::

    python -m deepflow_jax.preprocess --source=imagefolder:PATH --vae=DIR --output=DIR \\
        [--split=train] [--resolution=256] [--format=arrayrecord|repa] [--save_images] \\
        [--batch_size=32] [--examples_per_shard=5000] [--limit=N] [--num_workers=N] \\
        [--precision=highest|default] [--tfds_data_dir=DIR] \\
        [--process_index=I --process_count=P | --distributed [--coordinator_address=HOST:PORT \
         --num_processes=P --process_id=I]]
    python -m deepflow_jax.preprocess --output=DIR --finalize

Pipeline (per image, as the reference's REPA/ADM tools):

1. decode with PIL and convert to RGB (grayscale, CMYK, palette and RGBA images
   included; alpha is dropped, not composited; EXIF orientation is ignored);
2. :func:`center_crop_arr`: halve with ``BOX`` while the short side is >= 2 x
   resolution, resize (``BICUBIC``, ``round()``-ed sizes) so the short side is
   the resolution, crop the centre ``resolution x resolution``;
3. ``uint8 -> x / 127.5 - 1`` and the VAE encoder: the posterior mean and
   ``std = exp(0.5 * clip(logvar, -30, 20))``, float32.

Sources and example order
-------------------------
``imagefolder:PATH``: ``PATH/<class>/**/<image>``. Class ids are the positions
of the class folders' names in sorted order (the reference's convention; for
ImageNet's train folder: the synset ids). Only folders that hold at least one
image file count as classes; hidden entries, files directly in ``PATH`` and
files whose extension PIL does not know are ignored (their number is printed).
The example order is class-major: classes in sorted order, and within a class
the file paths relative to ``PATH`` ("/"-separated) sorted by code point. It
depends only on the names, so it is the same on every machine and run. (The
reference sorts the full relative paths instead; for ImageNet, whose class
names all have the same length, the two orders coincide.)

``tfds:NAME`` (e.g. ``tfds:imagenet2012``): the ``--split`` of a TFDS dataset
prepared in the ``array_record`` file format (random access; TensorFlow is not
needed), read through ``DatasetBuilder.as_data_source`` with the image left
encoded and decoded here with PIL, as for an ImageFolder. It needs features
``image`` and ``label`` (a ``ClassLabel``). Order: the split's record order.
TFDS's ``imagenet2012`` labels are the sorted synset ids, so they agree with an
ImageFolder of the same images. (TFDS re-encodes the few CMYK/PNG files of
ImageNet as RGB JPEGs when it prepares the dataset, so those few latents differ
slightly from an ImageFolder run.) ``tensorflow_datasets`` is imported only for
this source.

``--limit=N`` keeps the first N examples of that order.

Indices and unreadable images
-----------------------------
Example ``i`` is the ``i``-th entry of the source order. An image that cannot be
decoded or cropped is reported on stderr by name with the error, skipped, and
listed in the final summary (and in ``progress/summary.json`` and, for the
ArrayRecord format, ``metadata.json``). Skipping never renumbers: every
written example keeps its source position as its index (ArrayRecord field
``index``; REPA file number), so a skipped image leaves a gap; labels always
travel with their example, and an example's index does not depend on which
other images were readable. Readers see a dataset of ``num_written`` examples.

Output formats (``--output=OUT``)
---------------------------------
``--format=arrayrecord`` (default): the project's schema
(:mod:`deepflow_jax.data.records`): ``OUT/<split>-SSSSS-of-NNNNN.array_record``
shards (one per ``--examples_per_shard`` consecutive source examples, records
``{mean, std, label, index}`` NHWC, ``group_size:1``) and ``OUT/metadata.json``
(``num_examples``, ``shards``, ``latent_shape``, ``num_classes``, ``resolution``,
``vae``, ``scaling_factor`` and extras ``split``, ``source``, ``class_names``,
``num_source_examples``, ``num_skipped``, ``skipped``). A shard left with no
example (all of its images unreadable) is not listed. Read with
``data.name="arrayrecord", data.path=OUT``.

``--format=repa``: the reference's layout: ``OUT/vae-sd/00000/img-mean-std-00000000.npy``
(float32 ``(2c, h, w)`` CHW, channels ``0..c-1`` the mean, ``c..2c-1`` the std;
1,000 files per folder, folder = index // 1000) and ``OUT/vae-sd/dataset.json``
``{"labels": [["00000/img-mean-std-00000000.npy", label], ...]}``. Read with
``data.name="repa", data.path=OUT``.

``--save_images`` (either format) also stores the crops as uncompressed PNGs,
``OUT/images/00000/img00000000.png``, with ``OUT/images/dataset.json`` keyed by
the PNG names (the reference's ``images/`` folder, for SSL alignment).

The final files (``metadata.json`` / ``dataset.json``) are written last,
atomically, once every shard is done: a folder holding them is complete.

Parallelism
-----------
Devices: a 1-D mesh ``"data"`` over this process's local devices; each batch
(``--batch_size`` per device, uint8) is placed with ``NamedSharding(mesh,
P("data"))`` and the jitted encoder has explicit in/out shardings (parameters
replicated). The last batch is padded with zeros and the padding dropped.
Images are decoded and cropped by ``--num_workers`` threads ahead of the device.

Hosts: shard ``s`` belongs to process ``s mod P`` (round-robin), so each process
reads only its share of the images and writes only its own shards. Process
index and count come from JAX (``--distributed`` first calls
``jax.distributed.initialize()``, with the cluster auto-detected or given by
``--coordinator_address/--num_processes/--process_id``) or from ``--process_index/--process_count``
for independent launches that share the output folder. The final files are
written when every shard is done:

* with JAX's multi-process runtime (``--distributed``), every process waits at
  a barrier after its shards, then process 0 writes them;
* with independent launches, each process checks after its own shards; the one
  that finds every shard done writes them (several may, harmlessly: the content
  is the same and written atomically). Otherwise it prints what is missing;
  ``--output=OUT --finalize`` later writes them (or lists the missing shards).

Resuming and determinism
------------------------
``OUT/progress/settings.json`` records every setting that determines the output
(source and a digest of its file list, split, limit, resolution, VAE parameter
digest, precision, format, shard size, images). A run into a folder with other
settings is refused (nothing is touched); a non-empty folder without it is
refused too. A shard is written under a temporary name and ``os.replace``-d (REPA
files one by one), then marked done by ``progress/shard-SSSSS-of-NNNNN.json``
(its examples' indices and labels, its skipped images). A rerun skips finished
shards and redoes unfinished ones, so an interrupted run resumed ends with the
same files as an uninterrupted one. Batch size, worker and device counts may
change between runs (on CPU the results are bitwise identical; accelerators may
pick different kernels for other per-device batch shapes).

Errors are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from deepflow_jax.data import records
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.errors import first_line
from deepflow_jax.progress import format_duration

FORMAT_VERSION = "deepflow-jax/preprocess/v1"
ARRAYRECORD, REPA = "arrayrecord", "repa"
FORMATS = (ARRAYRECORD, REPA)
PROGRESS_DIR = "progress"
SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "summary.json"
FEATURE_DIR = "vae-sd"  # == data.pipeline.REPA_FEATURE_DIR
IMAGES_DIR = "images"
LABEL_FILE = "dataset.json"  # == data.pipeline.REPA_LABEL_FILE
FILES_PER_FOLDER = 1000
_PRECISIONS = ("highest", "default")
_LOG = "[preprocess]"


# ----------------------------------------------------------------------------
# The crop.


def center_crop_arr(pil_image: Image.Image, resolution: int) -> np.ndarray:
  """The reference's (ADM) centre crop: a PIL image -> uint8 ``(res, res, 3)`` RGB.

  The image is converted to RGB first. While its short side is at least
  ``2 * resolution`` it is halved with ``BOX`` filtering (each side ``// 2``);
  then it is resized with ``BICUBIC`` so that the short side is ``resolution``
  (each side ``round(side * resolution / short_side)``), and the
  ``resolution x resolution`` window at ``((H - res) // 2, (W - res) // 2)`` is
  returned as a C-contiguous HWC array.
  """
  resolution = int(resolution)
  if resolution < 1:
    raise ValueError(f"resolution must be >= 1, got {resolution}")
  img = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
  while min(img.size) >= 2 * resolution:
    img = img.resize(tuple(side // 2 for side in img.size), resample=Image.BOX)
  scale = resolution / min(img.size)
  img = img.resize(tuple(round(side * scale) for side in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img)
  top = (arr.shape[0] - resolution) // 2
  left = (arr.shape[1] - resolution) // 2
  out = np.ascontiguousarray(arr[top:top + resolution, left:left + resolution])
  if out.shape != (resolution, resolution, 3) or out.dtype != np.uint8:
    raise ValueError(f"crop has shape {out.shape} / dtype {out.dtype}")  # not expected
  return out


def to_model_input(images_u8):
  """uint8 images -> float32 in [-1, 1] (``x / 127.5 - 1``); numpy or jax arrays."""
  return images_u8.astype(np.float32) / 127.5 - 1.0


def repa_feature_name(index: int) -> str:
  """``"00000/img-mean-std-00000000.npy"``: the reference's latent file of example ``index``."""
  return f"{index // FILES_PER_FOLDER:05d}/img-mean-std-{index:08d}.npy"


def repa_image_name(index: int) -> str:
  """``"00000/img00000000.png"``: the reference's image file of example ``index``."""
  return f"{index // FILES_PER_FOLDER:05d}/img{index:08d}.png"


# ----------------------------------------------------------------------------
# Sources.


class ImageFolderSource:
  """``PATH/<class>/**/<image>`` in class-major sorted order (see the module docstring).

  Attributes: ``root``, ``class_names`` (sorted), ``files`` (relative "/" paths),
  ``labels`` (int per file), ``ignored`` (counts of what was left out, by reason).
  """

  kind = "imagefolder"

  def __init__(self, root: str, limit: int | None = None):
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
      raise UserError(f"--source=imagefolder:{root}: not a directory")
    exts = {e.lower() for e in Image.registered_extensions()}
    self.root = root
    self.ignored = collections.Counter()
    per_class = []
    with os.scandir(root) as it:
      entries = sorted(it, key=lambda e: e.name)
    for e in entries:
      if e.name.startswith("."):
        continue
      if not e.is_dir():
        self.ignored["files directly in the source folder"] += 1
        continue
      files = []
      for dirpath, dirnames, filenames in os.walk(e.path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for f in filenames:
          if f.startswith("."):
            continue
          if os.path.splitext(f)[1].lower() not in exts:
            self.ignored["files without an image extension"] += 1
            continue
          files.append(f"{rel}/{f}")
      if files:
        per_class.append((e.name, sorted(files)))
      else:
        self.ignored["folders without images"] += 1
    if not per_class:
      raise UserError(f"--source=imagefolder:{root}: no class folders with image files "
                      "(expected PATH/<class>/<image files>)")
    self.class_names = [name for name, _ in per_class]
    self.files, labels = [], []
    for label, (_, files) in enumerate(per_class):
      self.files.extend(files)
      labels.extend([label] * len(files))
    self.labels = labels
    if limit is not None:
      self.files, self.labels = self.files[:limit], self.labels[:limit]
    h = hashlib.sha256()
    for f, l in zip(self.files, self.labels):
      h.update(f"{l}\t{f}\n".encode("utf-8", "surrogateescape"))
    self.digest = h.hexdigest()

  def __len__(self) -> int:
    return len(self.files)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def spec(self) -> str:
    return f"imagefolder:{self.root}"

  def name(self, index: int) -> str:
    return self.files[index]

  def load(self, index: int, resolution: int) -> tuple[np.ndarray, int]:
    """Decodes and crops example ``index`` -> (uint8 crop, label); raises if unreadable."""
    with Image.open(os.path.join(self.root, self.files[index])) as img:
      return center_crop_arr(img, resolution), self.labels[index]

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "path": self.root}


class TfdsSource:
  """A TFDS split read through ``as_data_source`` (array_record), images decoded by PIL."""

  kind = "tfds"

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               limit: int | None = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f"--source=tfds:{name} needs tensorflow-datasets, which cannot be imported "
                      f"({e}); pip install 'deepflow-jax[tfds]', or use "
                      "--source=imagefolder:PATH") from e
    self.dataset, self.split = name, split
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      features = builder.info.features
    except Exception as e:  # DatasetNotFoundError, bad config/version strings, ...
      raise UserError(f"--source=tfds:{name}: no such TFDS dataset ({first_line(e)})") from e
    try:
      label_feature = features["label"]
      features["image"]  # pylint: disable=pointless-statement
      self.class_names = [str(n) for n in label_feature.names]
    except Exception as e:
      raise UserError(f"--source=tfds:{name}: needs an 'image' feature and a ClassLabel "
                      f"'label' feature ({first_line(e)})") from e
    try:
      self._ds = builder.as_data_source(
          split=split, decoders={"image": tfds.decode.SkipDecoding()})
      n = len(self._ds)
    except Exception as e:  # not prepared, tfrecord format, unknown split, ...
      try:
        prepared = bool(builder.is_prepared())
      except Exception:  # pylint: disable=broad-except
        prepared = False
      what = (f"cannot be read from {builder.data_dir} ({first_line(e)})" if prepared else
              f"is not prepared in {builder.data_dir}")
      raise UserError(
          f"--source=tfds:{name} split {split!r} {what}. This needs the dataset prepared in "
          f"the array_record file format, e.g. `tfds build {name} --file_format=array_record "
          "--manual_dir=DIR` (ImageNet needs its manual download; pass --tfds_data_dir if it "
          "lives elsewhere), or use --source=imagefolder:PATH") from e
    self.full_name = str(getattr(builder.info, "full_name", name))
    self.size = n if limit is None else min(n, limit)
    self._lock = threading.Lock()
    self.digest = hashlib.sha256(
        json.dumps([self.full_name, split, n, self.size]).encode()).hexdigest()

  def __len__(self) -> int:
    return self.size

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def spec(self) -> str:
    return f"tfds:{self.dataset}"

  def name(self, index: int) -> str:
    return f"{self.dataset}/{self.split}[{index}]"

  def load(self, index: int, resolution: int) -> tuple[np.ndarray, int]:
    with self._lock:  # one reader call at a time; decoding runs in parallel
      ex = self._ds[index]
    image = ex["image"]
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
      img = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1
                            else image)  # a source that decodes itself
    else:
      if isinstance(image, np.ndarray):
        image = image.item()
      img = Image.open(io.BytesIO(bytes(image)))
    with img:
      crop = center_crop_arr(img, resolution)
    label = int(np.asarray(ex["label"]))
    if not 0 <= label < self.num_classes:
      raise ValueError(f"label {label} not in [0, {self.num_classes})")
    return crop, label

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "dataset": self.full_name, "split": self.split}


def open_source(spec: str, split: str, *, limit: int | None = None,
                tfds_data_dir: str | None = None):
  """``imagefolder:PATH`` or ``tfds:NAME`` -> a source (``len``, ``load``, ``name``, ...)."""
  kind, sep, rest = spec.partition(":")
  if not sep or not rest or kind not in ("imagefolder", "tfds"):
    raise UserError(f"--source must be imagefolder:PATH or tfds:NAME (e.g. tfds:imagenet2012), "
                    f"got {spec!r}")
  if kind == "imagefolder":
    source = ImageFolderSource(rest, limit)
  else:
    source = TfdsSource(rest, split, tfds_data_dir, limit)
  if len(source) == 0:
    raise UserError(f"--source={spec}: no examples")
  return source


# ----------------------------------------------------------------------------
# Small file helpers.


def _atomic_write(path: str, data: bytes, tmp: str | None = None) -> None:
  """Writes ``data`` to ``tmp`` (default: a per-process name), then renames it to ``path``."""
  tmp = tmp or f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=1) + "\n").encode()


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable ({first_line(e)}); is this a preprocess output?") from e


def _png_bytes(crop: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(crop).save(buf, format="PNG", compress_level=0, optimize=False)
  return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, arr, allow_pickle=False)
  return buf.getvalue()


# ----------------------------------------------------------------------------
# Settings, shards, progress markers.


def shard_range(shard: int, settings: dict) -> tuple[int, int]:
  """Source positions ``[start, stop)`` of ``shard``."""
  n, per = settings["num_source_examples"], settings["examples_per_shard"]
  return shard * per, min((shard + 1) * per, n)


def _marker_path(out: str, shard: int, num_shards: int) -> str:
  return os.path.join(out, PROGRESS_DIR, f"shard-{shard:05d}-of-{num_shards:05d}.json")


def _shard_file(out: str, settings: dict, shard: int) -> str:
  return os.path.join(out, records.shard_name(settings["split"], shard, settings["num_shards"]))


def read_settings(out: str) -> dict | None:
  """The ``settings`` recorded in ``OUT/progress/settings.json`` (None if absent)."""
  path = os.path.join(out, PROGRESS_DIR, SETTINGS_FILE)
  doc = _read_json(path)
  if doc is None:
    return None
  if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path}: not written by this version of deepflow_jax.preprocess")
  return doc


def _check_or_write_settings(out: str, settings: dict, info: dict) -> dict:
  """Records the settings in a fresh output, or checks them against a previous run's.

  Returns the settings document on disk. Refuses (UserError, nothing written) a
  folder holding other settings, or a non-empty folder without settings.
  """
  path = os.path.join(out, PROGRESS_DIR, SETTINGS_FILE)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--output {out}: exists and is not a directory")
  doc = read_settings(out)
  if doc is None:
    if not _is_fresh(out):
      raise UserError(f"--output {out}: not empty and not a preprocess output (no "
                      f"{PROGRESS_DIR}/{SETTINGS_FILE}); choose an empty or new folder")
    os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
    # Create-if-absent: of several processes starting at once, one file wins and
    # every process compares its settings with that one.
    _create_exclusive(path, _json_bytes({"format_version": FORMAT_VERSION,
                                         "settings": settings, "info": info}))
    doc = read_settings(out)
  old = doc.get("settings", {})
  diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
  if diff:
    details = []
    for k in diff:
      if k == "source_digest":
        details.append("the source's file list differs")
      elif k == "vae_digest":
        details.append("the VAE weights differ")
      else:
        details.append(f"{k} was {old.get(k)!r}, now {settings.get(k)!r}")
    raise UserError(
        f"--output {out} holds a preprocess run with other settings ({'; '.join(details)}); "
        "nothing was changed. Rerun with the same settings to resume, or use a new --output")
  return doc


def _is_fresh(out: str) -> bool:
  """True for a missing or empty folder, or one holding only another process's new settings."""
  if not os.path.isdir(out):
    return True
  for entry in os.listdir(out):
    if entry != PROGRESS_DIR:
      return False
    if any(not n.startswith(SETTINGS_FILE) for n in os.listdir(os.path.join(out, entry))):
      return False
  return True


def _create_exclusive(path: str, data: bytes) -> bool:
  """Creates ``path`` with ``data`` unless it exists (atomically: a hard link); True if created."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # a file system without hard links: best effort
    if os.path.exists(path):
      return False
    os.replace(tmp, path)
    return True
  finally:
    _remove_if_exists(tmp)


def done_shards(out: str, settings: dict) -> dict[int, dict]:
  """``{shard: marker}`` for every finished shard (its marker, and its file for ArrayRecord)."""
  num = settings["num_shards"]
  done = {}
  for s in range(num):
    marker = _read_json(_marker_path(out, s, num))
    if marker is None:
      continue
    if settings["format"] == ARRAYRECORD and marker["examples"] and not os.path.isfile(
        _shard_file(out, settings, s)):
      continue  # the shard file was removed: redo it
    done[s] = marker
  return done


# ----------------------------------------------------------------------------
# Writing one shard.


class _ShardWriter:
  """Receives one shard's examples in source order; ``finish()`` publishes the shard."""

  def __init__(self, out: str, settings: dict, shard: int):
    self.out, self.settings, self.shard = out, settings, shard
    self.start, self.stop = shard_range(shard, settings)
    self.pending = self.stop - self.start  # examples neither written nor skipped yet
    self.examples: list[list[int]] = []  # [index, label]
    self.skipped: list[list[Any]] = []  # [index, name, error]
    self.fmt = settings["format"]
    self.save_images = settings["save_images"]
    self._writer = None
    if self.fmt == ARRAYRECORD:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self.path = _shard_file(out, settings, shard)
      self.tmp = self.path + ".tmp"
      if os.path.exists(self.tmp):
        os.remove(self.tmp)  # left by a killed run
      self._writer = array_record_module.ArrayRecordWriter(self.tmp, "group_size:1")

  def _file(self, sub: str, name: str) -> str:
    path = os.path.join(self.out, sub, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path

  def write(self, index: int, label: int, mean: np.ndarray, std: np.ndarray,
            crop: np.ndarray) -> None:
    if self.fmt == ARRAYRECORD:
      self._writer.write(records.encode_record(mean, std, label, index))
    else:
      moments = np.ascontiguousarray(np.concatenate([mean, std], -1).transpose(2, 0, 1),
                                     np.float32)
      path = self._file(FEATURE_DIR, repa_feature_name(index))
      _atomic_write(path, _npy_bytes(moments), tmp=path + ".tmp")
    if self.save_images:
      path = self._file(IMAGES_DIR, repa_image_name(index))
      _atomic_write(path, _png_bytes(crop), tmp=path + ".tmp")
    self.examples.append([int(index), int(label)])
    self.pending -= 1

  def skip(self, index: int, name: str, error: str) -> None:
    # A file of this index from an earlier, interrupted attempt must not survive.
    if self.fmt == REPA:
      _remove_if_exists(os.path.join(self.out, FEATURE_DIR, repa_feature_name(index)))
    if self.save_images:
      _remove_if_exists(os.path.join(self.out, IMAGES_DIR, repa_image_name(index)))
    self.skipped.append([int(index), name, error])
    self.pending -= 1

  def finish(self) -> None:
    assert self.pending == 0, self.pending
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.replace(self.tmp, self.path)
    marker = {"shard": self.shard, "start": self.start, "stop": self.stop,
              "examples": self.examples, "skipped": self.skipped}
    path = _marker_path(self.out, self.shard, self.settings["num_shards"])
    _atomic_write(path, _json_bytes(marker), tmp=path + ".tmp")

  def abandon(self) -> None:
    """Stops without publishing (the temporary shard file stays; a rerun redoes it)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _remove_if_exists(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# ----------------------------------------------------------------------------
# Encoding.


@functools.lru_cache(maxsize=8)
def _make_encoder(vae, devices: tuple):
  """(jitted ``(params, uint8 images) -> (mean, std)``, data sharding, replicated sharding)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from deepflow_jax.sharding import data_mesh  # pylint: disable=g-import-not-at-top
  mesh = data_mesh(devices)
  data = NamedSharding(mesh, P("data"))
  repl = NamedSharding(mesh, P())

  def encode(params, images_u8):
    return vae.apply({"params": params}, to_model_input(images_u8), method=vae.encode)

  fn = jax.jit(encode, in_shardings=(repl, data), out_shardings=(data, data))
  return fn, data, repl


def vae_digest(params) -> str:
  """A BLAKE2b digest of the VAE parameters (paths, dtypes, shapes, bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.blake2b(digest_size=16)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


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


class _Progress:
  """Prints ``done/total | images/s | ETA`` lines (rate measured after the first batch)."""

  def __init__(self, total: int, log: Callable[[str], None], every_s: float):
    self.total, self.log, self.every_s = total, log, every_s
    self.done = self.skipped = self.written = 0
    self.t0 = time.perf_counter()
    self.t_first = None
    self.n_first = 0
    self.last = 0.0

  def add(self, written: int, skipped: int) -> None:
    self.written += written
    self.skipped += skipped
    self.done += written + skipped
    if self.t_first is None and written:  # the first batch includes compilation
      self.t_first, self.n_first = time.perf_counter(), self.done

  def maybe_log(self, shards_msg: str, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    if self.t_first is not None and self.done > self.n_first:
      rate = (self.done - self.n_first) / max(now - self.t_first, 1e-9)
    else:
      rate = self.done / max(now - self.t0, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    pct = 100.0 * self.done / max(self.total, 1)
    self.log(f"{self.done}/{self.total} images ({pct:.1f}%) | {rate:.1f} images/s | "
             f"ETA {format_duration(eta)} | skipped {self.skipped} | {shards_msg}")


def encode_shards(source, settings: dict, out: str, shards: Sequence[int], vae, params, *,
                  batch_size: int, num_workers: int, log: Callable[[str], None],
                  stop_after_shards: int | None = None, log_every_s: float = 10.0,
                  devices=None) -> tuple[int, bool]:
  """Encodes and writes ``shards`` (in order); returns (shards finished, stopped early).

  ``batch_size`` is per device; the batch is split over ``devices`` (default:
  ``jax.local_devices()``). Unreadable images are reported on stderr, skipped,
  and recorded in their shard's marker.
  """
  import jax  # pylint: disable=g-import-not-at-top

  devices = tuple(devices if devices is not None else jax.local_devices())
  encode, data_sharding, repl = _make_encoder(vae, devices)
  params = jax.device_put(params, repl)
  global_batch = batch_size * len(devices)
  res = settings["resolution"]
  items = [(s, i) for s in shards for i in range(*shard_range(s, settings))]
  progress = _Progress(len(items), log, log_every_s)
  total_shards = len(shards)

  def load(item):
    s, i = item
    try:
      crop, label = source.load(i, res)
      return _Loaded(s, i, crop, label, None)
    except Exception as e:  # pylint: disable=broad-except  # any decode/crop failure
      return _Loaded(s, i, None, None, f"{type(e).__name__}: {first_line(e)}")

  writers: collections.OrderedDict[int, _ShardWriter] = collections.OrderedDict()
  finished = 0
  batch: list[_Loaded] = []
  inflight = None  # (mean, std, items) of the batch on the devices

  def dispatch(loaded):
    arr = np.zeros((global_batch, res, res, 3), np.uint8)  # zero padding past len(loaded)
    for k, x in enumerate(loaded):
      arr[k] = x.crop
    mean, std = encode(params, jax.device_put(arr, data_sharding))
    return mean, std, loaded

  def drain(flight):
    mean, std, loaded = flight
    mean, std = np.asarray(mean), np.asarray(std)
    for k, x in enumerate(loaded):
      writers[x.shard].write(x.index, x.label, mean[k], std[k], x.crop)
    progress.add(len(loaded), 0)

  def finish_ready() -> bool:
    """Publishes complete shards; True when --stop_after_shards is reached."""
    nonlocal finished
    for s in [s for s, w in writers.items() if w.pending == 0]:
      writers.pop(s).finish()
      finished += 1
      progress.maybe_log(f"shard {s} done ({finished}/{total_shards} this run)", force=True)
      if stop_after_shards is not None and finished >= stop_after_shards:
        return True
    return False

  stopped = False
  loader = _ordered_parallel(load, items, num_workers, ahead=max(2 * global_batch, 8))
  try:
    for x in loader:
      if x.shard not in writers:
        writers[x.shard] = _ShardWriter(out, settings, x.shard)
      if x.error is not None:
        name = source.name(x.index)
        print(f"warning: skipping unreadable image {name} (example {x.index}): {x.error}",
              file=sys.stderr, flush=True)
        writers[x.shard].skip(x.index, name, x.error)
        progress.add(0, 1)
      else:
        batch.append(x)
      if len(batch) == global_batch:
        flight = dispatch(batch)
        batch = []
        if inflight is not None:
          drain(inflight)
        inflight = flight
        progress.maybe_log(f"{finished}/{total_shards} shards this run")
      if finish_ready() and finished < total_shards:
        stopped = True
        break
    if not stopped:
      if batch:
        flight = dispatch(batch)
        if inflight is not None:
          drain(inflight)
        inflight = flight
      if inflight is not None:
        drain(inflight)
        inflight = None
      stopped = finish_ready() and finished < total_shards
  finally:
    loader.close()  # stops the decoding threads
    for w in writers.values():  # only unfinished shards remain here
      w.abandon()
  if stopped:
    log(f"stopping after {finished} shard(s) (--stop_after_shards)")
  return finished, stopped


# ----------------------------------------------------------------------------
# Finalisation.


def finalize(out: str, doc: dict, log: Callable[[str], None]) -> list[int]:
  """Writes the final files if every shard is done; returns the missing shards.

  ArrayRecord: ``metadata.json`` (via the schema of :mod:`records`); REPA:
  ``vae-sd/dataset.json``; with images: ``images/dataset.json``; always
  ``progress/summary.json`` (counts and the skipped images). Idempotent.
  """
  settings, info = doc["settings"], doc.get("info", {})
  num = settings["num_shards"]
  done = done_shards(out, settings)
  missing = [s for s in range(num) if s not in done]
  if missing:
    return missing
  examples = [e for s in range(num) for e in done[s]["examples"]]
  skipped = [e for s in range(num) for e in done[s]["skipped"]]
  if not examples:
    raise UserError(f"{out}: every one of the {len(skipped)} images was unreadable; "
                    "nothing to write")
  if settings["format"] == ARRAYRECORD:
    names = [records.shard_name(settings["split"], s, num) for s in range(num)
             if done[s]["examples"]]
    records.write_metadata(
        out, num_examples=len(examples), shards=names, latent_shape=settings["latent_shape"],
        num_classes=settings["num_classes"], resolution=settings["resolution"],
        vae=info.get("vae", ""), scaling_factor=info.get("scaling_factor", 0.18215),
        extra={
            "split": settings["split"], "source": settings["source"],
            "class_names": info.get("class_names"),
            "num_source_examples": settings["num_source_examples"],
            "num_skipped": len(skipped), "skipped": [name for _, name, _ in skipped],
            "index": "the example's position in the source order (skipped images leave gaps)",
        })
  else:
    labels = {"labels": [[repa_feature_name(i), l] for i, l in examples]}
    _atomic_write(os.path.join(out, FEATURE_DIR, LABEL_FILE), _json_bytes(labels))
  if settings["save_images"]:
    labels = {"labels": [[repa_image_name(i), l] for i, l in examples]}
    os.makedirs(os.path.join(out, IMAGES_DIR), exist_ok=True)
    _atomic_write(os.path.join(out, IMAGES_DIR, LABEL_FILE), _json_bytes(labels))
  summary = {"num_source_examples": settings["num_source_examples"],
             "num_written": len(examples), "num_skipped": len(skipped),
             "skipped": [{"index": i, "name": n, "error": err} for i, n, err in skipped]}
  _atomic_write(os.path.join(out, PROGRESS_DIR, SUMMARY_FILE), _json_bytes(summary))
  log(f"done: {len(examples)} examples written to {out} ({settings['format']}), "
      f"{len(skipped)} unreadable image(s) skipped")
  if skipped:
    shown = ", ".join(n for _, n, _ in skipped[:20])
    more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    log(f"skipped: {shown}{more} (full list with errors: {PROGRESS_DIR}/{SUMMARY_FILE})")
  return []


# ----------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m deepflow_jax.preprocess",
      description="Encode images to SD-VAE latent moments (ArrayRecord or REPA layout).")
  p.add_argument("--source", help="imagefolder:PATH (PATH/<class>/<images>) or tfds:NAME")
  p.add_argument("--split", default="train",
                 help="TFDS split to read; the shard-name prefix in both cases (default train)")
  p.add_argument("--resolution", type=int, default=256, help="crop side in pixels (256)")
  p.add_argument("--vae", help="VAE folder (diffusers or convert_vae), e.g. sd-vae-ft-mse/ema")
  p.add_argument("--output", required=True, help="output folder (created; resumable)")
  p.add_argument("--format", default=ARRAYRECORD, choices=FORMATS)
  p.add_argument("--save_images", action="store_true",
                 help="also store the crops as PNGs in OUT/images/ (the reference's layout)")
  p.add_argument("--batch_size", type=int, default=32, help="images per device per batch")
  p.add_argument("--examples_per_shard", type=int, default=5000,
                 help="source examples per shard (the unit of work, resumption and hosts)")
  p.add_argument("--limit", type=int, default=None, help="only the first N source examples")
  p.add_argument("--num_workers", type=int, default=None,
                 help="image decoding threads (default: the CPU count)")
  p.add_argument("--precision", default="highest", choices=_PRECISIONS,
                 help="conv/matmul precision of the encoder: highest (full float32) or the "
                      "backend's default (faster; TF32 on recent NVIDIA GPUs, bf16 passes on TPU)")
  p.add_argument("--tfds_data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host launches; the cluster is "
                      "auto-detected unless the three flags below are given)")
  p.add_argument("--coordinator_address", default=None, help="with --distributed: host:port")
  p.add_argument("--num_processes", type=int, default=None, help="with --distributed")
  p.add_argument("--process_id", type=int, default=None, help="with --distributed")
  p.add_argument("--process_index", type=int, default=None,
                 help="this process's index among independent launches (default: JAX's)")
  p.add_argument("--process_count", type=int, default=None,
                 help="number of independent launches sharing --output (default: JAX's)")
  p.add_argument("--finalize", action="store_true",
                 help="only write the final files of a finished multi-process run in --output")
  p.add_argument("--stop_after_shards", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--log_every_s", type=float, default=10.0, help=argparse.SUPPRESS)
  return p


def _validate(a) -> None:
  for name, lo in (("resolution", 8), ("batch_size", 1), ("examples_per_shard", 1)):
    if getattr(a, name) < lo:
      raise UserError(f"--{name} must be >= {lo}, got {getattr(a, name)}")
  if a.limit is not None and a.limit < 1:
    raise UserError(f"--limit must be >= 1, got {a.limit}")
  if a.num_workers is not None and a.num_workers < 0:
    raise UserError(f"--num_workers must be >= 0, got {a.num_workers}")
  if (a.process_index is None) != (a.process_count is None):
    raise UserError("give both --process_index and --process_count, or neither")
  if a.process_count is not None and not 0 <= a.process_index < a.process_count:
    raise UserError(f"need 0 <= --process_index < --process_count, got {a.process_index} / "
                    f"{a.process_count}")
  if a.distributed and a.process_count is not None:
    raise UserError("--distributed takes the process index and count from JAX; do not also "
                    "give --process_index/--process_count")
  if not a.finalize and (not a.source or not a.vae):
    raise UserError("--source and --vae are required (unless --finalize)")


def _initialize_distributed(a) -> None:
  """``jax.distributed.initialize`` (explicit flags, else cluster auto-detection)."""
  import jax  # pylint: disable=g-import-not-at-top
  # Barriers run as device collectives; between CPU devices of several processes they
  # need gloo (the setting affects only the CPU backend).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=a.coordinator_address,
                               num_processes=a.num_processes, process_id=a.process_id)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--distributed: jax.distributed.initialize failed ({first_line(e)}); "
                    "give --coordinator_address, --num_processes and --process_id, or launch "
                    "on a cluster JAX detects (SLURM, Open MPI, Cloud TPU, ...)") from e


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  _validate(a)
  out = os.path.abspath(a.output)

  if a.finalize:
    doc = read_settings(out)
    if doc is None:
      raise UserError(f"--output {out}: no {PROGRESS_DIR}/{SETTINGS_FILE}; nothing to finalize")
    log = lambda msg: print(f"{_LOG} {msg}", flush=True)
    missing = finalize(out, doc, log)
    if missing:
      raise UserError(f"{out}: {len(missing)} of {doc['settings']['num_shards']} shards are not "
                      f"done (first: {missing[:5]}); run the missing processes first")
    return 0

  import jax  # pylint: disable=g-import-not-at-top
  from deepflow_jax import vae as vae_lib  # pylint: disable=g-import-not-at-top

  if a.distributed:
    _initialize_distributed(a)
  coordinated = a.process_count is None and jax.process_count() > 1
  pidx = jax.process_index() if a.process_index is None else a.process_index
  pcount = jax.process_count() if a.process_count is None else a.process_count
  prefix = _LOG if pcount == 1 else f"{_LOG} p{pidx}/{pcount}"
  log = lambda msg: print(f"{prefix} {msg}", flush=True)

  source = open_source(a.source, a.split, limit=a.limit, tfds_data_dir=a.tfds_data_dir)
  precision = jax.lax.Precision.HIGHEST if a.precision == "highest" else None
  vae, params = vae_lib.load_diffusers_vae(a.vae, precision=precision)
  f = vae.downsample_factor
  if a.resolution % f:
    raise UserError(f"--resolution {a.resolution} is not a multiple of the VAE's downsampling "
                    f"factor {f}")
  n = len(source)
  settings = {
      "source": source.spec(), "source_digest": source.digest, "split": a.split,
      "limit": a.limit, "num_source_examples": n, "num_classes": source.num_classes,
      "resolution": a.resolution, "vae_digest": vae_digest(params),
      "latent_shape": [a.resolution // f, a.resolution // f, int(vae.latent_channels)],
      "precision": a.precision, "format": a.format, "examples_per_shard": a.examples_per_shard,
      "num_shards": -(-n // a.examples_per_shard), "save_images": bool(a.save_images),
  }
  info = {"vae": os.path.abspath(a.vae), "scaling_factor": float(vae.scaling_factor),
          "class_names": source.class_names, "source": source.describe()}
  if coordinated and pidx != 0:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("preprocess-settings")  # process 0 writes them first
    doc = _check_or_write_settings(out, settings, info)
  else:
    doc = _check_or_write_settings(out, settings, info)
    if coordinated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("preprocess-settings")

  num_shards = settings["num_shards"]
  done = done_shards(out, settings)
  mine = [s for s in range(num_shards) if s % pcount == pidx and s not in done]
  ignored = getattr(source, "ignored", {})
  if ignored:
    log("ignored: " + ", ".join(f"{v} {k}" for k, v in sorted(ignored.items())))
  num_workers = (os.cpu_count() or 1) if a.num_workers is None else a.num_workers
  devices = jax.local_devices()
  log(f"{source.spec()} ({n} examples, {source.num_classes} classes) -> {out} "
      f"[{a.format}{', images' if a.save_images else ''}], {a.resolution}px, latents "
      f"{settings['latent_shape']}; {num_shards} shards, {len(done)} already done, "
      f"{len(mine)} for this process; {len(devices)} device(s) x {a.batch_size} per batch, "
      f"{num_workers} decoding threads")
  _, stopped = encode_shards(
      source, settings, out, mine, vae, params, batch_size=a.batch_size,
      num_workers=num_workers, log=log, stop_after_shards=a.stop_after_shards,
      log_every_s=a.log_every_s, devices=devices)
  if stopped:
    return 0
  if coordinated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("preprocess-shards-done")
    if pidx == 0:
      missing = finalize(out, doc, log)
      if missing:
        raise UserError(f"{out}: shards {missing[:5]} are missing after every process finished")
    multihost_utils.sync_global_devices("preprocess-finalized")
    return 0
  missing = finalize(out, doc, log)
  if missing:
    log(f"this process's shards are done; {len(missing)} shard(s) of other processes are not "
        f"(first: {missing[:5]}). The last process to finish writes the final files; "
        f"or run: python -m deepflow_jax.preprocess --output={out} --finalize")
  return 0


if __name__ == "__main__":
  sys.exit(main())
