"""Old home of the digits evaluation; it now lives in :mod:`deepflow_jax.evaluation.digits`."""
