"""Forward SDEs: marginals against their own drift and diffusion, in closed form."""

import jax
import jax.numpy as jnp
import jax.random as jr
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
    # the relative standard error of a Gaussian sample's SD is 1 / sqrt(2 n)
    np.testing.assert_allclose(np.std(np.asarray(x)), std, rtol=4 / np.sqrt(2 * 40000))
    v = jnp.array([0.3, -1.0])
    expected = jax.scipy.stats.norm.logpdf(v, scale=std).sum()
    np.testing.assert_allclose(sde.prior_logp(v), expected, rtol=1e-12)


def test_log_snr_decreasing():
    for sde in SDES:
        ts = jnp.linspace(0.01, sde.T, 50)
        lam = jax.vmap(sde.log_snr)(ts)
        assert np.all(np.diff(np.asarray(lam)) < 0)


def test_log_snr_is_log_alpha2_over_sigma2():
    """The value, not only its monotonicity (`logsnr_grid` is blind to a constant
    factor, and the solvers compute their own lambda)."""
    for sde in SDES:
        for t in (0.05, 0.3, 0.9 * float(sde.T)):
            alpha, sigma = sde.marginal(t)
            np.testing.assert_allclose(
                sde.log_snr(t), jnp.log(alpha**2 / sigma**2), rtol=1e-10
            )
    # closed form: VP with alpha^2 = 1 - t at t = 0.2 is log(0.8 / 0.2)
    one_minus_t = gd.VPSDE(gd.OneMinusT())
    np.testing.assert_allclose(one_minus_t.log_snr(0.2), np.log(4.0), rtol=1e-12)


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


def test_logsnr_grid_compiles_once_per_step_count():
    """Run eagerly, the bisection's loop compiled anew at every call (0.1-0.3 s);
    new ends now reuse one program per SDE and step count."""
    from guidediff import _grid

    sde = gd.VPSDE()
    gd.logsnr_grid(sde, 1.0, 1e-3, 13)
    before = _grid._logsnr_times._cached._cache_size()
    for t_end in (1e-3, 2e-3, 5e-3):
        ts = gd.logsnr_grid(sde, 0.9, t_end, 13)
        assert ts[-1] == t_end and ts[0] == 0.9
    assert _grid._logsnr_times._cached._cache_size() == before


def test_bad_sde_parameters():
    with pytest.raises(ValueError, match="sigma_min"):
        gd.VESDE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="T"):
        gd.VPSDE(T=1.5)


def test_bad_schedule_and_sde_parameters_are_rejected():
    bad_ve = [
        dict(T=-1.0),
        dict(T=0.0),
        dict(T=float("inf")),
        dict(sigma_max=float("inf")),
        dict(sigma_min=float("nan")),
        dict(sigma_min=0.0),
    ]
    for kwargs in bad_ve:
        with pytest.raises(ValueError, match="VESDE needs"):
            gd.VESDE(**kwargs)
    for lo, hi in [(-1.0, 2.0), (1.0, 0.5), (0.0, 0.0), (0.1, float("inf"))]:
        with pytest.raises(ValueError, match="LinearBeta needs"):
            gd.LinearBeta(lo, hi)
    for s in [-0.5, 0.0, float("nan")]:
        with pytest.raises(ValueError, match="s > 0"):
            gd.CosineSchedule(s)
    # singular at t = 1: T must stay below 1 (the linear schedule is fine there)
    for schedule in [gd.CosineSchedule(), gd.OneMinusT()]:
        with pytest.raises(ValueError, match="needs T < 1"):
            gd.VPSDE(schedule, T=1.0)
    sde = gd.VPSDE(gd.LinearBeta(), T=1.0)
    assert np.all(np.isfinite(np.asarray(sde.marginal(1.0))))


def test_parameter_checks_skip_traced_values():
    # Validation runs on concrete values only: differentiating or vmapping through
    # the parameters must keep working.
    def sigma(beta_max):
        return gd.VPSDE(gd.LinearBeta(0.1, beta_max)).marginal(0.5)[1]

    assert np.isfinite(float(jax.grad(sigma)(15.0)))
    cos = jax.vmap(lambda s: gd.VPSDE(gd.CosineSchedule(s)).marginal(0.5)[1])
    assert np.all(np.isfinite(np.asarray(cos(jnp.array([0.004, 0.008])))))
    ve = jax.jit(lambda hi: gd.VESDE(0.01, hi).prior_std())
    np.testing.assert_allclose(ve(20.0), np.sqrt(20.0**2 - 0.01**2), rtol=1e-12)


def test_cosine_sigma_float32_small_t():
    # 1 - alpha_bar cancels at small t if formed from log_alpha_bar; in float32 that
    # gave sigma(1e-6) = 0 (exact 1.97e-4).
    sde32 = jax.tree.map(lambda p: p.astype(jnp.float32), gd.VPSDE(gd.CosineSchedule()))
    s = 0.008
    for t in [1e-7, 1e-6, 1e-5, 1e-4, 1e-2, 0.5]:
        t32 = jnp.float32(t)
        tt = float(t32)
        a, a0 = 0.5 * np.pi * (tt + s) / (1 + s), 0.5 * np.pi * s / (1 + s)
        exact = np.sqrt(np.sin(a - a0) * np.sin(a + a0)) / np.cos(a0)
        alpha, sigma = sde32.marginal(t32)
        assert sigma.dtype == jnp.float32
        np.testing.assert_allclose(float(sigma), exact, rtol=1e-5)
        np.testing.assert_allclose(float(alpha), np.cos(a) / np.cos(a0), rtol=1e-6)
        dvar = jax.grad(lambda u: sde32.marginal(u)[1] ** 2)(t32)
        assert np.isfinite(float(dvar)) and float(dvar) > 0


