"""Evaluation: metrics, reports and before/after comparisons."""
