"""``deepflow_jax.eval.digits_eval`` kept importable for existing scripts and notebooks.

The digits evaluation moved to :mod:`deepflow_jax.evaluation.digits`; this module re-exports it.
"""
from deepflow_jax.evaluation.digits import DigitsClassifier  # noqa: F401
from deepflow_jax.evaluation.digits import classify  # noqa: F401
from deepflow_jax.evaluation.digits import evaluate_generated  # noqa: F401
from deepflow_jax.evaluation.digits import feature_stats  # noqa: F401
from deepflow_jax.evaluation.digits import frechet_distance  # noqa: F401
from deepflow_jax.evaluation.digits import random_shifts  # noqa: F401
from deepflow_jax.evaluation.digits import train_classifier  # noqa: F401
