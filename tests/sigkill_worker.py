"""``python -m deepflow_jax.main`` that SIGKILLs itself at a known point: the resume tests' run.

    python tests/sigkill_worker.py --kill_at=K --config=configs/digits.py --workdir=W [--config.x=y]

Parses the flags exactly as main does (its flag definitions and parser), trains
with ``deepflow_jax.training.iterate_training`` and, when the metrics of step K
arrive (``train.log_every`` must log step K), waits until the newest checkpoint
at or before K is committed (its final directory name exists: Orbax renames the
temporary one when the save is complete), then sends itself SIGKILL: a
preemption without warning at a point the test knows. While it waits, the
training generator is paused, so no later step runs or saves. The library has
no test hooks; this is the test's own code.
"""
import os
import signal
import sys
import time

from absl import app
from absl import flags

from deepflow_jax import flags_lib
from deepflow_jax import main as main_cli  # noqa: F401  # defines --config and --workdir
from deepflow_jax import training

flags.DEFINE_integer("kill_at", None, "SIGKILL after this step's metrics", required=True)
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  config, workdir, kill_at = FLAGS.config, FLAGS.workdir, FLAGS.kill_at
  every = int(config.train.ckpt_every)
  committed = os.path.join(os.path.abspath(workdir), "checkpoints", str(kill_at // every * every))
  for metrics in training.iterate_training(config, workdir):
    if metrics["step"] == kill_at and "loss" in metrics:
      deadline = time.time() + 120
      while kill_at >= every and not os.path.isdir(committed) and time.time() < deadline:
        time.sleep(0.02)
      os.kill(os.getpid(), signal.SIGKILL)
  sys.exit(f"sigkill_worker: the run ended before step {kill_at}")


if __name__ == "__main__":
  app.run(_run, flags_parser=flags_lib.config_flags_parser("deepflow_jax.main"))
