"""The entry points dispatch asynchronously: they return before the device finishes.

`equinox.filter_jit` waits for every call to finish; `gd.sample` must not, so a loop
of calls overlaps host work with the device's. Each call below enqueues a program
of about two million particle-steps (32768 particles, 64 steps), which runs tens of
times as long as a non-blocking call takes to return (on a CPU, with XLA's default
flags: 60 ms against 1 ms; the tests' fast-compile flags make it run longer), so its
output cannot be ready when such a call returns, and is always ready when a
blocking one does. (Host callbacks cannot stand in for a slow program: the
CPU backend runs programs holding them synchronously.)
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import guidediff as gd


SDE = gd.VPSDE()
TS = gd.uniform_grid(1.0, 1e-3, 64)
P = 32768


def _score():
    return gd.ScoreFn(lambda t, x, args: -x * jnp.cos(t * x))


def _returns_first(call):
    jax.block_until_ready(call(0))  # compiled and warm
    out = call(1)
    pending = not all(leaf.is_ready() for leaf in jax.tree.leaves(out))
    jax.block_until_ready(out)
    return pending


def test_sample_returns_before_the_device_finishes():
    score = _score()

    def call(seed):
        return gd.sample(
            jr.key(seed), SDE, score, (2,), num_particles=P, ts=TS, solver=dfx.Euler()
        ).ys

    assert _returns_first(call), "gd.sample waited for its program to finish"


def test_smc_sample_and_initial_noise_return_before_the_device_finishes():
    score = _score()

    def smc(seed):
        out = gd.smc_sample(
            jr.key(seed),
            SDE,
            score,
            (2,),
            lambda x: -jnp.sum(x**2),
            num_particles=P // 4,
            ts=TS,
            solver=dfx.Euler(),
        )
        return out.ys

    assert _returns_first(smc), "gd.smc_sample waited for its program to finish"

    def noise(seed):
        return gd.initial_noise(jr.key(seed), SDE, (256,), num_particles=P)

    assert _returns_first(noise), "gd.initial_noise waited for its program to finish"


def test_a_call_does_not_wait_for_the_calls_before_it():
    """With the default solver (`ExponentialIntegrator(sde)`, checked against the
    sampled SDE) and gradient guidance (which holds an SDE): a second call returns
    while the first is still running. Comparing the SDEs with `eqx.tree_equal`
    enqueued device ops and read their result back, so every call waited for the
    calls queued before it."""
    score = gd.guide(
        _score(), gd.gradient_guidance(lambda x: -jnp.sum(x**2), 0.1, sde=SDE)
    )
    for run in (gd.sample, gd.smc_sample):
        extra = (lambda x: -jnp.sum(x**2),) if run is gd.smc_sample else ()
        n = P if run is gd.sample else P // 4

        def call(seed, run=run, extra=extra, n=n):
            return run(jr.key(seed), SDE, score, (2,), *extra, num_particles=n, ts=TS)

        jax.block_until_ready(call(0))
        first = call(1)
        second = call(2)
        pending = not all(leaf.is_ready() for leaf in jax.tree.leaves(first))
        jax.block_until_ready((first, second))
        assert pending, f"{run.__name__} waited for the call before it"


def test_a_network_score_with_heun_does_not_wait():
    """The check that a network score is not evaluated at sigma = 0 by an
    end-evaluating solver (Heun, the ODE default) computed sigma(t_end) on the
    device and read it back on every call, waiting for the calls before it."""
    net = gd.EpsScore(lambda t, x, args: x * jnp.cos(t * x), SDE)
    # one potential object: a new function per call would compile a new program
    # per call (a static argument), and the compile, not the check, would wait
    log_potential = lambda x: -jnp.sum(x**2)

    def sample(seed):
        return gd.sample(jr.key(seed), SDE, net, (2,), process="ode",
                         num_particles=P // 4, ts=TS).ys  # fmt: skip

    def smc(seed):
        return gd.smc_sample(jr.key(seed), SDE, net, (2,), log_potential,
                             solver=dfx.Heun(), num_particles=P, ts=TS).ys  # fmt: skip

    for call in (sample, smc):
        jax.block_until_ready(call(0))
        first = call(1)
        second = call(2)
        pending = not first.is_ready()
        jax.block_until_ready((first, second))
        assert pending, f"{call.__name__} waited for the call before it"


def test_the_default_solver_is_built_once_per_sde():
    """A direct call reuses the default `ExponentialIntegrator` of the same SDE
    object (host time); an SDE holding tracers is not remembered."""
    from guidediff._sample import _DEFAULT_SOLVERS, _default_sde_solver

    assert _default_sde_solver(SDE) is _default_sde_solver(SDE)
    assert _default_sde_solver(SDE).sde is SDE
    other = gd.VPSDE(gd.LinearBeta(0.1, 10.0))
    assert _default_sde_solver(other).sde is other

    def mean(beta_max):
        sde = gd.VPSDE(gd.LinearBeta(0.1, beta_max))
        before = len(_DEFAULT_SOLVERS)
        ys = gd.sample(jr.key(0), sde, _score(), (1,), num_particles=2, ts=TS[:4])
        assert len(_DEFAULT_SOLVERS) == before
        return jnp.mean(ys.ys)

    jax.grad(mean)(20.0)


def _overlaps_untraced(call, traces) -> tuple[bool, bool]:
    """After a warm-up call: whether the second of two calls returned while the
    first still ran, and whether either traced again (`traces` grew)."""
    jax.block_until_ready(call(0))
    traced = len(traces)
    first = call(1)
    second = call(2)
    pending = not first.is_ready()
    jax.block_until_ready((first, second))
    return pending, len(traces) != traced


def test_a_sweep_building_weights_and_grids_per_call_does_not_wait():
    """A loop that builds its guidance weight and grid in each call (as the README
    writes them) returns while the previous call runs, and traces the score once.
    Weights and grids checked their values by reading back the device arrays they
    had just made; the score check keyed a weight by its value (read back, and the
    score traced again for each new weight); NumPy grids were read back after
    conversion; `denoise=True` with a `gd.interval` computed sigma(t_end) on the
    device; `smc_sample` traced a log-potential rebuilt per call (`reward.log`)
    again, and read back its default grid: each waited for the calls queued
    before it."""
    traces = []
    score = _score()
    other = gd.ScoreFn(lambda t, x, args: traces.append(1) or -x)
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    late = gd.interval(gd.reward_guidance(other, 0.5), 0.0, 0.5)
    sweeps = {
        "a new float weight, an inline uniform_grid": lambda w: dict(
            score=gd.guide(score, gd.reward_guidance(other, w)),
            ts=gd.uniform_grid(1.0, 1e-3, 64),
        ),
        "gd.PiecewiseLinear, a NumPy grid, an interval with denoise": lambda w: dict(
            score=gd.guide(
                score,
                gd.chain(
                    late, gd.reward_guidance(other, gd.PiecewiseLinear([0, 1], [w, 0]))
                ),
            ),
            ts=np.linspace(1.0, 1e-3, 65),
            denoise=True,
        ),
    }
    for name, build in sweeps.items():

        def call(i, build=build):
            kw = dict(num_particles=P, solver=dfx.Euler()) | build(0.1 * i)
            return gd.sample(jr.key(i), SDE, shape=(2,), **kw).ys

        pending, retraced = _overlaps_untraced(call, traces)
        assert pending, f"{name}: gd.sample waited for the call before it"
        assert not retraced, f"{name}: the score was traced again"

    class Bump(eqx.Module):  # parameters computed on the device in each call
        center: jax.Array

        def log(self, x):
            potential_traces.append(1)
            return -jnp.sum((x - self.center) ** 2)

    potential_traces = []
    potentials = {
        "reward.log": lambda i: reward.log,
        "a potential holding a float array computed per call": lambda i: (
            Bump(jnp.ones(2) * (0.1 * i)).log
        ),
    }
    for name, potential in potentials.items():

        def smc(i, potential=potential):
            return gd.smc_sample(jr.key(i), SDE, score, (2,), potential(i),
                                 num_particles=P // 16, solver=dfx.Euler()).ys  # fmt: skip

        pending, retraced = _overlaps_untraced(smc, potential_traces)
        assert pending, f"gd.smc_sample ({name}) waited for the call before it"
        assert not retraced, f"{name}: the potential was traced again"
