"""Building DeepFlow models and loading their weights: one place for every way in.

* ``model_from_config(config, platform)``: the network a training config describes;
* ``model_to_dict`` / ``model_from_dict``: the architecture as JSON data
  (``model.json`` of converted checkpoints, generation manifests);
* ``init_params(model, seed)``: freshly initialised parameters (as the reference);
* ``save_converted`` / ``load_converted``: the converted-checkpoint directory
  (``DIR/model.json`` + ``DIR/params``, an Orbax checkpoint of the parameter tree);
* ``load_workdir_ema(workdir)``: the EMA weights of a training workdir's newest
  readable checkpoint (a partial restore: the optimiser state is not read);
* ``load_model(path, dtype)``: whichever of those ``path`` is (or a registered
  loader: ``register_model_loader``); what sampling, generation and notebooks use.

Reference PyTorch checkpoints are read by ``deepflow_jax.models.conversion``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deepflow_jax import outputs
from deepflow_jax import sharding as shd
from deepflow_jax import storage
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.errors import UserError
from deepflow_jax.errors import first_line
from deepflow_jax.models.deepflow import DTYPES
from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.deepflow import validate_architecture
from deepflow_jax.torch_io import ConversionError

ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
               "mlp_ratio", "num_classes", "class_dropout_prob", "df_idxs", "projector_dim",
               "ssl_align", "z_dim", "legacy_scaling", "qk_norm")
MODEL_JSON = "model.json"
PARAMS_DIR = "params"
CONVERTED_FORMAT = "deepflow-jax/converted/v1"


def _dtype(d):
  return DTYPES[d] if isinstance(d, str) else d


# ---------------------------------------------------------------------------
# Architecture <-> config / JSON.
# ---------------------------------------------------------------------------


def compute_dtype(config, platform: str):
  """``config.model.dtype`` resolved: ``"auto"`` is float32 on CPU, bfloat16 on accelerators."""
  name = config.model.dtype
  if name == "auto":
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
  return DTYPES[name]


def _cudnn_attention_works(dtype) -> bool:
  """Whether cuDNN's fused attention runs here for ``dtype`` (a tiny jitted probe)."""
  try:
    q = jnp.zeros((1, 128, 2, 64), dtype)
    jax.block_until_ready(jax.jit(
        lambda a: jax.nn.dot_product_attention(a, a, a, implementation="cudnn"))(q))
    return True
  except Exception:  # pylint: disable=broad-except  # no cuDNN, unsupported dtype/shape, ...
    return False


def attention_implementation(requested: str, platform: str, dtype,
                             log: Callable[[str], None] = print) -> Optional[str]:
  """The attention kernel to use: ``requested`` if it works on this backend, else XLA's.

  ``""`` (auto) picks cuDNN's fused attention on NVIDIA GPUs when it runs for the
  compute dtype (bf16/fp16), XLA's otherwise; ``"cudnn"`` where it does not run
  falls back to XLA with a one-line warning; ``"xla"`` is always XLA's.
  """
  if requested == "xla":
    return "xla"
  works = platform == "gpu" and _cudnn_attention_works(dtype)
  if requested == "cudnn" and not works:
    log(f"warning: model.attention_impl='cudnn' does not run on this backend ({platform}, "
        f"{np.dtype(dtype).name}); using XLA attention")
  return "cudnn" if works else None


def model_from_config(config, platform: str = "cpu",
                      log: Callable[[str], None] = print) -> DeepFlow:
  """The ``DeepFlow`` that ``config.model`` describes: dtypes, attention kernel, remat policy."""
  m = config.model
  kw = {f: m[f] for f in ARCH_FIELDS}
  kw["df_idxs"] = tuple(int(i) for i in m.df_idxs)
  dtype = compute_dtype(config, platform)
  return DeepFlow(**kw, attention_impl=attention_implementation(m.attention_impl, platform, dtype,
                                                                log),
                  dtype=dtype, param_dtype=DTYPES[m.param_dtype], remat=m.get("remat", "none"))


def model_to_dict(model: DeepFlow) -> dict[str, Any]:
  """The architecture fields of a DeepFlow as plain JSON-able values."""
  d = {f: getattr(model, f) for f in ARCH_FIELDS}
  d["df_idxs"] = [int(i) for i in d["df_idxs"]]
  return d


def model_from_dict(d: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_impl: Optional[str] = None, source: str = "model config"
                    ) -> DeepFlow:
  """A DeepFlow from ``model_to_dict`` data; unknown or inconsistent fields are refused."""
  unknown = sorted(set(d) - set(ARCH_FIELDS))
  if unknown:
    raise ConversionError(f"{source}: unknown model fields {unknown}")
  kw = dict(d)
  kw["df_idxs"] = tuple(int(i) for i in kw.get("df_idxs", ()))
  model = DeepFlow(**kw, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype),
                   attention_impl=attention_impl)
  try:
    validate_architecture(model)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e
  return model


