"""Networks (guidediff._nn) and the Flax adapter (guidediff._flax)."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from guidediff._flax import LinenModel, flax_score
from guidediff._nn import CNNClassifier, MLPScoreNet, UNet, sinusoidal_embedding
from guidediff._score import AbstractScore, EpsScore, VScore, X0Score
from guidediff._sde import VPSDE


@jax.jit
def _perturb(variables, scale=0.1):
    """Deterministic non-zero weights everywhere (the output layers are
    zero-initialised); no RNG, so it compiles fast."""
    leaves, treedef = jax.tree.flatten(variables)
    leaves = [
        x
        + scale * jnp.sin(1.7 * jnp.arange(x.size) + i).reshape(x.shape).astype(x.dtype)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def mlp():
    net = MLPScoreNet(hidden=(32, 32), time_embed_dim=16, num_classes=3)
    init = jax.jit(lambda: _perturb(net.init(jr.key(0), 0.5, jnp.zeros(2), 0)))
    return net, init()


@pytest.fixture(scope="module")
def unet():
    net = UNet(features=(8, 16), time_embed_dim=16, num_classes=10)
    # jit: eager op-by-op initialisation of a conv net is slow on CPU.
    init = jax.jit(
        lambda: _perturb(net.init(jr.key(0), 0.5, jnp.zeros((8, 8)), 0), 0.05)
    )
    return net, init()


def test_sinusoidal_embedding():
    e = sinusoidal_embedding(0.0, 8)
    assert e.shape == (8,) and e.dtype == jnp.float32
    np.testing.assert_array_equal(e, jnp.concatenate([jnp.ones(4), jnp.zeros(4)]))
    e1, e2 = sinusoidal_embedding(0.3, 16), sinusoidal_embedding(0.31, 16)
    assert not np.allclose(e1, e2)
    # the formula away from t = 0 (where every frequency gives cos 1, sin 0):
    # [cos(w u), sin(w u)], w_i = 10^4^(-i / h), u = 1000 t
    w = 10_000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(sinusoidal_embedding(0.3, 8),
                               np.concatenate([np.cos(300 * w), np.sin(300 * w)]),
                               atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(0.0, 7)
    with pytest.raises(ValueError, match="scalar"):
        sinusoidal_embedding(jnp.zeros(3), 8)


@pytest.mark.parametrize("shape", [(2,), (3, 4)])
def test_mlp_shapes_and_dtypes(shape):
    net = MLPScoreNet(hidden=(16, 16), time_embed_dim=8)
    variables = net.init(jr.key(0), 0.5, jnp.zeros(shape))
    # float32 parameters even under jax_enable_x64 (see conftest.py).
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    for dtype in (jnp.float32, jnp.float64):
        out = net.apply(variables, 0.5, jnp.ones(shape, dtype))
        assert out.shape == shape and out.dtype == dtype
    with pytest.raises(TypeError, match="floating"):
        net.apply(variables, 0.5, jnp.ones(shape, jnp.int32))


def test_mlp_null_label(mlp):
    net, variables = mlp
    x = jnp.array([0.3, -0.7])
    emb = variables["params"]["_Conditioning_0"]["class_embed"]["embedding"]
    assert emb.shape[0] == 4  # 3 classes + the null label
    out_none = net.apply(variables, 0.4, x)
    out_null = net.apply(variables, 0.4, x, 3)
    np.testing.assert_array_equal(out_none, out_null)
    outs = [net.apply(variables, 0.4, x, c) for c in range(4)]
    for i in range(4):
        for j in range(i):
            assert not np.allclose(outs[i], outs[j])
    with pytest.raises(TypeError, match="integers"):
        net.apply(variables, 0.4, x, 1.0)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="out of range"):
            net.apply(variables, 0.4, x, bad)
    with pytest.raises(ValueError, match="one scalar label"):
        net.apply(variables, 0.4, x, jnp.array([0, 1]))


def test_a_conditional_network_without_args_warns_at_the_entry_points(mlp):
    """args=None is the null label for a class-conditional network: unconditional
    samples where the oracle's conditional score refuses None (a walkthrough found
    it silent). gd.sample and gd.log_likelihood warn at the user's line; the null
    label given explicitly, or an unconditional network, does not."""
    import guidediff as gd

    net, variables = mlp
    sde = VPSDE()
    score = flax_score(net, variables, sde)
    ts = gd.uniform_grid(sde.T, 1e-3, 2)
    with pytest.warns(UserWarning, match=r"args=None.*args=3 to ask") as rec:
        none = gd.sample(jr.key(0), sde, score, (2,), num_particles=2, ts=ts)
    assert rec[0].filename == __file__
    null = gd.sample(jr.key(0), sde, score, (2,), num_particles=2, ts=ts, args=3)
    np.testing.assert_array_equal(none.ys, null.ys)  # what the warning says
    with pytest.warns(UserWarning, match="class-conditional"):  # (once per check:
        # float32 points are a new signature for the check's memo)
        gd.log_likelihood(sde, score, jnp.zeros((1, 2), jnp.float32), max_steps=1)
    plain = MLPScoreNet(hidden=(8,))
    unconditional = flax_score(plain, plain.init(jr.key(0), 0.5, jnp.zeros(2)), sde)
    gd.sample(jr.key(0), sde, unconditional, (2,), num_particles=2, ts=ts)


def test_mlp_traced_out_of_range_label_is_nan(mlp):
    """Under jit a label outside 0..C gives NaN; negative labels used to wrap
    around (-1 gave the null label's output, -2 class C-1's)."""
    net, variables = mlp
    x = jnp.array([0.3, -0.7])
    labels = jnp.array([-4, -2, -1, 0, 2, 3, 4])
    out = jax.jit(jax.vmap(net.apply, (None, None, None, 0)))(variables, 0.4, x, labels)
    bad = (labels < 0) | (labels > 3)
    assert np.all(np.isnan(out[bad])) and np.all(np.isfinite(out[~bad]))
    np.testing.assert_allclose(out[~bad][-1], net.apply(variables, 0.4, x), rtol=1e-6)


def test_unconditional_net_ignores_labels():
    """An unconditional network gives the same output whatever label it is passed
    (classifier guidance passes the label to the score and to the classifier)."""
    net = MLPScoreNet(hidden=(8,), time_embed_dim=8)
    x = jnp.array([0.3, -0.7])
    variables = net.init(jr.key(0), 0.5, x)
    plain = net.apply(variables, 0.5, x, None)
    for label in (0, 99, jnp.array(1)):
        np.testing.assert_array_equal(net.apply(variables, 0.5, x, label), plain)
    np.testing.assert_array_equal(
        jax.jit(net.apply)(variables, 0.5, x, jnp.array(-1)), plain
    )


def test_mlp_vmap_equals_loop(mlp):
    net, variables = mlp
    xs = jr.normal(jr.key(2), (5, 2))
    ts = jnp.linspace(0.1, 0.9, 5)
    labels = jnp.array([0, 1, 2, 3, 1])
    batched = jax.vmap(net.apply, (None, 0, 0, 0))(variables, ts, xs, labels)
    looped = jnp.stack(
        [net.apply(variables, t, x, c) for t, x, c in zip(ts, xs, labels, strict=True)]
    )
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1), (28, 28), (28, 28, 1)])
def test_unet_shapes(unet, shape):
    net, variables = unet  # conv weights do not depend on the image size
    out = jax.eval_shape(net.apply, variables, 0.5, jnp.ones(shape), 3)
    assert out.shape == shape and out.dtype == jnp.float64
    out32 = jax.eval_shape(net.apply, variables, 0.5, jnp.ones(shape, jnp.float32), 3)
    assert out32.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


def test_unet_vmap_labels_and_errors(unet):
    net, variables = unet
    xs = jr.normal(jr.key(3), (3, 8, 8))
    labels = jnp.array([0, 5, 10])
    apply = jax.jit(net.apply)
    batched = jax.jit(jax.vmap(net.apply, (None, None, 0, 0)))(
        variables, 0.3, xs, labels
    )
    looped = jnp.stack(
        [apply(variables, 0.3, x, c) for x, c in zip(xs, labels, strict=True)]
    )
    np.testing.assert_allclose(batched, looped, rtol=1e-4, atol=1e-5)
    assert not np.allclose(looped[0], looped[1])
    assert not np.allclose(looped[1], looped[2])
    # (H, W) and (H, W, 1) are the same image.
    with_channel = jax.eval_shape(net.apply, variables, 0.3, xs[0][..., None], 0)
    assert with_channel.shape == (8, 8, 1)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(net.apply, variables, 0.3, jnp.zeros((7, 7)), 0)
    with pytest.raises(ValueError, match="vmap over a batch"):
        jax.eval_shape(net.apply, variables, 0.3, jnp.zeros((2, 8, 8, 1)), 0)


def test_unet_traced_out_of_range_label_is_nan(unet):
    net, variables = unet
    x = jnp.linspace(-1, 1, 64).reshape(8, 8)
    labels = jnp.array([-1, 10, 11])
    out = jax.jit(jax.vmap(net.apply, (None, None, None, 0)))(variables, 0.4, x, labels)
    assert np.all(np.isnan(out[0])) and np.all(np.isnan(out[2]))
    assert np.all(np.isfinite(out[1]))


@pytest.mark.parametrize("time_conditioned", [False, True])
def test_cnn_classifier(time_conditioned):
    clf = CNNClassifier(
        num_classes=10, features=(8, 16), time_conditioned=time_conditioned
    )
    x = jr.normal(jr.key(2), (8, 8))

    @jax.jit  # one compilation: init, perturb and two evaluations
    def run(x):
        variables = _perturb(clf.init(jr.key(0), 0.5, jnp.zeros((8, 8))))
        return variables, clf.apply(variables, 0.5, x), clf.apply(variables, 0.9, x)

    variables, logits, other_t = run(x)
    assert logits.shape == (10,) and logits.dtype == jnp.float64
    assert np.allclose(logits, other_t) != time_conditioned
    if time_conditioned:
        with pytest.raises(ValueError, match="needs a time"):
            jax.eval_shape(clf.apply, variables, None, x)
    else:
        assert jax.eval_shape(clf.apply, variables, None, x).shape == (10,)


# ---------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------


def test_linen_model_is_a_pytree(mlp):
    net, variables = mlp
    model = LinenModel(variables, net)
    assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(variables))
    x = jnp.array([0.1, 0.2])
    np.testing.assert_array_equal(model(0.5, x, 1), net.apply(variables, 0.5, x, 1))
    # A bare apply function works too.
    model2 = LinenModel(variables, net.apply)
    np.testing.assert_array_equal(model2(0.5, x, 1), model(0.5, x, 1))
    with pytest.raises(TypeError, match="apply function"):
        LinenModel(variables, 3)


def test_flax_score_parametrisations(mlp):
    net, variables = mlp
    sde = VPSDE()
    t, x = 0.4, jnp.array([0.5, -1.0])
    alpha, sigma = sde.marginal(t)
    out = net.apply(variables, t, x, 2)
    eps_score = flax_score(net, variables, sde)
    assert isinstance(eps_score, EpsScore)
    np.testing.assert_allclose(eps_score(t, x, 2), -out / sigma, rtol=1e-12)
    x0_score = flax_score(net, variables, sde, prediction="x0")
    assert isinstance(x0_score, X0Score)
    np.testing.assert_allclose(
        x0_score(t, x, 2), (alpha * out - x) / sigma**2, rtol=1e-12
    )
    v_score = flax_score(net, variables, sde, prediction="v")
    assert isinstance(v_score, VScore)
    np.testing.assert_allclose(  # alpha^2 + sigma^2 = 1 on the VP SDE
        v_score(t, x, 2), -(sigma * x + alpha * out) / sigma, rtol=1e-12
    )
    direct = flax_score(net, variables, sde, prediction="score")
    assert isinstance(direct, AbstractScore)
    np.testing.assert_array_equal(direct(t, x, 2), out)
    with pytest.raises(ValueError, match="prediction must be 'eps', 'x0', 'v' or"):
        flax_score(net, variables, sde, prediction="velocity")


def test_flax_score_grad_wrt_variables(mlp):
    """jax.grad reaches the variables through the score, and agrees with the
    gradient of the same function written directly on net.apply."""
    net, variables = mlp
    sde = VPSDE()
    xs = jr.normal(jr.key(4), (6, 2))
    ts = jnp.linspace(0.1, 1.0, 6)

    def via_score(v):
        score = flax_score(net, v, sde)
        return jnp.sum(jax.vmap(score, (0, 0, None))(ts, xs, 1) ** 2)

    def direct(v):
        sig = jax.vmap(lambda t: sde.marginal(t)[1])(ts)
        eps = jax.vmap(net.apply, (None, 0, 0, None))(v, ts, xs, 1)
        return jnp.sum((eps / sig[:, None]) ** 2)

    g1 = jax.grad(via_score)(variables)
    g2 = jax.grad(direct)(variables)
    assert jax.tree.structure(g1) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(g1)) > 0
    # eqx.filter_grad with respect to the score module itself.
    score = flax_score(net, variables, sde)
    g3 = eqx.filter_grad(lambda s: jnp.sum(jax.vmap(s, (0, 0, None))(ts, xs, 1) ** 2))(
        score
    )
    for a, b in zip(
        jax.tree.leaves(g3.model.variables), jax.tree.leaves(g1), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_flax_score_no_retrace_on_new_variables(mlp):
    net, variables = mlp
    sde = VPSDE()

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def evaluate(score, x):
        return score(0.5, x, 0)

    x = jnp.array([0.1, 0.2])
    a = evaluate(flax_score(net, variables, sde), x)
    b = evaluate(flax_score(net, _perturb(variables, 0.2), sde), x)
    assert not np.allclose(a, b)


def _rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("which", ["mlp", "unet", "cnn"])
def test_bfloat16_mixed_precision(mlp, unet, which):
    """`dtype=jnp.bfloat16` computes in bfloat16 on the same float32 parameters:
    outputs within bfloat16 rounding of the float32 network's, in `x`'s dtype."""
    if which == "cnn":
        net = CNNClassifier(num_classes=4, features=(8, 16), time_conditioned=True)
        x, call = jnp.linspace(-1, 1, 64).reshape(8, 8), (0.4,)
        variables = jax.jit(lambda: _perturb(net.init(jr.key(0), 0.4, x), 0.05))()
        inputs = (*call, x)
    else:
        net, variables = mlp if which == "mlp" else unet
        x = jnp.linspace(-1, 1, 2 if which == "mlp" else 64)
        x = x if which == "mlp" else x.reshape(8, 8)
        inputs = (0.4, x, 1)
    half = net.clone(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: half.init(jr.key(0), *inputs))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))
    full_out = jax.jit(net.apply)(variables, *inputs)
    half_out = jax.jit(half.apply)(variables, *inputs)
    assert half_out.dtype == full_out.dtype == x.dtype
    assert 0 < _rel_l2(half_out, full_out) < 3e-2
    assert "bf16" in str(jax.make_jaxpr(half.apply)(variables, *inputs))


def test_bfloat16_mlp_with_variables_cast_once_samples_the_same(mlp):
    """The docstring's advice for `MLPScoreNet(dtype=bfloat16)`: variables cast to
    bfloat16 before sampling give the samples of float32 variables (every layer
    rounds its weights to bfloat16 either way), and the step loop then converts no
    weight (no float32 -> bfloat16 convert of a weight-sized array in the scan)."""
    import diffrax as dfx

    import guidediff as gd

    net, variables = mlp
    half = net.clone(dtype=jnp.bfloat16)
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)
    sde = VPSDE()
    ts = gd.uniform_grid(1.0, 1e-3, 6)

    def run(v):
        score = flax_score(half, v, sde)
        return gd.sample(
            jr.key(0),
            sde,
            score,
            (2,),
            num_particles=16,
            args=1,
            ts=ts,
            solver=dfx.Euler(),
            dtype=jnp.float32,
        ).ys

    a, b = jax.jit(run)(variables), jax.jit(run)(cast)
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

    def weight_converts(v):
        text = str(jax.make_jaxpr(run)(v))
        body = text[text.index("scan[") :]
        return body.count("convert_element_type[new_dtype=bfloat16")

    assert weight_converts(cast) < weight_converts(variables)


def test_unet_wiring():
    """The UNet's wiring, which shapes and label tests cannot see: every residual
    block receives the conditioning vector, each up-path block's input ends with the
    skip from the down block at its level, and a residual block whose last
    convolution is zero returns its input. Recorded with flax's intercept_methods."""
    import flax.linen as nn

    from guidediff._nn import _Conditioning, _ResBlock

    net = UNet(features=(8, 16), time_embed_dim=8, num_classes=3)
    x = jr.normal(jr.key(1), (8, 8))
    v = net.init(jr.key(0), 0.4, x, 1)
    v = jax.tree.map(lambda a: a + 0.1 * jr.normal(jr.key(2), a.shape), v)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(
            context.module, _ResBlock | _Conditioning
        ):
            calls.append((type(context.module).__name__, args, out))
        return out

    with nn.intercept_methods(record):
        net.apply(v, 0.4, x, 1)
    (cond,) = [out for name, _, out in calls if name == "_Conditioning"]
    blocks = [(args, out) for name, args, out in calls if name == "_ResBlock"]
    assert len(blocks) == 5  # down x 2, middle, up x 2
    for args, _ in blocks:
        np.testing.assert_array_equal(args[1], cond)
    down0, down1, _, up1, up0 = blocks
    np.testing.assert_array_equal(up1[0][0][..., -16:], down1[1])
    np.testing.assert_array_equal(up0[0][0][..., -8:], down0[1])
    block = _ResBlock(8)
    h = jr.normal(jr.key(3), (1, 4, 4, 8))
    bv = block.init(jr.key(4), h, jnp.ones(8))
    bv = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "Conv_1" in jax.tree_util.keystr(p) else a, bv
    )
    np.testing.assert_allclose(block.apply(bv, h, jnp.ones(8)), h, atol=1e-6)


