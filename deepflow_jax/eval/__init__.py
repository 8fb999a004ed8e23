"""Evaluation helpers (digits classifier accuracy and Frechet distance)."""
