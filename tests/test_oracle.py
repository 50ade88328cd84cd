"""Exact oracles: scores, classifiers and tilts against autodiff and direct formulas."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import three_class_gmm

import guidediff as gd


SDE = gd.VPSDE()
POINTS = jnp.array([[0.3, -0.7], [2.0, 1.0], [-3.0, 0.5]])


@pytest.mark.parametrize("sde", [gd.VPSDE(), gd.VESDE(), gd.VPSDE(gd.OneMinusT())])
def test_mixture_score_is_grad_log_density(sde):
    gmm = three_class_gmm()
    for t in [0.0, 0.2, 0.8]:
        for x in POINTS:
            auto = jax.grad(lambda y: gmm.log_prob_t(sde, t, y))(x)
            np.testing.assert_allclose(
                gmm.score(sde)(t, x), auto, rtol=1e-10, atol=1e-12
            )
            for c in range(3):
                auto_c = jax.grad(lambda y: gmm.log_prob_t(sde, t, y, c))(x)
                got = gmm.conditional_score(sde)(t, x, c)
                np.testing.assert_allclose(got, auto_c, rtol=1e-10, atol=1e-12)
            # the null label is the unconditional score
            np.testing.assert_allclose(
                gmm.conditional_score(sde)(t, x, gmm.null_label), gmm.score(sde)(t, x)
            )


def test_noisy_classifier():
    gmm = three_class_gmm()
    clf = gmm.log_classifier(SDE)
    for x in POINTS:
        total = sum(jnp.exp(clf(0.4, x, c)) for c in range(3))
        np.testing.assert_allclose(total, 1.0, rtol=1e-12)
        # grad log p_t(c|x) = s_t(x|c) - s_t(x): the CFG direction.
        g = jax.grad(lambda y: clf(0.4, y, 1))(x)
        diff = gmm.conditional_score(SDE)(0.4, x, 1) - gmm.score(SDE)(0.4, x)
        np.testing.assert_allclose(g, diff, rtol=1e-9, atol=1e-12)
        # Bayes at t=0
        p1 = gmm.classifier_prob(x, 1)
        direct = gmm.class_prob(1) * jnp.exp(gmm.log_prob(x, 1) - gmm.log_prob(x))
        np.testing.assert_allclose(p1, direct, rtol=1e-10)


@pytest.mark.parametrize(
    "reward",
    [gd.GaussianBumpReward([1.0, 1.0], 0.8), gd.ExpLinearReward([0.5, -0.3])],
    ids=["bump", "explinear"],
)
def test_tilts_are_exact(reward):
    gmm = three_class_gmm()
    tilted = gmm.tilt(reward)
    z = reward.expectation(gmm)
    x = jr.normal(jr.key(3), (7, 2)) * 2
    lhs = jax.vmap(tilted.log_prob)(x)
    rhs = jax.vmap(lambda y: gmm.log_prob(y) + reward.log(y))(x) - jnp.log(z)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)
    # E_p[r] by Monte Carlo within 4 standard errors
    r = jax.vmap(reward)(gmm.sample(jr.key(4), 100000))
    assert abs(float(r.mean() - z)) < 4 * float(r.std()) / np.sqrt(r.size)


def test_sampling_moments():
    """Exact draws: per component (drawn with their labels), the mass, mean and
    covariance match the mixture's definition within 4 standard errors (the
    covariance's from the per-draw products); a draw without the eigenbasis
    rotation, say, passes a mean check but not this."""
    weights = np.array([0.2, 0.15, 0.3, 0.35])
    means = np.array([[-3.0, 0.0], [1.5, 2.0], [3.0, -0.5], [0.0, -3.0]])
    covs = np.array([
        [[0.6, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.3]],
        [[0.5, -0.1], [-0.1, 0.5]], [[0.4, 0.0], [0.0, 0.7]],
    ])  # fmt: skip
    gmm = gd.GaussianMixture(weights, means, covs)
    n = 100000
    x, comp = map(np.asarray, gmm.sample_with_labels(jr.key(0), n))
    for k in range(len(weights)):
        xk = x[comp == k]
        frac_se = np.sqrt(weights[k] * (1 - weights[k]) / n)
        assert abs(len(xk) / n - weights[k]) < 4 * frac_se, k
        mean_se = xk.std(0) / np.sqrt(len(xk))
        assert np.all(np.abs(xk.mean(0) - means[k]) < 4 * mean_se), k
        d = xk - means[k]  # centred at the true mean: products unbiased for C
        prods = d[:, :, None] * d[:, None, :]
        cov_se = prods.std(0) / np.sqrt(len(xk))
        assert np.all(np.abs(prods.mean(0) - covs[k]) < 4 * cov_se), k
    se = x.std(0) / np.sqrt(n)
    assert np.all(np.abs(x.mean(0) - weights @ means) < 4 * se)


def test_gaussian_marginal_moments():
    g = gd.Gaussian([1.0, -2.0], [[1.0, 0.5], [0.5, 2.0]])
    m, c = g.marginal_moments(SDE, 0.3)
    x = jnp.array([0.1, 0.2])
    expected = -jnp.linalg.solve(c, x - m)
    np.testing.assert_allclose(g.score(SDE)(0.3, x), expected, rtol=1e-10)


def test_point_cloud_score_and_tilt():
    pts = jr.normal(jr.key(1), (12, 2))
    cloud = gd.PointCloud(pts)
    for t in [0.1, 0.6]:
        x = jnp.array([0.2, -0.4])
        alpha, sigma = SDE.marginal(t)

        def logp(y):
            return jax.nn.logsumexp(
                -0.5 * jnp.sum((y[None] - alpha * pts) ** 2, -1) / sigma**2
            )

        np.testing.assert_allclose(
            cloud.score(SDE)(t, x), jax.grad(logp)(x), rtol=1e-10
        )
    r = jnp.exp(pts[:, 0])
    tilted = cloud.tilt(r)
    np.testing.assert_allclose(jnp.exp(tilted.log_weights), r / r.sum(), rtol=1e-12)


def test_label_checks_in_log_densities():
    gmm = three_class_gmm()
    x = POINTS[0]
    for bad in [5, -1]:
        with pytest.raises(ValueError, match="unknown class label"):
            gmm.log_prob(x, bad)
        with pytest.raises(ValueError, match="unknown class label"):
            gmm.log_prob_t(SDE, 0.5, x, bad)
    with pytest.raises(TypeError, match="integers"):
        gmm.log_prob(x, 0.5)
    with pytest.raises(ValueError, match="unknown class label"):
        gmm.log_classifier_t(SDE, 0.5, x, 7)
    with pytest.raises(ValueError, match="unknown class label"):
        gmm.log_classifier_complement_t(SDE, 0.5, x, 3)  # the null label is no class
    # traced labels cannot raise: unknown ones give NaN instead
    labels = jnp.array([1, 3, 7])
    out = jax.vmap(lambda c: gmm.log_classifier_t(SDE, 0.5, x, c))(labels)
    assert np.isfinite(out[0]) and np.all(np.isnan(out[2:]))
    np.testing.assert_allclose(
        jax.vmap(lambda c: gmm.log_prob(x, c))(labels)[:2],
        [gmm.log_prob(x, 1), gmm.log_prob(x)],  # 3 is the null label
        rtol=1e-12,
    )


def test_mixture_rejects_bad_parameters():
    w, m, c = [0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0]
    with pytest.raises(TypeError, match="labels must be integers"):
        gd.GaussianMixture(w, m, c, labels=[0.7, 1.9])
    with pytest.raises(ValueError, match="not symmetric"):
        gd.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.9], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="means must be finite"):
        gd.GaussianMixture([1.0], [[float("nan")]], [1.0])
    for bad in [float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="covariances must be finite"):
            gd.GaussianMixture([1.0], [[0.0]], [bad])
    # symmetric up to rounding is fine (tilts rebuild covariances from eigenpairs)
    cov = jnp.array([[1.0, 0.3], [0.3 + 1e-12, 2.0]])
    gd.GaussianMixture([1.0], [[0.0, 0.0]], cov[None])


def test_class_without_component():
    gmm = gd.GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0], labels=[0, 2])
    x = jnp.zeros(1)
    with pytest.raises(ValueError, match="class 1 has no component"):
        gmm.conditional(1)
    with pytest.raises(ValueError, match="class 1 has no component"):
        gmm.conditional_score(SDE)(0.5, x, 1)
    with pytest.raises(ValueError, match="class 1 has no component"):
        gmm.log_prob(x, 1)
    # its probabilities are well defined (zero); the other classes work
    assert float(gmm.class_prob(1)) == 0.0
    assert float(gmm.classifier_prob(x, 1)) == 0.0
    np.testing.assert_allclose(
        gmm.conditional(2).log_prob(x), gmm.log_prob(x, 2), rtol=1e-12
    )


def test_reward_and_shape_validation():
    gmm = three_class_gmm()
    with pytest.raises(ValueError, match="width must be finite and positive"):
        gd.GaussianBumpReward([0.0, 0.0], float("inf"))
    with pytest.raises(ValueError, match="width must be finite and positive"):
        gd.GaussianBumpReward([0.0, 0.0], 0.0)
    with pytest.raises(ValueError, match="centre must be finite"):
        gd.GaussianBumpReward([float("nan"), 0.0], 1.0)
    bump3 = gd.GaussianBumpReward([0.0, 0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\) but the mixture is 2-D"):
        gmm.tilt(bump3)
    with pytest.raises(ValueError, match=r"shape \(3,\) but the mixture is 2-D"):
        bump3.expectation(gmm)
    with pytest.raises(ValueError, match=r"shape \(1,\) but the mixture is 2-D"):
        gmm.tilt(gd.ExpLinearReward([1.0]))
    with pytest.raises(ValueError, match=r"mean must be a vector"):
        gd.Gaussian(0.0, 1.0)
    with pytest.raises(ValueError, match=r"cov must be"):
        gd.Gaussian([0.0, 1.0], jnp.eye(3))
    with pytest.raises(ValueError, match=r"rewards must have shape \(3,\)"):
        gd.PointCloud(POINTS).tilt(jnp.ones(5))


def _direct_mixture(weights, means, covs, sde, t, x):
    """log p_t(x) and its gradient from dense covariances (no eigenbasis):
    p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
    from jax.scipy.stats import multivariate_normal

    alpha, sigma = sde.marginal(t)
    eye = jnp.eye(means.shape[1])

    def log_p(y):
        comps = jax.vmap(
            lambda m, c: multivariate_normal.logpdf(
                y, alpha * m, alpha**2 * c + sigma**2 * eye
            )
        )(means, covs)
        return jax.nn.logsumexp(jnp.log(weights) + comps)

    return log_p(x), jax.grad(log_p)(x)


