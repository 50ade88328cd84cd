"""Denoising score matching losses (guidediff._losses), checked on Gaussian data whose
exact noise/data/score predictors and irreducible losses are known in closed form.

For $x_0 \\sim \\mathcal N(0, s^2 I)$ and $x_t = \\alpha x_0 + \\sigma\\varepsilon$, with
$v = \\alpha^2 s^2 + \\sigma^2$: $\\hat\\varepsilon = \\sigma x / v$,
$\\hat x_0 = \\alpha s^2 x / v$, $s_t(x) = -x / v$, and the irreducible
$\\varepsilon$-loss is $E\\|\\hat\\varepsilon - \\varepsilon\\|^2/d = \\alpha^2 s^2 / v$.
"""

import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats

import guidediff as gd
from guidediff._losses import (
    check_labels,
    conditional_dsm_loss,
    drop_labels,
    dsm_example_loss,
    dsm_loss,
    noisy_classifier_loss,
    reward_weighted_dsm_loss,
    reward_weights,
)
from guidediff._sde import VPSDE


SDE = VPSDE()
S = 0.7  # data std
D = 2
N = 20_000


def _v(p, t):
    alpha, sigma = SDE.marginal(t)
    return alpha, sigma, alpha**2 * p["s"] ** 2 + sigma**2


def eps_model(p, t, x, label):
    alpha, sigma, v = _v(p, t)
    return sigma * x / v


def x0_model(p, t, x, label):
    alpha, sigma, v = _v(p, t)
    return alpha * p["s"] ** 2 * x / v


def score_model(p, t, x, label):
    return -x / _v(p, t)[2]


def v_model(p, t, x, label):  # v = alpha eps - sigma x0 (Salimans & Ho)
    alpha, sigma, _ = _v(p, t)
    return alpha * eps_model(p, t, x, label) - sigma * x0_model(p, t, x, label)


PARAMS = {"s": jnp.asarray(S)}
MODELS = {"eps": eps_model, "x0": x0_model, "v": v_model, "score": score_model}


@pytest.fixture(scope="module")
def x0():
    return S * jr.normal(jr.key(0), (N, D))


def _per_example(model, key, x0, **kw):
    keys = jr.split(key, x0.shape[0])
    fn = lambda k, x: dsm_example_loss(model, PARAMS, k, x, SDE, **kw)
    return jax.jit(jax.vmap(fn))(keys, x0)


def test_dsm_loss_matches_closed_form(x0):
    """The Monte Carlo loss of the exact predictor equals the irreducible loss
    E_t[alpha^2 s^2 / v] to within 4 standard errors."""
    t_min = 1e-3
    per = _per_example(eps_model, jr.key(1), x0, t_min=t_min)
    ts = np.linspace(t_min, SDE.T, 20_001)
    alpha, sigma = jax.vmap(SDE.marginal)(ts)
    alpha, sigma = np.asarray(alpha), np.asarray(sigma)
    expected = np.trapezoid(alpha**2 * S**2 / (alpha**2 * S**2 + sigma**2), ts) / (
        SDE.T - t_min
    )
    se = float(jnp.std(per)) / np.sqrt(N)
    assert abs(float(jnp.mean(per)) - expected) < 4 * se
    # dsm_loss is the batch mean of the per-example losses, with the same keys.
    total = dsm_loss(eps_model, PARAMS, jr.key(1), x0, SDE, t_min=t_min)
    np.testing.assert_allclose(total, jnp.mean(per), rtol=1e-12)


WEIGHTINGS = ["eps", "x0", "v", "score", "likelihood"]


def _check_predictions_agree(models, params, sde, keys, xs, rtol):
    """Per-example losses of every prediction type equal the eps-prediction's, under
    every weighting (one compiled program)."""

    @jax.jit
    def all_losses(keys, xs):
        out = {}
        for weighting in WEIGHTINGS:
            for prediction, model in models.items():
                kw = dict(weighting=weighting, prediction=prediction)
                fn = lambda k, x, model=model, kw=kw: dsm_example_loss(
                    model, params, k, x, sde, **kw
                )
                out[weighting, prediction] = jax.vmap(fn)(keys, xs)
        return out

    out = all_losses(keys, xs)
    for weighting in WEIGHTINGS:
        for prediction in ("x0", "v", "score"):
            np.testing.assert_allclose(
                out[weighting, prediction], out[weighting, "eps"], rtol=rtol,
                atol=1e-12, err_msg=f"{weighting=} {prediction=}",
            )  # fmt: skip


