"""Command line: data-parallel, resumable sample generation (latents, images, ADM ``.npz``).

    python -m deepflow_jax.generate --checkpoint=DIR --output=OUT --num_samples=50000 \\
        [--sampler=sde|euler|heun|ab2|ab3|dpm2m|accel|accel-own|accel-ab2] \\
        [--num_steps=250] [--grid=uniform|shifted|poly|reference] [--grid_shift=2] \\
        [--grid_rho=1.5] [--cfg_scale=1.0] \\
        [--guidance_low=0.0] [--guidance_high=1.0] [--per_device_batch=16] [--seed=0] \\
        [--labels=random|cycle] [--vae=VAE_DIR] [--dtype=auto|float32|bfloat16]

``--checkpoint`` is a directory written by ``python -m deepflow_jax.convert`` or
a training workdir of ``python -m deepflow_jax.main`` (the EMA weights of its
newest readable checkpoint). The work is ``deepflow_jax.generation.generate_to_folder``
(see there for determinism, parallelism and the output folder).

Exit status: 0 done, 2 bad input (one ``error:`` line), 143 / 130 stopped by
SIGTERM / SIGINT (finished batches kept; rerun to resume).
"""
from __future__ import annotations

import os
import sys

import jax

from deepflow_jax import outputs
from deepflow_jax import sampling
from deepflow_jax import workdir
from deepflow_jax.errors import ArgumentParser
from deepflow_jax.errors import UserError
from deepflow_jax.errors import cli_main
from deepflow_jax.evaluation import reference
from deepflow_jax.evaluation import suite
from deepflow_jax.generation import GenerationSettings
from deepflow_jax.generation import generate_to_folder
from deepflow_jax.models.loading import SAMPLING_DTYPES
from deepflow_jax.models.loading import sampling_dtype
from deepflow_jax.models.loading import load_model
from deepflow_jax.models import vae as vae_lib
from deepflow_jax.signals import StopRequests


