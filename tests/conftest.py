"""Test configuration: float64 and strict rank promotion, as diffrax's own tests do;
XLA:CPU flags for fast compiles (set before JAX starts its backend)."""

import gc
import os


# Compiling dominates this suite on a small CPU: most tests run a few particles for a
# few steps, and each compiles its own programs. These flags trade run-time speed of
# the compiled code for compile time: LLVM at optimisation level 0 without its
# expensive passes, and XLA:CPU's elemental emitters instead of its newer fusion
# emitters (which compile about twice as slowly here). On a 2-core machine the
# not-slow suite took about 8 minutes with them, 12 to 14 without. They change
# code generation, not the HLO programs or their math (no fast math); rounding can
# differ from a default run's by an ulp, and tests compare results within one run.
# The long statistical tests (`make test-slow`) run long computations and keep XLA's
# defaults: GUIDEDIFF_TEST_XLA_DEFAULTS=1. Flags already in XLA_FLAGS come after
# these and win.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
if os.environ.get("GUIDEDIFF_TEST_XLA_DEFAULTS") != "1":
    os.environ["XLA_FLAGS"] = " ".join(
        [*FAST_COMPILE_XLA_FLAGS, os.environ.get("XLA_FLAGS", "")]
    ).strip()

import jax  # noqa: E402  (after XLA_FLAGS: JAX reads them when its backend starts)
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


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


# The longest test files (seconds on 2 CPU cores, `--junitxml` of `make test`) go to
# the workers first: `--dist loadfile` hands out files in collection order, and a
# long file handed out last leaves the other worker idle at the end.
_LONGEST_FIRST = (
    "test_train.py",
    "test_differentiable.py",
    "test_smc.py",
    "test_dpm_solver.py",
    "test_docstring_examples.py",
    "test_reproduce.py",
    "test_benchmarks_smoke.py",
    "test_readme.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    # a stable sort: tests keep their order within a file
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
