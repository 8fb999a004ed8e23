"""DeepFlow-B/2-2T: ImageNet 256 latents, width 768, depth 12, one split after layer 6.

The plain SiT-B/2 baseline under the same setup: --config=configs/b2t.py:sit
With SSL alignment (REPA, DINOv2-B/14) as the reference's SSL run:
--config=configs/b2t.py:ssl --config.model.encoder_path=dinov2_vitb14_pretrain.pth
"""
from deepflow_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  config_lib.set_preset(c, "DeepFlow-B/2-2T")
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.num_classes = 1000
  c.loss.scale_weight = (0.2, 1.0)
  c.train.global_batch_size = 256
  c.train.num_steps = 400_000
  c.data.name = "repa"
  if arg == "sit":
    config_lib.sit_baseline(c)
  elif arg == "ssl":  # name the weights: --config.model.encoder_path=dinov2_vitb14_pretrain.pth
    config_lib.ssl_alignment(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use ':sit' for the SiT baseline, ':ssl' "
                     "for SSL alignment)")
  return c
