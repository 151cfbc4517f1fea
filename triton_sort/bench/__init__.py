"""Benchmarks and measurement helpers (speed, peak memory) behind the ``triton-sort`` command."""
