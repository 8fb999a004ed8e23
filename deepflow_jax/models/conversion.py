"""Reference PyTorch DeepFlow checkpoints <-> Flax parameters.

The parameter tree of ``deepflow_jax.models.DeepFlow`` is a mechanical rename of
the reference ``state_dict`` (``docs/architecture.md``, "Parameter names"):

* ``ModuleList`` entries become ``<name>_<i>`` (``blocks.3`` -> ``blocks_3``);
* ``nn.Sequential`` entries become ``<name>/layers_<i>`` (``acc_mlp.6`` ->
  ``acc_mlp/layers_6``);
* Linear ``weight`` (out, in) -> ``kernel`` (in, out); Conv2d (O, I, kh, kw) ->
  (kh, kw, I, O); LayerNorm ``weight`` -> ``scale``; Embedding -> ``embedding``;
  ``multihead_attn.in_proj_weight`` -> ``multihead_attn/in_proj/kernel``;
* ``pos_embed`` is the fixed 2D sin-cos table, checked and not stored.

``load_torch_checkpoint(path)`` reads a reference ``.pt`` (or a bare state_dict /
``.safetensors``), infers the architecture from its ``args`` and tensor shapes and
returns ``(model, params)``; ``params_to_state_dict`` goes back. Files are read
with ``deepflow_jax.torch_io`` (never unpickling code). Every tensor must be
consumed and every parameter filled, otherwise one error lists missing,
unexpected and mis-shaped keys.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Any, Mapping, Optional

import flax
import jax.numpy as jnp
import numpy as np

from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.deepflow import sincos_pos_embed
from deepflow_jax.models.loading import model_from_dict
from deepflow_jax.models.loading import param_shapes
from deepflow_jax.models.presets import REFERENCE_MODEL_NAMES
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import check_state_dict
from deepflow_jax.torch_io import flat_state_dict
from deepflow_jax.torch_io import load_weights_file
from deepflow_jax.torch_io import to_flax_layout
from deepflow_jax.torch_io import to_torch_layout
from deepflow_jax.torch_io import torch_shape

MODULE_LISTS = ("blocks", "df_blocks", "final_layer", "projectors")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(MODULE_LISTS))
_SEQ_RE = re.compile(r"^layers_(\d+)$")
POS_EMBED_ATOL = 1e-6


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


def expected_state_dict_shapes(model: DeepFlow) -> dict[str, tuple[int, ...]]:
  """The reference state_dict keys and shapes for this architecture."""
  out = {"pos_embed": (1, model.num_tokens, model.hidden_size)}
  for path, shape in param_shapes(model).items():
    out[flax_path_to_torch_key(path)] = torch_shape(path, shape)
  return out


def params_to_state_dict(model: DeepFlow, params) -> dict[str, np.ndarray]:
  """Flax params -> the reference's state_dict (numpy), including ``pos_embed``."""
  flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
  sd = {}
  for path, v in flat.items():
    sd[flax_path_to_torch_key(path)] = np.ascontiguousarray(to_torch_layout(path, np.asarray(v)))
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
    arr = to_flax_layout(path, sd[flax_path_to_torch_key(path)])
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


def parse_df_idxs(value) -> list[int]:
  if isinstance(value, str):
    value = json.loads(value) if value.strip() else []
  return [int(i) for i in value]


def _num_heads(sd, args, overrides, cfg, source, missing) -> None:
  """Heads: explicit > reference model name > custom_num_heads > the qk-norm head dim."""
  d, p = cfg["hidden_size"], cfg["patch_size"]
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
    missing.append(f"--num_heads (attention heads; width {d} does not tell them)")


def _splits(sd, args, overrides, cfg, source, missing) -> int:
  """df_idxs (explicit > args > none when there are no VeRA blocks); returns the block count."""
  n_df = len(_indices(sd, "df_blocks"))
  if "df_idxs" in overrides:
    df_idxs = parse_df_idxs(overrides["df_idxs"])
  elif "df_idxs" in args:
    df_idxs = parse_df_idxs(args["df_idxs"])
  elif n_df == 0:
    df_idxs = []
  else:
    df_idxs = None
    missing.append(f"--df_idxs (the layers after which the {n_df} VeRA block(s) sit, e.g. "
                   f"'{[int(cfg['depth'] * (j + 1) / (n_df + 1)) for j in range(n_df)]}')")
  if df_idxs is not None and len(df_idxs) != n_df:
    raise ConversionError(f"{source}: df_idxs {df_idxs} names {len(df_idxs)} splits but the "
                          f"weights hold {n_df} VeRA blocks (df_blocks.*)")
  cfg["df_idxs"] = df_idxs
  return n_df


