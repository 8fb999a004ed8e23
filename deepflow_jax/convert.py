"""Conversion of reference PyTorch DeepFlow checkpoints to JAX, and back.

Library use::

    model, params = load_torch_checkpoint("deepflow-xl-2-3t.pt")          # EMA weights
    velocities, accelerations, zs = model.apply({"params": params}, x, [t] * 3, y)

Command line::

    python -m deepflow_jax.convert --checkpoint=IN.pt --output=DIR [--weights=ema|model]
    python -m deepflow_jax.convert --export --input=DIR --output=OUT.pt

The first writes ``DIR/params`` (an Orbax checkpoint of the parameter tree) and
``DIR/model.json`` (the resolved architecture), which ``load_converted`` and the
sampling / training entry points read. The second writes a ``.pt`` state_dict
with the reference's keys and shapes.

The architecture is inferred from the checkpoint's ``args`` and from tensor
shapes; what cannot be inferred (split layers and heads of a bare state_dict,
``legacy_scaling``) is a named option. Every tensor must be consumed and every
parameter filled, otherwise one error lists missing, unexpected and mis-shaped
keys.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from deepflow_jax.errors import cli_main
from deepflow_jax.errors import first_line
from deepflow_jax.models.deepflow import DTYPES
from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.deepflow import sincos_pos_embed
from deepflow_jax.models.deepflow import validate_architecture
from deepflow_jax.models.presets import REFERENCE_MODEL_NAMES
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import check_state_dict
from deepflow_jax.torch_io import flat_state_dict
from deepflow_jax.torch_io import load_weights_file
from deepflow_jax.torch_io import save_torch_state_dict

MODULE_LISTS = ("blocks", "df_blocks", "final_layer", "projectors")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(MODULE_LISTS))
_SEQ_RE = re.compile(r"^layers_(\d+)$")
POS_EMBED_ATOL = 1e-6

# ---------------------------------------------------------------------------
# Model description <-> JSON.
# ---------------------------------------------------------------------------

ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
               "mlp_ratio", "num_classes", "class_dropout_prob", "df_idxs", "projector_dim",
               "ssl_align", "z_dim", "legacy_scaling", "qk_norm")


def model_to_dict(model: DeepFlow) -> dict[str, Any]:
  """The architecture fields of a DeepFlow as plain JSON-able values."""
  d = {f: getattr(model, f) for f in ARCH_FIELDS}
  d["df_idxs"] = [int(i) for i in d["df_idxs"]]
  return d


def model_from_dict(d: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_impl: Optional[str] = None, source: str = "model config"
                    ) -> DeepFlow:
  unknown = sorted(set(d) - set(ARCH_FIELDS))
  if unknown:
    raise ConversionError(f"{source}: unknown model fields {unknown}")
  kw = dict(d)
  kw["df_idxs"] = tuple(int(i) for i in kw.get("df_idxs", ()))
  if isinstance(dtype, str):
    dtype = DTYPES[dtype]
  if isinstance(param_dtype, str):
    param_dtype = DTYPES[param_dtype]
  model = DeepFlow(**kw, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
  try:
    validate_architecture(model)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from e
  return model


# ---------------------------------------------------------------------------
# The rename table (Flax path <-> torch key) and layout transposes.
# ---------------------------------------------------------------------------


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
  """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
  *mods, leaf = path
  parts = []
  for m in mods:
    if (match := _LIST_RE.match(m)):
      parts += [match.group(1), match.group(2)]
    elif (match := _SEQ_RE.match(m)):
      parts.append(match.group(1))
    else:
      parts.append(m)
  if parts[-1] == "in_proj":  # nn.MultiheadAttention's packed projection
    parts[-1] = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
    return ".".join(parts)
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight",
                "bias": "bias"}[leaf])
  return ".".join(parts)


def _to_torch_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if x.ndim == 4:  # conv (kh, kw, I, O) -> (O, I, kh, kw)
      return np.transpose(x, (3, 2, 0, 1))
    return x.T
  return x


