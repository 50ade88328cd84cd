"""Reverse-SDE sampling with exact scores against exact draws (Monte-Carlo tolerances).

Every tolerance is a number of Monte-Carlo standard errors (4 for two-sided
agreement checks; the per-component checks of `assert_matches_mixture` at a
family-wise 1e-3 against a 100x larger exact reference).
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    assert_matches_mixture,
    guided_reciprocal_prob_se,
    paper_1d_gmm,
    reciprocal_prob_sd,
    three_class_gmm,
)

import guidediff as gd
from guidediff._metrics import mean_stderr, reciprocal_prob


SDE = gd.VPSDE()
TS = gd.uniform_grid(1.0, 1e-3, 500)
N = 4000
GMM = three_class_gmm()
REWARD = gd.GaussianBumpReward([1.0, 1.0], 1.0)


def _draw(score, key=1, shape=(2,), num_particles=N, **kw):
    out = gd.sample(
        jr.key(key), SDE, score, shape, num_particles=num_particles, ts=TS, **kw
    )
    assert int(out.num_failed) == 0
    return out.ys


@pytest.mark.parametrize("solver", [None, dfx.Euler()], ids=["exp-integrator", "euler"])
def test_reverse_sde_matches_gmm(solver):
    ys = _draw(GMM.score(SDE), solver=solver)
    assert_matches_mixture(GMM, ys, jr.key(99))


def test_reward_guidance_w1_samples_tilted_gmm():
    tilted = GMM.tilt(REWARD)
    guided = gd.guide(GMM.score(SDE), gd.reward_guidance(tilted.score(SDE), 1.0))
    ys = _draw(guided)
    assert_matches_mixture(tilted, ys, jr.key(98))
    r, se = mean_stderr(jax.vmap(REWARD)(ys))
    assert abs(float(r - REWARD.expectation(tilted))) < 4 * float(se)


def test_reward_rises_with_w():
    """E[r(Y^w)] is non-decreasing in w and >= E_p[r] (PAPER.md 2.4); the draws share
    noise across w, so differences are judged by their paired standard error."""
    tilted = GMM.tilt(REWARD)
    base = GMM.score(SDE)
    rewards = []
    for w in [0.0, 0.5, 1.0, 2.0, 4.0]:
        guided = gd.guide(base, gd.reward_guidance(tilted.score(SDE), w))
        rewards.append(np.asarray(jax.vmap(REWARD)(_draw(guided))))
    e_p = float(REWARD.expectation(GMM))
    m0, se0 = mean_stderr(rewards[0])
    assert abs(float(m0) - e_p) < 4 * float(se0)
    for lo, hi in zip(rewards[:-1], rewards[1:], strict=True):
        d, se = mean_stderr(hi - lo)
        assert float(d) > -3 * float(se), (
            f"E[r] fell: {float(d):.4f} (se {float(se):.4f})"
        )
    for r in rewards[1:]:
        m, se = mean_stderr(r - e_p)
        assert float(m) > -3 * float(se)
    # and it is strictly increasing overall
    d, se = mean_stderr(rewards[-1] - rewards[0])
    assert float(d) > 4 * float(se)


def test_cfg_lowers_reciprocal_classifier_probability():
    """E[1/p(c|Y^w)] < 1/p(c) for w > 0 (PAPER.md 3.3), beyond Monte-Carlo error."""
    c = 0
    gmm = paper_1d_gmm()
    score = gmm.conditional_score(SDE)
    theory = 1.0 / float(gmm.class_prob(c))
    probs = {}
    for w in [0.0, 0.5, 1.0, 2.0]:
        guided = gd.guide(score, gd.cfg(w, null_args=gmm.null_label))
        # 1-D and cheap: enough particles that the guided values clear 1/p(c) by
        # several times the conservative standard error below.
        ys = _draw(guided, args=c, shape=(1,), num_particles=32_000)
        probs[w] = jax.vmap(lambda x: gmm.classifier_prob(x, c))(ys)
    # Unguided: exactly 1/p(c). 1/p is heavy-tailed, so its sample standard error
    # underestimates the true one: judge by the exact one (quadrature).
    m0, _ = reciprocal_prob(probs[0.0])
    se0 = reciprocal_prob_sd(gmm, c) / np.sqrt(probs[0.0].size)
    assert abs(float(m0) - theory) < 4 * se0
    # Guided: the sample standard error is no more trusted than at w = 0; bound it
    # by the unguided second moment (see guided_reciprocal_prob_se).
    se_w = guided_reciprocal_prob_se(gmm, c, probs[0.5].size)
    for w in [0.5, 1.0, 2.0]:
        m, se = reciprocal_prob(probs[w])
        se = max(float(se), se_w)
        assert float(m) + 4 * se < theory, (w, float(m), se, theory)


def test_cfg_gaussian_closed_form():
    """With p(x|c) = N(mu_c, v I) and p(x) = N(mu_u, v I), the CFG score at every t is
    the exact score of N(mu_c + w (mu_c - mu_u), v I), so that is the guided law."""
    v, w = 0.5, 1.5
    mu_c, mu_u = jnp.array([1.0, 0.5]), jnp.array([-0.5, 0.0])
    cond, uncond = gd.Gaussian(mu_c, v), gd.Gaussian(mu_u, v)
    target = gd.Gaussian(mu_c + w * (mu_c - mu_u), v)
    guided = gd.guide(cond.score(SDE), gd.cfg(w, unconditional=uncond.score(SDE)))
    x = jnp.array([0.3, -0.2])
    for t in [0.1, 0.5, 0.9]:
        np.testing.assert_allclose(guided(t, x), target.score(SDE)(t, x), rtol=1e-10)
    ys = np.asarray(_draw(guided))
    se = ys.std(0, ddof=1) / np.sqrt(N)
    assert np.all(np.abs(ys.mean(0) - np.asarray(target.mean)) < 4 * se)
    var_se = np.sqrt(2 / (N - 1)) * v
    assert np.all(np.abs(ys.var(0, ddof=1) - v) < 4 * var_se)


@pytest.mark.slow
@pytest.mark.parametrize("solver", [None, dfx.Euler()], ids=["exp-integrator", "euler"])
def test_reverse_sde_matches_gmm_large(solver):
    """Ten times the particles and twice the steps: the 4-SE bands are ~3x tighter,
    so discretisation bias that hides at N = 4000 would show here."""
    n = 40000
    out = gd.sample(
        jr.key(11),
        SDE,
        GMM.score(SDE),
        (2,),
        num_particles=n,
        ts=gd.uniform_grid(1.0, 1e-3, 1000),
        solver=solver,
    )
    assert int(out.num_failed) == 0
    assert_matches_mixture(GMM, out.ys, jr.key(97))


@pytest.mark.slow
def test_reward_guidance_w1_large():
    n = 40000
    tilted = GMM.tilt(REWARD)
    guided = gd.guide(GMM.score(SDE), gd.reward_guidance(tilted.score(SDE), 1.0))
    out = gd.sample(
        jr.key(12),
        SDE,
        guided,
        (2,),
        num_particles=n,
        ts=gd.uniform_grid(1.0, 1e-3, 1000),
    )
    assert_matches_mixture(tilted, out.ys, jr.key(96))
    r, se = mean_stderr(jax.vmap(REWARD)(out.ys))
    assert abs(float(r - REWARD.expectation(tilted))) < 4 * float(se)
