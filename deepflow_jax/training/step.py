"""Train state, optimiser and the mesh-sharded, jitted train step.

``Trainer`` owns the model, the optimiser, the mesh and the shardings:

* ``trainer.init_state()`` builds the state directly in its sharded layout
  (parameters, EMA parameters, AdamW state, step, RNG);
* ``trainer.step(state, batch)`` is one ``jax.jit`` with explicit in/out
  shardings and the state donated;
* ``trainer.abstract_state`` (shapes + shardings) is what checkpoints restore into;
* ``trainer.programs(global_batch_size)`` names the jitted programs with abstract
  inputs (``Program``): what ``deepflow_jax.planning`` and ``scripts/bench_train.py``
  lower and compile without allocating anything.

The batch is either pixels ``{"image", "label"}`` or stored VAE moments
``{"mean", "std", "label"}``; for the latter the step draws
``z = (mean + std * eps) * latent_scale`` with its own RNG (``latent_scale`` from the
dataset's metadata, ``data.pipeline.DatasetInfo.latent_scale``).

SSL alignment (``model.ssl_align``, REPA; ``deepflow_jax.training.alignment``):
the batch also carries the raw images, ``"image"`` uint8 (B, H, W, 3), and the
Trainer holds a frozen DINOv2 whose patch features, computed inside the jitted
step, are the projection loss's targets. The encoder parameters are a third,
replicated, non-differentiated argument of the jitted step: not part of the train
state and not checkpointed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepflow_jax import losses
from deepflow_jax import sharding as shd
from deepflow_jax.errors import UserError
from deepflow_jax.models import dinov2
from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.models.vae import LATENT_SCALE
from deepflow_jax.training.alignment import alignment_features


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; each step folds in its step number
  skipped_steps: jax.Array  # int32 scalar: steps whose update was dropped (non-finite)
  skip_streak: jax.Array  # int32 scalar: consecutive dropped steps up to this one


def learning_rate_schedule(config) -> optax.Schedule:
  o, total = config.optim, int(config.train.num_steps)
  warm = int(o.warmup_steps)
  if o.schedule == "cosine":
    main = optax.cosine_decay_schedule(o.learning_rate, max(total - warm, 1))
  else:
    main = optax.constant_schedule(o.learning_rate)
  if warm > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warm), main], [warm])
  return main


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, as the reference (torch AdamW + clip_grad_norm_)."""
  o = config.optim
  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay))
  return optax.chain(*chain)


def loss_config(config) -> losses.LossConfig:
  l = config.loss
  return losses.LossConfig(weighting=l.weighting, path_type=l.path_type, beta=float(l.beta),
                           scale_weight=tuple(float(w) for w in l.scale_weight),
                           acc_coeff=float(l.acc_coeff), proj_coeff=float(l.proj_coeff))


# Largest parameter count for which the CPU initialiser is compiled without LLVM
# optimisation: XLA's CPU compile time grows with the number of parameter arrays
# (each is its own kernel) and -O0 cuts it ~3x, but -O0 kernels draw random numbers
# ~5x slower, which outweighs the saving past ~10^8 parameters (DeepFlow-XL at
# 8x8 latents on 2 CPU cores: compile 24 -> 16 s, run 13 -> 65 s).
INIT_O0_MAX_CPU_PARAMS = 50_000_000


def init_compiler_options(platform: str, num_params: int) -> dict[str, Any]:
  """XLA options for the one-off programs that create a fresh state.

  These programs run once, so their compile time matters more than their speed:
  on GPUs and for CPU models under ``INIT_O0_MAX_CPU_PARAMS`` parameters they are
  compiled with ``xla_backend_optimization_level=0``; otherwise (big CPU models,
  TPUs) with XLA's defaults.
  """
  if platform == "gpu" or (platform == "cpu" and num_params <= INIT_O0_MAX_CPU_PARAMS):
    return {"xla_backend_optimization_level": 0}
  return {}


