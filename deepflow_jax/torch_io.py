"""Safe reading and writing of PyTorch / safetensors weight files.

Shared by the DeepFlow converter (``convert.py``) and the VAE converter
(``convert_vae.py``). Nothing here ever unpickles arbitrary objects: ``.pt`` /
``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)`` and only
``argparse.Namespace`` is allow-listed (the reference stores its ``args`` that
way). A file that tries to run code while being unpickled is refused and no code
in it runs.
"""
from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from deepflow_jax import outputs
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line


class ConversionError(UserError):
  """A checkpoint could not be converted; the message is one line for users."""


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ConversionError(
        "reading PyTorch files needs torch: pip install 'deepflow-jax[torch]' "
        "(or pip install torch==2.13.0 for the CPU build)") from e
  return torch


def load_weights_file(path: str) -> Any:
  """Loads a ``.pt``/``.pth``/``.bin`` (safe unpickling) or ``.safetensors`` file.

  Returns what the file holds: for torch files a (nested) dict whose tensors are
  still ``torch.Tensor``; for safetensors a flat ``{key: np.ndarray}``.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file")
  if os.path.isdir(path):
    raise ConversionError(f"{path}: is a directory, expected a checkpoint file")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    except Exception as e:  # safetensors raises several types for bad files
      raise ConversionError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
  torch = _import_torch()
  with open(path, "rb") as f:
    head = f.read(4)
  if head[:2] == b"PK" and not zipfile.is_zipfile(path):
    raise ConversionError(f"{path}: corrupt PyTorch checkpoint (a truncated or damaged zip "
                          "archive)")
  if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
    raise ConversionError(f"{path}: corrupt or not a PyTorch checkpoint (neither a zip archive "
                          "nor a pickle)")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad files  # pylint: disable=broad-except
    unsafe = _UNSAFE_GLOBAL_RE.search(str(e))
    if unsafe:
      raise ConversionError(
          f"{path}: refused as unsafe: its pickle asks for {unsafe.group(1)}, which is not a "
          "tensor or a plain container (loading it would run code it names); nothing in it "
          "was run") from e
    raise ConversionError(f"{path}: corrupt or not a PyTorch checkpoint "
                          f"({type(e).__name__}: {_torch_reason(e)})") from e


_UNSAFE_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_reason(e: BaseException) -> str:
  """The informative line of torch's load error (its messages start with boilerplate)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  for l in lines:
    if "weights_only" in l or "torch.load" in l or l.startswith(("Please file", "Check the")):
      continue
    return l[:200]
  return type(e).__name__


def to_numpy(value) -> np.ndarray:
  """torch.Tensor or array-like -> numpy array (bfloat16/half upcast to float32)."""
  if hasattr(value, "detach"):  # torch.Tensor
    t = value.detach().cpu()
    if t.dtype.is_floating_point and t.dtype.itemsize < 4:
      t = t.float()
    return t.numpy()
  return np.asarray(value)


def flat_state_dict(obj: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  """Turns a state_dict of tensors into ``{key: np.ndarray}``."""
  out = {}
  for k, v in obj.items():
    if not isinstance(k, str):
      raise ConversionError(f"{source}: state_dict key {k!r} is not a string")
    if not (hasattr(v, "detach") or isinstance(v, np.ndarray)):
      raise ConversionError(
          f"{source}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    out[k] = to_numpy(v)
  return out


def check_state_dict(expected: Mapping[str, tuple[int, ...]],
                     got: Mapping[str, np.ndarray], source: str) -> None:
  """Raises one ConversionError listing missing, unexpected and mis-shaped keys."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = sorted(
      f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
      for k in set(expected) & set(got)
      if tuple(got[k].shape) != tuple(expected[k]))
  if not (missing or unexpected or misshaped):
    return
  parts = []
  if missing:
    parts.append(f"missing keys: {_short_list(missing)}")
  if unexpected:
    parts.append(f"unexpected keys: {_short_list(unexpected)}")
  if misshaped:
    parts.append(f"mis-shaped: {_short_list(misshaped)}")
  raise ConversionError(f"{source}: state_dict does not match the model; " + "; ".join(parts))


# ---------------------------------------------------------------------------
# Flax parameter trees <-> PyTorch state_dicts: layouts shared by every converter.
# ---------------------------------------------------------------------------


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], Any]]:
  """``(path, leaf)`` of a nested mapping (a Flax parameter tree), depth first."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from flatten_tree(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def torch_shape(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax parameter: conv kernels HWIO -> OIHW, dense (in, out) -> (out, in)."""
  shape = tuple(int(s) for s in shape)
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def to_flax_layout(path: Sequence[str], x: np.ndarray) -> np.ndarray:
  """A PyTorch tensor (numpy) in the Flax parameter's layout (see ``torch_shape``)."""
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T
  return x


def to_torch_layout(path: Sequence[str], x: np.ndarray) -> np.ndarray:
  """The inverse of ``to_flax_layout``."""
  if path[-1] == "kernel" and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  if path[-1] == "kernel" and x.ndim == 2:
    return x.T
  return x


def tree_from_state_dict(state_dict: Mapping[str, np.ndarray], paths: Iterable[Sequence[str]],
                         torch_key: Callable[[Sequence[str]], str],
                         convert: Callable[[np.ndarray], Any] = np.asarray) -> dict:
  """A nested parameter tree with a leaf per path: ``state_dict[torch_key(path)]`` in Flax layout.

  ``convert`` maps each value after the transpose (e.g. a dtype cast); check the
  keys and shapes with ``check_state_dict`` first.
  """
  params: dict = {}
  for path in paths:
    value = to_flax_layout(path, np.asarray(state_dict[torch_key(path)]))
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = convert(value)
  return params


def _short_list(items, limit=12) -> str:
  if len(items) <= limit:
    return ", ".join(items)
  return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def save_torch_file(obj: Any, path: str) -> None:
  """Writes ``obj`` atomically: a ``.pt`` whose numpy arrays become torch tensors (nested dicts and
  plain values kept), or, for ``.safetensors``, a flat ``{key: array}``.

  Written under a temporary name in the same folder and renamed, so an
  interrupted write leaves no partial file under ``path`` (and no temporary
  file either when Python gets to clean up).
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    if not all(isinstance(v, np.ndarray) for v in obj.values()):
      raise ConversionError(f"{path}: safetensors holds a flat state_dict only; use a .pt file")
    outputs.atomic_write(path, lambda tmp: save_file(
        {k: np.ascontiguousarray(v) for k, v in obj.items()}, tmp))
    return
  torch = _import_torch()

  def tensors(x):
    if isinstance(x, np.ndarray):
      return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Mapping):
      return {k: tensors(v) for k, v in x.items()}
    return x

  converted = tensors(obj)
  outputs.atomic_write(path, lambda tmp: torch.save(converted, tmp))


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes ``{key: array}`` as a ``.pt`` of torch tensors (or ``.safetensors``), atomically."""
  save_torch_file(dict(state_dict), path)
