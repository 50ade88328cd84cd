"""Regressions from an audit of the oracles, guidance, metrics, losses and `fit`:
each test names the wrong behaviour it pins down."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import guidediff as gd


SDE = gd.VPSDE()
GMM = gd.GaussianMixture(
    [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
)


def test_float32_grid_from_a_float32_T_is_in_range():
    """float32(0.999) = 0.99900001 > 0.999: the oracles' time check compared in
    float64 and rejected ts[0] of a float32 grid that gd.sample accepts."""
    sde = gd.VPSDE(gd.CosineSchedule())
    t0 = jnp.asarray(gd.uniform_grid(sde.T, 1e-3, 10), jnp.float32)[0]
    assert float(t0) > float(sde.T)
    x = jnp.zeros(2, jnp.float32)
    assert np.all(np.isfinite(GMM.score(sde)(t0, x)))
    assert np.isfinite(GMM.log_prob_t(sde, t0, x))
    with pytest.raises(ValueError, match="outside this SDE's range"):
        GMM.score(sde)(jnp.float32(1.01), x)


def test_classifier_and_moments_check_the_time():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="outside this SDE's range"):
        GMM.log_classifier_t(SDE, 1.5, x, 0)
    with pytest.raises(ValueError, match="outside this SDE's range"):
        GMM.log_classifier_complement_t(SDE, -0.5, x, 0)
    with pytest.raises(ValueError, match="outside this SDE's range"):
        gd.Gaussian(jnp.zeros(2), 1.0).marginal_moments(SDE, 1.5)


def test_isotropic_gaussian_has_a_finite_covariance_gradient():
    """A scalar covariance went through eigh of v * I, whose gradient is NaN at
    repeated eigenvalues; it now takes the diagonal path. d/dv of the time-t
    log-density at x, against the closed form."""
    x, t = jnp.array([0.3, -0.4]), 0.5
    alpha, sigma = SDE.marginal(t)

    def logp(v):
        return gd.Gaussian(jnp.zeros(2), v).mixture.log_prob_t(SDE, t, x)

    v = 0.7
    s2 = alpha**2 * v + sigma**2  # the marginal variance
    exact = alpha**2 * (-1.0 / s2 + jnp.sum(x**2) / (2 * s2**2))
    np.testing.assert_allclose(jax.grad(logp)(v), exact, rtol=1e-10)


def test_zero_weight_class_is_an_empty_class():
    gmm = gd.GaussianMixture([0.0, 1.0], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    with pytest.raises(ValueError, match="class 0 has no component"):
        gmm.conditional_score(SDE)(0.5, jnp.zeros(2), 0)


def test_particles_of_another_shape_are_rejected():
    """They broadcast into wrong values: a (1,) point against a 2-D mixture, a batch
    passed to a per-particle reward (its product, or a contraction over particles)."""
    with pytest.raises(ValueError, match=r"shape \(2,\), got shape \(1,\)"):
        GMM.score(SDE)(0.5, jnp.zeros(1))
    with pytest.raises(ValueError, match="one particle"):
        gd.PointCloud(jnp.zeros((3, 2))).score(SDE)(0.5, jnp.zeros(3))
    with pytest.raises(ValueError, match="jax.vmap"):
        gd.GaussianBumpReward([1.0, 1.0], 1.0).log(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="jax.vmap"):
        gd.ExpLinearReward([1.0, 1.0]).log(jnp.zeros((2, 2)))


def test_huge_weights_normalise_without_overflow():
    """In float32 (x64 off: with x64 the weights are float64 and 3e38 + 3e38 is
    nowhere near overflowing), where sum(w) overflows to inf."""
    with jax.enable_x64(False):
        w = jnp.array([3e38, 3e38], jnp.float32)
        gmm = gd.GaussianMixture(w, [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        assert gmm.log_weights.dtype == jnp.float32
        np.testing.assert_allclose(gmm.weights, [0.5, 0.5], rtol=1e-5)
        cloud = gd.PointCloud(jnp.array([[0.0, 0.0], [1.0, 1.0]]), w)
        score = cloud.score(gd.VPSDE())(0.5, jnp.ones(2))
        assert score.dtype == jnp.float32 and np.all(np.isfinite(score))


def test_integer_states_are_not_truncated():
    x = jnp.array([1, 2])
    np.testing.assert_allclose(
        SDE.drift(0.5, x), SDE.drift(0.5, x.astype(float)), rtol=1e-12
    )
    eps = jnp.array([0.5, -0.5])
    np.testing.assert_allclose(
        SDE.perturb(0.5, x, eps), SDE.perturb(0.5, x.astype(float), eps), rtol=1e-12
    )


def test_interval_with_integer_times():
    """Bounds cast to an integer t's dtype moved: [0.2, 0.5] contained t = 0."""
    bump = gd.reward_guidance(gd.ScoreFn(lambda t, x, a: jnp.ones_like(x)), 1.0)
    g = gd.guide(
        gd.ScoreFn(lambda t, x, a: jnp.zeros_like(x)), gd.interval(bump, 0.2, 0.5)
    )
    x = jnp.zeros(2)
    np.testing.assert_array_equal(g(0, x), jnp.zeros(2))
    np.testing.assert_array_equal(g(jnp.asarray(1), x), jnp.zeros(2))
    np.testing.assert_array_equal(g(0.3, x), jnp.ones(2))


