"""``python -m deepflow_jax.main`` that SIGKILLs itself at a known point: the resume tests' run.

    python tests/sigkill_worker.py --kill_at=K --config=configs/digits.py --workdir=W [--config.x=y]

Parses the flags exactly as main does (its flag definitions and parser), trains
with ``deepflow_jax.training.iterate_training`` and, when the metrics of step K
arrive (``train.log_every`` must log step K), waits until the newest checkpoint
at or before K is committed (``workdir.checkpoint_steps`` lists it: locally Orbax
renames the temporary directory when the save is complete, on gs:// it writes
the commit file last), then sends itself SIGKILL: a
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
from deepflow_jax import workdir as workdir_lib

flags.DEFINE_integer("kill_at", None, "SIGKILL after this step's metrics", required=True)
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  config, workdir, kill_at = FLAGS.config, FLAGS.workdir, FLAGS.kill_at
  every = int(config.train.ckpt_every)
  directory, committed = workdir_lib.checkpoint_dir(workdir), kill_at // every * every
  for metrics in training.iterate_training(config, workdir):
    if metrics["step"] == kill_at and "loss" in metrics:
      deadline = time.time() + 120
      while (kill_at >= every and committed not in workdir_lib.checkpoint_steps(directory)
             and time.time() < deadline):
        time.sleep(0.02)
      os.kill(os.getpid(), signal.SIGKILL)
  sys.exit(f"sigkill_worker: the run ended before step {kill_at}")


if __name__ == "__main__":
  app.run(_run, flags_parser=flags_lib.config_flags_parser("deepflow_jax.main"))