def test_flax_nnx_network_reads_as_a_score():
    """A Flax NNX network holds its parameters and is a pytree: `flax_score(model,
    None, sde)` and `EpsScore(model, sde)` (X0Score, VScore) read it, `jax.grad`
    reaches its parameters, and sampling it twice compiles once. They were refused
    ("needs its variables"), and `flax_score` then failed inside the call."""
    from flax import nnx

    import guidediff as gd
    from guidediff._sample import _sample_jit

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, t, x, args):
            return self.lin(x) + t

    sde = VPSDE()
    model = Net(nnx.Rngs(0))
    t, x = 0.4, jnp.array([0.5, -1.0])
    alpha, sigma = sde.marginal(t)
    out = model(t, x, None)
    for prediction, cls, want in (
        ("eps", EpsScore, -out / sigma),
        ("x0", X0Score, (alpha * out - x) / sigma**2),
        ("v", VScore, -(sigma * x + alpha * out) / sigma),
    ):
        score = flax_score(model, None, sde, prediction=prediction)
        assert isinstance(score, cls) and score.model is model
        np.testing.assert_allclose(score(t, x, None), want, rtol=1e-12)
        np.testing.assert_allclose(cls(model, sde)(t, x, None), want, rtol=1e-12)
    direct = flax_score(model, None, sde, prediction="score")
    np.testing.assert_array_equal(direct(t, x, None), out)
    # d sum(s) / dW = -(1 / sigma) 1 x^T for s = -(W x + b + t) / sigma (nnx: x @ W)
    score = flax_score(model, None, sde)
    grads = eqx.filter_grad(lambda s: jnp.sum(s(t, x, None)))(score)
    np.testing.assert_allclose(
        grads.model.lin.kernel[...], -np.outer(x, np.ones(2)) / sigma, rtol=1e-6
    )  # float32 parameters
    kw = dict(num_particles=4, ts=gd.uniform_grid(1.0, 1e-3, 4))
    first = gd.sample(jr.key(0), sde, score, (2,), **kw)
    before = _sample_jit._cached._cache_size()
    again = gd.sample(jr.key(0), sde, flax_score(model, None, sde), (2,), **kw)
    assert _sample_jit._cached._cache_size() == before
    np.testing.assert_array_equal(again.ys, first.ys)
    assert not first.failed.any()