def test_cfg_direct_calls_keep_the_scores_checks():
    """The batched path vmaps the label, which hid the score's own checks from a
    direct (eager) call: an unknown label gave NaN, a float null label was cast to
    another class."""
    score = GMM.conditional_score(SDE)
    x = jnp.zeros(2)
    guided = gd.guide(score, gd.cfg(2.0, null_args=GMM.null_label))
    with pytest.raises(ValueError, match="unknown class label 7"):
        guided(0.5, x, 7)
    with pytest.raises(TypeError, match="got args=None"):
        guided(0.5, x)
    bad_null = gd.guide(score, gd.cfg(2.0, null_args=1.9))
    with pytest.raises(TypeError, match="integers"):
        bad_null(0.5, x, 1)
    # traced (inside gd.sample's checks): the cast is caught before it happens
    with pytest.raises(ValueError, match="not representable"):
        jax.jit(lambda t, y, a: bad_null(t, y, a))(0.5, x, 1)
    np.testing.assert_allclose(
        jax.jit(lambda t, y, a: guided(t, y, a))(0.5, x, 1),
        guided(0.5, x, 1),
        rtol=1e-6,
        atol=1e-12,
    )


def test_permutation_test_counts_ties_and_keeps_its_level():
    """n = m = 3 of continuous data: 20 distinct splits, the observed one and its
    mirror give the same statistic (summed in another order), so the exact
    permutation p-value is at least 2/20 = 0.1. Ties dropped by rounding gave
    Pr(p <= 0.05) above 0.05 under H0."""
    keys = jr.split(jr.key(0), 200)

    def p_value(k, dtype):
        kx, ky, kt = jr.split(k, 3)
        x, y = jr.normal(kx, (3, 2), dtype), jr.normal(ky, (3, 2), dtype)
        return gd.two_sample_test(x, y, key=kt, num_permutations=999)[1]

    # float32 too: its mirror ties are found by comparing splits, not within a
    # tolerance of the statistics (now a few ulps)
    p = np.concatenate(
        [jax.vmap(p_value, (0, None))(keys, dt) for dt in (jnp.float64, jnp.float32)]
    )
    # Each p estimates a permutation p-value >= 0.1 with 999 draws: p <= 0.05
    # needs at most 49 of 999 draws to tie or exceed where 99.9 are expected
    # (binomial tail binom.cdf(49, 999, 0.1) = 3e-9 per run; about 20 runs sit at
    # exactly 0.1), so no run of 200 should get there. (With 199 draws the tail is
    # 4e-3 per run: about 7 % of seeds failed.) With ties dropped, p-values of
    # 0.05 are common.
    assert np.mean(p <= 0.05) == 0.0


