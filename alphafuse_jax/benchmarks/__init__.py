"""Benchmarks, run as modules (python -m alphafuse_jax.benchmarks.<name>); not part of the tests."""