def test_flax_nnx_network_mistakes_get_the_recipe():
    from flax import nnx

    import guidediff as gd
    from guidediff._losses import dsm_loss

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, t, x, args):
            return self.lin(x)

    sde, model = VPSDE(), Net(nnx.Rngs(0))
    with pytest.raises(TypeError, match="holds its own parameters: pass variables"):
        flax_score(model, nnx.state(model), sde)
    with pytest.raises(TypeError, match="pass the module itself"):
        EpsScore(model.__call__, sde)
    for bad in (
        lambda: gd.ScoreFn(model),
        lambda: gd.guide(model, gd.cfg(1.0, null_args=0)),
        lambda: gd.sample(jr.key(0), sde, model, (2,)),
    ):
        with pytest.raises(TypeError, match="Flax NNX network holds its parameters"):
            bad()
    with pytest.raises(TypeError, match="LinenModel is for Flax Linen"):
        LinenModel({}, model)
    x0 = jnp.ones((4, 2))
    with pytest.raises(TypeError, match="nnx.split"):
        dsm_loss(model, None, jr.key(0), x0, sde)
    # the recipe the message gives works, and its gradient reaches the parameters
    graphdef, params = nnx.split(model)
    fn = lambda p, t, x, c: nnx.merge(graphdef, p)(t, x, c)
    grads = jax.grad(lambda p: dsm_loss(fn, p, jr.key(0), x0, sde))(params)
    assert np.all(np.isfinite(grads["lin"]["kernel"][...]))
    # a Linen network without its variables
    with pytest.raises(TypeError, match="variables is None"):
        flax_score(MLPScoreNet(), None, sde)


