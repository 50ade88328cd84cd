r"""DDIM and DPM-Solver++(2M) against the closed-form probability-flow map.

For Gaussian data $N(\mu, \mathrm{diag}(c))$ the time-$t$ marginal is
$N(\alpha_t\mu, \mathrm{diag}(s_t^2))$ with $s_t^2 = \alpha_t^2 c + \sigma_t^2$, and
the probability-flow ODE keeps each standardised coordinate
$(x_i - \alpha_t\mu_i)/s_{t,i}$ fixed (a monotone affine map between 1-D
Gaussians). So the exact solution from $T$ to $\varepsilon$ is known, and the
solvers' errors and convergence orders are measured against it, in float64,
without Monte Carlo.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
MU = jnp.array([1.0, -2.0])
C = jnp.array([0.5, 2.0])
DATA = gd.Gaussian(MU, jnp.diag(C))
EPS = 1e-3
Y_T = jr.normal(jr.key(0), (16, 2))


def _exact(y, t_from, t_to, mu=MU):
    a0, s0 = SDE.marginal(t_from)
    a1, s1 = SDE.marginal(t_to)
    std0, std1 = jnp.sqrt(a0**2 * C + s0**2), jnp.sqrt(a1**2 * C + s1**2)
    return a1 * mu[None] + (std1 / std0)[None] * (y - a0 * mu[None])


def _sample(solver, n, driver=None, mu=MU):
    data = gd.Gaussian(mu, jnp.diag(C))
    ts = gd.logsnr_grid(SDE, SDE.T, EPS, n)
    return gd.sample(
        jr.key(0),
        SDE,
        data.score(SDE),
        (2,),
        y0=Y_T,
        ts=ts,
        process="ode",
        solver=solver,
        driver=driver,
    ).ys


def _error(solver, n):
    return float(jnp.max(jnp.abs(_sample(solver, n) - _exact(Y_T, SDE.T, EPS))))


@pytest.mark.parametrize("cls, order", [(gd.DDIM, 1), (gd.DPMSolverPP, 2)])
def test_convergence_order_against_the_exact_flow(cls, order):
    errs = np.array([_error(cls(SDE), n) for n in (16, 32, 64)])
    observed = np.log2(errs[:-1] / errs[1:])
    assert np.all(errs[1:] < errs[:-1])
    assert abs(observed[-1] - order) < 0.2, observed
    assert cls(SDE).order(None) == order


def test_second_order_beats_first_order_and_heun_per_score_evaluation():
    """At 32 score evaluations: DPM-Solver++(2M) with 32 steps against DDIM with 32
    steps and Heun (two evaluations per step) with 16."""
    dpm = _error(gd.DPMSolverPP(SDE), 32)
    assert dpm < 0.25 * _error(gd.DDIM(SDE), 32)
    assert dpm < _error(dfx.Heun(), 16)


@pytest.mark.parametrize("cls", [gd.DDIM, gd.DPMSolverPP])
def test_both_drivers_give_the_same_samples(cls):
    scan = _sample(cls(SDE), 12, driver="scan")
    solve = _sample(cls(SDE), 12, driver="diffeqsolve")
    np.testing.assert_allclose(solve, scan, rtol=1e-12, atol=1e-12)


def test_forward_in_time_inverts_the_flow():
    """Integrated from EPS up to T (diffrax's forward direction, no time flip), the
    solver maps the exact data-end points onto the exact prior-end points."""
    term = gd.probability_flow(SDE, DATA.score(SDE))
    y_eps = _exact(Y_T, SDE.T, EPS)

    def error(n):
        ts = gd.logsnr_grid(SDE, SDE.T, EPS, n)[::-1]

        def solve(y):
            sol = dfx.diffeqsolve(
                term,
                gd.DPMSolverPP(SDE),
                ts[0],
                ts[-1],
                None,
                y,
                stepsize_controller=dfx.StepTo(ts),
                saveat=dfx.SaveAt(t1=True),
            )
            return sol.ys[0]

        return float(jnp.max(jnp.abs(jax.vmap(solve)(y_eps) - Y_T)))

    e16, e64 = error(16), error(64)
    assert e64 < e16 / 8  # second order: /16 in the limit


def test_gradient_matches_finite_differences():
    """d/d mu of the mean of the samples, through the multistep solver state."""

    def f(mu):
        return jnp.mean(_sample(gd.DPMSolverPP(SDE), 10, mu=mu) ** 2)

    g = jax.grad(f)(MU)
    h = 1e-6
    fd = jnp.array([(f(MU + h * e) - f(MU - h * e)) / (2 * h) for e in jnp.eye(2)])
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_solver_and_process_must_match():
    score = DATA.score(SDE)
    ts = gd.uniform_grid(SDE.T, EPS, 4)

    def sample(**kw):
        return gd.sample(jr.key(0), SDE, score, (2,), ts=ts, **kw)

    with pytest.raises(ValueError, match="probability-flow ODE"):
        sample(solver=gd.DPMSolverPP(SDE))
    with pytest.raises(ValueError, match="reverse SDE"):
        sample(process="ode", solver=gd.ExponentialIntegrator(SDE))
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="fixed grids only"):
        sample(process="ode", solver=gd.DDIM(SDE), stepsize_controller=pid)