@pytest.mark.parametrize("dim", [3, 10])
def test_mixture_score_against_dense_covariances(dim):
    keys = jr.split(jr.key(3), 4)
    K = 3
    a = jr.normal(keys[0], (K, dim, dim))
    covs = jnp.einsum("kij,klj->kil", a, a) / dim + 0.3 * jnp.eye(dim)[None]
    means = jr.normal(keys[1], (K, dim))
    weights = jnp.array([0.2, 0.5, 0.3])
    full = gd.GaussianMixture(weights, means, covs)
    variances = 0.5 + jr.uniform(keys[2], (K, dim))
    diag = gd.GaussianMixture(weights, means, variances)  # no rotation at all
    assert diag.diagonal and not full.diagonal
    dense_diag = jax.vmap(jnp.diag)(variances)
    ts = jnp.repeat(jnp.array([0.0, 0.3, 0.9]), 2)
    xs = 2.0 * jr.normal(keys[3], (ts.shape[0], dim))
    for gmm, c in [(full, covs), (diag, dense_diag)]:

        @jax.jit
        @jax.vmap
        def both(t, x, gmm=gmm, c=c):
            got = gmm.log_prob_t(SDE, t, x), gmm.score(SDE)(t, x)
            return got, _direct_mixture(weights, means, c, SDE, t, x)

        (lp, s), (want_lp, want_s) = both(ts, xs)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-10)
        np.testing.assert_allclose(s, want_s, rtol=1e-8, atol=1e-10)