def _projectors(sd, args, cfg, source, n_df: int) -> None:
  """projector_dim, ssl_align and z_dim from the acceleration MLP and the SSL projectors."""
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


def _trunk(sd, args, overrides, source, missing) -> dict[str, Any]:
  """Width, channels, patch, depth, MLP ratio, classes, input size and qk-norm."""
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
    cfg["input_size"] = int(round(tokens**0.5)) * int(p)
  elif "input_size" in overrides:
    cfg["input_size"] = int(overrides["input_size"])
  elif "resolution" in args:
    cfg["input_size"] = int(args["resolution"]) // 8
  else:
    missing.append("--input_size (latent side; the file has no pos_embed and no args)")
  cfg["qk_norm"] = "blocks.0.attn.q_norm.weight" in sd
  if "qk_norm" in args and bool(args["qk_norm"]) != cfg["qk_norm"]:
    raise ConversionError(f"{source}: args.qk_norm={args['qk_norm']} but the weights "
                          f"{'have' if cfg['qk_norm'] else 'have no'} q_norm/k_norm")
  return cfg


def infer_architecture(sd: Mapping[str, np.ndarray], args: Optional[Mapping[str, Any]],
                       source: str, **overrides) -> dict[str, Any]:
  """Architecture fields from tensor shapes, ``args`` and explicit overrides.

  Overrides (``df_idxs``, ``num_heads``, ``legacy_scaling``, ``input_size``,
  ``class_dropout_prob``) win over ``args``; shapes win over everything they
  determine, and a contradiction is an error. Facts that neither the file nor
  the caller gives are listed together, by their flags, in one error.
  """
  args = dict(args or {})
  overrides = {k: v for k, v in overrides.items() if v is not None}
  missing = []  # architecture facts neither the file nor the caller gives, as flags
  cfg = _trunk(sd, args, overrides, source, missing)
  _num_heads(sd, args, overrides, cfg, source, missing)
  n_df = _splits(sd, args, overrides, cfg, source, missing)
  _projectors(sd, args, cfg, source, n_df)
  if "legacy_scaling" in overrides:
    cfg["legacy_scaling"] = bool(overrides["legacy_scaling"])
  elif "legacy_scaling" in args:
    cfg["legacy_scaling"] = bool(args["legacy_scaling"])
  elif n_df:
    missing.append("--legacy_scaling (true or false: whether the VeRA scale was clipped to "
                   "[-5, 5]; true for the released SSL-aligned models)")
  else:
    cfg["legacy_scaling"] = False
  if missing:
    raise ConversionError(f"{source}: the file does not record {len(missing)} architecture "
                          f"fact(s); pass {'; '.join(missing)}")
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


def reference_args(model: DeepFlow) -> dict[str, Any]:
  """The reference's ``args`` for ``model``, as a plain dict (what its scripts and this
  converter read back: model name, split layers, scaling, qk-norm, SSL, resolution)."""
  name = next((n for n, ref in REFERENCE_MODEL_NAMES.items()
               if ref == dict(hidden_size=model.hidden_size, num_heads=model.num_heads,
                              patch_size=model.patch_size)), None)
  args = {
      "model": name or f"DeepFlow-custom/{model.patch_size}",
      "df_idxs": json.dumps([int(i) for i in model.df_idxs]),
      "legacy_scaling": bool(model.legacy_scaling),
      "qk_norm": bool(model.qk_norm),
      "ssl_align": bool(model.ssl_align),
      "resolution": int(model.input_size) * 8,
      "num_classes": int(model.num_classes),
      "projector_dim": int(model.projector_dim),
      "cfg_prob": float(model.class_dropout_prob),
  }
  if name is None:
    args["custom_num_heads"] = int(model.num_heads)
  return args


def reference_checkpoint(model: DeepFlow, params, *, steps: int = 0) -> dict[str, Any]:
  """The reference's checkpoint layout ``{'model', 'ema', 'args', 'steps'}`` (numpy arrays).

  Both ``model`` and ``ema`` hold ``params`` (a converted directory keeps one set
  of weights); ``args`` is a plain dict, so ``torch.load(..., weights_only=True)``
  reads the file and the reference's ``generate.py`` (``torch.load(path)['ema']``)
  loads it as is.
  """
  sd = params_to_state_dict(model, params)
  return {"model": sd, "ema": sd, "args": reference_args(model), "steps": int(steps)}
