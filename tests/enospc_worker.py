"""``python -m deepflow_jax.main`` on a disk that fills up: the full-disk tests' run.

    python tests/enospc_worker.py --fail=ckpt:K|metrics:K --config=... --workdir=W [--config.x=y]

Runs main's entry point (its flags, parser and error path) after replacing one
writer with a version that raises ``OSError(ENOSPC)`` naming its file: ``ckpt:K``
the data item of checkpoint K (inside Orbax's temporary directory, in its
background save), ``metrics:K`` the ``metrics.jsonl`` row of step K. The library
has no test hooks; this is the test's own code.
"""
import errno
import os
import sys

from absl import app
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from deepflow_jax import flags_lib
from deepflow_jax import main as main_cli
from deepflow_jax.training import writer


def _enospc(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _patch(kind: str, at: int) -> None:
  if kind == "ckpt":
    save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def failing_save(self, x, directory):
      if f"{os.sep}{at}." in str(directory) or str(directory).rstrip(os.sep).endswith(f"{os.sep}{at}"):
        raise _enospc(os.path.join(str(directory), "metadata"))
      return await save(self, x, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = failing_save
  else:
    scalars = writer.MetricWriter.scalars

    def failing_scalars(self, step, values):
      if step >= at:
        raise _enospc(self._jsonl)
      return scalars(self, step, values)

    writer.MetricWriter.scalars = failing_scalars


if __name__ == "__main__":
  fail = next(a for a in sys.argv if a.startswith("--fail="))
  sys.argv.remove(fail)
  kind, at = fail.split("=", 1)[1].split(":")
  _patch(kind, int(at))
  app.run(main_cli.main, flags_parser=flags_lib.config_flags_parser("deepflow_jax.main"))
