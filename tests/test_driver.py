"""The scan driver's bookkeeping of per-step solver results."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

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