def test_float32_permutation_test_gives_the_float64_p_value():
    """In float32 the tie window was 100 ulps of the statistic's terms, where its
    rounding is under one: permutations well below the observed statistic counted
    as ties (their spread shrinks like 1/n), inflating p (0.47 for an exact 0.40 at
    n = m = 3000). With the same permutations (the same key), the float32 counts
    now match the float64 ones to a few permutations whose statistics lie within
    float32 rounding of the observed one; the 100-ulp window gave 12 here."""
    flips = 0
    for seed in (0, 1):
        kx, ky, kt = jr.split(jr.key(seed), 3)
        x, y = jr.normal(kx, (1000, 2)), jr.normal(ky, (1000, 2))
        for statistic in ("energy", "mmd"):
            kw = dict(key=kt, num_permutations=200, statistic=statistic)
            p32 = gd.two_sample_test(
                x.astype(jnp.float32), y.astype(jnp.float32), **kw
            )[1]
            p64 = gd.two_sample_test(x, y, **kw)[1]
            assert p32.dtype == jnp.float32 and p64.dtype == jnp.float64
            flips += abs(round(float(p32) * 201) - round(float(p64) * 201))
    assert flips <= 4


def test_mean_stderr_of_float16_does_not_overflow():
    v = jnp.linspace(300.0, 1200.0, 10, dtype=jnp.float16)
    mean, se = gd.mean_stderr(v)
    ref = np.std(np.asarray(v, np.float64), ddof=1) / np.sqrt(10)
    np.testing.assert_allclose(se, ref, rtol=1e-3)
    np.testing.assert_allclose(mean, 750.0, rtol=1e-3)


def test_bandwidth_must_be_finite():
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="finite positive"):
        gd.mmd2(x, x + 1.0, float("inf"))


def test_bfloat16_rewards_give_mean_one_weights():
    r = jnp.arange(1.0, 9.0, dtype=jnp.bfloat16)  # exact in bfloat16
    for kw in ({}, {"temperature": 0.3}):
        w = gd.reward_weights(r, **kw)
        ref = gd.reward_weights(r.astype(jnp.float32), **kw)
        np.testing.assert_allclose(jnp.mean(w.astype(jnp.float64)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(w, ref, rtol=1e-6)


def test_loss_argument_errors():
    labels = jnp.asarray([255, 3], jnp.uint8)
    out = gd.drop_labels(jr.key(0), labels, 256, 1.0)  # null label 256 > uint8
    np.testing.assert_array_equal(out, [256, 256])
    net = lambda p, t, x, *label: -x
    x0 = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="one number"):
        gd.dsm_loss(net, None, jr.key(0), x0, SDE, weighting=lambda t: jnp.ones(2))
    with pytest.raises(TypeError, match="AbstractSDE"):
        gd.noisy_classifier_loss(
            lambda p, t, x: jnp.zeros(2), None, jr.key(0), x0, jnp.zeros(4, int), "vp",
            num_classes=2,
        )  # fmt: skip


def test_fit_names_the_first_failure_of_a_chunk():
    """A finite loss with a NaN gradient at step 0 makes step 1's loss NaN: the
    report named step 1's loss, not step 0's update, when both were in one chunk."""
    loss = lambda p, k, b: jnp.sum(jnp.sqrt(p["w"]))  # d/dw sqrt(w) at 0: inf
    with pytest.raises(FloatingPointError, match="not finite after step 0's update"):
        gd.fit(
            loss, {"w": jnp.zeros(2)}, lambda k: jnp.zeros(()),
            optimizer=optax.sgd(0.1), num_steps=4, key=jr.key(0),
            steps_per_dispatch=4, progress=False,
        )  # fmt: skip


def test_sampler_optimisers_name_a_non_finite_gradient():
    """A finite objective whose gradient is NaN (sqrt at 0): `tune_guidance` failed
    with an unrelated error from the schedule's constructor and
    `finetune_through_sampler` returned NaN parameters silently."""
    s = GMM.score(SDE)
    s_r = GMM.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0)).score(SDE)
    guided = lambda w: gd.guide(s, gd.reward_guidance(s_r, w))
    reward = lambda x: jnp.sqrt(jnp.maximum(x[0], 0.0))  # d/dx at x < 0: 0 * inf
    kw = dict(num_iters=2, num_particles=16, ts=gd.uniform_grid(1.0, 1e-2, 4))
    match = "not finite after step 0's update"
    with pytest.raises(FloatingPointError, match=match):
        gd.tune_guidance(jr.key(0), SDE, guided, reward, (2,), num_knots=2, **kw)
    with pytest.raises(FloatingPointError, match=match):
        gd.finetune_through_sampler(
            jr.key(0), SDE, lambda p: guided(p["w"]), {"w": jnp.asarray(0.0)},
            reward, (2,), **kw,
        )  # fmt: skip


