"""Regressions from an audit of the API under JAX transformations (jit, vmap, grad,
jvp): each test failed before its fix."""

import jax


jax.config.update("jax_enable_x64", True)

import diffrax as dfx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import guidediff as gd  # noqa: E402


SDE = gd.VPSDE()
MEANS = jnp.array([[-2.0, 0.0], [2.0, 0.0]])
TS = gd.uniform_grid(1.0, 1e-3, 4)


def _fd(f, x, eps=1e-6):
    x = jnp.asarray(x, jnp.float64)
    return jnp.array(
        [
            (f(x.at[i].add(eps)) - f(x.at[i].add(-eps))) / (2 * eps)
            for i in range(x.size)
        ]
    )


def test_mixture_built_and_tilted_inside_jit():
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)

    @jax.jit
    def f(m):
        gmm = gd.GaussianMixture([0.5, 0.5], m, [0.5, 0.5])
        return gmm.tilt(reward).log_prob(jnp.zeros(2)), gd.Gaussian(m[0], 1.0).log_prob(
            m[1]
        )

    got = f(MEANS)
    eager = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5]).tilt(reward)
    np.testing.assert_allclose(got[0], eager.log_prob(jnp.zeros(2)), rtol=1e-12)
    with pytest.raises(ValueError, match="need num_classes"):
        jax.jit(lambda lab: gd.GaussianMixture([0.5, 0.5], MEANS, [1.0, 1.0], lab).dim)(
            jnp.array([0, 1])
        )


def test_mixture_gradients_at_repeated_eigenvalues_are_finite_and_right():
    x = jnp.array([1.0, 0.5])

    def f(c):
        return gd.GaussianMixture([0.5, 0.5], MEANS, c).score(SDE)(0.5, x).sum()

    c0 = jnp.array([0.5, 0.7])  # isotropic: repeated eigenvalues
    np.testing.assert_allclose(jax.grad(f)(c0), _fd(f, c0), rtol=1e-6, atol=1e-9)
    gmm = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5])

    def g(width):
        tilted = gmm.tilt(gd.GaussianBumpReward([1.0, 1.0], width[0]))
        return tilted.score(SDE)(0.5, x).sum()

    w = jnp.array([1.0])
    np.testing.assert_allclose(jax.grad(g)(w), _fd(g, w), rtol=1e-6, atol=1e-9)


def test_tilt_keeps_the_exact_tilted_law():
    """The tilt now reuses the eigenbasis: its density must still be p(x) r(x) / Z."""
    gmm = gd.GaussianMixture([0.3, 0.7], MEANS, [[0.5, 0.2], [0.3, 0.9]])
    for reward in (
        gd.GaussianBumpReward([1.0, 0.5], 0.8),
        gd.ExpLinearReward([0.4, -0.3]),
    ):
        tilted = gmm.tilt(reward)
        xs = jr.normal(jr.key(0), (5, 2))
        lhs = jax.vmap(tilted.log_prob)(xs)
        rhs = jax.vmap(lambda x: gmm.log_prob(x) + reward.log(x))(xs) - jnp.log(
            reward.expectation(gmm)
        )
        np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_logsnr_grid_under_jit_and_grad():
    grid = jax.jit(lambda: gd.logsnr_grid(SDE, 1.0, 1e-3, 5))()
    np.testing.assert_allclose(grid, gd.logsnr_grid(SDE, 1.0, 1e-3, 5), rtol=1e-12)

    # the grid moves with the schedule and the ends: the bisection alone had zero
    # derivative (gradients through samples on this grid were wrong by up to 3x)
    grids = {
        "beta_max": lambda b: gd.logsnr_grid(
            gd.VPSDE(gd.LinearBeta(0.1, b)), 1.0, 1e-3, 5
        ),
        "sigma_max": lambda s: gd.logsnr_grid(gd.VESDE(sigma_max=s), 1.0, 1e-3, 5),
        "t_end": lambda e: gd.logsnr_grid(SDE, 1.0, e, 5),
    }
    for name, x in (("beta_max", 20.0), ("sigma_max", 50.0), ("t_end", 1e-3)):
        grid, h = grids[name], 1e-6 * x
        jac = jax.jacfwd(grid)(x)
        fd = (grid(x + h) - grid(x - h)) / (2 * h)
        assert np.abs(fd[1:-1]).max() > 1e-4, name  # the interior times move
        np.testing.assert_allclose(jac, fd, rtol=1e-5, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(
            jax.grad(lambda v: grid(v)[2])(x), jac[2], rtol=1e-12
        )


def test_forward_mode_through_runge_kutta_steps():
    gmm = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5])
    s_r = gmm.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0)).score(SDE)

    def f(w):
        g = gd.guide(gmm.score(SDE), gd.reward_guidance(s_r, w))
        out = gd.sample(jr.key(0), SDE, g, (2,), num_particles=2, ts=TS, process="ode")
        return out.ys.sum()

    rev = jax.grad(f)(0.5)
    fwd = jax.jvp(f, (0.5,), (1.0,))[1]
    np.testing.assert_allclose(fwd, rev, rtol=1e-9)
    np.testing.assert_allclose(rev, (f(0.5 + 1e-6) - f(0.5 - 1e-6)) / 2e-6, rtol=1e-5)


