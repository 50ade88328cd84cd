"""`gd.log_likelihood` against the exact log-densities of Gaussian mixtures.

With the exact score and the exact $p_T$ as the prior, the probability-flow
likelihood is the exact $\\log p_{t_0}$ up to the ODE solver's tolerance; its gradient
in $x$ is the exact score at $t_0$; the Hutchinson estimate is unbiased. Each
`log_likelihood` configuration compiles once per module (same shapes and static
parts), so the checks share programs."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
# two correlated components, so the score's Jacobian is not diagonal (a Rademacher
# probe would be exact for a diagonal one)
GMM = gd.GaussianMixture(
    [0.3, 0.7],
    [[-2.0, 0.5], [1.5, -0.5]],
    [[[0.5, 0.3], [0.3, 0.4]], [[0.4, -0.2], [-0.2, 0.6]]],
    labels=[0, 1],
)
T0 = 0.01
XS = jnp.array([[0.5, 1.0], [-2.0, 0.3], [1.0, -1.0]])
TIGHT = dfx.PIDController(rtol=1e-9, atol=1e-9)


def exact_prior(y):
    """The exact log p_T, in place of the prior N(0, I)."""
    return GMM.log_prob_t(SDE, SDE.T, y)


def exact_log_p(x):
    return GMM.log_prob_t(SDE, T0, x)


@pytest.fixture(scope="module")
def exact():
    return gd.log_likelihood(
        SDE, GMM.score(SDE), XS, t0=T0, prior_logp=exact_prior,
        stepsize_controller=TIGHT,
    )  # fmt: skip


def test_the_exact_score_gives_the_exact_log_density(exact):
    want = jax.vmap(exact_log_p)(XS)
    np.testing.assert_allclose(exact.log_prob, want, rtol=0, atol=1e-7)
    assert not exact.failed.any() and int(exact.num_failed) == 0
    # its parts: the prior at the latents, and the divergence's integral
    np.testing.assert_allclose(
        exact.prior_log_prob, jax.vmap(exact_prior)(exact.ys), rtol=1e-12
    )
    np.testing.assert_allclose(
        exact.prior_log_prob + exact.delta_log_prob, exact.log_prob, rtol=1e-12
    )
    # the latents are where the probability flow takes the points: back down, the
    # reverse ODE returns them to XS
    back = dfx.diffeqsolve(
        gd.probability_flow(SDE, GMM.score(SDE)), dfx.Tsit5(), SDE.T, T0, None,
        exact.ys[0], stepsize_controller=TIGHT,
    )  # fmt: skip
    np.testing.assert_allclose(back.ys[-1], XS[0], atol=1e-6)


def test_the_default_prior_is_off_by_the_prior_mismatch_only(exact):
    """With N(0, I) for p_T, log_prob changes by log N(x_T) - log p_T(x_T): the same
    latents, the same divergence integral."""
    out = gd.log_likelihood(SDE, GMM.score(SDE), XS, t0=T0, stepsize_controller=TIGHT)
    np.testing.assert_allclose(out.ys, exact.ys, rtol=1e-12)
    np.testing.assert_allclose(out.delta_log_prob, exact.delta_log_prob, rtol=1e-12)
    np.testing.assert_allclose(
        out.log_prob - exact.log_prob,
        jax.vmap(SDE.prior_logp)(out.ys) - exact.prior_log_prob,
        atol=1e-12,
    )


def test_the_gradient_in_x_is_the_score_at_t0():
    """d/dx log p_t0(x) = s_t0(x): reverse mode through the solve (fixed grid,
    Heun: the discrete solution's gradient, close to the exact one)."""
    ts = gd.uniform_grid(SDE.T, T0, 400)

    def total(xs):
        out = gd.log_likelihood(
            SDE, GMM.score(SDE), xs, ts=ts, solver=dfx.Heun(),
            prior_logp=exact_prior,
        )  # fmt: skip
        return out.log_prob.sum()

    grad = jax.jit(jax.grad(total))(XS)
    want = jax.vmap(lambda x: GMM.score_t(SDE, T0, x))(XS)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4)