def test_predictions_agree(x0):
    """Exact eps-, x0-, v- and score-predictors are the same score, so every
    prediction type gives the same per-example loss under a given weighting."""
    xs = x0[:2000]
    keys = jr.split(jr.key(2), xs.shape[0])
    _check_predictions_agree(MODELS, PARAMS, SDE, keys, xs, rtol=1e-9)


def test_predictions_agree_on_a_ve_sde():
    """The same on a VE SDE (alpha = 1, sigma up to 50), where alpha^2 + sigma^2 != 1
    enters the v-prediction's target and its weighting; exact predictors read from
    a Gaussian oracle's score."""
    sde = gd.VESDE()
    score = gd.Gaussian(jnp.array([1.0, -0.5]), 0.3).score(sde)
    convert = {"eps": gd.score_to_eps, "x0": gd.score_to_x0, "v": gd.score_to_v,
               "score": lambda sde, t, x, s: s}  # fmt: skip
    models = {
        k: (lambda p, t, x, c, conv=conv: conv(sde, t, x, score(t, x)))
        for k, conv in convert.items()
    }
    xs = 1.0 + 0.5 * jr.normal(jr.key(4), (500, 2))
    keys = jr.split(jr.key(5), xs.shape[0])
    _check_predictions_agree(models, None, sde, keys, xs, rtol=1e-8)


def test_callable_weighting(x0):
    xs = x0[:2000]
    keys = jr.split(jr.key(3), xs.shape[0])
    callables = {
        "eps": lambda t: SDE.marginal(t)[1] ** 2,
        "likelihood": lambda t: SDE.diffusion(t) ** 2,
        "score": lambda t: jnp.ones_like(t),
    }

    @jax.jit
    def pairs(keys, xs):
        out = {}
        for name, fn in callables.items():
            for w in (name, fn):
                loss = lambda k, x: dsm_example_loss(
                    eps_model, PARAMS, k, x, SDE, weighting=w
                )
                out[name, callable(w)] = jax.vmap(loss)(keys, xs)
        return out

    out = pairs(keys, xs)
    for name in callables:
        np.testing.assert_allclose(out[name, False], out[name, True], rtol=1e-12)


def _per_example_grads(key, x0, s):
    """d/ds of each example's eps-loss at s (the per-example terms of dsm_loss's
    gradient: dsm_loss gives example i the key jr.split(key, n)[i])."""
    keys = jr.split(key, x0.shape[0])
    one = lambda s, k, x: dsm_example_loss(eps_model, {"s": s}, k, x, SDE)
    return np.asarray(jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(s, keys, x0))


def test_true_parameter_is_a_stationary_point_of_the_loss(x0):
    """At s = S the exact predictor is E[eps | x_t], so each example's loss
    gradient has mean exactly 0: the minibatch gradient is within 4 standard
    errors of 0 (per-example spread / sqrt(N)); at s = 1.2 S it is not (the test
    can tell), and it is the mean of the per-example gradients."""
    g = _per_example_grads(jr.key(4), x0, jnp.asarray(S))
    se = g.std() / np.sqrt(g.size)
    assert abs(g.mean()) < 4 * se
    np.testing.assert_allclose(
        jax.grad(lambda s: dsm_loss(eps_model, {"s": s}, jr.key(4), x0, SDE))(S),
        g.mean(),
        rtol=1e-10,
    )
    off = _per_example_grads(jr.key(4), x0, jnp.asarray(1.2 * S))
    assert off.mean() > 4 * off.std() / np.sqrt(off.size)


