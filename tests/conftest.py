"""Test configuration: float64 and strict rank promotion, as diffrax's own tests do."""

import gc

import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, deterministic within a test."""
    state = {"key": jr.key(0)}

    def _getkey():
        state["key"], sub = jr.split(state["key"])
        return sub

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free every compiled program after each test module. The suite compiles
    hundreds of programs in one process; XLA:CPU maps memory for each, and
    without this the process reached the kernel's limit on memory mappings
    (vm.max_map_count) and segfaulted inside a later compile."""
    yield
    jax.clear_caches()
    gc.collect()
