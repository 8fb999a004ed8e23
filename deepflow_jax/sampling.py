"""Samplers for DeepFlow: the reference's Euler-Maruyama SDE and two ODE samplers.

Library use::

    from deepflow_jax.sampling import sample
    x = sample(model, params, latents, labels, sampler="sde", num_steps=250,
               cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7,
               rng=jax.random.key(0))                        # (N, H, W, C) float32

Every sampler integrates the linear-path flow from t = 1 (noise) to t = 0 (data)
with the network's final velocity: all K branches receive the same time (the
time gap fed to every VeRA block is 0) and only the last velocity head is
evaluated (``DeepFlow.velocity``), so intermediate velocity heads, the
acceleration head and the REPA projectors are never computed while sampling.

Samplers (``sampler=``):

* ``"sde"``: Euler-Maruyama, exactly the reference's sampler (``docs/architecture.md``).
  Time grid ``linspace(1, 0.04, num_steps)`` followed by 0. From the velocity
  ``v`` at ``(x, t)``: score ``s = -((1 - t) v + x) / t``, diffusion ``g = 2t``,
  drift ``d = v - (g / 2) s = v - t s``. The first ``num_steps - 1`` steps do
  ``x += d dt + sqrt(2t) sqrt(|dt|) eps`` (``dt < 0``); the last step
  ``0.04 -> 0`` is deterministic, ``x += d dt``. ``num_steps`` model evaluations.
* ``"euler"``: the probability-flow ODE ``dx/dt = v`` with explicit Euler on
  ``linspace(1, 0, num_steps + 1)``. ``num_steps`` model evaluations.
* ``"heun"``: the same ODE and grid with Heun's second-order method (Euler
  predictor, trapezoidal corrector). The final step, which ends at ``t = 0``, is
  a plain Euler step (no corrector evaluation at ``t = 0``), the convention of
  the SiT/REPA ODE samplers. ``2 num_steps - 1`` model evaluations.

Classifier-free guidance (``cfg_scale = w``): a step whose start time ``t_cur``
satisfies ``w > 1`` and ``guidance_low <= t_cur <= guidance_high`` (inclusive,
as the reference) runs the network once on ``[x; x]`` with labels
``[y; null]`` (``null = model.num_classes``) and combines
``u + w (c - u)``; on the drift for the SDE (as the reference), on the velocity
for the ODE samplers (Heun's corrector follows the decision of its step's
``t_cur``). Every other step runs the network on ``x`` with ``y`` only: a
``jax.lax.cond`` inside the loop, so unguided steps really run the smaller
batch. As in the reference, ``w <= 1`` means no guidance at all (``w = 1`` is
the unguided sampler, not an extra batch). The guided batch interleaves the
conditional and unconditional row of each sample (rows ``2i, 2i + 1``), so a
batch sharded over devices never moves rows between devices.

Numerics: the reference keeps its state ``x`` in float64 and runs the model in
the latents' dtype. Here the state, drift and noise are float32 and the model
runs in its own ``dtype`` (its input is cast by the model); the time grid and
the per-step constants ``dt``, ``sqrt(2t)``, ``sqrt(|dt|)`` are computed in
float64 on the host, then rounded to float32. Against the reference's float64
state this costs ~1e-6 relative error on tiny2t (see ``tests/test_sampling.py``).
Guidance intervals are compared in float32; a float64 bound that rounds onto a
grid time may count as inside the interval where the reference's float64
comparison would not (only when they differ by less than a float32 ulp).

Compilation: the whole loop (``jax.lax.fori_loop``) is one jitted function per
``(model, sampler, num_steps, noise mode)``; the CFG scale, the guidance
interval, labels, latents, noise keys and parameters are traced arguments, so
changing them does not recompile (shapes and dtypes must stay the same).
``make_sampler`` returns the un-jitted pure function for callers who jit it
themselves (e.g. with explicit shardings, see ``deepflow_jax.generate``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepflow_jax import sharding as shd
from deepflow_jax.progress import Progress

SAMPLERS = ("sde", "euler", "heun")
SDE_T_END = 0.04  # last grid time before 0 of the reference's Euler-Maruyama sampler
LABEL_MODES = ("random", "cycle")


def time_grid(sampler: str, num_steps: int) -> np.ndarray:
  """The sampler's times, float64, decreasing from 1 to 0.

  ``sde``: ``linspace(1, 0.04, num_steps)`` then 0 (``num_steps + 1`` values);
  ``euler`` / ``heun``: ``linspace(1, 0, num_steps + 1)``.
  """
  _check_sampler(sampler, num_steps)
  if sampler == "sde":
    return np.concatenate([np.linspace(1.0, SDE_T_END, num_steps, dtype=np.float64), [0.0]])
  return np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)


def _check_sampler(sampler: str, num_steps: int) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def step_problems(sampler: str, num_steps, flag: str = "num_steps") -> list[str]:
  """What is wrong with ``num_steps`` for ``sampler`` (empty when valid), named by ``flag``."""
  if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
    return [f"{flag} must be a positive integer for the {sampler} sampler, got {num_steps!r}"]
  return []


def guidance_problems(cfg_scale, guidance_low, guidance_high, prefix: str = "") -> list[str]:
  """What is wrong with a guidance setting (empty when valid), named with ``prefix``."""
  out = []
  if not np.isfinite([cfg_scale, guidance_low, guidance_high]).all():
    out.append(f"{prefix}cfg_scale, {prefix}guidance_low and {prefix}guidance_high must be finite")
  elif guidance_low > guidance_high:
    out.append(f"{prefix}guidance_low={guidance_low} is above {prefix}guidance_high="
               f"{guidance_high}: guidance would never apply (the interval is "
               f"[{prefix}guidance_low, {prefix}guidance_high] in t, 1 = noise, 0 = data)")
  elif cfg_scale < 0:
    out.append(f"{prefix}cfg_scale={cfg_scale} must be >= 0 (<= 1 means no guidance)")
  return out


def num_noise_draws(sampler: str, num_steps: int) -> int:
  """How many Gaussian draws per sample the sampler uses (``num_steps - 1`` for ``sde``, else 0)."""
  _check_sampler(sampler, num_steps)
  return num_steps - 1 if sampler == "sde" else 0


def _f32(a) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float64).astype(np.float32))


def _pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """Interleaves two (N, ...) arrays into (2N, ...): rows a_0, b_0, a_1, b_1, ..."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _unpair(ab: jax.Array) -> tuple[jax.Array, jax.Array]:
  ab = ab.reshape((ab.shape[0] // 2, 2) + ab.shape[1:])
  return ab[:, 0], ab[:, 1]


def sde_drift(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
  """Drift of the reverse SDE from the velocity (linear path): d = v - t s, s = -((1-t) v + x) / t."""
  score = -((1 - t) * v + x) / t
  return v - t * score


def make_sampler(model, sampler: str = "sde", num_steps: int = 250, *,
                 noise_input: bool = False) -> Callable[..., jax.Array]:
  """The sampler as a pure, un-jitted function.

  Returns ``f(params, latents, labels, noise, cfg_scale, guidance_low,
  guidance_high) -> samples`` with ``latents`` (N, H, W, C) float32, ``labels``
  (N,) int32, scalars as float32 arrays, and ``noise``:

  * ``noise_input=False``: per-sample typed PRNG keys (N,); step ``i`` of sample
    ``n`` uses ``normal(fold_in(keys[n], i), (H, W, C))``, so a sample's noise
    depends on its own key only (not on the batch it is in);
  * ``noise_input=True``: the Gaussian draws themselves, (num_steps - 1, N, H, W, C);
  * ignored (pass ``None``) by the ODE samplers.
  """
  _check_sampler(sampler, num_steps)
  ts64 = time_grid(sampler, num_steps)
  dt64 = ts64[1:] - ts64[:-1]
  ts, dts = _f32(ts64), _f32(dt64)
  sqrt_g = _f32(np.sqrt(2.0 * ts64))  # sqrt(diffusion) = sqrt(2 t)
  sqrt_dt = _f32(np.sqrt(np.abs(dt64)))
  null = int(model.num_classes)

  def f(params, latents, labels, noise, cfg_scale, guidance_low, guidance_high):
    x0 = jnp.asarray(latents, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    w = jnp.asarray(cfg_scale, jnp.float32)
    lo = jnp.asarray(guidance_low, jnp.float32)
    hi = jnp.asarray(guidance_high, jnp.float32)
    y_pair = _pair(y, jnp.full_like(y, null))

    def velocity(x, t, labels_):
      tt = jnp.full((x.shape[0],), t, jnp.float32)
      v = model.apply({"params": params}, x, tt, labels_, method=model.velocity)
      return v.astype(jnp.float32)

    def field(x, t, t_guide, to_field):
      """to_field(v, x, t) (drift or velocity), guided when t_guide is in the interval."""

      def guided(x):
        xx = _pair(x, x)
        cond, uncond = _unpair(to_field(velocity(xx, t, y_pair), xx, t))
        return uncond + w * (cond - uncond)

      def plain(x):
        return to_field(velocity(x, t, y), x, t)

      use_cfg = (w > 1.0) & (lo <= t_guide) & (t_guide <= hi)
      return jax.lax.cond(use_cfg, guided, plain, x)

    if sampler == "sde":
      if noise_input:
        def eps_at(i):
          return jnp.asarray(jax.lax.dynamic_index_in_dim(noise, i, 0, keepdims=False),
                         jnp.float32)
      else:
        keys = noise

        def eps_at(i):
          return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x0.shape[1:],
                                                      jnp.float32))(keys)

      def step(i, x):
        t = ts[i]
        d = field(x, t, t, sde_drift)
        return x + d * dts[i] + sqrt_g[i] * (eps_at(i) * sqrt_dt[i])

      # With num_steps == 1 there is only the deterministic last step (no noise).
      x = jax.lax.fori_loop(0, num_steps - 1, step, x0) if num_steps > 1 else x0
      last = num_steps - 1
      return x + dts[last] * field(x, ts[last], ts[last], sde_drift)

    identity = lambda v, x, t: v

    if sampler == "euler":
      def step(i, x):
        return x + dts[i] * field(x, ts[i], ts[i], identity)

      return jax.lax.fori_loop(0, num_steps, step, x0)

    # heun: num_steps - 1 predictor-corrector steps, then one Euler step to t = 0.
    def heun_step(i, x):
      t, t_next, dt = ts[i], ts[i + 1], dts[i]
      v = field(x, t, t, identity)
      x_pred = x + dt * v
      v_next = field(x_pred, t_next, t, identity)
      return x + dt * (0.5 * v + 0.5 * v_next)

    x = jax.lax.fori_loop(0, num_steps - 1, heun_step, x0)
    last = num_steps - 1
    return x + dts[last] * field(x, ts[last], ts[last], identity)

  return f


@functools.lru_cache(maxsize=64)
def jitted_sampler(model, sampler: str, num_steps: int, noise_input: bool = False):
  """``jax.jit(make_sampler(...))``, cached per (model, sampler, num_steps, noise_input)."""
  return jax.jit(make_sampler(model, sampler, num_steps, noise_input=noise_input))


def _as_keys(rng, n: int) -> jax.Array:
  """A key (typed or raw uint32[2]) -> n per-sample typed keys; (n,) keys pass through."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return jax.random.split(rng, n)
  if rng.shape != (n,):
    raise ValueError(f"rng must be one key or {n} per-sample keys, got key shape {rng.shape}")
  return rng


def sample(model, params, latents, labels, *, sampler: str = "sde", num_steps: int = 250,
           cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
           rng: Optional[Any] = None, noise: Optional[Any] = None) -> jax.Array:
  """Draws samples; returns the final state (N, H, W, C) float32 (NHWC).

  Args:
    model: a ``DeepFlow`` module.
    params: its parameters (e.g. EMA weights).
    latents: the starting noise at t = 1, (N, H, W, C).
    labels: (N,) class ids in ``[0, num_classes]`` (``num_classes`` = null label).
    sampler: ``"sde"`` (the reference's Euler-Maruyama), ``"euler"`` or ``"heun"``
      (probability-flow ODE); see the module docstring for grids and step counts.
    num_steps: number of grid intervals (static: a new value compiles anew).
    cfg_scale: guidance scale ``w``; ``w <= 1`` disables guidance (as the reference).
    guidance_low, guidance_high: guidance is applied on steps whose start time
      ``t_cur`` satisfies ``guidance_low <= t_cur <= guidance_high``.
    rng: for ``sde``: a PRNG key (split into one key per sample) or N per-sample
      keys; unused by the ODE samplers.
    noise: for ``sde``: the Gaussian draws (num_steps - 1, N, H, W, C) to use
      instead of ``rng`` (e.g. a reference run's noise).
  """
  _check_sampler(sampler, num_steps)
  latents = jnp.asarray(latents, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  h, c = model.input_size, model.in_channels
  if latents.ndim != 4 or latents.shape[1:] != (h, h, c):
    raise ValueError(f"latents must be (N, {h}, {h}, {c}) NHWC, got {latents.shape}")
  n = latents.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
  noise_input = False
  if sampler == "sde":
    if noise is not None:
      noise = jnp.asarray(noise, jnp.float32)
      want = (num_steps - 1,) + latents.shape
      if noise.shape != want:
        raise ValueError(f"noise must have shape {want} (num_steps - 1 draws), got {noise.shape}")
      noise_input = True
    elif rng is not None:
      noise = _as_keys(rng, n)
    else:
      raise ValueError("the sde sampler needs rng (a PRNG key) or noise")
  else:
    noise = None
  fn = jitted_sampler(model, sampler, int(num_steps), noise_input)
  scalars = [jnp.asarray(v, jnp.float32) for v in (cfg_scale, guidance_low, guidance_high)]
  return fn(params, latents, labels, noise, *scalars)


# ---------------------------------------------------------------------------
# Per-sample inputs and batched, data-parallel sampling.
# ---------------------------------------------------------------------------


def sample_inputs(model, seed: int, indices: jax.Array, labels_mode: str = "cycle"):
  """(latents (B,H,W,C), labels (B,), per-step noise keys (B,)) from (seed, index) alone.

  Sample ``i`` uses ``k = fold_in(key(seed), i)`` split into three keys: its
  starting noise ``normal(k0, (H, W, C))``, its per-step SDE noise keys ``k1``
  and, with ``labels_mode="random"``, its label ``randint(k2, 0, num_classes)``
  (``"cycle"``: ``i mod num_classes``). Nothing depends on the batch a sample
  lands in.
  """
  if labels_mode not in LABEL_MODES:
    raise ValueError(f"labels_mode must be one of {LABEL_MODES}, got {labels_mode!r}")
  shape = (model.input_size, model.input_size, model.in_channels)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
  parts = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
  latents = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(parts[:, 0])
  if labels_mode == "random":
    labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, model.num_classes, jnp.int32))(
        parts[:, 2])
  else:  # cycle
    labels = (indices % model.num_classes).astype(jnp.int32)
  return latents, labels, parts[:, 1]


def make_batch_sampler(model, mesh: Mesh, *, sampler: str = "sde", num_steps: int = 250,
                       seed: int = 0, labels_mode: str = "cycle"):
  """A jitted, data-parallel ``f(params, indices, labels, cfg_scale, low, high) -> (x, y)``.

  ``indices`` (B,) int32 are global sample indices (their noise comes from
  ``(seed, index)``, see ``sample_inputs``); ``labels`` (B,) int32 are used when
  ``labels_mode="given"``, otherwise ignored and derived from the index. ``B``
  must be a multiple of ``mesh.size``; the batch is sharded over the mesh's
  first axis and the parameters replicated. Returns the final states ``x``
  (B, H, W, C) float32 and the labels ``y``, both sharded like the batch.
  """
  if labels_mode not in LABEL_MODES + ("given",):
    raise ValueError(f"labels_mode must be one of {LABEL_MODES + ('given',)}, got {labels_mode!r}")
  sample_fn = make_sampler(model, sampler, num_steps)
  uses_noise = num_noise_draws(sampler, num_steps) > 0
  data = NamedSharding(mesh, P(mesh.axis_names))
  repl = shd.replicated(mesh)

  def generate(params, indices, labels, cfg_scale, low, high):
    mode = "cycle" if labels_mode == "given" else labels_mode
    z, y, keys = sample_inputs(model, seed, indices, mode)
    if labels_mode == "given":
      y = labels.astype(jnp.int32)
    x = sample_fn(params, z, y, keys if uses_noise else None, cfg_scale, low, high)
    return x, y

  return jax.jit(generate, in_shardings=(repl, data, data, repl, repl, repl),
                 out_shardings=(data, data))


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) sharded array -> the whole array as numpy on every process."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def sample_many(model, params, labels: Sequence[int], *, seed: int = 0,
                per_device_batch: int = 16, mesh: Optional[Mesh] = None, sampler: str = "sde",
                num_steps: int = 250, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                guidance_high: float = 1.0, start_index: int = 0,
                progress: Optional[str] = None) -> np.ndarray:
  """Samples for ``labels`` in data-parallel batches; numpy (N, H, W, C) float32 on every process.

  Sample ``k`` gets index ``start_index + k``: its starting noise and SDE
  noise come from ``(seed, start_index + k)`` exactly as in
  ``python -m deepflow_jax.generate``, so the result does not depend on the
  batch size or device count. ``mesh`` defaults to a 1-D mesh over every
  device; the batch is ``per_device_batch x mesh.size`` (the last one padded).
  ``progress`` names a progress line (rate, ETA) printed by process 0.
  """
  mesh = mesh if mesh is not None else shd.data_mesh()
  labels = np.asarray(labels, np.int32).reshape(-1)
  n = len(labels)
  batch = int(per_device_batch) * mesh.size
  fn = make_batch_sampler(model, mesh, sampler=sampler, num_steps=num_steps, seed=seed,
                          labels_mode="given")
  params = jax.device_put(params, shd.replicated(mesh))
  scalars = [jnp.asarray(v, jnp.float32) for v in (cfg_scale, guidance_low, guidance_high)]
  data = NamedSharding(mesh, P(mesh.axis_names))
  bar = None
  if progress:
    bar = Progress(n, progress, "samples", every_s=30.0,
                   log=None if jax.process_index() else print)
  out = []
  for start in range(0, n, batch):
    count = min(batch, n - start)
    idx = np.arange(start_index + start, start_index + start + batch, dtype=np.int32)
    lab = np.zeros(batch, np.int32)
    lab[:count] = labels[start:start + count]  # the tail past `count` is padding
    idx_arr = jax.make_array_from_callback((batch,), data, lambda s, a=idx: a[s])
    lab_arr = jax.make_array_from_callback((batch,), data, lambda s, a=lab: a[s])
    x, _ = fn(params, idx_arr, lab_arr, *scalars)
    out.append(gather(x)[:count])
    if bar is not None:
      bar.update(count)
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def class_grid_labels(classes: Sequence[int], per_class: int) -> np.ndarray:
  """Labels of a class grid: each class repeated ``per_class`` times (one row per class)."""
  return np.repeat(np.asarray(classes, np.int32), int(per_class))