def test_reward_weighted_minimiser_is_tilted_score(x0):
    """With r(x) = exp(-|x|^2 / (2 w^2)), p^r = N(0, s_r^2) with
    1/s_r^2 = 1/s^2 + 1/w^2: the reward-weighted loss is stationary at s = s_r. Its
    gradient there, sum_i r_i g_i / sum_i r_i (g_i the per-example gradients), has
    mean 0; its standard error by the delta method for a ratio of means is
    sd(r_i (g_i - R)) / (sqrt(N) mean(r)). At the untilted S it is far from 0."""
    w = 1.0
    s_r = (1 / S**2 + 1 / w**2) ** -0.5
    reward = lambda x: jnp.exp(-0.5 * jnp.sum(x**2) / w**2)
    r = np.asarray(jax.vmap(reward)(x0))

    def stats(s):
        g = _per_example_grads(jr.key(5), x0, jnp.asarray(s))
        ratio = np.sum(r * g) / np.sum(r)
        se = np.std(r * (g - ratio)) / (np.sqrt(r.size) * np.mean(r))
        return ratio, se

    ratio, se = stats(s_r)
    assert abs(ratio) < 4 * se
    loss = lambda s: reward_weighted_dsm_loss(
        eps_model, {"s": s}, jr.key(5), x0, reward, SDE
    )
    np.testing.assert_allclose(jax.grad(loss)(s_r), ratio, rtol=1e-8)
    ratio, se = stats(S)
    assert ratio > 4 * se  # the untilted score is not the minimiser


def test_reward_weighted_special_cases(x0):
    xs = x0[:512]
    key = jr.key(6)
    plain = dsm_loss(eps_model, PARAMS, key, xs, SDE)
    const = reward_weighted_dsm_loss(
        eps_model, PARAMS, key, xs, 2.0 * jnp.ones(512), SDE
    )
    np.testing.assert_allclose(const, plain, rtol=1e-12)
    # An exponential tilt exp(R/alpha) equals plain rewards r = exp(R/alpha).
    big_r = -0.5 * jnp.sum(xs**2, axis=-1)
    tilt = reward_weighted_dsm_loss(
        eps_model, PARAMS, key, xs, big_r, SDE, temperature=0.5
    )
    direct = reward_weighted_dsm_loss(
        eps_model, PARAMS, key, xs, jnp.exp(big_r / 0.5), SDE
    )
    np.testing.assert_allclose(tilt, direct, rtol=1e-10)
    # ... and the tilt is stable where exp(R/alpha) overflows.
    huge = reward_weighted_dsm_loss(
        eps_model, PARAMS, key, xs, big_r + 1e5, SDE, temperature=0.5
    )
    np.testing.assert_allclose(huge, tilt, rtol=1e-8)
    # Rewards as a function of one example are vmapped.
    fn = reward_weighted_dsm_loss(
        eps_model, PARAMS, key, xs, lambda x: jnp.exp(-jnp.sum(x**2)), SDE
    )
    np.testing.assert_allclose(fn, direct, rtol=1e-10)


def test_reward_weights():
    np.testing.assert_allclose(
        reward_weights(jnp.array([0.0, 1.0, 3.0])), [0, 0.75, 2.25]
    )
    w = reward_weights(jnp.array([0.0, jnp.log(3.0)]), temperature=1.0)
    np.testing.assert_allclose(w, [0.5, 1.5])
    np.testing.assert_allclose(
        reward_weights(jnp.array([1e4, 1e4]), temperature=1e-2), [1.0, 1.0]
    )
    np.testing.assert_allclose(
        jnp.mean(reward_weights(jr.uniform(jr.key(0), (7,)))), 1.0
    )


