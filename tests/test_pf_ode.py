"""Probability-flow ODE with the exact Gaussian score: closed-form pushforward.

For Gaussian data the PF-ODE map from time T to time eps is affine, x -> A x + b, so
the law it produces from any Gaussian start is known exactly from A and b. A and b are
read off solves from d + 1 initial points (adaptive Tsit5, float64).
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


MEAN = jnp.array([1.0, -2.0])
COV = jnp.array([[1.0, 0.6], [0.6, 2.0]])
EPS = 1e-5


def _flow_map(sde, score, solver):
    term = gd.probability_flow(sde, score)

    def solve(y0):
        sol = dfx.diffeqsolve(
            term,
            solver,
            sde.T,
            EPS,
            -1e-3,
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
            max_steps=100000,
        )
        return sol.ys[-1]

    pts = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])
    out = jax.vmap(solve)(pts)
    b = out[0]
    A = (out[1:] - b[None]).T
    return A, b, solve


@pytest.mark.parametrize(
    "sde", [gd.VPSDE(), gd.VESDE(sigma_max=20.0)], ids=["vp", "ve"]
)
def test_pf_ode_maps_time_T_marginal_onto_data(sde):
    g = gd.Gaussian(MEAN, COV)
    A, b, solve = _flow_map(sde, g.score(sde), dfx.Tsit5())
    # affine check at a random point
    y = jr.normal(jr.key(0), (2,))
    np.testing.assert_allclose(solve(y), A @ y + b, atol=1e-8)
    m_T, C_T = g.marginal_moments(sde, sde.T)
    m_eps, C_eps = g.marginal_moments(sde, EPS)
    out_mean, out_cov = A @ m_T + b, A @ C_T @ A.T
    np.testing.assert_allclose(out_mean, m_eps, atol=1e-4)
    np.testing.assert_allclose(out_cov, C_eps, atol=1e-4)
    # ... which is the data Gaussian up to the eps-noise.
    np.testing.assert_allclose(out_mean, MEAN, atol=1e-4)
    np.testing.assert_allclose(out_cov, COV, atol=1e-4)

    # From the N(0, s^2 I) prior instead, the output is the pushforward of the prior.
    # Exact flow map of a Gaussian: A* = C_0^{1/2} C_T^{-1/2} (they commute), so the
    # prior-mismatch error is |mean error| <= ||A*|| |m_T| and the covariance error
    # is ||C_0 - s^2 A* A*^T||; both are stated here in closed form and tiny.
    s2 = sde.prior_std() ** 2
    w, U = jnp.linalg.eigh(COV)
    alpha, sigma = sde.marginal(sde.T)
    a_star = U @ jnp.diag(jnp.sqrt(w / (alpha**2 * w + sigma**2))) @ U.T
    mean_bound = jnp.linalg.norm(a_star, 2) * jnp.linalg.norm(m_T)
    cov_bound = jnp.linalg.norm(COV - s2 * a_star @ a_star.T, 2)
    prior_mean, prior_cov = b, s2 * A @ A.T
    assert jnp.linalg.norm(prior_mean - MEAN) <= mean_bound + 1e-4
    assert jnp.linalg.norm(prior_cov - COV, 2) <= cov_bound + 1e-4
    # ... and the errors are exactly the closed-form ones: mean MEAN - A* m_T,
    # covariance s^2 A* A*^T.
    np.testing.assert_allclose(prior_mean, MEAN - a_star @ m_T, atol=1e-4)
    np.testing.assert_allclose(prior_cov, s2 * a_star @ a_star.T, atol=1e-4)


def test_pf_ode_through_sample_heun_and_adaptive():
    """gd.sample's ODE path (fixed-grid Heun and adaptive Tsit5) agrees particle by
    particle with the closed-form affine pushforward of the same prior draws (no
    Monte-Carlo error: tolerances are the solvers' accuracy)."""
    sde = gd.VPSDE()
    g = gd.Gaussian(MEAN, COV)
    A, b, _ = _flow_map(sde, g.score(sde), dfx.Tsit5())
    n = 2000
    heun = gd.sample(
        jr.key(1),
        sde,
        g.score(sde),
        (2,),
        num_particles=n,
        process="ode",
        ts=gd.uniform_grid(1.0, EPS, 200),
    )
    tsit = gd.sample(
        jr.key(1),
        sde,
        g.score(sde),
        (2,),
        num_particles=n,
        process="ode",
        ts=jnp.array([1.0, 0.99, EPS]),
        solver=dfx.Tsit5(),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    # Same keys => same prior draws: particle-wise the maps agree.
    y0 = jax.vmap(lambda k: sde.prior_sample(jr.split(k)[0], (2,)))(
        jax.vmap(lambda i: jr.fold_in(jr.key(1), i))(jnp.arange(n))
    )
    exact = y0 @ A.T + b[None]
    np.testing.assert_allclose(tsit.ys, exact, atol=1e-6)
    np.testing.assert_allclose(heun.ys, exact, atol=5e-3)
    assert int(heun.num_failed) == 0 and int(tsit.num_failed) == 0
