"""Bad input gets a clear error (one test each)."""

import functools
import warnings

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
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
    # every entry point that takes a key checks it alike (the losses, fit and the
    # metrics raised jax's own TypeError or ValueError)
    x = jnp.zeros((4, 2))
    net = gd.MLPScoreNet(hidden=(4,))
    params = net.init(jr.key(0), 0.5, jnp.zeros(2))
    takers = {
        "dsm_loss": lambda k: gd.dsm_loss(net.apply, params, k, x, SDE),
        "dsm_example_loss": lambda k: gd.dsm_example_loss(net.apply, params, k, x, SDE),
        "reward_weighted_dsm_loss": lambda k: gd.reward_weighted_dsm_loss(
            net.apply, params, k, x, jnp.ones(4), SDE
        ),
        "drop_labels": lambda k: gd.drop_labels(k, jnp.array([0, 1]), 2, 0.1),
        "sliced_wasserstein": lambda k: gd.sliced_wasserstein(x, x, key=k),
        "two_sample_test": lambda k: gd.two_sample_test(x, x, key=k),
        "fit": lambda k: gd.fit(
            lambda p, k_, b: jnp.sum(p),
            jnp.zeros(()),
            x,
            optimizer=optax.sgd(0.1),
            batch_size=2,
            num_steps=1,
            key=k,
            progress=False,
        ),  # fmt: skip
    }
    for call in takers.values():
        with pytest.raises(TypeError, match=r"expected one PRNG key .* got int"):
            call(0)
        with pytest.raises(TypeError, match="for a batch of keys use jax.vmap"):
            call(jr.split(jr.key(0), 3))
    # raw uint32 key data is a key: jax.random.PRNGKey(0) equals jax.random.key(0)
    np.testing.assert_array_equal(
        gd.sample(jr.PRNGKey(0), SDE, score, (2,), num_particles=2, ts=TS).ys,
        gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=TS).ys,
    )


def test_bad_counts_shapes_dtypes_and_flags():
    score = GMM.score(SDE)
    for n in (0, -3):
        with pytest.raises(ValueError, match="num_particles must be at least 1"):
            gd.sample(jr.key(0), SDE, score, (2,), num_particles=n, ts=TS)
    for n in (2.7, True):
        with pytest.raises(TypeError, match="num_particles must be a positive int"):
            gd.sample(jr.key(0), SDE, score, (2,), num_particles=n, ts=TS)
    with pytest.raises(TypeError, match="num_particles"):
        gd.initial_noise(jr.key(0), SDE, (2,), num_particles=1.5)
    with pytest.raises(TypeError, match="shape must be a tuple"):
        gd.sample(jr.key(0), SDE, score, 2, ts=TS)
    with pytest.raises(TypeError, match="non-negative ints"):
        gd.sample(jr.key(0), SDE, score, (2.7,), ts=TS)
    for dtype in (jnp.int32, jnp.complex64):
        with pytest.raises(TypeError, match="floating-point dtype"):
            gd.sample(jr.key(0), SDE, score, (2,), ts=TS, dtype=dtype)
    with pytest.raises(TypeError, match="denoise must be True or False"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, denoise="no")
    with pytest.raises(TypeError, match="sde must be a gd.AbstractSDE"):
        gd.sample(jr.key(0), "vp", score, (2,), ts=TS)
    with pytest.raises(TypeError, match="diffrax.AbstractSolver"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, solver="euler")
    with pytest.raises(ValueError, match="adjoint= applies to driver='diffeqsolve'"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, adjoint=dfx.DirectAdjoint())


def test_grid_checks():
    score = GMM.score(SDE)
    # the prior is the law at T: a grid starting below T needs y0
    late = gd.uniform_grid(0.5, 1e-3, 10)
    with pytest.raises(ValueError, match=r"starts at ts\[0\]=0.5"):
        gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=late)
    y0 = jnp.zeros((2, 2))
    assert gd.sample(jr.key(0), SDE, score, (2,), y0=y0, ts=late).ys.shape == (2, 2)
    # a grid of booleans or strings is not a grid of times (a bool grid [True,
    # False] was called not decreasing, a string grid got JAX's own message)
    bools = ([True, False], np.array([True, False]), jnp.array([True, False]))
    for bad in (*bools, np.array(["1", "0"])):
        with pytest.raises(TypeError, match="time grid must hold real times"):
            gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=bad)
    with pytest.raises(TypeError, match="time grid must hold real times"):
        jax.jit(lambda t: gd.sample(jr.key(0), SDE, score, (2,), ts=t).ys)(bools[2])
    # unsigned integer times are times (np.diff wrapped around: called increasing)
    for uint in (np.array([1, 0], np.uint8), jnp.array([1, 0], jnp.uint32)):
        out = gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=uint)
        assert int(out.num_failed) == 0
    # a float64 grid whose times round together in float32 (the tests run with x64)
    close = jnp.array([1.0, 1.0 - 1e-9, 0.5], jnp.float64)
    with pytest.raises(ValueError, match="not once rounded to float32 .*float32 par"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=close, dtype=jnp.float32)
    # 16-bit particles step on a float32 grid: a 500-step grid is fine for them
    for half in (jnp.bfloat16, jnp.float16):
        out = gd.sample(
            jr.key(0), SDE, score, (2,), ts=gd.uniform_grid(1.0, 1e-3, 500),
            dtype=half,
        )  # fmt: skip
        assert out.ys.dtype == half and out.ts.dtype == jnp.float32
    # a traced grid's shape is known at trace time: a stack of grids (a sweep the
    # user forgot to vmap) or a single time is named as the grid's fault under jit
    # too, not as a failed score call; smc_sample checks the same
    ts = gd.uniform_grid(1.0, 1e-3, 4)
    runs = (
        lambda t: gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=t).ys,
        lambda t: gd.smc_sample(
            jr.key(0), SDE, score, (2,), lambda x: -jnp.sum(x**2), num_particles=2,
            ts=t,
        ).ys,
    )  # fmt: skip
    for run in runs:
        for bad in (jnp.stack([ts, ts]), ts[:1]):
            for f in (run, jax.jit(run)):
                with pytest.raises(ValueError, match="1-D with at least 2 times"):
                    f(bad)
    # a traced grid skips the Python checks: a bad one fails every particle (and
    # its samples are NaN), with either driver and with adaptive steps (diffrax's
    # own checks on the grid would raise a runtime error from inside the program)
    pid = dfx.PIDController(rtol=1e-2, atol=1e-2)
    kinds = [
        dict(),
        dict(driver="diffeqsolve"),
        dict(driver="diffeqsolve", brownian="unsafe"),
        dict(stepsize_controller=pid),
    ]
    for kw in kinds:
        run = jax.jit(
            lambda ts, kw=kw: gd.sample(
                jr.key(0), SDE, score, (2,), num_particles=3, ts=ts, **kw
            )
        )
        out = run(TS)
        assert not np.any(out.failed) and np.all(np.isfinite(out.ys)), kw
        for ts in (TS[::-1], TS * 0.5):  # increasing; does not start at T
            out = run(ts)
            assert np.all(out.failed) and np.all(np.isnan(out.ys)), kw
    with pytest.raises(ValueError, match="t_start > t_end"):
        gd.logsnr_grid(SDE, 1e-3, 1.0, 5)
    with pytest.raises(ValueError, match="log-SNR is not finite"):
        gd.logsnr_grid(SDE, 1.0, 0.0, 5)
    # the other grids check their (concrete) ends the same way, at construction
    for grid in (gd.uniform_grid, gd.quadratic_grid):
        for ends in (
            (1e-3, 1.0),
            (1.0, 1.0),
            (1.0, -0.1),
            (np.inf, 0.0),
            (1.0, np.nan),
        ):
            with pytest.raises(ValueError, match="t_start > t_end >= 0|must be finite"):
                grid(*ends, 5)
        assert grid(jnp.float32(1.0), 0.0, 4).shape == (5,)
        traced = jax.jit(lambda a, b, g=grid: g(a, b, 4))(1.0, 0.0)  # not checked
        assert traced.shape == (5,)


def test_solver_must_match_the_sde_and_the_controller():
    score = GMM.score(SDE)
    other = gd.VPSDE(gd.LinearBeta(beta_max=5.0))
    with pytest.raises(ValueError, match="built for a different SDE"):
        gd.sample(
            jr.key(0), SDE, score, (2,), ts=TS, solver=gd.ExponentialIntegrator(other)
        )
    with pytest.raises(ValueError, match="built for a different SDE"):
        gd.sample(
            jr.key(0),
            SDE,
            score,
            (2,),
            ts=TS,
            solver=gd.ExponentialIntegrator(gd.VESDE()),
        )
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="Euler gives no error estimate"):
        gd.sample(
            jr.key(0), SDE, score, (2,), ts=TS, solver=dfx.Euler(),
            stepsize_controller=pid,
        )  # fmt: skip
    # the default solver with a controller has an error estimate (diffrax.Heun)
    out = gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=TS,
                    stepsize_controller=pid)  # fmt: skip
    assert not np.any(out.failed)
    # StepTo(ts) is the fixed grid ts (given once, or twice the same)
    kw = dict(num_particles=2, process="ode")
    fixed = gd.sample(jr.key(0), SDE, score, (2,), ts=TS, driver="diffeqsolve", **kw)
    for grid in (TS, None):
        out = gd.sample(jr.key(0), SDE, score, (2,), ts=grid, **kw,
                        stepsize_controller=dfx.StepTo(TS))  # fmt: skip
        np.testing.assert_array_equal(out.ys, fixed.ys)
    with pytest.raises(ValueError, match="StepTo.* and ts= both give the time grid"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, **kw,
                  stepsize_controller=dfx.StepTo(TS[::2]))  # fmt: skip
    with pytest.raises(ValueError, match=r"starts at ts\[0\]=0.5"):
        gd.sample(jr.key(0), SDE, score, (2,), **kw,
                  stepsize_controller=dfx.StepTo(TS * 0.5))  # fmt: skip