def test_loss_hyperparameters_can_be_traced():
    r = jnp.array([0.1, 0.5, 0.9])
    grad_t = jax.grad(lambda t: gd.reward_weights(r, temperature=t)[0])(0.5)
    assert np.isfinite(grad_t)
    labels = jax.jit(lambda p: gd.drop_labels(jr.key(0), jnp.array([0, 1]), 2, p))(0.0)
    np.testing.assert_array_equal(labels, [0, 1])
    x0 = jnp.ones((4, 2))

    def model(params, t, x, args):
        return params * x

    loss = jax.jit(lambda tm: gd.dsm_loss(model, 0.5, jr.key(0), x0, SDE, t_min=tm))(
        1e-3
    )
    assert np.isfinite(loss)


def test_shape_check_memo_does_not_skip_a_failing_label_check():
    good = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5], labels=[0, 1])
    bad = gd.GaussianMixture(
        [0.5, 0.5], MEANS, [0.5, 0.5], labels=[0, 0], num_classes=2
    )
    kw = dict(num_particles=2, args=1, ts=TS)
    gd.sample(jr.key(0), SDE, good.conditional_score(SDE), (2,), **kw)
    with pytest.raises(ValueError, match="no component"):
        gd.sample(jr.key(0), SDE, bad.conditional_score(SDE), (2,), **kw)


def test_guidance_norms_gradient_is_finite_where_the_term_vanishes():
    gmm = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5])
    ys = jnp.zeros((3, 2, 2))  # x = 0: conditional == unconditional for this mixture
    ts = jnp.array([0.5, 0.1])

    def f(w):
        guided = gd.guide(
            gmm.conditional_score(SDE), gd.cfg(w, null_args=gmm.null_label)
        )
        return gd.guidance_norms(guided, ts, ys, args=1)[0].sum()

    assert np.isfinite(jax.grad(f)(2.0))


def test_smc_twist_is_traced_not_static():
    gmm = gd.GaussianMixture([0.5, 0.5], MEANS, [0.5, 0.5])
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    from guidediff import _smc

    def run(twist):
        return gd.smc_sample(
            jr.key(0),
            SDE,
            gmm.score(SDE),
            (2,),
            reward.log,
            num_particles=8,
            ts=TS,
            twist=twist,
            solver=dfx.Euler(),
        )

    run(0.5)
    before = _smc._smc_sample_jit._cached._cache_size()
    for twist in (1.0, 2.0):
        run(twist)
    assert _smc._smc_sample_jit._cached._cache_size() == before
    jitted = jax.jit(lambda tw: run(tw).log_normalizer)(1.0)
    np.testing.assert_allclose(jitted, run(1.0).log_normalizer, rtol=1e-10)
    with pytest.raises(ValueError, match="twist must be finite"):
        run(np.nan)


def test_guidance_transforms_name_their_misuse():
    """(A guidance audit.) JAX's raw errors before: a vector reward in
    gradient_guidance (classifier_guidance's log-likelihood got a clear one), and
    batched CFG with null_args of another structure than args."""
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5],
                             labels=[0, 1])  # fmt: skip
    base = gmm.conditional_score(SDE)
    x = jnp.array([0.3, -0.2])
    for reward in (lambda x0: -((x0 - 1) ** 2), lambda x0: jnp.sum(x0 > 0)):
        with pytest.raises(ValueError, match="must return a real scalar"):
            gd.guide(base, gd.gradient_guidance(reward, 1.0, SDE))(0.3, x, 1)
    # the weight forgotten, or after the SDE: "missing argument 'sde'" before
    R = lambda x0: -jnp.sum(x0**2)
    for args in ((R, SDE), (R, SDE, 1.0)):
        with pytest.raises(TypeError, match="takes the weight second"):
            gd.gradient_guidance(*args)
    with pytest.raises(TypeError, match="needs the sampled SDE"):
        gd.gradient_guidance(R, 1.0)
    s = gd.ScoreFn(lambda t, x, a: base(t, x, a["label"]) * a.get("scale", 1.0))
    guided = gd.guide(s, gd.cfg(1.0, null_args={"label": 2}))
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 4))
    with pytest.raises(ValueError, match="need the same structure"):
        gd.sample(jr.key(0), SDE, guided, (2,), args={"label": 1, "scale": 1.0}, **kw)

    # ... but null_args may hold an args leaf whole (a list for a one-hot array)
    def onehot_score(t, x, a):
        a = jnp.asarray(a)
        return base(t, x, jnp.argmax(a)) * (1 + a.sum())

    onehot = gd.ScoreFn(onehot_score)
    guided = gd.guide(onehot, gd.cfg(2.0, null_args=[0.0, 0.0]))
    out = gd.sample(jr.key(0), SDE, guided, (2,), args=jnp.array([0.0, 1.0]), **kw)
    assert int(out.num_failed) == 0