_GMM = None  # the mixture behind _ExactLogits (a global: Linen fields are hashed)


class _ExactLogits(nn.Module):
    """The exact noisy classifier's log-probabilities as logits (no parameters)."""

    @nn.compact
    def __call__(self, t, x):
        gmm, sde = _GMM
        return jnp.stack([gmm.log_classifier_t(sde, t, x, c) for c in range(3)])


def test_flax_classifier_with_the_exact_logits_gives_the_conditional_score():
    """Bayes: the unconditional score plus the gradient of log p_t(c | x) read by
    `gd.flax_classifier` from exact logits is the conditional score; with a
    temperature, the log-softmax of logits / tau."""
    global _GMM
    import guidediff as gd

    sde = VPSDE()
    gmm = gd.GaussianMixture([0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]],
                             [0.5, 0.3, 0.4], labels=[0, 1, 2])  # fmt: skip
    _GMM = (gmm, sde)
    clf = _ExactLogits()
    log_p = gd.flax_classifier(clf, {})
    guided = gd.guide(gmm.score(sde), gd.classifier_guidance(log_p, 1.0))
    cond = gmm.conditional_score(sde)
    xs = jr.normal(jr.key(0), (5, 2)) * 2
    for t in (0.1, 0.5, 0.9):
        for c in range(3):
            np.testing.assert_allclose(
                jax.vmap(lambda x: guided(t, x, c))(xs),
                jax.vmap(lambda x: cond(t, x, c))(xs), rtol=1e-9, atol=1e-9,
            )  # fmt: skip
    hot = gd.flax_classifier(clf, {}, temperature=2.0)
    x = xs[0]
    want = jax.nn.log_softmax(clf.apply({}, 0.5, x) / 2.0)
    for c in range(3):
        np.testing.assert_allclose(hot(0.5, x, c), want[c], rtol=1e-12)
    # a traced label out of range is NaN (the particle fails), never clamped: the
    # value and its gradient, the only part classifier guidance uses (a jnp.where
    # gave it a zero gradient: unguided samples, none failed)
    grad = jax.jit(jax.grad(lambda x, c: log_p(0.5, x, c)))
    for c in (3, -1):
        assert np.isnan(jax.jit(lambda c: log_p(0.5, x, c))(c))
        assert np.all(np.isnan(grad(x, c)))
    np.testing.assert_allclose(jax.jit(lambda c: log_p(0.5, x, c))(2), log_p(0.5, x, 2))
    np.testing.assert_allclose(grad(x, 2), jax.grad(lambda x: log_p(0.5, x, 2))(x))
    out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=3, args=3,
                    ts=gd.uniform_grid(1.0, 1e-3, 3))  # fmt: skip
    assert out.failed.all()


