"""The scan driver's bookkeeping of per-step solver results."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd
from guidediff._driver import _first_failure


SUCCESS = dfx.RESULTS.successful
FAIL = dfx.RESULTS.nonlinear_divergence


def test_first_failure_keeps_the_first_non_success():
    # a constant success (an explicit solver's step) adds nothing to trace
    assert _first_failure(FAIL, SUCCESS) is FAIL

    @jax.jit
    def merge(a, b):
        ra = dfx.RESULTS.where(a, FAIL, SUCCESS)
        rb = dfx.RESULTS.where(b, dfx.RESULTS.max_steps_reached, SUCCESS)
        return _first_failure(ra, rb) == FAIL, _first_failure(ra, rb) == SUCCESS

    assert [bool(v) for v in merge(True, True)] == [True, False]
    assert [bool(v) for v in merge(False, False)] == [False, True]
    assert [bool(v) for v in merge(False, True)] == [False, False]


class _FailsFarOut(dfx.AbstractSolver):
    """Euler, but a step that lands outside |y| < 2 reports a divergence."""

    term_structure = dfx.AbstractTerm
    interpolation_cls = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, err, dense, state, _ = dfx.Euler().step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        res = dfx.RESULTS.where(jnp.any(jnp.abs(y1) > 2.0), FAIL, SUCCESS)
        return y1, err, dense, state, res

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


def test_a_failing_step_flags_its_particle_only():
    sde = gd.VPSDE()
    score = gd.Gaussian(jnp.zeros(1), jnp.eye(1)).score(sde)
    ts = gd.uniform_grid(sde.T, 1e-3, 20)
    out = gd.sample(
        jr.key(0), sde, score, (1,), num_particles=64, ts=ts, solver=_FailsFarOut()
    )
    traj = gd.sample(
        jr.key(0),
        sde,
        score,
        (1,),
        num_particles=64,
        ts=ts,
        solver=dfx.Euler(),
        save_trajectory=True,
    ).ys
    went_far = np.asarray(jnp.any(jnp.abs(traj[:, 1:]) > 2.0, axis=(1, 2)))
    assert 0 < went_far.sum() < 64  # the test sees both kinds of particle
    np.testing.assert_array_equal(np.asarray(out.failed), went_far)
    np.testing.assert_array_equal(np.asarray(out.result == FAIL), went_far)
    # a failed particle's values are NaN (the finite state its solver stopped in
    # is not a sample, and metrics reading ys alone took it as one); the others
    # are the plain Euler samples
    ys = np.asarray(out.ys)
    assert np.all(np.isnan(ys[went_far]))
    np.testing.assert_allclose(
        ys[~went_far], np.asarray(traj[~went_far, -1]), rtol=1e-12
    )
    with pytest.raises(ValueError, match="needs finite samples"):
        gd.energy_distance(out.ys, traj[:, -1])
    # the tuners report them (their objective was a mean over the finite garbage)
    guided = lambda w: gd.guide(score, gd.reward_guidance(score, w))
    with pytest.raises(FloatingPointError, match="failed in the sampler"):
        gd.tune_guidance(jr.key(0), sde, guided, lambda x: -jnp.sum(x**2), (1,),
                         num_iters=1, num_particles=64, ts=ts, solver=_FailsFarOut())  # fmt: skip


def test_a_particle_out_of_adaptive_steps_is_nan():
    """With adaptive steps, a particle that needs more than max_steps was flagged
    but kept the state where its solve stopped (a trajectory: inf at the times not
    reached): NaN either way now."""
    sde = gd.VPSDE()
    score = gd.Gaussian(jnp.zeros(2), 0.01 * jnp.eye(2)).score(sde)
    kw = dict(num_particles=3, ts=gd.uniform_grid(1.0, 1e-3, 2), process="ode",
              stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5), max_steps=5)  # fmt: skip
    for traj in (False, True):
        out = gd.sample(jr.key(0), sde, score, (2,), save_trajectory=traj, **kw)
        assert bool(out.failed.all()) and bool(jnp.all(jnp.isnan(out.ys)))


def test_denoise_at_sigma_zero_is_the_identity():
    """Tweedie at t = 0 (sigma = 0) returns the state; a network's score, infinite
    there, is not evaluated (0 * inf made every particle NaN), and the gradient
    stays finite. Both drivers."""
    sde = gd.VPSDE()
    net = gd.EpsScore(lambda t, x, a: 0.5 * x, sde)
    ts = gd.uniform_grid(0.5, 0.0, 4)
    y0 = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    for driver in ("scan", "diffeqsolve"):
        kw = dict(ts=ts, y0=y0, driver=driver)
        out = gd.sample(jr.key(0), sde, net, (2,), denoise=True, **kw)
        plain = gd.sample(jr.key(0), sde, net, (2,), **kw)
        assert not out.failed.any()
        np.testing.assert_array_equal(out.ys, plain.ys)
    grad = jax.grad(
        lambda y: gd.sample(
            jr.key(0), sde, net, (2,), ts=ts, y0=y, denoise=True
        ).ys.sum()
    )(y0)
    assert np.all(np.isfinite(grad))
    # above t = 0 denoise still applies Tweedie
    ts1 = gd.uniform_grid(0.5, 0.1, 4)
    out = gd.sample(jr.key(0), sde, net, (2,), ts=ts1, y0=y0, denoise=True)
    last = gd.sample(jr.key(0), sde, net, (2,), ts=ts1, y0=y0).ys
    expect = jax.vmap(lambda x: gd.denoise(sde, net, ts1[-1], x))(last)
    np.testing.assert_allclose(out.ys, expect, rtol=1e-6)


def test_saveat_is_save_trajectory_in_diffrax_words():
    """DESIGN.md names saveat among gd.sample's arguments: a diffrax.SaveAt of the
    grid's ts[::k] is save_trajectory=True, save_every=k (the same arrays), and
    SaveAt(t1=True) the default; what it cannot express is a clear error."""
    sde = gd.VPSDE()
    score = gd.Gaussian(jnp.array([2.0]), 0.25 * jnp.eye(1)).score(sde)
    ts = gd.uniform_grid(1.0, 1e-3, 8)

    def run(**kw):
        return gd.sample(jr.key(0), sde, score, (1,), num_particles=3, ts=ts, **kw)

    pairs = [
        (dict(saveat=dfx.SaveAt(t1=True)), dict()),
        (dict(saveat=dfx.SaveAt(t0=True, steps=True)), dict(save_trajectory=True)),
        (
            dict(saveat=dfx.SaveAt(t0=True, ts=ts[4:5], t1=True)),
            dict(save_trajectory=True, save_every=4),
        ),
    ]
    for a, b in pairs:
        out_a, out_b = run(**a), run(**b)
        np.testing.assert_array_equal(out_a.ys, out_b.ys)
        np.testing.assert_array_equal(out_a.ts, out_b.ts)
    bad = [
        (dfx.SaveAt(steps=True), "ts\\[::k\\]"),  # no initial state
        (dfx.SaveAt(ts=ts[1:]), "ts\\[::k\\]"),
        (dfx.SaveAt(ts=ts[::3]), "ts\\[::k\\]"),  # 3 does not divide 8 steps
        (dfx.SaveAt(ts=jnp.array([0.5])), "not grid times"),
        (dfx.SaveAt(dense=True), "dense"),
        (dfx.SaveAt(t1=True, fn=lambda t, y, args: y), "fn="),
        (dfx.SaveAt(subs=[dfx.SubSaveAt(t1=True)]), "SubSaveAt"),
    ]
    for saveat, match in bad:
        with pytest.raises(ValueError, match=match):
            run(saveat=saveat)
    with pytest.raises(ValueError, match="not both"):
        run(saveat=dfx.SaveAt(t1=True), save_trajectory=True)
    # from a review: steps= under an adaptive controller would have saved the
    # grid's times, not diffrax's steps; a SaveAt built under jit from the grid
    # got the message for static ints
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="adaptive"):
        run(saveat=dfx.SaveAt(t0=True, steps=True), stepsize_controller=pid,
            process="ode")  # fmt: skip
    with pytest.raises(TypeError, match="Build the SaveAt outside"):
        jax.jit(lambda t: run(saveat=dfx.SaveAt(ts=t[::4])).ys)(ts)
    # the grid's times in another (narrower) dtype are still the grid's
    out = run(saveat=dfx.SaveAt(ts=ts[::4].astype(jnp.float32)), dtype=jnp.float64)
    assert out.ys.shape == (3, 3, 1)
    with pytest.raises(TypeError, match="diffrax.SaveAt"):
        run(saveat="t1")
