"""Regressions from a dtype audit: float32 inputs stay float32 with x64 on, and
16-bit samples give the float32 answers where a metric accumulates many terms."""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import guidediff as gd  # noqa: E402


def test_mean_stderr_keeps_float32():
    mean, se = gd.mean_stderr(jnp.linspace(0.0, 1.0, 10, dtype=jnp.float32))
    assert mean.dtype == se.dtype == jnp.float32


def test_rewards_and_prior_keep_float32():
    x = jnp.ones(2, jnp.float32)
    assert gd.GaussianBumpReward([1.0, 0.0], 0.7).log(x).dtype == jnp.float32
    assert gd.ExpLinearReward([0.5, -0.5]).log(x).dtype == jnp.float32
    assert gd.VPSDE().prior_logp(x).dtype == jnp.float32
    # values unchanged (float64 reference)
    x64 = x.astype(jnp.float64)
    ref = gd.GaussianBumpReward([1.0, 0.0], 0.7).log(x64)
    np.testing.assert_allclose(
        gd.GaussianBumpReward([1.0, 0.0], 0.7).log(x), ref, rtol=1e-6
    )


def test_two_sample_metrics_on_16bit_samples_match_float32():
    kx, ky = jr.split(jr.key(0))
    x = jr.normal(kx, (300, 2), jnp.float32)
    y = 0.3 + jr.normal(ky, (300, 2), jnp.float32)
    for half in (jnp.float16, jnp.bfloat16):
        xh, yh = x.astype(half), y.astype(half)
        # the same (rounded) points in float32: only the accumulation differs
        x32, y32 = xh.astype(jnp.float32), yh.astype(jnp.float32)
        for metric in (gd.mmd2, gd.energy_distance):
            got, want = metric(xh, yh), metric(x32, y32)
            assert np.isfinite(got), (metric.__name__, half)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_score_of_another_dtype_gets_a_clear_error():
    sde = gd.VPSDE()
    wide = gd.ScoreFn(lambda t, x, args: -x.astype(jnp.float64))
    with pytest.raises(ValueError, match="score returned dtype float64"):
        gd.sample(
            jr.key(0),
            sde,
            wide,
            (2,),
            num_particles=2,
            dtype=jnp.float32,
            ts=gd.uniform_grid(1.0, 1e-3, 3),
        )


def test_weakly_typed_args_keep_the_particles_dtype():
    """`args=jnp.asarray(2.0)` is weakly typed: it multiplies float32 (or bfloat16)
    particles without promoting them, so the score check must not reject it (it
    did: it saw the value as a strong float64). A strong float64 array of the same
    shape does promote, and is rejected although the weak one was checked first."""
    sde, ts = gd.VPSDE(), gd.uniform_grid(1.0, 1e-3, 3)
    scaled = gd.ScoreFn(lambda t, x, args: -x * args)
    for dtype in (jnp.float32, jnp.bfloat16):
        out = gd.sample(
            jr.key(0), sde, scaled, (2,), num_particles=2, dtype=dtype, ts=ts,
            args=jnp.asarray(2.0),
        )  # fmt: skip
        assert out.ys.dtype == dtype
    with pytest.raises(ValueError, match="score returned dtype float64"):
        gd.sample(
            jr.key(0), sde, scaled, (2,), num_particles=2, dtype=jnp.float32, ts=ts,
            args=jnp.asarray(2.0, jnp.float64),
        )  # fmt: skip


def test_losses_of_16bit_data_compute_in_float32():
    """16-bit data: the losses draw t and the noise in float32 and compute in
    float32; only the model's input and output are 16-bit. (In float16 the x0
    prediction's weight ratio underflowed to an infinite loss, and a score
    residual's square can overflow.) The reference: float32 data already rounded
    to 16 bits, and a model that rounds its input and output to 16 bits, so the
    two differ in the loss arithmetic only; for every weighting and prediction."""
    sde = gd.VPSDE()
    g = gd.Gaussian(jnp.array([1.0, -1.0]), 0.25 * jnp.eye(2))

    def model(prediction, half):
        def f(params, t, x, label):
            x = x.astype(half).astype(jnp.float32)  # a no-op on 16-bit input
            s = g.score(sde)(t, x)
            alpha, sigma = sde.marginal(t)
            eps, x0 = -sigma * s, (x + sigma**2 * s) / alpha
            out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": s}
            return out[prediction].astype(half)

        return f

    x0 = g.sample(jr.key(0), 256).astype(jnp.float32)
    for half in (jnp.float16, jnp.bfloat16):
        ref_x0 = x0.astype(half).astype(jnp.float32)
        for prediction in ("eps", "x0", "v", "score"):
            for weighting in ("eps", "x0", "v", "score", "likelihood"):
                kw = dict(weighting=weighting, prediction=prediction)
                m = model(prediction, half)
                want = gd.dsm_loss(m, None, jr.key(1), ref_x0, sde, **kw)
                got = gd.dsm_loss(m, None, jr.key(1), x0.astype(half), sde, **kw)
                assert got.dtype == jnp.float32
                assert np.isfinite(want), kw
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(kw))
    # the noisy classifier's cross-entropy too
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5]])
    labels = jnp.arange(256) % 3
    for half in (jnp.float16, jnp.bfloat16):

        def logits(params, t, x, half=half):
            x = x.astype(half)
            return (w.astype(half) @ x) * (1 + t).astype(half)

        ref_x0 = x0.astype(half).astype(jnp.float32)
        kw = dict(num_classes=3)
        want = gd.noisy_classifier_loss(
            logits, None, jr.key(2), ref_x0, labels, sde, **kw
        )
        got = gd.noisy_classifier_loss(
            logits, None, jr.key(2), x0.astype(half), labels, sde, **kw
        )
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