def test_hutchinson_is_unbiased(exact):
    """The mean over probe keys is the exact value, within 4 Monte-Carlo standard
    errors (per point); each key's estimate differs from it."""
    n = 256

    @jax.jit
    def estimates(keys):
        def one(k):
            return gd.log_likelihood(
                SDE, GMM.score(SDE), XS, t0=T0, prior_logp=exact_prior,
                divergence="hutchinson", key=k, stepsize_controller=TIGHT,
            ).log_prob  # fmt: skip

        return jax.vmap(one)(keys)

    keys = jr.split(jr.key(0), n)
    est = np.asarray(estimates(keys))
    assert np.isfinite(est).all()
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(n)
    assert (se > 0).all()  # a real estimator (exact would have no spread)
    np.testing.assert_array_less(np.abs(mean - np.asarray(exact.log_prob)), 4 * se)
    # particle i's probe comes from fold_in(key, i): a shorter batch keeps it
    first = gd.log_likelihood(
        SDE, GMM.score(SDE), XS[:2], t0=T0, prior_logp=exact_prior,
        divergence="hutchinson", key=keys[0], stepsize_controller=TIGHT,
    )  # fmt: skip
    np.testing.assert_allclose(first.log_prob, est[0, :2], rtol=1e-9)


def test_a_failed_particle_is_flagged_not_raised():
    out = gd.log_likelihood(SDE, GMM.score(SDE), XS, t0=T0, max_steps=2)
    assert out.failed.all() and int(out.num_failed) == len(XS)
    # every value NaN, wherever the solve stopped (a review saw finite ys)
    for a in (out.log_prob, out.prior_log_prob, out.delta_log_prob, out.ys):
        assert np.isnan(a).all()


def test_a_non_finite_point_is_flagged_at_once(exact):
    """(The same program as the `exact` fixture's.) Its solve starts from 0 instead
    of taking every step; the other points keep their values."""
    bad = XS.at[1, 0].set(jnp.nan)
    out = gd.log_likelihood(
        SDE, GMM.score(SDE), bad, t0=T0, prior_logp=exact_prior,
        stepsize_controller=TIGHT,
    )  # fmt: skip
    assert out.failed.tolist() == [False, True, False]
    assert int(out.num_steps[1]) < 4 * int(exact.num_steps.max())
    np.testing.assert_array_equal(out.log_prob[::2], exact.log_prob[::2])


def test_bad_traced_times_flag_every_particle():
    """Under jit the times are checked on the device (a review saw finite, wrong
    values with failed=False for t0 > T and for an increasing grid)."""
    s = GMM.score(SDE)
    by_t0 = jax.jit(lambda t: gd.log_likelihood(SDE, s, XS, t0=t))
    assert by_t0(2.0).failed.all() and not by_t0(T0).failed.any()
    by_ts = jax.jit(lambda ts: gd.log_likelihood(SDE, s, XS, ts=ts))
    assert by_ts(jnp.linspace(1e-3, 1.0, 6)).failed.all()
    assert not by_ts(jnp.linspace(1.0, 1e-3, 6)).failed.any()


def test_differentiation_modes_name_their_adjoint():
    s = GMM.score(SDE)

    def total(xs, **kw):
        return gd.log_likelihood(SDE, s, xs, t0=T0, **kw).log_prob.sum()

    with pytest.raises(Exception, match="forward-mode only"):
        jax.grad(lambda xs: total(xs, adjoint=dfx.ForwardMode()))(XS)
    with pytest.raises(TypeError, match=r"adjoint=diffrax.ForwardMode\(\)"):
        jax.jacfwd(total)(XS)


