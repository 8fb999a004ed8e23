"""deepflow-jax: DeepFlow (Deeply Supervised Flow-Based Generative Models) in JAX/Flax."""

__version__ = "0.1.0"