def batch_keys(latent: bool, images: bool = False) -> tuple[str, ...]:
  """The keys of a training batch: latent moments (+ raw images for SSL alignment) or pixels."""
  if latent:
    return ("mean", "std", "label") + (("image",) if images else ())
  return ("image", "label")


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted function and the abstract arguments (shapes, dtypes, shardings) it runs on."""
  name: str
  fn: Any  # the jax.jit-wrapped function main calls
  args: tuple

  def lower(self):
    return self.fn.lower(*self.args)


def _is_abstract(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@dataclasses.dataclass
class Trainer:
  config: Any
  model: DeepFlow
  mesh: Any
  latent: bool  # batches hold VAE moments (True) or pixels (False)
  latent_scale: float = LATENT_SCALE  # z = (mean + std * eps) * latent_scale (the dataset's)
  # SSL alignment (model.ssl_align): the frozen image encoder and its parameters
  # (load_alignment_encoder); batches then also hold "image". Abstract parameters
  # (ShapeDtypeStructs: planning) are given the replicated sharding, nothing is allocated.
  encoder: Optional[dinov2.DinoVisionTransformer] = None
  encoder_params: Any = None
  # XLA options for the fresh-state programs (init_state, state_from_params);
  # None: init_compiler_options for the mesh's platform and the parameter count.
  init_options: Optional[dict[str, Any]] = None

  def __post_init__(self):
    self.tx = make_optimizer(self.config)
    self.schedule = learning_rate_schedule(self.config)
    self.loss_cfg = loss_config(self.config)
    self.rules = shd.rules_from_config(self.config)
    boxed = jax.eval_shape(self._init_boxed, jax.random.key_data(jax.random.key(0)))
    self.state_shardings = shd.logical_shardings(boxed, self.mesh, self.rules)
    shapes = nn.unbox(boxed)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
        self.state_shardings)
    self.images = self.encoder is not None
    if bool(self.model.ssl_align) != self.images:
      raise UserError("model.ssl_align and the alignment encoder go together: "
                      f"ssl_align={bool(self.model.ssl_align)}, encoder given: {self.images}")
    if self.images and not self.latent:
      raise UserError("SSL alignment needs latent data with raw images (pixel batches' "
                      "'image' is the model's input)")
    self.batch_shardings = {
        k: shd.batch_sharding(self.mesh, 1 if k == "label" else 4)
        for k in batch_keys(self.latent, self.images)
    }
    # The frozen encoder's parameters: replicated, passed to every step, never trained.
    repl = shd.replicated(self.mesh)
    if not self.images:
      self.encoder_params = {}
    elif _is_abstract(self.encoder_params):
      self.encoder_params = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), self.encoder_params)
    else:
      self.encoder_params = jax.device_put(self.encoder_params, repl)
    # The train step and the fresh-state initialiser: the programs main runs
    # (``programs`` gives them with abstract inputs).
    self.jitted_step = jax.jit(self._train_step,
                         in_shardings=(self.state_shardings, self.batch_shardings,
                                       shd.replicated(self.mesh)),
                         out_shardings=(self.state_shardings, shd.replicated(self.mesh)),
                         donate_argnums=(0,))
    # The fresh state is created directly in its sharded layout. The model's forward
    # pass inside model.init is dead code that JAX drops before XLA sees it (the HLO
    # equals that of a shapes-only init); what remains is one random-number kernel
    # per parameter array, compiled with init_options.
    if self.init_options is None:
      n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes.params))
      self.init_options = init_compiler_options(self.mesh.devices.flat[0].platform, n_params)
    self.jitted_init = jax.jit(lambda key: nn.unbox(self._init_boxed(key)),
                         out_shardings=self.state_shardings, compiler_options=self.init_options)
    self._finite = None  # state_is_finite's program, compiled at first use
    self._from_params = jax.jit(self._state_with_params,
                                in_shardings=(self.state_shardings.params, None),
                                out_shardings=self.state_shardings,
                                compiler_options=self.init_options)

  # -- state ---------------------------------------------------------------

  def _dummy_inputs(self, n=1):
    m = self.model
    x = jnp.zeros((n, m.input_size, m.input_size, m.in_channels), jnp.float32)
    return x, [jnp.zeros((n,), jnp.float32)] * m.num_branches, jnp.zeros((n,), jnp.int32)

  def _init_boxed(self, key_data):
    key = jax.random.wrap_key_data(key_data)
    k_init, k_state = jax.random.split(key)
    params = self.model.init({"params": k_init}, *self._dummy_inputs())["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=self.tx.init(params),
        rng=jax.random.key_data(k_state),
        skipped_steps=jnp.zeros((), jnp.int32),
        skip_streak=jnp.zeros((), jnp.int32),
    )

  def _state_with_params(self, params, key_data):
    _, k_state = jax.random.split(jax.random.wrap_key_data(key_data))  # as _init_boxed
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params), opt_state=self.tx.init(params),
                      rng=jax.random.key_data(k_state), skipped_steps=jnp.zeros((), jnp.int32),
                      skip_streak=jnp.zeros((), jnp.int32))

  def init_state(self, seed: int) -> TrainState:
    """A fresh, sharded state; parameters initialised as the reference."""
    return self.jitted_init(jax.random.key_data(jax.random.key(seed)))

  def state_from_params(self, params, seed: int) -> TrainState:
    """A fresh state whose parameters and EMA start from given weights (fine-tuning)."""
    want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(
        nn.unbox(self.abstract_state.params)).items()}
    got = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(params).items()}
    if want != got:
      missing = sorted("/".join(k) for k in set(want) - set(got))
      extra = sorted("/".join(k) for k in set(got) - set(want))
      shape = sorted("/".join(k) for k in set(want) & set(got) if want[k] != got[k])
      raise UserError(f"init_from weights do not fit the configured model: missing {missing[:5]}, "
                      f"unexpected {extra[:5]}, mis-shaped {shape[:5]}")
    # Zero AdamW moments, the EMA a copy, the step RNG as init_state(seed) draws it;
    # no random parameters are drawn only to be replaced.
    params = jax.tree.map(lambda v, s: jax.device_put(jnp.asarray(v, s.dtype), s.sharding),
                          params, self.abstract_state.params)
    return self._from_params(params, jax.random.key_data(jax.random.key(seed)))

  # -- step ----------------------------------------------------------------

  def _x0(self, batch, key):
    if self.latent:
      eps = jax.random.normal(key, batch["mean"].shape, jnp.float32)
      return (batch["mean"] + batch["std"] * eps) * float(self.latent_scale)
    return batch["image"].astype(jnp.float32)

  def _loss(self, params, batch, key, encoder_params):
    k_latent, k_loss, k_drop = jax.random.split(key, 3)
    x0 = self._x0(batch, k_latent)
    y = batch["label"].astype(jnp.int32)
    draws = losses.draw_loss_randomness(k_loss, x0.shape, self.model.num_branches,
                                        self.loss_cfg.weighting)

    def apply_fn(x, t, y):
      return self.model.apply({"params": params}, x, t, y, train=True,
                              rngs={"label_dropout": k_drop})

    features = (alignment_features(self.encoder, encoder_params, batch["image"])
                if self.images else None)
    total, terms = losses.deepflow_loss(apply_fn, x0, y, draws, self.loss_cfg,
                                        encoder_features=features)
    metrics = {"loss": total, "loss_denoise": terms["denoise"], "loss_acc": terms["acc"],
               "loss_proj": terms["proj"]}
    for j in range(terms["denoise_branch"].shape[0]):
      metrics[f"loss_denoise_branch{j}"] = jnp.mean(terms["denoise_branch"][j])
    for j in range(terms["acc_branch"].shape[0]):
      metrics[f"loss_acc_branch{j}"] = jnp.mean(terms["acc_branch"][j])
    return total, metrics

  def _grads(self, params, batch, key, encoder_params):
    accum = int(self.config.train.grad_accum_steps)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)  # w.r.t. params only
    if accum == 1:
      (_, metrics), grads = grad_fn(params, batch, key, encoder_params)
      return grads, metrics

    # Micro-batch i takes rows i, i + accum, ...: every device keeps an equal share.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    micro = jax.tree.map(split, batch)

    def body(carry, inp):
      i, mb = inp
      mb = {k: jax.lax.with_sharding_constraint(v, self.batch_shardings[k]) for k, v in mb.items()}
      (_, m), g = grad_fn(params, mb, jax.random.fold_in(key, i), encoder_params)
      acc_g, acc_m = carry
      return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_m, m)), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    _, m0 = jax.eval_shape(self._loss, params, jax.tree.map(lambda x: x[0], micro), key,
                           encoder_params)
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    (g, m), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(accum), micro))
    return jax.tree.map(lambda x: x / accum, g), jax.tree.map(lambda x: x / accum, m)

  def _train_step(self, state: TrainState, batch, encoder_params):
    """One update; an update whose loss or gradients are not finite is dropped.

    A dropped (skipped) step leaves parameters, EMA and optimiser state as they
    were (selected with ``jnp.where`` inside the step: no host sync) but still
    counts: ``step`` advances with the batch it read, ``skipped_steps`` and
    ``skip_streak`` (consecutive skips, 0 after a good step) record it and are
    logged with the metrics. ``training.loop`` rolls back on a long streak.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, metrics = self._grads(state.params, batch, key, encoder_params)
    grad_norm = optax.tree.norm(grads)
    # The global norm is non-finite when any gradient is; the loss covers the rest.
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = float(self.config.train.ema_decay)
    ema = jax.tree.map(lambda e, p: e * d + (1 - d) * p, state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    skipped = state.skipped_steps + jnp.where(ok, 0, 1).astype(jnp.int32)
    streak = jnp.where(ok, 0, state.skip_streak + 1).astype(jnp.int32)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = self.schedule(state.step)
    metrics["skipped_steps"] = skipped
    metrics["skip_streak"] = streak
    new = state.replace(step=state.step + 1, params=keep(params, state.params),
                        ema_params=keep(ema, state.ema_params),
                        opt_state=keep(opt_state, state.opt_state), skipped_steps=skipped,
                        skip_streak=streak)
    return new, metrics

  def state_is_finite(self, state: TrainState) -> bool:
    """True when every parameter and EMA value is finite (one small device reduction)."""
    if self._finite is None:
      def finite(params, ema):
        leaves = [x for x in jax.tree.leaves((params, ema))
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
      self._finite = jax.jit(finite, out_shardings=shd.replicated(self.mesh))
    return bool(jax.device_get(self._finite(state.params, state.ema_params)))

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    return self.jitted_step(state, batch, self.encoder_params)

  # -- abstract programs ---------------------------------------------------

  def abstract_batch(self, global_batch_size: int, image_side: int = 0,
                     moments_dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch main feeds the step, as shapes with the step's shardings.

    Latent batches: ``mean``/``std`` (B, H, W, C) ``moments_dtype`` and, with SSL
    alignment, ``image`` uint8 (B, R, R, 3) with ``R = image_side`` (default: 8 x
    the latent side, the SD-VAE's); pixel batches: ``image`` float32.
    """
    m, b = self.model, int(global_batch_size)
    side = (m.input_size, m.input_size, m.in_channels)
    r = int(image_side) or 8 * m.input_size
    shapes = {"label": ((b,), jnp.int32)}
    if self.latent:
      shapes.update(mean=((b,) + side, moments_dtype), std=((b,) + side, moments_dtype))
      if self.images:
        shapes["image"] = ((b, r, r, 3), jnp.uint8)
    else:
      shapes["image"] = ((b,) + side, jnp.float32)
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=self.batch_shardings[k])
            for k in batch_keys(self.latent, self.images)}

  def programs(self, global_batch_size: int, **batch_kw) -> dict[str, Program]:
    """``{"train_step", "init"}``: the jitted programs main runs, on abstract inputs.

    ``train_step`` is ``jitted_step`` (state donated) on ``abstract_state``,
    ``abstract_batch(global_batch_size, **batch_kw)`` and the encoder parameters;
    ``init`` is ``jitted_init`` on a raw key. ``program.lower().compile()``
    compiles either without allocating device memory (any backend, including a
    compile-only TPU topology).
    """
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return {
        "train_step": Program("train_step", self.jitted_step,
                              (self.abstract_state,
                               self.abstract_batch(global_batch_size, **batch_kw),
                               self.encoder_params)),
        "init": Program("init", self.jitted_init, (key,)),
    }

  def global_batch(self, local_batch: dict) -> dict:
    return shd.global_batch({k: local_batch[k] for k in batch_keys(self.latent, self.images)},
                            self.mesh)
