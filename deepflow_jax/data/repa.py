"""The REPA/reference latent layout as a data source (``data.name = "repa"``).

``path`` is the dataset root holding ``vae-sd/`` (or the ``vae-sd`` folder
itself) with ``00000/img-mean-std-00000000.npy`` files, float32 (2c, h, w) =
(8, 32, 32) (channels 0..c-1 the posterior mean, c..2c-1 its std), and
``dataset.json`` ``{"labels": [["00000/img-mean-std-00000000.npy", 6], ...]}``
(optionally also ``"scaling_factor"`` and ``"vae_downsampling"``, the encoding
VAE's latent scale and downsampling). As in the reference, the folder is
walked, the ``.npy`` file names (relative, "/" separated) are sorted, and that
sorted order is the example order; labels are looked up by name. Every file
needs a label and every labelled name a file (otherwise a ``UserError`` names
``dataset.json`` and an example). ``"labels": null`` is an error by default (the
model is class-conditional); with ``missing_labels="zero"`` every example gets
label 0. Files are decoded as ``np.load(allow_pickle=False)`` does (never
unpickling), CHW -> HWC. Keys: ``num_classes`` (default: max label + 1),
``latent_shape`` ([h, w, c]; default: from the first file), ``missing_labels``.

Raw images (SSL alignment, ``images=True``): the reference's layout,
``images/`` beside ``vae-sd/``. As the reference's loader does, every file under
``images/`` with an image extension PIL knows (``.png``, ``.jpg``, ...) or
``.npy`` (uint8 CHW) is listed, the relative names are sorted, and image ``k``
of that order belongs to latent file ``k`` of the sorted ``vae-sd/`` order
(``images/dataset.json`` is not read). Different counts are a ``UserError``.
Images are decoded per batch (PIL, which releases the GIL while decoding, so the
reading threads overlap) straight into the stacked array; each must be RGB of
the first image's shape, and that shape must be ``(resolution, resolution, 3)``.

Reading is per batch: whole files are read and, when their ``.npy`` header is
byte-identical to the first file's, decoded without parsing it again, then one
CHW -> HWC transpose per batch.
"""
from __future__ import annotations

import functools
import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from deepflow_jax import npy_io
from deepflow_jax.data.common import REPA
from deepflow_jax.data.common import DatasetInfo
from deepflow_jax.data.common import check_label
from deepflow_jax.data.common import first_non_finite
from deepflow_jax.data.common import index_array
from deepflow_jax.data.common import read_json
from deepflow_jax.data.common import recorded_number
from deepflow_jax.data.common import unbatch
from deepflow_jax.data.common import vae_fields
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line

REPA_FEATURE_DIR = "vae-sd"
REPA_IMAGE_DIR = "images"
REPA_LABEL_FILE = "dataset.json"


class _NpyLayout(NamedTuple):
  """A ``.npy`` file's header bytes and data dtype: files starting with the same bytes
  and of the same size hold an array of the same shape, dtype and memory order."""
  header: bytes
  dtype: np.dtype
  size: int


@functools.lru_cache(maxsize=1)
def _repa_image_extensions() -> frozenset[str]:
  """What the reference's loader lists in ``images/``: PIL's image extensions and ``.npy``."""
  Image.init()
  return frozenset(Image.EXTENSION) | {".npy"}


