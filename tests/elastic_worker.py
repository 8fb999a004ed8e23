"""Run in a subprocess with 8 fake CPU devices: restores a workdir's newest checkpoint on other
meshes and device counts, and checks every array against the layout that saved it.

    python tests/elastic_worker.py WORKDIR DEVICES:DATA:FSDP ...

The first layout is the reference (the one that saved). For every layout, the
TrainState is restored through ``training.checkpoints.Checkpointer`` into the
``Trainer``'s sharded abstract state on the first DEVICES devices, so each
array must come back on that mesh with that layout. Prints one JSON line per
layout: the step, the data state, the mesh, the largest |difference| of
params / EMA / optimiser state to the reference, and a sharded matrix's shard shape.
"""
import json
import sys

import jax
import numpy as np

from deepflow_jax import sharding as shd
from deepflow_jax import workdir as workdir_lib
from deepflow_jax.models.loading import model_from_config
from deepflow_jax.training.checkpoints import Checkpointer
from deepflow_jax.training.step import Trainer


def restore(workdir, devices, data, fsdp):
  config = workdir_lib.read_config(workdir)
  config.mesh.data, config.mesh.fsdp = data, fsdp
  mesh = shd.make_mesh(config, jax.devices()[:devices])
  trainer = Trainer(config, model_from_config(config), mesh, latent=False)
  ckpt = Checkpointer(workdir)
  try:
    step, state, data_state = ckpt.restore_latest(trainer.abstract_state)
  finally:
    ckpt.close()
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.abstract_state)):
    assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), (leaf.sharding, want.sharding)
  kernels = [l for l in jax.tree.leaves(state.params) if l.ndim == 2 and l.shape[0] >= 32]
  shard = kernels[0].addressable_shards[0].data.shape
  return step, jax.device_get(state), data_state, dict(mesh.shape), shard


def main(workdir, *layouts):
  ref = None
  for layout in layouts:
    devices, data, fsdp = (int(x) for x in layout.split(":"))
    step, state, data_state, mesh, shard = restore(workdir, devices, data, fsdp)
    if ref is None:
      ref = state
    diff = {part: max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                       for a, b in zip(jax.tree.leaves(getattr(state, part)),
                                       jax.tree.leaves(getattr(ref, part))) if np.size(a)),
                      default=0.0)
            for part in ("params", "ema_params", "opt_state")}
    same_step = int(state.step) == int(ref.step)
    print(json.dumps({"layout": layout, "step": step, "data_state": data_state, "mesh": mesh,
                      "diff": diff, "same_step": same_step, "shard": list(shard)}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
