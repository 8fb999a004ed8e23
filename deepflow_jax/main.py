"""The training job: ``python -m deepflow_jax.main --config=configs/xl3t.py --workdir=DIR``.

Parses the flags and calls ``deepflow_jax.train_loop.train`` (see there for what
a run does and writes). Every value of the config file can be overridden,
``--config.train.num_steps=100``.

Exit status: 0 on success, 2 on a configuration or input error (one line on
stderr), 143 after a preemption save.

In Python (a notebook): ``deepflow_jax.train_loop.train(config, workdir)``;
``deepflow_jax.main.run`` is the same function.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepflow_jax.errors import UserError
from deepflow_jax.train_loop import train as run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the config.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if FLAGS.workdir is None:
    print("error: --workdir is required", file=sys.stderr)
    sys.exit(2)
  if FLAGS.config is None:
    print("error: --config is required (e.g. --config=configs/digits.py)", file=sys.stderr)
    sys.exit(2)
  try:
    rc = run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  sys.exit(rc)


if __name__ == "__main__":
  app.run(main)