def test_bad_weights_and_intervals():
    with pytest.raises(ValueError, match="strictly increasing"):
        gd.PiecewiseLinear([1.0, 0.0], [5.0, 0.0])
    with pytest.raises(ValueError, match="strictly increasing"):  # a repeated knot
        gd.PiecewiseLinear([0.0, 0.5, 0.5, 1.0], [0.0, 1.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="at least one knot"):
        gd.PiecewiseLinear([], [])
    # checked as stored (on the host, from the input): in float32, 1e39 is inf and
    # knots 1e-9 apart are one knot
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # jnp's overflow in cast
        with pytest.raises(ValueError, match="guidance weight must be finite"):
            gd.Constant(1e39)
        with pytest.raises(ValueError, match="knots' values must be finite"):
            gd.PiecewiseLinear([0.0, 1.0], [0.0, 1e39])
        with pytest.raises(ValueError, match="strictly increasing"):
            gd.PiecewiseLinear([1.0, 1.0 + 1e-9], [0.0, 1.0])
    assert gd.PiecewiseLinear([1.0, 1.0 + 1e-9], [0.0, 1.0]).times.dtype == jnp.float64
    guidance = gd.reward_guidance(GMM.score(SDE), 1.0)
    with pytest.raises(ValueError, match="must not be NaN"):
        gd.interval(guidance, np.nan, 0.5)
    with pytest.raises(ValueError, match="must be scalars"):
        gd.interval(guidance, [0.1, 0.2], 0.5)
    with pytest.raises(TypeError, match="stateless takes a callable"):
        gd.stateless(3)
    # a plain callable schedule works, and must return a scalar
    x = jnp.array([0.3, -0.2])
    plain = gd.guide(GMM.score(SDE), gd.reward_guidance(GMM.score(SDE), 2.0))
    sched = gd.guide(GMM.score(SDE), gd.reward_guidance(GMM.score(SDE), lambda t: 2.0))
    np.testing.assert_allclose(sched(0.5, x), plain(0.5, x))
    vec = gd.guide(
        GMM.score(SDE), gd.reward_guidance(GMM.score(SDE), lambda t: jnp.ones(2))
    )
    with pytest.raises(ValueError, match="must return a scalar"):
        vec(0.5, x)


def test_guidance_sde_and_tuner_inputs():
    """gradient_guidance holds an SDE (its Tweedie denoiser): it must be the one
    sampled. The tuners check the grid and counts as gd.sample does (the grid
    reaches sample traced, past its Python checks)."""
    other = gd.VPSDE(gd.LinearBeta(beta_max=10.0))
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    guided = gd.guide(GMM.score(SDE), gd.gradient_guidance(reward.log, 1.0, other))
    held = "the score holds a VPSDE that differs"
    with pytest.raises(ValueError, match=held):
        gd.sample(jr.key(0), SDE, guided, (2,), ts=TS)
    with pytest.raises(ValueError, match=held):
        gd.smc_sample(jr.key(0), SDE, guided, (2,), reward.log, num_particles=2, ts=TS)
    # any SDE the score holds: an oracle's score, a classifier, a network's reading
    foreign = [
        GMM.score(other),
        gd.guide(
            GMM.score(SDE), gd.classifier_guidance(GMM.log_classifier(other), 1.0)
        ),
        gd.EpsScore(lambda t, x, args: x, other),
    ]
    for score in foreign:
        with pytest.raises(ValueError, match=held):
            gd.sample(jr.key(0), SDE, score, (2,), ts=TS, args=0)
    with pytest.raises(ValueError, match="the score holds a VESDE"):
        gd.smc_sample(jr.key(0), SDE, GMM.score(gd.VESDE()), (2,), reward.log,
                      num_particles=2, ts=TS)  # fmt: skip
    # an equal SDE built separately is the same SDE
    gd.sample(jr.key(0), SDE, GMM.score(gd.VPSDE()), (2,), ts=TS)
    s = GMM.score(SDE)

    def tune(**kw):
        return gd.tune_guidance(
            jr.key(0), SDE, lambda w: gd.guide(s, gd.reward_guidance(s, w)), reward,
            (2,), **{"num_iters": 1, "num_particles": 2, **kw},
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"starts at ts\[0\]=0.5"):
        tune(ts=gd.uniform_grid(0.5, 1e-3, 10))
    with pytest.raises(ValueError, match="strictly decreasing"):
        tune(ts=jnp.array([1.0, 0.3, 0.6, 1e-3]))
    with pytest.raises(TypeError, match="num_particles must be a positive int"):
        tune(num_particles=2.7)
    with pytest.raises(ValueError, match="num_iters must be at least 1"):
        tune(num_iters=0)
    with pytest.raises(ValueError, match="lo <= hi"):
        tune(bounds=(1.0, 0.0))
    # the first step would evaluate the objective at an initial value outside
    with pytest.raises(ValueError, match="outside bounds"):
        tune(init=2.0, bounds=(0.0, 1.0))
    w0 = gd.PiecewiseLinear(jnp.array([1e-3, 1.0]), jnp.array([0.5, -0.1]))
    with pytest.raises(ValueError, match="outside bounds"):
        tune(init=w0, bounds=(0.0, 1.0))
    # (a tuning audit) an optimiser that is not optax's failed with an
    # AttributeError inside; a string count printed as a number; a bool reward was
    # told to "reduce it to a scalar"
    with pytest.raises(TypeError, match="optimizer must be an optax"):
        tune(optimizer="adam")
    tune(optimizer=optax.MultiSteps(optax.sgd(0.1), 2))  # not a GradientTransformation
    with pytest.raises(TypeError, match="got '8'"):
        tune(num_knots="8")
    # (a consistency audit) a raw int() or unpacking error before
    with pytest.raises(TypeError, match="num_knots must be a positive int"):
        tune(num_knots=None)
    with pytest.raises(TypeError, match="bounds must be a pair"):
        tune(bounds=(0.0,))
    tune(bounds=np.array([-1.0, 1.0]))  # an array pair is a pair
    # what sample checks of its concrete inputs, the tuners check too (inside
    # their compiled step the SDE and grid are traced, and those checks passed)
    with pytest.raises(ValueError, match=held):
        gd.tune_guidance(jr.key(0), SDE, lambda w: gd.guide(GMM.score(other), gd.reward_guidance(s, w)),
                         reward, (2,), num_iters=1, num_particles=2)  # fmt: skip
    with pytest.raises(ValueError, match="built for a different SDE"):
        tune(solver=gd.ExponentialIntegrator(other))
    with pytest.raises(ValueError, match="built for a different SDE"):
        gd.finetune_through_sampler(jr.key(0), SDE, lambda p: gd.guide(s, gd.reward_guidance(s, p)),
                                    jnp.asarray(0.5), reward, (2,), num_iters=1, num_particles=2,
                                    solver=gd.ExponentialIntegrator(other))  # fmt: skip
    with pytest.warns(UserWarning, match="miss the sampled times"):
        gd.tune_guidance(jr.key(0), SDE, lambda w: gd.guide(s, gd.interval(gd.reward_guidance(s, w), 200.0, 800.0)),
                         reward, (2,), num_iters=1, num_particles=2)  # fmt: skip
    eps_net = gd.EpsScore(lambda t, x, args: jnp.zeros_like(x), SDE)
    with pytest.raises(ValueError, match="ends at t = 0"):
        gd.finetune_through_sampler(jr.key(0), SDE, lambda p: gd.guide(eps_net, gd.reward_guidance(s, p)),
                                    jnp.asarray(0.5), reward, (2,), num_iters=1, num_particles=2,
                                    ts=gd.uniform_grid(1.0, 0.0, 5), process="ode")  # fmt: skip
    with pytest.raises(ValueError, match="scalar of dtype bool; return a float"):
        gd.tune_guidance(jr.key(0), SDE, lambda w: gd.guide(s, gd.reward_guidance(s, w)),
                         lambda x: x[0] > 0, (2,), num_iters=1, num_particles=2)  # fmt: skip


def test_tuners_take_keys_and_dtypes_as_sample_does():
    """(A consistency audit.) Raw key data of another generator (rbg's uint32[4])
    is hashed to a Threefry key, as gd.sample does (JAX's draws refused it after
    the step had compiled); `dtype=` samples float32 particles under x64 (a
    float32 score was refused with a hint to pass a dtype the tuners lacked)."""
    raw = jr.key_data(jr.key(0, impl="rbg"))
    s = GMM.score(SDE)

    class Float32(gd.AbstractScore):
        inner: gd.AbstractScore

        def __call__(self, t, x, args=None):
            return self.inner(t, x, args).astype(jnp.float32)

    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    kw = dict(num_iters=1, num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 4))
    guided = lambda w: gd.guide(Float32(s), gd.reward_guidance(s, w))
    with pytest.raises(ValueError, match="dtype float32"):  # float64 particles
        gd.tune_guidance(jr.key(0), SDE, guided, reward, (2,), **kw)
    tuned = gd.tune_guidance(raw, SDE, guided, reward, (2,), dtype=jnp.float32, **kw)
    assert np.isfinite(tuned.curve[0]["reward"])
    tuned = gd.finetune_through_sampler(
        raw, SDE, guided, jnp.asarray(0.5), reward, (2,), dtype=jnp.float32, **kw
    )
    assert np.isfinite(tuned.curve[0]["reward"])
    # the public resampler hashes such keys too: vmap over rbg keys == a loop
    # (rbg's batching rule draws the whole batch from its first key)
    assert gd.resample_indices(raw, jnp.zeros(3)).shape == (3,)
    keys = jax.vmap(lambda i: jr.fold_in(jr.key(0, impl="rbg"), i))(jnp.arange(3))
    pick = lambda k: gd.resample_indices(k, jnp.zeros(8), "multinomial")
    looped = jnp.stack([pick(k) for k in keys])
    np.testing.assert_array_equal(jax.vmap(pick)(keys), looped)


