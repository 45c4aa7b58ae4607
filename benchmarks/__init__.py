"""Benchmarks: ``python -m benchmarks.runner --suite NAME [-o results.json]``."""
