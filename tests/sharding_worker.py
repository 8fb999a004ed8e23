"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS set by the test before JAX loads).

Trains a tiny DeepFlow for 3 steps on one device and on a data=2 x fsdp=4 mesh
from the same seed and batches; prints one JSON line with the largest parameter
difference and the addressable shard shapes of a sharded matrix.
"""
import json
import sys

import flax
import jax
import numpy as np

from deepflow_jax import config_lib
from deepflow_jax import sharding as shd
from deepflow_jax.models.loading import model_from_config
from deepflow_jax.training.step import Trainer


def tiny_config(data, fsdp, accum=1):
  c = config_lib.base_config()
  c.model.update(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=4, num_heads=4,
                 num_classes=10, df_idxs=(2,), projector_dim=32, dtype="float32")
  c.loss.scale_weight = (0.2, 1.0)
  c.data.name = "digits"
  c.data.image_size = 8
  c.train.global_batch_size = 16
  c.train.grad_accum_steps = accum
  c.train.ema_decay = 0.9
  c.optim.learning_rate = 1e-3
  c.mesh.data, c.mesh.fsdp = data, fsdp
  config_lib.validate(c)
  return c


def run(devices, data, fsdp, accum=1, steps=3):
  c = tiny_config(data, fsdp, accum)
  model = model_from_config(c)
  tr = Trainer(c, model, shd.make_mesh(c, devices), latent=False)
  state = tr.init_state(0)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = tr.step(state, tr.global_batch(batch))
    losses.append(float(metrics["loss"]))
  return state, losses


def main():
  devs = jax.devices()
  assert len(devs) == 8, len(devs)
  single, l1 = run(devs[:1], 1, 1)
  sharded, l8 = run(devs, 2, 4)
  flat1 = flax.traverse_util.flatten_dict(jax.device_get(single.params), sep="/")
  flat8 = flax.traverse_util.flatten_dict(jax.device_get(sharded.params), sep="/")
  ema1 = flax.traverse_util.flatten_dict(jax.device_get(single.ema_params), sep="/")
  ema8 = flax.traverse_util.flatten_dict(jax.device_get(sharded.ema_params), sep="/")
  diff = max(float(np.abs(flat1[k] - flat8[k]).max()) for k in flat1)
  ema_diff = max(float(np.abs(ema1[k] - ema8[k]).max()) for k in ema1)
  moved = max(float(np.abs(flat1[k] - v).max()) for k, v in flax.traverse_util.flatten_dict(
      jax.device_get(run(devs[:1], 1, 1, steps=0)[0].params), sep="/").items())
  qkv = sharded.params["blocks_0"]["attn"]["qkv"]["kernel"]
  mu = sharded.opt_state[1][0].mu["blocks_0"]["attn"]["qkv"]["kernel"]
  acc_mid = sharded.params["df_blocks_0"]["acc_mlp"]["layers_2"]["kernel"]
  _, l_acc = run(devs, 2, 4, accum=2, steps=2)
  print(json.dumps({
      "max_param_diff": diff, "max_ema_diff": ema_diff, "param_change": moved,
      "losses_single": l1, "losses_sharded": l8, "losses_accum": l_acc,
      "qkv_shape": list(qkv.shape),
      "qkv_shards": sorted({tuple(s.data.shape) for s in qkv.addressable_shards}),
      "qkv_spec": str(qkv.sharding.spec),
      "mu_shards": sorted({tuple(s.data.shape) for s in mu.addressable_shards}),
      "acc_mid_shards": sorted({tuple(s.data.shape) for s in acc_mid.addressable_shards}),
      "num_devices_holding_qkv": len(qkv.sharding.device_set),
  }))


if __name__ == "__main__":
  sys.exit(main())
