"""Streaming, sharded ADM evaluation (deepflow_jax.evaluation.suite).

The accumulators are checked against the one-shot metric functions on the same
rows; the feature pass runs a row-exact stand-in network (tests/evaluation_standin.py,
same interface as the FID Inception), so that any difference between batchings
or device counts can only come from the pipeline itself. Runs with 8 fake CPU
devices go through a subprocess (tests/evaluation_worker.py), because
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX is
imported; two JAX processes on loopback cover the multi-host paths. Wall time: ~45 s on
2 CPU cores (four subprocesses of ~8 s each), measured up to 110 s while other jobs
shared the cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cpu_env
from deepflow_jax.errors import UserError
from deepflow_jax.evaluation import metrics as M
from deepflow_jax.evaluation import features
from deepflow_jax.evaluation import reference
from deepflow_jax.evaluation import suite
from evaluation_standin import images, standin

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def _acts(seed, n, d, mean=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  return (mean + scale * rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / d**0.5
          ).astype(np.float32)


# ---------------------------------------------------------------------------
# Accumulators.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 333, 1000])
def test_running_statistics_equal_activation_statistics(chunk):
  # Mean 30, std ~1: the covariance cancels ~3 digits in a naive sum of x x^T.
  acts = _acts(0, 1000, 48, mean=30.0)
  mu_ref, sigma_ref = M.activation_statistics(acts)
  rs = features.RunningStatistics()
  for i in range(0, len(acts), chunk):
    rs.update(acts[i:i + chunk])
  mu, sigma = rs.statistics()
  # mu: ADM's float32 row-after-row mean, reproduced bit for bit.
  assert mu.dtype == np.float32
  np.testing.assert_array_equal(mu, mu_ref)
  # sigma: float64 rounding only (measured <= 3e-14 relative to the largest entry).
  np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-12 * np.abs(sigma_ref).max())
  assert rs.count == 1000


def test_running_statistics_merge():
  acts = _acts(1, 900, 16, mean=-5.0)
  parts = [features.RunningStatistics().update(acts[i:i + 300]) for i in (0, 300, 600)]
  merged = parts[0].merge(parts[1]).merge(parts[2]).merge(features.RunningStatistics())
  mu_ref, sigma_ref = M.activation_statistics(acts)
  mu, sigma = merged.statistics()
  # Merged float32 sums associate differently from one row-after-row sum, so mu differs by
  # the float32 summation error ADM's own mean carries (~sqrt(N) eps; measured 1.1e-6
  # relative at N = 900): rtol 1e-5. sigma: float64 rounding only.
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-5)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-12 * np.abs(sigma_ref).max())
  with pytest.raises(UserError, match="at least 2"):
    features.RunningStatistics().update(acts[:1]).statistics()
  with pytest.raises(UserError, match="16 features"):
    merged.update(acts[:, :8])


def test_running_inception_score_equals_inception_score():
  with np.load(os.path.join(DATA, "fid_inception_metrics.npz")) as f:
    probs = f["is_probs"]
  for split in (100, 128, 5000):
    want = M.inception_score(probs, split)
    for chunk in (7, 128, 500):
      acc = features.RunningInceptionScore(split)
      for i in range(0, len(probs), chunk):
        acc.update(probs[i:i + chunk])
      # Same float32 ops on the same splits: bit-identical.
      assert acc.result() == want and acc.count == 500
  # Only one split's buffer is held.
  assert acc._buf.shape == (5000, probs.shape[1])


def test_feature_pool():
  acts = _acts(2, 50, 8)
  for capacity in (None, 50):
    pool = features.FeaturePool(capacity)
    for i in range(0, 50, 16):
      pool.update(acts[i:i + 16])
    np.testing.assert_array_equal(pool.features(), acts)
  with pytest.raises(UserError, match="more than"):
    features.FeaturePool(10).update(acts)


# ---------------------------------------------------------------------------
# ADM .npz batches.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_array_reads_in_chunks(tmp_path, compressed):
  imgs = images(3, 37, size=5)
  path = str(tmp_path / "b.npz")
  (np.savez_compressed if compressed else np.savez)(path, arr_0=imgs, mu=np.zeros(3))
  arr = reference.open_image_batch(path)
  assert len(arr) == 37 and arr.shape == imgs.shape and arr.dtype == np.uint8
  chunks = list(arr.chunks(10))
  assert [len(c) for c in chunks] == [10, 10, 10, 7]
  np.testing.assert_array_equal(np.concatenate(chunks), imgs)
  np.testing.assert_array_equal(np.concatenate(list(arr.chunks(100))), imgs)


def test_npz_refusals(tmp_path):
  def save(name, **arrays):
    p = str(tmp_path / name)
    np.savez(p, **arrays)
    return p

  cases = [
      (save("f.npz", arr_0=np.zeros((4, 5, 5, 3), np.float32)), "dtype float32; expected uint8"),
      (save("g.npz", arr_0=np.zeros((4, 5, 5), np.uint8)), r"shape \(4, 5, 5\); expected"),
      (save("h.npz", arr_0=np.zeros((4, 5, 5, 1), np.uint8)), "expected"),
      (save("i.npz", images=np.zeros((4, 5, 5, 3), np.uint8)), "has no 'arr_0' array"),
      (str(tmp_path / "missing.npz"), "no such file"),
  ]
  (tmp_path / "j.npz").write_text("not a zip")
  cases.append((str(tmp_path / "j.npz"), "not a readable .npz"))
  for path, match in cases:
    with pytest.raises(UserError, match=match) as e:
      reference.open_image_batch(path)
    assert str(e.value).startswith(path) and "\n" not in str(e.value)
  with pytest.raises(UserError, match="holds 1 images; at least 2"):
    reference.open_image_batch(save("k.npz", arr_0=np.zeros((1, 5, 5, 3), np.uint8)), min_images=2)


# ---------------------------------------------------------------------------
# The feature pass and the metrics.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
  return standin()


def _direct(model, params, imgs):
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, imgs)
  out = {k: np.asarray(v) for k, v in out.items()}
  out["probs"] = np.asarray(jax.nn.softmax(out["logits"], axis=-1))
  return out


def test_feature_pass_matches_direct_computation(net, tmp_path):
  model, params = net
  imgs = images(4, 45)
  direct = _direct(model, params, imgs)
  path = str(tmp_path / "s.npz")
  np.savez(path, arr_0=imgs)
  sources = {"array": imgs, "npz": reference.open_image_batch(path),
             "uneven batches": iter([imgs[:3], imgs[3:4], imgs[4:40], imgs[40:]])}
  for name, src in sources.items():
    for batch in (8, 45, 64):
      acc = features.FeatureAccumulator(split_size=20, capacity=45)
      features.run_feature_pass(model, params, src if name != "uneven batches" else
                             iter([imgs[:3], imgs[3:4], imgs[4:40], imgs[40:]]),
                             acc, batch_size=batch, log=None)
      assert acc.count == 45, name
      # The stand-in is row-exact, so features are bit-identical to one direct call,
      # padding rows are dropped and order is kept.
      np.testing.assert_array_equal(acc.pool.features(), direct["pool"])
      mu, sigma = acc.pool_stats.statistics()
      mu_ref, sigma_ref = M.activation_statistics(direct["pool"])
      np.testing.assert_array_equal(mu, mu_ref)
      np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-12 * np.abs(sigma_ref).max())
      mu_s, _ = acc.spatial_stats.statistics()
      np.testing.assert_array_equal(mu_s, M.activation_statistics(direct["spatial"])[0])
      assert acc.inception.result() == M.inception_score(direct["probs"], 20)


def test_feature_pass_refuses_bad_images(net):
  model, params = net
  acc = features.FeatureAccumulator()
  with pytest.raises(UserError, match="uint8 NHWC"):
    features.run_feature_pass(model, params, images(0, 4).astype(np.float32), acc, log=None)
  for sizes in ((4, 4), (3, 3)):  # whole batches, and batches regrouped across the size change
    with pytest.raises(UserError, match="one size"):
      batches = iter([images(0, sizes[0]), images(0, sizes[1], size=6)])
      features.run_feature_pass(model, params, batches, acc, batch_size=4, log=None)
  with pytest.raises(UserError, match="uint8 NHWC"):
    features.run_feature_pass(model, params, iter([images(0, 3)[..., 0]]), acc, log=None)


def test_evaluate_samples(net):
  model, params = net
  ref_imgs, samples = images(1, 40), images(2, 50, shift=20)
  ref = reference.compute_reference_statistics(model, params, ref_imgs, batch_size=16, log=None)
  res = suite.evaluate_samples(model, params, samples, ref, batch_size=16, log=None)
  assert set(res) == {"fid", "sfid", "inception_score", "precision", "recall", "num_samples"}
  assert res["num_samples"] == 50
  # Same numbers as the one-shot functions on the direct features (ADM's argument order:
  # samples first): the covariances differ by float64 rounding only, so rtol 1e-12
  # (measured 5e-16).
  r, s = _direct(model, params, ref_imgs), _direct(model, params, samples)
  np.testing.assert_allclose(res["fid"], M.frechet_distance(
      *M.activation_statistics(s["pool"]), *M.activation_statistics(r["pool"])), rtol=1e-12)
  np.testing.assert_allclose(res["sfid"], M.frechet_distance(
      *M.activation_statistics(s["spatial"]), *M.activation_statistics(r["spatial"])),
                             rtol=1e-12)
  assert res["inception_score"] == M.inception_score(s["probs"])
  assert (res["precision"], res["recall"]) == M.precision_recall(r["pool"], s["pool"])
  assert res["fid"] > 1e-3 and 1.0 < res["inception_score"] < 10.0
  # A reference of the samples themselves: FID ~0 (float64 rounding of tr terms ~10).
  same = reference.compute_reference_statistics(model, params, samples, log=None)
  res_same = suite.evaluate_samples(model, params, samples, same, log=None)
  assert abs(res_same["fid"]) < 1e-8 and res_same["precision"] == res_same["recall"] == 1.0
  # Without pool features (statistics only), P/R are None; the same batching gives the
  # same FID bit for bit (deterministic).
  stats_only = reference.ReferenceStatistics(ref.mu, ref.sigma)
  res2 = suite.evaluate_samples(model, params, samples, stats_only, batch_size=16, log=None)
  assert res2["fid"] == res["fid"] and res2["sfid"] is None and res2["precision"] is None


def _worker(devices, batch, processes=1):
  """Runs tests/evaluation_worker.py with ``processes`` JAX processes of ``devices`` devices."""
  cmd = [sys.executable, os.path.join(ROOT, "tests", "evaluation_worker.py"), str(batch)]
  if processes == 1:
    cmds = [cmd]
  else:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    cmds = [cmd + [str(port), str(processes), str(i)] for i in range(processes)]
  procs = [subprocess.Popen(c, cwd=ROOT, env=cpu_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in cmds]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return json.loads(outs[0][0].strip().splitlines()[-1])


def test_device_count_and_batch_size_invariance():
  """1 device (batch 8) vs 8 devices (batch 24) vs 2 processes x 2 devices (batch 12).

  The same metrics up to float64 noise. The two-process run (gloo on loopback)
  takes the multi-host paths: outputs not fully addressable, gathered with
  process_allgather; P/R blocks built per process. (Batch-size invariance on one
  device is also checked, bit for bit, by test_feature_pass_matches_direct_computation.)
  """
  runs = [_worker(1, 8), _worker(8, 24), _worker(2, 12, processes=2)]
  assert [(r["devices"], r["processes"]) for r in runs] == [(1, 1), (8, 1), (4, 2)]
  base = runs[0]
  for r in runs[1:]:
    # Features and float32 means: bit-identical (row-exact stand-in, order kept).
    assert r["pool"] == base["pool"] and r["mu"] == base["mu"] and r["ref_mu_s"] == base["ref_mu_s"]
    # Covariances and FIDs: float64 rounding of differently grouped sums only
    # (sigma entries ~1e-3; FIDs ~0.03-1 from full-rank statistics).
    np.testing.assert_allclose(r["sigma"], base["sigma"], rtol=0, atol=1e-15)
    for k in ("fid", "sfid"):
      np.testing.assert_allclose(r[k], base[k], rtol=1e-12)
    # Inception Score (float32, same splits) and P/R (float16 blocks split over devices
    # by whole rows): identical.
    for k in ("inception_score", "precision", "recall", "num_samples"):
      assert r[k] == base[k], k


# ---------------------------------------------------------------------------
# Reference batches and the cache.
# ---------------------------------------------------------------------------


def test_load_reference_computes_caches_and_reuses(net, tmp_path, monkeypatch):
  model, params = net
  ref_imgs = images(1, 40)
  path = str(tmp_path / "ref.npz")
  np.savez(path, arr_0=ref_imgs)
  before = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  lines = []
  ref = reference.load_reference(path, model, params, log=lines.append, batch_size=16)
  want = reference.compute_reference_statistics(model, params, ref_imgs, log=None)
  for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
    np.testing.assert_array_equal(getattr(ref, k), getattr(want, k))
  caches = [f for f in os.listdir(tmp_path) if ".features-" in f]
  assert len(caches) == 1 and not any(".tmp" in f for f in os.listdir(tmp_path))
  assert (os.path.getsize(path), os.stat(path).st_mtime_ns) == before  # never written
  # Second call: from the cache, without running the network.
  monkeypatch.setattr(reference, "compute_reference_statistics",
                      lambda *a, **k: pytest.fail("recomputed despite the cache"))
  lines.clear()
  again = reference.load_reference(path, model, params, log=lines.append)
  assert any("from the cache" in l for l in lines)
  np.testing.assert_array_equal(again.pool, ref.pool)
  # Other weights -> another key -> recomputed (here: refused by the patch above).
  other = jax.tree.map(lambda a: a + 1.0, params)
  with pytest.raises(pytest.fail.Exception):
    reference.load_reference(path, model, other, log=None)


def test_load_reference_prefers_file_statistics(net, tmp_path):
  model, params = net
  ref_imgs = images(1, 40)
  d = 24
  mu, sigma = np.full(d, 0.5, np.float32), np.eye(d) * 2.0
  path = str(tmp_path / "ref.npz")
  np.savez(path, arr_0=ref_imgs, mu=mu, sigma=sigma)
  ref = reference.load_reference(path, model, params, log=None)
  # ADM uses the file's statistics; computed ones only fill what it lacks (mu_s/sigma_s here).
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  want = reference.compute_reference_statistics(model, params, ref_imgs, log=None)
  np.testing.assert_array_equal(ref.mu_s, want.mu_s)
  np.testing.assert_array_equal(ref.pool, want.pool)
  # Statistics only, no images: usable for FID, no P/R, nothing computed or cached.
  stats_path = str(tmp_path / "stats.npz")
  np.savez(stats_path, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  ref2 = reference.load_reference(stats_path, model, params, log=None)
  assert ref2.pool is None and ref2.mu_s is not None
  with pytest.raises(UserError, match="neither arr_0"):
    np.savez(str(tmp_path / "empty.npz"), x=np.zeros(3))
    reference.load_reference(str(tmp_path / "empty.npz"), model, params, log=None)
  with pytest.raises(UserError, match="expected float"):
    np.savez(str(tmp_path / "bad.npz"), mu=mu, sigma=np.eye(3))
    reference.load_reference(str(tmp_path / "bad.npz"), model, params, log=None)


def test_load_reference_unwritable_directory(net, tmp_path, monkeypatch):
  """A cache that cannot be written (read-only directory) is reported and skipped."""
  model, params = net
  path = str(tmp_path / "ref.npz")
  np.savez(path, arr_0=images(1, 40))

  def refuse(p, arrays):
    raise PermissionError(13, "Permission denied", p)

  monkeypatch.setattr(reference, "_atomic_savez", refuse)
  lines = []
  ref = reference.load_reference(path, model, params, log=lines.append)
  assert ref.pool is not None and ref.mu is not None
  assert any("could not write the cache" in l for l in lines)
  assert os.listdir(tmp_path) == ["ref.npz"]
