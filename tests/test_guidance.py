"""Guidance transform laws, transformation invariances, retracing and gradients."""

import warnings

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import three_class_gmm

import guidediff as gd
from guidediff._sample import _sample_jit


SDE = gd.VPSDE()
GMM = three_class_gmm()
COND = GMM.conditional_score(SDE)
TILTED = GMM.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0))
X = jnp.array([0.4, -0.3])
LABEL = jnp.asarray(1)


def _guidances(w1=1.5, w2=0.7, w3=2.0):
    g1 = gd.cfg(w1, null_args=GMM.null_label)
    g2 = gd.classifier_guidance(GMM.log_classifier(SDE), w2)
    g3 = gd.interval(gd.reward_guidance(TILTED.conditional_score(SDE), w3), 0.2, 0.8)
    return g1, g2, g3


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_chain_laws(t):
    g1, g2, g3 = _guidances()
    base = COND(t, X, LABEL)
    np.testing.assert_array_equal(gd.guide(COND, gd.chain())(t, X, LABEL), base)
    np.testing.assert_array_equal(
        gd.guide(COND, gd.chain(g1))(t, X, LABEL), gd.guide(COND, g1)(t, X, LABEL)
    )
    flat = gd.guide(COND, gd.chain(g1, g2, g3))(t, X, LABEL)
    left = gd.guide(COND, gd.chain(gd.chain(g1, g2), g3))(t, X, LABEL)
    right = gd.guide(COND, gd.chain(g1, gd.chain(g2, g3)))(t, X, LABEL)
    manual = gd.guide(gd.guide(gd.guide(COND, g1), g2), g3)(t, X, LABEL)
    np.testing.assert_allclose(left, flat, rtol=1e-14)
    np.testing.assert_allclose(right, flat, rtol=1e-14)
    np.testing.assert_allclose(manual, flat, rtol=1e-14)
    assert not np.allclose(flat, base)  # the chain does something


def test_zero_weight_is_identity():
    for t in [0.1, 0.5, 0.9]:
        base = COND(t, X, LABEL)
        for g in [
            gd.cfg(0.0, null_args=GMM.null_label),
            gd.cfg(0.0, null_args=GMM.null_label, batched=False),
            gd.cfg(0.0, unconditional=GMM.score(SDE)),
            gd.classifier_guidance(GMM.log_classifier(SDE), 0.0),
            gd.reward_guidance(TILTED.conditional_score(SDE), 0.0),
            gd.gradient_guidance(lambda x0: -jnp.sum(x0**2), 0.0, SDE),
            gd.chain(*_guidances(0.0, 0.0, 0.0)),
        ]:
            np.testing.assert_array_equal(gd.guide(COND, g)(t, X, LABEL), base)


def test_guidance_formulas():
    t = 0.5
    cond, uncond = COND(t, X, LABEL), GMM.score(SDE)(t, X)
    w = 1.5
    for g in [gd.cfg(w, null_args=3), gd.cfg(w, null_args=3, batched=False)]:
        np.testing.assert_allclose(
            gd.guide(COND, g)(t, X, LABEL), (1 + w) * cond - w * uncond, rtol=1e-12
        )
    # exact classifier guidance at w = 1 == the conditional score
    clf = gd.classifier_guidance(GMM.log_classifier(SDE), 1.0)
    np.testing.assert_allclose(
        gd.guide(GMM.score(SDE), clf)(t, X, LABEL), cond, rtol=1e-10
    )
    # reward guidance at w = 1 == the tilted score
    rg = gd.reward_guidance(TILTED.score(SDE), 1.0)
    np.testing.assert_allclose(
        gd.guide(GMM.score(SDE), rg)(t, X), TILTED.score(SDE)(t, X), rtol=1e-12
    )
    # gradient guidance: s + w grad_x R(x0_hat(x))
    reward = lambda x0: -0.5 * jnp.sum((x0 - 1.0) ** 2)
    gg = gd.gradient_guidance(reward, 0.3, SDE)
    s = GMM.score(SDE)
    expected = s(t, X) + 0.3 * jax.grad(lambda y: reward(gd.denoise(SDE, s, t, y)))(X)
    np.testing.assert_allclose(gd.guide(s, gg)(t, X), expected, rtol=1e-12)
    # interval: outside it, the plain score
    iv = gd.interval(gd.cfg(w, null_args=3), 0.6, 0.9)
    np.testing.assert_array_equal(gd.guide(COND, iv)(0.5, X, LABEL), cond)
    np.testing.assert_allclose(
        gd.guide(COND, iv)(0.7, X, LABEL),
        gd.guide(COND, gd.cfg(w, null_args=3))(0.7, X, LABEL),
    )
    # schedules: a PiecewiseLinear weight
    sched = gd.PiecewiseLinear([0.0, 1.0], [0.0, 2.0])
    np.testing.assert_allclose(
        gd.guide(COND, gd.cfg(sched, null_args=3))(t, X, LABEL),
        gd.guide(COND, gd.cfg(1.0, null_args=3))(t, X, LABEL),
    )


