"""scikit-learn's bundled 8x8 handwritten digits as a small pixel-space dataset.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale images of the
digits 0-9 (values 0..16) inside the scikit-learn package, so no download is
needed. This module turns them into NHWC float32 images in [-1, 1]:

* scaling: ``x / 16 * 2 - 1`` (0 -> -1, 16 -> +1);
* resizing (optional): PIL ``Image.resize`` with ``Image.BILINEAR`` on 32-bit
  float (mode ``"F"``) images, applied after scaling. Bilinear weights are
  non-negative and sum to one, so resized values stay in [-1, 1] (they are also
  clipped, against float rounding). ``image_size == 8`` returns the originals
  untouched. PIL's resize is deterministic (no randomness, no threading);
* a deterministic, stratified held-out split: for each class, the example
  indices of that class are permuted with ``numpy.random.default_rng(seed)``
  (seeded once; classes visited in order 0..9) and the first
  ``round(n_class * heldout_fraction)`` go to the held-out split. Both splits
  keep the original dataset order. With the defaults (fraction 0.2, seed 0) the
  split is 1,438 train / 359 held-out examples.

All functions return plain numpy arrays: images float32 (N, H, W, 1), labels
int32 (N,).
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from deepflow_jax.data.common import DIGITS
from deepflow_jax.data.common import DatasetInfo
from deepflow_jax.data.common import index_array
from deepflow_jax.data.common import unbatch
from deepflow_jax.errors import UserError

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_VALUE = 16.0
DEFAULT_HELDOUT_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
  """The bundled digits: images float64 (1797, 8, 8) in 0..16, labels int (1797,)."""
  bunch = load_digits()
  images = np.asarray(bunch.images, np.float64)
  labels = np.asarray(bunch.target, np.int64)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def num_examples() -> int:
  """Number of images in the full (unsplit) dataset: 1,797."""
  return int(_raw_digits()[1].shape[0])


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
  """Resizes (N, h, w) float images to (N, image_size, image_size), PIL bilinear.

  The input is expected in [-1, 1]; the output is clipped to [-1, 1] and float32.
  If the images already have the requested size they are only cast to float32.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 3:
    raise ValueError(f"expected (N, h, w) images, got shape {images.shape}")
  if images.shape[1:] == (image_size, image_size):
    return images.copy()
  out = np.empty((images.shape[0], image_size, image_size), np.float32)
  for i, img in enumerate(images):
    pil = Image.fromarray(np.ascontiguousarray(img), mode="F")
    out[i] = np.asarray(pil.resize((image_size, image_size), Image.BILINEAR), np.float32)
  return np.clip(out, -1.0, 1.0)


def split_indices(heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                  seed: int = DEFAULT_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Indices (into the 1,797 images) of the train and held-out splits, each sorted.

  Stratified: every class contributes ``round(n_class * heldout_fraction)``
  held-out examples, chosen by a ``numpy.random.default_rng(seed)`` permutation.
  The two index sets are disjoint and cover all examples.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise UserError(f"digits heldout_fraction must be in (0, 1), got {heldout_fraction}")
  _, labels = _raw_digits()
  rng = np.random.default_rng(seed)
  heldout = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    n_held = int(round(len(idx) * heldout_fraction))
    heldout.append(rng.permutation(idx)[:n_held])
  heldout_idx = np.sort(np.concatenate(heldout))
  mask = np.ones(labels.shape[0], bool)
  mask[heldout_idx] = False
  return np.flatnonzero(mask), heldout_idx


def _check_size(image_size) -> int:
  if isinstance(image_size, bool) or int(image_size) != image_size or not 4 <= int(image_size) <= 256:
    raise UserError(f"digits image_size must be an integer in [4, 256], got {image_size!r}")
  return int(image_size)


@functools.lru_cache(maxsize=8)
def _all_images(image_size: int) -> np.ndarray:
  images, _ = _raw_digits()
  scaled = images / MAX_VALUE * 2.0 - 1.0
  out = resize_images(scaled, image_size)[..., None]
  out.setflags(write=False)
  return out


def load_digits_split(
    image_size: int = NATIVE_SIZE,
    *,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Returns ``((train_images, train_labels), (heldout_images, heldout_labels))``.

  Images are float32 (N, image_size, image_size, 1) in [-1, 1] (NHWC, one
  channel); labels int32 (N,) in 0..9. Arrays are fresh, writable copies.

  Args:
    image_size: output side length; 8 is the native size, other sizes use PIL
      bilinear resizing (see the module docstring).
    heldout_fraction: fraction of each class held out for evaluation.
    seed: seed of the split permutation (not of any training randomness).
  """
  image_size = _check_size(image_size)
  images = _all_images(image_size)
  labels = _raw_digits()[1].astype(np.int32)
  train_idx, heldout_idx = split_indices(heldout_fraction, seed)
  return ((images[train_idx].copy(), labels[train_idx]),
          (images[heldout_idx].copy(), labels[heldout_idx]))


def load_digits_train(image_size: int = NATIVE_SIZE, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``(train_images, train_labels)`` of :func:`load_digits_split`."""
  return load_digits_split(image_size, **kwargs)[0]


def load_digits_heldout(image_size: int = NATIVE_SIZE, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """``(heldout_images, heldout_labels)`` of :func:`load_digits_split`."""
  return load_digits_split(image_size, **kwargs)[1]


class DigitsSource:
  """In-memory digits split; ``src[i] -> {"image": (H, W, 1) float32, "label": int32}``."""

  def __init__(self, image_size: int = 8, split: str = "train", *,
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
               split_seed: int = DEFAULT_SPLIT_SEED, include_index: bool = False,
               images: bool = False):
    if images:
      raise UserError("data.name='digits' is pixel data with no latents and raw images beside "
                      "them; SSL alignment (model.ssl_align) needs a 'repa' or 'arrayrecord' "
                      "latent dataset with images")
    if split not in ("train", "heldout"):
      raise UserError(f"digits split must be 'train' or 'heldout', got {split!r}")
    train, heldout = load_digits_split(
        image_size, heldout_fraction=heldout_fraction, seed=split_seed)
    self.images, self.labels = train if split == "train" else heldout
    self.include_index = include_index
    h, w, c = self.images.shape[1:]
    self.info = DatasetInfo(DIGITS, False, (h, w, c), c, NUM_CLASSES,
                            len(self.labels), h)

  def __len__(self) -> int:
    return len(self.labels)

  def read_batch(self, indices) -> dict[str, np.ndarray]:
    """``{"image": float32 (n, H, W, 1), "label": int32 (n,)[, "index": int32 (n,)]}``."""
    idx = index_array(indices)
    out = {"image": self.images[idx], "label": self.labels[idx].astype(np.int32)}
    if self.include_index:
      out["index"] = idx.astype(np.int32)
    return out

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return unbatch(self.read_batch([int(index)]))
