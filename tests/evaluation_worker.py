"""Subprocess (XLA_FLAGS set by the test before JAX loads): the feature pass with the stand-in.

argv: batch_size [port num_processes process_id]. With the last three, joins a
multi-process JAX run on 127.0.0.1:port (gloo collectives on CPU). Process 0 prints
one JSON line with the metrics, the device/process counts, the sample statistics
and features (to compare runs with different device counts and batch sizes).
"""
import json
import sys

import jax

from deepflow_jax.evaluation import features
from deepflow_jax.evaluation import reference
from deepflow_jax.evaluation import suite
from evaluation_standin import images, standin


def main():
  batch = int(sys.argv[1])
  if len(sys.argv) > 2:
    port, n, pid = (int(a) for a in sys.argv[2:5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=pid)
  model, params = standin()
  ref_imgs, samples = images(1, 40), images(2, 50, shift=20)
  ref = reference.compute_reference_statistics(model, params, ref_imgs, batch_size=batch, log=None)
  acc = features.FeatureAccumulator()
  # Samples as uneven batches: the pass regroups them.
  chunks = [samples[:7], samples[7:30], samples[30:]]
  features.run_feature_pass(model, params, iter(chunks), acc, batch_size=batch, log=None)
  res = suite.metrics_from_features(acc, ref, log=None)
  mu, sigma = acc.pool_stats.statistics()
  res.update(devices=jax.device_count(), processes=jax.process_count(), mu=mu.tolist(),
             sigma=sigma.tolist(), ref_mu_s=ref.mu_s.tolist(), pool=acc.pool.features().tolist())
  if jax.process_index() == 0:
    print(json.dumps(res))


if __name__ == "__main__":
  main()