def test_flax_classifier_checks_and_network_mistakes(mlp):
    from flax import nnx

    import guidediff as gd

    clf = CNNClassifier(num_classes=3, features=(4,))
    variables = {"params": {}}  # not run: the checks come first
    with pytest.raises(TypeError, match="variables is None"):
        gd.flax_classifier(clf, None)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            gd.flax_classifier(clf, variables, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        gd.flax_classifier(clf, variables, temperature="2")

    class Lin(nnx.Module):  # logits from an NNX network
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, t, x):
            return self.lin(x) * (1 + t)

    lin = Lin(nnx.Rngs(0))
    with pytest.raises(TypeError, match="pass variables=None"):
        gd.flax_classifier(lin, nnx.state(lin))
    log_p = gd.flax_classifier(lin, None)
    x = jnp.array([0.5, -1.0])
    want = jax.nn.log_softmax(lin(0.3, x))
    np.testing.assert_allclose(log_p(0.3, x, 1), want[1], rtol=1e-6)
    grads = eqx.filter_grad(lambda f: f(0.3, x, 1))(log_p)
    assert np.any(grads.logits.lin.kernel[...] != 0)
    with pytest.raises(ValueError, match="unknown class label 3"):
        log_p(0.3, x, 3)
    with pytest.raises(TypeError, match="one integer class label, got float"):
        log_p(0.3, x, 1.0)
    with pytest.raises(TypeError, match="needs the class c"):
        log_p(0.3, x, None)
    batched = gd.flax_classifier(lambda v, t, x: lin(t, x)[None], {})
    with pytest.raises(ValueError, match=r"returned shape \(1, 3\)"):
        batched(0.3, x, 1)
    # a Linen network without its variables where a log-likelihood or a reward
    # function is expected; one that holds them (bound, or a LinenModel) passes
    net, nv = mlp
    for bad in (net, net.apply, net.__call__):
        with pytest.raises(TypeError, match="gd.flax_classifier"):
            gd.classifier_guidance(bad, 1.0)
        with pytest.raises(TypeError, match="reward as a function of one particle"):
            gd.gradient_guidance(bad, 1.0, VPSDE())
    for good in (net.bind(nv), LinenModel(nv, net)):
        gd.classifier_guidance(good, 1.0)
        gd.gradient_guidance(good, 1.0, VPSDE())