def _dummy_inputs(model: DeepFlow, abstract: bool = False):
  n, h, c = 1, model.input_size, model.in_channels
  make = jax.ShapeDtypeStruct if abstract else (lambda s, d: jnp.zeros(s, d))
  x = make((n, h, h, c), jnp.float32)
  t = [make((n,), jnp.float32)] * model.num_branches
  y = make((n,), jnp.int32)
  return x, t, y


def param_shapes(model: DeepFlow) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {flax path: shape} of a model's parameters, without materialising them."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *_dummy_inputs(model, abstract=True))
  shapes = flax.linen.unbox(shapes["params"])
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def abstract_params(model: DeepFlow, sharding=None):
  """The parameter tree as ``jax.ShapeDtypeStruct`` (in ``model.param_dtype``)."""
  return flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v, model.param_dtype, sharding=sharding)
       for k, v in param_shapes(model).items()})


def init_params(model: DeepFlow, seed: int = 0):
  """Freshly initialised parameters (the reference's initialisation), unboxed."""
  params = jax.jit(model.init)(jax.random.key(seed), *_dummy_inputs(model))["params"]
  return flax.linen.unbox(params)


# ---------------------------------------------------------------------------
# Converted-checkpoint directories.
# ---------------------------------------------------------------------------


def is_converted_dir(directory: str) -> bool:
  return storage.isfile(storage.join(directory, MODEL_JSON)) and storage.isdir(
      storage.join(directory, PARAMS_DIR))


def save_converted(directory: str, model: DeepFlow, params, *, extra: Optional[dict] = None,
                   force: bool = False) -> None:
  """Writes ``directory/params`` (Orbax) and ``directory/model.json``, atomically as a whole.

  Everything is written into ``<directory>.tmp-<pid>`` first and renamed into
  place, so ``directory`` never holds a half-written checkpoint; leftovers of an
  interrupted run (``<directory>.tmp-*``) are removed. An existing non-empty
  ``directory`` is refused unless ``force``, then replaced. A ``gs://`` directory
  (no rename there) is written in place: Orbax commits ``params/`` and
  ``model.json``, which marks a converted checkpoint, is written last (and
  removed first when replacing one).
  """
  if storage.is_url(directory):
    _save_converted_url(storage.absolute(directory), model, params, extra=extra, force=force)
    return
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ConversionError(f"{directory}: exists and is not a directory")
  if os.path.isdir(directory) and os.listdir(directory):
    _check_replaceable(directory, force)
  parent, base = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  for name in os.listdir(parent):  # what an interrupted conversion left
    if name.startswith(base + ".tmp-") or name.startswith(base + ".old-"):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  tmp = outputs.tmp_name(directory)
  try:
    os.makedirs(tmp)
    meta = {"format": CONVERTED_FORMAT, "model": model_to_dict(model)}
    meta.update(extra or {})
    params = jax.tree.map(np.asarray, flax.linen.unbox(params))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    outputs.atomic_write_json(os.path.join(tmp, MODEL_JSON), meta)
    old = None
    if os.path.exists(directory):
      old = os.path.join(parent, f"{base}.old-{os.getpid()}")
      os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(directory: str, force: bool) -> None:
  """A non-empty output folder may be replaced only if it is a converted checkpoint and
  ``force`` is given."""
  if not is_converted_dir(directory):
    raise ConversionError(f"{directory}: not empty and not a converted checkpoint; choose an "
                          "empty or new output directory (nothing was changed)")
  if not force:
    raise ConversionError(f"{directory}: already holds a converted checkpoint; pass --force "
                          "to replace it")


