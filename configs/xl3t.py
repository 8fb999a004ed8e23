"""DeepFlow-XL/2-3T as released: ImageNet 256 latents (32x32x4), depth 24, splits [8, 16].

python -m deepflow_jax.main --config=configs/xl3t.py --workdir=DIR --config.data.path=LATENTS
The plain SiT baseline under the same setup: --config=configs/xl3t.py:sit
With SSL alignment (REPA, DINOv2-B/14) as the reference's SSL run:
--config=configs/xl3t.py:ssl --config.model.encoder_path=dinov2_vitb14_pretrain.pth
ImageNet 512 (64x64x4 latents, 1,024 tokens; preprocess --resolution=512), e.g. fine-tuned
from 256 weights (a converted checkpoint or a training workdir; the sin-cos positions are
recomputed for the 32x32-token grid, every parameter keeps its shape):
--config=configs/xl3t.py:512 --config.train.init_from=ckpt/xl3t --config.data.path=LATENTS512
"""
from deepflow_jax import config_lib


def get_config(arg: str = ""):
  c = config_lib.base_config()
  config_lib.set_preset(c, "DeepFlow-XL/2-3T")
  c.model.input_size = 32
  c.model.in_channels = 4
  c.model.num_classes = 1000
  c.model.dtype = "auto"  # bf16 compute on accelerators, float32 parameters
  c.loss.scale_weight = (0.2, 0.2, 1.0)
  c.loss.beta = 0.01
  c.loss.weighting = "lognormal"
  c.train.global_batch_size = 256
  c.train.num_steps = 2_000_000  # ~400 epochs of ImageNet at batch 256
  c.train.ema_decay = 0.9999
  c.data.name = "repa"
  c.data.num_classes = 1000
  if arg == "sit":
    config_lib.sit_baseline(c)
  elif arg == "ssl":  # name the weights: --config.model.encoder_path=dinov2_vitb14_pretrain.pth
    config_lib.ssl_alignment(c)
  elif arg == "512":
    # Four times the tokens of 256: attention costs ~16x and activations ~4x per image;
    # bench_train.py --find_max_batch gives the per-device batch that fits, and
    # --config.model.remat=block trades ~1/3 more compute for activation memory.
    c.model.input_size = 64
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (use ':sit' for the SiT baseline, ':ssl' "
                     "for SSL alignment, ':512' for ImageNet 512)")
  return c