def test_reward_mean_removes_the_finite_batch_bias_of_the_weights():
    """Two examples, rewards 1 or 3 equally likely: the expected weight an example
    of reward r gets, by exact enumeration of the four batches. p^r puts
    3 / (1 + 3) = 0.75 on reward 3; batch-mean weights put 0.625 there (their
    normaliser depends on the other example), weights r / E[r] exactly 0.75."""

    def mass_on_three(**kw):
        per = {1.0: 0.0, 3.0: 0.0}
        for batch in itertools.product([1.0, 3.0], repeat=2):
            w = np.asarray(reward_weights(jnp.array(batch), **kw))
            for r, wi in zip(batch, w, strict=True):
                per[r] += wi
        return per[3.0] / (per[1.0] + per[3.0])

    np.testing.assert_allclose(mass_on_three(), 0.625, rtol=1e-12)
    np.testing.assert_allclose(mass_on_three(reward_mean=2.0), 0.75, rtol=1e-12)
    # an exponential tilt: exp(R / alpha) / E[exp(R / alpha)], in log space
    m = float(np.mean(np.exp([-2.0, 2.0])))
    w = reward_weights(jnp.array([-1.0, 1.0]), temperature=0.5, reward_mean=m)
    np.testing.assert_allclose(w, np.exp([-2.0, 2.0]) / m, rtol=1e-12)
    # a mean beyond the rewards' dtype (float32 here), as E[exp(R / alpha)] often
    # is: split on the host, not rounded to inf or 0 first (weights 0 / inf were
    # returned)
    for shift in (90.0, -110.0):
        big = np.array([0.0, 10.0, 5.0]) + shift
        m = float(np.mean(np.exp(big)))
        w = reward_weights(
            jnp.asarray(big, jnp.float32), temperature=1.0, reward_mean=m
        )
        np.testing.assert_allclose(w, np.exp(big) / m, rtol=1e-5)
    w = reward_weights(jnp.array([1e30, 3e30], jnp.float32), reward_mean=2e45)
    np.testing.assert_allclose(w, [5e-16, 1.5e-15], rtol=1e-6)
    # rewards near float32's largest value (r / mant alone overflowed to inf)
    r = jnp.array([3e38, 1.0, 2.0], jnp.float32)
    np.testing.assert_allclose(reward_weights(r, reward_mean=1.5), [2e38, 2 / 3, 4 / 3],
                               rtol=1e-6)  # fmt: skip
    # rewards closed over (concrete) under jit: checked with NumPy, not staged
    f = jax.jit(lambda m: reward_weights(jnp.array([1.0, 3.0]), reward_mean=m))
    np.testing.assert_allclose(f(2.0), [0.5, 1.5])
    # a traced 16-bit mean: its log in the rewards' precision (float16's kept 11
    # bits: weights 0.15 % off)
    m16 = jnp.float16(1000.0)
    g = jax.jit(lambda m: reward_weights(jnp.array([0.5, 1.0]), temperature=0.5,
                                         reward_mean=m))  # fmt: skip
    np.testing.assert_allclose(g(m16), np.exp([1.0, 2.0]) / 1000.0, rtol=1e-6)
    # an all-zero batch is a zero loss, not an error, with a known mean
    np.testing.assert_array_equal(reward_weights(jnp.zeros(2), reward_mean=2.0), 0)
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="reward_mean must be finite and positive"):
            reward_weights(jnp.ones(2), reward_mean=bad)
    with pytest.raises(ValueError, match="non-negative"):
        reward_weights(jnp.array([-1.0, 1.0]), reward_mean=1.0)
    with pytest.raises(Exception, match="reward_mean must be finite and positive"):
        f = jax.jit(lambda m: reward_weights(jnp.ones(2), reward_mean=m))
        f(-1.0).block_until_ready()


@pytest.mark.parametrize(
    "rewards, match",
    [
        ([1.0, -0.5, 2.0], "non-negative"),
        ([1.0, jnp.nan, 2.0], "NaN"),
        ([0.0, 0.0, 0.0], "all zero"),
        ([1.0, jnp.inf, 2.0], "inf"),
    ],
)
def test_bad_rewards(rewards, match):
    rewards = jnp.asarray(rewards)
    with pytest.raises(ValueError, match=match):
        reward_weights(rewards)
    xs = jnp.ones((3, 2))
    with pytest.raises(ValueError, match=match):
        reward_weighted_dsm_loss(eps_model, PARAMS, jr.key(0), xs, rewards, SDE)
    # Traced (e.g. inside fit's jitted step): a run-time error, never a NaN loss.
    with pytest.raises(Exception, match="rewards must be finite and non-negative"):
        jax.jit(reward_weights)(rewards).block_until_ready()
    with pytest.raises(Exception, match="rewards must be finite and non-negative"):
        jax.jit(
            lambda r: reward_weighted_dsm_loss(eps_model, PARAMS, jr.key(0), xs, r, SDE)
        )(rewards).block_until_ready()