def test_tolerance_steps_adjoint_and_conversions():
    score = GMM.score(SDE)
    kw = dict(num_particles=2, ts=TS, driver="diffeqsolve", brownian="tree")
    for tol in (0.0, -1.0, np.nan):
        with pytest.raises(
            ValueError, match="brownian_tol must be finite and positive"
        ):
            gd.sample(jr.key(0), SDE, score, (2,), brownian_tol=tol, **kw)
    for steps, err in ((-1, ValueError), (None, TypeError), (2.5, TypeError)):
        with pytest.raises(err, match="max_steps"):
            gd.sample(jr.key(0), SDE, score, (2,), max_steps=steps, **kw)
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        gd.sample(jr.key(0), SDE, score, (2,), adjoint=dfx.BacksolveAdjoint(), **kw)
    # the scan driver's memory modes would be ignored by diffeqsolve: an error, as
    # adjoint= with the scan driver is
    for mode in (False, "sqrt", "step", "chunk"):
        with pytest.raises(ValueError, match="applies to the 'scan' driver"):
            gd.sample(jr.key(0), SDE, score, (2,), checkpoint=mode, **kw)
    # integer states: the conversions compute in floating point, not in int
    x = jnp.array([1, 2])
    s = score(0.5, x.astype(float))
    np.testing.assert_allclose(
        gd.score_to_x0(SDE, 0.5, x, s), gd.score_to_x0(SDE, 0.5, x.astype(float), s)
    )
    assert np.all(np.isfinite(gd.x0_to_score(SDE, 0.5, x, x)))
    assert np.all(np.isfinite(gd.eps_to_score(SDE, 0.5, x, x)))
    net = gd.MLPScoreNet(hidden=(4,), time_embed_dim=4)
    variables = net.init(jr.key(0), 0.5, jnp.zeros(2))
    with pytest.raises(TypeError, match="sde must be a gd.AbstractSDE"):
        gd.flax_score(net, variables, "x0")


def test_gradient_wrt_the_grid_through_a_virtual_tree_names_the_fix():
    """A Brownian path is not differentiable in time: with brownian='tree' a
    gradient with respect to ts raises an error naming brownian='grid' (whose
    increments sqrt(|dt|) xi are smooth in the grid), which differentiates."""
    score = GMM.score(SDE)

    def mean(ts, brownian):
        out = gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=ts,
                        driver="diffeqsolve", brownian=brownian)  # fmt: skip
        return jnp.mean(out.ys)

    with pytest.raises(Exception, match="brownian='tree'.*time grid ts"):
        jax.grad(mean)(TS, "tree")
    with pytest.raises(Exception, match="brownian='tree'.*time grid ts"):
        jax.jvp(lambda ts: mean(ts, "tree"), (TS,), (jnp.ones_like(TS),))
    assert np.all(np.isfinite(jax.grad(mean)(TS, "grid")))
    # other gradients through the tree are unaffected
    w = jax.grad(lambda y0: jnp.mean(gd.sample(
        jr.key(0), SDE, score, (2,), ts=TS, brownian="tree", driver="diffeqsolve",
        y0=y0).ys))(jnp.ones((2, 2)))  # fmt: skip
    assert np.all(np.isfinite(w))


def test_bad_input_audit():
    """From an audit of bad inputs: each gave NaN, a silently wrong value or an
    obscure internal error before."""
    score = GMM.score(SDE)
    x = jnp.array([2.0, 0.0])
    # integer points are points: the mixture's parameters are not cast to int
    np.testing.assert_allclose(
        GMM.log_prob(jnp.array([2, 0])), GMM.log_prob(x), rtol=1e-12
    )
    np.testing.assert_allclose(
        GMM.score_t(SDE, 0.5, jnp.array([2, 0])), GMM.score_t(SDE, 0.5, x), rtol=1e-12
    )
    # a class label is one integer, not one per component or particle
    with pytest.raises(ValueError, match="a class label must be one integer"):
        GMM.classifier_prob(x, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="a class label must be one integer"):
        gd.sample(
            jr.key(0), SDE, GMM.conditional_score(SDE), (2,), num_particles=2, ts=TS,
            args=jnp.array([0, 1]),
        )  # fmt: skip
    # cfg's null label is checked like args (it reached the score only vmapped)
    cs = GMM.conditional_score(SDE)
    with pytest.raises(ValueError, match="null_args=-1 .*unknown class label -1"):
        gd.sample(jr.key(0), SDE, gd.guide(cs, gd.cfg(2.0, null_args=-1)), (2,),
                  ts=TS, args=1)  # fmt: skip
    # scalar SDE parameters and schedule instances
    with pytest.raises(ValueError, match="parameters must be scalars"):
        gd.VPSDE(gd.LinearBeta(0.1, jnp.array([20.0, 10.0])))
    with pytest.raises(TypeError, match="VP schedule instance"):
        gd.VPSDE(gd.CosineSchedule)
    # times outside [0, T] in the oracles' public methods
    with pytest.raises(ValueError, match="outside this SDE's range"):
        GMM.score_t(SDE, 5.0, x)
    with pytest.raises(ValueError, match="outside this SDE's range"):
        gd.denoise(SDE, score, -0.5, x)
    with pytest.raises(ValueError, match="outside this SDE's range"):
        gd.logsnr_grid(gd.VPSDE(gd.CosineSchedule()), 1.0, 1e-3, 10)
    # weights and learning rates must be finite (positive)
    with pytest.raises(ValueError, match="guidance weight must be finite"):
        gd.cfg(float("nan"), null_args=GMM.null_label)
    with pytest.raises(ValueError, match="must be finite"):
        gd.PiecewiseLinear([0.0, 1.0], [1.0, float("inf")])
    tilt = lambda w: gd.guide(score, gd.reward_guidance(score, w))
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="learning_rate must be finite and positive"):
        gd.tune_guidance(jr.key(0), SDE, tilt, reward, (2,), learning_rate=-0.1,
                         num_iters=1, num_particles=2, ts=TS)  # fmt: skip
    with pytest.raises(ValueError, match="reward direction must be a vector"):
        gd.ExpLinearReward(1.0)
    # the losses need floating-point data and a non-empty batch
    model = lambda p, t, x, c: x
    with pytest.raises(TypeError, match="x0 must be a floating-point array"):
        gd.dsm_loss(model, None, jr.key(0), jnp.ones((4, 2), jnp.uint8), SDE)
    with pytest.raises(ValueError, match="n >= 1"):
        gd.dsm_loss(model, None, jr.key(0), jnp.zeros((0, 2)), SDE)
    # counts are ints; arguments of the wrong kind name what was expected
    with pytest.raises(TypeError, match="num_steps must be a positive int"):
        gd.uniform_grid(1.0, 1e-3, 2.0)
    with pytest.raises(TypeError, match="truncate_backprop must be a positive int"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, truncate_backprop=True)
    with pytest.raises(TypeError, match=r"call it: GaussianMixture.score\(sde\)"):
        gd.sample(jr.key(0), SDE, GMM.score, (2,), ts=TS)
    with pytest.raises(TypeError, match="step size controller"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, stepsize_controller="pid")
    with pytest.raises(TypeError, match="adjoint must be a diffrax adjoint"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, driver="diffeqsolve",
                  adjoint="x")  # fmt: skip
    with pytest.raises(TypeError, match="sharding must be a jax.sharding.Sharding"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, sharding=jax.devices()[0])
    with pytest.raises(ValueError, match=r"pass y0 of shape \(2, 2\)"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, y0=jnp.zeros(2), num_particles=2)
    with pytest.raises(ValueError, match="max_steps=3 is fewer than the grid's 10"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, driver="diffeqsolve",
                  max_steps=3)  # fmt: skip
    # the wrong kind of object where a specific one is needed
    with pytest.raises(TypeError, match="closed form"):
        GMM.tilt(lambda x: jnp.exp(-jnp.sum(x**2)))
    with pytest.raises(TypeError, match="guided must be a function"):
        gd.tune_guidance(jr.key(0), SDE, score, reward, (2,), num_iters=1,
                         num_particles=2, ts=TS)  # fmt: skip
    with pytest.raises(ValueError, match="calling log_potential on one particle"):
        gd.smc_sample(jr.key(0), SDE, score, (2,),
                      gd.GaussianBumpReward([1.0, 1.0, 1.0], 1.0).log,
                      num_particles=2, ts=TS)  # fmt: skip
    with pytest.raises(TypeError, match="sde must be a gd.AbstractSDE"):
        gd.dsm_loss(model, None, jr.key(0), jnp.zeros((4, 2)), None)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        gd.GaussianMixture([1.0], [[0.0, 0.0]], [1.0], labels=[0], num_classes=2.5)
    with pytest.raises(ValueError, match="points must be finite"):
        gd.PointCloud([[0.0, 0.0], [float("nan"), 1.0]])
    # (K, d) covariances are per-component variances also when K == d
    with pytest.raises(
        ValueError, match=r"for a full covariance matrix pass \(2, 2, 2\)"
    ):
        gd.GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], jnp.eye(2))


