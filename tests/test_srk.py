"""diffrax's stochastic Runge-Kutta solvers (ShARK, SRA1, ...) on the reverse SDE:
the grid and tree paths give them space-time Levy areas, the scan driver steps them
backwards in time correctly (diffrax's own reverse-time SRK is wrong, issue #598,
so driver="diffeqsolve" refuses them), and solvers of the wrong kind are clear
errors."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
MEAN, VAR = 2.0, 0.25
SCORE = gd.Gaussian(jnp.array([MEAN]), VAR * jnp.eye(1)).score(SDE)
TS = gd.uniform_grid(SDE.T, 1e-3, 20)


@pytest.mark.parametrize(
    "solver", [dfx.ShARK(), dfx.SRA1()], ids=lambda s: type(s).__name__
)
def test_srk_solvers_sample_the_gaussian_target_backwards_in_time(solver):
    """X0 ~ N(2, 0.25), exact score, 20 steps from T down to 1e-3. The weak error
    of these second-order solvers at 20 steps is about 0.005 in the mean and the
    variance (0.0054 / 0.0056 for ShARK, 0.0045 / 0.0066 for SRA1, measured with
    200,000 particles in float64, standard errors 0.0011 / 0.0008); Euler-Maruyama's
    is +0.058 / +0.026 there, so the bound 0.01 on top of 4 standard errors tells a
    second-order step from a first-order one. Inside diffeqsolve (diffrax #598)
    the variance came out near 6e5."""
    n = 20_000
    out = gd.sample(jr.key(1), SDE, SCORE, (1,), num_particles=n, ts=TS,
                    solver=solver, dtype=jnp.float64)  # fmt: skip
    assert int(out.num_failed) == 0
    y = np.asarray(out.ys[:, 0])
    se_mean, se_var = np.sqrt(VAR / n), VAR * np.sqrt(2 / (n - 1))
    assert abs(y.mean() - MEAN) < 4 * se_mean + 0.01
    assert abs(y.var(ddof=1) - VAR) < 4 * se_var + 0.01


def test_srk_on_a_virtual_tree_matches_the_grid_path_in_law():
    """brownian="tree" gives ShARK the tree's space-time areas (a query against the
    tree's direction is the forward interval's, negated, as diffrax asks for it):
    the same law as the grid path's samples (two independent sets of 4,000: the
    difference of means within 4 standard errors of a difference)."""
    n = 4000
    kw = dict(num_particles=n, ts=TS, solver=dfx.ShARK(), dtype=jnp.float64)
    grid = np.asarray(gd.sample(jr.key(2), SDE, SCORE, (1,), **kw).ys[:, 0])
    tree = gd.sample(jr.key(3), SDE, SCORE, (1,), brownian="tree", **kw)
    assert int(tree.num_failed) == 0
    tree = np.asarray(tree.ys[:, 0])
    assert abs(grid.mean() - tree.mean()) < 4 * np.sqrt(2 * VAR / n)
    assert abs(grid.var() - tree.var()) < 4 * VAR * np.sqrt(4 / n)


def test_grid_path_space_time_levy_area():
    """H over a cell of length h is N(0, h/12), independent of W; W is the same as
    without areas (the areas are another counter stream); a query against the
    grid's order is the cell's (dt, W, H) negated."""
    ts = jnp.array([0.0, 0.3, 1.0])
    shape = (20_000,)
    plain = gd.GridBrownianPath(shape, ts, jr.key(5))
    path = gd.GridBrownianPath(shape, ts, jr.key(5), dfx.SpaceTimeLevyArea)
    fwd = path.evaluate(0.3, 1.0, use_levy=True)
    assert isinstance(fwd, dfx.SpaceTimeLevyArea)
    np.testing.assert_array_equal(fwd.W, plain.evaluate(0.3, 1.0))
    h, n = 0.7, shape[0]
    var = np.var(np.asarray(fwd.H))
    assert abs(var - h / 12) < 4 * (h / 12) * np.sqrt(2 / n)
    corr = np.corrcoef(np.asarray(fwd.W), np.asarray(fwd.H))[0, 1]
    assert abs(corr) < 4 / np.sqrt(n)
    back = path.evaluate(1.0, 0.3, use_levy=True)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(fwd), strict=True):
        np.testing.assert_array_equal(a, -b)
    # BrownianIncrement paths answer use_levy=True with diffrax's increment object
    inc = plain.evaluate(0.3, 1.0, use_levy=True)
    assert isinstance(inc, dfx.BrownianIncrement)
    with pytest.raises(ValueError, match="levy_area"):
        gd.GridBrownianPath(shape, ts, jr.key(5), dfx.SpaceTimeTimeLevyArea)


@pytest.mark.parametrize(
    "kw",
    [
        dict(driver="diffeqsolve"),
        dict(stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3)),
    ],
    ids=["diffeqsolve", "adaptive"],
)
def test_diffeqsolve_refuses_srk_solvers(kw):
    with pytest.raises(ValueError, match="#598"):
        gd.sample(jr.key(0), SDE, SCORE, (1,), num_particles=2, ts=TS,
                  solver=dfx.ShARK(), **kw)  # fmt: skip


@pytest.mark.parametrize(
    "solver, kw, match",
    [
        (dfx.EulerHeun(), dict(process="ode"), "pair of terms"),
        (dfx.ShARK(), dict(process="ode"), "pair of terms"),
        (dfx.ALIGN(0.1), dict(), "Langevin"),
        (dfx.Tsit5(), dict(process="ode", adjoint=dfx.ImplicitAdjoint(),
                           stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3)),
         "ImplicitAdjoint"),
    ],
    ids=["eulerheun-ode", "shark-ode", "align", "implicit-adjoint"],
)  # fmt: skip
def test_solvers_and_adjoints_of_the_wrong_kind_are_clear_errors(solver, kw, match):
    """Each was accepted before: an SDE-only solver on the ODE failed inside
    diffrax with an AttributeError on its terms, and ImplicitAdjoint (for steady
    states) gave a zero gradient."""
    with pytest.raises(ValueError, match=match):
        gd.sample(jr.key(0), SDE, SCORE, (1,), num_particles=2, ts=TS,
                  solver=solver, **kw)  # fmt: skip


def test_srk_forward_mode_and_16_bit_trees():
    """From a review: forward mode through ShARK failed on the scan driver (its
    stages ran as a custom_vjp scan, reverse mode only), and float16 particles on a
    tree path failed every particle (diffrax's space-time tree is NaN in float16;
    it is drawn in float32 now); a HalfSolver hid the solver's Levy area from the
    checks (diffrax's internal errors instead of the #598 refusal)."""
    ts = gd.uniform_grid(SDE.T, 1e-3, 10)

    def loss(m):
        score = gd.Gaussian(jnp.array([m]), VAR * jnp.eye(1)).score(SDE)
        ys = gd.sample(jr.key(3), SDE, score, (1,), num_particles=3, ts=ts,
                       solver=dfx.ShARK()).ys  # fmt: skip
        return jnp.sum(ys**2)

    _, tangent = jax.jvp(loss, (1.3,), (1.0,))
    np.testing.assert_allclose(tangent, jax.grad(loss)(1.3), rtol=1e-5)

    def half(m):  # a HalfSolver's inner Runge-Kutta stages: both modes too
        score = gd.Gaussian(jnp.array([m]), VAR * jnp.eye(1)).score(SDE)
        return gd.sample(jr.key(0), SDE, score, (1,), num_particles=2, ts=ts,
                         process="ode", solver=dfx.HalfSolver(dfx.Heun())).ys.sum()  # fmt: skip

    _, tangent = jax.jvp(half, (1.3,), (1.0,))
    np.testing.assert_allclose(tangent, jax.grad(half)(1.3), rtol=1e-5)
    out = gd.sample(jr.key(0), SDE, SCORE, (1,), num_particles=64, ts=ts,
                    solver=dfx.ShARK(), dtype=jnp.float16, brownian="tree")  # fmt: skip
    assert int(out.num_failed) == 0 and out.ys.dtype == jnp.float16
    with pytest.raises(ValueError, match="#598"):
        gd.sample(jr.key(0), SDE, SCORE, (1,), num_particles=2, ts=ts,
                  solver=dfx.HalfSolver(dfx.ShARK()),
                  stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3))  # fmt: skip