def test_weights_scale_each_guidance_term():
    """Each guidance adds w times its term. At w = 0 and 1 alone (above) a slip such
    as w|w| or w^2 in place of w is invisible: checked at 0.5, 2 and -0.7."""
    t = 0.5
    s = GMM.score(SDE)
    base, cond, tilted = s(t, X), COND(t, X, LABEL), TILTED.score(SDE)(t, X)
    reward = lambda x0: -0.5 * jnp.sum((x0 - 1.0) ** 2)
    grad_r = jax.grad(lambda y: reward(gd.denoise(SDE, s, t, y)))(X)
    for w in (0.5, 2.0, -0.7):
        cases = {
            "cfg": (gd.guide(COND, gd.cfg(w, null_args=3)), LABEL, cond - base),
            "cfg-unbatched": (
                gd.guide(COND, gd.cfg(w, null_args=3, batched=False)),
                LABEL,
                cond - base,
            ),
            "cfg-unconditional": (
                gd.guide(COND, gd.cfg(w, unconditional=s)),
                LABEL,
                cond - base,
            ),
            # exact classifier: grad log p(c | x) = conditional - unconditional score
            "classifier": (
                gd.guide(s, gd.classifier_guidance(GMM.log_classifier(SDE), w)),
                LABEL,
                cond - base,
            ),
            "reward": (gd.guide(s, gd.reward_guidance(TILTED.score(SDE), w)), None, tilted - base),
            "gradient": (gd.guide(s, gd.gradient_guidance(reward, w, SDE)), None, grad_r),
        }  # fmt: skip
        for name, (guided, args, term) in cases.items():
            start = cond if name.startswith("cfg") else base
            np.testing.assert_allclose(
                guided(t, X, args), start + w * term, rtol=1e-10, err_msg=f"{name} {w}"
            )


def test_interval_ends_are_inclusive():
    """Guided at t = t_lo and t = t_hi exactly (as documented), plain just outside;
    the other tests never evaluate at an end."""
    g = gd.cfg(1.5, null_args=3)
    guided, iv = gd.guide(COND, g), gd.guide(COND, gd.interval(g, 0.25, 0.75))
    for dtype in (jnp.float32, jnp.float64):
        for end, outside in ((0.25, -1.0), (0.75, 2.0)):
            t = jnp.asarray(end, dtype)
            np.testing.assert_allclose(iv(t, X, LABEL), guided(t, X, LABEL), rtol=1e-12)
            out = jnp.nextafter(t, jnp.asarray(outside, dtype))
            np.testing.assert_allclose(
                iv(out, X, LABEL), COND(out, X, LABEL), rtol=1e-12
            )
            assert not np.allclose(guided(t, X, LABEL), COND(t, X, LABEL))