def test_metrics_reject_non_finite_values():
    # mean_stderr and reward_stats returned NaN for NaN or inf input
    with pytest.raises(ValueError, match=r"mean_stderr needs finite .* holds 2 non"):
        gd.mean_stderr(jnp.array([1.0, jnp.nan, jnp.inf, 2.0]))
    with pytest.raises(ValueError, match=r"reward_stats needs finite .* holds 1 non"):
        gd.reward_stats(np.array([1.0, 2.0, -np.inf]))
    # under tracing no check is possible: the non-finite value propagates
    mean, se = jax.jit(gd.mean_stderr)(jnp.array([1.0, jnp.nan]))
    assert np.isnan(mean) and np.isnan(se)
    mean, _ = jax.jit(gd.reward_stats)(jnp.array([1.0, jnp.inf]))
    assert np.isinf(mean)
    # reciprocal_prob's overflowing 1/p (p > 0 but tiny) is an honest inf, no error
    mean, _ = gd.reciprocal_prob(jnp.array([1e-45, 0.5], jnp.float32))
    assert np.isinf(mean)


def test_labels_past_int32_do_not_wrap():
    # 2**32 + 1 became label 1 under JAX's default 32-bit ints
    big = 2**32 + 1
    for labels in ([0, big], np.array([0, big], np.int64)):
        with pytest.raises(ValueError, match=r"out of range: got \[4294967297\]"):
            gd.check_labels(labels, 3)
        with pytest.raises(ValueError, match=r"out of range: got \[4294967297\]"):
            gd.drop_labels(jr.key(0), labels, 3, 0.1)
        with pytest.raises(ValueError, match=r"out of range: got \[4294967297\]"):
            gd.conditional_dsm_loss(lambda p, t, x, c: x, None, jr.key(0),
                                    jnp.zeros((2, 2)), labels, SDE, num_classes=3,
                                    p_uncond=0.1)  # fmt: skip
        with pytest.raises(ValueError, match=r"labels must lie in 0..2, got \[0, 42"):
            gd.GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0],
                               labels=labels, num_classes=3)  # fmt: skip
        with pytest.raises(ValueError, match="num_classes=4294967298 .* too large"):
            gd.GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [1.0, 1.0],
                               labels=labels)  # fmt: skip
    for label in (big, np.int64(big), np.array(big, np.int64)):
        with pytest.raises(ValueError, match="unknown class label 4294967297"):
            GMM.classifier_prob(jnp.zeros(2), label)
        with pytest.raises(ValueError, match="unknown class label 4294967297"):
            gd.sample(jr.key(0), SDE, GMM.conditional_score(SDE), (2,), ts=TS,
                      args=label)  # fmt: skip
    net = gd.MLPScoreNet(hidden=(8,), time_embed_dim=8, num_classes=3)
    params = net.init(jr.key(0), jnp.array(0.5), jnp.zeros(2), label=0)
    for label in (big, np.int64(big), np.array(big, np.int64)):
        with pytest.raises(ValueError, match="class label 4294967297 out of range"):
            net.apply(params, jnp.array(0.5), jnp.zeros(2), label=label)
    # in-range labels of any integer type still work
    net.apply(params, jnp.array(0.5), jnp.zeros(2), label=np.int64(3))
    np.testing.assert_array_equal(
        gd.check_labels(np.array([0, 3], np.int64), 3), [0, 3]
    )


def test_reward_weights_empty():
    # said "rewards are all zero" before
    for temperature in (None, 1.0):
        with pytest.raises(ValueError, match="rewards is empty: need at least one"):
            gd.reward_weights([], temperature=temperature)


def test_user_audit_score_mistakes():
    """From a user-journey audit: gd.guide took anything as its score (a Flax
    network's eps output was then used as a score, silently), and gd.sample's hint
    for a network pointed at gd.ScoreFn, which accepted it."""
    net = gd.MLPScoreNet(hidden=(8,), time_embed_dim=8, num_classes=2)
    params = net.init(jr.key(0), jnp.array(0.5), jnp.zeros(2), label=0)
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    cfg = gd.cfg(1.0, null_args=2)
    flax_hint = r"gd.flax_score\(net, variables, sde"
    for bad in (net, net.apply, gd.LinenModel(params, net)):
        with pytest.raises(TypeError, match=flax_hint):
            gd.guide(bad, cfg)
        with pytest.raises(TypeError, match=flax_hint):
            gd.sample(jr.key(0), SDE, bad, (2,), ts=TS)
    for bad in (net, gd.LinenModel(params, net)):
        with pytest.raises(TypeError, match=flax_hint):
            with warnings.catch_warnings():  # equinox warns of the static array first
                warnings.simplefilter("ignore")
                gd.ScoreFn(bad)
    with pytest.raises(TypeError, match=r"call it: GaussianMixture.conditional_score"):
        gd.guide(gmm.conditional_score, cfg)
    with pytest.raises(TypeError, match="wrap a plain function"):
        gd.guide(lambda t, x, a: -x, cfg)
    with pytest.raises(TypeError, match=r"proposal must be an AbstractScore.*flax"):
        gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), lambda x: x[0], num_particles=4,
            ts=TS, proposal=net,
        )  # fmt: skip
    # a conditional score called without its label says so
    with pytest.raises(ValueError, match=r"class-conditional: pass the class label"):
        gd.sample(jr.key(0), SDE, gmm.conditional_score(SDE), (2,), ts=TS)
    # the flax_score reading still works
    score = gd.flax_score(net, params, SDE)
    gd.guide(score, cfg)
    # an integer-valued score is not told to sample with an integer dtype
    int_score = gd.ScoreFn(lambda t, x, a: jnp.zeros(x.shape, jnp.int32))
    with pytest.raises(ValueError, match=r"returned dtype int32") as e:
        gd.sample(jr.key(0), SDE, int_score, (2,), ts=TS)
    assert "sample with dtype" not in str(e.value)


