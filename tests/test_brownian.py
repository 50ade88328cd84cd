"""The grid Brownian path: law, direction conventions, drivers, errors."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats
from helpers import three_class_gmm

import guidediff as gd


TS = gd.uniform_grid(1.0, 1e-3, 50)


def test_increments_are_standard_normal():
    path = gd.GridBrownianPath((3,), TS, jr.key(0))
    sorted_ts = jnp.sort(TS)
    incs = jax.vmap(lambda a, b: path.evaluate(a, b))(sorted_ts[:-1], sorted_ts[1:])
    z = np.asarray(incs / jnp.sqrt(jnp.diff(sorted_ts))[:, None]).ravel()
    keys = jax.vmap(lambda i: jr.fold_in(jr.key(1), i))(jnp.arange(200))
    many = jax.vmap(lambda k: gd.GridBrownianPath((3,), TS, k).evaluate(TS[5], TS[4]))(
        keys
    )
    z = np.concatenate([z, np.asarray(many / jnp.sqrt(TS[4] - TS[5])).ravel()])
    # KS test at a stated false-alarm rate of 0.1%
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    # reversing the interval negates the increment
    np.testing.assert_array_equal(
        path.evaluate(TS[3], TS[4]), -path.evaluate(TS[4], TS[3])
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_cell_normal_law_and_independence(dtype):
    """Counter-mode Threefry normals: N(0, 1) (KS test at a 0.1% false-alarm rate),
    uncorrelated across cells, coordinates and particles (each sample correlation
    within 4/sqrt(n) of 0), and a pure function of (key, cell)."""
    from guidediff._brownian import cell_normal

    keys = jax.vmap(lambda i: jr.fold_in(jr.key(7), i))(jnp.arange(400))
    draw = jax.jit(
        jax.vmap(
            jax.vmap(lambda k, c: cell_normal(k, c, (5,), dtype), (None, 0)), (0, None)
        )
    )
    z = np.asarray(draw(keys, jnp.arange(6)), np.float64)  # (particles, cells, 5)
    assert z.dtype == np.float64 and z.shape == (400, 6, 5)
    assert scipy.stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    n = z.shape[0]
    for a, b in [
        ((0, 0), (1, 0)),
        ((0, 0), (0, 1)),
        ((2, 3), (5, 3)),
        ((1, 4), (1, 2)),
    ]:
        r = np.corrcoef(z[:, a[0], a[1]], z[:, b[0], b[1]])[0, 1]
        assert abs(r) < 4 / np.sqrt(n)
    # neighbouring particles (keys) are uncorrelated too
    r = np.corrcoef(z[:-1, 0, 0], z[1:, 0, 0])[0, 1]
    assert abs(r) < 4 / np.sqrt(n)
    again = np.asarray(draw(keys, jnp.arange(6)), np.float64)
    np.testing.assert_array_equal(z, again)


def test_cell_normal_key_kinds():
    """Raw uint32 keys give the same draws as typed Threefry keys; keys of other
    PRNG implementations are hashed to a Threefry key, so their draws commute with
    vmap (JAX's own rbg draws under vmap come from the batch's first key only)."""
    from guidediff._brownian import cell_normal, threefry_key

    typed = jr.key(3)
    raw = jr.key_data(typed)
    np.testing.assert_array_equal(
        cell_normal(typed, 4, (3,), jnp.float32), cell_normal(raw, 4, (3,), jnp.float32)
    )
    assert threefry_key(typed) is typed
    draw = jax.vmap(lambda k: cell_normal(k, 4, (3,), jnp.float32))
    for impl in ("rbg", "unsafe_rbg"):
        keys = jr.split(jr.key(3, impl=impl), 4)
        one = np.stack([cell_normal(k, 4, (3,), jnp.float32) for k in keys])
        np.testing.assert_array_equal(draw(keys), one)
        np.testing.assert_array_equal(
            one[1], cell_normal(threefry_key(keys[1]), 4, (3,), jnp.float32)
        )
        # distinct keys, distinct hashed keys (and raw rbg data hashes the same)
        hashed = np.asarray(jax.vmap(lambda k: jr.key_data(threefry_key(k)))(keys))
        assert len({tuple(h) for h in hashed}) == len(keys)
        np.testing.assert_array_equal(
            jr.key_data(threefry_key(jr.key_data(keys[2]))), hashed[2]
        )
    with pytest.raises(TypeError, match="PRNG key"):
        threefry_key(jnp.zeros(2))


def test_not_a_grid_cell_is_an_error():
    path = gd.GridBrownianPath((2,), TS, jr.key(0))
    # not a grid cell: NaN increments (the particles of such a solve fail, flagged)
    assert np.all(np.isnan(np.asarray(path.evaluate(TS[5], TS[3]))))
    sde, gmm = gd.VPSDE(), three_class_gmm()
    fine = gd.uniform_grid(1.0, 1e-3, 100)
    terms = gd.reverse_sde(sde, gmm.score(sde), path)
    sol = dfx.diffeqsolve(
        terms,
        dfx.Euler(),
        1.0,
        1e-3,
        None,
        jnp.zeros(2),
        stepsize_controller=dfx.StepTo(fine),
        throw=False,
    )
    assert not np.all(np.isfinite(np.asarray(sol.ys)))
    with pytest.raises(ValueError, match="point values"):
        path.evaluate(TS[5])


@pytest.mark.parametrize("solver", [None, dfx.Euler()], ids=["exp-integrator", "euler"])
def test_scan_and_diffeqsolve_drivers_agree(solver):
    gmm = three_class_gmm()
    sde = gd.VPSDE()
    kw = dict(num_particles=64, ts=TS, solver=solver)
    a = gd.sample(jr.key(0), sde, gmm.score(sde), (2,), driver="scan", **kw)
    b = gd.sample(jr.key(0), sde, gmm.score(sde), (2,), driver="diffeqsolve", **kw)
    np.testing.assert_allclose(a.ys, b.ys, rtol=1e-12, atol=1e-12)
    traj_a = gd.sample(
        jr.key(0), sde, gmm.score(sde), (2,), driver="scan", save_trajectory=True, **kw
    )
    traj_b = gd.sample(
        jr.key(0),
        sde,
        gmm.score(sde),
        (2,),
        driver="diffeqsolve",
        save_trajectory=True,
        **kw,
    )
    assert traj_a.ys.shape == (64, TS.shape[0], 2)
    np.testing.assert_allclose(traj_a.ys, traj_b.ys, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(traj_a.ys[:, -1], a.ys, rtol=1e-12)


def test_drivers_agree_on_y0_denoise_and_one_particle():
    """The diffeqsolve driver solves all particles as one batched state on a fixed
    grid: y0=, denoise= and a single particle give what the scan driver gives."""
    gmm = three_class_gmm()
    sde = gd.VPSDE()
    score = gmm.score(sde)
    y0 = gd.initial_noise(jr.key(2), sde, (2,), num_particles=16) * 0.5
    kw = dict(ts=TS, y0=y0, denoise=True)
    a = gd.sample(jr.key(2), sde, score, (2,), driver="scan", **kw)
    b = gd.sample(jr.key(2), sde, score, (2,), driver="diffeqsolve", **kw)
    np.testing.assert_allclose(a.ys, b.ys, rtol=1e-12, atol=1e-12)
    assert b.failed.shape == b.num_steps.shape == (16,) and not np.any(b.failed)
    one_a = gd.sample(jr.key(3), sde, score, (2,), ts=TS, driver="scan")
    one_b = gd.sample(jr.key(3), sde, score, (2,), ts=TS, driver="diffeqsolve")
    assert one_b.ys.shape == (2,) and one_b.failed.shape == ()
    np.testing.assert_allclose(one_a.ys, one_b.ys, rtol=1e-12, atol=1e-12)


def test_failed_particles_are_flagged_not_raised():
    sde = gd.VPSDE()
    bad = gd.ScoreFn(lambda t, x, args: jnp.where(x[0] > 1.5, jnp.nan, -x))
    out = gd.sample(jr.key(0), sde, bad, (2,), num_particles=200, ts=TS)
    assert 0 < int(out.num_failed) < 200
    assert np.all(np.isfinite(np.asarray(out.ys)[~np.asarray(out.failed)]))


def test_error_if_is_differentiable():
    # the grid path is an ordinary function: reverse mode works through it
    f = lambda s: jnp.sum(
        gd.GridBrownianPath((2,), TS * s, jr.key(0)).evaluate(TS[3] * s, TS[2] * s)
    )
    g = jax.grad(f)(1.0)
    assert np.isfinite(float(g))
    assert isinstance(eqx.filter_eval_shape(f, 1.0), jax.ShapeDtypeStruct)


def test_float64_without_x64_draws_float32_normals():
    """dtype=float64 with jax_enable_x64 off is float32 (as for JAX's own arrays):
    the normals are the float32 ones, not float32 words read as float64 halves."""
    from guidediff._brownian import cell_normal

    with jax.enable_x64(False):
        z64 = cell_normal(jr.key(0), 3, (4000,), jnp.float64)
        z32 = cell_normal(jr.key(0), 3, (4000,), jnp.float32)
        assert z64.dtype == jnp.float32
        np.testing.assert_array_equal(z64, z32)
        with pytest.warns(UserWarning, match="64-bit types need jax_enable_x64"):
            y64 = gd.initial_noise(
                jr.key(0), gd.VPSDE(), (2,), num_particles=3, dtype=jnp.float64
            )
        assert y64.dtype == jnp.float32


def test_sixteen_bit_draws_are_the_float32_draws_rounded():
    """Prior draws and Brownian increments in bfloat16 / float16 are the float32
    draws rounded, so a 16-bit run starts where the float32 run does."""
    from guidediff._brownian import cell_normal

    sde = gd.VPSDE()
    y32 = gd.initial_noise(jr.key(0), sde, (3,), num_particles=5, dtype=jnp.float32)
    for dt in (jnp.bfloat16, jnp.float16):
        y16 = gd.initial_noise(jr.key(0), sde, (3,), num_particles=5, dtype=dt)
        np.testing.assert_array_equal(y16, y32.astype(dt))
        np.testing.assert_array_equal(
            cell_normal(jr.key(1), 2, (3,), dt),
            cell_normal(jr.key(1), 2, (3,), jnp.float32).astype(dt),
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cell_normal_is_the_documented_construction(dtype):
    """Rebuilt in NumPy from the docstring: block j of cell k hashes the counter
    (k, j); float32 values take one word, float64 two (hi, lo); the top mantissa bits
    give a uniform on [0, 1), mapped to [nextafter(-1, 0), 1) and through
    sqrt(2) erfinv. Moment tests cannot see float64 normals built from 32 bits."""
    from jax.extend.random import threefry_2x32
    from scipy.special import erfinv

    from guidediff._brownian import cell_normal

    key, k, n = jr.key(7), 5, 6
    wide = dtype == jnp.float64
    blocks = n if wide else (n + 1) // 2
    counts = jnp.concatenate([jnp.full((blocks,), k, jnp.uint32),
                              jnp.arange(blocks, dtype=jnp.uint32)])  # fmt: skip
    words = np.asarray(threefry_2x32(jr.key_data(key), counts)).astype(np.uint64)
    if wide:
        bits, nmant = (words[0 : 2 * n : 2] << np.uint64(32)) | words[1 : 2 * n : 2], 52
        unit = (bits >> np.uint64(64 - nmant)).astype(np.float64) / 2.0**nmant
    else:
        unit = (words[:n] >> np.uint64(32 - 23)).astype(np.float64) / 2.0**23
    lo = np.nextafter(np.asarray(-1.0, dtype), np.asarray(0.0, dtype)).astype(
        np.float64
    )
    want = np.sqrt(2) * erfinv(np.maximum(lo, unit * (1 - lo) + lo))
    got = cell_normal(key, k, (n,), dtype)
    rtol = 1e-12 if wide else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol)


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations."""
    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _equations(sub)


def test_the_scan_driver_traces_no_per_step_cell_check():
    """The driver hands the solver the step's own times, so the one-step path gives
    its increment without comparing them (a compare, an `and` and a select per step
    before: XLA cannot fold `t == t` for floats); another interval is still NaN."""
    from guidediff._brownian import _StepIncrement

    score = gd.ScoreFn(lambda t, x, args: -x)
    for solver in [dfx.Euler(), dfx.ShARK()]:
        jaxpr = jax.make_jaxpr(
            lambda key, solver=solver: (
                gd.sample(
                    key,
                    gd.VPSDE(),
                    score,
                    (2,),
                    ts=TS[:5],
                    solver=solver,
                    checkpoint=False,
                ).ys
            )
        )(jr.key(0))
        scans = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "scan"]
        (step,) = [e for e in scans if e.params["length"] == 4]  # the 4 steps
        body = {e.primitive.name for e in _equations(step.params["jaxpr"].jaxpr)}
        assert "and" not in body, type(solver).__name__
        if isinstance(solver, dfx.Euler):
            assert not {"eq", "select_n"} & body
    inc = jnp.ones(2)
    path = _StepIncrement(inc, TS[3], TS[4])
    np.testing.assert_array_equal(path.evaluate(TS[3], TS[4]), inc)
    np.testing.assert_array_equal(path.evaluate(jnp.array(TS[3]), TS[4]), inc)
    half = 0.5 * (TS[3] + TS[4])
    assert np.all(np.isnan(np.asarray(path.evaluate(TS[3], half))))
