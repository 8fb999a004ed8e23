"""absl flag parsing for entry points with a ``--config`` file flag: one ``error:`` line, exit 2.

``main`` and ``plan`` take ``--config=configs/x.py[:arg]`` and ``--config.a.b=v``
overrides (``ml_collections.config_flags``); a flag absl cannot parse, an unknown
config key (with the nearest one) or a config file that does not load is one
line naming it, and exit status 2.
"""
from __future__ import annotations

import functools
import os
import re
import sys

from absl import flags

from deepflow_jax import config_lib
from deepflow_jax.errors import EXIT_USER_ERROR
from deepflow_jax.errors import debug
from deepflow_jax.errors import first_line
from deepflow_jax.errors import print_error

FLAGS = flags.FLAGS

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
    # Name the override(s) no config has, with the nearest key, not every override given.
    bad = config_lib.unknown_keys([f.removeprefix("--config.") for f in overrides])
    if bad:
      near = config_lib.nearest_key(bad[0])
      hint = f"did you mean --config.{near}?" if near else first_line(e)
      return f"--config.{bad[0]}: unknown config key ({hint})"
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


def parse_flags(argv, program: str = "deepflow_jax.main"):
  """absl's flag parsing with the shared error path: one ``error:`` line and exit 2."""
  try:
    rest = FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if debug():
      raise
    print_error(f"{_flag_error(argv, e)} (see python -m {program} --helpfull)")
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


def config_flags_parser(program: str):
  """``parse_flags`` for ``app.run(..., flags_parser=...)`` naming ``program`` in its help hint."""
  return functools.partial(parse_flags, program=program)
