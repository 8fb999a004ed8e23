"""The training job: ``python -m deepflow_jax.main --config=configs/xl3t.py --workdir=DIR``.

Parses the flags and calls ``deepflow_jax.training.train`` (``training/loop.py``
says what a run does; ``deepflow_jax/workdir.py`` what it writes). Every value of the config file can be overridden,
``--config.train.num_steps=100``.

Exit status: 0 on success; 2 on a bad flag, config key or value, file or data
(one ``error:`` line on stderr, nothing written); 143 / 130 after a SIGTERM /
SIGINT (the state is saved; rerunning resumes). ``DEEPFLOW_DEBUG=1`` shows
tracebacks instead of one-line errors.

In Python (a notebook): ``deepflow_jax.training.train(config, workdir)``.
"""
from __future__ import annotations

import sys

from deepflow_jax import signals

signals.record_early_signals()  # before the imports below (JAX: seconds)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.flags_lib import config_flags_parser
from deepflow_jax.training import train
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the config.")

@cli_main
def _train(argv) -> int:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  if FLAGS.workdir is None:
    raise UserError("--workdir is required")
  if FLAGS.config is None:
    raise UserError("--config is required (e.g. --config=configs/digits.py)")
  return train(FLAGS.config, FLAGS.workdir)


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  sys.exit(_train(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=config_flags_parser("deepflow_jax.main"))
