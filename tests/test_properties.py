"""Property tests (hypothesis): identities that must hold for every parameter, not
just the hand-picked ones of the other files. Each property compares against a
closed form computed independently here, in float64.

Examples are derandomized (the same on every run, so CI cannot pass by luck or fail
by it) and few; every compiled function takes its parameters as arrays of fixed
shapes, so each property compiles once.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import guidediff as gd


PROPERTY = settings(max_examples=25, derandomize=True, deadline=None, database=None)
K, D = 3, 2  # mixture components, dimension

finite = dict(allow_nan=False, allow_infinity=False)
means_st = hnp.arrays(np.float64, (K, D), elements=st.floats(-4, 4, **finite))
# dense covariances A A^T + 0.05 I, from unconstrained factors
factors_st = hnp.arrays(np.float64, (K, D, D), elements=st.floats(-1.5, 1.5, **finite))
weights_st = hnp.arrays(np.float64, (K,), elements=st.floats(0.05, 1.0, **finite))
point_st = hnp.arrays(np.float64, (D,), elements=st.floats(-5, 5, **finite))
time_st = st.floats(0.01, 0.99)
MIXTURE = dict(weights=weights_st, means=means_st, factors=factors_st)
MIXTURE_AT_A_POINT = dict(
    **MIXTURE, t=time_st, x=point_st, label=st.sampled_from([0, 1])
)
SDES = {
    "vp-linear": gd.VPSDE(),
    "vp-cosine": gd.VPSDE(gd.CosineSchedule()),
    "vp-1-t": gd.VPSDE(gd.OneMinusT()),
    "ve": gd.VESDE(),
}


def _mixture(weights, means, factors, labels=(0, 1, 1)):
    covs = np.einsum("kij,klj->kil", factors, factors) + 0.05 * np.eye(D)
    return gd.GaussianMixture(weights, means, covs, labels=list(labels)), covs


def _reference_log_prob(weights, means, covs, alpha, sigma, x, keep=None):
    """log p_t(x) of the mixture pushed through x_t = alpha x_0 + sigma z, written
    from the definition: each component is N(alpha m_k, alpha^2 C_k + sigma^2 I)."""
    logs = []
    for k in range(K):
        cov = alpha**2 * covs[k] + sigma**2 * np.eye(D)
        diff = x - alpha * means[k]
        _, logdet = np.linalg.slogdet(cov)
        quad = diff @ np.linalg.solve(cov, diff)
        logn = -0.5 * (quad + logdet + D * math.log(2 * math.pi))
        logs.append(math.log(weights[k]) + logn)
    logs = np.array(logs)
    if keep is not None:
        logs = logs[keep]
        norm = np.log(np.sum(weights[keep]))
    else:
        norm = np.log(np.sum(weights))
    m = logs.max()
    return m + np.log(np.sum(np.exp(logs - m))) - norm


@eqx.filter_jit
def _density_and_scores(gmm, sde, t, x, label):
    logp = gmm.log_prob_t(sde, t, x)
    logp_c = gmm.log_prob_t(sde, t, x, label)
    grad = jax.grad(lambda y: gmm.log_prob_t(sde, t, y))(x)
    grad_c = jax.grad(lambda y: gmm.log_prob_t(sde, t, y, label))(x)
    return (
        logp,
        logp_c,
        grad,
        grad_c,
        gmm.score(sde)(t, x),
        gmm.conditional_score(sde)(t, x, label),
    )


@pytest.mark.parametrize("name", list(SDES))
@PROPERTY
@given(**MIXTURE_AT_A_POINT)
def test_mixture_density_and_score_match_the_definition(
    name, weights, means, factors, t, x, label
):
    sde = SDES[name]
    gmm, covs = _mixture(weights, means, factors)
    t = t * sde.T
    alpha, sigma = (float(v) for v in sde.marginal(t))
    logp, logp_c, grad, grad_c, score, score_c = _density_and_scores(
        gmm, sde, jnp.asarray(t), jnp.asarray(x), jnp.asarray(label)
    )
    keep = np.array([0, 1, 1]) == label
    np.testing.assert_allclose(
        logp, _reference_log_prob(weights, means, covs, alpha, sigma, x), rtol=1e-9
    )
    np.testing.assert_allclose(
        logp_c,
        _reference_log_prob(weights, means, covs, alpha, sigma, x, keep),
        rtol=1e-9,
    )
    scale = 1 + np.abs(grad).max()
    np.testing.assert_allclose(score, grad, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(score_c, grad_c, rtol=1e-8, atol=1e-9 * scale)


@eqx.filter_jit
def _tilt_identity(gmm, reward, x):
    tilted = gmm.tilt(reward)
    return tilted.log_prob(x), gmm.log_prob(x) + reward.log(x), reward.expectation(gmm)


@PROPERTY
@given(
    **MIXTURE,
    x=point_st,
    center=point_st,
    width=st.floats(0.3, 3.0),
    direction=hnp.arrays(np.float64, (D,), elements=st.floats(-1, 1, **finite)),
)
def test_reward_tilts_are_the_reweighted_density(
    weights, means, factors, x, center, width, direction
):
    # p^r(x) = p(x) r(x) / E_p[r]: the closed-form tilt against its definition
    gmm, _ = _mixture(weights, means, factors)
    for reward in (
        gd.GaussianBumpReward(center, width),
        gd.ExpLinearReward(direction),
    ):
        tilted, unnormalised, expectation = _tilt_identity(gmm, reward, jnp.asarray(x))
        np.testing.assert_allclose(
            tilted, unnormalised - np.log(expectation), rtol=1e-9, atol=1e-9
        )


@eqx.filter_jit
def _guided_values(gmm, sde, w, t, x, label):
    cond = gmm.conditional_score(sde)
    s_c, s_u = cond(t, x, label), cond(t, x, gmm.null_label)
    batched = gd.guide(cond, gd.cfg(w, null_args=gmm.null_label))(t, x, label)
    two_calls = gd.guide(cond, gd.cfg(w, null_args=gmm.null_label, batched=False))(
        t, x, label
    )
    bayes = gd.guide(gmm.score(sde), gd.classifier_guidance(gmm.log_classifier(sde)))(
        t, x, label
    )
    return s_c, s_u, batched, two_calls, bayes


@PROPERTY
@given(
    **MIXTURE_AT_A_POINT,
    w=st.floats(-2, 8),
)
def test_cfg_and_classifier_guidance_closed_forms(
    weights, means, factors, t, x, label, w
):
    sde = SDES["vp-linear"]
    gmm, _ = _mixture(weights, means, factors)
    s_c, s_u, batched, two_calls, bayes = _guided_values(
        gmm, sde, jnp.asarray(w), jnp.asarray(t), jnp.asarray(x), jnp.asarray(label)
    )
    scale = 1 + np.abs(s_c).max() + np.abs(s_u).max()
    # CFG: s_c + w (s_c - s_u), batched or not
    expected = s_c + w * (s_c - s_u)
    np.testing.assert_allclose(batched, expected, atol=1e-10 * scale * (1 + abs(w)))
    np.testing.assert_allclose(two_calls, expected, atol=1e-10 * scale * (1 + abs(w)))
    # Bayes: the exact noisy classifier at w = 1 turns the score into the
    # class-conditional one
    np.testing.assert_allclose(bayes, s_c, rtol=1e-8, atol=1e-9 * scale)


@eqx.filter_jit
def _chain_values(gmm, sde, w1, w2, w3, t, x, label):
    cond = gmm.conditional_score(sde)
    reward = gd.GaussianBumpReward(jnp.zeros(D), 1.0)
    sr = gmm.tilt(reward).conditional_score(sde)
    g1 = gd.cfg(w1, null_args=gmm.null_label)
    g2 = gd.reward_guidance(sr, w2)
    g3 = gd.classifier_guidance(gmm.log_classifier(sde), w3)
    left = gd.guide(cond, gd.chain(gd.chain(g1, g2), g3))(t, x, label)
    right = gd.guide(cond, gd.chain(g1, gd.chain(g2, g3)))(t, x, label)
    nested = gd.guide(gd.guide(gd.guide(cond, g1), g2), g3)(t, x, label)
    flat = gd.guide(cond, gd.chain(g1, g2, g3))(t, x, label)
    empty = gd.guide(cond, gd.chain())(t, x, label)
    # the reward term by hand, on the CFG-guided score (optax order)
    s1 = gd.guide(cond, g1)(t, x, label)
    by_hand = s1 + w2 * (sr(t, x, label) - s1)
    by_hand = by_hand + w3 * jax.grad(lambda y: gmm.log_classifier(sde)(t, y, label))(x)
    return left, right, nested, flat, empty, cond(t, x, label), by_hand


@PROPERTY
@given(
    **MIXTURE_AT_A_POINT,
    ws=st.tuples(st.floats(-2, 4), st.floats(-2, 4), st.floats(-2, 4)),
)
def test_chain_laws(weights, means, factors, t, x, label, ws):
    sde = SDES["vp-linear"]
    gmm, _ = _mixture(weights, means, factors)
    left, right, nested, flat, empty, plain, by_hand = _chain_values(
        gmm,
        sde,
        *(jnp.asarray(w) for w in ws),
        jnp.asarray(t),
        jnp.asarray(x),
        jnp.asarray(label),
    )
    tol = 1e-9 * (1 + np.abs(by_hand).max())
    for got in (left, right, nested, flat):
        np.testing.assert_allclose(got, by_hand, atol=tol)
    np.testing.assert_array_equal(empty, plain)


@eqx.filter_jit
def _tweedie(data, sde, t, x):
    score = data.score(sde)
    x0 = gd.denoise(sde, score, t, x)
    s = score(t, x)
    eps = gd.score_to_eps(sde, t, x, s)
    return (
        x0,
        gd.score_to_x0(sde, t, x, s),
        gd.x0_to_score(sde, t, x, x0),
        gd.eps_to_score(sde, t, x, eps),
    )


@pytest.mark.parametrize("name", list(SDES))
@PROPERTY
@given(
    mean=point_st,
    factor=hnp.arrays(np.float64, (D, D), elements=st.floats(-1.5, 1.5, **finite)),
    t=time_st,
    x=point_st,
)
def test_denoiser_is_the_gaussian_posterior_mean(name, mean, factor, t, x):
    # data N(m, C): E[X_0 | X_t = x] = m + alpha C (alpha^2 C + sigma^2 I)^{-1}
    # (x - alpha m), and the score parameterisations convert into each other
    sde = SDES[name]
    t = t * sde.T
    cov = factor @ factor.T + 0.05 * np.eye(D)
    alpha, sigma = (float(v) for v in sde.marginal(t))
    expected = mean + alpha * cov @ np.linalg.solve(
        alpha**2 * cov + sigma**2 * np.eye(D), x - alpha * mean
    )
    x0, x0_again, s_from_x0, s_from_eps = _tweedie(
        gd.Gaussian(mean, cov), sde, jnp.asarray(t), jnp.asarray(x)
    )
    scale = 1 + np.abs(expected).max() + np.abs(x).max() / alpha
    np.testing.assert_allclose(x0, expected, atol=1e-9 * scale)
    np.testing.assert_allclose(x0_again, x0, atol=1e-12 * scale)
    score = np.asarray(gd.Gaussian(mean, cov).score(sde)(t, x))
    s_scale = 1 + np.abs(score).max()
    np.testing.assert_allclose(s_from_x0, score, atol=1e-9 * s_scale)
    np.testing.assert_allclose(s_from_eps, score, atol=1e-12 * s_scale)


_systematic = jax.jit(lambda key, lw: gd.resample_indices(key, lw, "systematic"))
_stratified = jax.jit(lambda key, lw: gd.resample_indices(key, lw, "stratified"))


@PROPERTY
@given(
    weights=hnp.arrays(
        np.float64,
        (16,),
        elements=st.one_of(st.just(0.0), st.floats(1e-3, 1.0, **finite)),
    ).filter(lambda w: w.sum() > 0),
    seed=st.integers(0, 2**31 - 1),
)
def test_resampling_counts(weights, seed):
    n = weights.size
    log_w = jnp.log(jnp.asarray(weights))
    expected = n * weights / weights.sum()
    key = jr.key(seed)
    counts = np.bincount(np.asarray(_systematic(key, log_w)), minlength=n)
    # systematic: each count is floor or ceil of n w_i (up to rounding of n w_i)
    assert np.all(counts >= np.floor(expected - 1e-9))
    assert np.all(counts <= np.ceil(expected + 1e-9))
    counts = np.bincount(np.asarray(_stratified(key, log_w)), minlength=n)
    assert counts.sum() == n
    assert np.all(counts[weights == 0] == 0)  # a dead particle is never picked


@PROPERTY
@given(
    t_end=st.floats(1e-4, 0.5),
    span=st.floats(1e-3, 1.0),
    num_steps=st.sampled_from([1, 3, 40]),  # each step count compiles a grid
    name=st.sampled_from(list(SDES)),
)
def test_grids_are_decreasing_with_exact_ends(t_end, span, num_steps, name):
    sde = SDES[name]
    t_start = min(t_end + span, sde.T)
    t_end = min(t_end, t_start / 2)
    grids = {
        "uniform": gd.uniform_grid(t_start, t_end, num_steps),
        "quadratic": gd.quadratic_grid(t_start, t_end, num_steps),
        "logsnr": gd.logsnr_grid(sde, t_start, t_end, num_steps),
    }
    for kind, ts in grids.items():
        ts = np.asarray(ts)
        assert ts.shape == (num_steps + 1,), kind
        assert ts[0] == t_start and ts[-1] == t_end, kind
        assert np.all(np.diff(ts) < 0), kind
    # equal steps in log-SNR (up to the bisection's tolerance on the times)
    lam = np.asarray(jax.vmap(sde.log_snr)(jnp.asarray(grids["logsnr"])))
    steps = np.diff(lam)
    np.testing.assert_allclose(steps, steps.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        np.diff(np.asarray(grids["uniform"])), -(t_start - t_end) / num_steps, rtol=1e-9
    )


@PROPERTY
@given(
    gaps=hnp.arrays(np.float64, (4,), elements=st.floats(0.01, 1.0, **finite)),
    values=hnp.arrays(np.float64, (5,), elements=st.floats(-5, 5, **finite)),
    u=st.floats(-0.5, 1.5),
)
def test_piecewise_linear_interpolates(gaps, values, u):
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    w = gd.PiecewiseLinear(times, values)
    np.testing.assert_allclose(jax.vmap(w)(jnp.asarray(times)), values, atol=1e-12)
    t = u * times[-1]
    np.testing.assert_allclose(w(t), np.interp(t, times, values), atol=1e-12)


_mean_stderr = jax.jit(gd.mean_stderr)
_energy = jax.jit(gd.energy_distance)


@PROPERTY
@given(
    values=hnp.arrays(np.float64, (12,), elements=st.floats(-1e6, 1e6, **finite)),
    y=hnp.arrays(np.float64, (7, D), elements=st.floats(-3, 3, **finite)),
)
def test_mean_stderr_and_energy_distance(values, y):
    mean, se = _mean_stderr(jnp.asarray(values))
    np.testing.assert_allclose(
        mean, np.mean(values), atol=1e-9 * (1 + np.abs(values).max())
    )
    np.testing.assert_allclose(
        se,
        np.std(values, ddof=1) / math.sqrt(values.size),
        rtol=1e-9,
        atol=1e-9 * (1 + np.abs(values).max()),
    )
    x = values[: 2 * 4].reshape(4, D) / 1e6
    # energy distance: the documented estimator, written out; symmetric

    def mean_dist(a, b, within):
        dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
        n = a.shape[0]
        return dist.sum() / (n * (n - 1)) if within else dist.mean()

    expected = (
        2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)
    )
    xy = _energy(jnp.asarray(x), jnp.asarray(y))
    yx = _energy(jnp.asarray(y), jnp.asarray(x))
    np.testing.assert_allclose(xy, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(yx, xy, rtol=1e-12, atol=1e-12)


@eqx.filter_jit
def _point_mass_flow(solver, point, ts, y0):
    sde = SDES["vp-linear"]
    score = gd.PointCloud(point[None]).score(sde)
    out = gd.sample(
        jr.key(0), sde, score, (D,), y0=y0, ts=ts, process="ode", solver=solver
    )
    return out.ys, out.failed


@pytest.mark.parametrize("solver_cls", [gd.DDIM, gd.DPMSolverPP])
@settings(PROPERTY, max_examples=15)
@given(
    point=point_st,
    y0=hnp.arrays(np.float64, (3, D), elements=st.floats(-3, 3, **finite)),
    cuts=hnp.arrays(np.float64, (5,), elements=st.floats(0.01, 0.99, **finite)),
    t_end=st.floats(1e-3, 0.2),
)
def test_data_prediction_solvers_are_exact_for_a_point_mass(
    solver_cls, point, y0, cuts, t_end
):
    # For a point mass p the denoiser is p at every t, and the probability-flow
    # ODE's solution is x_s = alpha_s p + sigma_s (x_t - alpha_t p) / sigma_t:
    # DDIM and DPM-Solver++(2M) integrate it exactly on any grid.
    sde = SDES["vp-linear"]
    inner = t_end + (sde.T - t_end) * np.sort(cuts)[::-1]
    ts = np.concatenate([[sde.T], inner, [t_end]])  # 7 times: one compiled grid
    assume(np.all(np.diff(ts) < -1e-6))
    ys, failed = _point_mass_flow(
        solver_cls(sde), jnp.asarray(point), jnp.asarray(ts), jnp.asarray(y0)
    )
    assert not np.any(failed)
    a0, s0 = (float(v) for v in sde.marginal(ts[0]))
    a1, s1 = (float(v) for v in sde.marginal(ts[-1]))
    expected = a1 * point + s1 * (y0 - a0 * point) / s0
    np.testing.assert_allclose(ys, expected, atol=1e-9 * (1 + np.abs(expected).max()))