class _NamedNet(nn.Module):  # submodules with explicit names (not Dense_0)
    def setup(self):
        self.time_embed = nn.Dense(4)
        self.out = nn.Dense(2)

    def __call__(self, t, x, label=None):
        return self.out(jnp.concatenate([x, self.time_embed(jnp.atleast_1d(t))]))


def test_params_alone_of_a_network_with_named_submodules_get_the_fix():
    """`variables['params']` of a network whose submodules have names of their own
    passed the construction check (it knows Flax's automatic names) and failed with
    Flax's ScopeCollectionNotFound when called; the call now says what to pass."""
    import guidediff as gd

    net, sde = _NamedNet(), VPSDE()
    variables = net.init(jr.key(0), 0.5, jnp.zeros(2))
    score = flax_score(net, variables["params"], sde)
    with pytest.raises(TypeError, match="no 'params' collection.*time_embed"):
        score(0.5, jnp.zeros(2))
    with pytest.raises(ValueError, match="not variables\\['params'\\]"):
        gd.sample(jr.key(0), sde, score, (2,), num_particles=2,
                  ts=gd.uniform_grid(1.0, 1e-3, 3))  # fmt: skip
    flax_score(net, variables, sde)(0.5, jnp.zeros(2))  # the whole dict works


class _TinyLogits(nn.Module):
    @nn.compact
    def __call__(self, t, x):
        return nn.Dense(2)(jnp.append(x, t))


class _Batched(nn.Module):  # written for a batch: x (B, d), t (B,)
    @nn.compact
    def __call__(self, t, x, label=None):
        h = jnp.concatenate([x, t[:, None]], axis=1)
        return nn.Dense(x.shape[1])(h)


