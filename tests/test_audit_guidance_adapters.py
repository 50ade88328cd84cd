"""Regressions from an audit of the guidance transforms and score adapters: each test
failed before its fix."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
GMM = gd.GaussianMixture(
    [0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.5, 0.5, 0.5]
)
COND = GMM.conditional_score(SDE)
X = jnp.array([0.4, -0.3])


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_with_null_args_needs_the_conditional_args_in_every_path(batched):
    # a class-conditional network reads args=None as its null label: guidance would
    # silently be off (cond == uncond) in the eager and two-call paths
    guided = gd.guide(COND, gd.cfg(2.0, null_args=GMM.null_label, batched=batched))
    with pytest.raises(TypeError, match="got args=None"):
        guided(0.5, X, None)  # eager
    with pytest.raises(TypeError, match="got args=None"):
        jax.jit(lambda x: guided(0.5, x, None))(X)
    np.testing.assert_allclose(  # with a label it is CFG
        guided(0.5, X, 1),
        3.0 * COND(0.5, X, 1) - 2.0 * COND(0.5, X, GMM.null_label),
        rtol=1e-6,
    )


def test_classifier_guidance_checks_its_likelihood():
    with pytest.raises(TypeError, match="needs a callable"):
        gd.classifier_guidance(3.0)
    with pytest.raises(
        TypeError, match=r"call it: GaussianMixture.log_classifier\(sde\)"
    ):
        gd.classifier_guidance(GMM.log_classifier)
    gd.classifier_guidance(GMM.log_classifier(SDE))  # the built classifier is fine


class _Net(nn.Module):
    @nn.compact
    def __call__(self, t, x, label=None):
        return nn.Dense(x.shape[-1])(x)


def test_eps_and_x0_scores_check_their_arguments():
    model = gd.ScoreFn(lambda t, x, a: x)
    net = _Net()
    for cls in (gd.EpsScore, gd.X0Score, gd.VScore):
        with pytest.raises(TypeError, match="arguments swapped"):
            cls(SDE, model)
        with pytest.raises(TypeError, match="must be a gd.AbstractSDE, got str"):
            cls(model, "vp")
        with pytest.raises(TypeError, match="gd.flax_score"):
            cls(net, SDE)
        with pytest.raises(TypeError, match=r"gd.flax_score"):
            cls(net.apply, SDE)
        with pytest.raises(TypeError, match="needs a callable"):
            cls(1.0, SDE)
        cls(model, SDE)  # a callable model and an SDE


def test_guidance_keeps_the_base_score_dtype_also_inside_an_interval():
    # a bfloat16 "network" guided by float32 scores: every guidance returns the base
    # score's dtype, so the interval's two branches agree
    f32 = GMM.score(SDE)
    base = gd.ScoreFn(lambda t, x, a: f32(t, x.astype(jnp.float32)).astype(x.dtype))
    extra = gd.ScoreFn(lambda t, x, a: f32(t, x.astype(jnp.float32)))
    x = X.astype(jnp.bfloat16)
    for g in (gd.reward_guidance(extra, 1.0), gd.cfg(1.0, unconditional=extra)):
        assert gd.guide(base, g)(0.5, x).dtype == jnp.bfloat16
        for t in (0.5, 0.95):  # inside and outside the interval
            out = gd.guide(base, gd.interval(g, 0.2, 0.8))(t, x)
            assert out.dtype == jnp.bfloat16


def test_guided_scores_with_plain_functions_pass_through_jit():
    # plain-function weights and rewards are static fields, not non-array leaves
    f = jax.jit(lambda guided: guided(0.5, X, 1))
    for g in (
        gd.cfg(lambda t: 2.0 * t, null_args=GMM.null_label),
        gd.gradient_guidance(lambda x0: -jnp.sum(x0**2), 1.0, SDE),
        gd.classifier_guidance(lambda t, x, a: -jnp.sum(x**2), 0.5),
    ):
        guided = gd.guide(COND, g)
        np.testing.assert_allclose(f(guided), guided(0.5, X, 1), rtol=1e-6)
    # a module keeps its arrays as leaves (jax.grad reaches them)
    clf = gd.classifier_guidance(GMM.log_classifier(SDE), 1.0)
    assert any(a is GMM.means for a in jax.tree.leaves(clf))


def test_sampling_with_a_plain_weight_schedule_still_works():
    out = gd.sample(
        jr.key(0), SDE, gd.guide(COND, gd.cfg(lambda t: 2.0 * t, null_args=3)), (2,),
        num_particles=4, args=1, ts=gd.uniform_grid(SDE.T, 1e-3, 4),
    )  # fmt: skip
    assert not bool(jnp.any(out.failed))


def test_a_callable_pytree_weight_keeps_its_arrays_as_leaves():
    # a `Partial` over an array was held as a static field: a warning, a recompile
    # for every new value, and a constant closed over instead of a leaf
    linear = lambda a, t: a * t
    schedule = lambda a: jax.tree_util.Partial(linear, a)
    traces = []

    @jax.jit
    def value(guided):
        traces.append(None)
        return guided(0.5, X, 1)

    guided = lambda a: gd.guide(COND, gd.cfg(schedule(a), null_args=GMM.null_label))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "A JAX array is being set as static"
        outs = [value(guided(jnp.asarray(a))) for a in (1.0, 2.0)]
    assert len(traces) == 1
    for a, out in zip((1.0, 2.0), outs, strict=True):
        np.testing.assert_allclose(out, guided(a)(0.5, X, 1), rtol=1e-6)
    assert any(leaf is not None and leaf.shape == () for leaf in jax.tree.leaves(
        guided(jnp.asarray(1.0))) if isinstance(leaf, jax.Array))  # fmt: skip
    # the gradient w.r.t. the array, through the jitted function taking the score
    grad = jax.grad(lambda a: jnp.sum(value(guided(a))))(1.0)
    cond, uncond = COND(0.5, X, 1), COND(0.5, X, GMM.null_label)
    np.testing.assert_allclose(grad, 0.5 * jnp.sum(cond - uncond), rtol=1e-6)


def test_batched_cfg_takes_float_null_args_and_names_a_shape_mismatch():
    """A float64 null embedding (np.load, a Python float) next to float32 args was
    rejected as 'not representable' (a check meant for integer labels); a scalar
    null next to vector args failed inside jnp.stack."""

    class Embedded(gd.AbstractScore):
        def __call__(self, t, x, args=None):
            return -x * (1.0 + jnp.sum(args))

    args = jnp.array([0.3, 0.7], jnp.float32)
    null = np.array([0.1, 0.2])  # float64, not exact in float32
    results = []
    for batched in (True, False):
        g = gd.guide(Embedded(), gd.cfg(2.0, null_args=null, batched=batched))
        results.append(
            jax.jit(lambda x, a, g=g: g(0.5, x, a))(X.astype(jnp.float32), args)
        )
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    g = gd.guide(Embedded(), gd.cfg(2.0, null_args=0.1))
    with pytest.raises(ValueError, match="null_args has shape"):
        jax.jit(lambda x, a: g(0.5, x, a))(X.astype(jnp.float32), args)
