"""Benchmarks of sampling, training, data loading and evaluation (see benchmarks/README.md)."""
