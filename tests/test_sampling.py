"""Samplers: parity with the reference's Euler-Maruyama run (golden tiny2t), CFG, ODEs, compilation.

Parity tolerance (SDE vs ``sampler_cfg{1,4}_out``): the reference keeps its state in
float64 and runs the float32 model; we keep the state in float32 as well. Measured
max |ours - reference| on tiny2t: 1.6e-6 (cfg 1, outputs up to 4.7) and 4.4e-6
(cfg 4, outputs up to 16.6). The reference's own spread from running the model in
float32 instead of float64 is 7.6e-7 / 6.6e-6 on the same runs
(tiny2t.json ``tolerances_observed``), so differences of this size are float32
rounding, amplified by the CFG scale (4x) and by 1/t = 25 in the score at the last
step. ATOL = 2e-5 is ~3x the reference's own float32/float64 spread (about 1e-6
relative to the CFG output's magnitude), while any real deviation is orders of
magnitude larger: guiding the two unguided steps, or using the wrong null label,
moves the output by O(1) (checked below).
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc
from deepflow_jax import sampling
from deepflow_jax.models import DeepFlow
from deepflow_jax.sampling import SamplerSettings as S

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

ATOL = 2e-5
N = 3  # conditional rows of the golden sampler runs


def _golden_noise(golden, name, n=N):
  """(steps, 2N or N, C, H, W) float64 reference draws -> first n rows, NHWC."""
  return np.stack([nhwc(a[:n]) for a in golden[name]]).astype(np.float32)


def _sde(tiny2t, golden, cfg, high, noise_name, guidance_low=0.0):
  model, params = tiny2t
  settings = S("sde", 6, cfg_scale=cfg, guidance_low=guidance_low, guidance_high=high)
  return np.asarray(sampling.sample(
      model, params, nhwc(golden["sampler_latents"]), golden["sampler_y"], settings,
      noise=_golden_noise(golden, noise_name)))


def test_time_grid_matches_reference(golden):
  np.testing.assert_allclose(sampling.time_grid(S("sde", 6)), golden["sampler_t_steps"], rtol=0,
                             atol=1e-15)
  np.testing.assert_allclose(sampling.time_grid(S("heun", 4)), [1, 0.75, 0.5, 0.25, 0])


def test_sde_matches_reference_without_cfg(tiny2t, golden):
  out = _sde(tiny2t, golden, 1.0, 1.0, "sampler_cfg1_noise")
  np.testing.assert_allclose(out, nhwc(golden["sampler_cfg1_out"]), atol=ATOL, rtol=0)


def test_sde_matches_reference_with_cfg(tiny2t, golden):
  # The reference ran on [z; z] with [y; null] and doubled again inside (4N rows);
  # its first N output rows are the conditional samples, driven by the first N
  # rows of each noise draw. Guidance on [0, 0.7]: t = 1.0, 0.808 unguided.
  np.testing.assert_array_equal(golden["sampler_cfg4_latents"][:N], golden["sampler_latents"])
  np.testing.assert_array_equal(golden["sampler_cfg4_y"][:N], golden["sampler_y"])
  out = _sde(tiny2t, golden, 4.0, 0.7, "sampler_cfg4_noise")
  ref = nhwc(golden["sampler_cfg4_out"][:N])
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
  # The interval matters: guiding every step moves the result by far more than ATOL.
  everywhere = _sde(tiny2t, golden, 4.0, 1.0, "sampler_cfg4_noise")
  assert np.abs(everywhere - ref).max() > 1e-2


def test_guidance_interval_is_inclusive_and_cfg1_is_unguided(tiny2t, golden):
  base = _sde(tiny2t, golden, 1.0, 1.0, "sampler_cfg4_noise")
  # w <= 1: no guidance at all, whatever the interval (bitwise the unguided sampler).
  np.testing.assert_array_equal(_sde(tiny2t, golden, 1.0, 0.7, "sampler_cfg4_noise"), base)
  # w > 1 with an interval holding no grid time (0.424 < t < 0.616): unguided too.
  np.testing.assert_array_equal(
      _sde(tiny2t, golden, 4.0, 0.5, "sampler_cfg4_noise", guidance_low=0.45), base)
  # Guidance of u + w (c - u) tends to the conditional drift as w -> 1.
  near1 = _sde(tiny2t, golden, 1.0 + 2**-20, 1.0, "sampler_cfg4_noise")
  assert 0 < np.abs(near1 - base).max() < 1e-3
  # Inclusive upper bound: 0.616 is a grid time, so high=0.616 guides it like high=0.62.
  at = _sde(tiny2t, golden, 4.0, 0.616, "sampler_cfg4_noise")
  np.testing.assert_array_equal(at, _sde(tiny2t, golden, 4.0, 0.62, "sampler_cfg4_noise"))
  assert np.abs(at - _sde(tiny2t, golden, 4.0, 0.6, "sampler_cfg4_noise")).max() > 1e-2


def test_heun_few_steps_agrees_with_euler_many_steps(tiny2t, golden):
  """The ODE samplers converge to the same flow: Heun (2nd order) with 16 steps vs Euler with 2000.

  Measured on tiny2t (outputs up to 5.5), against Heun with 400 steps as ground
  truth: Heun 8 / 16 / 32 steps err 3.4e-2 / 8.8e-3 / 2.2e-3 (4x per halving:
  second order), Euler 100 / 1000 / 4000 steps err 1.9e-2 / 1.9e-3 / 4.6e-4
  (first order). Heun 16 vs Euler 2000: measured 7.9e-3; bound 2e-2.
  Without guidance: a guidance interval makes the field discontinuous in t and
  both methods then converge at first order only, depending on where the grid
  falls relative to the interval's end.
  """
  model, params = tiny2t
  z, y = nhwc(golden["sampler_latents"]), golden["sampler_y"]
  heun = np.asarray(sampling.sample(model, params, z, y, S("heun", 16)))
  euler = np.asarray(sampling.sample(model, params, z, y, S("euler", 2000)))
  assert np.abs(heun - euler).max() < 2e-2
  # Not vacuous: the samples are far from the starting noise and from a 1-step Euler guess.
  assert np.abs(heun - z).max() > 1.0
  assert np.abs(heun - (z - np.asarray(model.apply(
      {"params": params}, jnp.asarray(z), jnp.ones((N,)), jnp.asarray(y),
      method=model.velocity)))).max() > 0.1


def test_no_recompilation_for_new_scale_interval_labels_latents(tiny2t):
  model, params = tiny2t
  rng = np.random.default_rng(0)
  steps = 3  # a (sampler, num_steps) no other test uses
  fn = sampling.jitted_sampler(model, S("sde", steps))

  def run(cfg, low, high, seed):
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    y = rng.integers(0, 10, size=2)
    settings = S("sde", steps, cfg_scale=cfg, guidance_low=low, guidance_high=high)
    return np.asarray(sampling.sample(model, params, z, y, settings, rng=jax.random.key(seed)))

  outs = [run(1.0, 0.0, 1.0, 0), run(4.0, 0.0, 0.7, 1), run(2.5, 0.3, 1.0, 2), run(7, 0, 1, 3)]
  assert fn._cache_size() == 1  # one compilation for all four  # pylint: disable=protected-access
  assert all(np.isfinite(o).all() for o in outs)
  # Integer scale / a raw uint32 key also reuse the compiled loop.
  sampling.sample(model, params, np.zeros((2, 8, 8, 4)), [1, 2], S("sde", steps, cfg_scale=3),
                  rng=jax.random.PRNGKey(5))
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_per_sample_noise_does_not_depend_on_the_batch(tiny2t):
  model, params = tiny2t
  z = np.random.default_rng(1).standard_normal((4, 8, 8, 4)).astype(np.float32)
  keys = jax.random.split(jax.random.key(3), 4)
  y = np.array([1, 2, 3, 4])
  whole = sampling.sample(model, params, z, y, S("sde", 2), rng=keys)
  part = sampling.sample(model, params, z[2:], y[2:], S("sde", 2), rng=keys[2:])
  # Same keys -> same noise; batch-shape-dependent float32 kernels allow ~1e-6.
  np.testing.assert_allclose(whole[2:], part, atol=1e-4, rtol=0)


def _random_params(model, scale=0.05):
  """N(0, scale^2) for every parameter (shapes via eval_shape: no eager init)."""
  shapes = flax.linen.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
      [jnp.ones((1,))] * model.num_branches, jnp.zeros((1,), jnp.int32))["params"])
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, l.shape)
                                      for k, l in zip(keys, leaves)])


def _velocity_fn(model):
  return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, method=model.velocity))


def _full_fn(model):
  return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, [t] * model.num_branches, y))


def _flops(fn, *args):
  cost = fn.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


@pytest.mark.parametrize("ssl_align", [False, True])
def test_velocity_path_skips_intermediate_heads(tiny2t, ssl_align):
  """The sampler's model call costs strictly fewer FLOPs than the full forward, same result."""
  if ssl_align:  # a tiny 3-branch model with REPA projectors, random weights
    model = DeepFlow(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
                     num_heads=2, num_classes=10, df_idxs=(1, 2), projector_dim=64,
                     ssl_align=True, z_dim=16)
    params = _random_params(model)
  else:
    model, params = tiny2t
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 4))
  t = jnp.full((4,), 0.37)
  y = jnp.array([0, 3, 9, 10])
  vel, full = _velocity_fn(model), _full_fn(model)
  f_vel, f_full = _flops(vel, params, x, t, y), _flops(full, params, x, t, y)
  assert 0 < f_vel < f_full, (f_vel, f_full)
  vs, accs, zs = full(params, x, t, y)
  assert len(accs) == model.num_branches - 1 and len(zs) == (len(accs) if ssl_align else 0)
  np.testing.assert_allclose(vel(params, x, t, y), vs[-1], atol=1e-5, rtol=0)