def test_an_equal_linen_network_built_anew_does_not_compile_again():
    """`flax_score` / `flax_classifier` held `net.apply`, a bound method, which
    compares by the module's identity: an equal network built anew per call (a
    module defined inside a loop) compiled `gd.sample` again every call. The
    docstring's recipe for a network written for a batch works with a Python
    float time too (`t[None]` did not)."""
    import guidediff as gd
    from guidediff._sample import _sample_jit

    sde = VPSDE()
    variables = _Batched().init(jr.key(0), jnp.zeros(1), jnp.zeros((1, 2)))
    recipe = lambda v, t, x, a: _Batched().apply(v, jnp.reshape(t, (1,)), x[None])[0]
    score = flax_score(recipe, variables, sde)
    x = jnp.array([0.5, -1.0])
    want = -_Batched().apply(variables, jnp.full((1,), 0.3), x[None])[0]
    np.testing.assert_allclose(score(0.3, x), want / sde.marginal(0.3)[1])

    clf_vars = _TinyLogits().init(jr.key(1), 0.5, jnp.zeros(2))
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 3), args=1)
    sizes = []
    for _ in range(3):
        net = MLPScoreNet(hidden=(8,), time_embed_dim=4)  # equal, built anew
        s = flax_score(net, net.init(jr.key(0), 0.5, jnp.zeros(2)), sde)
        clf = gd.flax_classifier(_TinyLogits(), clf_vars)  # built anew
        guided = gd.guide(s, gd.classifier_guidance(clf, 1.0))
        gd.sample(jr.key(0), sde, guided, (2,), **kw)
        sizes.append(_sample_jit._cached._cache_size())
    assert sizes[1:] == sizes[:1] * 2


def test_an_nnx_network_that_is_not_a_pytree_is_refused():
    """`nnx.Module` subclasses declared `pytree=False` are one leaf for JAX: read
    directly, jax.grad missed their parameters and each instance compiled anew."""
    from flax import nnx

    import guidediff as gd

    class Net(nnx.Module, pytree=False):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, t, x, args=None):
            return self.lin(x)

    model, sde = Net(nnx.Rngs(0)), VPSDE()
    for build in (
        lambda: flax_score(model, None, sde),
        lambda: EpsScore(model, sde),
        lambda: gd.flax_classifier(model, None),
    ):
        with pytest.raises(TypeError, match="not a pytree .*nnx.split"):
            build()


class _WithArrayField(nn.Module):  # an array field: == is elementwise, no hash
    shift: np.ndarray

    @nn.compact
    def __call__(self, t, x, label=None):
        return nn.Dense(2)(x) + self.shift


def test_linen_network_with_an_array_field_built_anew_and_its_apply_jitted():
    """The module-value comparison of `net.apply` broke two things that worked with
    the bound method: a module with an array field, built anew per call, failed in
    gd.sample's cache lookup (its == is elementwise); and `jax.jit` of the held
    `apply_fn` failed (no weak references), then crashed the process when retried.
    Such a module now falls back to identity (each instance compiles, as before)."""
    import guidediff as gd

    sde = VPSDE()
    variables = _WithArrayField(np.zeros(2)).init(jr.key(0), 0.5, jnp.zeros(2))
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 3))
    outs = [
        gd.sample(
            jr.key(0),
            sde,
            flax_score(_WithArrayField(np.zeros(2)), variables, sde),
            (2,),
            **kw,
        ).ys  # fmt: skip
        for _ in range(2)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    net = MLPScoreNet(hidden=(8,), time_embed_dim=4)
    score = flax_score(net, net.init(jr.key(0), 0.5, jnp.zeros(2)), sde)
    apply = score.model.apply_fn
    for _ in range(2):  # the second jit crashed the interpreter
        out = jax.jit(apply)(score.model.variables, 0.5, jnp.ones(2), None)
        np.testing.assert_allclose(
            out, apply(score.model.variables, 0.5, jnp.ones(2), None)
        )
    jax.eval_shape(apply, score.model.variables, 0.5, jnp.ones(2), None)


def test_classifier_guidance_names_a_log_likelihood_that_is_not_one_number(mlp):
    """A bound classifier returning logits (accepted: it holds its variables) failed
    inside jax.grad ("Gradient only defined for scalar-output functions")."""
    from flax import nnx

    import guidediff as gd

    class Logits(nn.Module):  # (t, x, c) -> (2,) logits, not log p(c | x)
        @nn.compact
        def __call__(self, t, x, c):
            return nn.Dense(2)(x)

    sde, clf = VPSDE(), Logits()
    bound = clf.bind(clf.init(jr.key(1), 0.5, jnp.zeros(2), 0))
    guided = gd.guide(gd.Gaussian(jnp.zeros(2), 1.0).score(sde),
                      gd.classifier_guidance(bound, 1.0))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"one number .* got shape \(2,\).*flax_classifier"
    ):
        guided(0.5, jnp.ones(2), 1)

    class NotPytree(nnx.Module, pytree=False):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, t, x):
            return self.lin(x)

    with pytest.raises(TypeError, match=r"read gd.flax_classifier\(lambda s, t, x:"):
        gd.flax_classifier(NotPytree(nnx.Rngs(0)), None)


