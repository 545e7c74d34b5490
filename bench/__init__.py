"""Benchmarks: ratios measured in one run and DB commands per unit of work (never timed tests)."""
