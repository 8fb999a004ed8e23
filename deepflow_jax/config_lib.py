"""Training configuration: defaults shared by every preset, loading and validation.

Presets live in ``configs/`` (one per file) and start from ``base_config()``.
Every value can be overridden on the command line, ``--config.train.num_steps=100``.
``validate(config)`` refuses unknown or inconsistent values with a message that
names them.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os

import ml_collections

import deepflow_jax.configs as configs_pkg
from deepflow_jax import sampling
from deepflow_jax.data import config as data_config
from deepflow_jax.errors import UserError
from deepflow_jax.models.deepflow import DTYPES
from deepflow_jax.models.deepflow import architecture_problems
from deepflow_jax.models.presets import PRESETS

# Dtypes a training config may name (float64 is for parity tests only).
_DTYPES = {k: v for k, v in DTYPES.items() if k != "float64"}


def base_config() -> ml_collections.ConfigDict:
  """Every key a training config has, with its default and what it means.

  One listing on purpose (longer than the project's other functions): it is the
  config's reference, read top to bottom.
  """
  c = ml_collections.ConfigDict()

  # Network. Config files fill width/depth/heads/patch/df_idxs from a named
  # preset with ``set_preset``; command-line overrides apply after that.
  c.model = ml_collections.ConfigDict()
  m = c.model
  m.preset = ""  # the preset the file started from (informational)
  m.input_size = 32
  m.patch_size = 2
  m.in_channels = 4
  m.hidden_size = 1152
  m.depth = 24
  m.num_heads = 16
  m.mlp_ratio = 4.0
  m.num_classes = 1000
  m.class_dropout_prob = 0.1
  m.df_idxs = (8, 16)
  m.projector_dim = 2048
  m.ssl_align = False  # REPA alignment of each split's tokens with a frozen DINOv2
  m.z_dim = 768  # the projectors' output width = the encoder's feature width
  m.encoder_path = ""  # ssl_align: the DINOv2 weights, e.g. dinov2_vitb14_pretrain.pth
  m.encoder_num_heads = 0  # ssl_align: the encoder's heads; 0 = the official table by width
  m.legacy_scaling = False
  m.qk_norm = False
  m.attention_impl = ""  # "" (XLA picks), "xla", "cudnn"
  m.dtype = "auto"  # compute dtype: "auto" = bfloat16 on accelerators, float32 on CPU
  m.param_dtype = "float32"
  # Rematerialisation in the backward pass (memory for compute; parameter names do
  # not change): "none"; "block" (every SiT and VeRA block keeps only its inputs
  # and recomputes the rest); "dots" (per block, matmul outputs without batch
  # dimensions are saved, attention scores and element-wise results recomputed).
  m.remat = "none"

  c.loss = ml_collections.ConfigDict()
  c.loss.weighting = "lognormal"
  c.loss.path_type = "linear"
  c.loss.beta = 0.01  # tg_upper_bound
  c.loss.scale_weight = (0.2, 0.2, 1.0)
  c.loss.acc_coeff = 1.0
  c.loss.proj_coeff = 0.5

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"  # or "cosine" (decays to 0 at train.num_steps)

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.global_batch_size = 256
  c.train.num_steps = 400_000
  c.train.grad_accum_steps = 1
  c.train.ema_decay = 0.9999
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.keep_ckpts = 3
  c.train.sample_every = 50_000  # PNG grid of EMA samples; 0 = only at the end
  c.train.init_from = ""  # fine-tune from: a converted checkpoint dir, or a workdir (its EMA)
  # Divergence policy (training/health.py, checked at logged and checkpoint steps):
  # steps whose loss or gradients are not finite are skipped; after max_skip_streak
  # consecutive skips (0: never), or a logged loss above loss_spike_factor x the
  # median of the last loss_spike_window logged losses (0: off), the run rolls back
  # to its newest finite checkpoint and skips the batches that led there; after
  # max_rollbacks rollbacks without progress it stops (exit 3).
  c.train.max_skip_streak = 20
  c.train.loss_spike_factor = 10.0
  c.train.loss_spike_window = 20
  c.train.max_rollbacks = 3
  # JAX's persistent compilation cache, so that a restarted job skips compiling:
  # "" = WORKDIR/.jax_cache, "none" = off, else a directory (may be shared by runs).
  # JAX_COMPILATION_CACHE_DIR in the environment takes precedence.
  c.train.compile_cache_dir = ""

  # The input pipeline's own keys: its schema (deepflow_jax.data.config) is this block.
  c.data = data_config.default_config()
  c.data.name = "repa"  # "digits" | "repa" | "arrayrecord"

  c.mesh = ml_collections.ConfigDict()
  # Mesh axes in order; -1 takes the remaining devices.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Logical parameter axis -> mesh axis (None = replicated), first match wins per
  # mesh axis. With fsdp > 1 every matrix is split over the fsdp devices along its
  # model-width ("embed") side, or its "hidden" side where it has no embed side.
  c.mesh.rules = (("embed", "fsdp"), ("hidden", "fsdp"), ("mlp", None), ("vocab", None),
                  ("patch", None), ("freq", None), ("norm", None))

  c.distributed = ml_collections.ConfigDict()
  # "auto": jax.distributed.initialize() when the environment shows several processes
  # (SLURM, Open MPI, JAX_COORDINATOR_ADDRESS, TPU_WORKER_HOSTNAMES); "always": call it
  # anyway (Cloud TPU VM pod slices, where JAX finds the workers itself); "never".
  c.distributed.initialize = "auto"
  c.distributed.coordinator_address = ""  # set all three for a manual multi-process run
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = "gloo"

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "sde"
  c.sample.num_steps = 250
  c.sample.cfg_scale = 1.0
  c.sample.guidance_low = 0.0
  c.sample.guidance_high = 1.0
  # Time grid (docs/sampling.md): "" = the sampler's default ("reference" for sde, else
  # "uniform"), or uniform | shifted | poly | reference; grid_shift is s of "shifted",
  # grid_rho is rho of "poly".
  c.sample.grid = ""
  c.sample.grid_shift = sampling.DEFAULT_GRID_SHIFT
  c.sample.grid_rho = sampling.DEFAULT_GRID_RHO
  c.sample.grid_per_class = 8  # grid columns; one row per class shown
  c.sample.grid_classes = 10  # rows in the periodic sample grid (0: no grids)
  c.sample.vae = ""  # diffusers VAE dir (or converted) to decode latent grids

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 0  # digits: 1000 generated samples scored by the classifier
  c.eval.batch_size = 250  # global batch of the evaluations' sampling
  # ADM-suite evaluation (FID, sFID, IS) of EMA samples during training: every
  # fid_every steps and at the end (0: never), fid_num_samples samples (labels
  # cycling over the classes) against the reference batch, features from the FID
  # Inception weights file; latent models decode with sample.vae.
  c.eval.fid_every = 0
  c.eval.fid_num_samples = 10_000
  c.eval.reference = ""  # ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz
  c.eval.inception = ""  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or the TF .pb)
  return c


def config_file(name: str) -> str:
  """The file of a config: an existing path, or a preset shipped with the package.

  ``"configs/digits.py"`` (relative to the working directory, what ``--config=``
  takes), ``"digits.py"`` or just ``"digits"`` all name the packaged
  ``configs/digits.py`` when no such file exists where you are (notebooks run
  anywhere; the presets are installed as ``deepflow_jax.configs``).
  """
  if os.path.isfile(name):
    return name
  base = os.path.basename(name)
  base = base if base.endswith(".py") else base + ".py"
  packaged = os.path.join(os.path.dirname(os.path.abspath(configs_pkg.__file__)), base)
  if os.path.isfile(packaged):
    return packaged
  known = sorted(f[:-3] for f in os.listdir(os.path.dirname(packaged))
                 if f.endswith(".py") and not f.startswith("_"))
  raise UserError(f"{name}: no such config file (packaged presets: {', '.join(known)})")


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
  """Loads a config (``configs/x.py[:arg]``, ``x.py`` or ``x``) and applies dotted overrides.

  For notebooks: ``load_config("digits", **{"train.num_steps": 300})`` or
  ``load_config("xl3t:sit")``; ``path`` may be anything ``config_file`` accepts.
  """
  path, _, arg = str(path).partition(":")
  path = config_file(path)
  spec = importlib.util.spec_from_file_location(
      "deepflow_jax_config_" + os.path.basename(path).removesuffix(".py"), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for k in parents:
      node = node[k] if k in node else None
      if not isinstance(node, ml_collections.ConfigDict):
        raise UserError(f"unknown config key {key!r}")
    if leaf not in node:
      raise UserError(f"unknown config key {key!r}")
    node[leaf] = value
  return config


def sit_baseline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same setup as plain SiT: no splits, one velocity head with weight 1."""
  config.model.preset = f"{config.model.preset} as SiT (no splits)"
  config.model.df_idxs = ()
  config.loss.scale_weight = (1.0,)
  return config


def ssl_alignment(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The reference's SSL run (REPA): each split's tokens (after its VeRA block) projected
  by an MLP (width 2048) to 768 and aligned with DINOv2-B/14 patch features of the clean
  image (negative cosine, weight 0.5); the reference enables legacy_scaling (the VeRA
  scale soft-cap) with SSL alignment. The weights file is named by
  ``--config.model.encoder_path=dinov2_vitb14_pretrain.pth``."""
  config.model.ssl_align = True
  config.model.projector_dim = 2048
  config.model.z_dim = 768
  config.model.legacy_scaling = True
  config.loss.proj_coeff = 0.5
  return config


def _all_keys(node, path="") -> list[str]:
  out = []
  for k in node.keys():
    if isinstance(node[k], ml_collections.ConfigDict):
      out += _all_keys(node[k], f"{path}{k}.")
    else:
      out.append(f"{path}{k}")
  return out


def nearest_key(key: str) -> str | None:
  """The known config key (``a.b``) closest to ``key``, or None."""
  near = difflib.get_close_matches(key, _all_keys(base_config()), n=1)
  return near[0] if near else None


def unknown_keys(keys) -> list[str]:
  """Those of ``keys`` (dotted, e.g. ``train.num_steps``) that no config has."""
  known = set(_all_keys(base_config()))
  return [k for k in keys if k not in known]


def _known(node, ref, path=""):
  for k in node.keys():
    full = f"{path}{k}"
    if k not in ref:
      near = nearest_key(full)
      hint = f" (did you mean {near}?)" if near else ""
      raise UserError(f"unknown config key {full!r}{hint}")
    if isinstance(node[k], ml_collections.ConfigDict):
      _known(node[k], ref[k], full + ".")


def set_preset(config, name: str) -> ml_collections.ConfigDict:
  """Copies a named preset's architecture into ``config.model`` (used by config files)."""
  if name not in PRESETS:
    raise UserError(f"model preset {name!r} is not known ({', '.join(PRESETS)})")
  config.model.preset = name
  for k, v in PRESETS[name].items():
    config.model[k] = v
  return config


_CHOICES = (("model.dtype", ("auto",) + tuple(_DTYPES)), ("model.param_dtype", tuple(_DTYPES)),
            ("model.attention_impl", ("", "xla", "cudnn")),
            ("model.remat", ("none", "block", "dots")),
            ("loss.weighting", ("lognormal", "uniform")), ("loss.path_type", ("linear", "cosine")),
            ("optim.schedule", ("constant", "cosine")),
            ("distributed.initialize", ("auto", "always", "never")))
_MINIMA = (("train.num_steps", 0), ("train.log_every", 1), ("train.ckpt_every", 1),
           ("train.keep_ckpts", 1), ("train.sample_every", 0), ("train.max_skip_streak", 0),
           ("train.loss_spike_window", 1), ("train.max_rollbacks", 0), ("optim.warmup_steps", 0),
           ("sample.grid_per_class", 1), ("sample.grid_classes", 0), ("eval.num_samples", 0),
           ("eval.batch_size", 1), ("eval.fid_every", 0), ("eval.fid_num_samples", 4))
_NON_NEGATIVE = ("train.loss_spike_factor", "optim.learning_rate", "optim.weight_decay", "optim.grad_clip", "loss.beta",
                 "loss.acc_coeff", "loss.proj_coeff")


def _value(config, key: str):
  sec, name = key.split(".")
  return config[sec][name]


def _value_problems(config) -> list[str]:
  """Names outside their choices, numbers below their minimum, NaN or negative weights."""
  out = [f"{k}={_value(config, k)!r} is not one of {allowed}" for k, allowed in _CHOICES
         if _value(config, k) not in allowed]
  out += [f"{k}={_value(config, k)} must be >= {lo}" for k, lo in _MINIMA
          if _value(config, k) < lo]
  out += [f"{k}={_value(config, k)} must be >= 0" for k in _NON_NEGATIVE
          if not _value(config, k) >= 0]  # also refuses NaN
  return out


def _train_problems(config) -> list[str]:
  t, o, out = config.train, config.optim, []
  if t.global_batch_size <= 0 or t.global_batch_size % max(t.grad_accum_steps, 1):
    out.append(f"train.global_batch_size={t.global_batch_size} must be a positive multiple "
               f"of train.grad_accum_steps={t.grad_accum_steps}")
  if t.grad_accum_steps < 1:
    out.append(f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
  if not 0 <= t.ema_decay < 1:
    out.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
  if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1 and o.eps > 0):
    out.append(f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1) and optim.eps={o.eps} > 0")
  cache = t.compile_cache_dir
  if cache not in ("", "none") and os.path.exists(cache) and not os.path.isdir(cache):
    out.append(f"train.compile_cache_dir={cache!r} exists and is not a directory (use a "
               "directory, \"\" for WORKDIR/.jax_cache or \"none\" to turn the cache off)")
  if config.mesh.data == 0 or config.mesh.fsdp < -1:
    out.append(f"mesh.data={config.mesh.data} must be positive or -1 and mesh.fsdp="
               f"{config.mesh.fsdp} positive, -1 or 0 (auto: the smallest that fits)")
  return out


def _data_problems(config) -> list[str]:
  """The data config's own checks (``data.config.check``) and how it fits the model."""
  m, d, out = config.model, config.data, []
  try:
    data_config.check(d)
  except UserError as e:
    out.append(str(e))
  if d.name == "digits":
    if m.in_channels != 1:
      out.append(f"data.name='digits' is 1-channel pixel data; model.in_channels={m.in_channels}")
    if m.input_size != d.image_size:
      out.append(f"model.input_size={m.input_size} differs from data.image_size={d.image_size}")
  return out


def _eval_problems(config) -> list[str]:
  e, out = config.eval, []
  if e.fid_every > 0:
    for key in ("reference", "inception"):
      if not e[key]:
        out.append(f"eval.fid_every={e.fid_every} needs eval.{key}")
      elif not os.path.isfile(e[key]):
        out.append(f"eval.{key}={e[key]!r}: no such file")
    if config.model.in_channels not in (1, 3) and not config.sample.vae:
      out.append("eval.fid_every > 0 on a latent model needs sample.vae to decode samples")
  return out


def _alignment_problems(config, idxs: list[int], files: bool = True) -> list[str]:
  m, out = config.model, []
  if not m.ssl_align:
    return out
  if not idxs:
    out.append("model.ssl_align=True aligns each split's tokens, but model.df_idxs=() has no "
               "splits")
  if config.data.name == "digits":
    out.append("model.ssl_align=True needs latent data with raw images (data.name 'repa' or "
               "'arrayrecord'), not 'digits'")
  if files and not m.encoder_path:
    out.append("model.ssl_align=True needs model.encoder_path: the DINOv2 weights file (e.g. "
               "dinov2_vitb14_pretrain.pth)")
  elif files and not os.path.isfile(m.encoder_path):
    out.append(f"model.encoder_path={m.encoder_path!r}: no such file")
  if m.encoder_num_heads < 0:
    out.append(f"model.encoder_num_heads={m.encoder_num_heads} must be >= 0 (0: by width)")
  return out


def validate(config, *, files: bool = True) -> None:
  """Refuses unknown or inconsistent values, naming each, before anything is built.

  ``files=False`` leaves out what only a run reads (the SSL encoder's weights,
  FID's reference and Inception files): ``python -m deepflow_jax.plan`` compiles
  without them.

  Runs the sampler's own check (``sampling.SamplerSettings.problems``, which
  names the nearest valid sampler or grid) and the data config's
  (``data.config.check``), so the command line and the library refuse the same
  mistakes with the same words.
  """
  _known(config, base_config())
  m = config.model
  try:
    idxs = [int(i) for i in m.df_idxs]
    weights = [float(w) for w in config.loss.scale_weight]
  except (TypeError, ValueError):
    raise UserError(f"invalid config: model.df_idxs={m.df_idxs!r} and loss.scale_weight="
                    f"{config.loss.scale_weight!r} must be tuples of numbers, e.g. "
                    "--config.model.df_idxs='(8, 16)'") from None
  problems = architecture_problems(m, prefix="model.")
  if len(weights) != len(idxs) + 1:
    problems.append(f"loss.scale_weight={tuple(weights)} has {len(weights)} weights but "
                    f"model.df_idxs={idxs} makes {len(idxs) + 1} branches")
  if any(not w >= 0 for w in weights):
    problems.append(f"loss.scale_weight={tuple(weights)} must be non-negative")
  problems += _value_problems(config) + _train_problems(config)
  problems += sampling.SamplerSettings.from_config(config.sample).problems(
      prefix="sample.", accel_heads=bool(idxs))
  problems += (_eval_problems(config) if files else []) + _data_problems(config)
  problems += _alignment_problems(config, idxs, files)
  if problems:
    raise UserError("invalid config: " + "; ".join(problems))


def with_mesh_fsdp(config, fsdp: int):
  """A copy of ``config`` with ``mesh.fsdp`` set (``mesh.data`` -1: the rest)."""
  c = config.copy_and_resolve_references()
  c.mesh.fsdp = int(fsdp)
  if int(fsdp) != int(config.mesh.fsdp):
    c.mesh.data = -1
  return c


def to_json_dict(config) -> dict:
  """The resolved config as JSON-able data (tuples become lists)."""
  return json.loads(config.to_json())
