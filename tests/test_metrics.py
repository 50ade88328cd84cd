"""Tests of guidediff._metrics: exact values, independent references, and statistical
checks whose tolerances come from the Monte-Carlo standard error."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from guidediff._metrics import (
    energy_distance,
    frac_improved,
    mean_stderr,
    mmd2,
    reciprocal_prob,
    reward_stats,
    sliced_wasserstein,
    two_sample_test,
)


def _np_mean_stderr(v):
    v = np.asarray(v, dtype=np.float64)
    return v.mean(axis=0), v.std(axis=0, ddof=1) / math.sqrt(v.shape[0])


def _gaussian_pairs(key, n, m, d, shift):
    """x ~ N(0, I_d) of size n, y ~ N(shift * e_1, I_d) of size m."""
    kx, ky = jr.split(key)
    offset = jnp.zeros((1, d)).at[0, 0].set(shift)
    return jr.normal(kx, (n, d)), jr.normal(ky, (m, d)) + offset


# ---------------------------------------------------------------------------------
# Averages with standard errors.
# ---------------------------------------------------------------------------------


def test_mean_stderr_matches_numpy():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=11), rng.normal(size=(7, 3, 2))):
        mean, se = mean_stderr(jnp.asarray(values))
        ref_mean, ref_se = _np_mean_stderr(values)
        assert mean.shape == se.shape == values.shape[1:]
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
        np.testing.assert_allclose(se, ref_se, rtol=1e-12)
    # Integers are promoted to floats: [1, 2, 3, 4] has s^2 = 5/3.
    mean, se = mean_stderr(jnp.array([1, 2, 3, 4]))
    np.testing.assert_allclose([mean, se], [2.5, math.sqrt(5 / 3) / 2], rtol=1e-12)


@pytest.mark.parametrize("bad", [jnp.array(1.0), jnp.array([1.0])])
def test_mean_stderr_needs_two_samples(bad):
    with pytest.raises(ValueError, match="sample"):
        mean_stderr(bad)


def test_reward_stats_is_mean_and_stderr():
    rewards = np.random.default_rng(1).exponential(size=50)
    mean, se = reward_stats(jnp.asarray(rewards))
    np.testing.assert_allclose([mean, se], _np_mean_stderr(rewards), rtol=1e-12)


def test_reciprocal_prob_known_values():
    probs = jnp.array([0.5, 0.25, 1.0, 0.5])
    mean, se = reciprocal_prob(probs)
    recip = np.array([2.0, 4.0, 1.0, 2.0])
    np.testing.assert_allclose(mean, 2.25, rtol=1e-12)
    np.testing.assert_allclose(se, recip.std(ddof=1) / 2, rtol=1e-12)
    # Under jit the value check is skipped, the result is the same.
    jit_mean, jit_se = jax.jit(reciprocal_prob)(probs)
    np.testing.assert_allclose([jit_mean, jit_se], [mean, se], rtol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_reciprocal_prob_rejects_bad_probs(bad):
    with pytest.raises(ValueError, match=r"probabilities in \(0, 1\]"):
        reciprocal_prob(jnp.array([0.5, bad, 0.9]))


def test_frac_improved_constructed():
    # Improved at indices 0 and 3; index 2 is a tie (not an improvement).
    p_guided = jnp.array([0.9, 0.2, 0.6, 0.5])
    p_base = jnp.array([0.5, 0.3, 0.6, 0.1])
    frac, se = frac_improved(p_guided, p_base)
    np.testing.assert_allclose([frac, se], [0.5, 0.25], rtol=1e-12)
    # 3 of 10 improved: f = 0.3, se = sqrt(0.3 * 0.7 / 10).
    base = jnp.linspace(0.1, 0.5, 10)
    guided = base + jnp.array([0.1, -0.1, 0.0, 0.05, -0.02, 0, 0, 0.2, -0.1, 0])
    frac, se = frac_improved(guided, base)
    np.testing.assert_allclose([frac, se], [0.3, math.sqrt(0.021)], rtol=1e-12)


def test_frac_improved_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        frac_improved(jnp.ones(5), jnp.ones(4))


def test_frac_improved_nan():
    base = jnp.array([0.5, 0.3, 0.6])
    # Concrete NaN in either input: an error, not "no sample improved" (0, 0).
    with pytest.raises(ValueError, match="NaN in `p_guided`"):
        frac_improved(jnp.full(3, jnp.nan), base)
    with pytest.raises(ValueError, match="NaN in `p_base`"):
        frac_improved(base, base.at[1].set(jnp.nan))
    # Traced: NaN, per element of the trailing shape.
    guided = jnp.stack([jnp.array([jnp.nan, 0.2, 0.9]), jnp.array([0.9, 0.2, 0.9])], 1)
    frac, se = jax.jit(frac_improved)(guided, jnp.stack([base, base], 1))
    assert np.isnan(frac[0]) and np.isnan(se[0])
    np.testing.assert_allclose([frac[1], se[1]], [2 / 3, math.sqrt(2 / 27)])
    # Only the order matters: log-odds (outside [0, 1]) are accepted and agree.
    logit = lambda p: jnp.log(p) - jnp.log1p(-p)
    p_g = jnp.array([0.9, 0.2, 0.6, 0.5])
    p_b = jnp.array([0.5, 0.3, 0.6, 0.1])
    np.testing.assert_array_equal(
        frac_improved(logit(p_g), logit(p_b)), frac_improved(p_g, p_b)
    )


# ---------------------------------------------------------------------------------
# MMD and energy distance: independent references on small data.
# ---------------------------------------------------------------------------------


def _np_mmd2(x, y, h):
    k = lambda a, b: np.exp(
        -scipy.spatial.distance.cdist(a, b, "sqeuclidean") / 2 / h**2
    )
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_mmd2_matches_numpy():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
    np.testing.assert_allclose(
        mmd2(jnp.asarray(x), jnp.asarray(y), jnp.array(0.7)),
        _np_mmd2(x, y, 0.7),
        rtol=1e-10,
    )
    # Default bandwidth: median pairwise distance over the pooled sample.
    h = np.median(scipy.spatial.distance.pdist(np.concatenate([x, y])))
    np.testing.assert_allclose(
        mmd2(jnp.asarray(x), jnp.asarray(y)), _np_mmd2(x, y, h), rtol=1e-10
    )
    # Per-sample shapes are flattened.
    np.testing.assert_allclose(
        mmd2(jnp.asarray(x).reshape(6, 3, 1), jnp.asarray(y).reshape(5, 3, 1)),
        _np_mmd2(x, y, h),
        rtol=1e-10,
    )
    # an even number of pairs (28): the median averages the middle two
    x8, y8 = x[:4], y[:4]
    h8 = np.median(scipy.spatial.distance.pdist(np.concatenate([x8, y8])))
    np.testing.assert_allclose(
        mmd2(jnp.asarray(x8), jnp.asarray(y8)), _np_mmd2(x8, y8, h8), rtol=1e-10
    )


def test_median_bandwidth_program_has_no_quadratic_constants():
    """The pairs above the diagonal were chosen with `np.triu_indices` constants:
    O(N^2) indices in the program (128 MB of HLO at N = 4000, over a second to
    lower and compile). An iota mask keeps it small."""
    x = jnp.zeros((500, 2))
    text = jax.jit(lambda a, b: mmd2(a, b)).lower(x, x).as_text()
    assert len(text) < 100_000, len(text)


def test_mmd2_bad_inputs():
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(jnp.ones((4, 2)), jnp.zeros((4, 2)), bandwidth=0.0)
    with pytest.raises(ValueError, match="same per-sample shape"):
        mmd2(jnp.ones((4, 2)), jnp.zeros((4, 3)))


def _distances(key):
    """Every distance and the two tests, as functions of (x, y) returning arrays."""
    return {
        "energy": lambda x, y: energy_distance(x, y),
        "mmd": lambda x, y: mmd2(x, y),
        "sliced": lambda x, y: sliced_wasserstein(x, y, key=key, num_projections=4),
        "test_energy": lambda x, y: jnp.stack(
            two_sample_test(x, y, key=key, num_permutations=9)
        ),
        "test_mmd": lambda x, y: jnp.stack(
            two_sample_test(x, y, key=key, statistic="mmd", num_permutations=9)
        ),
    }


def test_distances_reject_non_finite_samples():
    # NaN used to count as zero distance: a finite energy distance (even negative)
    # and p = 1.0 for a half- or all-NaN y, and p = 1/(B+1) with a NaN MMD.
    x, y = _gaussian_pairs(jr.key(0), 6, 6, 2, 3.0)
    bad_ys = [y.at[:3].set(jnp.nan), jnp.full_like(y, jnp.nan), y.at[0, 1].set(jnp.inf)]
    for name, fn in _distances(jr.key(1)).items():
        assert np.all(np.isfinite(fn(x, y))), name
        for bad in bad_ys:
            with pytest.raises(ValueError, match="finite samples; `y`"):
                fn(x, bad)
        with pytest.raises(ValueError, match="finite samples; `x`"):
            fn(bad_ys[0], y)


def test_distances_nan_under_jit():
    """Traced inputs are not checked; a NaN sample gives NaN, never a finite value."""
    x, y = _gaussian_pairs(jr.key(0), 6, 6, 2, 3.0)
    ys = jnp.stack([y, y.at[:3].set(jnp.nan), jnp.full_like(y, jnp.nan)])
    for name, fn in _distances(jr.key(1)).items():
        out = jax.jit(jax.vmap(fn, (None, 0)))(x, ys)
        assert np.all(np.isfinite(out[0])), name
        assert np.all(np.isnan(out[1:])), (name, out)


def test_energy_distance_matches_scipy_1d():
    rng = np.random.default_rng(3)
    n, m = 7, 9
    x, y = rng.normal(size=n), rng.normal(size=m) + 0.3
    ours = energy_distance(jnp.asarray(x)[:, None], jnp.asarray(y)[:, None])
    # scipy gives sqrt(2 E|X-Y| - S_xx/n^2 - S_yy/m^2) (V-statistic); convert to our
    # U-statistic form with the within-sample sums S.
    sxx = np.abs(x[:, None] - x[None, :]).sum()
    syy = np.abs(y[:, None] - y[None, :]).sum()
    v_form = scipy.stats.energy_distance(x, y) ** 2
    u_form = (
        v_form + sxx / n**2 + syy / m**2 - sxx / (n * (n - 1)) - syy / (m * (m - 1))
    )
    np.testing.assert_allclose(ours, u_form, rtol=1e-10)


def test_energy_distance_matches_cdist_3d():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(8, 3))
    d = scipy.spatial.distance.cdist
    ref = 2 * d(x, y).mean() - d(x, x).sum() / 30 - d(y, y).sum() / 56
    np.testing.assert_allclose(
        energy_distance(jnp.asarray(x), jnp.asarray(y)), ref, rtol=1e-10
    )


# ---------------------------------------------------------------------------------
# MMD and energy distance: statistical behaviour (tolerances from standard errors).
# ---------------------------------------------------------------------------------


def _replicates(stat, key, n, d, shift, reps):
    """`reps` independent values of `stat(x, y)`, vmapped."""

    def one(k):
        return stat(*_gaussian_pairs(k, n, n, d, shift))

    return jax.vmap(one)(jr.split(key, reps))


@pytest.mark.parametrize("stat", [energy_distance, mmd2], ids=["energy", "mmd"])
def test_zero_mean_under_null(stat, getkey):
    # The U-statistics are exactly unbiased: under P = Q their mean is 0 (a
    # V-statistic would be biased by ~E|X - X'|/n, tens of standard errors here).
    values = _replicates(stat, getkey(), n=15, d=2, shift=0.0, reps=400)
    mean, se = mean_stderr(values)
    assert abs(mean) < 4 * se, (mean, se)


def test_mmd2_matches_population_value(getkey):
    # N(0, I_2) vs N(mu, I_2), Gaussian kernel of bandwidth h:
    # MMD^2 = 2 (h^2 / (h^2 + 2))^{d/2} (1 - exp(-|mu|^2 / (2 (h^2 + 2)))).
    h, shift, d = 1.0, 2.0, 2
    exact = (
        2
        * (h**2 / (h**2 + 2)) ** (d / 2)
        * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2))))
    )
    values = _replicates(
        lambda x, y: mmd2(x, y, bandwidth=h), getkey(), 30, d, shift, reps=200
    )
    mean, se = mean_stderr(values)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert mean > 10 * se  # clearly positive
    # Default (median) bandwidth: also clearly positive.
    mean, se = mean_stderr(_replicates(mmd2, getkey(), 30, d, shift, reps=200))
    assert mean > 10 * se


def test_energy_distance_matches_population_value(getkey):
    # 1-D: X - Y ~ N(-mu, 2) and X - X' ~ N(0, 2), with
    # E|N(mu, s^2)| = s sqrt(2/pi) exp(-mu^2 / (2 s^2)) + mu (1 - 2 Phi(-mu / s)).
    mu, s = 1.0, math.sqrt(2.0)

    def abs_mean(mu):
        return s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (
            1 - 2 * scipy.stats.norm.cdf(-mu / s)
        )

    exact = 2 * abs_mean(mu) - 2 * abs_mean(0.0)
    values = _replicates(energy_distance, getkey(), 30, 1, mu, reps=200)
    mean, se = mean_stderr(values)
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert mean > 10 * se


# ---------------------------------------------------------------------------------
# Sliced Wasserstein.
# ---------------------------------------------------------------------------------


def test_sliced_wasserstein_1d_is_exact_w2(getkey):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=8), rng.standard_t(3, size=8) + 1
    exact = np.mean((np.sort(x) - np.sort(y)) ** 2)
    sw = sliced_wasserstein(
        jnp.asarray(x)[:, None],
        jnp.asarray(y)[:, None],
        key=getkey(),
        num_projections=4,
    )
    np.testing.assert_allclose(sw, exact, rtol=1e-10)


@pytest.mark.parametrize("n,m", [(4, 6), (5, 7), (9, 3)])
def test_sliced_wasserstein_1d_unequal_sizes(n, m, getkey):
    # Replicating each point of x m times and of y n times gives two samples of size
    # n*m with the same empirical laws, where W2^2 is the sorted mean square.
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=n), rng.exponential(size=m)
    exact = np.mean((np.repeat(np.sort(x), m) - np.repeat(np.sort(y), n)) ** 2)
    sw = sliced_wasserstein(
        jnp.asarray(x)[:, None],
        jnp.asarray(y)[:, None],
        key=getkey(),
        num_projections=2,
    )
    np.testing.assert_allclose(sw, exact, rtol=1e-10)


def test_sliced_wasserstein_shifted_gaussians_2d(getkey):
    # N(0, I) vs N(s e_1, I): W2^2 of the projections on theta is s^2 cos^2(theta),
    # whose mean over the circle is s^2 / 2. Fluctuations: the sample-mean error
    # enters as s * (ybar - xbar)_1, sd s sqrt(2/n); the directions add variance
    # s^4 Var(cos^2) / L = s^4 / (8 L); the finite-sample bias is O(1/n) and >= 0.
    n, s, L = 1000, 2.0, 256
    x, y = _gaussian_pairs(getkey(), n, n, 2, s)
    sw = sliced_wasserstein(x, y, key=getkey(), num_projections=L)
    sd = math.sqrt(2 * s**2 / n + s**4 / (8 * L))
    assert abs(sw - s**2 / 2) < 4 * sd + 10 / n, (sw, sd)


# ---------------------------------------------------------------------------------
# Permutation test.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", ["energy", "mmd"])
def test_two_sample_test_calibrated_under_null(statistic, getkey):
    # Under H0 with B = 99 permutations, Pr(p <= 0.05) = 5/100 (no ties). Over R
    # independent experiments the rejection rate is within 4 binomial sds of 0.05;
    # the same at level 0.25.
    reps, B = 1000, 99

    def one(k):
        kd, kt = jr.split(k)
        x, y = _gaussian_pairs(kd, 8, 10, 2, 0.0)
        return two_sample_test(x, y, key=kt, statistic=statistic, num_permutations=B)[1]

    p = jax.vmap(one)(jr.split(getkey(), reps))
    grid = p * (B + 1)
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)
    assert p.min() >= 1 / (B + 1) and p.max() <= 1.0
    for alpha in (0.05, 0.25):
        rate = float(jnp.mean(p <= alpha))
        tol = 4 * math.sqrt(alpha * (1 - alpha) / reps)
        assert abs(rate - alpha) < tol, (alpha, rate, tol)


@pytest.mark.parametrize("statistic", ["energy", "mmd"])
def test_two_sample_test_power(statistic, getkey):
    x, y = _gaussian_pairs(getkey(), 50, 40, 2, 1.5)
    stat, p = two_sample_test(x, y, key=getkey(), statistic=statistic)
    assert p < 0.01
    ref = energy_distance(x, y) if statistic == "energy" else mmd2(x, y)
    np.testing.assert_allclose(stat, ref, rtol=1e-10)


def test_two_sample_test_bad_inputs(getkey):
    x = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match="statistic"):
        two_sample_test(x, x, key=getkey(), statistic="ks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same per-sample shape"):
        two_sample_test(x, jnp.zeros((5, 3)), key=getkey())
    with pytest.raises(ValueError, match="at least 2"):
        two_sample_test(x, jnp.zeros((1, 2)), key=getkey())
