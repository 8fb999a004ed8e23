"""ADM metric arithmetic (deepflow_jax.evaluation.metrics) against the ADM evaluator's own outputs.

Golden data in tests/data/ (copied from the reference run, see fid_inception_metrics.json,
which says what every array is): fid_inception_metrics.npz is the reference .npz
without fid_well_acts1/2 and fid_identical_acts1/2, which are exact copies of
feats_ref / feats_sample / feats_ref (checked when the subset was made), so the
tests take them from there. The golden values were produced by ADM's
evaluator.py itself (numpy 2.4, scipy 1.17, TF-CPU for the precision/recall
distance block).

Tolerances are the json's ``suggested_tolerances`` unless a comment says otherwise.
Nothing here is compared bitwise: the golden values come from one machine's OpenBLAS
kernels, and another kernel sums in another order (issue 17: OPENBLAS_CORETYPE=Prescott
moves the covariances by 2e-15 relative and, through the near-singular sqrtm, the zerovar
FID by 1.5e-8 relative). Each tolerance is the arithmetic's bound, with the deviation
measured over the Prescott, Sandybridge, Haswell, SkylakeX and Zen kernels beside it. Wall time: ~30 s on 2 idle CPU
cores, ~20-25 s of it the single 2048x2048 scipy sqrtm of test_fid_large (accepted
once: it is the only way to check the cancellation of a real-size FID); measured
110 s in all while other jobs shared the two cores (sqrtm alone 83 s).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import metrics as M

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

DATA = os.path.join(os.path.dirname(__file__), "data")
FID_CASES = ("well", "rankdef", "zerovar", "identical")
# Acts not stored in the subset: they are these arrays (see the module docstring).
ALIASES = {"fid_well_acts1": "feats_ref", "fid_well_acts2": "feats_sample",
           "fid_identical_acts1": "feats_ref", "fid_identical_acts2": "feats_ref"}
PR_EXACT = ("float64_exact", "float32_formula")


@pytest.fixture(scope="module")
def spec():
  with open(os.path.join(DATA, "fid_inception_metrics.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def g():
  with np.load(os.path.join(DATA, "fid_inception_metrics.npz")) as f:
    d = {k: f[k] for k in f.files}
  for k, v in ALIASES.items():
    d[k] = d[v]
  return d


# ---------------------------------------------------------------------------
# Statistics and FID.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", FID_CASES)
def test_activation_statistics_match_adm(g, case):
  # ADM's compute_statistics calls: np.mean of float32 (numpy's pairwise float32 sum: its
  # rounding differs by at most ~log2(N) ulps between summation orders, so rtol 1e-6; measured
  # equal on all five kernels) and np.cov in float64 through BLAS (rtol 1e-12 of the largest
  # entry: N <= 2048 float64 terms bound the summation-order error by ~N * 1.1e-16 = 2.3e-13;
  # measured up to 2.4e-15).
  for i in (1, 2):
    mu, sigma = M.activation_statistics(g[f"fid_{case}_acts{i}"])
    assert mu.dtype == np.float32 and sigma.dtype == np.float64
    want_mu, want_sigma = g[f"fid_{case}_mu{i}"], g[f"fid_{case}_sigma{i}"]
    np.testing.assert_allclose(mu, want_mu, rtol=1e-6, atol=1e-6 * np.abs(want_mu).max())
    np.testing.assert_allclose(sigma, want_sigma, rtol=0, atol=1e-12 * np.abs(want_sigma).max())


@pytest.mark.parametrize("case", FID_CASES)
def test_frechet_distance_matches_adm(g, spec, case):
  res = spec["results"]["fid"][case]
  assert float(g[f"fid_{case}_value_adm"]) == res["fid_adm_code"]
  stats = [g[f"fid_{case}_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")]
  fid = M.frechet_distance(*stats)
  assert isinstance(fid, float)
  if case == "identical":
    # atol 1e-8 (json): the exact answer is 0 and ADM gives -1.5e-12 (not clipped);
    # measured: bit-identical to ADM.
    assert abs(fid - res["fid_adm_code"]) <= 1e-8
  else:
    # rtol 1e-6 (json). Measured: equal to ADM's value on the Haswell and Zen kernels, up to
    # 1.5e-8 relative on the others (zerovar's sqrtm of a near-singular product amplifies the
    # 1e-15 covariance differences; rankdef goes through scipy's complex result and .real).
    np.testing.assert_allclose(fid, res["fid_adm_code"], rtol=1e-6)
  # The statistics recomputed from the activations give the same number, to the same
  # tolerance (they differ from the stored ones by the BLAS bound above).
  mu1, s1 = M.activation_statistics(g[f"fid_{case}_acts1"])
  mu2, s2 = M.activation_statistics(g[f"fid_{case}_acts2"])
  recomputed = M.frechet_distance(mu1, s1, mu2, s2)
  if case == "identical":
    assert abs(recomputed - res["fid_adm_code"]) <= 1e-8
  else:
    np.testing.assert_allclose(recomputed, res["fid_adm_code"], rtol=1e-6)


def test_frechet_distance_keeps_float32_mean_term(g, spec):
  # ADM's mu is np.mean of float32 activations (float32) and diff.dot(diff) is then float32;
  # float64 means give the json's fid_mu_float64_same_sqrtm, 3.4e-6 (1e-7 relative) away. Both
  # calls share the covariances, so their trace terms are the same floats in this process and
  # the difference of the two results is the mean term's alone: it must equal ADM's.
  res = spec["results"]["fid"]["zerovar"]
  sig1, sig2 = g["fid_zerovar_sigma1"], g["fid_zerovar_sigma2"]
  mu1 = g["fid_zerovar_acts1"].astype(np.float64).mean(0)
  mu2 = g["fid_zerovar_acts2"].astype(np.float64).mean(0)
  f64 = M.frechet_distance(mu1, sig1, mu2, sig2)
  f32 = M.frechet_distance(g["fid_zerovar_mu1"], sig1, g["fid_zerovar_mu2"], sig2)
  want = res["fid_mu_float64_same_sqrtm"] - res["fid_adm_code"]
  # The float32 mean term is ~2.0, a BLAS sdot over 64 terms whose kernels round differently
  # (measured: up to 2 float32 ulps = 4.8e-7 on Prescott and SkylakeX, 0 on the others).
  # atol 1e-6 (4 ulps) holds for every kernel and still tells float32 means from float64
  # ones, which differ by 3.4e-6 (14 ulps).
  assert abs(want) > 3e-6
  assert abs((f64 - f32) - want) <= 1e-6
  # rtol 1e-6 (json) against each of ADM's values; measured <= 1.5e-8 across the kernels.
  np.testing.assert_allclose(f32, res["fid_adm_code"], rtol=1e-6)
  np.testing.assert_allclose(f64, res["fid_mu_float64_same_sqrtm"], rtol=1e-6)


def test_frechet_distance_eps_branch(g, monkeypatch):
  """A non-finite first square root is retried with 1e-6 * I added to both covariances."""
  mu1, s1, mu2, s2 = [g[f"fid_well_{k}"] for k in ("mu1", "sigma1", "mu2", "sigma2")]
  calls = []
  real_sqrtm = M._sqrtm

  def fake(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(M, "_sqrtm", fake)
  fid = M.frechet_distance(mu1, s1, mu2, s2)
  eye = np.eye(len(mu1)) * 1e-6
  np.testing.assert_array_equal(calls[1], (s1 + eye).dot(s2 + eye))
  # The offset moves the well-conditioned answer by ~1e-6 * trace terms only.
  assert len(calls) == 2 and abs(fid - 28.025115013985214) < 1e-3


def test_frechet_distance_refuses_complex_and_bad_shapes():
  d = 4
  with pytest.raises(UserError, match="imaginary component"):
    # sqrtm(-I) = i I: imaginary diagonal 1 > 1e-3, as ADM's ValueError.
    M.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), -np.eye(d))
  with pytest.raises(UserError, match="expected means"):
    M.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d + 1), np.eye(d + 1))
  with pytest.raises(UserError, match="at least 2"):
    M.activation_statistics(np.zeros((1, d), np.float32))


def _make_acts(seed, n, d=2048, shift=0.0):
  """fid_large's recipe, as the json's ``fid_large.recipe_python`` states it."""
  rs = np.random.RandomState(seed)
  z = rs.standard_normal((n, d))
  j = np.arange(d, dtype=np.float64)
  scale = 10.0 ** (-3.0 * j / (d - 1))
  mean = 0.2 + 0.3 * np.cos(j) + shift
  x = np.maximum(z * scale + mean * scale, 0.0)
  x[:, 1:] = x[:, 1:] + 0.5 * x[:, :-1]
  return x.astype(np.float32)


def test_fid_large(spec):
  """2048-d FID with realistic cancellation (tr(sigma) ~ 79 vs FID ~ 3.65), regenerated.

  The one scipy sqrtm of a 2048x2048 matrix takes ~20-25 s on 2 idle CPU cores: accepted once.
  """
  big = spec["fid_large"]
  cfg, ref = big["config"], big["scipy_1_17_1"]
  a1 = _make_acts(cfg["seed1"], cfg["n1"])
  a2 = _make_acts(cfg["seed2"], cfg["n2"], shift=cfg["shift2"])
  # Regeneration check: float64 sums may differ in the last digits across numpy builds.
  np.testing.assert_allclose(a1.sum(dtype=np.float64), ref["a1_sum"], rtol=1e-12)
  np.testing.assert_allclose(a2.sum(dtype=np.float64), ref["a2_sum"], rtol=1e-12)
  mu1, s1 = M.activation_statistics(a1)
  mu2, s2 = M.activation_statistics(a2)
  np.testing.assert_allclose(np.trace(s1), ref["adm_instrumentation"]["tr_sigma1"], rtol=1e-12)
  fid = M.frechet_distance(mu1, s1, mu2, s2)
  # rtol 1e-6 (json); measured: identical to ADM's value on scipy 1.17.1.
  np.testing.assert_allclose(fid, ref["fid_adm_code"], rtol=1e-6)


# ---------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", [5000, 100, 128])
def test_inception_score_matches_adm(g, spec, split):
  res = spec["results"]["inception_score"][str(split)]
  value = M.inception_score(g["is_probs"], split_size=split)
  # rtol 1e-5 (json); measured: bit-identical (same float32 numpy ops, same chunking).
  np.testing.assert_allclose(value, res["is_adm_code_float32"], rtol=1e-5)
  np.testing.assert_allclose(value, float(g[f"is_value_split{split}"]), rtol=1e-5)
  # The float64 value is ~2e-7 relative away (3-4 float32 ulps): the float32 arithmetic is
  # what is reproduced. numpy's vectorised float32 exp/log may differ by an ulp between SIMD
  # targets, so within 1 ulp of ADM's float32 value (measured equal on the five kernels).
  ulp = float(np.spacing(np.float32(res["is_adm_code_float32"])))
  assert abs(value - res["is_adm_code_float32"]) <= ulp
  # Chunks of `split` samples, a short last one weighted like the others (128: 128,128,128,116).
  parts = [M.split_score(g["is_probs"][i:i + split]) for i in range(0, 500, split)]
  assert [p.dtype for p in parts] == [np.float32] * len(res["split_sizes"])
  np.testing.assert_allclose(parts, res["per_split_float32"], rtol=1e-6)


def test_inception_score_zero_probability_is_nan(g, spec):
  # ADM: 0 * log(0) = nan propagates to IS = nan (the json's trap).
  assert np.isnan(spec["results"]["is_trap_zero_prob_adm_result"])
  assert np.isnan(M.inception_score(g["is_trap_zero_prob_probs"]))
  assert np.isfinite(M.inception_score(g["is_trap_zero_prob_probs"][1:]))


# ---------------------------------------------------------------------------
# Precision / recall.
# ---------------------------------------------------------------------------


def _radii(g, distance):
  return (M.manifold_radii(g["feats_ref"], distance=distance),
          M.manifold_radii(g["feats_sample"], distance=distance))


def test_precision_recall_float16_default(g, spec):
  n = len(g["feats_sample"])
  p, r = M.precision_recall(g["feats_ref"], g["feats_sample"])
  # The default float16 path is the reference's GPU-like emulation bit for bit (measured:
  # radii identical, P/R 0.614/0.82), so compared exactly.
  rr, rs = _radii(g, "float16")
  np.testing.assert_array_equal(rr, g["pr_radii_ref_fp16_emulation"])
  np.testing.assert_array_equal(rs, g["pr_radii_sample_fp16_emulation"])
  assert (p, r) == (float(g["pr_precision_fp16_emulation"]), float(g["pr_recall_fp16_emulation"]))
  # Against ADM's own TF-CPU float16 run: |diff| <= 0.01 (json); measured 0.000 / 0.004.
  assert abs(p - float(g["pr_precision_adm_tf_cpu"])) <= 0.01
  assert abs(r - float(g["pr_recall_adm_tf_cpu"])) <= 0.01
  # float16 radii vs TF-CPU's: float16 quantisation (json: up to 0.25% vs exact); measured
  # 0.27% max, so 0.5%.
  np.testing.assert_allclose(rr, g["pr_radii_ref_adm_tf_cpu"], rtol=5e-3)
  np.testing.assert_allclose(rs, g["pr_radii_sample_adm_tf_cpu"], rtol=5e-3)
  # ...and they do differ from exact distances (the float16 path is really taken).
  assert not np.allclose(rr, g["pr_radii_ref_float64_exact"], rtol=1e-4)
  assert spec["results"]["precision_recall"]["adm_code_tf_cpu"]["precision"] == 0.614
  assert n == 500


def test_float16_distances_vs_adm_tf_cpu(g):
  """The distance block itself vs the one ADM's TF graph returned on CPU (float16 values)."""
  d = M.pairwise_sq_distances(g["feats_ref"], g["feats_sample"])
  tf = g["pr_dist_ref_sample_adm_tf_cpu_fp16"].astype(np.float32)
  # TF-CPU sums in another order: the json's emulation matched 76-79% of entries exactly
  # with max |diff| 2.0 (1-2 float16 ulps at 512-2048); measured here 78.5% and 2.0.
  assert np.mean(d == tf) >= 0.75
  assert np.abs(d - tf).max() <= 2.0
  # Every entry is a float16 value.
  np.testing.assert_array_equal(d, d.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("variant", PR_EXACT)
def test_precision_recall_float32_equals_exact(g, variant):
  n = len(g["feats_sample"])
  p, r = M.precision_recall(g["feats_ref"], g["feats_sample"], distance="float32")
  # Exact-distance implementations: equal within 1/N (a tie can flip one point); measured equal.
  assert abs(p - float(g[f"pr_precision_{variant}"])) <= 1 / n
  assert abs(r - float(g[f"pr_recall_{variant}"])) <= 1 / n
  rr, rs = _radii(g, "float32")
  # rtol 1e-5 (json); measured 9.5e-7 (float32 rounding of squared distances ~600).
  np.testing.assert_allclose(rr, g[f"pr_radii_ref_{variant}"], rtol=1e-5)
  np.testing.assert_allclose(rs, g[f"pr_radii_sample_{variant}"], rtol=1e-5)


def test_precision_recall_float16_overflow_falls_back_to_float32(g):
  scale = float(g["pr_overflow_scale"])
  ref, sample = g["feats_ref"] * scale, g["feats_sample"] * scale
  # |x|^2 > 65504: the float16 block is not finite, so the whole block is redone in float32.
  d16 = np.asarray(M._sq_distances(jnp.asarray(ref), jnp.asarray(sample), "float16"))
  assert not np.isfinite(d16).all()
  d = M.pairwise_sq_distances(ref, sample)
  assert np.isfinite(d).all()
  np.testing.assert_array_equal(d, M.pairwise_sq_distances(ref, sample, distance="float32"))
  p, r = M.precision_recall(ref, sample)
  n = len(sample)
  # ADM fell back to float32 too: equal within 1/N (ties); measured equal (0.61, 0.814).
  assert abs(p - float(g["pr_overflow_precision_adm_tf_cpu"])) <= 1 / n
  assert abs(r - float(g["pr_overflow_recall_adm_tf_cpu"])) <= 1 / n
  # Radii: float32 arithmetic on both sides, rtol 1e-5 (exact-variant tolerance); measured 9.5e-7.
  np.testing.assert_allclose(M.manifold_radii(ref), g["pr_overflow_radii_ref_adm_tf_cpu"],
                             rtol=1e-5)
  np.testing.assert_allclose(M.manifold_radii(sample), g["pr_overflow_radii_sample_adm_tf_cpu"],
                             rtol=1e-5)


@pytest.mark.parametrize("distance", M.DISTANCE_MODES)
def test_precision_recall_blocking_invariant(g, distance):
  """Blocks that do not divide N (ADM's check used 128x96) give the same radii and P/R.

  float16: bit-identical (rounding every result to float16 absorbs the float32
  summation order). float32: XLA's CPU matmul picks its kernel by block shape, so
  radii move by an ulp (measured 8e-7 relative): rtol 1e-5, P/R within 1/N (measured equal).
  """
  n = len(g["feats_sample"])
  full = M.precision_recall(g["feats_ref"], g["feats_sample"], distance=distance)
  radii = _radii(g, distance)[0]
  for block in (96, 128):
    pr = M.precision_recall(g["feats_ref"], g["feats_sample"], distance=distance,
                            block_size=block)
    blocked = M.manifold_radii(g["feats_ref"], distance=distance, block_size=block)
    if distance == "float16":
      assert pr == full
      np.testing.assert_array_equal(blocked, radii)
    else:
      np.testing.assert_allclose(pr, full, rtol=0, atol=1 / n)
      np.testing.assert_allclose(blocked, radii, rtol=1e-5)


def test_precision_recall_refusals(g):
  with pytest.raises(UserError, match="at least 4 points"):
    M.precision_recall(g["feats_ref"][:3], g["feats_sample"])
  with pytest.raises(UserError, match="dimensions"):
    M.precision_recall(g["feats_ref"], g["feats_sample"][:, :10])
  with pytest.raises(UserError, match="distance must be one of"):
    M.precision_recall(g["feats_ref"], g["feats_sample"], distance="float64")