class RepaLatentSource:
  """The REPA ``vae-sd`` layout (see the module docstring); one example per ``.npy``.

  With ``images=True`` also the ``images/`` folder beside it, paired by sorted
  position (see the module docstring).
  """

  def __init__(self, path, *, num_classes: int | None = None,
               latent_shape: tuple[int, int, int] | None = None,
               missing_labels: str = "error", include_index: bool = False,
               latent_scale: float | None = None, vae_downsampling: int | None = None,
               images: bool = False):
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, REPA_FEATURE_DIR, REPA_LABEL_FILE)) or (
        os.path.isdir(os.path.join(path, REPA_FEATURE_DIR))):
      path = os.path.join(path, REPA_FEATURE_DIR)
    if not os.path.isdir(path):
      raise UserError(f"{path}: not a directory (expected a REPA dataset root with {REPA_FEATURE_DIR}/)")
    if missing_labels not in ("error", "zero"):
      raise UserError(f"data.missing_labels must be 'error' or 'zero', got {missing_labels!r}")
    self.root = path
    self.include_index = include_index
    label_file = os.path.join(path, REPA_LABEL_FILE)
    self.files = self._walk(path)
    if not self.files:
      raise UserError(f"{path}: no .npy files found")
    meta = read_json(label_file, "the REPA layout needs it for the labels")
    labels = [check_label(l, None, f"{label_file} entry {name!r}")
              for l, name in zip(self._read_labels(meta, label_file, missing_labels), self.files)]
    if num_classes is None:
      num_classes = int(max(labels)) + 1
    self.labels = np.asarray(
        [check_label(l, num_classes, f"{label_file} entry {name!r}")
         for l, name in zip(labels, self.files)], np.int32)
    self.num_classes = int(num_classes)
    first_bytes = self._read_bytes(0)
    first = self._decode(0, first_bytes)
    if first.ndim != 3 or first.shape[0] % 2:
      raise UserError(f"{self.file_path(0)} (example 0): shape {first.shape}, expected (2c, h, w) "
                      "with channels 0..c-1 the mean and c..2c-1 the std")
    if latent_shape is None:
      c2, h, w = first.shape
      latent_shape = (h, w, c2 // 2)
    self.latent_shape = tuple(int(d) for d in latent_shape)
    self._layout = self._fast_layout(first_bytes)
    h, w, c = self.latent_shape
    scale, down = vae_fields(
        recorded_number(meta, "scaling_factor", label_file, float),
        recorded_number(meta, "vae_downsampling", label_file, int),
        latent_scale, vae_downsampling, label_file)
    self.image_dir, self.image_files, self.image_shape = None, None, None
    if images:
      self._open_images(h * down, f"the latents' {h} x {w} times the VAE downsampling {down}")
    self.info = DatasetInfo(REPA, True, self.latent_shape, c, self.num_classes,
                            len(self.files), h * down, scale, down, self.image_shape)

  def _open_images(self, resolution: int, why: str) -> None:
    """Lists ``images/`` beside the latents (sorted, as the reference) and checks the first."""
    image_dir = os.path.join(os.path.dirname(os.path.abspath(self.root)), REPA_IMAGE_DIR)
    if not os.path.isdir(image_dir):
      raise UserError(f"{image_dir}: no such folder; SSL alignment (model.ssl_align) reads the "
                      f"raw images from {REPA_IMAGE_DIR}/ beside {self.root} (python -m "
                      "deepflow_jax.preprocess --format=repa --save_images writes them)")
    exts = _repa_image_extensions()
    names = []
    for dirpath, _, filenames in os.walk(image_dir):
      rel = os.path.relpath(dirpath, image_dir)
      for f in filenames:
        if os.path.splitext(f)[1].lower() in exts:
          names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
    names.sort()
    if len(names) != len(self.files):
      raise UserError(f"{image_dir}: {len(names)} image files but {self.root} holds "
                      f"{len(self.files)} latent files; the REPA layout pairs them by sorted "
                      "position, so the counts must match")
    self.image_dir, self.image_files = image_dir, names
    first = self._decode_image(0, self._read_image_bytes(0))
    want = (resolution, resolution, 3)
    if first.shape != want:
      raise UserError(f"{self._image_path(0)} (example 0): image of shape {first.shape}, "
                      f"expected {want} ({why})")
    self.image_shape = want

  def _image_path(self, i: int) -> str:
    return os.path.join(self.image_dir, self.image_files[i])

  def _read_image_bytes(self, i: int) -> bytes:
    return npy_io.read_bytes(self._image_path(i), f"example {i}", "image")

  def _decode_image(self, i: int, data: bytes) -> np.ndarray:
    """Image ``i`` as uint8 (H, W, 3): PIL for image files (RGB only), ``.npy`` as CHW uint8."""
    path = self._image_path(i)
    try:
      if path.lower().endswith(".npy"):
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        arr = arr.reshape(-1, *arr.shape[-2:]).transpose(1, 2, 0)  # the reference's CHW view
      else:
        with Image.open(io.BytesIO(data)) as img:
          if img.mode != "RGB":
            raise UserError(f"{path} (example {i}): image mode {img.mode}, expected RGB")
          arr = np.asarray(img)
    except UserError:
      raise
    except Exception as e:  # truncated or garbage files: PIL and numpy raise several types
      raise UserError(f"{path} (example {i}): unreadable image "
                      f"({type(e).__name__}: {first_line(e)})") from e
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
      raise UserError(f"{path} (example {i}): image {arr.dtype} {arr.shape}, expected uint8 "
                      "(H, W, 3)")
    return arr

  @staticmethod
  def _walk(root: str) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      rel = os.path.relpath(dirpath, root)
      for f in filenames:
        if f.endswith(".npy"):
          names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
    return sorted(names)

  def _read_labels(self, meta, label_file: str, missing_labels: str) -> list:
    if not isinstance(meta, dict) or "labels" not in meta:
      raise UserError(f"{label_file}: no 'labels' key")
    entries = meta["labels"]
    if entries is None:
      if missing_labels == "zero":
        return [0] * len(self.files)
      raise UserError(f"{label_file}: 'labels' is null; class-conditional training needs labels "
                      "(set data.missing_labels='zero' to use label 0 for all)")
    if not isinstance(entries, list) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) for e in entries):
      raise UserError(f"{label_file}: 'labels' must be a list of [file name, label] pairs")
    table = {name.replace("\\", "/"): label for name, label in entries}
    missing = [f for f in self.files if f not in table]
    if missing:
      raise UserError(f"{label_file}: no label for {len(missing)} of {len(self.files)} .npy files "
                      f"(first: {missing[0]!r}); it does not match the files in {self.root}")
    on_disk = set(self.files)
    extra = [n for n in table if n not in on_disk]
    if extra:
      raise UserError(f"{label_file}: lists {len(extra)} file(s) not present in {self.root} "
                      f"(first: {extra[0]!r})")
    return [table[f] for f in self.files]

  def _fast_layout(self, data: bytes) -> _NpyLayout | None:
    """The header of a (2c, h, w) C-order float ``.npy`` like ``data``; None if it is not one."""
    try:
      fp = io.BytesIO(data)
      shape, fortran, dtype = npy_io.read_header(fp)
    except ValueError:
      return None
    h, w, c = self.latent_shape
    offset = fp.tell()
    if (fortran or dtype.kind != "f" or tuple(shape) != (2 * c, h, w)
        or len(data) != offset + dtype.itemsize * 2 * c * h * w):
      return None
    return _NpyLayout(bytes(data[:offset]), dtype, len(data))

  def file_path(self, i: int) -> str:
    """The latent file of example ``i``."""
    return os.path.join(self.root, self.files[i])

  def _read_bytes(self, i: int) -> bytes:
    return npy_io.read_bytes(self.file_path(i), f"example {i}", ".npy")

  def _decode(self, i: int, data: bytes) -> np.ndarray:
    """The general ``.npy`` decoder (``np.load(allow_pickle=False)``), with the checks."""
    path = self.file_path(i)
    try:
      arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # truncated, garbage, pickled object arrays
      raise UserError(f"{path} (example {i}): unreadable .npy ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
      raise UserError(f"{path} (example {i}): expected a float array, got "
                      f"{getattr(arr, 'dtype', type(arr).__name__)}")
    return arr

  def __len__(self) -> int:
    return len(self.files)

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """Reads examples ``indices`` (n,): ``{"mean", "std": float32 (n, h, w, c),
    "label": int32 (n,)[, "image": uint8 (n, H, W, 3)][, "index": int32 (n,)]}``.

    Each file is read whole; one whose first bytes are the first file's header
    (and of the same size) is decoded with ``np.frombuffer`` (same array as
    ``np.load``: same shape, dtype and order), any other goes through
    ``np.load`` and its checks. Raises ``UserError`` naming the file and the
    example index for an unreadable, non-float, mis-shaped or non-finite one.
    """
    idx = index_array(indices)
    h, w, c = self.latent_shape
    chw = np.empty((len(idx), 2 * c, h, w), np.float32)
    layout = self._layout
    for k, i in enumerate(idx.tolist()):
      data = self._read_bytes(i)
      if layout is not None and len(data) == layout.size and data.startswith(layout.header):
        chw[k] = np.frombuffer(data, layout.dtype, offset=len(layout.header)).reshape(2 * c, h, w)
        continue
      arr = self._decode(i, data)
      if arr.shape != (2 * c, h, w):
        raise UserError(f"{self.file_path(i)} (example {i}): shape {arr.shape}, expected "
                        f"{(2 * c, h, w)}")
      chw[k] = arr
    bad = first_non_finite(chw)
    if bad is not None:
      raise UserError(f"{self.file_path(int(idx[bad]))} (example {int(idx[bad])}): non-finite values")
    # CHW -> HWC for the whole batch, one channel plane at a time: a contiguous read
    # and a stride-c write per plane (about twice as fast as numpy's copy of a
    # transposed view, whose inner loop runs over only c elements).
    mean = np.empty((len(idx), h, w, c), np.float32)
    std = np.empty_like(mean)
    for j in range(c):
      mean[..., j] = chw[:, j]
      std[..., j] = chw[:, c + j]
    out = {"mean": mean, "std": std, "label": self.labels[idx]}
    if self.image_files is not None:
      images = np.empty((len(idx),) + self.image_shape, np.uint8)
      for k, i in enumerate(idx.tolist()):
        arr = self._decode_image(i, self._read_image_bytes(i))
        if arr.shape != self.image_shape:
          raise UserError(f"{self._image_path(i)} (example {i}): image of shape {arr.shape}, "
                          f"expected {self.image_shape}")
        images[k] = arr
      out["image"] = images
    if self.include_index:
      out["index"] = idx.astype(np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return unbatch(self.read_batch([int(index)]))