def test_score_check_memo_keys_the_values_it_depends_on(monkeypatch):
    """The memo of checked scores keyed float leaves by shape: a mixture whose
    class has zero weight (a clear error) passed after a valid mixture of the same
    shapes, and sampled NaN. Scalars are keyed with their type (1.0 after 1)."""
    from guidediff import _sample_checks

    means = [[-2.0, 0.0], [2.0, 0.0]]
    ok = gd.GaussianMixture([0.5, 0.5], means, [0.5, 0.5])
    empty = gd.GaussianMixture([1.0, 0.0], means, [0.5, 0.5])  # class 1: no weight
    kw = dict(ts=TS, num_particles=2, args=1)
    gd.sample(jr.key(0), SDE, ok.conditional_score(SDE), (2,), **kw)
    with pytest.raises(ValueError, match="class 1 has no component"):
        gd.sample(jr.key(0), SDE, empty.conditional_score(SDE), (2,), **kw)

    class Indexed(gd.AbstractScore):
        table: jax.Array

        def __call__(self, t, x, args=None):
            return -(x - self.table[args])

    score = Indexed(jnp.eye(2))
    gd.sample(jr.key(0), SDE, score, (2,), ts=TS, num_particles=2, args=1)
    with pytest.raises(ValueError, match="calling the score"):
        gd.sample(jr.key(0), SDE, score, (2,), ts=TS, num_particles=2, args=1.0)

    # large jax arrays (network weights) by identity: the same arrays are not
    # checked again, new ones are
    calls = []
    real = _sample_checks._check_score_shape_uncached
    monkeypatch.setattr(
        _sample_checks, "_check_score_shape_uncached",
        lambda *a: calls.append(1) or real(*a),
    )  # fmt: skip

    class Weighted(Indexed):
        weights: jax.Array  # 256 entries: keyed by identity

        def __call__(self, t, x, args=None):
            return super().__call__(t, x, args) * jnp.mean(self.weights)

    big = Weighted(jnp.eye(2), jnp.ones(256))
    same = Weighted(big.table, big.weights)  # a new score holding the same arrays
    new = Weighted(big.table, big.weights + 0.0)
    for s in (big, big, same, new):
        gd.sample(jr.key(0), SDE, s, (2,), ts=TS, num_particles=2, args=0)
    assert len(calls) == 2  # the first call, and the new array

    # a Flax network's parameters by shape and dtype: new parameters of the same
    # shapes (an EMA snapshot, a checkpoint) do not re-trace the network (0.2 s per
    # call for the default UNet); new shapes or another network do
    net = gd.MLPScoreNet(hidden=(8,))
    params = net.init(jr.key(0), 0.5, jnp.zeros(2))
    calls.clear()
    for p in (params, jax.tree.map(lambda a: a * 0.5, params)):
        gd.sample(jr.key(0), SDE, gd.flax_score(net, p, SDE), (2,), ts=TS)
    assert len(calls) == 1
    wider = gd.MLPScoreNet(hidden=(16,))
    gd.sample(jr.key(0), SDE, gd.flax_score(wider, wider.init(jr.key(0), 0.5,
              jnp.zeros(2)), SDE), (2,), ts=TS)  # fmt: skip
    assert len(calls) == 2


def test_plausible_user_mistakes_get_clear_errors():
    """From a new-user audit: each mistake gave an obscure error or, worse, a
    silently wrong result."""

    score = GMM.conditional_score(SDE)
    cfg = gd.cfg(1.0, null_args=GMM.null_label)
    with pytest.raises(TypeError, match="arguments are swapped"):
        gd.guide(cfg, score)
    bump = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    with pytest.raises(TypeError, match=r"this is a reward.*tilt\(reward\)"):
        gd.reward_guidance(bump, 0.5)
    # a string was read as 2.0, a bool (also a bool array) as 1
    for bad in ("2.0", True, jnp.asarray(True), np.array(False)):
        with pytest.raises(TypeError, match="guidance weight must be a number"):
            gd.cfg(bad, null_args=GMM.null_label)
        with pytest.raises(TypeError, match="guidance weight must be a number"):
            gd.Constant(bad)
    # SMC takes log r: r itself sampled a wrong tilt silently
    with pytest.raises(TypeError, match="pass its `.log`"):
        gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), bump,
                      num_particles=2, ts=TS)  # fmt: skip

    x0, labels = jnp.zeros((4, 2)), jnp.array([0, 1, 2, 0])
    net = gd.MLPScoreNet(hidden=(8,), num_classes=3)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    with pytest.raises(TypeError, match="labels come before the SDE"):
        gd.conditional_dsm_loss(net.apply, params, jr.key(0), x0, SDE, labels,
                                num_classes=3)  # fmt: skip
    with pytest.raises(TypeError, match="rewards come before the SDE"):
        gd.reward_weighted_dsm_loss(net.apply, params, jr.key(0), x0, SDE, labels)
    # an unconditional network ignores the labels: CFG would then do nothing
    plain = gd.MLPScoreNet(hidden=(8,))
    plain_params = plain.init(jr.key(0), 0.5, jnp.zeros(2))
    with pytest.raises(ValueError, match="built without num_classes"):
        gd.conditional_dsm_loss(plain.apply, plain_params, jr.key(0), x0, labels,
                                SDE, num_classes=3)  # fmt: skip
    with pytest.raises(TypeError, match="unpack a batch like"):
        gd.dsm_loss(plain.apply, plain_params, jr.key(0), (x0, labels), SDE)

    result = gd.FitResult(plain_params, plain_params, None, np.zeros(1), [], 1)
    with pytest.raises(TypeError, match="result.ema_params"):
        gd.flax_score(plain, result, SDE)
    loss = lambda p, k, b: gd.dsm_loss(plain.apply, p, k, b, SDE)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        gd.fit(loss, plain_params, x0, optimizer=1e-3, num_steps=1, key=jr.key(0),
               batch_size=2, progress=False)  # fmt: skip
    # the documented chain semantics: reward guidance at w = 1 is s_r alone
    s_r = GMM.tilt(bump).conditional_score(SDE)
    guided = gd.guide(score, gd.chain(cfg, gd.reward_guidance(s_r, 1.0)))
    x = jnp.array([0.3, -0.2])
    np.testing.assert_allclose(guided(0.5, x, 1), s_r(0.5, x, 1), rtol=1e-12)


def test_structured_args_and_image_shapes_get_clear_errors():
    """From a particle-shape audit: each gave an unhelpful message."""
    x0 = jnp.zeros((6, 8, 8, 1))
    model = lambda p, t, x, lab: x
    # a dict of labels: structured conditioning is not one (n,) array
    with pytest.raises(TypeError, match="labels must be one"):
        gd.dsm_loss(model, None, jr.key(0), x0, SDE, labels={"scale": jnp.ones(6)})
    assert np.isfinite(gd.dsm_loss(model, None, jr.key(0), x0, SDE, labels=[0] * 6))
    # batched CFG stacks args: a string leaf names the batched=False way out
    s = gd.ScoreFn(lambda t, x, a: -x / (1.0 + 0.1 * a["label"]))
    cond, null = {"label": 1, "prompt": "a cat"}, {"label": 3, "prompt": "a cat"}
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 3), args=cond)
    with pytest.raises(ValueError, match=r"batched=False\) for args"):
        gd.sample(jr.key(0), SDE, gd.guide(s, gd.cfg(1.0, null_args=null)), (2,), **kw)
    unbatched = gd.guide(s, gd.cfg(1.0, null_args=null, batched=False))
    assert gd.sample(jr.key(0), SDE, unbatched, (2,), **kw).ys.shape == (2, 2)
    # an image-shaped particle of a flat law is not a batch
    flat = gd.Gaussian(jnp.zeros(64), 1.0).score(SDE)
    with pytest.raises(ValueError, match="flatten the particle"):
        gd.sample(jr.key(0), SDE, flat, (8, 8, 1), num_particles=2, ts=TS)
    with pytest.raises(ValueError, match="for a batch of particles use jax.vmap"):
        gd.sample(jr.key(0), SDE, flat, (2, 64), num_particles=2, ts=TS)


def test_x0_prediction_of_another_shape_is_rejected():
    """A `(1,)` x0 prediction for a `(2,)` particle was broadcast into a plausible,
    wrong score (an eps prediction of the wrong shape was already rejected)."""
    bad = gd.X0Score(lambda t, x, a: jnp.mean(x, keepdims=True), SDE)
    with pytest.raises(ValueError, match=r"prediction has shape \(1,\), the state"):
        gd.sample(jr.key(0), SDE, bad, (2,), num_particles=2, ts=TS)
    x = jnp.zeros(2)
    for convert in (gd.eps_to_score, gd.x0_to_score, gd.score_to_x0, gd.score_to_eps,
                    gd.v_to_score, gd.score_to_v):  # fmt: skip
        with pytest.raises(ValueError, match="must be equal"):
            convert(SDE, 0.5, x, jnp.zeros(1))


def test_network_score_on_a_grid_ending_at_zero_with_heun():
    """A network's score divides by sigma(0) = 0: Heun (the default ODE solver)
    evaluates there and every particle failed without a reason. Now an error naming
    the fix; solvers that evaluate at step starts only, and exact scores (finite
    at t = 0), still run."""
    ts0 = gd.uniform_grid(1.0, 0.0, 4)
    net = gd.EpsScore(lambda t, x, a: 0.5 * x, SDE)
    guided = gd.guide(net, gd.interval(gd.gradient_guidance(lambda x: -x @ x, 0.1,
                                                            SDE), 0.2, 0.8))  # fmt: skip
    v_net = gd.VScore(lambda t, x, a: 0.5 * x, SDE)
    for score in (net, guided, v_net):
        with pytest.raises(ValueError, match=r"sigma\(t\) = 0.*Heun evaluates"):
            gd.sample(jr.key(0), SDE, score, (2,), num_particles=2, ts=ts0,
                      process="ode")  # fmt: skip
    with pytest.raises(ValueError, match=r"sigma\(t\) = 0.*Heun evaluates"):
        gd.smc_sample(jr.key(0), SDE, net, (2,), lambda x: -x @ x, num_particles=2,
                      ts=ts0, solver=dfx.Heun())  # fmt: skip
    kw = dict(num_particles=2, ts=ts0, process="ode")
    euler = gd.sample(jr.key(0), SDE, net, (2,), solver=dfx.Euler(), **kw)
    assert not euler.failed.any()
    exact = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(SDE)
    assert not gd.sample(jr.key(0), SDE, exact, (2,), **kw).failed.any()


