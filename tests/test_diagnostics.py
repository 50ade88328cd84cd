"""guidance_norms against the guidance term computed by hand."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import three_class_gmm

import guidediff as gd


SDE = gd.VPSDE()
GMM = three_class_gmm()
TILTED = GMM.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0))
S, S_R = GMM.score(SDE), TILTED.score(SDE)
TS = gd.uniform_grid(1.0, 1e-3, 20)


@pytest.fixture(scope="module")
def trajectory():
    out = gd.sample(
        jr.key(0), SDE, S, (2,), num_particles=32, ts=TS, save_trajectory=True
    )
    return out.ts, out.ys


def test_reward_guidance_norm_is_w_times_the_score_gap(trajectory):
    ts, ys = trajectory
    w = 1.7
    mean, se = gd.guidance_norms(gd.guide(S, gd.reward_guidance(S_R, w)), ts, ys)
    gap = jax.vmap(
        jax.vmap(lambda t, y: jnp.linalg.norm(S_R(t, y) - S(t, y)), (0, 0)), (None, 0)
    )(ts, ys)
    np.testing.assert_allclose(mean, w * gap.mean(0), rtol=1e-12)
    np.testing.assert_allclose(se, w * gap.std(0, ddof=1) / np.sqrt(32), rtol=1e-10)
    assert mean.shape == se.shape == ts.shape and np.all(mean > 0)


def test_interval_guidance_is_zero_outside_its_interval(trajectory):
    ts, ys = trajectory
    guided = gd.guide(S, gd.interval(gd.reward_guidance(S_R, 2.0), 0.2, 0.6))
    mean, _ = jax.jit(gd.guidance_norms)(guided, ts, ys)
    inside = (ts >= 0.2) & (ts <= 0.6)
    assert np.all(mean[inside] > 0.1)
    # outside: the unguided score, up to its rounding (it is evaluated in another
    # branch of the interval's switch)
    assert np.all(mean[~inside] < 1e-12)


def test_bad_input():
    ts, ys = TS, jnp.zeros((4, TS.shape[0], 2))
    guided = gd.guide(S, gd.reward_guidance(S_R, 1.0))
    with pytest.raises(TypeError, match="guided score"):
        gd.guidance_norms(S, ts, ys)
    with pytest.raises(ValueError, match="save_trajectory"):
        gd.guidance_norms(guided, ts, ys[:, :-1])
    with pytest.raises(ValueError, match="at least 2 particles"):
        gd.guidance_norms(guided, ts, ys[:1])
    with pytest.raises(ValueError, match="1-D"):
        gd.guidance_norms(guided, ts[None], ys)
    # particles of another shape (the 2-D score broadcast a 1-D one back, before
    # the oracles checked their particles' shape) or dtype
    with pytest.raises(
        ValueError, match="does not hold this score's particles|takes one particle"
    ):
        gd.guidance_norms(guided, ts, ys[..., :1])
    with pytest.raises(TypeError, match="floating point"):
        gd.guidance_norms(guided, ts, ys.astype(jnp.int32))
    # a failed (NaN) particle made every mean NaN, silently
    with pytest.raises(ValueError, match=r"out.ys\[~out.failed\]"):
        gd.guidance_norms(guided, ts, ys.at[0, 1].set(jnp.nan))
    # times that are not real numbers (a misleading message or JAX's own before)
    for bad in (ts > 0.5, np.asarray(ts).astype(str)):
        with pytest.raises(TypeError, match="ts must hold real times"):
            gd.guidance_norms(guided, bad, ys)
