"""The embedded default: a small DeepFlow on scikit-learn's 8x8 digits, pixel space, CPU.

python -m deepflow_jax.main --config=configs/digits.py --workdir=DIR
The plain SiT baseline under the same setup (same width, depth, schedule, seeds):
--config=configs/digits.py:sit
"""
from deepflow_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  m = c.model
  m.preset = "digits-3T"
  m.input_size = 8
  m.patch_size = 2  # 16 tokens of 2x2 pixels
  m.in_channels = 1
  m.hidden_size = 96
  m.depth = 6
  m.num_heads = 4
  m.num_classes = 10
  m.df_idxs = (2, 4)  # three branches, like DeepFlow-XL/2-3T
  m.projector_dim = 128
  m.dtype = "float32"
  c.loss.scale_weight = (0.2, 0.2, 1.0)
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.train.global_batch_size = 128
  c.train.num_steps = 1500
  c.train.ema_decay = 0.995
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.sample_every = 500
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.num_classes = 10
  c.data.num_threads = 0
  c.sample.sampler = "sde"  # the reference's Euler-Maruyama sampler
  c.sample.num_steps = 100
  c.sample.grid_classes = 10
  c.sample.grid_per_class = 10
  c.eval.num_samples = 1000
  c.eval.batch_size = 500
  if arg == "sit":
    config_lib.sit_baseline(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use ':sit' for the SiT baseline)")
  return c
