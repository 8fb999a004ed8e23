"""``deepflow_jax.eval.digits_eval`` kept importable for existing scripts and notebooks.

The digits evaluation moved to :mod:`deepflow_jax.evaluation.digits`; this module re-exports it.
"""
from deepflow_jax.evaluation.digits import DigitsClassifier
from deepflow_jax.evaluation.digits import classify
from deepflow_jax.evaluation.digits import evaluate_generated
from deepflow_jax.evaluation.digits import feature_stats
from deepflow_jax.evaluation.digits import frechet_distance
from deepflow_jax.evaluation.digits import random_shifts
from deepflow_jax.evaluation.digits import train_classifier

__all__ = ["DigitsClassifier", "classify", "evaluate_generated", "feature_stats",
           "frechet_distance", "random_shifts", "train_classifier"]
