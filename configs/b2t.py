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
  elif arg == "ssl":
    # The reference's SSL run: each split's tokens (after its VeRA block) projected by
    # an MLP (width 2048) to 768 and aligned with DINOv2-B/14 patch features of the
    # clean image (negative cosine, weight 0.5); the reference enables legacy_scaling
    # (the VeRA scale soft-cap) with SSL alignment. Name the weights file:
    # --config.model.encoder_path=dinov2_vitb14_pretrain.pth
    c.model.ssl_align = True
    c.model.projector_dim = 2048
    c.model.z_dim = 768
    c.model.legacy_scaling = True
    c.loss.proj_coeff = 0.5
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use ':sit' for the SiT baseline, ':ssl' "
                     "for SSL alignment)")
  return c
