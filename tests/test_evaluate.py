"""python -m deepflow_jax.evaluate: end to end with the real FID Inception port, and bad inputs.

The end-to-end run uses the golden random-weight FID Inception (rebuilt from
tests/data/fid_inception_tiny.json's recipe by test_inception.golden_state_dict and
torch.save-d into tmp_path, ~95 MB) on the golden set's four 64x64 images, for
which tests/data/fid_inception_tiny.npz holds ADM's own features (``adm_pool3``,
``adm_sfid_spatial_flat2023``, ``adm_softmax_nobias``). The reference .npz carries
precomputed statistics of subsets of those features, so the expected FID/sFID
are ADM arithmetic on golden features; the CLI recomputes them from the port's
features. Wall time: ~60-90 s on 2 idle CPU cores, most of it the two scipy
square roots of ~2048x2048 matrices (FID, sFID) inside the CLI and one
compilation of the network; the bad-input cases take a few seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import cpu_env
from deepflow_jax import evaluate
from deepflow_jax.evaluation import metrics as M
from test_inception import golden_state_dict

# Rerun by .ci/run under other OpenBLAS kernels and XLA CPU targets (conftest: `numeric`).
pytestmark = pytest.mark.numeric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# frechet_distance(activation_statistics(adm_pool3), activation_statistics(adm_pool3[[0, 1, 2]]))
# and the same for adm_sfid_spatial_flat2023 with rows [1, 2, 3]: ADM arithmetic on the golden
# features (computed once with deepflow_jax.evaluation.metrics, which test_metrics checks
# against ADM; recomputing here would cost two more ~20 s square roots).
GOLDEN_FID = 19.90523029718821
GOLDEN_SFID = 60.04930477436801


def _env():
  return cpu_env(1)


def _cli(args, timeout=600):
  return subprocess.run([sys.executable, "-m", "deepflow_jax.evaluate"] + list(args), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(DATA, "fid_inception_tiny.npz")) as f:
    return {k: f[k] for k in ("images_uint8_nhwc", "adm_pool3", "adm_sfid_spatial_flat2023",
                              "adm_softmax_nobias")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  import torch  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("weights") / "pt_inception-golden.pth")
  torch.save({k: torch.from_numpy(v) for k, v in golden_state_dict().items()}, path)
  return path


def test_evaluate_end_to_end(tmp_path, golden, weights):
  imgs = golden["images_uint8_nhwc"]
  samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
  np.savez(samples, arr_0=imgs, labels=np.arange(4))
  mu, sigma = M.activation_statistics(golden["adm_pool3"][[0, 1, 2]])
  mu_s, sigma_s = M.activation_statistics(golden["adm_sfid_spatial_flat2023"][[1, 2, 3]])
  np.savez(ref, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  ref_stat = os.stat(ref)
  out = str(tmp_path / "out" / "metrics.json")
  proc = _cli([f"--samples={samples}", f"--reference={ref}", f"--inception={weights}",
               f"--output={out}", "--batch_size=4"])
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.load(open(out))
  assert res["num_samples"] == 4 and res["settings"]["reference_images"] == 4
  # The port's features match ADM's to <= 7e-6 absolute (test_inception); with 4 samples
  # the covariances are rank 3, and the square root of their singular product amplifies
  # that: measured 5e-6 (FID) and 1.1e-6 (sFID) relative, so rtol 1e-4.
  np.testing.assert_allclose(res["fid"], GOLDEN_FID, rtol=1e-4)
  np.testing.assert_allclose(res["sfid"], GOLDEN_SFID, rtol=1e-4)
  # IS from softmax probabilities within 1e-6 of ADM's (json tolerance): rtol 1e-5;
  # measured bit-identical.
  np.testing.assert_allclose(res["inception_score"],
                             M.inception_score(golden["adm_softmax_nobias"]), rtol=1e-5)
  # Samples = reference images: every point lies in the other set's balls.
  assert res["precision"] == 1.0 and res["recall"] == 1.0
  # The table, the cache next to the reference, the reference untouched, no temp files.
  for name in ("FID", "sFID", "Inception Score", "Precision", "Recall", "samples"):
    assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name
  cached = [f for f in os.listdir(tmp_path) if f.startswith("ref.features-")]
  assert len(cached) == 1, os.listdir(tmp_path)
  after = os.stat(ref)
  assert (after.st_mtime_ns, after.st_size) == (ref_stat.st_mtime_ns, ref_stat.st_size)
  assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


# ---------------------------------------------------------------------------
# Bad inputs: one "error:" line naming the file, exit 2, no output written.
# ---------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
  imgs = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  paths = {}

  def save(name, **arrays):
    paths[name] = str(tmp_path / f"{name}.npz")
    np.savez(paths[name], **arrays)

  save("good", arr_0=imgs)
  save("float", arr_0=imgs.astype(np.float32))
  save("gray", arr_0=imgs[..., 0])
  save("few", arr_0=imgs[:3])
  save("nonadm", images=imgs)
  save("stats_bad", mu=np.zeros(4), sigma=np.eye(3))
  paths["garbage_pth"] = str(tmp_path / "garbage.pth")
  with open(paths["garbage_pth"], "wb") as f:
    f.write(b"\x80\x02not a torch file at all" * 10)
  paths["missing"] = str(tmp_path / "missing.npz")
  paths["out"] = str(tmp_path / "metrics.json")
  paths["dir"] = str(tmp_path)
  return paths


BAD = [
    # (samples, reference, inception, output, expected text, file named)
    ("missing", "good", "garbage_pth", "out", "no such file", "missing"),
    ("nonadm", "good", "garbage_pth", "out", "has no 'arr_0' array", "nonadm"),
    ("float", "good", "garbage_pth", "out", "dtype float32; expected uint8", "float"),
    ("gray", "good", "garbage_pth", "out", "expected (N, H, W, 3)", "gray"),
    ("few", "good", "garbage_pth", "out", "holds 3 images; at least 4 are needed (the statistics "
     "need >= 2", "few"),
    ("good", "nonadm", "garbage_pth", "out", "neither arr_0 (images) nor mu/sigma", "nonadm"),
    ("good", "stats_bad", "garbage_pth", "out", "expected float (D,) and (D, D)", "stats_bad"),
    ("good", "missing", "garbage_pth", "out", "no such file", "missing"),
    ("good", "good", "missing", "out", "no such file", "missing"),
    ("good", "good", "garbage_pth", "out", "", "garbage_pth"),
    ("good", "good", "garbage_pth", "dir", "is a directory", "dir"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{b[0]}-{b[1]}-{b[2]}-{b[3]}" for b in BAD])
def test_bad_inputs(files, capsys, case):
  s, r, w, o, text, named = case
  rc = evaluate.main([f"--samples={files[s]}", f"--reference={files[r]}",
                      f"--inception={files[w]}", f"--output={files[o]}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert text in err[0] and files[named] in err[0], err
  assert not os.path.exists(files["out"])


def test_missing_flag_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["--samples=x.npz"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
  assert "--reference" in err[0] and "--inception" in err[0]


def test_bad_input_subprocess_has_no_traceback(files):
  """Through the real entry point: status 2, a single stderr line, nothing written."""
  for s, w, named in (("few", "garbage_pth", "few"), ("good", "garbage_pth", "garbage_pth")):
    proc = _cli([f"--samples={files[s]}", f"--reference={files['good']}",
                 f"--inception={files[w]}", f"--output={files['out']}"], timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and files[named] in lines[0], lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not os.path.exists(files["out"])
