"""Evaluation: metrics and zero-shot evaluation jobs."""
