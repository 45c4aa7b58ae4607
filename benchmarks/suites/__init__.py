"""Benchmark suites, one module each, each with ``run(args) -> dict``."""
