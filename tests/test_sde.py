"""Forward SDEs: marginals against their own drift and diffusion, in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import guidediff as gd


SDES = [
    gd.VPSDE(),
    gd.VPSDE(gd.CosineSchedule()),
    gd.VPSDE(gd.OneMinusT()),
    gd.VESDE(),
]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: repr(s)[:30])
def test_marginal_solves_moment_odes(sde):
    # alpha' = f alpha and (sigma^2)' = 2 f sigma^2 + g^2, for X_t = alpha X_0 + sigma Z.
    for t in [0.05, 0.3, 0.7, 0.95 * sde.T]:
        alpha, sigma = sde.marginal(t)
        dalpha = jax.grad(lambda s: sde.marginal(s)[0])(t)
        dvar = jax.grad(lambda s: sde.marginal(s)[1] ** 2)(t)
        f, g = sde.drift_coeff(t), sde.diffusion(t)
        np.testing.assert_allclose(dalpha, f * alpha, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dvar, 2 * f * sigma**2 + g**2, rtol=1e-10)
    alpha0, sigma0 = sde.marginal(0.0)
    np.testing.assert_allclose([alpha0, sigma0], [1.0, 0.0], atol=1e-12)


def test_one_minus_t_schedule_is_papers():
    sde = gd.VPSDE(gd.OneMinusT())
    alpha, sigma = sde.marginal(0.36)
    np.testing.assert_allclose([alpha, sigma], [0.8, 0.6], rtol=1e-12)
    np.testing.assert_allclose(sde.diffusion(0.5) ** 2, 2.0, rtol=1e-12)


def test_prior_sample_and_logp(getkey):
    sde = gd.VESDE()
    x = sde.prior_sample(getkey(), (20000, 2))
    std = float(sde.prior_std())
    np.testing.assert_allclose(np.std(np.asarray(x)), std, rtol=4 / np.sqrt(40000))
    v = jnp.array([0.3, -1.0])
    expected = jax.scipy.stats.norm.logpdf(v, scale=std).sum()
    np.testing.assert_allclose(sde.prior_logp(v), expected, rtol=1e-12)


def test_log_snr_decreasing():
    for sde in SDES:
        ts = jnp.linspace(0.01, sde.T, 50)
        lam = jax.vmap(sde.log_snr)(ts)
        assert np.all(np.diff(np.asarray(lam)) < 0)


def test_grids():
    sde = gd.VPSDE()
    for ts in [
        gd.uniform_grid(1.0, 1e-3, 10),
        gd.quadratic_grid(1.0, 1e-3, 10),
        gd.logsnr_grid(sde, 1.0, 1e-3, 10),
    ]:
        assert ts.shape == (11,)
        np.testing.assert_allclose([ts[0], ts[-1]], [1.0, 1e-3])
        assert np.all(np.diff(np.asarray(ts)) < 0)
    lam = jax.vmap(sde.log_snr)(gd.logsnr_grid(sde, 1.0, 1e-3, 10))
    np.testing.assert_allclose(
        np.diff(np.asarray(lam)), np.diff(np.asarray(lam))[0], rtol=1e-8
    )


def test_bad_sde_parameters():
    with pytest.raises(ValueError, match="sigma_min"):
        gd.VESDE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="T"):
        gd.VPSDE(T=1.5)