def test_module_apply_is_equal_only_where_hashes_agree():
    """`_Apply` compares modules by value only where both hash: a list field (no
    hash) equal by value to another's, or a 0-d array equal to an int, compared
    equal with different hashes, and an equal module that computes differently
    (a float64 array field against a Python float) reused another's program."""
    from guidediff._flax import _Apply

    a, b = _Apply(_WithArrayField(np.zeros(2))), _Apply(_WithArrayField(np.zeros(2)))
    assert a == a and a != b and hash(a) == hash(a)
    m1 = MLPScoreNet(hidden=(8,), time_embed_dim=4)
    m2 = MLPScoreNet(hidden=(8,), time_embed_dim=4)
    assert _Apply(m1) == _Apply(m2) and hash(_Apply(m1)) == hash(_Apply(m2))
    assert _Apply(m1) != _Apply(MLPScoreNet(hidden=(16,), time_embed_dim=4))
    listed = [_Apply(_WithArrayField([1.0, 2.0])), _Apply(_WithArrayField([1.0, 2.0]))]
    assert listed[0] != listed[1]  # unhashable: by identity


def test_network_adapters_name_their_misuse():
    """(A networks audit.) Each got a raw Flax / Python error, a silent wrong
    reading, or a needless recompile before."""
    import collections

    import guidediff as gd

    sde = VPSDE()
    ts = gd.uniform_grid(1.0, 1e-3, 4)
    net = MLPScoreNet(hidden=[8], time_embed_dim=4)  # a list: kept as a tuple
    assert net.hidden == (8,) and hash(net) == hash(MLPScoreNet((8,), 4))
    v = net.init(jr.key(0), 0.5, jnp.zeros(2))
    score = flax_score(net, v, sde)
    with pytest.raises(ValueError, match="a score takes ONE particle"):
        score(0.5, jnp.ones((4, 2)))  # a batch
    other = flax_score(MLPScoreNet(hidden=(16,), time_embed_dim=4), v, sde)
    with pytest.raises(ValueError, match="made by another network"):
        gd.sample(jr.key(0), sde, other, (2,), num_particles=2, ts=ts)
    fake_fit = collections.namedtuple("FitResult", "params ema_params opt_state")
    with pytest.raises(TypeError, match="gd.FitResult"):
        gd.flax_classifier(CNNClassifier(num_classes=3), fake_fit(v, v, None))
    with pytest.raises(TypeError, match="wrap it with gd.flax_score"):
        gd.flax_classifier(net, v)  # its eps would be read as 2 logits
    with pytest.raises(TypeError, match="wrap it with gd.flax_classifier"):
        flax_score(CNNClassifier(num_classes=3), v, sde)

    class Logits(MLPScoreNet):  # a subclass with its own __call__: the user's
        @nn.compact
        def __call__(self, t, x, label=None):
            return nn.Dense(3)(super().__call__(t, x, label))

    logits = Logits(hidden=(8,), time_embed_dim=4)
    gd.flax_classifier(logits, logits.init(jr.key(0), 0.5, jnp.zeros(2)))
    assert gd.count_params([1.0, 2.0]) == 2
    with pytest.raises(TypeError, match="takes the variables, not the network"):
        gd.count_params(net)
    # a network returning (out, aux)
    pair = LinenModel(v, lambda variables, t, x, args: (x, x))
    with pytest.raises(ValueError, match="prediction is a tuple, not an array"):
        gd.sample(jr.key(0), sde, EpsScore(pair, sde), (2,), num_particles=2, ts=ts)


def test_eps_predictions_take_the_particles_dtype():
    """Under x64 a float32 network on float64 particles: the eps reading kept the
    network's float32 (refused by gd.sample), the x0 and v readings gave float64."""
    import guidediff as gd

    sde = VPSDE()
    x32 = lambda variables, t, x, args: x.astype(jnp.float32)
    x = jnp.array([0.3, -0.2])  # float64 (the tests run with x64)
    for cls in (EpsScore, X0Score, VScore):
        s = cls(LinenModel({}, x32), sde)
        assert s(0.5, x).dtype == jnp.float64, cls
        out = gd.sample(jr.key(0), sde, s, (2,), num_particles=2,
                        ts=gd.uniform_grid(1.0, 1e-3, 4))  # fmt: skip
        assert out.ys.dtype == jnp.float64 and int(out.num_failed) == 0, cls
    assert gd.score_to_eps(sde, 0.5, x, x.astype(jnp.float32)).dtype == jnp.float64


def test_an_nnx_module_in_training_mode_is_named():
    from flax import nnx

    import guidediff as gd

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, t, x, args=None):
            return self.drop(self.lin(x))

    sde, model = VPSDE(), Net(nnx.Rngs(0))
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 4))
    with pytest.raises(ValueError, match=r"call model.eval\(\)"):
        gd.sample(jr.key(0), sde, flax_score(model, None, sde), (2,), **kw)
    model.eval()
    assert (
        int(
            gd.sample(
                jr.key(0), sde, flax_score(model, None, sde), (2,), **kw
            ).num_failed
        )
        == 0
    )