def test_grid_builders_reject_bad_ends_and_repeated_times():
    """Ends that are not real scalars gave NumPy errors or odd grids (a (2,) end
    gave a (4, 2) 'grid'); ends too close for the dtype repeated times, which only
    `sample` rejected later."""
    for bad in ("1.0", None, True, jnp.array([1.0, 0.5])):
        for build in (gd.uniform_grid, gd.quadratic_grid):
            with pytest.raises(TypeError, match="t_start must be a real scalar"):
                build(bad, 1e-3, 3)
        with pytest.raises(TypeError, match="t_start must be a real scalar"):
            gd.logsnr_grid(SDE, bad, 1e-3, 3)
    with pytest.raises(TypeError, match="sde must be a gd.AbstractSDE"):
        gd.logsnr_grid(None, 1.0, 1e-3, 3)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="repeat times"):
            gd.uniform_grid(jnp.bfloat16(1.0), jnp.bfloat16(1e-3), 300)
        with pytest.raises(ValueError, match="repeat times"):
            gd.quadratic_grid(jnp.float16(1.0), jnp.float16(1e-3), 3000)
        with pytest.raises(ValueError, match="repeat times"):
            gd.uniform_grid(1.0, 1.0 - 1e-9, 4)
        with pytest.raises(ValueError, match="repeat times"):
            gd.logsnr_grid(gd.VPSDE(), 1.0, 1.0 - 1e-7, 10)
    assert gd.uniform_grid(np.float32(1.0), jnp.asarray(0), 3).shape == (4,)


def test_grids_checked_on_the_host_remember_their_true_ends():
    """uniform_grid and quadratic_grid decide "strictly decreasing" on the host (not
    reading the new grid back) when its spacing is many ulps wide, and remember
    the grid's ends for `sample`: the remembered ends are the grid's own, NumPy
    grids keep their host copy (also once cast for float32 particles), and a
    remembered grid is still checked against the range of the SDE it meets."""
    from guidediff._grid import grid_ends, grid_values
    from guidediff._sample import _grid_in_dtype

    ends32 = (jnp.asarray(1.0, jnp.float32), jnp.asarray(1e-3, jnp.float32))
    for build in (gd.uniform_grid, gd.quadratic_grid):
        for a, b, n in [(1.0, 1e-3, 10), (0.999, 1e-5, 500), (*ends32, 64),
                        (80.0, 0.002, 7), (1.0, 0.0, 3)]:  # fmt: skip
            ts = build(a, b, n)
            arr = np.asarray(ts)
            first, last = grid_ends(ts)
            assert (first, last) == (arr[0], arr[-1]), (build, a, b, n)
            assert first.dtype == last.dtype == arr.dtype
            assert np.all(np.diff(arr) < 0)
    # 16-bit grids are computed in float32 and rounded twice, and an integer end
    # beyond 2**53 is rounded twice too: remembered as read (from a review)
    for a, b in [(1 + 2**-11 + 2**-40, jnp.float16(0)),
                 (1 + 2**-8 + 2**-40, jnp.bfloat16(0)),
                 (2**60 + 2**36 + 1, jnp.float32(0))]:  # fmt: skip
        for build in (gd.uniform_grid, gd.quadratic_grid):
            ts = build(a, b, 4)
            arr = np.asarray(ts)
            assert grid_ends(ts) == (arr[0], arr[-1]), (build, a, b)
    with jax.enable_x64(False):  # JAX wraps int64 ends to int32: read as made
        with pytest.raises(ValueError, match="repeat times"):
            gd.uniform_grid(np.int64(2**53 - 1), 0.0, 4)  # wraps to -1
        ts = gd.uniform_grid(np.int64(2**32 + 1), 0.0, 4)  # wraps to 1
        assert grid_ends(ts) == (1.0, 0.0) == tuple(np.asarray(ts)[[0, -1]])
    T1 = gd.uniform_grid(1 + 2**-11 + 2**-40, jnp.float16(1e-3), 8)  # rounds to 1
    assert gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=T1).ys.shape == (2,)
    for dtype in (jnp.float64, jnp.float32):  # float32 particles: a cast copy
        given = np.linspace(1.0, 1e-3, 9)
        ts = _grid_in_dtype(SDE, given, dtype, start_at_T=True)
        host = grid_values(ts)
        assert isinstance(host, np.ndarray) and host.dtype == ts.dtype
        np.testing.assert_array_equal(host, np.asarray(ts))
        assert grid_ends(ts) == (host[0], host[-1])
        given[:] = 0.5  # the copy is the grid's, not the caller's array
        np.testing.assert_array_equal(grid_values(ts), np.asarray(ts))
    beyond = gd.uniform_grid(2.0, 1e-3, 8)  # remembered, but past VPSDE's T = 1
    assert grid_ends(beyond) is not None
    score = GMM.score(SDE)
    with pytest.raises(ValueError, match="leaves the SDE's range"):
        gd.sample(jr.key(0), SDE, score, (2,), y0=jnp.zeros((1, 2)), ts=beyond)
    ve = gd.VESDE(T=2.0)
    assert gd.sample(
        jr.key(0), ve, gd.Gaussian(jnp.zeros(2), 1.0).score(ve), (2,), ts=beyond
    ).ys.shape == (2,)


def test_host_grid_checks_fall_back_where_rounding_is_not_relative():
    """The host-side grid checks read the grid back where the dtype's resolution is
    not relative to the ends (from a review): ends beyond the dtype's range, or
    subnormal (flushed to zero on the device), gave non-decreasing grids that were
    remembered as valid; a float64 NumPy grid ending at a subnormal time, cast for
    float32 particles, kept its host copy's end 1e-40 while the device's was 0
    (the network-at-sigma = 0 error was skipped: every particle NaN); and
    sigma(t_end) was assumed positive for t_end > 0 (it underflows for
    LinearBeta(beta_min=0) at 1e-20 in float32: the interval warning was lost)."""
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # jnp's overflow in cast
        for build, ends in [
            (gd.uniform_grid, (1e39, 0.0)),
            (gd.uniform_grid, (jnp.float16(2e-6), 0.0)),
            (gd.uniform_grid, (1e-39, 0.0)),
            (gd.quadratic_grid, (1e-39, 0.0)),
        ]:
            with pytest.raises(ValueError, match="repeat times"):
                build(*ends, 4 if ends[0] != 2e-6 else 40)
    vp = gd.VPSDE()
    eps = gd.EpsScore(lambda t, x, args: x, vp)
    with pytest.raises(ValueError, match="where sigma.t. = 0 and a network"):
        gd.sample(jr.key(0), vp, eps, (2,), num_particles=2, process="ode",
                  ts=np.array([vp.T, 0.5, 1e-40]), solver=dfx.Heun(),
                  dtype=jnp.float32)  # fmt: skip
    flat = gd.VPSDE(gd.LinearBeta(beta_min=0.0, beta_max=20.0))
    score = gd.Gaussian(jnp.zeros(2), 1.0).score(flat)
    late = gd.interval(gd.reward_guidance(score, 1.0), 0.0, 1e-20)
    ts = jnp.asarray([1.0, 0.5, 1e-20], jnp.float32)
    assert float(flat.marginal(ts[-1])[1]) == 0.0
    with pytest.warns(UserWarning, match="hold none of the times"):
        gd.sample(jr.key(0), flat, gd.guide(score, late), (2,), num_particles=2,
                  ts=ts, solver=dfx.Euler(), denoise=True, dtype=jnp.float32)  # fmt: skip


def test_float32_subnormal_times_widened_to_float64_are_read_back():
    """Under x64 a device cast of float32 to float64 flushes float32's subnormals to
    zero, which are normal in float64 (from a fourth review): a float32 subnormal
    grid end made an increasing float64 grid that was remembered as valid (samples
    all NaN), and a NumPy float32 grid ending at 1e-40, cast for float64
    particles, kept 1e-40 on the host where the device had 0 (the
    network-at-sigma = 0 error was skipped)."""
    tiny32 = np.float32(1e-40)  # subnormal in float32, normal in float64
    for build in (gd.uniform_grid, gd.quadratic_grid):
        with pytest.raises(ValueError, match="repeat times"):
            build(np.float32(1e-39), np.float64(5e-40), 4)
    vp = gd.VPSDE()
    eps = gd.EpsScore(lambda t, x, args: x, vp)
    kw = dict(num_particles=2, process="ode", solver=dfx.Heun(), dtype=jnp.float64)
    for ts in (
        gd.uniform_grid(np.float64(vp.T), tiny32, 4),
        np.array([vp.T, 0.5, tiny32], np.float32),
    ):
        with pytest.raises(ValueError, match="where sigma.t. = 0 and a network"):
            gd.sample(jr.key(0), vp, eps, (2,), ts=ts, **kw)
    # integer grids have no subnormals (the check failed on them, from a review)
    for ts in ([1, 0], np.array([1, 0])):
        out = gd.sample(jr.key(0), vp, gd.ScoreFn(lambda t, x, a: -x), (2,),
                        num_particles=2, ts=ts, solver=dfx.Euler(),
                        y0=jnp.zeros((2, 2)))  # fmt: skip
        assert out.ys.shape == (2, 2)


