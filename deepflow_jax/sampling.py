"""Samplers for DeepFlow: the reference's SDE, ODE solvers, time grids, acceleration-aware steps.

Library use::

    from deepflow_jax.sampling import SamplerSettings, sample
    sde = SamplerSettings("sde", num_steps=250, cfg_scale=1.8, guidance_high=0.7)
    x = sample(model, params, latents, labels, sde, rng=jax.random.key(0))  # (N, H, W, C)
    x = sample(model, params, latents, labels,
               SamplerSettings("ab2", num_steps=8, grid="shifted", grid_shift=3.0))  # 8 NFE

``SamplerSettings`` is the one value that carries the sampler settings (sampler,
steps, time grid, guidance scale and interval) from command-line flags
(``generate``), configs (``config.sample``) and notebooks to the sampling
functions; ``SamplerSettings.problems()`` is the one check of them, which
``config_lib.validate`` and ``generate`` run before anything compiles.

Every sampler integrates the linear-path flow from t = 1 (noise) to t = 0 (data)
on a decreasing time grid ``1 = t_0 > t_1 > ... > t_n = 0``. All K branches
receive the same time (the time gap fed to every VeRA block is 0). The
velocity samplers evaluate only the final velocity head
(``DeepFlow.velocity``: intermediate velocity heads, the acceleration head and
the REPA projectors are never computed); the ``accel*`` samplers evaluate the
velocity and acceleration heads in the same forward pass
(``DeepFlow.velocity_and_acceleration``). Derivations, the NFE accounting and
measurements are in ``docs/sampling.md``.

Samplers (``sampler=``); NFE = network evaluations per sample (``num_evaluations``):

* ``"sde"``: Euler-Maruyama, exactly the reference's sampler (``docs/architecture.md``).
  From the velocity ``v`` at ``(x, t)``: score ``s = -((1 - t) v + x) / t``,
  diffusion ``g = 2t``, drift ``d = v - (g / 2) s = v - t s``. The first
  ``num_steps - 1`` steps do ``x += d dt + sqrt(2t) sqrt(|dt|) eps``
  (``dt < 0``); the last step (to 0) is deterministic, ``x += d dt``.
  NFE ``num_steps``.
* ``"euler"``: the probability-flow ODE ``dx/dt = v`` with explicit Euler. NFE ``num_steps``.
* ``"heun"``: Heun's second-order method (Euler predictor, trapezoidal
  corrector). The final step, which ends at ``t = 0``, is a plain Euler step
  (no corrector evaluation at ``t = 0``), the convention of the SiT/REPA ODE
  samplers. NFE ``2 num_steps - 1``.
* ``"ab2"``, ``"ab3"``: Adams-Bashforth multistep of order 2 / 3 on the
  (possibly non-uniform) grid: ``x_{i+1} = x_i + sum_k b_{ik} v_{i-k}`` with
  ``b_{ik}`` the integral over ``[t_i, t_{i+1}]`` of the Lagrange basis through
  the last 2 / 3 grid times (``multistep_coefficients``). The first step is
  Euler, ``ab3``'s second step AB2 (lower-order start). NFE ``num_steps``.
* ``"dpm2m"``: DPM-Solver++(2M), the second-order exponential-integrator
  multistep in data prediction ``x0 = x - t v``, written for the linear path
  (``alpha = 1 - t``, ``sigma = t``, ``lambda = log((1 - t) / t)``). On this
  path it reduces to an Euler step plus a correction by the change of the data
  prediction: ``x_{i+1} = x_i + (t_{i+1} - t_i) v_i + k_i (x0_i - x0_{i-1})``
  with ``k_i = (t_i - t_{i+1}) / (2 r_i t_i)``, ``r_i = h_{i-1} / h_i`` and
  ``h_i = lambda(t_{i+1}) - lambda(t_i)`` (``dpm2m_coefficients``). The step
  from ``t = 1`` (``lambda = -inf``), the step after it (``r = inf``) and the
  last step to ``t = 0`` are first order (plain Euler). NFE ``num_steps``.
* ``"accel"``, ``"accel-own"``, ``"accel-ab2"``: acceleration-aware steps
  ``x_{i+1} = x_i + v dt + a dt^2 / 2`` with the acceleration ``a`` the
  network's VeRA heads predict in the same forward pass (``ACCEL_SAMPLERS``
  lists what each pairs; ``docs/sampling.md`` derives what the head learns and
  reports what was tried). Models without splits (plain SiT) are refused.
  NFE ``num_steps``.

Time grids (``grid=``, ``GRIDS``; ``u_i = 1 - i / n``):

* ``"uniform"``: ``t_i = u_i`` (default of every sampler but ``sde``);
* ``"shifted"``: ``t_i = s u_i / (1 + (s - 1) u_i)`` with ``s = grid_shift``
  (``s > 1`` puts more steps near the noise, ``s = 1`` is uniform);
* ``"poly"``: ``t_i = u_i ** rho`` with ``rho = grid_rho``: EDM's polynomial
  schedule with ``t_max = 1``, ``t_min = 0`` (``rho > 1`` puts more steps near
  the data);
* ``"reference"``: the reference SDE's ``linspace(1, 0.04, n)`` followed by 0
  (default of ``sde``).

Classifier-free guidance (``cfg_scale = w``): a step whose start time ``t_cur``
satisfies ``w > 1`` and ``guidance_low <= t_cur <= guidance_high`` (inclusive,
as the reference) runs the network once on ``[x; x]`` with labels
``[y; null]`` (``null = model.num_classes``) and combines
``u + w (c - u)``; on the drift for the SDE (as the reference), on the velocity
for the ODE samplers (Heun's corrector follows the decision of its step's
``t_cur``), on both the velocity and the acceleration for ``accel*``. Multistep
solvers keep the (guided or not) velocity of each step in their history. Every
other step runs the network on ``x`` with ``y`` only: a ``jax.lax.cond``
inside the loop, so unguided steps really run the smaller batch. As in the
reference, ``w <= 1`` means no guidance at all (``w = 1`` is the unguided
sampler, not an extra batch). The guided batch interleaves the conditional and
unconditional row of each sample (rows ``2i, 2i + 1``), so a batch sharded over
devices never moves rows between devices.

Numerics: the reference keeps its state ``x`` in float64 and runs the model in
the latents' dtype. Here the state, drift and noise are float32 and the model
runs in its own ``dtype`` (its input is cast by the model); the time grid and
the per-step constants (``dt``, ``sqrt(2t)``, ``sqrt(|dt|)``, multistep
coefficients) are computed in float64 on the host, then rounded to float32.
Against the reference's float64 state this costs ~1e-6 relative error on
tiny2t (see ``tests/test_sampling.py``). Guidance intervals are compared in
float32; a float64 bound that rounds onto a grid time may count as inside the
interval where the reference's float64 comparison would not (only when they
differ by less than a float32 ulp).

Compilation: the whole loop (``jax.lax.fori_loop``) is one jitted function per
model and ``SamplerSettings.compile_key()`` (sampler, steps, grid) and noise
mode; the CFG scale, the guidance interval, labels, latents, noise keys, seed and
parameters are traced arguments, so changing them does not recompile (shapes and
dtypes must stay the same). ``jitted_sampler`` and ``make_batch_sampler`` cache
their compiled functions, so calling ``sample``/``sample_many`` batch after batch
compiles once per settings and shape. ``make_sampler`` returns the un-jitted pure
function for callers who jit it themselves.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepflow_jax import sharding as shd
from deepflow_jax.errors import UserError
from deepflow_jax.progress import Progress

# Acceleration-aware samplers: name -> (velocity/acceleration pairing, history use).
#   pairing "final-first": the final velocity with the first VeRA block's acceleration;
#   pairing "own": every branch j < K - 1 with its own acceleration a_j, the K - 1 steps
#     x + v_j dt + a_j dt^2 / 2 averaged;
#   history "ab2": the learned acceleration on the first step, the finite difference of
#     the last two velocities (what AB2 uses) on every later step.
ACCEL_SAMPLERS = {
    "accel": ("final-first", None),
    "accel-own": ("own", None),
    "accel-ab2": ("final-first", "ab2"),
}
MULTISTEP_ORDER = {"euler": 1, "ab2": 2, "ab3": 3}
SAMPLERS = ("sde", "euler", "heun", "ab2", "ab3", "dpm2m") + tuple(ACCEL_SAMPLERS)
GRIDS = ("uniform", "shifted", "poly", "reference")
DEFAULT_GRID_SHIFT = 2.0  # from a screen on digits (docs/sampling.md)
DEFAULT_GRID_RHO = 1.5  # from a screen on digits (docs/sampling.md)
SDE_T_END = 0.04  # last grid time before 0 of the reference's Euler-Maruyama sampler
LABEL_MODES = ("random", "cycle")


def default_grid(sampler: str) -> str:
  """The grid a sampler uses when none is given: ``reference`` for ``sde``, else ``uniform``."""
  return "reference" if sampler == "sde" else "uniform"


def _choice_problem(key: str, value, allowed: Sequence[str], extra: str = "") -> str:
  """``key=value is not one of ...`` with the nearest valid name, if one is near."""
  near = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  return f"{key}={value!r} is not one of {', '.join(allowed)}{extra}{hint}"


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How samples are drawn: the sampler, its steps and time grid, and classifier-free guidance.

  Attributes:
    sampler: one of ``SAMPLERS`` (module docstring).
    num_steps: grid intervals (static: a new value compiles anew).
    grid: one of ``GRIDS``, or ``""`` for the sampler's default (``default_grid``).
    grid_shift: ``s`` of the ``shifted`` grid; grid_rho: ``rho`` of ``poly``
      (each used only by its grid).
    cfg_scale: guidance scale ``w``; ``w <= 1`` means no guidance.
    guidance_low, guidance_high: guidance applies on steps whose start time
      lies in ``[guidance_low, guidance_high]`` (1 = noise, 0 = data).

  Field names are the keys of ``config.sample`` and the flags of ``generate``,
  so ``problems(prefix=...)`` names a mistake the way the user wrote it.
  """
  sampler: str = "sde"
  num_steps: int = 250
  grid: str = ""
  grid_shift: float = DEFAULT_GRID_SHIFT
  grid_rho: float = DEFAULT_GRID_RHO
  cfg_scale: float = 1.0
  guidance_low: float = 0.0
  guidance_high: float = 1.0

  @classmethod
  def from_config(cls, sample_config: Mapping[str, Any]) -> "SamplerSettings":
    """The settings of ``config.sample`` (a ConfigDict or dict holding at least these keys)."""
    return cls(**{f.name: sample_config[f.name] for f in dataclasses.fields(cls)})

  @property
  def grid_name(self) -> str:
    """The grid actually used: ``grid`` or the sampler's default."""
    return self.grid or default_grid(self.sampler)

  @property
  def grid_param(self) -> Optional[float]:
    """The one parameter of the grid in use (``grid_shift``/``grid_rho``), else None."""
    name = {"shifted": "grid_shift", "poly": "grid_rho"}.get(self.grid_name)
    return None if name is None else float(getattr(self, name))

  def problems(self, *, prefix: str = "", accel_heads: Optional[bool] = None) -> list[str]:
    """Every invalid value (empty when valid), each named ``prefix + field``.

    ``accel_heads``: whether the model has acceleration heads (DeepFlow with
    splits); False refuses the ``accel*`` samplers, None does not check.
    """
    out = []
    if self.sampler not in SAMPLERS:
      out.append(_choice_problem(f"{prefix}sampler", self.sampler, SAMPLERS))
    n = self.num_steps
    if not _is_number(n) or int(n) != n or n < 1:
      out.append(f"{prefix}num_steps must be a positive integer, got {n!r}")
    if self.grid not in ("",) + GRIDS:
      out.append(_choice_problem(f"{prefix}grid", self.grid, GRIDS,
                                 " (or empty for the sampler's default)"))
    elif self.grid in ("shifted", "poly"):
      name = "grid_shift" if self.grid == "shifted" else "grid_rho"
      v = getattr(self, name)
      if not _is_number(v) or not np.isfinite(v) or v <= 0:
        out.append(f"{prefix}{name}={v!r} must be a finite number > 0 for the {self.grid} grid")
    w, lo, hi = self.cfg_scale, self.guidance_low, self.guidance_high
    if not all(_is_number(v) for v in (w, lo, hi)) or not np.isfinite([w, lo, hi]).all():
      out.append(f"{prefix}cfg_scale, {prefix}guidance_low and {prefix}guidance_high must be "
                 "finite numbers")
    elif lo > hi:
      out.append(f"{prefix}guidance_low={lo} is above {prefix}guidance_high={hi}: guidance "
                 f"would never apply (the interval is [{prefix}guidance_low, "
                 f"{prefix}guidance_high] in t, 1 = noise, 0 = data)")
    elif w < 0:
      out.append(f"{prefix}cfg_scale={w} must be >= 0 (<= 1 means no guidance)")
    if accel_heads is False and self.sampler in ACCEL_SAMPLERS:
      out.append(f"{prefix}sampler={self.sampler!r} needs the acceleration heads of DeepFlow's "
                 "VeRA blocks, but this model has no splits (model.df_idxs is empty: plain "
                 f"SiT); use one of {', '.join(s for s in SAMPLERS if s not in ACCEL_SAMPLERS)}")
    return out

  def check(self, model=None, *, prefix: str = "") -> "SamplerSettings":
    """Raises ``UserError`` (one line) unless valid (for ``model``, when given); returns self."""
    heads = None if model is None else bool(tuple(getattr(model, "df_idxs", ())))
    problems = self.problems(prefix=prefix, accel_heads=heads)
    if problems:
      raise UserError("; ".join(problems))
    return self

  def compile_key(self) -> tuple[str, int, str, Optional[float]]:
    """What a compiled sampler depends on: sampler, steps, grid and its parameter."""
    self.check()
    return self.sampler, int(self.num_steps), self.grid_name, self.grid_param

  def guidance(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(cfg_scale, guidance_low, guidance_high)`` as the float32 scalars samplers trace."""
    return tuple(jnp.asarray(v, jnp.float32)
                 for v in (self.cfg_scale, self.guidance_low, self.guidance_high))

  def grid_record(self) -> dict[str, Any]:
    """The grid as manifests record it: nothing for the sampler's default grid, else its
    name and its one parameter."""
    if self.grid_name == default_grid(self.sampler):
      return {}
    name = {"shifted": "grid_shift", "poly": "grid_rho"}.get(self.grid_name)
    return {"grid": self.grid_name, **({name: self.grid_param} if name else {})}

  def describe(self) -> str:
    """One phrase for logs: ``sde, 250 steps, grid shifted grid_shift=2.0, cfg 4.0 in [0, 0.7]``."""
    grid = "".join(f" {k}={v}" for k, v in self.grid_record().items())
    cfg = (f", cfg {self.cfg_scale} in [{self.guidance_low}, {self.guidance_high}]"
           if self.cfg_scale > 1 else "")
    return f"{self.sampler}, {self.num_steps} steps{grid}{cfg}"


def _grid_times(grid: str, param: Optional[float], num_steps: int) -> np.ndarray:
  if grid == "reference":
    return np.concatenate([np.linspace(1.0, SDE_T_END, num_steps, dtype=np.float64), [0.0]])
  u = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
  if grid == "shifted":
    return param * u / (1.0 + (param - 1.0) * u)
  if grid == "poly":
    return u**param
  return u


def time_grid(settings: SamplerSettings) -> np.ndarray:
  """The ``num_steps + 1`` times of ``settings``, float64, strictly decreasing from 1 to 0."""
  _, num_steps, grid, param = settings.compile_key()
  return _grid_times(grid, param, num_steps)


def _check_sampler(sampler: str, num_steps: int) -> None:
  SamplerSettings(sampler, num_steps).check()


def num_noise_draws(sampler: str, num_steps: int) -> int:
  """How many Gaussian draws per sample the sampler uses (``num_steps - 1`` for ``sde``, else 0)."""
  _check_sampler(sampler, num_steps)
  return num_steps - 1 if sampler == "sde" else 0


def num_evaluations(sampler: str, num_steps: int) -> int:
  """Network evaluations per sample (NFE): ``2 num_steps - 1`` for ``heun``, else ``num_steps``.

  A guided step evaluates the network once on a doubled batch; it counts as one
  evaluation here (guidance doubles the cost of the steps inside its interval).
  """
  _check_sampler(sampler, num_steps)
  return 2 * num_steps - 1 if sampler == "heun" else int(num_steps)


def steps_for_evaluations(sampler: str, nfe: int) -> int:
  """The most steps whose NFE (``num_evaluations``) is at most ``nfe`` (>= 1)."""
  if int(nfe) != nfe or nfe < 1:
    raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
  steps = (int(nfe) + 1) // 2 if sampler == "heun" else int(nfe)
  _check_sampler(sampler, steps)
  return steps


def multistep_coefficients(ts: np.ndarray, order: int) -> np.ndarray:
  """Adams-Bashforth weights on a non-uniform grid, float64 (n, order) for n = len(ts) - 1.

  Row ``i`` holds ``b_{ik}``, ``k = 0..order-1``, with ``x_{i+1} = x_i + sum_k
  b_{ik} v(t_{i-k})``: ``b_{ik}`` integrates over ``[t_i, t_{i+1}]`` the Lagrange
  basis polynomial of ``t_{i-k}`` through the ``m = min(order, i + 1)`` newest
  grid times, so step ``i`` is exact for velocities polynomial in t of degree
  ``< m``. Weights for history that does not exist yet are 0 (Euler start,
  then lower orders until ``order`` points are known).
  """
  ts = np.asarray(ts, np.float64)
  n = len(ts) - 1
  out = np.zeros((n, order), np.float64)
  for i in range(n):
    m = min(order, i + 1)
    nodes = ts[i - np.arange(m)] - ts[i]  # shifted so that t_i = 0: better conditioned
    end = ts[i + 1] - ts[i]
    for k in range(m):
      basis = np.polynomial.Polynomial([1.0])
      for j in range(m):
        if j != k:
          basis = basis * np.polynomial.Polynomial([-nodes[j], 1.0]) / (nodes[k] - nodes[j])
      integral = basis.integ()
      out[i, k] = integral(end) - integral(0.0)
  return out


def dpm2m_coefficients(ts: np.ndarray) -> np.ndarray:
  """DPM-Solver++(2M) on the linear path: ``k_i`` (n,) float64 of ``x += dt v + k_i (x0_i - x0_{i-1})``.

  ``k_i = (t_i - t_{i+1}) / (2 r_i t_i)`` with ``r_i = h_{i-1} / h_i``,
  ``h_i = lambda(t_{i+1}) - lambda(t_i)``, ``lambda(t) = log((1 - t) / t)``;
  ``k_i = 0`` (first order) on the first step, on a step whose previous step
  started at ``t = 1`` (``h_{i-1}`` infinite) and on the last step to ``t = 0``.
  """
  ts = np.asarray(ts, np.float64)
  n = len(ts) - 1
  k = np.zeros(n, np.float64)
  with np.errstate(divide="ignore"):
    lam = np.log1p(-ts) - np.log(ts)  # -inf at t = 1, +inf at t = 0
  for i in range(1, n):
    t, s = ts[i], ts[i + 1]
    if s <= 0 or not np.isfinite(lam[i - 1]):
      continue
    r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
    k[i] = (t - s) / (2.0 * r * t)
  return k


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


def accel_pair(velocities: Sequence[jax.Array], accelerations: Sequence[jax.Array],
               pairing: str) -> tuple[jax.Array, jax.Array]:
  """(v, a) of an ``accel*`` step from the K velocity and K - 1 acceleration heads.

  ``"final-first"``: ``(v_{K-1}, a_0)``; ``"own"``: the means over ``j < K - 1`` of
  ``v_j`` and ``a_j`` (the average of the K - 1 steps ``x + v_j dt + a_j dt^2 / 2``).
  """
  if pairing == "final-first":
    return velocities[-1], accelerations[0]
  if pairing == "own":
    m = len(accelerations)
    return sum(velocities[:m]) / m, sum(accelerations) / m
  raise ValueError(f"unknown pairing {pairing!r}")


class _Grid(NamedTuple):
  """A sampler's time grid as the float32 constants its loop reads (computed in float64)."""
  ts64: np.ndarray  # (n + 1,) float64: the grid itself
  ts: jax.Array  # (n + 1,) the times
  dts: jax.Array  # (n,) t_{i+1} - t_i (negative)
  sqrt_g: jax.Array  # (n + 1,) sqrt(2 t): the SDE's diffusion
  sqrt_dt: jax.Array  # (n,) sqrt(|dt|)

  @classmethod
  def of(cls, settings: SamplerSettings) -> "_Grid":
    ts64 = time_grid(settings)
    dt64 = ts64[1:] - ts64[:-1]
    return cls(ts64, _f32(ts64), _f32(dt64), _f32(np.sqrt(2.0 * ts64)),
               _f32(np.sqrt(np.abs(dt64))))

  @property
  def num_steps(self) -> int:
    return len(self.ts64) - 1


def _identity(v, x, t):
  del x, t
  return v


def _make_field(model, params, labels, cfg_scale, guidance_low, guidance_high):
  """``field(x, t, t_guide, to_field, net=velocity)``: ``to_field(net(x, t), x, t)`` (drift,
  velocity, ...), guided when ``t_guide`` lies in the interval and ``cfg_scale > 1``.

  ``net(x, t, labels)`` returns an array or a pytree of arrays (the velocity by
  default); guidance runs it once on ``[x; x]`` with ``[y; null]`` interleaved and
  combines every leaf as ``u + w (c - u)``; unguided steps run the smaller batch
  (``jax.lax.cond``).
  """
  y = jnp.asarray(labels, jnp.int32)
  w = jnp.asarray(cfg_scale, jnp.float32)
  lo = jnp.asarray(guidance_low, jnp.float32)
  hi = jnp.asarray(guidance_high, jnp.float32)
  y_pair = _pair(y, jnp.full_like(y, int(model.num_classes)))

  def velocity(x, t, labels_):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    v = model.apply({"params": params}, x, tt, labels_, method=model.velocity)
    return v.astype(jnp.float32)

  def field(x, t, t_guide, to_field, net=velocity):
    def guided(x):
      xx = _pair(x, x)
      out = to_field(net(xx, t, y_pair), xx, t)
      return jax.tree.map(lambda ab: (lambda c, u: u + w * (c - u))(*_unpair(ab)), out)

    def plain(x):
      return to_field(net(x, t, y), x, t)

    use_cfg = (w > 1.0) & (lo <= t_guide) & (t_guide <= hi)
    return jax.lax.cond(use_cfg, guided, plain, x)

  return field


def _sde_loop(g: _Grid, field, x0, eps_at):
  """Euler-Maruyama on the reverse SDE; the last step (to t = 0) is deterministic."""
  ts, dts, n = g.ts, g.dts, g.num_steps

  def step(i, x):
    t = ts[i]
    d = field(x, t, t, sde_drift)
    return x + d * dts[i] + g.sqrt_g[i] * (eps_at(i) * g.sqrt_dt[i])

  # With num_steps == 1 there is only the deterministic last step (no noise).
  x = jax.lax.fori_loop(0, n - 1, step, x0) if n > 1 else x0
  return x + dts[n - 1] * field(x, ts[n - 1], ts[n - 1], sde_drift)


def _euler_loop(g: _Grid, field, x0):
  def step(i, x):
    return x + g.dts[i] * field(x, g.ts[i], g.ts[i], _identity)

  return jax.lax.fori_loop(0, g.num_steps, step, x0)


def _heun_loop(g: _Grid, field, x0):
  """num_steps - 1 predictor-corrector steps, then one Euler step to t = 0."""
  ts, dts, n = g.ts, g.dts, g.num_steps

  def step(i, x):
    t, t_next, dt = ts[i], ts[i + 1], dts[i]
    v = field(x, t, t, _identity)
    x_pred = x + dt * v
    v_next = field(x_pred, t_next, t, _identity)
    return x + dt * (0.5 * v + 0.5 * v_next)

  x = jax.lax.fori_loop(0, n - 1, step, x0)
  return x + dts[n - 1] * field(x, ts[n - 1], ts[n - 1], _identity)


def _adams_bashforth_loop(g: _Grid, field, x0, order: int):
  coef = _f32(multistep_coefficients(g.ts64, order))

  def step(i, carry):
    x, hist = carry  # hist: the previous order - 1 velocities, newest first
    v = field(x, g.ts[i], g.ts[i], _identity)
    inc = coef[i, 0] * v
    for k in range(1, order):
      inc = inc + coef[i, k] * hist[k - 1]
    return x + inc, jnp.concatenate([v[None], hist[:-1]])

  hist0 = jnp.zeros((order - 1,) + x0.shape, jnp.float32)
  return jax.lax.fori_loop(0, g.num_steps, step, (x0, hist0))[0]


def _dpm2m_loop(g: _Grid, field, x0):
  kcoef = _f32(dpm2m_coefficients(g.ts64))

  def step(i, carry):
    x, d_prev = carry  # d_prev: the previous step's data prediction x - t v
    v = field(x, g.ts[i], g.ts[i], _identity)
    d = x - g.ts[i] * v
    return x + g.dts[i] * v + kcoef[i] * (d - d_prev), d

  return jax.lax.fori_loop(0, g.num_steps, step, (x0, jnp.zeros_like(x0)))[0]


def _accel_loop(g: _Grid, field, x0, model, params, sampler: str):
  """``x + v dt + a dt^2 / 2`` with the heads ``ACCEL_SAMPLERS[sampler]`` pairs."""
  pairing, history = ACCEL_SAMPLERS[sampler]
  n = g.num_steps
  dt64 = g.ts64[1:] - g.ts64[:-1]
  half_dt2 = _f32(0.5 * dt64**2)
  # Acceleration used at step i: learned * ca[i] + (v_i - v_{i-1}) * cf[i].
  ca64, cf64 = np.ones(n), np.zeros(n)
  if history == "ab2":
    ca64[1:] = 0.0
    cf64[1:] = 1.0 / dt64[:-1]
  ca, cf = _f32(ca64), _f32(cf64)

  def heads(x, t, labels_):
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    vs, accs = model.apply({"params": params}, x, tt, labels_,
                           method=model.velocity_and_acceleration)
    v, a = accel_pair(vs, accs, pairing)
    return v.astype(jnp.float32), a.astype(jnp.float32)

  def step(i, carry):
    x, v_prev = carry
    v, a = field(x, g.ts[i], g.ts[i], _identity, net=heads)
    a_hat = ca[i] * a + cf[i] * (v - v_prev) if history else a
    return x + g.dts[i] * v + half_dt2[i] * a_hat, v

  return jax.lax.fori_loop(0, n, step, (x0, jnp.zeros_like(x0)))[0]


def _noise_at(noise, noise_input: bool, shape):
  """``eps_at(i)``: step ``i``'s Gaussian draws, given (``noise_input``) or from per-sample keys."""
  if noise_input:
    return lambda i: jnp.asarray(jax.lax.dynamic_index_in_dim(noise, i, 0, keepdims=False),
                                 jnp.float32)
  return lambda i: jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(noise)


def make_sampler(model, settings: SamplerSettings, *,
                 noise_input: bool = False) -> Callable[..., jax.Array]:
  """The sampler of ``settings`` as a pure, un-jitted function.

  Returns ``f(params, latents, labels, noise, cfg_scale, guidance_low,
  guidance_high) -> samples`` with ``latents`` (N, H, W, C) float32, ``labels``
  (N,) int32, scalars as float32 arrays (``settings.guidance()``), and ``noise``:

  * ``noise_input=False``: per-sample typed PRNG keys (N,); step ``i`` of sample
    ``n`` uses ``normal(fold_in(keys[n], i), (H, W, C))``, so a sample's noise
    depends on its own key only (not on the batch it is in);
  * ``noise_input=True``: the Gaussian draws themselves, (num_steps - 1, N, H, W, C);
  * ignored (pass ``None``) by every sampler but ``sde``.

  Only the compile-time part of ``settings`` (sampler, steps, grid) is used
  here; the guidance values are the traced arguments. The ``model`` needs
  ``num_classes`` and ``apply`` with ``method=model.velocity`` (``accel*``:
  ``method=model.velocity_and_acceleration`` and ``df_idxs``).
  """
  settings.check(model)
  sampler = settings.sampler
  grid = _Grid.of(settings)

  def f(params, latents, labels, noise, cfg_scale, guidance_low, guidance_high):
    x0 = jnp.asarray(latents, jnp.float32)
    field = _make_field(model, params, labels, cfg_scale, guidance_low, guidance_high)
    if sampler == "sde":
      return _sde_loop(grid, field, x0, _noise_at(noise, noise_input, x0.shape[1:]))
    if sampler == "euler":
      return _euler_loop(grid, field, x0)
    if sampler == "heun":
      return _heun_loop(grid, field, x0)
    if sampler in ("ab2", "ab3"):
      return _adams_bashforth_loop(grid, field, x0, MULTISTEP_ORDER[sampler])
    if sampler == "dpm2m":
      return _dpm2m_loop(grid, field, x0)
    return _accel_loop(grid, field, x0, model, params, sampler)

  return f


def jitted_sampler(model, settings: SamplerSettings, noise_input: bool = False):
  """``jax.jit(make_sampler(...))``, cached per model, ``settings.compile_key()`` and noise mode.

  The grid is keyed canonically (the default grid by its name, a grid's
  parameter only where it is used), so equal grids share one compilation, and
  the guidance values are traced, so they share it too.
  """
  settings.check(model)
  return _jitted_sampler(model, settings.compile_key(), bool(noise_input))


def _settings_from_key(key: tuple[str, int, str, Optional[float]]) -> SamplerSettings:
  sampler, num_steps, grid, param = key
  kw = {"shifted": {"grid_shift": param}, "poly": {"grid_rho": param}}.get(grid, {})
  return SamplerSettings(sampler, num_steps, grid, **kw)


@functools.lru_cache(maxsize=64)
def _jitted_sampler(model, key, noise_input: bool):
  return jax.jit(make_sampler(model, _settings_from_key(key), noise_input=noise_input))


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


def sample(model, params, latents, labels, settings: SamplerSettings = SamplerSettings(), *,
           rng: Optional[Any] = None, noise: Optional[Any] = None) -> jax.Array:
  """Draws samples; returns the final state (N, H, W, C) float32 (NHWC).

  Args:
    model: a ``DeepFlow`` module.
    params: its parameters (e.g. EMA weights).
    latents: the starting noise at t = 1, (N, H, W, C).
    labels: (N,) class ids in ``[0, num_classes]`` (``num_classes`` = null label).
    settings: the sampler, its steps and grid, and guidance (``SamplerSettings``;
      default: the reference's SDE at 250 steps, no guidance).
    rng: for ``sde``: a PRNG key (split into one key per sample) or N per-sample
      keys; unused by the other samplers.
    noise: for ``sde``: the Gaussian draws (num_steps - 1, N, H, W, C) to use
      instead of ``rng`` (e.g. a reference run's noise).
  """
  settings.check(model)
  sampler, num_steps = settings.sampler, int(settings.num_steps)
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
  fn = jitted_sampler(model, settings, noise_input)
  return fn(params, latents, labels, noise, *settings.guidance())


# ---------------------------------------------------------------------------
# Per-sample inputs and batched, data-parallel sampling.
# ---------------------------------------------------------------------------


def sample_inputs(model, seed, indices: jax.Array, labels_mode: str = "cycle"):
  """(latents (B,H,W,C), labels (B,), per-step noise keys (B,)) from (seed, index) alone.

  Sample ``i`` uses ``k = fold_in(key(seed), i)`` split into three keys: its
  starting noise ``normal(k0, (H, W, C))``, its per-step SDE noise keys ``k1``
  and, with ``labels_mode="random"``, its label ``randint(k2, 0, num_classes)``
  (``"cycle"``: ``i mod num_classes``). Nothing depends on the batch a sample
  lands in. ``seed`` may be traced.
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


def make_batch_sampler(model, mesh: Mesh, settings: SamplerSettings, labels_mode: str = "cycle"):
  """A jitted, data-parallel ``f(params, seed, indices, labels, cfg_scale, low, high) -> (x, y)``.

  ``seed`` is an int32 scalar; ``indices`` (B,) int32 are global sample indices
  (their noise comes from ``(seed, index)``, see ``sample_inputs``); ``labels``
  (B,) int32 are used when ``labels_mode="given"``, otherwise ignored and
  derived from the index. ``B`` must be a multiple of ``mesh.size``; the batch
  is sharded over the mesh's axes and the parameters replicated. Returns the
  final states ``x`` (B, H, W, C) float32 and the labels ``y``, both sharded
  like the batch. Cached per (model, mesh, ``settings.compile_key()``,
  ``labels_mode``): seed and guidance values are traced, so batch after batch
  and run after run share one compilation per shape.
  """
  if labels_mode not in LABEL_MODES + ("given",):
    raise ValueError(f"labels_mode must be one of {LABEL_MODES + ('given',)}, got {labels_mode!r}")
  settings.check(model)
  return _batch_sampler(model, mesh, settings.compile_key(), labels_mode)


@functools.lru_cache(maxsize=32)
def _batch_sampler(model, mesh: Mesh, key, labels_mode: str):
  sample_fn = make_sampler(model, _settings_from_key(key))
  uses_noise = num_noise_draws(key[0], key[1]) > 0
  data = NamedSharding(mesh, P(mesh.axis_names))
  repl = shd.replicated(mesh)

  def generate(params, seed, indices, labels, cfg_scale, low, high):
    mode = "cycle" if labels_mode == "given" else labels_mode
    z, y, keys = sample_inputs(model, seed, indices, mode)
    if labels_mode == "given":
      y = labels.astype(jnp.int32)
    x = sample_fn(params, z, y, keys if uses_noise else None, cfg_scale, low, high)
    return x, y

  return jax.jit(generate, in_shardings=(repl, repl, data, data, repl, repl, repl),
                 out_shardings=(data, data))


class StopSampling(Exception):
  """``sample_many`` was asked to stop (``should_stop``) before it finished."""


class NonFiniteSamples(UserError):
  """``sample_many`` drew samples holding NaN or Inf (weights that do not sample)."""


def check_finite_samples(x: np.ndarray, start_index: int = 0) -> None:
  """Raises ``NonFiniteSamples`` naming how many of the samples ``x`` hold NaN or Inf."""
  bad = ~np.isfinite(np.asarray(x, np.float32)).reshape(len(x), -1).all(axis=1)
  if bad.any():
    raise NonFiniteSamples(
        f"{int(bad.sum())} of {len(x)} samples (indices from {start_index + int(np.argmax(bad))}) "
        "hold NaN or Inf: the weights do not sample (a diverged or corrupt checkpoint?); "
        "nothing was written from them")


def sample_many(model, params, labels: Sequence[int], settings: SamplerSettings, *,
                seed: int = 0, per_device_batch: int = 16, mesh: Optional[Mesh] = None,
                start_index: int = 0, progress: Optional[str] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> np.ndarray:
  """Samples for ``labels`` in data-parallel batches; numpy (N, H, W, C) float32 on every process.

  Sample ``k`` gets index ``start_index + k``: its starting noise and SDE
  noise come from ``(seed, start_index + k)`` exactly as in
  ``python -m deepflow_jax.generate``, so the result does not depend on the
  batch size or device count. ``mesh`` defaults to a 1-D mesh over every
  device; the batch is ``per_device_batch x mesh.size`` (the last one padded).
  ``progress`` names a progress line (rate, ETA) printed by process 0.
  ``should_stop()`` is asked after every batch; when it says so, sampling stops
  and ``StopSampling`` is raised (e.g. SIGTERM during a long end-of-run phase).
  A batch holding NaN or Inf raises ``NonFiniteSamples`` (one line).
  """
  mesh = mesh if mesh is not None else shd.data_mesh()
  labels = np.asarray(labels, np.int32).reshape(-1)
  n = len(labels)
  batch = int(per_device_batch) * mesh.size
  fn = make_batch_sampler(model, mesh, settings, labels_mode="given")
  params = jax.device_put(params, shd.replicated(mesh))
  scalars = settings.guidance()
  seed_arr = jnp.asarray(seed, jnp.int32)
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
    x, _ = fn(params, seed_arr, idx_arr, lab_arr, *scalars)
    out.append(shd.host_array(x)[:count])
    check_finite_samples(out[-1], start_index + start)
    if bar is not None:
      bar.update(count)
    if should_stop is not None and should_stop() and start + batch < n:
      raise StopSampling(f"stopped after {start + count} of {n} samples")
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def class_grid_labels(classes: Sequence[int], per_class: int) -> np.ndarray:
  """Labels of a class grid: each class repeated ``per_class`` times (one row per class)."""
  return np.repeat(np.asarray(classes, np.int32), int(per_class))
