"""Training-time ADM evaluation (config.eval.fid_every) and the in-process training API.

The FID Inception is replaced by the row-exact stand-in of ``evaluation_standin`` (the
real network's parity is tested in test_inception.py, the metric arithmetic in
test_metrics.py); this tests what the training loop does with them.
"""
import json
import os

import numpy as np

from deepflow_jax import config_lib
from deepflow_jax import images as images_lib
from deepflow_jax import sampling
from deepflow_jax import training
from deepflow_jax.training import hooks
from deepflow_jax.models import loading
from deepflow_jax.evaluation import metrics
from evaluation_standin import images, standin

TINY = {"model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2, "model.df_idxs": (1,),
        "model.projector_dim": 32, "loss.scale_weight": (0.2, 1.0),
        "train.global_batch_size": 16, "train.log_every": 1, "sample.grid_classes": 2,
        "sample.grid_per_class": 2, "sample.num_steps": 3, "eval.num_samples": 0,
        "optim.warmup_steps": 0}


def test_fid_during_training_and_callback(tmp_path, monkeypatch):
  model, params = standin(size=8)
  monkeypatch.setattr(hooks.inception, "load_fid_inception",
                      lambda path, **kw: (model, params))
  ref = str(tmp_path / "ref.npz")
  np.savez(ref, arr_0=images(1, 40))
  weights = tmp_path / "inception.pth"
  weights.write_bytes(b"read by the stand-in loader only")
  config = config_lib.load_config("digits", **TINY, **{
      "train.num_steps": 4, "train.ckpt_every": 2, "eval.fid_every": 2,
      "eval.fid_num_samples": 12, "eval.batch_size": 8, "eval.reference": ref,
      "eval.inception": str(weights)})
  seen = []
  wd = str(tmp_path / "run")
  assert training.train(config, wd, callback=lambda step, m: seen.append((step, m))) == 0
  evals = [(s, m) for s, m in seen if "eval/fid" in m]
  assert [s for s, _ in evals] == [2, 4]  # every fid_every steps, and at the end
  assert [s for s, m in seen if "loss" in m] == [1, 2, 3, 4]
  for _, m in evals:
    assert np.isfinite(m["eval/fid"]) and m["eval/fid"] > 0 and m["eval/num_samples"] == 12
  logged = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in logged if "eval/fid" in r] == [2, 4]
  # The reported FID is the ADM formula on the stand-in's features of the EMA samples the
  # loop draws (labels cycling, seed train.seed + 3): recomputed here from the step-4
  # checkpoint. rtol 1e-6: the loop's streaming statistics equal np.cov to float64 noise,
  # amplified by the square root of a rank-11 (12-sample) covariance product.
  net, ema = loading.load_workdir_ema(wd, step=4)
  x = sampling.sample_many(net, ema, np.arange(12) % 10,
                           sampling.SamplerSettings.from_config(config.sample),
                           seed=config.train.seed + hooks.FID_SEED, per_device_batch=8)
  feats = lambda im: np.asarray(model.apply({"params": params}, im)["pool"])
  mu1, s1 = metrics.activation_statistics(feats(images_lib.to_uint8(x, rgb=True)))
  mu2, s2 = metrics.activation_statistics(feats(images(1, 40)))
  np.testing.assert_allclose(evals[-1][1]["eval/fid"], metrics.frechet_distance(mu1, s1, mu2, s2),
                             rtol=1e-6)
  assert os.path.exists(os.path.join(wd, "samples", "grid_00000004.png"))
  # Resuming a finished run redoes only the end-of-run work (grid, evaluation).
  seen.clear()
  assert training.train(config, wd, callback=lambda step, m: seen.append((step, m))) == 0
  assert [s for s, m in seen if "loss" in m] == [] and [s for s, m in seen if "eval/fid" in m] == [4]