def _save_converted_url(directory: str, model: DeepFlow, params, *, extra: Optional[dict],
                        force: bool) -> None:
  """``save_converted`` on object storage: model.json last, so a half-written one never loads."""
  storage.configure_emulator()
  if storage.listdir(directory):
    _check_replaceable(directory, force)
    storage.remove(storage.join(directory, MODEL_JSON))  # no longer a checkpoint from here on
  storage.rmtree(directory)  # an earlier (or interrupted) conversion's files
  meta = {"format": CONVERTED_FORMAT, "model": model_to_dict(model)}
  meta.update(extra or {})
  params = jax.tree.map(np.asarray, flax.linen.unbox(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.join(directory, PARAMS_DIR), params)
    ckptr.wait_until_finished()
  outputs.atomic_write_json(storage.join(directory, MODEL_JSON), meta)


def load_converted(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   attention_impl: Optional[str] = None) -> tuple[DeepFlow, Any]:
  """Loads what ``save_converted`` wrote; returns ``(model, params)``."""
  storage.configure_emulator()
  directory = storage.absolute(directory)
  meta_path = storage.join(directory, MODEL_JSON)
  if not is_converted_dir(directory):
    raise ConversionError(f"{directory}: not a converted checkpoint (expected {MODEL_JSON} and "
                          f"{PARAMS_DIR}/ written by python -m deepflow_jax.convert)")
  try:
    meta = json.loads(storage.read_text(meta_path))
    arch = meta["model"]
  except (OSError, ValueError, KeyError) as e:
    raise ConversionError(f"{meta_path}: unreadable model description ({e})") from e
  model = model_from_dict(arch, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, source=meta_path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(storage.join(directory, PARAMS_DIR), abstract_params(model))
  except Exception as e:  # orbax raises many types for structure/shape mismatches
    raise ConversionError(f"{directory}/{PARAMS_DIR}: parameters do not match {MODEL_JSON} "
                          f"({first_line(e)})") from e
  return model, params


# ---------------------------------------------------------------------------
# Training workdirs (layout and fallback: deepflow_jax.workdir).
# ---------------------------------------------------------------------------


def load_workdir_ema(path: str, dtype: str = "float32", step: Optional[int] = None):
  """``(model, ema_params)`` from a training workdir's newest (or given) checkpoint.

  Only the EMA parameters are read (a partial restore), replicated over every
  device whatever layout the training run saved; an unreadable checkpoint is
  skipped with a warning for the previous one (``workdir.restore_newest``).
  """
  storage.configure_emulator()
  path = storage.absolute(path)  # Orbax refuses relative paths
  config = workdir_lib.read_config(path)
  config.model.dtype = dtype
  model = model_from_config(config)
  ckpt_dir = workdir_lib.checkpoint_dir(path)
  steps = workdir_lib.checkpoint_steps(ckpt_dir)
  if step is not None and step not in steps:
    raise UserError(f"{ckpt_dir}: no checkpoint for step {step} (have {steps})")
  if not steps:
    raise UserError(f"{ckpt_dir}: no checkpoints yet")
  target = {"ema_params": abstract_params(model, sharding=shd.replicated(shd.data_mesh()))}

  def restore(s):
    with ocp.PyTreeCheckpointer() as c:
      return c.restore(
          storage.join(ckpt_dir, str(s), workdir_lib.STATE_ITEM),
          args=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True))["ema_params"]

  found, params, _ = workdir_lib.restore_newest(
      ckpt_dir, [step] if step is not None else steps, restore)
  if found is None:
    raise UserError(f"{ckpt_dir}: no readable checkpoint (see the warnings above)")
  return model, params


# ---------------------------------------------------------------------------
# Any path -> (model, params).
# ---------------------------------------------------------------------------

SAMPLING_DTYPES = ("float32", "bfloat16")


def sampling_dtype(name: str, platform: Optional[str] = None) -> str:
  """A sampling compute dtype name resolved: ``"auto"`` is float32 on CPU (where bf16
  matmuls are slower) and bfloat16 on accelerators: with the same noise it moved the
  digits default's Fréchet distance by +0.02 against a seed spread of 0.30
  (docs/benchmarks.md, "bf16 against float32 sampling")."""
  if name == "auto":
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"
  if name not in SAMPLING_DTYPES:
    raise UserError(f"dtype must be auto or one of {', '.join(SAMPLING_DTYPES)}, got {name!r}")
  return name


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


MODEL_LOADERS: list[ModelLoader] = [
    ModelLoader("converted", is_converted_dir,
                lambda path, dtype: load_converted(path, dtype=DTYPES[dtype])),
    ModelLoader("workdir", workdir_lib.is_workdir, load_workdir_ema),  # its newest EMA weights
]


def register_model_loader(name: str, can_load: Callable[[str], bool],
                          load: Callable[[str, str], tuple[Any, Any]]) -> None:
  """Adds (or replaces, by name) a loader; loaders are tried in registration order."""
  MODEL_LOADERS[:] = [l for l in MODEL_LOADERS if l.name != name]
  MODEL_LOADERS.append(ModelLoader(name, can_load, load))


def load_model(path: str, dtype: str = "float32") -> tuple[Any, Any]:
  """``(model, params)`` from the first registered loader that accepts ``path``.

  ``dtype``: the compute dtype, ``"float32"``, ``"bfloat16"`` or ``"auto"``
  (:func:`sampling_dtype`).

  ``path`` is a converted checkpoint directory or a training workdir (its EMA
  weights). Raises ``UserError`` (one line) when the path is missing or no
  loader accepts it.
  """
  dtype = sampling_dtype(dtype)
  if not (storage.exists(path) or storage.isdir(path)):
    raise UserError(f"{path}: no such checkpoint (expected a converted checkpoint directory "
                    "written by python -m deepflow_jax.convert, or a training workdir)")
  for loader in MODEL_LOADERS:
    if loader.can_load(path):
      return loader.load(path, dtype)
  raise UserError(f"{path}: not a converted checkpoint or training workdir (expected model.json "
                  "and params/ from python -m deepflow_jax.convert, or config.json and "
                  "checkpoints/ from python -m deepflow_jax.main)")
