"""Digits classifier, Frechet distance and generated-sample evaluation."""
import numpy as np
import pytest

from deepflow_jax.data import digits
from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import digits as digits_eval

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def classifier8(tmp_path_factory):
  path = tmp_path_factory.mktemp("clf") / "digits8.msgpack"
  model, params = digits_eval.train_classifier(8, seed=0, cache_path=path)
  return model, params, path


@pytest.fixture(scope="module")
def heldout8():
  return digits.load_digits_split(8)[1]


def test_classifier_accuracy_and_shapes(classifier8, heldout8):
  model, params, _ = classifier8
  x, y = heldout8
  logits, feats = digits_eval.classify(model, params, x, batch_size=128)  # 3 padded batches
  assert logits.shape == (len(y), 10) and feats.shape == (len(y), digits_eval.FEATURE_DIM)
  assert np.mean(logits.argmax(-1) == y) >= 0.95
  logits1, _ = digits_eval.classify(model, params, x[:5])
  np.testing.assert_allclose(logits1, logits[:5], rtol=1e-5, atol=1e-5)


def test_classifier_cache(classifier8, heldout8):
  model, params, path = classifier8
  assert path.exists()
  _, cached = digits_eval.train_classifier(8, seed=0, cache_path=path)  # loads, no training
  x, _ = heldout8
  np.testing.assert_array_equal(digits_eval.classify(model, params, x)[0],
                                digits_eval.classify(model, cached, x)[0])


def test_frechet_distance_identical_and_shifted():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  assert abs(digits_eval.frechet_distance(a, a)) < 1e-8
  shift = rng.normal(size=16)
  # Same samples shifted: identical covariances, means differ by exactly `shift`.
  np.testing.assert_allclose(digits_eval.frechet_distance(a, a + shift), shift @ shift, rtol=1e-9)


def test_frechet_distance_analytic_gaussians():
  # Samples whitened to exactly zero mean / identity covariance, then scaled:
  # N(0, I) vs N(m, s^2 I) in d dims -> |m|^2 + d (1 - s)^2.
  rng = np.random.default_rng(1)
  d, n = 8, 400
  x = rng.normal(size=(n, d))
  x -= x.mean(0)
  x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
  m, s = np.full(d, 0.5), 3.0
  want = m @ m + d * (1 - s) ** 2
  np.testing.assert_allclose(digits_eval.frechet_distance(x, s * x + m), want, rtol=1e-9)
  # Rank-deficient covariances (fewer samples than dims) stay finite and real.
  few = rng.normal(size=(5, 32))
  assert np.isfinite(digits_eval.frechet_distance(few, few + 1.0))


def test_evaluate_generated(classifier8, heldout8):
  model, params, _ = classifier8
  x, y = heldout8
  real = digits_eval.evaluate_generated(x, y, x, model=model, params=params, heldout_labels=y)
  assert real["class_accuracy"] >= 0.95
  assert real["classifier_heldout_accuracy"] == real["class_accuracy"]
  assert real["frechet_distance"] < 1e-6 < real["frechet_distance_real_vs_real"]
  shuffled = np.random.default_rng(0).permutation(y)
  assert digits_eval.evaluate_generated(
      x, shuffled, x, model=model, params=params)["class_accuracy"] < 0.25
  noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
  bad = digits_eval.evaluate_generated(noise, y, x, model=model, params=params)
  assert bad["frechet_distance"] > 10 * bad["frechet_distance_real_vs_real"]
  with pytest.raises(UserError, match="NHWC"):
    digits_eval.evaluate_generated(x[..., 0], y, x, model=model, params=params)


def test_classifier_deterministic():
  import jax
  _, p1 = digits_eval.train_classifier(8, seed=1, epochs=1)
  _, p2 = digits_eval.train_classifier(8, seed=1, epochs=1)
  _, p3 = digits_eval.train_classifier(8, seed=2, epochs=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
  assert not np.array_equal(p1["Dense_1"]["kernel"], p3["Dense_1"]["kernel"])