def test_bad_tilts_and_shapes():
    with pytest.raises(ValueError, match="NaN or inf"):
        reward_weights(jnp.array([1.0, jnp.nan]), temperature=1.0)
    with pytest.raises(Exception, match="NaN or inf"):
        jax.jit(lambda r: reward_weights(r, temperature=1.0))(
            jnp.array([1.0, jnp.inf])
        ).block_until_ready()
    with pytest.raises(ValueError, match="temperature must be positive"):
        reward_weights(jnp.array([1.0]), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        reward_weights(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match=r"rewards must have shape \(4,\)"):
        reward_weighted_dsm_loss(
            eps_model, PARAMS, jr.key(0), jnp.ones((4, 2)), jnp.ones(3), SDE
        )


# ---------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------


def test_check_labels():
    labels = jnp.array([0, 1, 2, 3])
    assert check_labels(labels, 3) is not None  # 3 == the null label
    for bad in ([0, -1], [0, 4]):
        with pytest.raises(ValueError, match="out of range"):
            check_labels(jnp.array(bad), 3)
    with pytest.raises(ValueError, match="out of range"):
        check_labels(labels, 3, allow_null=False)
    with pytest.raises(TypeError, match="integers"):
        check_labels(jnp.array([0.0, 1.0]), 3)
    with pytest.raises(Exception, match="class label out of range"):
        jax.jit(lambda c: check_labels(c, 3))(jnp.array([0, 7])).block_until_ready()


def test_drop_labels():
    labels = jnp.zeros(N, jnp.int32) + 2
    np.testing.assert_array_equal(drop_labels(jr.key(0), labels, 3, 0.0), labels)
    np.testing.assert_array_equal(drop_labels(jr.key(0), labels, 3, 1.0), 3)
    dropped = drop_labels(jr.key(0), labels, 3, 0.3)
    frac = float(jnp.mean(dropped == 3))
    assert set(np.unique(dropped).tolist()) == {2, 3}
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / N)
    with pytest.raises(ValueError, match="p_uncond"):
        drop_labels(jr.key(0), labels, 3, 1.5)


def _labelled_model(p, t, x, label):
    # A model that sees its label: the exact predictor shifted by the label.
    return eps_model(p, t, x, label) + 0.01 * label


def test_conditional_loss(x0):
    xs = x0[:256]
    labels = jr.randint(jr.key(1), (256,), 0, 3)
    key = jr.key(7)
    no_drop = conditional_dsm_loss(
        _labelled_model, PARAMS, key, xs, labels, SDE, num_classes=3, p_uncond=0.0
    )
    ref = dsm_loss(_labelled_model, PARAMS, jr.split(key)[1], xs, SDE, labels=labels)
    np.testing.assert_allclose(no_drop, ref, rtol=1e-12)
    all_null = conditional_dsm_loss(
        _labelled_model, PARAMS, key, xs, labels, SDE, num_classes=3, p_uncond=1.0
    )
    ref_null = dsm_loss(
        _labelled_model, PARAMS, jr.split(key)[1], xs, SDE, labels=jnp.full(256, 3)
    )
    np.testing.assert_allclose(all_null, ref_null, rtol=1e-12)


