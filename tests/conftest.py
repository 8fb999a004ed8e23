"""Shared test fixtures. Golden files are copies of ../shared/golden (reference outputs)."""
import os
import sys

import numpy as np
import pytest

# The suite runs on CPU. With libtpu installed (the tpu extra, for tests/test_plan.py) JAX
# would otherwise probe for a TPU in this process too (~1 s, and libtpu's lock file).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gcs_emulator import gcs, gcs_env, gcs_server  # noqa: E402,F401  # pylint: disable=unused-import,wrong-import-position  # the gs:// fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(__file__), "data")
TINY2T_PT = os.path.join(DATA, "tiny2t.pt")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "numeric: compares floating-point results with golden data or another "
      "implementation; .ci/run reruns these under other OpenBLAS kernels and XLA CPU targets")


def xla_flags(devices):
  """The caller's XLA_FLAGS (e.g. ``--xla_cpu_max_isa=AVX`` from .ci/run) with the virtual
  CPU device count replaced by ``devices``."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def cpu_env(devices=1, compile_cache=False):
  """The environment for a subprocess of the suite: CPU only with ``devices`` virtual
  devices (other XLA flags of the caller kept), the repository on PYTHONPATH;
  ``compile_cache`` shares one persistent compilation cache among the suite's runs (unless
  the caller's environment names one)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if compile_cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax_cache"))
  return env


# ``python -m deepflow_jax.main`` flags that shrink the digits default to a 2-block model
# trained at batch 16, logged every step, with no grid or evaluation: seconds per run.
TINY_MAIN = [
    "--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
    "--config.model.df_idxs=(1,)", "--config.model.projector_dim=32",
    "--config.loss.scale_weight=(0.2,1.0)", "--config.train.global_batch_size=16",
    "--config.train.log_every=1", "--config.sample.grid_classes=0", "--config.eval.num_samples=0",
    "--config.optim.warmup_steps=0",
]


def main_command(kill_at=None):
  """argv up to the flags of ``python -m deepflow_jax.main``; ``kill_at``: the same run through
  ``tests/sigkill_worker.py``, which SIGKILLs itself after that step once the newest checkpoint
  before it is committed (a preemption without warning at a known point)."""
  if kill_at is None:
    return [sys.executable, "-m", "deepflow_jax.main"]
  return [sys.executable, os.path.join(ROOT, "tests", "sigkill_worker.py"), f"--kill_at={kill_at}"]


def restore_state(workdir, step):
  """A training workdir's saved TrainState at ``step`` as host arrays, whatever device
  layout saved it (imports inside: test modules choose XLA's device count first)."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    meta = c.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    return jax.device_get(c.restore(path, target))


def nhwc(a):
  """Reference NCHW arrays -> our NHWC."""
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="session")
def golden():
  return dict(np.load(os.path.join(DATA, "tiny2t.npz")))


@pytest.fixture(scope="session")
def tiny2t():
  """(model, ema params) converted from the reference's tiny2t.pt."""
  from deepflow_jax.convert import load_torch_checkpoint
  return load_torch_checkpoint(TINY2T_PT, "ema")
