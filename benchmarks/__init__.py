"""guidediff's benchmarks: plain scripts, each runnable as `python -m benchmarks.NAME`.

This package must not import jax at import time: `benchmarks.scaling` sets
`XLA_FLAGS` before the first jax import.
"""