def test_bad_input_is_refused():
    s = GMM.score(SDE)
    for kwargs, match in [
        (dict(divergence="trace"), "'exact' or 'hutchinson'"),
        (dict(divergence="hutchinson"), "needs a key"),
        (dict(key=jr.key(0)), "uses none"),
        (dict(t0=1.0), r"\[0, sde.T\)"),
        (dict(t0=-0.1), r"\[0, sde.T\)"),
        (dict(t0=0.1, ts=jnp.linspace(1.0, 0.1, 5)), "not both"),
        (dict(ts=jnp.linspace(0.1, 1.0, 5)), "strictly decreasing"),
        (dict(ts=jnp.linspace(0.9, 0.1, 5)), "start the grid at sde.T"),
        (dict(stepsize_controller=dfx.StepTo(jnp.linspace(0.1, 1.0, 5))), "as ts="),
        (dict(ts=jnp.linspace(1.0, 0.1, 5), stepsize_controller=TIGHT), "StepTo"),
        (dict(solver=gd.DPMSolverPP(SDE)), "sampling solver"),
        (dict(max_steps=0), "at least 1"),
        (dict(solver=dfx.Euler()), "no error estimate.*pass a fixed grid as ts="),
        (dict(solver=dfx.HalfSolver(gd.DDIM(SDE))), "sampling solver"),
        (dict(solver=dfx.EulerHeun()), "pair of terms"),
    ]:
        refused = TypeError if match == "sampling solver" else ValueError
        with pytest.raises(refused, match=match):
            gd.log_likelihood(SDE, s, XS, **kwargs)
    # t0 just below T rounds to T in float32 (it failed every particle silently)
    with pytest.raises(ValueError, match="as float32: 1.0"):
        gd.log_likelihood(SDE, s, XS.astype(jnp.float32), t0=0.99999999)

    # a score without a JVP: the divergence needs one (the forward-mode hint did
    # not apply: a review)
    @jax.custom_vjp
    def ident(x):
        return x

    ident.defvjp(lambda x: (x, None), lambda r, g: (g,))
    no_jvp = gd.ScoreFn(lambda t, x, a: s(t, ident(x), a))
    with pytest.raises(TypeError, match="holds a jax.custom_vjp"):
        gd.log_likelihood(SDE, no_jvp, XS)
    with pytest.raises(TypeError, match="holds a jax.custom_vjp"):  # under jit too
        jax.jit(lambda xs: gd.log_likelihood(SDE, no_jvp, xs).log_prob)(XS)
    # one 2-D point without the particle axis: read as 2 points of shape ()
    with pytest.raises(ValueError, match=r"pass xs\[None\]"):
        gd.log_likelihood(SDE, s, XS[0])
    # a label per point: the hint shows how, with log_likelihood
    with pytest.raises(ValueError, match=r"gd\.log_likelihood\(sde, score, x\[None\]"):
        gd.log_likelihood(
            SDE, GMM.conditional_score(SDE), XS, args=jnp.array([0, 1, 0])
        )
    with pytest.raises(ValueError, match="leading particle axis"):
        gd.log_likelihood(SDE, s, jnp.asarray(0.5))
    with pytest.raises(ValueError, match=r"one particle of shape \(3,\)"):
        gd.log_likelihood(SDE, s, jnp.zeros((2, 3)))  # a 2-D score, 3-D points
    # T = 0.7 is not a float32 number: a grid from it passes the grid checks (the
    # error raised is the prior's, checked after them)
    sde7 = gd.VPSDE(T=0.7)
    with pytest.raises(ValueError, match="one real number per latent"):
        gd.log_likelihood(sde7, GMM.score(sde7), XS.astype(jnp.float32),
                          ts=gd.uniform_grid(0.7, 1e-3, 4), prior_logp=lambda y: y)  # fmt: skip
    for prior in (lambda y: y, lambda y: jnp.sum(y)[None]):  # not one number
        with pytest.raises(ValueError, match="one real number per latent"):
            gd.log_likelihood(SDE, s, XS, prior_logp=prior)
    with pytest.raises(ValueError, match="calling prior_logp"):
        gd.log_likelihood(SDE, s, XS, prior_logp=lambda y: y @ jnp.ones(3))
    with pytest.raises(TypeError, match="AbstractScore"):
        gd.log_likelihood(SDE, GMM.score, XS)
    with pytest.raises(ValueError, match="differs"):
        gd.log_likelihood(SDE, GMM.score(gd.VESDE()), XS)
