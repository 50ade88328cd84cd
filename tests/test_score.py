"""Score parametrisations and the final Tweedie denoising step."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
G = gd.Gaussian([1.0, -1.0], 0.5)


def test_parametrisations_round_trip():
    s = G.score(SDE)
    t, x = 0.4, jnp.array([0.3, 0.2])
    val = s(t, x)
    eps = gd.score_to_eps(SDE, t, x, val)
    x0 = gd.score_to_x0(SDE, t, x, val)
    np.testing.assert_allclose(gd.eps_to_score(SDE, t, x, eps), val, rtol=1e-12)
    np.testing.assert_allclose(gd.x0_to_score(SDE, t, x, x0), val, rtol=1e-12)
    eps_model = gd.EpsScore(lambda t, x, a: gd.score_to_eps(SDE, t, x, s(t, x)), SDE)
    x0_model = gd.X0Score(lambda t, x, a: gd.score_to_x0(SDE, t, x, s(t, x)), SDE)
    np.testing.assert_allclose(eps_model(t, x), val, rtol=1e-12)
    np.testing.assert_allclose(x0_model(t, x), val, rtol=1e-12)
    # Tweedie for a Gaussian: E[X0|Xt=x] = mu + a S (a^2 S + s^2 I)^{-1} (x - a mu)
    alpha, sigma = SDE.marginal(t)
    v = 0.5
    expected = G.mean + alpha * v / (alpha**2 * v + sigma**2) * (x - alpha * G.mean)
    np.testing.assert_allclose(gd.denoise(SDE, s, t, x), expected, rtol=1e-12)


def test_v_prediction_reads_as_the_score():
    """v = alpha eps - sigma x0 (Salimans & Ho), built here from the eps and x0 of
    the exact score, reads back as that score; on a VP SDE (alpha^2 + sigma^2 = 1)
    and on a VE SDE (alpha = 1, sigma up to 50), where the general formula's
    1 / (alpha^2 + sigma^2) matters."""
    for sde, t in ((SDE, 0.4), (SDE, 0.97), (gd.VESDE(), 0.3), (gd.VESDE(), 1.0)):
        s = G.score(sde)
        x = jnp.array([0.3, 0.2]) * sde.marginal(t)[1]  # a typical state at t
        val = s(t, x)
        alpha, sigma = sde.marginal(t)
        eps, x0 = gd.score_to_eps(sde, t, x, val), gd.score_to_x0(sde, t, x, val)
        v = alpha * eps - sigma * x0
        np.testing.assert_allclose(gd.score_to_v(sde, t, x, val), v, rtol=1e-10)
        np.testing.assert_allclose(gd.v_to_score(sde, t, x, v), val, rtol=1e-10)
        v_model = gd.VScore(
            lambda t, x, a, s=s, sde=sde: gd.score_to_v(sde, t, x, s(t, x)), sde
        )
        np.testing.assert_allclose(v_model(t, x), val, rtol=1e-10)
    with pytest.raises(ValueError, match=r"gd.v_to_score: the prediction has shape"):
        gd.v_to_score(SDE, 0.5, jnp.zeros(2), jnp.zeros(1))


def test_v_prediction_samples_the_target():
    """A sampler driven by the exact v-prediction of G (through `VScore`) gives the
    same samples as the exact score, to rounding (the same noise)."""
    ts = gd.uniform_grid(1.0, 1e-3, 20)
    s = G.score(SDE)
    v_model = gd.VScore(lambda t, x, a: gd.score_to_v(SDE, t, x, s(t, x)), SDE)
    kw = dict(num_particles=64, ts=ts)
    want = gd.sample(jr.key(0), SDE, s, (2,), **kw).ys
    got = gd.sample(jr.key(0), SDE, v_model, (2,), **kw).ys
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_final_denoise_step():
    ts = gd.uniform_grid(1.0, 0.05, 30)
    kw = dict(num_particles=5, ts=ts)
    raw = gd.sample(jr.key(0), SDE, G.score(SDE), (2,), **kw).ys
    den = gd.sample(jr.key(0), SDE, G.score(SDE), (2,), denoise=True, **kw).ys
    s = G.score(SDE)
    expected = np.stack([gd.score_to_x0(SDE, 0.05, r, s(0.05, r)) for r in raw])
    np.testing.assert_allclose(den, expected, rtol=1e-12)


def test_conversions_keep_a_float32_state_float32_under_x64():
    """With x64 on, a float32 state (gd.sample(dtype=float32)) must not be promoted
    by the conversions (it broke the scan's carry for every Flax eps-network)."""
    sde = gd.VPSDE()
    x, t = jnp.ones(3, jnp.float32), jnp.float32(0.5)
    for convert in (
        gd.eps_to_score,
        gd.score_to_eps,
        gd.x0_to_score,
        gd.score_to_x0,
        gd.v_to_score,
        gd.score_to_v,
    ):
        assert convert(sde, t, x, x).dtype == jnp.float32, convert.__name__
    # an integer state: JAX's default float, for every conversion alike (the eps
    # conversions took the prediction's dtype, the others the state's)
    for convert in (gd.eps_to_score, gd.score_to_eps, gd.score_to_x0):
        assert convert(sde, t, jnp.ones(3, jnp.int32), x).dtype == jnp.float64


def test_score_check_memo_bounds_closures_and_keeps_label_sweeps():
    """The memo of checked score signatures kept up to 256 closures (and what they
    capture) alive, then forgot everything at once. It is now two-level: at most
    `_MAX_STRUCTURES` score structures (which hold the closures), each with up to
    `_MAX_VALUES` leaf values (labels), least recently used evicted first."""
    import gc
    import weakref

    from guidediff import _sample_checks as checks

    class Payload:  # what a closure captures (weakly referenceable)
        def __init__(self):
            self.bias = np.ones(2)

    checks._CHECKED_SCORES.table.clear()
    ts = gd.uniform_grid(1.0, 1e-3, 4)
    alive = []
    for _ in range(3 * checks._MAX_STRUCTURES):
        payload = Payload()
        score = gd.ScoreFn(lambda t, x, args, p=payload: -x + p.bias)
        checks._check_score_shape(score, ts, (2,), jnp.float64, None)
        alive.append(weakref.ref(payload))
        del payload, score
    gc.collect()
    assert sum(r() is not None for r in alive) <= checks._MAX_STRUCTURES
    assert alive[-1]() is not None  # the most recent is remembered

    calls = []
    real = checks._check_score_shape_uncached

    def counted(*a):
        calls.append(a)
        return real(*a)

    labelled = gd.ScoreFn(lambda t, x, c: -x + c)
    labels = range(checks._MAX_STRUCTURES + 8)  # more labels than structures
    checks._check_score_shape_uncached = counted
    try:
        for _ in range(2):
            for c in labels:
                checks._check_score_shape(labelled, ts, (2,), jnp.float64, c)
            assert len(calls) == len(labels)  # the second sweep re-traces nothing
    finally:
        checks._check_score_shape_uncached = real