def test_one_example_without_its_batch_axis_names_the_fix():
    """A walkthrough passed one 2-D example to dsm_loss: it was read as 2 examples of
    shape () and Flax's ScopeParamShapeError reached the user bare; it now carries
    a note saying how the loss read x0 and the fix (its type kept: a review saw a
    rewrap turn a model's own TypeError into a ValueError blaming the data)."""
    import flax

    net = gd.MLPScoreNet(hidden=(8,))
    params = net.init(jr.key(0), 0.5, jnp.zeros(2))
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"pass x0\[None\]"):
        dsm_loss(net.apply, params, jr.key(0), jnp.zeros(2), SDE)
    with pytest.raises(TypeError, match=r"pass x0\[None\]"):  # a model's own bug
        dsm_loss(lambda p, t, x, c: p["w"] * x, 1.0, jr.key(0), jnp.ones(4), SDE)
    assert jnp.isfinite(dsm_loss(net.apply, params, jr.key(0), jnp.zeros((1, 2)), SDE))


def test_conditional_loss_bad_labels(x0):
    xs = x0[:4]
    for bad in ([0, 1, 4, 2], [0, -1, 1, 2]):
        with pytest.raises(ValueError, match="out of range"):
            conditional_dsm_loss(
                _labelled_model,
                PARAMS,
                jr.key(0),
                xs,
                jnp.array(bad),
                SDE,
                num_classes=3,
            )
    with pytest.raises(Exception, match="class label out of range"):
        jax.jit(
            lambda c: conditional_dsm_loss(
                _labelled_model, PARAMS, jr.key(0), xs, c, SDE, num_classes=3
            )
        )(jnp.array([0, 1, 9, 2])).block_until_ready()
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        conditional_dsm_loss(
            _labelled_model,
            PARAMS,
            jr.key(0),
            xs,
            jnp.array([0, 1]),
            SDE,
            num_classes=3,
        )


def test_noisy_classifier_loss(x0):
    xs = x0[:64]
    labels = jnp.arange(64) % 4
    zero_logits = lambda p, t, x: jnp.zeros(4, x.dtype) * p["s"]
    for sde in (SDE, None):
        loss = noisy_classifier_loss(
            zero_logits, PARAMS, jr.key(0), xs, labels, sde, num_classes=4
        )
        np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        noisy_classifier_loss(
            zero_logits, PARAMS, jr.key(0), xs, labels, SDE, num_classes=3
        )


def test_loss_argument_errors(x0):
    xs = x0[:4]
    with pytest.raises(ValueError, match="t_min"):
        dsm_loss(eps_model, PARAMS, jr.key(0), xs, SDE, t_min=1.0)
    with pytest.raises(ValueError, match="prediction"):
        dsm_loss(eps_model, PARAMS, jr.key(0), xs, SDE, prediction="velocity")
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(eps_model, PARAMS, jr.key(0), xs, SDE, weighting="snr")
    with pytest.raises(ValueError, match="returned shape"):
        dsm_loss(lambda p, t, x, c: x[:1], PARAMS, jr.key(0), xs, SDE)
    # a callable weighting < 0 would maximise the residual at those t: an error
    # now when it is a constant, and when the loss runs when it depends on t
    with pytest.raises(ValueError, match=r"finite lambda\(t\) >= 0"):
        dsm_loss(eps_model, PARAMS, jr.key(0), xs, SDE, weighting=lambda t: -1.0)
    loss = jax.jit(lambda w: dsm_loss(eps_model, PARAMS, jr.key(0), xs, SDE,
                                      weighting=lambda t: w * t))  # fmt: skip
    assert np.isfinite(loss(1.0)) and loss(0.0) == 0.0  # 0: those t not trained
    for bad in (-1.0, jnp.inf):
        with pytest.raises(Exception, match=r"finite lambda\(t\) >= 0"):
            loss(bad).block_until_ready()


