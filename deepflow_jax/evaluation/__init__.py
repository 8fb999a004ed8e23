"""Evaluation: the ADM suite's metrics (FID, sFID, IS, precision/recall) and the digits evaluator."""