def test_mixture_moments_and_class_conditionals():
    """Closed forms the other tests do not pin: the covariance of a two-component
    mixture (E[Sigma_k] + Var(mu_k)), a class of two components keeping their
    relative weights, and p_t(c | x) and 1 - p_t(c | x), each computed in logs,
    summing to one."""
    g = gd.GaussianMixture([0.25, 0.75], [[-1.0, 1.0], [3.0, 1.0]], [0.5, 2.0])
    np.testing.assert_allclose(g.mean(), [2.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(g.cov(), np.diag([1.625 + 3.0, 1.625]), atol=1e-12)
    gmm = gd.GaussianMixture([0.1, 0.3, 0.6], [[-2.0], [0.0], [3.0]], [1.0, 0.5, 1.0],
                             labels=[0, 0, 1])  # fmt: skip
    c0 = gmm.conditional(0)
    np.testing.assert_allclose(c0.weights, [0.25, 0.75], rtol=1e-12)
    for x in (-1.0, 0.5, 2.0):
        x = jnp.array([x])
        np.testing.assert_allclose(c0.log_prob(x), gmm.log_prob(x, 0), rtol=1e-12)
        for t in (0.1, 0.6):
            for c in (0, 1):
                p = jnp.exp(gmm.log_classifier_t(SDE, t, x, c))
                q = jnp.exp(gmm.log_classifier_complement_t(SDE, t, x, c))
                np.testing.assert_allclose(p + q, 1.0, rtol=1e-12)


def test_point_cloud_tilt_multiplies_the_weights():
    """w_i' proportional to w_i r_i: a non-uniform cloud (a uniform one cannot tell
    w r from r), and two tilts compose into one by the product."""
    pc = gd.PointCloud(jnp.array([[0.0], [1.0], [2.0]]), jnp.array([1.0, 2.0, 1.0]))
    r1, r2 = jnp.array([3.0, 1.0, 2.0]), jnp.array([0.5, 2.0, 1.0])
    np.testing.assert_allclose(jnp.exp(pc.tilt(r1).log_weights), [3 / 7, 2 / 7, 2 / 7],
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(pc.tilt(r1).tilt(r2).log_weights,
                               pc.tilt(r1 * r2).log_weights, rtol=1e-12)  # fmt: skip


def test_piecewise_linear_values():
    w = gd.PiecewiseLinear([0.0, 0.5, 1.0], [0.0, 2.0, 3.0])
    for t, v in ((0.25, 1.0), (0.5, 2.0), (0.75, 2.5), (-1.0, 0.0), (2.0, 3.0)):
        np.testing.assert_allclose(w(t), v, rtol=1e-12)