def test_a_sweep_of_interval_bounds_traces_the_score_once():
    """gd.sample's check memo keyed an interval's bounds by value: each new pair
    traced the score again (never recompiled). Bounds are keyed by shape now (the
    check's outcome does not depend on them; the miss warning reads them on every
    call); the guidance inside is still keyed by value."""
    from guidediff._sample_checks import _check_intervals

    traces = []
    traced = gd.ScoreFn(lambda t, x, args: traces.append(1) or COND(t, x, args))
    ts = gd.uniform_grid(1.0, 1e-3, 4)
    g = gd.cfg(1.5, null_args=3)
    outs = []
    for lo, hi in ((0.2, 0.6), (0.3, 0.9), (0.1, 0.5)):
        guided = gd.guide(traced, gd.interval(g, lo, hi))
        outs.append(gd.sample(jr.key(0), SDE, guided, (2,), ts=ts, args=1).ys)
        if lo == 0.2:
            first = len(traces)
    assert len(traces) == first, "a new pair of bounds traced the score again"
    assert not np.allclose(outs[0], outs[1])  # the bounds did change the samples
    # the warning about bounds that miss the grid still reads them on every call,
    # also of an interval nested in another (a review)
    for missed in (gd.interval(g, 5.0, 6.0), gd.interval(gd.interval(g, 5.0, 6.0), 0.0, 1.0)):  # fmt: skip
        with pytest.warns(UserWarning, match="miss the sampled times"):
            gd.sample(jr.key(0), SDE, gd.guide(traced, missed), (2,), ts=ts, args=1)

    # (a review) a subclass of gd.Interval is not keyed as one: it may read its
    # bounds, or, as here, return another shape, which the check must see even
    # after a plain interval passed
    class Doubled(gd.Interval):
        def apply(self, score, t, x, args):
            return jnp.concatenate([score(t, x, args)] * 2)

    lo, hi = (jnp.asarray(v, jnp.result_type(float)) for v in (0.2, 0.6))
    with pytest.raises(ValueError, match=r"returned shape \(4,\)"):
        gd.sample(jr.key(0), SDE, gd.guide(traced, Doubled(g, lo, hi)), (2,), ts=ts,
                  args=1)  # fmt: skip

    # a schedule in a subclass's own field is still judged (a review)
    class WithSchedule(gd.Interval):
        extra: gd.AbstractGuidance

    steps = gd.cfg(gd.PiecewiseLinear([100.0, 900.0], [0.0, 2.0]), null_args=3)
    with pytest.warns(UserWarning, match="all lie after"):
        _check_intervals(gd.guide(COND, WithSchedule(g, lo, hi, steps)), ts, None)
    # bounds built without gd.interval's checks: reversed or NaN is an error here
    for bad in ((hi, lo), (jnp.asarray(jnp.nan), hi)):
        with pytest.raises(ValueError, match="t_lo <= t_hi and not NaN"):
            gd.sample(jr.key(0), SDE, gd.guide(traced, gd.Interval(g, *bad)), (2,),
                      ts=ts, args=1)  # fmt: skip


def test_an_interval_built_directly_takes_python_numbers():
    """`gd.Interval(g, 0.2, 0.6)` failed at its first call ('float' object has no
    attribute 'astype'): its bounds become default-float arrays, as gd.interval's."""
    g = gd.cfg(2.0, null_args=3)
    direct, built = gd.Interval(g, 0.2, 0.6), gd.interval(g, 0.2, 0.6)
    assert direct.t_lo.dtype == built.t_lo.dtype == jnp.result_type(float)
    x = jnp.array([0.3, -0.1])
    for t in (0.1, 0.4):
        assert jnp.array_equal(
            gd.guide(COND, direct)(t, x, 1), gd.guide(COND, built)(t, x, 1)
        )