def test_fit_keeps_a_16_bit_models_ema_in_float32():
    """A bfloat16 EMA drifted: d and 1 - d rounded apart do not sum to one, so
    parameters held at the optimum pulled their average from 3 to 2."""
    params = {"w": jnp.full((4,), 3.0, jnp.bfloat16)}
    loss = lambda p, k, b: jnp.sum((p["w"].astype(jnp.float32) - 3.0) ** 2)
    out = gd.fit(
        loss, params, lambda k: jnp.zeros(()), optimizer=optax.sgd(0.1),
        num_steps=3000, key=jr.key(0), steps_per_dispatch=1000, progress=False,
    )  # fmt: skip
    assert out.ema_params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out.ema_params["w"], np.float32), 3.0)


def test_class_log_density_of_a_class_whose_weight_underflows():
    """A tilt can leave a class with a finite log-weight whose weight rounds to 0
    (log w = -230 in float32): log p(x | c) was +inf and `conditional(c)` raised,
    although the class is accepted and its conditional score is right."""
    from scipy.stats import norm

    with jax.enable_x64(False):
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-12.0], [12.0]], [1.0, 1.0], labels=[0, 1]
        )
        tilted = gmm.tilt(gd.GaussianBumpReward([12.0], 0.5))
        assert float(tilted.weights[0]) == 0.0 and np.isfinite(tilted.log_weights[0])
        mu, var = float(tilted.means[0, 0]), float(tilted.covs[0, 0, 0])
        x = jnp.array([mu + 0.3], jnp.float32)
        exact = norm.logpdf(mu + 0.3, mu, np.sqrt(var))
        np.testing.assert_allclose(tilted.log_prob(x, 0), exact, rtol=1e-5)
        np.testing.assert_allclose(tilted.conditional(0).log_prob(x), exact, rtol=1e-5)
        # the null label is the unconditional density
        np.testing.assert_allclose(
            tilted.log_prob(x, gmm.null_label), tilted.log_prob(x), rtol=1e-6
        )