def test_reward_weights_extreme_ranges():
    """Rewards near the dtype's largest value (their mean would overflow) give the
    weights r / mean(r), eagerly and under jit; subnormal rewards count as zero
    (XLA on CPU flushes them), so all-subnormal rewards are an error, not NaN."""
    cases = [
        (jnp.float32, [3e38, 3e38], [1.0, 1.0]),
        (jnp.float32, [3e38, 1e-39, 0.0], [3.0, 0.0, 0.0]),
        (jnp.float64, [1e308, 1.7e308, 0.3e308], [1.0, 1.7, 0.3]),
        (jnp.float16, [6e4, 2e4], [1.5, 0.5]),
        # zeros beside rewards that are all tiny (frexp(0)'s exponent 0 used to set
        # the scale: an unscaled, subnormal mean and NaN weights)
        (jnp.float32, [0.0, 0.0, 0.0, 2e-38], [0.0, 0.0, 0.0, 4.0]),
        (jnp.float32, [0.0] * 7 + [5e-38], [0.0] * 7 + [8.0]),
        (jnp.float32, [0.0, 0.25, 0.125], [0.0, 2.0, 1.0]),
    ]
    jitted = jax.jit(reward_weights)
    for dtype, rewards, expected in cases:
        for fn in (reward_weights, jitted):
            w = fn(jnp.array(rewards, dtype))
            assert w.dtype == jnp.promote_types(dtype, jnp.float32)  # f16: f32
            np.testing.assert_allclose(w, expected, rtol=1e-3, atol=0)
    # the same derivative as r / mean(r)
    r = jnp.array([0.5, 1.0, 3.0])
    np.testing.assert_allclose(
        jax.jacfwd(jitted)(r), jax.jacfwd(lambda r: r / jnp.mean(r))(r), rtol=1e-12
    )
    tiny = jnp.array([1e-39, 3e-39], jnp.float32)
    with pytest.raises(ValueError, match="all zero"):
        reward_weights(tiny)
    with pytest.raises(Exception, match="not all zero"):
        jitted(tiny).block_until_ready()


def test_noisy_classifier_loss_checks(x0):
    xs = x0[:8]
    labels = jnp.arange(8) % 3
    two_logits = lambda p, t, x: jnp.zeros(2, x.dtype)
    for sde in (SDE, None):
        with pytest.raises(ValueError, match=r"logits of shape \(2,\).*\(3,\)"):
            noisy_classifier_loss(
                two_logits, PARAMS, jr.key(0), xs, labels, sde, num_classes=3
            )
    with pytest.raises(ValueError, match=r"logits of shape \(3, 1\)"):
        jax.jit(
            lambda x: noisy_classifier_loss(
                lambda p, t, x: jnp.zeros((3, 1)),
                PARAMS,
                jr.key(0),
                x,
                labels,
                SDE,
                num_classes=3,
            )
        )(xs)
    three_logits = lambda p, t, x: jnp.zeros(3, x.dtype) + t
    for t_min in (5.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"need 0 <= t_min < T = 1.0"):
            noisy_classifier_loss(
                three_logits,
                PARAMS,
                jr.key(0),
                xs,
                labels,
                SDE,
                num_classes=3,
                t_min=t_min,
            )
    loss = noisy_classifier_loss(
        three_logits, PARAMS, jr.key(0), xs, labels, SDE, num_classes=3, t_min=0.0
    )
    np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-12)


def test_training_time_never_lands_on_t_min_zero(monkeypatch):
    """With t_min = 0 a float32 uniform draw is exactly 0 about once in 2^23
    examples, where sigma(0) = 0 makes the score-prediction residual eps / sigma and
    the weight ratios infinite: t is drawn from (t_min, T]. Checked at the extreme
    draws of the underlying uniform (its minimum and the value just below its
    maximum), forced by replacing jax.random.uniform."""
    import guidediff as gd

    x0 = jnp.array([0.3, -0.2], jnp.float32)
    model = lambda p, t, x, label: jnp.zeros_like(x)
    for extreme in ("min", "max"):

        def fake(key, shape=(), dtype=float, minval=0.0, maxval=1.0):
            hi = jnp.nextafter(jnp.asarray(maxval, dtype), jnp.asarray(0, dtype))
            return jnp.full(shape, minval if extreme == "min" else hi, dtype)

        monkeypatch.setattr(jr, "uniform", fake)
        for prediction, weighting in (("score", "score"), ("eps", "score")):
            loss = gd.dsm_example_loss(
                model, None, jr.key(0), x0, SDE, t_min=0.0,
                prediction=prediction, weighting=weighting,
            )  # fmt: skip
            assert np.isfinite(loss), (extreme, prediction, weighting)


