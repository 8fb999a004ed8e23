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

import os
import re
import sys

from deepflow_jax import signals

signals.record_early_signals()  # before the imports below (JAX: seconds)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deepflow_jax.errors import EXIT_USER_ERROR
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.errors import debug
from deepflow_jax.errors import first_line
from deepflow_jax.errors import print_error
from deepflow_jax.training import train
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the config.")

_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


def _flag_error(argv, e: BaseException) -> str:
  """One line for a flag that absl / ml_collections could not parse."""
  config_flag = next((a for a in argv[1:] if a.startswith("--config=")), None)
  if config_flag and not os.path.isfile(config_flag.split("=", 1)[1].split(":", 1)[0]):
    return _config_error(argv, e)  # overrides of a missing file fail first: name the file
  text = str(e).replace("\\n", "\n").replace("\\'", "'")
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  m = _DID_YOU_MEAN.search(text)
  if m:
    for flag in overrides:
      parts = flag.split(".")
      if m.group(2) in parts:
        parts[parts.index(m.group(2))] = m.group(1)
        return f"{flag}: unknown config key (did you mean {'.'.join(parts)}?)"
  if isinstance(e, (AttributeError, KeyError)) and overrides:
    return f"{' '.join(overrides)}: unknown config key ({first_line(e)})"
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  useful = [l for l in lines if not l.startswith(("Traceback", "File ", "Pass --help"))]
  msg = useful[-1] if useful else type(e).__name__
  msg = re.sub(r"^(FATAL Flags parsing error: |\w+Error: )", "", msg)
  if config_flag and "config argument" in msg:
    msg = f"{config_flag}: {msg}"
  return msg


def _config_error(argv, e: BaseException) -> str:
  """One line for a config file that could not be loaded (missing, or its get_config failed)."""
  flag = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
  path = flag.split("=", 1)[-1].split(":", 1)[0]
  if flag != "--config" and not os.path.isfile(path):
    return f"{flag}: no such config file ({path} from {os.getcwd()})"
  cause = e
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, FileNotFoundError):
    return f"{flag}: no such config file"
  return f"{flag}: {type(cause).__name__}: {first_line(cause)}"


def parse_flags(argv):
  """absl's flag parsing with the shared error path: one ``error:`` line and exit 2."""
  try:
    rest = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if debug():
      raise
    print_error(f"{_flag_error(argv, e)} (see python -m deepflow_jax.main --helpfull)")
    sys.exit(EXIT_USER_ERROR)
  try:
    if FLAGS.config is not None:
      FLAGS.config.keys()  # a config file that failed to load raises on first use
  except Exception as e:  # pylint: disable=broad-except
    if debug():
      raise
    print_error(_config_error(argv, e))
    sys.exit(EXIT_USER_ERROR)
  return rest


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
  app.run(main, flags_parser=parse_flags)