def test_log_potential_check_keys_labels_by_value():
    """The log-potential memo keyed arrays by shape (from a fourth review): after a
    potential holding label 0 passed, the same potential holding an unknown label
    7 skipped the check (log_normalizer -inf, no error). Labels are keyed by value,
    as in the score check."""
    from guidediff._sample_checks import _check_log_potential

    mix = gd.GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.1, 0.1])
    potential = lambda label: jax.tree_util.Partial(mix.log_prob, label=label)
    _check_log_potential(potential(jnp.array(0)), (1,), jnp.float32)
    with pytest.raises(ValueError, match="unknown class label 7"):
        _check_log_potential(potential(jnp.array(7)), (1,), jnp.float32)
    # float arrays are keyed by shape, but not a mixture's: its log-density checks
    # its weights (a class whose components all weigh zero), from a review
    import equinox as eqx

    class ClassLogDensity(eqx.Module):  # the mixture is a pytree child here
        mixture: gd.GaussianMixture

        def __call__(self, x):
            return self.mixture.log_prob(x, 1)

    labelled = dict(means=[[-1.0], [1.0]], covs=[0.1, 0.1], labels=[0, 1])
    for weights, ok in (([0.5, 0.5], True), ([1.0, 0.0], False)):
        mixture = gd.GaussianMixture(weights, **labelled)
        check = lambda: _check_log_potential(
            ClassLogDensity(mixture), (1,), jnp.float32
        )
        if ok:
            check()
        else:
            with pytest.raises(ValueError, match="class 1 has no component"):
                check()


def test_piecewise_linear_knots_beyond_exact_integers_are_read_back():
    """int64 knot times past 2**53 round once to float32 on the device and twice
    (through float64) on the host: two times that the device merges stayed apart
    on the host, and a weight with repeated knots was accepted (from a fourth
    review). Such values are read back."""
    x, y = 2**60 + 2**37, 2**60 + 3 * 2**36 - 1
    with jax.enable_x64(False), pytest.raises(ValueError, match="strictly increasing"):
        gd.PiecewiseLinear(np.array([x, y], np.int64), [0.0, 1.0])


def test_log_potential_check_is_remembered_with_a_typed_key_inside():
    """A log-potential rebuilt per call is traced once, also when it holds a typed
    PRNG key (np.dtype rejects key<fry>: the memo was skipped, from a review)."""
    import equinox as eqx

    from guidediff._sample_checks import _check_log_potential

    traces = []

    class Potential(eqx.Module):
        key: jax.Array

        def __call__(self, x):
            traces.append(1)
            return -jnp.sum(x**2)

    for i in range(3):
        _check_log_potential(Potential(jr.key(i)), (2,), jnp.float32)
    assert len(traces) == 1


def test_float64_particles_without_x64_warn():
    """dtype=float64 without jax_enable_x64 gives float32 particles, as JAX's own
    arrays do, and warns as they do (it was silent), naming the caller's line."""
    score = gd.ScoreFn(lambda t, x, args: -x)
    with jax.enable_x64(False):
        sde = gd.VPSDE()  # (module-level objects may hold float64 arrays)
        kw = dict(num_particles=2, dtype=jnp.float64)
        grid = dict(ts=gd.uniform_grid(1.0, 1e-3, 2), solver=dfx.Euler())
        for run in (
            lambda: gd.initial_noise(jr.key(0), sde, (2,), **kw),
            lambda: gd.sample(jr.key(0), sde, score, (2,), **grid, **kw).ys,
            lambda: (
                gd.smc_sample(
                    jr.key(0), sde, score, (2,), lambda x: -x @ x, **grid, **kw
                ).ys
            ),
        ):
            with pytest.warns(UserWarning, match="64-bit types need jax_enable_x64"):
                ys = run()
            assert ys.dtype == jnp.float32
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gd.initial_noise(jr.key(0), sde, (2,), dtype=jnp.float64)
        assert [w.filename for w in caught] == [__file__]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for fine in (jnp.float32, float, None):  # float: JAX's default float
                gd.initial_noise(jr.key(0), sde, (2,), dtype=fine)  # no warning


def test_static_arguments_traced_under_jit_say_so():
    """A traced count, flag or tolerance named the tracer type only."""
    with pytest.raises(TypeError, match="num_steps is static"):
        jax.jit(lambda n: gd.uniform_grid(1.0, 0.0, n))(3)
    with pytest.raises(TypeError, match="brownian_tol is static"):
        jax.jit(lambda tol: gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=TS,
                                      driver="diffeqsolve", brownian="tree",
                                      brownian_tol=tol).ys)(1e-3)  # fmt: skip
    with pytest.raises(TypeError, match="denoise is static"):
        jax.jit(lambda d: gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=TS,
                                    denoise=d).ys)(True)  # fmt: skip
    with pytest.raises(TypeError, match="brownian_tol must be a real number"):
        gd.sample(jr.key(0), SDE, GMM.score(SDE), (2,), ts=TS, driver="diffeqsolve",
                  brownian="tree", brownian_tol=np.array([1e-3, 1e-3]))  # fmt: skip
    potential = lambda x: -jnp.sum(x**2)
    for name in ("ess_threshold", "twist", "twist_floor"):
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), potential, ts=TS,
                          num_particles=2, **{name: np.array([0.5, 0.5])})  # fmt: skip


def test_forward_mode_through_diffeqsolve_names_the_adjoint():
    score = GMM.score(SDE)

    def f(y0, **kw):
        return gd.sample(jr.key(0), SDE, score, (2,), y0=y0, ts=TS,
                         driver="diffeqsolve", **kw).ys  # fmt: skip

    y0 = jnp.ones(2)
    with pytest.raises(TypeError, match=r"needs adjoint=diffrax.ForwardMode\(\)"):
        jax.jvp(f, (y0,), (y0,))
    forward = functools.partial(f, adjoint=dfx.ForwardMode())
    _, tangent = jax.jvp(forward, (y0,), (y0,))
    assert np.all(np.isfinite(tangent))
    # and reverse mode through ForwardMode names the fix (JAX's message about
    # while loops with dynamic bounds before)
    with pytest.raises(RuntimeError, match="forward-mode only.*driver='scan'"):
        jax.grad(lambda y: forward(y).sum())(y0)
    # the guard changes nothing else: the forward values are the default adjoint's
    np.testing.assert_array_equal(forward(y0), f(y0))


def test_keys_y0_and_log_weights_checked_before_compiling():
    """None, a batch of raw keys or empty key data as `key` gave JAX's messages
    about tracers (or passed: empty data); zero particles through y0 passed; a
    boolean mask as log-weights was read as log-weights 1 and 0."""
    kw = dict(num_particles=2, ts=TS)
    score = GMM.score(SDE)
    for bad, hint in ((None, "got NoneType"), (0, "got int"),
                      (jr.split(jr.PRNGKey(0)), "for a batch of keys use jax.vmap"),
                      (jr.split(jr.key(0)), "for a batch of keys use jax.vmap"),
                      (jnp.zeros((0,), jnp.uint32), r"shape \(0,\)")):  # fmt: skip
        with pytest.raises(TypeError, match=hint):
            gd.sample(bad, SDE, score, (2,), **kw)
        with pytest.raises(TypeError, match="expected one PRNG key"):
            gd.initial_noise(bad, SDE, (2,))
        with pytest.raises(TypeError, match="expected one PRNG key"):
            gd.resample_indices(bad, jnp.zeros(3))
        with pytest.raises(TypeError, match="expected one PRNG key"):
            gd.smc_sample(bad, SDE, score, (2,), lambda x: 0.0 * x[0], **kw)
    with pytest.raises(ValueError, match="y0 holds no particles"):
        gd.sample(jr.key(0), SDE, score, (2,), y0=jnp.zeros((0, 2)), ts=TS)
    with pytest.raises(TypeError, match="log_weights must be floating point"):
        gd.resample_indices(jr.key(0), jnp.array([True, False, False]))


def test_weights_bounds_and_flags_are_numbers():
    """Strings, bools, None and dicts as weights, knots or interval bounds were read
    as numbers or failed deep inside JAX; cfg's `batched` took any truthy value."""
    g = gd.cfg(1.0, null_args=GMM.null_label)
    for bad in ("2", None, {"w": 1.0}, [1.0, 2.0]):
        with pytest.raises(TypeError, match="guidance weight must be a number"):
            gd.cfg(bad, null_args=GMM.null_label)
    for bad in ("0", False, None):
        with pytest.raises(TypeError, match="t_lo must be a real scalar time"):
            gd.interval(g, bad, 1.0)
    with pytest.raises(TypeError, match="times must be real numbers"):
        gd.PiecewiseLinear(["0", "1"], [1.0, 2.0])
    with pytest.raises(TypeError, match="values must be real numbers"):
        gd.PiecewiseLinear([0.0, 1.0], [True, False])
    with pytest.raises(TypeError, match="batched must be True or False"):
        gd.cfg(1.0, null_args=GMM.null_label, batched="no")
    # numbers of every kind still work
    assert gd.interval(g, 0, np.float64(0.5)).t_hi == 0.5
    assert gd.PiecewiseLinear(np.array([0, 1]), [1, 2])(0.5) == 1.5
    # knots holding traced values (jit, grad, vmap)
    f = lambda w: gd.PiecewiseLinear([0.0, 1.0], [w, 2 * w])(0.5)
    assert jax.grad(f)(1.0) == 1.5 and jax.jit(f)(1.0) == 1.5
    np.testing.assert_allclose(jax.vmap(f)(jnp.ones(2)), [1.5, 1.5])
    assert gd.as_weight(np.int32(2))(0.1) == 2.0


