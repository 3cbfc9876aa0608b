"""Benchmarks: ``python -m bench`` measures serving and training and writes BENCHMARKS.md."""
