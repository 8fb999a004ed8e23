"""Command line: convert a reference PyTorch DeepFlow checkpoint to JAX, or export one back.

    python -m deepflow_jax.convert --checkpoint=IN.pt --output=DIR [--weights=ema|model]
    python -m deepflow_jax.convert --export --input=DIR --output=OUT.pt

The first writes ``DIR/params`` (an Orbax checkpoint of the parameter tree) and
``DIR/model.json`` (the resolved architecture), which ``load_converted`` and the
sampling / training entry points read. The second writes a ``.pt`` state_dict
with the reference's keys and shapes.

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

from deepflow_jax.errors import cli_main
from deepflow_jax.models.conversion import load_torch_checkpoint
from deepflow_jax.models.conversion import params_to_state_dict
from deepflow_jax.models.conversion import parse_df_idxs
from deepflow_jax.models.loading import load_converted
from deepflow_jax.models.loading import model_to_dict
from deepflow_jax.models.loading import save_converted
from deepflow_jax.torch_io import ConversionError
from deepflow_jax.torch_io import save_torch_state_dict

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


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m deepflow_jax.convert",
      description="Convert a reference PyTorch DeepFlow checkpoint to a JAX (Orbax) checkpoint, "
      "or export one back to a .pt state_dict with --export.")
  p.add_argument("--checkpoint", help="reference .pt / .pth / .safetensors to convert")
  p.add_argument("--output", required=True,
                 help="output directory (convert) or .pt/.safetensors file (--export)")
  p.add_argument("--weights", default="ema", choices=("ema", "model"),
                 help="which weights of a train.py checkpoint (default: ema)")
  p.add_argument("--force", action="store_true", help="allow writing into a non-empty output")
  p.add_argument("--export", action="store_true",
                 help="export a converted directory (--input) back to a reference state_dict")
  p.add_argument("--input", help="converted directory to export (with --export)")
  g = p.add_argument_group("architecture facts a file may not record")
  g.add_argument("--df_idxs", help="split layers, e.g. '[8, 16]'")
  g.add_argument("--num_heads", type=int)
  g.add_argument("--legacy_scaling", type=_bool)
  g.add_argument("--input_size", type=int)
  return p


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  if a.export:
    if not a.input:
      raise ConversionError("--export needs --input=DIR (a converted checkpoint directory)")
    if os.path.exists(a.output) and not a.force:
      raise ConversionError(f"{a.output}: exists; pass --force to overwrite it")
    model, params = load_converted(a.input)
    sd = params_to_state_dict(model, params)
    save_torch_state_dict(sd, a.output)
    print(f"wrote {len(sd)} tensors to {a.output}")
    return 0
  if not a.checkpoint:
    raise ConversionError("--checkpoint=IN.pt is required (or --export --input=DIR)")
  out = os.path.abspath(a.output)
  if os.path.exists(out) and (not os.path.isdir(out)):
    raise ConversionError(f"{out}: exists and is not a directory")
  if os.path.isdir(out) and os.listdir(out) and not a.force:
    raise ConversionError(f"{out}: output directory is not empty; pass --force to overwrite")
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
