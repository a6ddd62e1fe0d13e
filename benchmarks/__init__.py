"""Benchmark scripts of sklearn_transfer; ``python -m benchmarks run`` is the main suite."""
