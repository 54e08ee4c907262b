"""Benchmark scripts that run from a clone (python -m benchmarks.NAME); not installed.

The experiments that ship with the package are in ``memstore.bench``."""
