"""Benchmarks for uvkerneld: run ``python -m bench`` from the repository root."""