def test_flax_network_labels_and_variables_are_checked():
    """A label outside the classes of a user's network (with a `num_classes` field)
    failed every particle with no reason (flax's Embed out of range is NaN); the
    parameters alone
    (`variables['params']`) failed deep inside Flax (ScopeCollectionNotFound)."""
    import flax.linen as nn

    class MyNet(nn.Module):  # a user's network: labels embedded by flax's Embed
        num_classes: int = 2

        @nn.compact
        def __call__(self, t, x, label):
            e = nn.Embed(self.num_classes + 1, 4)(jnp.asarray(label))
            return nn.Dense(2)(jnp.concatenate([x, jnp.atleast_1d(t), e]))

    sde = gd.VPSDE()
    net = MyNet()
    v = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    score = gd.flax_score(net, v, sde)
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 3))
    for label in (2, 1):  # the null label and a class are fine
        assert gd.sample(jr.key(0), sde, score, (2,), args=label, **kw).num_failed == 0
    for label in (-1, -3):  # from the end of the embedding, as jnp.take does
        gd.sample(jr.key(0), sde, score, (2,), args=label, **kw)
    for label in (3, -4, np.int32(7)):
        with pytest.raises(ValueError, match=f"unknown class label {int(label)}"):
            gd.sample(jr.key(0), sde, score, (2,), args=label, **kw)
    with pytest.raises(ValueError, match="vmap over the labels"):  # per particle
        gd.sample(jr.key(0), sde, score, (2,), args=jnp.array([0, 1]), **kw)
    bad_null = gd.guide(score, gd.cfg(1.0, null_args=3))
    with pytest.raises(ValueError, match="null_args=3.*unknown class label 3"):
        gd.sample(jr.key(0), sde, bad_null, (2,), args=1, **kw)
    x0 = jr.normal(jr.key(1), (4, 2))
    for call in (
        lambda: gd.flax_score(net, v["params"], sde),
        lambda: gd.dsm_loss(net.apply, v["params"], jr.key(0), x0, sde),
        lambda: gd.conditional_dsm_loss(
            net, v["params"], jr.key(0), x0, jnp.zeros(4, int), sde, num_classes=2
        ),
    ):
        with pytest.raises(TypeError, match=r"no 'params' collection"):
            call()

    class Fixed(nn.Module):  # no parameters: its variables are other collections
        @nn.compact
        def __call__(self, t, x, label):
            return x * self.variable("consts", "w", jnp.ones, (2,)).value

    fixed = Fixed()
    consts = fixed.init(jr.key(0), 0.5, jnp.zeros(2), None)
    assert "params" not in consts
    gd.flax_score(fixed, consts, sde)(0.5, jnp.ones(2), None)
    # a bound method that takes the parameters alone is not the network's apply

    class WithHelper(MyNet):
        @nn.nowrap
        def eps(self, params, t, x, label):
            return self.apply({"params": params}, t, x, label)

    net = WithHelper()
    gd.conditional_dsm_loss(net.eps, v["params"], jr.key(0), x0, jnp.zeros(4, int),
                            sde, num_classes=2)  # fmt: skip


def test_an_array_of_weights_points_to_vmap():
    """`cfg(jnp.array([0.5, 1.0]))` said only that the weight must be a scalar; a
    weight sweep is a vmap over a scalar weight."""
    with pytest.raises(ValueError, match=r"shape \(2,\).*jax.vmap over a scalar"):
        gd.cfg(jnp.array([0.5, 1.0]), null_args=GMM.null_label)


def test_cfg_on_a_score_that_ignores_its_args():
    """From a conformance audit: gd.cfg(null_args=...) applied first to a score that
    ignores args (gmm.score instead of gmm.conditional_score, a plain function of
    (t, x)) had equal conditional and unconditional calls: unguided samples, no
    error. Guidance after an args-reading one (classifier guidance) is not
    refused: the score CFG sees then reads the label."""
    from guidediff._sample_checks import _first_cfg, _ignores_args

    uncond, cfg = GMM.score(SDE), gd.cfg(3.0, null_args=GMM.null_label)
    reward = gd.reward_guidance(uncond, 0.5)
    kw = dict(num_particles=2, ts=TS, args=1)
    for g in (cfg, gd.chain(cfg, reward), gd.interval(cfg, 0.2, 0.8)):
        with pytest.raises(ValueError, match="ignores its args .MixtureScore"):
            gd.sample(jr.key(0), SDE, gd.guide(uncond, g), (2,), **kw)
    plain = gd.ScoreFn(lambda t, x, a: -x)
    with pytest.raises(ValueError, match="ignores its args .ScoreFn"):
        gd.sample(jr.key(0), SDE, gd.guide(plain, gd.cfg(1.0, null_args={"c": 0.0})),
                  (2,), num_particles=2, ts=TS, args={"c": 1.0})  # fmt: skip
    after = gd.chain(gd.classifier_guidance(GMM.log_classifier(SDE)), cfg)
    assert _first_cfg(gd.guide(uncond, after)) is None
    x = jax.ShapeDtypeStruct((2,), jnp.float64)
    assert not _ignores_args(GMM.conditional_score(SDE), 0.5, x, 1)
    assert not _ignores_args(
        gd.ScoreFn(lambda t, x, a: -x + a["c"]), 0.5, x, {"c": 1.0}
    )
    assert _ignores_args(uncond, 0.5, x, np.int32(1))
    # a score may read a non-array leaf in Python (a review): not concluded
    prompt = gd.ScoreFn(lambda t, x, a: -x + (1.0 if a["prompt"] == "cat" else 0.0))
    cat, w = {"prompt": "cat", "w": jnp.ones(2)}, jnp.zeros(2)
    assert not _ignores_args(prompt, 0.5, x, cat)
    assert not _ignores_args(prompt, 0.5, x, cat, {"prompt": "", "w": w})
    assert _ignores_args(prompt, 0.5, x, cat, {"prompt": "cat", "w": w})

    class Prompt(eqx.Module):  # a static field: in the tree structure, not a leaf
        text: str = eqx.field(static=True)
        w: jax.Array

    means = {"cat": jnp.array([2.0, 0.0]), "": jnp.zeros(2)}
    by_text = gd.ScoreFn(lambda t, x, a: means[a.text] - x)
    null = Prompt("", jnp.ones(()))
    assert not _ignores_args(by_text, 0.5, x, Prompt("cat", jnp.ones(())), null)
    # what Python reads of arrays without their values: None or not, shapes
    masked = gd.ScoreFn(lambda t, x, a: -x + (a["mask"] is not None))
    assert not _ignores_args(masked, 0.5, x, {"mask": jnp.ones(2)}, {"mask": None})
    sized = gd.ScoreFn(lambda t, x, a: -x + a.shape[0])
    assert not _ignores_args(sized, 0.5, x, jnp.zeros(3), jnp.zeros(1))
    # typed keys as args reach the score's concrete check (NumPy has no key dtype)
    from guidediff._sample_checks import _concrete

    key = jr.key(1)
    assert _concrete(key) is key


def test_user_sdes_get_clear_errors():
    """From an extensibility audit: an SDE whose methods return Python numbers
    failed deep in the solvers (a float has no .astype); one whose T is an ordinary
    field failed with a ConcretizationTypeError under jax.jit."""

    class FloatDrift(gd.AbstractSDE):
        T: float = 1.0

        def drift_coeff(self, t):
            return 0.0

        def diffusion(self, t):
            return jnp.sqrt(2.0) * jnp.ones_like(t)

        def marginal(self, t):
            return jnp.ones_like(t), jnp.sqrt(2.0 * t)

        def prior_std(self):
            return jnp.sqrt(2.0)

    score = gd.ScoreFn(lambda t, x, a: -x)
    with pytest.raises(TypeError, match="FloatDrift.drift_coeff returned a float"):
        gd.sample(jr.key(0), FloatDrift(), score, (2,), num_particles=2, ts=TS)

    class NumpyStd(FloatDrift):  # NumPy scalars have .astype: accepted (a review)
        def drift_coeff(self, t):
            return jnp.zeros_like(t)

        def prior_std(self):
            return np.sqrt(2.0)

    from guidediff._sample import _check_sde

    _check_sde(NumpyStd())

    class TracedT(FloatDrift):
        def drift_coeff(self, t):
            return jnp.zeros_like(t)

    with pytest.raises(TypeError, match="TracedT.T is traced"):
        jax.jit(lambda sde: gd.sample(jr.key(0), sde, score, (2,), num_particles=2,
                                      ts=TS).ys)(TracedT())  # fmt: skip
