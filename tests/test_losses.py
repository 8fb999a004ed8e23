"""The DeepFlow loss against the reference's own draws (tiny2t golden, loss_* / loss_down_*).

Tolerance 2e-5: the reference's float32-vs-float64 disagreement on these terms is
below 1e-6 (tiny2t.json); the model outputs feeding them agree to ~5e-6.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import nhwc
from deepflow_jax import losses

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

ATOL = 2e-5


def _golden_draws(g, prefix):
  k = 2
  return losses.LossDraws(
      noise=nhwc(g["loss_noises"]),
      time=g["loss_rnd_normal"].reshape(-1),
      direction=jnp.asarray(g[f"{prefix}random_number"], jnp.float32),
      gaps=g["loss_gap_draws"].reshape(k, -1)[:k - 1],  # the last draw is unused upstream
  )


@pytest.mark.parametrize("prefix", ["loss_", "loss_down_"])
def test_loss_matches_reference_on_its_draws(tiny2t, golden, prefix):
  model, params = tiny2t
  g = golden
  cfg = losses.LossConfig(scale_weight=(0.2, 1.0), beta=0.01)
  apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
  total, terms = losses.deepflow_loss(apply_fn, nhwc(g["loss_images"]), g["loss_y"],
                                      _golden_draws(g, prefix), cfg)
  # The two cases go up and down in time (clipping at 1 and at 0 both occur).
  assert (g[f"{prefix}random_number"] < 0.5) == (prefix == "loss_")
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
  close(losses.initial_time(g["loss_rnd_normal"].reshape(-1), "lognormal", "linear"),
        g["loss_t_init"])
  close(terms["target"], nhwc(g["loss_model_target"]))
  for j in range(2):
    close(terms["t"][j], g[f"{prefix}t{j}"])
    close(terms["x_t"][j], nhwc(g[f"{prefix}model_input{j}"]))
    close(terms["velocities"][j], nhwc(g[f"{prefix}v{j}"]))
    close(terms["denoise_branch"][j], g[f"{prefix}denoise_branch{j}"])
  close(terms["accelerations"][0], nhwc(g[f"{prefix}a0"]))
  close(terms["next_sample"][0], nhwc(g[f"{prefix}next_sample0"]))
  close(terms["acc_branch"][0], g[f"{prefix}acc_branch0"])
  close(terms["denoise_per_sample"], g[f"{prefix}denoise_per_sample"])
  close(terms["acc_per_sample"], g[f"{prefix}acc_per_sample"])
  expected_total = g[f"{prefix}denoise_per_sample"].mean() + g[f"{prefix}acc_per_sample"].mean()
  close(total, expected_total)


def test_every_golden_loss_array_is_checked(golden):
  # Guard: if the golden file grows new loss arrays, this test names them.
  checked = {"loss_images", "loss_noises", "loss_y", "loss_rnd_normal", "loss_gap_draws",
             "loss_model_target", "loss_random_number", "loss_t_init"}
  for prefix in ("loss_", "loss_down_"):
    checked |= {f"{prefix}{n}" for n in (
        "random_number", "t0", "t1", "model_input0", "model_input1", "v0", "v1",
        "denoise_branch0", "denoise_branch1", "a0", "next_sample0", "acc_branch0",
        "denoise_per_sample", "acc_per_sample")}
  assert {k for k in golden if k.startswith("loss")} == checked


def _fake_model(k, shape):
  """apply_fn whose outputs are parameters, to inspect gradients."""
  def make(params):
    def apply_fn(x, t, y):
      del t, y
      vs = [params["v"][j] + 0 * x for j in range(k)]
      accs = [params["a"][j] + 0 * x for j in range(k - 1)]
      return vs, accs, []
    return apply_fn
  rng = np.random.default_rng(0)
  params = {"v": jnp.asarray(rng.standard_normal((k,) + shape), jnp.float32),
            "a": jnp.asarray(rng.standard_normal((k - 1,) + shape), jnp.float32)}
  return make, params


def test_acceleration_loss_stops_the_velocity_gradient():
  shape = (2, 4, 4, 3)
  make, params = _fake_model(3, shape)
  cfg = losses.LossConfig(scale_weight=(0.2, 0.2, 1.0))
  draws = losses.draw_loss_randomness(jax.random.key(0), shape, 3, "lognormal")
  x0 = jnp.ones(shape)
  acc_only = lambda p: losses.deepflow_loss(make(p), x0, jnp.zeros(2, jnp.int32), draws, cfg)[1]["acc"]
  g = jax.grad(acc_only)(params)
  assert not np.asarray(g["v"]).any()  # stop-gradient on v
  assert np.abs(np.asarray(g["a"])).min() > 0  # a is trained by it
  den_only = lambda p: losses.deepflow_loss(make(p), x0, jnp.zeros(2, jnp.int32), draws, cfg)[1]["denoise"]
  gd = jax.grad(den_only)(params)
  # Branch weights scale the denoising gradient: branch 2 weighs 5x branch 0 per unit error.
  assert np.abs(np.asarray(gd["v"])).min() > 0 and not np.asarray(gd["a"]).any()


def test_time_sampling_and_branch_times():
  draws = losses.draw_loss_randomness(jax.random.key(1), (4096, 1, 1, 1), 3, "lognormal")
  t0 = losses.initial_time(draws.time, "lognormal", "linear")
  assert 0 < float(t0.min()) and float(t0.max()) < 1
  assert abs(float(jnp.median(t0)) - 0.5) < 0.03  # sigmoid of a standard normal
  for coin, sign in ((0.2, 1), (0.8, -1)):
    ts = losses.branch_times(t0, jnp.asarray(coin), draws.gaps, 0.01)
    gaps = np.diff(np.stack(ts), axis=0) * sign
    assert (gaps >= 0).all() and (gaps <= 0.01 + 1e-7).all()
    assert 0 <= float(jnp.min(jnp.stack(ts))) and float(jnp.max(jnp.stack(ts))) <= 1
  u = losses.draw_loss_randomness(jax.random.key(2), (4096, 1, 1, 1), 2, "uniform")
  tu = losses.initial_time(u.time, "uniform", "linear")
  assert abs(float(tu.mean()) - 0.5) < 0.02
  tc = losses.initial_time(draws.time, "lognormal", "cosine")
  np.testing.assert_allclose(tc, 2 / np.pi * np.arctan(np.exp(draws.time)), atol=1e-6)
  alpha, sigma = losses.interpolant(jnp.asarray([0.0, 0.5, 1.0]), "cosine")
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="weighting"):
    losses.LossConfig(weighting="logit")


def test_projection_loss():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  np.testing.assert_allclose(losses.projection_loss([z, 3 * z], z), -1.0, atol=1e-6)
  np.testing.assert_allclose(losses.projection_loss([-z], z), 1.0, atol=1e-6)
  w = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  cos = np.sum(np.asarray(z) * np.asarray(w), -1) / (
      np.linalg.norm(z, axis=-1) * np.linalg.norm(w, axis=-1))
  np.testing.assert_allclose(losses.projection_loss([w, z], z), (-cos.mean() - 1) / 2, atol=1e-6)