def test_sigma_at_zero_has_finite_parameter_gradients():
    """sigma(0) = 0 for every parameter value, so its parameter derivative is 0; the
    square root's infinite slope made it NaN (0 * inf), and with it every gradient
    through a grid ending at t = 0 (Heun's last stage, denoise)."""
    vp = jax.grad(lambda b: gd.VPSDE(gd.LinearBeta(0.1, b)).marginal(0.0)[1])(15.0)
    ve = jax.grad(lambda s: gd.VESDE(0.01, s).marginal(0.0)[1])(5.0)
    assert vp == 0.0 and ve == 0.0
    # away from 0 the derivative is the square root's
    sde = gd.VPSDE()
    d = jax.grad(lambda t: sde.marginal(t)[1])(0.3)
    expect = jax.grad(lambda t: jnp.sqrt(sde.schedule.one_minus_alpha_bar(t)))(0.3)
    np.testing.assert_allclose(d, expect, rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(process="ode"), dict(denoise=True)])
def test_gradient_through_a_grid_ending_at_zero_matches_finite_differences(kw):
    """Heun's last stage and denoise evaluate at t = 0 (float64, same noise)."""
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    ts = jnp.array([1.0, 0.6, 0.3, 0.1, 0.0])

    def f(b):
        sde = gd.VPSDE(gd.LinearBeta(0.1, b))
        out = gd.sample(jax.random.key(0), sde, gmm.score(sde), (2,), ts=ts,
                        num_particles=3, **kw)  # fmt: skip
        return jnp.mean(out.ys**2)

    grad = jax.grad(f)(15.0)
    fd = (f(15.0 + 1e-5) - f(15.0 - 1e-5)) / 2e-5
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_float32_ends_of_the_schedules():
    """From an audit of the schedules' ends in float32 (x64 off, JAX's default):
    VESDE's sigma squared sigma_min (0 below 1e-19: sigma = 0 everywhere) and raised
    r to 2t (inf above r = 1.8e19); the cosine schedule took cos/tan of an angle
    close to pi/2 (375 ulp of alpha and beta at the default T, 3 % at 1 - 1e-6);
    a T that rounds to 1 in float32 gave every particle NaN. References in float64
    from the closed forms."""
    import math

    with jax.enable_x64(False):
        for smin, smax in [(1e-19, 1.0), (1e-10, 1e10), (0.01, 50.0)]:
            sde = gd.VESDE(sigma_min=smin, sigma_max=smax)
            ref = smin * math.sqrt(math.expm1(2 * 0.5 * math.log(smax / smin)))
            np.testing.assert_allclose(sde.marginal(0.5)[1], ref, rtol=1e-6)
            np.testing.assert_allclose(sde.prior_std(), smax * math.sqrt(
                -math.expm1(-2 * math.log(smax / smin))), rtol=1e-6)  # fmt: skip
        s = 0.008
        for T in (1 - 1e-3, 1 - 1e-4, 1 - 1e-6):
            sde = gd.VPSDE(gd.CosineSchedule(), T=T)
            t = jnp.float32(T)
            b = 0.5 * math.pi * (1 - float(t)) / (1 + s)  # 1 - t exact in float32
            alpha = math.sin(b) / math.cos(0.5 * math.pi * s / (1 + s))
            np.testing.assert_allclose(sde.marginal(t)[0], alpha, rtol=1e-6)
            beta = math.pi / (1 + s) / math.tan(b)
            np.testing.assert_allclose(sde.schedule.beta(t), beta, rtol=1e-6)
        # and near t = 0, where the co-angle would be the ill-conditioned one
        # (97 ulp of beta at t = 0.00335 from a review of the first fix)
        cosine = gd.CosineSchedule()
        for t in (0.0, 0.00335, 0.01, 0.3):
            t32 = np.float32(t)
            beta = (
                math.pi / (1 + s) * math.tan(0.5 * math.pi * (float(t32) + s) / (1 + s))
            )
            np.testing.assert_allclose(cosine.beta(t32), beta, rtol=1e-6)
        # a grid that passed for LinearBeta at the same T is checked again for a
        # singular schedule (check_grid's memo was keyed by T alone)
        grid = gd.uniform_grid(1 - 1e-8, 1e-3, 10)
        plain = gd.VPSDE(gd.LinearBeta(), T=1 - 1e-8)
        gd.sample(jr.key(0), plain, gd.Gaussian(jnp.array([1.5]), 0.01).score(plain),
                  (1,), num_particles=2, ts=grid)  # fmt: skip
        for schedule in (gd.OneMinusT(), gd.CosineSchedule()):
            sde = gd.VPSDE(schedule, T=1 - 1e-8)  # fine in float64
            score = gd.Gaussian(jnp.array([1.5]), 0.01).score(sde)
            with pytest.raises(ValueError, match="rounds to 1"):
                gd.sample(jr.key(0), sde, score, (1,), num_particles=2, ts=grid)
            score = gd.Gaussian(jnp.array([1.5]), 0.01).score(sde)
            with pytest.raises(ValueError, match="rounds to 1"):
                gd.sample(jr.key(0), sde, score, (1,), num_particles=2,
                          ts=gd.uniform_grid(sde.T, 1e-3, 10))  # fmt: skip
            with pytest.raises(ValueError, match="rounds to 1"):  # not t_end's fault
                gd.logsnr_grid(sde, sde.T, 1e-3, 10)
