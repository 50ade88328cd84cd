"""16-bit particles: float32 times and step arithmetic, 16-bit states.

A 16-bit grid cannot resolve a sampling grid (bfloat16 rounds a 500-step grid's
neighbouring times together and T = 0.999 to 1), and a 16-bit step that rounds its
coefficients near 1 (e.g. 1/alpha_{t|s}) drifts by the same rounding error at every
step. So 16-bit particles step on a float32 grid with float32 step arithmetic, and
only the state (and what the score sees) is 16-bit.

The check: with the same key (same noise, rounded), a 16-bit run's sample mean and
standard deviation lie within half a Monte-Carlo standard error of the float32
run's, i.e. rounding to 16 bits costs far less than the sampling error at this
number of particles. (Before these fixes, bfloat16 with the default exponential
integrator moved the mean by about 6 standard errors, on a 100-step grid; the
default 500-step grid was rejected outright.)
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


N = 2000
GMM = gd.GaussianMixture([0.3, 0.7], [[1.0, -1.0], [-1.0, 0.5]], [0.25, 0.1])


def _cases():
    vp, cos, ve = gd.VPSDE(), gd.VPSDE(gd.CosineSchedule()), gd.VESDE()
    few = gd.logsnr_grid(vp, vp.T, 1e-3, 20)
    return [
        # (id, sde, kwargs, 16-bit dtypes): the default solver and grid (500
        # steps), a schedule with T = 0.999, a diffrax solver (whose step
        # promotes to float32 and is rounded by the driver), a multistep
        # solver state, and a Runge-Kutta solver (16-bit stage buffers).
        ("vp-default", vp, {}, (jnp.bfloat16, jnp.float16)),
        ("cosine-default", cos, {}, (jnp.bfloat16,)),
        ("ve-euler", ve, dict(solver=dfx.Euler()), (jnp.bfloat16,)),
        (
            "vp-dpm2m-ode",
            vp,
            dict(process="ode", solver=gd.DPMSolverPP(vp), ts=few),
            (jnp.bfloat16,),
        ),
        ("vp-heun-ode", vp, dict(process="ode", ts=few), (jnp.float16,)),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_sixteen_bit_samples_match_float32_within_half_a_standard_error(case):
    _, sde, kw, halves = case
    score = GMM.score(sde)
    # float32, not the default float64 of this x64 suite: 16-bit runs draw the
    # float32 noise and round it
    ref = gd.sample(
        jr.key(0), sde, score, (2,), num_particles=N, dtype=jnp.float32, **kw
    )
    ref_ys = np.asarray(ref.ys, np.float64)
    se_mean = ref_ys.std(0) / np.sqrt(N)
    se_std = ref_ys.std(0) / np.sqrt(2 * N)  # Gaussian approximation
    for half in halves:
        out = gd.sample(jr.key(0), sde, score, (2,), num_particles=N, dtype=half, **kw)
        assert out.ys.dtype == half
        assert out.ts.dtype == jnp.float32
        assert int(out.num_failed) == 0
        ys = np.asarray(out.ys.astype(jnp.float32), np.float64)
        np.testing.assert_array_less(np.abs(ys.mean(0) - ref_ys.mean(0)), se_mean / 2)
        np.testing.assert_array_less(np.abs(ys.std(0) - ref_ys.std(0)), se_std / 2)


def test_diffeqsolve_driver_rejects_sixteen_bit_particles():
    """diffrax promotes the state to its time dtype: a float32 grid would silently
    integrate float32 particles, a 16-bit one cannot resolve the grid."""
    sde = gd.VPSDE()
    for half in (jnp.bfloat16, jnp.float16):
        with pytest.raises(ValueError, match="driver='diffeqsolve' cannot integrate"):
            gd.sample(
                jr.key(0), sde, GMM.score(sde), (2,), dtype=half, driver="diffeqsolve"
            )
        with pytest.raises(ValueError, match="driver='diffeqsolve' cannot integrate"):
            gd.sample(
                jr.key(0), sde, GMM.score(sde), (2,), dtype=half,
                stepsize_controller=dfx.PIDController(rtol=1e-2, atol=1e-2),
            )  # fmt: skip


def test_smc_weights_of_sixteen_bit_particles_are_float32():
    """Log-weights add one increment per step: they are kept in float32. Without
    resampling (paths paired with the float32 run's, same noise), the bfloat16
    run's log-normaliser lies within half the importance-sampling standard error of
    the float32 run's (delta method: sd(w) / (sqrt(P) mean(w)))."""
    sde = gd.VPSDE()
    reward = gd.GaussianBumpReward([1.0, -1.0], 1.0)
    kw = dict(num_particles=512, ts=gd.uniform_grid(sde.T, 1e-3, 100))
    kw.update(ess_threshold=0.0)
    ref = gd.smc_sample(
        jr.key(0), sde, GMM.score(sde), (2,), reward.log, dtype=jnp.float32, **kw
    )
    out = gd.smc_sample(
        jr.key(0), sde, GMM.score(sde), (2,), reward.log, dtype=jnp.bfloat16, **kw
    )
    assert out.ys.dtype == jnp.bfloat16
    for a in (out.log_weights, out.log_normalizer, out.ess):
        assert a.dtype == jnp.float32
    assert not np.any(np.asarray(out.resampled))
    w = np.exp(np.asarray(ref.log_weights, np.float64) - float(ref.log_normalizer))
    se_log_z = w.std() / np.sqrt(w.size)  # w has mean 1
    assert abs(float(out.log_normalizer) - float(ref.log_normalizer)) < se_log_z / 2


def test_smc_proposal_weights_of_float16_particles_use_unrounded_means():
    """With a proposal, each move x1 = m_q + c * inc adds to the log-weight
    -sum(inc d / (c dt) + d^2 / (2 c^2 dt)), d = m_q - m_p: the two kernels' means
    and the noise scale. They were rounded to the particles' dtype first, so for
    float16 particles d and c were differences of rounded numbers (errors of 0.2 in
    a 20-step run's log-weights, 6 % of their spread). Now they match that sum
    computed in float64 along the same float16 path (gd.sample's with the proposal
    score) and the same increments to float32 rounding (d is a small difference of
    float32 means: about 0.3 % of the spread here; 1 % allowed)."""
    from guidediff._brownian import GridBrownianPath, _StepIncrement
    from guidediff._reverse import reverse_sde
    from guidediff._sample import _particle_keys, _split_particle_key

    sde = gd.VPSDE()
    reward = gd.GaussianBumpReward([1.0, -1.0], 1.0)
    score = GMM.score(sde)
    prop = gd.guide(score, gd.reward_guidance(GMM.tilt(reward).score(sde), 0.7))
    solver = gd.ExponentialIntegrator(sde)
    ts = gd.uniform_grid(sde.T, 1e-3, 20)
    n, key = 16, jr.key(3)
    kw = dict(num_particles=n, ts=ts, dtype=jnp.float16)
    out = gd.smc_sample(
        key, sde, score, (2,), reward.log, proposal=prop, twist=0.0,
        ess_threshold=0.0, **kw,
    )  # fmt: skip
    paths = gd.sample(key, sde, prop, (2,), save_trajectory=True, **kw).ys
    np.testing.assert_array_equal(out.ys, paths[:, -1])
    ts32 = jnp.asarray(ts, jnp.float32)
    ts64 = np.asarray(ts32, np.float64)
    struct = jax.ShapeDtypeStruct((2,), jnp.float16)
    k_bm = [_split_particle_key(k)[1] for k in _particle_keys(key, n)]

    def mean(s, x, k, inc):
        terms = reverse_sde(sde, s, _StepIncrement(inc, ts64[k], ts64[k + 1]))
        return solver.step(terms, ts64[k], ts64[k + 1], x, None, None, False)[0]

    def log_weight(path, kb):
        path = np.asarray(path, np.float64)
        brownian = GridBrownianPath(struct, ts32, kb)
        zero, one = jnp.zeros(2), jnp.ones(2)
        total = float(reward.log(path[-1]))
        for k in range(len(ts) - 1):
            x, dt = path[k], ts64[k + 1] - ts64[k]
            inc = brownian.cell_increment(len(ts) - 2 - k, ts32[k + 1] - ts32[k])
            inc = np.asarray(inc, np.float64)
            m_p, m_q = mean(score, x, k, zero), mean(prop, x, k, zero)
            c, d = mean(prop, x, k, one) - m_q, m_q - m_p
            total -= float(
                jnp.sum(inc * d / (c * abs(dt)) + d**2 / (2 * c**2 * abs(dt)))
            )
        return total

    expected = np.array([log_weight(p, kb) for p, kb in zip(paths, k_bm, strict=True)])
    spread = expected.std()  # the size of the correction across particles
    err = np.abs(np.asarray(out.log_weights, np.float64) - expected)
    assert err.max() < 1e-2 * spread, (err.max(), spread)


def test_score_conversions_of_float16_states_on_a_wide_ve_sde():
    """sigma(T) = 1000: sigma^2 overflowed float16 in `score_to_x0` / `x0_to_score`
    (inf, and a zero score), so twisted SMC, which forms Tweedie's x0 at every step,
    lost every float16 particle (log Z = -inf). They now compute in float32 and round
    once."""
    sde = gd.VESDE(sigma_max=1000.0)
    t, x = 1.0, jnp.array([300.0, -500.0])
    s = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)(t, x)
    for fn, arg in ((gd.score_to_x0, s), (gd.x0_to_score, jnp.zeros(2))):
        x16, arg16 = x.astype(jnp.float16), arg.astype(jnp.float16)
        half = fn(sde, t, x16, arg16)
        # the same 16-bit inputs converted in float32: one rounding apart
        ref = fn(sde, t, x16.astype(jnp.float32), arg16.astype(jnp.float32))
        assert half.dtype == jnp.float16
        np.testing.assert_allclose(half.astype(jnp.float32), ref, rtol=1e-3)
    reward = gd.GaussianBumpReward([1.0, -1.0], 1.0)
    data = gd.Gaussian(jnp.zeros(2), jnp.eye(2))
    out = gd.smc_sample(
        jr.key(0), sde, data.score(sde), (2,), reward.log, num_particles=32,
        ts=gd.uniform_grid(1.0, 1e-3, 20), ess_threshold=0.0, dtype=jnp.float16,
    )  # fmt: skip
    assert np.all(np.isfinite(np.asarray(out.log_weights)))
