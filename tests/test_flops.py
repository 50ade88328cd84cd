"""The matmul FLOP counter of benchmarks/_flops.py, and what it shows about the
scan driver's checkpointing modes.

The counts are exact integers, so the tests compare them with closed forms. For
a score MLP whose L matmuls all cost the same (F per step for all L), the
gradient of N steps costs, in matmul FLOPs:

- no checkpointing: F (forward) + 2F (input and weight cotangents) = 3F per step;
- one `jax.checkpoint` per step: also recompute the step's internals, except its
  last layer (its output is not needed by the backward pass): 3F + (L-1)/L F;
- `"chunk"`: recompute each chunk once, all of it: 4F;
- `"sqrt"`: recompute each chunk (F), then each step inside it again (L-1)/L F:
  4F + (L-1)/L F.

So no gradient that stores less than every step's internals costs under 3.75x
the forward pass here, and one with memory sublinear in N costs at least 4x.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

from benchmarks import _flops as F, _problems as P


STEPS = 16  # a perfect square: sqrt(N) chunks of sqrt(N) steps, no remainder


@pytest.fixture(scope="module")
def problem():
    # --quick 64d: state 64, three hidden layers of 64: L = 4 equal matmuls.
    return P.make_problem(P.SIZES["64d"], 8, quick=True)


def _count(fn, problem):
    # The benchmarks' hand loop broadcasts biases over the batch (the test suite
    # otherwise raises on rank promotion).
    with jax.numpy_rank_promotion("allow"):
        return F.matmul_flops(fn, problem.params, jr.key(0), P.time_grid(STEPS))


def test_counts_dot_general_with_its_contraction():
    a, b = jnp.ones((2, 5, 3)), jnp.ones((2, 3, 7))
    out = F.matmul_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
    assert out == {"flops": 2 * 2 * 5 * 7 * 3, "exact": True, "notes": []}


def test_scan_bodies_count_length_times_and_nest():
    w = jnp.ones((4, 4))

    def inner(x, _):
        return x @ w, None

    def outer(x, _):
        return jax.lax.scan(inner, x, None, length=3)[0], None

    out = F.matmul_flops(lambda x: jax.lax.scan(outer, x, None, length=5)[0], w)
    assert out["flops"] == 5 * 3 * (2 * 4 * 4 * 4)
    assert out["exact"]


def test_cond_and_while_are_flagged():
    w = jnp.ones((4, 4))
    out = F.matmul_flops(
        lambda x: jax.lax.cond(x[0, 0] > 0, lambda x: x @ w @ w, lambda x: x, x), w
    )
    assert out["flops"] == 2 * 2 * 4**3 and not out["exact"]
    out = F.matmul_flops(
        lambda x: jax.lax.while_loop(lambda x: x[0, 0] < 9, lambda x: x @ w, x), w
    )
    assert not out["exact"] and "while" in out["notes"][0]


def test_sampler_forward_is_the_analytic_count(problem):
    expected = problem.flops_per_eval * problem.particles * STEPS
    assert _count(P.gd_sampler(problem), problem)["flops"] == expected
    assert _count(P.hand_sampler(problem), problem)["flops"] == expected


@pytest.mark.parametrize(
    "checkpoint, ratio",
    [(False, 3.0), ("step", 3.75), ("chunk", 4.0), (True, 4.75)],
)
def test_gradient_recomputation_per_checkpoint_mode(problem, checkpoint, ratio):
    forward = _count(P.gd_sampler(problem), problem)["flops"]
    grad = _count(P.grad_of(P.gd_sampler(problem, checkpoint=checkpoint)), problem)
    assert grad["exact"]
    assert grad["flops"] == ratio * forward


def test_hand_loop_with_a_checkpoint_per_step_does_the_same_work(problem):
    hand = _count(P.grad_of(P.hand_sampler(problem, checkpoint=True)), problem)
    ours = _count(P.grad_of(P.gd_sampler(problem, checkpoint="step")), problem)
    assert hand["flops"] == ours["flops"]