def test_traced_temperature_must_be_positive():
    """A temperature traced under jit is checked at run time (a negative one would
    reverse the exponential tilt silently)."""
    weights = jax.jit(lambda r, a: reward_weights(r, temperature=a))
    r = jnp.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(weights(r, 0.5), reward_weights(r, temperature=0.5))
    for bad in (-0.5, 0.0, jnp.nan):
        with pytest.raises(Exception, match="temperature must be positive"):
            weights(r, bad).block_until_ready()


def test_a_flax_module_may_stand_for_its_apply(x0):
    """Passing the network instead of `net.apply` failed with Flax's
    CallCompactUnboundModuleError; the losses use its `apply`."""
    import flax.linen as nn

    import guidediff as gd

    net = gd.MLPScoreNet(hidden=(8,), num_classes=2)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    labels = jnp.arange(x0.shape[0]) % 2
    for loss in (dsm_loss, conditional_dsm_loss):
        kw = {"labels": labels} if loss is dsm_loss else {"num_classes": 2}
        args = (x0, SDE) if loss is dsm_loss else (x0, labels, SDE)
        a = loss(net, params, jr.key(1), *args, **kw)
        b = loss(net.apply, params, jr.key(1), *args, **kw)
        assert float(a) == float(b)

    class Logits(nn.Module):
        @nn.compact
        def __call__(self, t, x):
            return nn.Dense(2)(jnp.append(x, t))

    clf = Logits()
    cparams = clf.init(jr.key(0), 0.5, jnp.zeros(2))
    a = noisy_classifier_loss(clf, cparams, jr.key(1), x0, labels, SDE, num_classes=2)
    b = noisy_classifier_loss(
        clf.apply, cparams, jr.key(1), x0, labels, SDE, num_classes=2
    )
    assert float(a) == float(b)


def test_training_times_are_uniform_on_t_min_to_T():
    """With a model that returns t and x0 = 0, the x0-weighted x0-prediction loss of
    one example is exactly t^2: the drawn times are observed. They lie in
    (t_min, T] and are uniform there (Kolmogorov-Smirnov at level 1e-3)."""
    import guidediff as gd

    t_min, n = 0.5, 4000
    model = lambda p, t, x, label: jnp.full_like(x, t)
    loss = lambda k: gd.dsm_example_loss(model, None, k, jnp.zeros(1), SDE,
                                         t_min=t_min, prediction="x0", weighting="x0")  # fmt: skip
    t = np.sqrt(np.asarray(jax.vmap(loss)(jr.split(jr.key(0), n))))
    assert t.min() > t_min and t.max() <= float(SDE.T)
    ks = scipy.stats.kstest(t, "uniform", args=(t_min, float(SDE.T) - t_min))
    assert ks.pvalue > 1e-3, ks


def test_labels_checked_against_the_networks_classes(x0):
    """dsm_loss and reward_weighted_dsm_loss passed concrete labels to the network
    unchecked: under vmap the network's own check cannot see them, and a label past
    its embedding rows (or negative) made the loss NaN, where conditional_dsm_loss
    raises (a consistency audit). The null label is a label."""
    import guidediff as gd

    net = gd.MLPScoreNet(hidden=(8,), num_classes=2)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    xs, rewards = x0[:4], jnp.ones(4)
    losses = {
        "dsm": lambda c: dsm_loss(net.apply, params, jr.key(0), xs, SDE, labels=c),
        "reward": lambda c: reward_weighted_dsm_loss(
            net.apply, params, jr.key(0), xs, rewards, SDE, labels=c
        ),
    }
    big = np.array([0, 1, 2**32 + 1, 1], np.int64)  # not wrapped round to 1
    for name, loss in losses.items():
        assert np.isfinite(loss(jnp.array([0, 1, 2, 1]))), name  # 2: the null label
        for bad in ([0, 1, 5, 1], [0, -1, 1, 1], big):
            with pytest.raises(ValueError, match="out of range"):
                loss(np.asarray(bad))
