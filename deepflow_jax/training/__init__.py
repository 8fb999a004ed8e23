"""Training: the step (``step``), the loop (``loop``), its start-up (``startup``), periodic
actions (``hooks``), throughput (``meter``), checkpoints (``checkpoints``), logs (``writer``)
and SSL alignment (``alignment``). ``train`` and ``iterate_training`` are the entry points."""
from deepflow_jax.training.loop import iterate_training
from deepflow_jax.training.loop import train

__all__ = ["iterate_training", "train"]
