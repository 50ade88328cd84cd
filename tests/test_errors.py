"""Bad input gets a clear error (one test each)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import three_class_gmm

import guidediff as gd


SDE = gd.VPSDE()
GMM = three_class_gmm()
TS = gd.uniform_grid(1.0, 1e-3, 10)


def test_score_shape_mismatch():
    bad = gd.ScoreFn(lambda t, x, args: x[:1])
    with pytest.raises(
        ValueError, match=r"returned shape \(1,\) for a particle of shape \(2,\)"
    ):
        gd.sample(jr.key(0), SDE, bad, (2,), num_particles=2, ts=TS)


def test_unknown_class_label():
    with pytest.raises(ValueError, match="unknown class label"):
        gd.sample(jr.key(0), SDE, GMM.conditional_score(SDE), (2,), ts=TS, args=7)
    with pytest.raises(ValueError, match="unknown class label"):
        GMM.classifier_prob(jnp.zeros(2), 3)  # the null label is not a class
    # also behind guidance that vmaps over args (batched CFG)
    guided = gd.guide(GMM.conditional_score(SDE), gd.cfg(1.0, null_args=GMM.null_label))
    with pytest.raises(ValueError, match="unknown class label"):
        gd.sample(jr.key(0), SDE, guided, (2,), ts=TS, args=5)
    with pytest.raises(ValueError, match="unknown class label"):
        gd.sample(
            jr.key(0),
            SDE,
            GMM.conditional_score(SDE),
            (2,),
            ts=TS,
            args=jnp.asarray(-1),
        )
    # traced labels (inside a user's jit) poison the score, so particles fail
    f = jax.jit(lambda c: GMM.conditional_score(SDE)(0.5, jnp.zeros(2), c))
    assert np.all(np.isnan(np.asarray(f(jnp.asarray(9)))))
    assert np.all(np.isfinite(np.asarray(f(jnp.asarray(1)))))
    run = jax.jit(
        lambda c: (
            gd.sample(
                jr.key(0),
                SDE,
                GMM.conditional_score(SDE),
                (2,),
                ts=TS,
                num_particles=4,
                args=c,
            ).num_failed
        )
    )
    assert int(run(jnp.asarray(9))) == 4 and int(run(jnp.asarray(1))) == 0


def test_grid_not_monotone():
    ts = jnp.array([1.0, 0.5, 0.7, 0.1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=ts)
    with pytest.raises(ValueError, match="strictly decreasing"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=TS[::-1])


def test_grid_outside_sde_range():
    with pytest.raises(ValueError, match="leaves the SDE's range"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=jnp.array([1.5, 0.5, 0.1]))
    with pytest.raises(ValueError, match="leaves the SDE's range"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=jnp.array([0.5, -0.1]))


def test_negative_reward_in_tilt():
    cloud = gd.PointCloud(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        cloud.tilt(jnp.array([1.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        cloud.tilt(jnp.array([1.0, jnp.nan, 2.0]))
    with pytest.raises(ValueError, match="all zero"):
        cloud.tilt(jnp.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        gd.GaussianMixture([0.5, -0.5], [[0.0], [1.0]], [1.0, 1.0])


def test_bad_guidance_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        gd.cfg(1.0)
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        gd.interval(gd.cfg(1.0, null_args=3), 0.8, 0.2)
    with pytest.raises(TypeError, match="AbstractScore"):
        gd.sample(jr.key(0), SDE, lambda t, x, a: -x, (2,), ts=TS)
    with pytest.raises(ValueError, match="process"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=TS, process="langevin")


def test_bad_keys():
    score = GMM.score(SDE)
    with pytest.raises(TypeError, match=r"expected one PRNG key .* got int"):
        gd.sample(0, SDE, score, (2,), num_particles=2, ts=TS)
    with pytest.raises(TypeError, match="for a batch of keys use jax.vmap"):
        gd.sample(jr.split(jr.key(0), 3), SDE, score, (2,), num_particles=2, ts=TS)
    with pytest.raises(TypeError, match="for a batch of keys use jax.vmap"):
        gd.initial_noise(jr.split(jr.key(0), 3), SDE, (2,), num_particles=2)
    # raw uint32 key data is a key: jax.random.PRNGKey(0) equals jax.random.key(0)
    np.testing.assert_array_equal(
        gd.sample(jr.PRNGKey(0), SDE, score, (2,), num_particles=2, ts=TS).ys,
        gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=TS).ys,
    )