def _to_flax_layout(path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    if x.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
      return np.transpose(x, (2, 3, 1, 0))
    return x.T
  return x


def param_shapes(model: DeepFlow) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {flax path: shape} of a model's parameters, without materialising them."""
  n, h, c = 1, model.input_size, model.in_channels
  x = jax.ShapeDtypeStruct((n, h, h, c), jnp.float32)
  t = [jax.ShapeDtypeStruct((n,), jnp.float32)] * model.num_branches
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  shapes = flax.linen.unbox(shapes)
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(shapes).items()}


def expected_state_dict_shapes(model: DeepFlow) -> dict[str, tuple[int, ...]]:
  """The reference state_dict keys and shapes for this architecture."""
  out = {"pos_embed": (1, model.num_tokens, model.hidden_size)}
  for path, shape in param_shapes(model).items():
    dummy = np.empty(shape, np.uint8)
    out[flax_path_to_torch_key(path)] = _to_torch_layout(path, dummy).shape
  return out


def params_to_state_dict(model: DeepFlow, params) -> dict[str, np.ndarray]:
  """Flax params -> the reference's state_dict (numpy), including ``pos_embed``."""
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  sd = {}
  for path, v in flat.items():
    sd[flax_path_to_torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path, np.asarray(v)))
  sd["pos_embed"] = sincos_pos_embed(model.hidden_size,
                                     model.input_size // model.patch_size)[None]
  return dict(sorted(sd.items()))


def state_dict_to_params(model: DeepFlow, sd: Mapping[str, np.ndarray], source: str,
                         dtype=None):
  """Validates a reference state_dict against ``model`` and renames it to Flax params."""
  expected = expected_state_dict_shapes(model)
  check_state_dict(expected, sd, source)
  pos = sincos_pos_embed(model.hidden_size, model.input_size // model.patch_size)[None]
  err = float(np.max(np.abs(sd["pos_embed"].astype(np.float64) - pos)))
  if err > POS_EMBED_ATOL:
    raise ConversionError(
        f"{source}: pos_embed differs from the fixed 2D sin-cos table by {err:.3g} "
        f"(> {POS_EMBED_ATOL}); this is not a reference DeepFlow checkpoint")
  dtype = dtype or model.param_dtype
  flat = {}
  for path in param_shapes(model):
    arr = _to_flax_layout(path, sd[flax_path_to_torch_key(path)])
    flat[path] = jnp.asarray(np.ascontiguousarray(arr), dtype)
  return flax.traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------
# Reading reference files and inferring the architecture.
# ---------------------------------------------------------------------------


def read_reference_file(path: str, weights: str = "ema"
                        ) -> tuple[dict[str, np.ndarray], Optional[dict[str, Any]]]:
  """Returns (state_dict as numpy, args as a dict or None) from any supported layout."""
  if weights not in ("ema", "model"):
    raise ConversionError(f"weights must be 'ema' or 'model', got {weights!r}")
  obj = load_weights_file(path)
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a dict (a checkpoint or a state_dict), "
                          f"got {type(obj).__name__}")
  args = None
  if "model" in obj or "ema" in obj:  # the reference train.py layout
    if weights not in obj:
      raise ConversionError(f"{path}: no {weights!r} weights in this checkpoint "
                            f"(it holds {sorted(k for k in obj if isinstance(k, str))})")
    sd = obj[weights]
    if not isinstance(sd, Mapping):
      raise ConversionError(f"{path}: {weights!r} is a {type(sd).__name__}, expected a state_dict")
    raw_args = obj.get("args")
    if raw_args is not None:
      args = dict(vars(raw_args)) if isinstance(raw_args, argparse.Namespace) else dict(raw_args)
    source = f"{path} [{weights}]"
  else:  # a bare state_dict (.pt or .safetensors)
    sd = obj
    source = path
  sd = flat_state_dict(sd, source)
  if sd and all(k.startswith("module.") for k in sd):  # DDP-wrapped
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd, args


def _indices(sd, prefix: str) -> list[int]:
  pat = re.compile(r"^%s\.(\d+)\." % re.escape(prefix))
  return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _parse_df_idxs(value) -> list[int]:
  if isinstance(value, str):
    value = json.loads(value) if value.strip() else []
  return [int(i) for i in value]


def infer_architecture(sd: Mapping[str, np.ndarray], args: Optional[Mapping[str, Any]],
                       source: str, **overrides) -> dict[str, Any]:
  """Architecture fields from tensor shapes, ``args`` and explicit overrides.

  Overrides (``df_idxs``, ``num_heads``, ``legacy_scaling``, ``input_size``,
  ``class_dropout_prob``) win over ``args``; shapes win over everything they
  determine, and a contradiction is an error.
  """
  args = dict(args or {})
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if "x_embedder.proj.weight" not in sd:
    raise ConversionError(f"{source}: no 'x_embedder.proj.weight': not a DeepFlow/SiT state_dict "
                          f"(first keys: {sorted(sd)[:5]})")
  d, c, p, _ = sd["x_embedder.proj.weight"].shape
  cfg: dict[str, Any] = dict(hidden_size=int(d), in_channels=int(c), patch_size=int(p))
  blocks = _indices(sd, "blocks")
  if not blocks:
    raise ConversionError(f"{source}: no transformer blocks ('blocks.N.*') found")
  cfg["depth"] = blocks[-1] + 1
  if "blocks.0.mlp.fc1.weight" in sd:
    cfg["mlp_ratio"] = float(sd["blocks.0.mlp.fc1.weight"].shape[0] / d)
  if "y_embedder.embedding_table.weight" in sd:
    cfg["num_classes"] = int(sd["y_embedder.embedding_table.weight"].shape[0] - 1)
  if "pos_embed" in sd:
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens**0.5))
    cfg["input_size"] = grid * int(p)
  elif "input_size" in overrides:
    cfg["input_size"] = int(overrides["input_size"])
  elif "resolution" in args:
    cfg["input_size"] = int(args["resolution"]) // 8
  else:
    raise ConversionError(f"{source}: cannot tell the latent size (no pos_embed, no args); "
                          "pass input_size")
  cfg["qk_norm"] = "blocks.0.attn.q_norm.weight" in sd
  if "qk_norm" in args and bool(args["qk_norm"]) != cfg["qk_norm"]:
    raise ConversionError(f"{source}: args.qk_norm={args['qk_norm']} but the weights "
                          f"{'have' if cfg['qk_norm'] else 'have no'} q_norm/k_norm")

  # Heads: explicit > model name > custom_num_heads > qk-norm head dim.
  name = args.get("model")
  if "num_heads" in overrides:
    cfg["num_heads"] = int(overrides["num_heads"])
  elif name in REFERENCE_MODEL_NAMES:
    ref = REFERENCE_MODEL_NAMES[name]
    if ref["hidden_size"] != d or ref["patch_size"] != p:
      raise ConversionError(
          f"{source}: args.model={name!r} means width {ref['hidden_size']} and patch "
          f"{ref['patch_size']}, but the weights have width {d} and patch {p}")
    cfg["num_heads"] = ref["num_heads"]
  elif args.get("custom_num_heads"):
    cfg["num_heads"] = int(args["custom_num_heads"])
  elif cfg["qk_norm"]:
    cfg["num_heads"] = int(d // sd["blocks.0.attn.q_norm.weight"].shape[0])
  elif name is not None:
    raise ConversionError(
        f"{source}: unknown model name {name!r} in args.model (known: "
        f"{', '.join(sorted(REFERENCE_MODEL_NAMES))}); pass num_heads to convert it anyway")
  else:
    raise ConversionError(f"{source}: the number of attention heads cannot be inferred from a "
                          "bare state_dict; pass num_heads")

  n_df = len(_indices(sd, "df_blocks"))
  if "df_idxs" in overrides:
    df_idxs = _parse_df_idxs(overrides["df_idxs"])
  elif "df_idxs" in args:
    df_idxs = _parse_df_idxs(args["df_idxs"])
  elif n_df == 0:
    df_idxs = []
  else:
    raise ConversionError(f"{source}: {n_df} VeRA blocks but no split layers (args.df_idxs); "
                          "pass df_idxs")
  if len(df_idxs) != n_df:
    raise ConversionError(f"{source}: df_idxs {df_idxs} names {len(df_idxs)} splits but the "
                          f"weights hold {n_df} VeRA blocks (df_blocks.*)")
  cfg["df_idxs"] = df_idxs

  if n_df and "df_blocks.0.acc_mlp.0.weight" in sd:
    cfg["projector_dim"] = int(sd["df_blocks.0.acc_mlp.0.weight"].shape[0])
  elif args.get("projector_dim") or args.get("custom_projector_dim"):
    cfg["projector_dim"] = int(args.get("projector_dim") or args.get("custom_projector_dim"))
  projectors = _indices(sd, "projectors")
  cfg["ssl_align"] = bool(projectors)
  if args.get("ssl_align") and not projectors:
    raise ConversionError(f"{source}: args.ssl_align is set but the weights hold no projectors")
  if projectors:
    if len(projectors) != n_df:
      raise ConversionError(f"{source}: {len(projectors)} projectors for {n_df} VeRA blocks")
    last = "projectors.0.4.weight"
    if last not in sd:
      raise ConversionError(f"{source}: projectors present but {last!r} is missing")
    cfg["z_dim"] = int(sd[last].shape[0])
    cfg["projector_dim"] = int(sd["projectors.0.0.weight"].shape[0])

  if "legacy_scaling" in overrides:
    cfg["legacy_scaling"] = bool(overrides["legacy_scaling"])
  elif "legacy_scaling" in args:
    cfg["legacy_scaling"] = bool(args["legacy_scaling"])
  elif n_df:
    raise ConversionError(f"{source}: whether the VeRA scale was clipped (legacy_scaling) is not "
                          "recorded in a bare state_dict; pass legacy_scaling=True or False")
  else:
    cfg["legacy_scaling"] = False
  if "class_dropout_prob" in overrides:
    cfg["class_dropout_prob"] = float(overrides["class_dropout_prob"])
  elif args.get("cfg_prob") is not None:
    cfg["class_dropout_prob"] = float(args["cfg_prob"])
  return cfg


def load_torch_checkpoint(path: str, weights: str = "ema", *, dtype=jnp.float32,
                          param_dtype=jnp.float32, attention_impl: Optional[str] = None,
                          **overrides) -> tuple[DeepFlow, Any]:
  """Reads a reference checkpoint; returns ``(model, params)``.

  Args:
    path: a reference ``.pt`` (``{'model','ema','opt','args','steps'}``), a bare
      state_dict ``.pt``/``.pth`` or a ``.safetensors`` file.
    weights: ``"ema"`` (used for sampling, the default) or ``"model"``; ignored
      for bare state_dicts.
    dtype, param_dtype, attention_impl: passed to ``DeepFlow``.
    **overrides: architecture facts a file may not record: ``df_idxs``,
      ``num_heads``, ``legacy_scaling``, ``input_size``, ``class_dropout_prob``.
  """
  sd, args = read_reference_file(path, weights)
  source = f"{path}" + (f" [{weights}]" if args is not None else "")
  cfg = infer_architecture(sd, args, source, **overrides)
  model = model_from_dict(cfg, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, source=source)
  params = state_dict_to_params(model, sd, source)
  return model, params


# ---------------------------------------------------------------------------
# The converted-checkpoint directory (Orbax params + model.json).
# ---------------------------------------------------------------------------

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_converted(directory: str, model: DeepFlow, params, *, extra: Optional[dict] = None,
                   force: bool = False) -> None:
  """Writes ``directory/params`` (Orbax) and ``directory/model.json``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory) and not force:
    raise ConversionError(f"{directory}: output directory is not empty; pass --force to "
                          "overwrite the converted checkpoint in it")
  os.makedirs(directory, exist_ok=True)
  meta = {"format": "deepflow-jax/converted/v1", "model": model_to_dict(model)}
  meta.update(extra or {})
  params = jax.tree.map(np.asarray, flax.linen.unbox(params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=force)
    ckptr.wait_until_finished()
  tmp = os.path.join(directory, MODEL_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MODEL_JSON))


def is_converted_dir(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MODEL_JSON)) and os.path.isdir(
      os.path.join(directory, PARAMS_DIR))


def load_converted(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   attention_impl: Optional[str] = None) -> tuple[DeepFlow, Any]:
  """Loads what ``save_converted`` wrote; returns ``(model, params)``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, MODEL_JSON)
  if not is_converted_dir(directory):
    raise ConversionError(f"{directory}: not a converted checkpoint (expected {MODEL_JSON} and "
                          f"{PARAMS_DIR}/ written by python -m deepflow_jax.convert)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    arch = meta["model"]
  except (OSError, ValueError, KeyError) as e:
    raise ConversionError(f"{meta_path}: unreadable model description ({e})") from e
  model = model_from_dict(arch, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, source=meta_path)
  shapes = param_shapes(model)
  target = flax.traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(v, param_dtype) for k, v in shapes.items()})
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(directory, PARAMS_DIR), target)
  except Exception as e:  # orbax raises many types for structure/shape mismatches
    raise ConversionError(f"{directory}/{PARAMS_DIR}: parameters do not match {MODEL_JSON} "
                          f"({first_line(e)})") from e
  return model, params


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m deepflow_jax.convert",
      description="Convert a reference PyTorch DeepFlow checkpoint to a JAX (Orbax) checkpoint, "
      "or export one back to a .pt state_dict with --export.")
  p.add_argument("--checkpoint", help="reference .pt / .pth / .safetensors to convert")
  p.add_argument("--output", required=True,
                 help="output directory (convert) or .pt/.safetensors file (--export)")
  p.add_argument("--weights", default="ema", choices=("ema", "model"),
                 help="which weights of a train.py checkpoint (default: ema)")
  p.add_argument("--force", action="store_true", help="allow writing into a non-empty output")
  p.add_argument("--export", action="store_true",
                 help="export a converted directory (--input) back to a reference state_dict")
  p.add_argument("--input", help="converted directory to export (with --export)")
  g = p.add_argument_group("architecture facts a file may not record")
  g.add_argument("--df_idxs", help="split layers, e.g. '[8, 16]'")
  g.add_argument("--num_heads", type=int)
  g.add_argument("--legacy_scaling", type=_bool)
  g.add_argument("--input_size", type=int)
  return p


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  if a.export:
    if not a.input:
      raise ConversionError("--export needs --input=DIR (a converted checkpoint directory)")
    if os.path.exists(a.output) and not a.force:
      raise ConversionError(f"{a.output}: exists; pass --force to overwrite it")
    model, params = load_converted(a.input)
    sd = params_to_state_dict(model, params)
    save_torch_state_dict(sd, a.output)
    print(f"wrote {len(sd)} tensors to {a.output}")
    return 0
  if not a.checkpoint:
    raise ConversionError("--checkpoint=IN.pt is required (or --export --input=DIR)")
  out = os.path.abspath(a.output)
  if os.path.exists(out) and (not os.path.isdir(out)):
    raise ConversionError(f"{out}: exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out) and not a.force:
    raise ConversionError(f"{out}: output directory is not empty; pass --force to overwrite")
  df_idxs = _parse_df_idxs(a.df_idxs) if a.df_idxs is not None else None
  model, params = load_torch_checkpoint(a.checkpoint, a.weights, df_idxs=df_idxs,
                                        num_heads=a.num_heads, legacy_scaling=a.legacy_scaling,
                                        input_size=a.input_size)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  save_converted(out, model, params, force=a.force,
                 extra={"source": os.path.abspath(a.checkpoint), "weights": a.weights})
  arch = model_to_dict(model)
  print(f"converted {a.checkpoint} [{a.weights}]: {n:,} parameters, width {arch['hidden_size']}, "
        f"depth {arch['depth']}, heads {arch['num_heads']}, splits {arch['df_idxs']} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