def _parser() -> ArgumentParser:
  p = ArgumentParser(prog="python -m deepflow_jax.generate",
                     description="Generate DeepFlow samples (data-parallel, resumable).")
  p.add_argument("--checkpoint", required=True,
                 help="converted checkpoint directory (python -m deepflow_jax.convert) or a "
                 "training workdir (python -m deepflow_jax.main; its newest EMA weights)")
  p.add_argument("--output", required=True, help="output directory (created; resumable)")
  p.add_argument("--num_samples", type=int, required=True)
  p.add_argument("--sampler", default="sde", choices=sampling.SAMPLERS,
                 help="sde: the reference's Euler-Maruyama (the paper's FIDs, 250 steps); "
                 "euler, heun (2 evaluations per step but the last), ab2, ab3 (Adams-Bashforth), "
                 "dpm2m (DPM-Solver++(2M)): probability-flow ODE; accel, accel-own, accel-ab2: "
                 "steps x + v dt + a dt^2/2 with DeepFlow's predicted acceleration (not for "
                 "SiT); see docs/sampling.md")
  p.add_argument("--num_steps", type=int, default=250,
                 help="sampler steps (time-grid intervals); network evaluations per sample "
                 "are num_steps, or 2 num_steps - 1 for heun")
  p.add_argument("--grid", default="", choices=("",) + sampling.GRIDS,
                 help="time grid: '' = the sampler's default (reference for sde: "
                 "linspace(1, 0.04, n) then 0; uniform for the others); shifted: "
                 "t' = s t / (1 + (s - 1) t); poly: t' = t^rho")
  p.add_argument("--grid_shift", type=float, default=sampling.DEFAULT_GRID_SHIFT,
                 help="s of --grid=shifted (> 1: more steps near the noise)")
  p.add_argument("--grid_rho", type=float, default=sampling.DEFAULT_GRID_RHO,
                 help="rho of --grid=poly (> 1: more steps near the data)")
  p.add_argument("--cfg_scale", type=float, default=1.0, help="guidance scale; <= 1: none")
  p.add_argument("--guidance_low", type=float, default=0.0,
                 help="guide steps whose time t (1 = noise, 0 = data) is >= this")
  p.add_argument("--guidance_high", type=float, default=1.0, help="... and <= this")
  p.add_argument("--per_device_batch", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--labels", default="random", choices=sampling.LABEL_MODES,
                 help="random: uniform from (seed, index); cycle: index mod num_classes")
  p.add_argument("--vae", default=None,
                 help="VAE folder (diffusers or convert_vae) to decode latents into images; "
                 "without it a latent model writes latents only")
  p.add_argument("--dtype", default="auto", choices=("auto",) + SAMPLING_DTYPES,
                 help="model compute dtype; auto: bfloat16 on accelerators, float32 on CPU "
                 "(the sampler state stays float32; --dtype=float32 for float32 everywhere)")
  e = p.add_argument_group("evaluation when every sample is done (ADM suite: FID, sFID, IS, "
                           "precision, recall)")
  e.add_argument("--reference", default=None,
                 help="ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
  e.add_argument("--inception", default=None,
                 help="FID Inception weights (pytorch-fid's pt_inception-*.pth or the TF .pb)")
  e.add_argument("--eval_output", default=None,
                 help="metrics JSON (default: OUTPUT/metrics.json)")
  return p


@cli_main
def main(argv=None):
  a = _parser().parse_args(argv)
  sampler = sampling.SamplerSettings(
      sampler=a.sampler, num_steps=a.num_steps, grid=a.grid, grid_shift=a.grid_shift,
      grid_rho=a.grid_rho, cfg_scale=a.cfg_scale, guidance_low=a.guidance_low,
      guidance_high=a.guidance_high)
  settings = GenerationSettings(num_samples=a.num_samples, sampler=sampler, seed=a.seed,
                                labels=a.labels, dtype=sampling_dtype(a.dtype))
  problems = settings.problems()
  if a.per_device_batch < 1:
    problems.append(f"--per_device_batch must be >= 1, got {a.per_device_batch}")
  if bool(a.reference) != bool(a.inception):
    problems.append("--reference and --inception go together (evaluation needs both)")
  if problems:
    raise UserError("; ".join(problems))
  if a.reference:
    reference.check_reference(a.reference)
    if not os.path.isfile(a.inception):
      raise UserError(f"--inception={a.inception}: no such file")
    eval_output = a.eval_output or os.path.join(a.output, "metrics.json")
    outputs.check_file_path(eval_output, "--eval_output")
  model, params = load_model(a.checkpoint, settings.dtype)
  pixel_space = model.in_channels in (1, 3)
  if a.vae and pixel_space:
    raise UserError(f"the model samples {model.in_channels}-channel images (pixel space); "
                    "--vae is for latent-space models")
  if a.reference and not (pixel_space or a.vae):
    raise UserError("--reference: evaluation scores images; this latent model needs --vae to "
                    "decode its samples")
  vae = vae_lib.load_diffusers_vae(a.vae) if a.vae else None
  result = generate_to_folder(model, params, a.output, settings,
                              per_device_batch=a.per_device_batch, vae=vae, vae_path=a.vae,
                              latent_scale=workdir.latent_scale(a.checkpoint),
                              checkpoint=a.checkpoint)
  if result.samples_npz is None or not a.reference:
    return result.stopped or 0
  with StopRequests(raise_now=True, what="evaluation stopped; the samples are complete, rerun "
                    "the same command to evaluate them"):
    res = suite.evaluate_files(result.samples_npz, a.reference, a.inception, log=_log)
  _log(suite.format_table(res))
  if jax.process_index() == 0:
    suite.write_metrics_json(eval_output, res)
    _log(f"[generate] wrote {eval_output}")
  return 0


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


if __name__ == "__main__":
  sys.exit(main())
