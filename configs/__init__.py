"""Config presets, one per file; installed with the package as ``deepflow_jax.configs``."""
