"""Image sources for latent preprocessing and the reference's centre crop.

Per image, as the reference's REPA/ADM tools:

1. decode with PIL and convert to RGB (grayscale, CMYK, palette and RGBA images
   included; alpha is dropped, not composited; EXIF orientation is ignored);
2. :func:`center_crop_arr`: halve with ``BOX`` while the short side is >= 2 x
   resolution, resize (``BICUBIC``, ``round()``-ed sizes) so the short side is
   the resolution, crop the centre ``resolution x resolution``;
3. :func:`to_model_input`: ``uint8 -> x / 127.5 - 1``, the VAE encoder's input.

Sources (:func:`open_source` takes ``imagefolder:PATH`` or ``tfds:NAME``) share
one interface: ``len(source)``, ``source.load(index, resolution) -> (uint8
crop, label)`` (raises for an unreadable image), ``source.name(index)`` (for
messages), ``source.spec()``, ``source.digest`` (of the example list, for the
settings manifest), ``source.class_names``, ``source.num_classes``,
``source.describe()``.

``imagefolder:PATH`` (:class:`ImageFolderSource`): ``PATH/<class>/**/<image>``.
Class ids are the positions of the class folders' names in sorted order (the
reference's convention; for ImageNet's train folder: the synset ids). Only
folders that hold at least one image file count as classes; hidden entries,
files directly in ``PATH`` and files whose extension PIL does not know are
ignored (counted in ``source.ignored``). The example order is class-major:
classes in sorted order, and within a class the file paths relative to ``PATH``
("/"-separated) sorted by code point. It depends only on the names, so it is
the same on every machine and run. (The reference sorts the full relative paths
instead; for ImageNet, whose class names all have the same length, the two
orders coincide.)

``tfds:NAME`` (:class:`TfdsSource`, e.g. ``tfds:imagenet2012``): a split of a
TFDS dataset prepared in the ``array_record`` file format (random access;
TensorFlow is not needed), read through ``DatasetBuilder.as_data_source`` with
the image left encoded and decoded here with PIL, as for an ImageFolder. It
needs features ``image`` and ``label`` (a ``ClassLabel``). Order: the split's
record order. TFDS's ``imagenet2012`` labels are the sorted synset ids, so they
agree with an ImageFolder of the same images. (TFDS re-encodes the few
CMYK/PNG files of ImageNet as RGB JPEGs when it prepares the dataset, so those
few latents differ slightly from an ImageFolder run.) ``tensorflow_datasets``
is imported only for this source.

``limit=N`` keeps the first N examples of that order.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line

SOURCE_KINDS = ("imagefolder", "tfds")


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
  if not sep or not rest or kind not in SOURCE_KINDS:
    raise UserError(f"--source must be imagefolder:PATH or tfds:NAME (e.g. tfds:imagenet2012), "
                    f"got {spec!r}")
  if kind == "imagefolder":
    source = ImageFolderSource(rest, limit)
  else:
    source = TfdsSource(rest, split, tfds_data_dir, limit)
  if len(source) == 0:
    raise UserError(f"--source={spec}: no examples")
  return source

