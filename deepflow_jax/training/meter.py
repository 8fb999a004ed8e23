"""How fast a training run goes: analytic FLOPs, MFU, peak memory, rate and ETA.

``Meter`` is fed by the training loop (``data_wait`` for every batch fetched,
``step_done`` for every step) and, at every logged step, turns the interval
since the last one into the numbers of the progress line and ``metrics.jsonl``:
steps/s, images/s, data-wait time per step, and on accelerators TFLOP/s per
device and MFU (from the analytic FLOP count below, so MFU is comparable across
remat policies) and the allocator's peak memory; the ETA is over the whole run
so far (the first step, with its compilation, excluded).
"""
from __future__ import annotations

import time
from typing import Optional

import jax

from deepflow_jax.models.deepflow import DeepFlow
from deepflow_jax.progress import Progress
from deepflow_jax.progress import format_duration
from deepflow_jax.progress import format_rate


def forward_flops_per_example(model: DeepFlow) -> float:
  """Matmul FLOPs (2 per multiply-add) of one training forward pass of one example.

  With width D, T tokens, depth L, K branches, MLP width M = mlp_ratio * D,
  projector width P, patch output O = p * p * C (and z_dim Z with SSL alignment):

  * patch embedding ``2 T O D``;
  * each SiT block ``2 T D 3D`` (qkv) + ``4 T^2 D`` (q k^T and the weighted sum of v)
    + ``2 T D D`` (output projection) + ``4 T D M`` (MLP) + ``2 D 6D`` (adaLN, per
    example, not per token);
  * the time embedder ``2 (256 D + D D)`` once per branch;
  * ``2K - 1`` heads (K velocity, K - 1 acceleration), each ``2 T D O + 2 D 2D``;
  * each of the K - 1 VeRA blocks: acceleration MLP (D -> P -> 2P -> P -> D)
    ``2 T (D P + 4 P^2 + P D)``, time-gap modulation ``2 (2D)(4D)`` (adaLN) +
    ``2 T (4 D^2 + 2 D^2)`` (MLP 2D -> 2D -> D), cross-space attention
    ``2 T D 3D + 4 T^2 D + 2 T D D``, and the time-gap embedder
    ``2 (256 2D + 4 D^2)``;
  * with SSL alignment, K - 1 projectors ``2 T (D P + P P + P Z)``.

  Element-wise work (norms, activations, softmax, the loss) is left out; XLA's
  own count of a compiled forward, which includes it, is within 5% of this total
  (``tests/test_train.py``).
  """
  d, t, l = model.hidden_size, model.num_tokens, model.depth
  p_out = model.patch_size**2 * model.in_channels
  k = model.num_branches
  pdim = model.projector_dim
  f = 2 * t * p_out * d  # patch embedding
  block = (2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * int(d * model.mlp_ratio)
           + 2 * d * 6 * d)
  f += l * block
  f += k * 2 * (256 * d + d * d)  # t embedder, once per branch
  head = 2 * t * d * p_out + 2 * d * 2 * d
  f += (k + (k - 1)) * head  # velocity heads + acceleration heads
  if k > 1:
    vera = (2 * t * (d * pdim + 4 * pdim * pdim + pdim * d)  # acc MLP
            + 2 * (2 * d) * (4 * d) + 2 * t * (4 * d * d + 2 * d * d)  # time-gap modulation
            + 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d)  # cross-space attention
    f += (k - 1) * (vera + 2 * (256 * 2 * d + 4 * d * d))
    if model.ssl_align:
      f += (k - 1) * 2 * t * (d * pdim + pdim * pdim + pdim * model.z_dim)
  return float(f)


def train_flops_per_example(model: DeepFlow) -> float:
  """Model FLOPs of one training example: forward + backward = 3 x the forward.

  The backward pass of a matmul costs two matmuls of the same size (gradients of
  its input and of its weight). Work repeated by rematerialisation
  (``model.remat``) is not counted, so MFU stays comparable across remat policies
  (it is "model FLOPs utilisation", not hardware FLOPs).
  """
  return 3.0 * forward_flops_per_example(model)


# Dense bf16 peak FLOP/s per device by jax device_kind substring.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "B200": 2250e12,
}


def peak_flops(device) -> Optional[float]:
  kind = getattr(device, "device_kind", "")
  for name, v in PEAK_FLOPS.items():
    if name in kind:
      return v
  return None


def peak_memory_bytes() -> Optional[int]:
  """The largest peak device memory of this process's devices (None where not reported: CPU)."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except  # backends without allocator stats
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class Meter:
  """Rate, throughput, data wait, TFLOP/s and MFU, peak memory and ETA of a training run."""

  def __init__(self, model: DeepFlow, global_batch_size: int, num_steps: int, start_step: int):
    self.batch = int(global_batch_size)
    self.flops_per_step = train_flops_per_example(model) * self.batch
    device = jax.devices()[0]
    self.peak = peak_flops(device) if device.platform != "cpu" else None
    self.num_steps = int(num_steps)
    self.progress = Progress(num_steps, "train", "steps", done=start_step, log=None)
    self._time, self._step, self._wait = time.perf_counter(), int(start_step), 0.0

  def data_wait(self, seconds: float) -> None:
    """Time the loop waited for a batch."""
    self._wait += seconds

  def step_done(self) -> None:
    self.progress.update(1)

  def measure(self, step: int) -> dict[str, float]:
    """The throughput numbers of the steps since the last call (then starts a new interval)."""
    now = time.perf_counter()
    n = max(step - self._step, 1)
    sps = n / max(now - self._time, 1e-9)
    out = {"steps_per_sec": sps, "images_per_sec": sps * self.batch,
           "data_wait_ms": 1e3 * self._wait / n}
    if self.peak is not None:
      tflops = self.flops_per_step * sps / jax.device_count() / 1e12
      out.update(tflops_per_device=tflops, mfu=tflops * 1e12 / self.peak)
    peak_mem = peak_memory_bytes()  # accelerators; CPU reports nothing
    if peak_mem is not None:
      out["peak_memory_gib"] = peak_mem / 2**30
    self._time, self._step, self._wait = now, step, 0.0
    return out

  def line(self, step: int, m: dict[str, float], proj: bool = False) -> str:
    """The progress line of a logged step from its losses and ``measure``'s numbers."""
    extra = ""
    if "mfu" in m:
      extra = f" | {m['tflops_per_device']:.1f} TFLOP/s/dev MFU {100 * m['mfu']:.1f}%"
    if "peak_memory_gib" in m:
      extra += f" | peak mem {m['peak_memory_gib']:.1f} GiB"
    if m.get("skipped_steps"):
      extra += f" | skipped {int(m['skipped_steps'])} non-finite"
    p = f" proj {m['loss_proj']:.4f}" if proj else ""
    return (f"step {step}/{self.num_steps} | loss {m['loss']:.4f} (denoise "
            f"{m['loss_denoise']:.4f} acc {m['loss_acc']:.4f}{p}) | grad {m['grad_norm']:.3f} | "
            f"{format_rate(m['steps_per_sec'])} steps/s {format_rate(m['images_per_sec'])} img/s "
            f"| data {m['data_wait_ms']:.1f} ms/step{extra} | ETA "
            f"{format_duration(self.progress.eta)}")
