"""Command line: convert a reference PyTorch DeepFlow checkpoint to JAX, or export one back.

    python -m deepflow_jax.convert --checkpoint=IN.pt --output=DIR [--weights=ema|model]
    python -m deepflow_jax.convert --export --input=DIR --output=OUT.pt [--layout=reference]

The first writes ``DIR/params`` (an Orbax checkpoint of the parameter tree) and
``DIR/model.json`` (the resolved architecture), which ``load_converted`` and the
sampling / training entry points read. The second writes a ``.pt`` state_dict
with the reference's keys and shapes, or with ``--layout=reference`` the
reference's own checkpoint ``{'model', 'ema', 'args', 'steps'}`` (``args`` a plain
dict) that its ``generate.py`` loads as is. Every file is written atomically.

The architecture is inferred from the checkpoint's ``args`` and from tensor
shapes; what cannot be inferred (split layers and heads of a bare state_dict,
``legacy_scaling``) is a named option. The work is done by
``deepflow_jax.models.conversion`` (torch <-> Flax) and
``deepflow_jax.models.loading`` (converted directories); their main functions are
importable from here too, as the README shows::

    from deepflow_jax.convert import load_converted, load_torch_checkpoint
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from deepflow_jax import outputs
from deepflow_jax import storage
from deepflow_jax.errors import ArgumentParser
from deepflow_jax.errors import cli_main
from deepflow_jax.models.conversion import load_torch_checkpoint
from deepflow_jax.models.conversion import params_to_state_dict
from deepflow_jax.models.conversion import parse_df_idxs
from deepflow_jax.models.conversion import reference_checkpoint
from deepflow_jax.models.loading import is_converted_dir
from deepflow_jax.models.loading import load_converted
from deepflow_jax.models.loading import load_model
from deepflow_jax.models.loading import model_to_dict
from deepflow_jax.models.loading import save_converted
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import save_torch_file

__all__ = ["load_converted", "load_torch_checkpoint", "main", "params_to_state_dict",
           "save_converted"]


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parser() -> ArgumentParser:
  p = ArgumentParser(
      prog="python -m deepflow_jax.convert",
      description="Convert a reference PyTorch DeepFlow checkpoint to a JAX (Orbax) checkpoint, "
      "or export one back with --export.")
  p.add_argument("--checkpoint", help="reference .pt / .pth / .safetensors to convert")
  p.add_argument("--output", required=True,
                 help="output directory (convert) or .pt/.safetensors file (--export)")
  p.add_argument("--weights", default="ema", choices=("ema", "model"),
                 help="which weights of a train.py checkpoint")
  p.add_argument("--force", action="store_true",
                 help="replace an existing converted checkpoint / exported file")
  p.add_argument("--export", action="store_true",
                 help="export a converted directory (--input) back to PyTorch")
  p.add_argument("--input", help="converted directory or training workdir (its EMA weights) "
                 "to export (with --export)")
  p.add_argument("--layout", default="state_dict", choices=("state_dict", "reference"),
                 help="--export writes a bare state_dict, or the reference's own checkpoint "
                 "{'model', 'ema', 'args', 'steps'} that its generate.py loads as is")
  g = p.add_argument_group("architecture facts a file may not record")
  g.add_argument("--df_idxs", help="split layers, e.g. '[8, 16]'")
  g.add_argument("--num_heads", type=int)
  g.add_argument("--legacy_scaling", type=_bool)
  g.add_argument("--input_size", type=int)
  return p


def _export(a) -> int:
  if not a.input:
    raise ConversionError("--export needs --input=DIR (a converted checkpoint directory or a "
                          "training workdir)")
  out = os.path.abspath(a.output)
  if os.path.isdir(out):
    raise ConversionError(f"--output {out}: is a directory; --export writes one file "
                          "(e.g. --output=model.pt)")
  if os.path.exists(out) and not a.force:
    raise ConversionError(f"--output {out}: exists; pass --force to replace it")
  if a.layout == "reference" and out.endswith(".safetensors"):
    raise ConversionError("--layout=reference writes a .pt file (a nested dict); use a .pt "
                          "--output or --layout=state_dict")
  # A converted directory, or a training workdir: its newest checkpoint's EMA weights.
  model, params = (load_converted(a.input) if is_converted_dir(a.input) else
                   load_model(a.input))
  outputs.remove_stale_tmp(os.path.dirname(out), owned=lambda path: path == out)  # a killed export
  if a.layout == "reference":
    obj = reference_checkpoint(model, params)
    n = len(obj["ema"])
  else:
    obj = params_to_state_dict(model, params)
    n = len(obj)
  save_torch_file(obj, out)
  print(f"wrote {n} tensors ({a.layout} layout) to {out}")
  return 0


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  if a.export:
    return _export(a)
  if not a.checkpoint:
    raise ConversionError("--checkpoint=IN.pt is required (or --export --input=DIR)")
  out = storage.absolute(a.output)
  storage.check_bucket(out, "--output")
  if not storage.is_url(out) and os.path.exists(out) and not os.path.isdir(out):
    raise ConversionError(f"--output {out}: exists and is not a directory")
  if storage.listdir(out) and not (a.force and is_converted_dir(out)):
    raise ConversionError(
        f"--output {out}: " + ("already holds a converted checkpoint; pass --force to replace it"
                               if is_converted_dir(out) else
                               "not empty and not a converted checkpoint; choose an empty or "
                               "new directory"))
  df_idxs = parse_df_idxs(a.df_idxs) if a.df_idxs is not None else None
  model, params = load_torch_checkpoint(a.checkpoint, a.weights, df_idxs=df_idxs,
                                        num_heads=a.num_heads, legacy_scaling=a.legacy_scaling,
                                        input_size=a.input_size)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  save_converted(out, model, params, force=a.force,
                 extra={"source": os.path.abspath(a.checkpoint), "weights": a.weights})
  arch = model_to_dict(model)
  print(f"converted {a.checkpoint} [{a.weights}]: {n:,} parameters, width {arch['hidden_size']}, "
        f"depth {arch['depth']}, heads {arch['num_heads']}, splits {arch['df_idxs']} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