def test_a_schedule_whose_knots_miss_the_grid_warns():
    """A `gd.PiecewiseLinear` weight with knots as step indices (100..900) held its
    first value at every sampled time, silently; knots on one side of the sampled
    times now warn. Knots meeting the grid, a constant schedule, or traced knots do
    not."""
    from guidediff._sample_checks import _check_intervals

    ts = gd.uniform_grid(1.0, 1e-3, 3)

    def guided(knots, values):
        return gd.guide(COND, gd.cfg(gd.PiecewiseLinear(knots, values), null_args=3))

    steps = guided([100.0, 500.0, 900.0], [0.0, 2.0, 4.0])
    with pytest.warns(UserWarning, match=r"all lie after .* the constant 0 there"):
        gd.sample(jr.key(0), SDE, steps, (2,), num_particles=2, ts=ts, args=1)
    with pytest.warns(UserWarning, match=r"all lie before .* the constant 5 there"):
        _check_intervals(guided([-3.0, -2.0], [1.0, 5.0]), ts, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_intervals(guided([0.2, 0.8], [1.0, 3.0]), ts, None)
        _check_intervals(guided([2.0, 3.0], [1.5, 1.5]), ts, None)  # constant
        _check_intervals(guided([-1.0, 0.5], [0.0, 1.0]), ts, None)  # overlaps

        @jax.jit
        def traced(knots):
            _check_intervals(guided(knots, jnp.array([0.0, 1.0])), ts, None)
            return knots

        traced(jnp.array([5.0, 6.0]))
    # (a review) schedules sharing their times array are each judged; a schedule
    # inside an interval's guidance is judged; from a tuner the warning names the
    # caller's line
    steps = gd.PiecewiseLinear([100.0, 900.0], [0.0, 1.0])
    gd.PiecewiseLinear(steps.times, jnp.zeros(2))  # as tune_guidance makes one
    cfg_of = lambda w: gd.guide(COND, gd.cfg(w, null_args=3))
    with pytest.warns(UserWarning, match="all lie after"):
        _check_intervals(cfg_of(steps), ts, None)
    inside = gd.guide(COND, gd.interval(gd.cfg(steps, null_args=3), 0.0, 1.0))
    with pytest.warns(UserWarning, match="all lie after"):
        _check_intervals(inside, ts, None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="optimizer"):  # after the checks
            gd.tune_guidance(jr.key(0), SDE, cfg_of, lambda x: x[0], (2,), init=steps,
                             ts=ts, args=1, optimizer="adam")  # fmt: skip
    (w,) = [w for w in seen if "all lie after" in str(w.message)]
    assert w.filename == __file__


def test_an_interval_that_misses_the_grid_warns():
    """Bounds outside the sampled times (e.g. integer timesteps), or between two of
    them, made the guidance a silent no-op; `sample` and `smc_sample` now warn.
    Bounds that meet the grid, or traced ones, do not."""
    import warnings

    g = gd.cfg(1.5, null_args=3)
    ts = gd.uniform_grid(1.0, 1e-3, 3)
    kw = dict(num_particles=2, ts=ts, args=1)
    for lo, hi in ((200.0, 800.0), (-2.0, -1.0)):
        missed = gd.guide(COND, gd.interval(g, lo, hi))
        with pytest.warns(UserWarning, match="miss the sampled times"):
            gd.sample(jr.key(0), SDE, missed, (2,), **kw)
        with pytest.warns(UserWarning, match="miss the sampled times"):
            gd.smc_sample(jr.key(0), SDE, missed, (2,), lambda x: jnp.sum(x), **kw)
    # inside the grid's range but holding none of the times the solver evaluates
    # the score at (audits: no warning): between two grid times, or only the last
    # time for a step-start solver (the default exponential integrator)
    from guidediff._sample_checks import _check_intervals

    end = gd.guide(COND, gd.interval(g, 0.0, 2e-3))
    for lo, hi in ((0.4, 0.6), (0.0, 2e-3)):
        missed = gd.guide(COND, gd.interval(g, lo, hi))
        with pytest.warns(UserWarning, match=r"step starts, from 0.33"):
            gd.sample(jr.key(0), SDE, missed, (2,), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        between = gd.guide(COND, gd.interval(g, 0.4, 0.6))
        # unless the solver may evaluate between grid times: stages inside a step
        # (Tsit5, ShARK), a wrapped solver, adaptive steps; or at the end
        for solver in (dfx.Tsit5(), dfx.ShARK(), dfx.HalfSolver(dfx.Euler())):
            _check_intervals(between, ts, solver)
        _check_intervals(between, ts, dfx.Heun(), adaptive=True)
        _check_intervals(end, ts, dfx.Heun())  # its second stage is at the end
        _check_intervals(end, ts, gd.DDIM(SDE), denoise=True, sde=SDE)
    # ... but the final Tweedie step is skipped where sigma = 0 (a review)
    with pytest.warns(UserWarning, match="hold none of the times"):
        to_zero = gd.uniform_grid(1.0, 0.0, 3)
        _check_intervals(end, to_zero, gd.DDIM(SDE), denoise=True, sde=SDE)
        # float64 bounds touching the end of a float32 grid, with Heun
        for dtype in (jnp.float64, jnp.float32):
            _check_intervals(gd.guide(COND, gd.interval(g, 0.0, 1e-3)),
                             ts.astype(dtype), dfx.Heun())  # fmt: skip
        # overlapping, holding one grid time (2/3)
        for lo, hi in ((0.9, 2.0), (0.6, 0.7)):
            for dtype in (None, jnp.float32):  # float64 bounds, a float32 grid
                gd.sample(jr.key(0), SDE, gd.guide(COND, gd.interval(g, lo, hi)),
                          (2,), dtype=dtype, **kw)  # fmt: skip
        jax.jit(
            lambda hi: (
                gd.sample(
                    jr.key(0),
                    SDE,
                    gd.guide(COND, gd.interval(g, 200.0, hi)),
                    (2,),
                    **kw,
                ).ys
            )
        )(800.0)


def test_jit_vmap_equal_plain():
    guided = gd.guide(COND, gd.chain(*_guidances()))
    xs = jr.normal(jr.key(0), (5, 2))
    plain = np.stack([guided(0.5, x, LABEL) for x in xs])
    vm = jax.vmap(guided, in_axes=(None, 0, None))(0.5, xs, LABEL)
    jt = jax.jit(jax.vmap(guided, in_axes=(None, 0, None)))(0.5, xs, LABEL)
    np.testing.assert_allclose(vm, plain, rtol=1e-13)
    np.testing.assert_allclose(jt, plain, rtol=1e-13)


def test_sample_jit_equals_no_jit():
    guided = gd.guide(COND, gd.cfg(1.0, null_args=3))
    ts = gd.uniform_grid(1.0, 1e-3, 8)
    kw = dict(num_particles=3, ts=ts, args=1)
    jitted = gd.sample(jr.key(2), SDE, guided, (2,), **kw).ys
    with jax.disable_jit():
        eager = gd.sample(jr.key(2), SDE, guided, (2,), **kw).ys
    np.testing.assert_allclose(eager, jitted, rtol=1e-12, atol=1e-12)


def test_particles_independent_of_batch_size():
    guided = gd.guide(COND, gd.cfg(1.0, null_args=3))
    ts = gd.uniform_grid(1.0, 1e-3, 20)
    big = gd.sample(jr.key(3), SDE, guided, (2,), num_particles=16, ts=ts, args=1).ys
    small = gd.sample(jr.key(3), SDE, guided, (2,), num_particles=5, ts=ts, args=1).ys
    loop = np.stack(
        [
            gd.sample(
                jr.key(3), SDE, guided, (2,), num_particles=i + 1, ts=ts, args=1
            ).ys[i]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(small, big[:5], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(loop, big[:3], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_sample_vmap_over_keys_equals_loop_for_every_key_impl(impl):
    """vmap over root keys == a loop, also for keys whose JAX generator draws a
    vmapped batch from the first key only (rbg, unsafe_rbg): guidediff hashes them
    to Threefry keys before any draw."""
    guided = gd.guide(COND, gd.cfg(1.0, null_args=3))
    ts = gd.uniform_grid(1.0, 1e-3, 8)

    def draw(k):
        return gd.sample(k, SDE, guided, (2,), num_particles=3, ts=ts, args=1).ys

    keys = jr.split(jr.key(5, impl=impl), 3)
    loop = np.stack([draw(k) for k in keys])
    np.testing.assert_allclose(jax.vmap(draw)(keys), loop, rtol=1e-13, atol=1e-13)
    assert np.all(np.abs(loop[0] - loop[1]) > 0)


def test_no_retrace_when_weight_label_or_key_change():
    ts = gd.uniform_grid(1.0, 1e-3, 10)

    def run(w, label, key):
        guided = gd.guide(
            COND,
            gd.chain(
                gd.cfg(w, null_args=3), gd.interval(gd.cfg(w, null_args=3), 0.1, 0.5)
            ),
        )
        return gd.sample(
            jr.key(key), SDE, guided, (2,), num_particles=4, ts=ts, args=label
        ).ys

    run(1.0, 0, 0)
    before = _sample_jit._cached._cache_size()
    a = run(2.0, 0, 0)
    b = run(2.0, 1, 0)
    c = run(2.0, 1, 5)
    assert _sample_jit._cached._cache_size() == before
    assert not np.allclose(a, b) and not np.allclose(b, c)


def test_weight_sweep_is_one_vmapped_program():
    """A sweep over guidance weights (and labels) is `jax.vmap` over `gd.sample`:
    one compiled program, the same samples as one call per weight."""
    ts = gd.uniform_grid(1.0, 1e-3, 10)

    def run(w, label):
        guided = gd.guide(COND, gd.cfg(w, null_args=3))
        return gd.sample(
            jr.key(6), SDE, guided, (2,), num_particles=4, ts=ts, args=label
        ).ys

    ws = jnp.array([0.0, 1.0, 3.0])
    labels = jnp.array([0, 1, 2])
    swept = jax.jit(jax.vmap(run))(ws, labels)
    one_by_one = np.stack([run(w, c) for w, c in zip(ws, labels, strict=True)])
    np.testing.assert_allclose(swept, one_by_one, rtol=1e-12, atol=1e-12)
    assert swept.shape == (3, 4, 2)


def _objective(w, driver="scan", solver=None, n=6, steps=30):
    guided = gd.guide(GMM.score(SDE), gd.reward_guidance(TILTED.score(SDE), w))
    out = gd.sample(
        jr.key(4),
        SDE,
        guided,
        (2,),
        num_particles=n,
        ts=gd.uniform_grid(1.0, 1e-3, steps),
        driver=driver,
        solver=solver,
    )
    return jnp.mean(jnp.sum(out.ys**2, axis=-1))


@pytest.mark.parametrize("solver", [None, dfx.Euler()], ids=["exp-integrator", "euler"])
def test_grad_wrt_weight_matches_finite_differences(solver):
    w, h = 1.3, 1e-5
    g_scan = jax.grad(lambda w: _objective(w, solver=solver))(w)
    g_dfx = jax.grad(lambda w: _objective(w, "diffeqsolve", solver))(w)
    fd = (_objective(w + h, solver=solver) - _objective(w - h, solver=solver)) / (2 * h)
    np.testing.assert_allclose(g_scan, fd, rtol=1e-4)
    np.testing.assert_allclose(g_dfx, g_scan, rtol=1e-8)  # adjoints agree


def test_eager_sample_does_not_retrace_the_score():
    """The shape check traces the score once per signature, not on every call."""
    traces = []

    def fn(t, x, args):
        traces.append(1)  # runs only while tracing
        return -x

    score = gd.ScoreFn(fn)
    ts = gd.uniform_grid(1.0, 1e-3, 5)
    for k in range(3):
        gd.sample(jr.key(k), SDE, score, (2,), num_particles=2, ts=ts)
    first = len(traces)
    for k in range(3):
        gd.sample(jr.key(k), SDE, score, (2,), num_particles=2, ts=ts)
    assert len(traces) == first


def test_a_new_function_per_call_that_recompiles_warns():
    """A plain-function schedule over the value an eager jax.grad differentiates,
    built anew in each call, compiled the sampler again on every call (seconds
    each) without a word; so did a new SMC potential per call. The second compile
    for new functions of the same code warns. Reusing a function object, building
    several from one factory within one call, and jax.jit do not."""
    sde = gd.VPSDE()
    s = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    ts = gd.uniform_grid(1.0, 1e-3, 3)

    def objective(a):
        w = lambda t: a * (1 - t)
        # the same object twice, and two functions from one code in one call
        g = gd.chain(
            gd.reward_guidance(s, w),
            gd.classifier_guidance(lambda t, x, y: a * x[0], w),
        )
        return gd.sample(
            jr.key(0), sde, gd.guide(s, g), (2,), num_particles=2, ts=ts
        ).ys.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.grad(objective)(1.0)  # the first compile
        step = jax.jit(jax.grad(objective))
        step(1.0), step(2.0)  # traced once: the second compile
    with pytest.warns(UserWarning, match="gd.sample is compiling again") as record:
        jax.grad(objective)(2.0)
    assert record[0].filename == __file__  # points at the user's line

    def smc(seed):
        return gd.smc_sample(jr.key(seed), sde, s, (2,), lambda x: -jnp.sum(x**2),
                             num_particles=2, ts=ts)  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smc(0)
        smc(1)  # a second compile may be a first one under jax.jit
    with pytest.warns(UserWarning, match="gd.smc_sample is compiling again"):
        smc(2)


def test_a_new_python_float_per_call_that_recompiles_warns():
    """A guidance with a Python float field compiled the sampler again for each new
    value, silently (a walkthrough: 0.8 s per call against 0.01 s with an array
    field). The third compile for new float values warns and names the fix; the
    same value again, or an array field, does not."""

    class Scaled(gd.AbstractGuidance):
        k: float  # not an array leaf: a static part of the program

        def apply(self, score, t, x, args):
            return self.k * score(t, x, args)

    sde = gd.VPSDE()
    s = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    ts = gd.uniform_grid(1.0, 1e-3, 3)

    def run(g):
        return gd.sample(jr.key(0), sde, gd.guide(s, g), (2,), num_particles=2, ts=ts)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(Scaled(1.0)), run(Scaled(1.5))
        run(Scaled(1.5))  # the same value: the compiled program, no trace
        for k in (1.0, 1.5, 2.0, 2.5):  # an array field: one program
            run(Scaled(jnp.asarray(k)))
    with pytest.warns(UserWarning, match="new values of a Python float") as record:
        run(Scaled(2.0))
    assert "eqx.field(converter=jnp.asarray)" in str(record[0].message)
    # floats that are static on purpose do not count (a review): an SDE's
    # T = eqx.field(static=True) and brownian_tol, which fix the program
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for T in (1.0, 0.9, 0.8):  # three: the warning's count
            gd.initial_noise(jr.key(0), gd.VPSDE(T=T), (2,), num_particles=2)
        for tol in (1e-2, 1e-3, 1e-4):
            gd.sample(jr.key(0), sde, s, (2,), num_particles=2, ts=ts,
                      brownian="tree", brownian_tol=tol)  # fmt: skip


def test_the_recompile_warning_counts_functions_and_floats_apart():
    """(a review) Each kind of change has its own count, and a value seen before
    does not count again: two float changes and one function change draw no
    warning. A new NaN object per call is a new program to JAX (nan != nan), so it
    counts; one NaN object is compiled once."""
    import math

    from guidediff._jit import filter_jit

    def make():
        @filter_jit
        def f(x, c, fn):
            return x * fn(c)

        return f

    def fns():
        return lambda c: c  # a new function object per call, of one code

    x, keep = jnp.ones(2), fns()
    f, g = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x, 1.0, keep), f(x, 2.0, keep)  # two float values
        f(x, 2.0, fns())  # a second function: no third anything
        f(x, 1.0, keep)  # both seen before (JAX's cache has it: not traced)
        # (another program: g, of another shape, has its own count)
        y = jnp.ones(3)
        for _ in range(3):
            g(y, math.nan, keep)  # one NaN object: compiled once
        g(y, float("nan"), keep)  # a second
    with pytest.warns(UserWarning, match="new values of a Python float"):
        g(y, float("nan"), keep)  # a third NaN object: a third program
    # a retrace for another reason warns no more (a review: once at 3, every later
    # trace warned): after jax.clear_caches() with values seen before
    jax.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x, 1.0, keep), g(y, math.nan, keep)


def test_the_recompile_warning_spares_distinct_functions_and_odd_statics():
    """(a review of the warning) Three different functions behind one wrapper
    (jax.checkpoint) are three programs, compiled once each: no warning. A static
    the code key cannot walk (a cycle) must not break the call."""
    import functools

    sde = gd.VPSDE()
    s = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    ts = gd.uniform_grid(1.0, 1e-3, 3)

    def run(log_lik):
        g = gd.guide(s, gd.classifier_guidance(log_lik, 1.0))
        return gd.sample(jr.key(0), sde, g, (2,), num_particles=2, ts=ts).ys

    wrapped = [
        jax.checkpoint(f)
        for f in (
            lambda t, x, y: -jnp.sum(x**2),
            lambda t, x, y: -jnp.sum(x),
            lambda t, x, y: x[0],
        )
    ]
    cyclic = {"scale": 1.0}
    cyclic["self"] = cyclic

    def scaled(config, t, x, y):
        return config["scale"] * x[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for f in wrapped:
                run(f)
        run(functools.partial(scaled, cyclic))


def test_equal_values_in_other_spellings_do_not_compile_again():
    """From a recompile audit: the same label spelled 1, np.int64(1), np.array(1) or
    a strong array; arguments the program does not use (max_steps of the scan
    driver, the tolerance of a tree that is not drawn, the noise of the ODE); a
    count given as a NumPy int; grid ends spelled 1.0, 1 or np.float64(1.0): each
    compiled the same program again (seconds per call)."""
    from guidediff import _grid, _metrics

    ts = jnp.linspace(1.0, 1e-3, 4)
    guided = gd.guide(COND, gd.cfg(1.0, null_args=3))
    run = lambda **kw: gd.sample(jr.key(0), SDE, guided, (2,), num_particles=2, ts=ts,
                                 **kw).ys  # fmt: skip
    first = run(args=1)
    before = _sample_jit._cached._cache_size()
    for label in (0, jnp.asarray(1)):  # weakly typed, as jax.jit sees them
        run(args=label)
    for kw in (dict(max_steps=99), dict(brownian_tol=1e-4)):
        np.testing.assert_array_equal(run(args=1, **kw), first)
    assert _sample_jit._cached._cache_size() == before
    # NumPy labels are strongly typed, in JAX's canonical dtype: one more program
    for label in (np.int64(1), np.array(1), np.int64(0), jnp.asarray(0, int)):
        run(args=label)
    assert _sample_jit._cached._cache_size() == before + 1
    ode = run(args=1, process="ode")
    before = _sample_jit._cached._cache_size()
    for kw in (dict(brownian="tree"), dict(brownian="tree", brownian_tol=0.01)):
        np.testing.assert_array_equal(run(args=1, process="ode", **kw), ode)
    assert _sample_jit._cached._cache_size() == before

    # and the types are as jax.jit would see them (a strong label would promote
    # differently with 16-bit and 8-bit arrays: other samples for the same label)
    from guidediff._sample import _args_as_arrays

    conv = _args_as_arrays({"a": 1, "b": 0.5, "c": np.int64(1), "d": jnp.asarray(1)})
    assert conv["a"].weak_type and conv["b"].weak_type and conv["d"].weak_type
    assert not conv["c"].weak_type and conv["c"].dtype == jnp.result_type(int)

    x = jr.normal(jr.key(1), (6, 2))
    gd.two_sample_test(x, x + 1, key=jr.key(2), num_permutations=20)
    gd.sliced_wasserstein(x, x + 1, key=jr.key(2), num_projections=8)
    counts = (_metrics._two_sample_test._cache_size(),
              _metrics._sliced_wasserstein._cache_size())  # fmt: skip
    gd.two_sample_test(x, x + 1, key=jr.key(2), num_permutations=np.int64(20))
    gd.sliced_wasserstein(x, x + 1, key=jr.key(2), num_projections=np.int32(8))
    assert (_metrics._two_sample_test._cache_size(),
            _metrics._sliced_wasserstein._cache_size()) == counts  # fmt: skip
    with pytest.raises(TypeError, match="num_permutations must be an int"):
        gd.two_sample_test(x, x + 1, key=jr.key(2), num_permutations=20.0)

    gd.logsnr_grid(SDE, 1.0, 1e-3, 5)
    before = _grid._logsnr_times._cached._cache_size()
    for start in (1, np.float64(1.0), jnp.asarray(1.0)):
        gd.logsnr_grid(SDE, start, 1e-3, 5)
    assert _grid._logsnr_times._cached._cache_size() == before