def test_reciprocal_prob_of_float16_probabilities():
    """1/p was formed in float16 (inf beyond 65504, and a NaN standard error)."""
    p16 = jnp.array([0.5, 1e-5, 0.5, 0.5], jnp.float16)
    mean, se = gd.reciprocal_prob(p16)
    ref = 1.0 / np.asarray(p16, np.float64)
    np.testing.assert_allclose(mean, ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(se, ref.std(ddof=1) / 2.0, rtol=1e-6)


# -- a second audit: float32 extremes and inputs against independent references ------


def test_mean_stderr_of_huge_values_does_not_overflow():
    """Squared deviations of values beyond ~1.8e19 overflowed float32 to inf (a
    classifier probability of 1e-20 gives 1/p = 1e20); references in float64."""
    with jax.enable_x64(False):
        for v in (
            [1e20, 2e20, 3e20],
            [3e38, 3e38],
            [-3e38, 3e38, 1e38],
            [3e38, 3e38, -3e38],
        ):  # (its std, 3.5e38, overflows; se does not)
            x = np.array(v, np.float32)
            mean, se = gd.mean_stderr(x)
            assert mean.dtype == jnp.float32
            ref = np.asarray(v, np.float64)
            np.testing.assert_allclose(mean, ref.mean(), rtol=1e-6)
            np.testing.assert_allclose(
                se, ref.std(ddof=1) / np.sqrt(ref.size), rtol=1e-6
            )
        m, se = gd.reciprocal_prob(np.array([1e-20, 1e-10, 0.5], np.float32))
        assert np.isfinite(se) and np.isclose(se, 3.3333333e19, rtol=1e-6)
        # values below 2^60 are used as they are (to rounding: XLA fuses alike)
        v = jnp.array([1.0, 2.0, 4.0], jnp.float32)
        ref = jnp.std(v, ddof=1) / math.sqrt(3)
        np.testing.assert_allclose(gd.mean_stderr(v)[1], ref, rtol=2e-7)


def test_mixture_cov_is_centred():
    """E[x x^T] - m m^T cancelled to a negative variance with means far from 0."""
    g = gd.GaussianMixture([0.1, 0.9], [[49.9], [49.9]], [1e-4, 1e-4])
    np.testing.assert_allclose(g.cov(), [[1e-4]], rtol=1e-5)
    g = gd.GaussianMixture([0.3, 0.7], [[-50.0, 17.123], [50.0, 17.123]], [1e-6, 1e-6])
    np.testing.assert_allclose(g.cov(), np.diag([2100.0 + 1e-6, 1e-6]), rtol=1e-5)


def test_energy_test_with_one_far_off_sample_keeps_its_power():
    """One sample at 1e5 made the tie tolerance (scaled by the largest distance)
    exceed the statistic, so every permutation tied and p = 1; the float64
    permutation test gives p ~ 0.01."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2)), rng.normal(size=(50, 2)) + 0.8
    x[0] = [1e5, 0.0]
    with jax.enable_x64(False):
        _, p = gd.two_sample_test(np.float32(x), np.float32(y), key=jr.key(0))
    assert p < 0.05


def test_a_time_must_be_one_real_scalar():
    """A vector of times broadcast into a plausible wrong score; a string time
    failed with an unrelated error."""
    x = jnp.array([0.3, 0.4])
    for t in (jnp.array([0.1, 0.5]), "0.5", None):
        with pytest.raises(TypeError, match="a time must be a real scalar"):
            GMM.score(SDE)(t, x)
        with pytest.raises(TypeError, match="a time must be a real scalar"):
            gd.Gaussian(jnp.ones(2), 1.0).marginal_moments(SDE, t)
    many = jax.vmap(lambda t: GMM.score(SDE)(t, x))(jnp.array([0.1, 0.5]))
    np.testing.assert_allclose(many[1], GMM.score(SDE)(0.5, x), rtol=1e-6)


def test_point_cloud_score_at_sigma_zero_and_tilt_in_logs():
    """The score at t = 0 was silently NaN; a reward tilt whose values underflow
    or overflow as numbers (log r = -200 or 100) was rejected as all zero or
    infinite, though its weights are well defined."""
    pc = gd.PointCloud(jnp.array([[0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="undefined at t = 0"):
        pc.score(SDE)(0.0, jnp.array([0.5, 0.2]))
    pts = jnp.array([[0.0], [1.0], [2.0]])
    with jax.enable_x64(False):
        tilted = gd.PointCloud(pts).tilt(gd.GaussianBumpReward(jnp.array([10.0]), 0.5))
        log_r = np.array([-200.0, -162.0, -128.0])
        ref = np.exp(log_r - np.logaddexp.reduce(log_r))
        np.testing.assert_allclose(np.exp(tilted.log_weights), ref, rtol=1e-4)
        tilted = gd.PointCloud(jnp.array([[100.0], [101.0]])).tilt(
            gd.ExpLinearReward(jnp.array([1.0]))
        )
        np.testing.assert_allclose(
            np.exp(tilted.log_weights), [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-5
        )


def test_rewards_of_16bit_particles_are_computed_in_float32():
    r = gd.GaussianBumpReward(jnp.zeros(2), 200.0).log(
        jnp.array([300.0, 0.0], jnp.float16)
    )
    assert r.dtype == jnp.float32 and np.isclose(r, -1.125)
    r = gd.ExpLinearReward(jnp.array([1.0, 1.0])).log(
        jnp.array([4e4, 4e4], jnp.float16)
    )
    assert np.isclose(r, 80000.0)


def test_metrics_reject_complex_samples():
    x = (np.random.default_rng(0).normal(size=(10, 2)) * (1 + 1j)).astype(np.complex64)
    for metric in (gd.mmd2, gd.energy_distance):
        with pytest.raises(TypeError, match="must be real"):
            metric(x, x + 1)
    with pytest.raises(TypeError, match="must be real"):
        gd.mean_stderr(x[:, 0])


def test_mixture_constructor_checks_values_as_given():
    """An asymmetric block hidden by a large variance elsewhere was averaged; a
    singular covariance was accepted or not by rounding; weights and variances
    that over- or underflow float32 were reported as infinite or zero; d = 0 gave a
    NumPy error."""
    C = np.array([[1e6, 0, 0], [0, 1.0, 0.9], [0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="not symmetric"):
        gd.GaussianMixture([1.0], np.zeros((1, 3)), C[None])
    rng = np.random.default_rng(0)
    for _ in range(5):  # rank 2 in 4-D
        a = rng.normal(size=(4, 2))
        with pytest.raises(ValueError, match="positive definite"):
            gd.GaussianMixture([1.0], np.zeros((1, 4)), (a @ a.T)[None])
    with jax.enable_x64(False):
        for w in ([1e50, 2e50], [1e-50, 2e-50]):
            with pytest.raises(ValueError, match="weights do not fit float32"):
                gd.GaussianMixture(w, np.zeros((2, 1)), [1.0, 1.0])
        with pytest.raises(ValueError, match="covs do not fit float32"):
            gd.GaussianMixture([1.0, 1.0], np.zeros((2, 1)), [1e-50, 1.0])
    with pytest.raises(ValueError, match="K, d >= 1"):
        gd.GaussianMixture([1.0], np.zeros((1, 0)), [1.0])
    # ill-conditioned but definite, and a zero weight, are fine
    full = gd.GaussianMixture([1.0], np.zeros((1, 2)), np.diag([1e6, 0.1])[None])
    np.testing.assert_allclose(np.sort(full.evals[0]), [0.1, 1e6], rtol=1e-6)
    assert gd.GaussianMixture([0.0, 1.0], np.zeros((2, 1)), [1.0, 1.0]).weights[0] == 0


def test_tiny_off_diagonal_covariances_are_accepted():
    """A full covariance whose off-diagonal entries are below the smallest normal
    number (a near-zero correlation) was rejected as not fitting the dtype (found
    by the property tests); only the variances must fit."""
    tiny64 = 2.2e-311
    cov = np.array([[1.0, tiny64], [tiny64, 2.0]])
    gmm = gd.GaussianMixture([1.0], np.zeros((1, 2)), cov[None])
    np.testing.assert_allclose(np.sort(gmm.evals[0]), [1.0, 2.0])
    with jax.enable_x64(False):
        cov32 = np.array([[1.0, 1e-40], [1e-40, 2.0]])
        gmm = gd.GaussianMixture([1.0], np.zeros((1, 2)), cov32[None])
        assert gmm.evals.dtype == np.float32
        np.testing.assert_allclose(np.sort(gmm.evals[0]), [1.0, 2.0])
        with pytest.raises(ValueError, match="covs do not fit float32"):
            var = np.array([[1e-40, 0.0], [0.0, 1.0]])
            gd.GaussianMixture([1.0], np.zeros((1, 2)), var[None])
        with pytest.raises(ValueError, match="covs do not fit float32"):
            big = np.array([[1e39, 0.0], [0.0, 1.0]])
            gd.GaussianMixture([1.0], np.zeros((1, 2)), big[None])


def test_log_expectation_does_not_overflow():
    """`ExpLinearReward([50, 0]).expectation(gmm)` is inf in float32, leaving no
    reference for SMC's log Z-hat; `log_expectation` is the closed form in logs."""
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    with jax.enable_x64(False):
        g32 = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        big = gd.ExpLinearReward([50.0, 0.0])
        assert np.isinf(big.expectation(g32))
        # log E = log(0.5 e^{-100} + 0.5 e^{100}) + 0.5 * 50^2 * 0.5
        expected = math.log(0.5) + 100.0 + 625.0 + math.log1p(math.exp(-200.0))
        np.testing.assert_allclose(big.log_expectation(g32), expected, rtol=1e-6)
    for reward in (gd.ExpLinearReward([0.3, -0.2]), gd.GaussianBumpReward([1, 1], 1)):
        np.testing.assert_allclose(
            np.exp(reward.log_expectation(gmm)), reward.expectation(gmm), rtol=1e-12
        )