def test_sampler_never_reads_intermediate_heads(tiny2t, golden):
  """NaN weights in the intermediate velocity head and the acceleration head change nothing."""
  model, params = tiny2t
  poisoned = dict(params)
  for name in ("final_layer_0", "final_acc_layer"):
    poisoned[name] = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params[name])
  a = _sde((model, params), golden, 4.0, 0.7, "sampler_cfg4_noise")
  b = _sde((model, poisoned), golden, 4.0, 0.7, "sampler_cfg4_noise")
  np.testing.assert_array_equal(a, b)


def test_bad_arguments():
  model = DeepFlow(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                   num_heads=2, num_classes=10, df_idxs=(1,), projector_dim=32)
  z, y = np.zeros((2, 8, 8, 4)), np.zeros((2,), np.int32)
  with pytest.raises(ValueError, match="sampler='ddim' is not one of sde, euler"):
    sampling.sample(model, {}, z, y, S("ddim"))
  with pytest.raises(ValueError, match="rng"):
    sampling.sample(model, {}, z, y, S("sde", 4))
  with pytest.raises(ValueError, match="noise must have shape"):
    sampling.sample(model, {}, z, y, S("sde", 4), noise=np.zeros((4, 2, 8, 8, 4)))
  with pytest.raises(ValueError, match="NHWC"):
    sampling.sample(model, {}, np.zeros((2, 4, 8, 8)), y, S("euler", 4))
