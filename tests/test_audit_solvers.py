"""Regressions from an audit of the solvers, the drivers and the grid noise: each
test failed before its fix."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize

import guidediff as gd
from guidediff._sample import _per_particle_steps


SDE = gd.VPSDE()
COV = jnp.diag(jnp.array([0.5, 2.0]))
KEY = jr.key(0)


@pytest.mark.parametrize(
    "driver, solver",
    [
        ("scan", dfx.Tsit5()),
        ("diffeqsolve", dfx.Tsit5()),
        ("scan", dfx.HalfSolver(dfx.Tsit5())),
    ],
    ids=["scan", "diffeqsolve", "half-scan"],
)
def test_truncated_backprop_with_an_fsal_solver_is_the_last_k_steps(driver, solver):
    """Tsit5 carries f(t, y) from one step to the next (FSAL): at the cut it is the
    tail's own first evaluation, so its parameter gradient belongs to the last K
    steps (it was stopped with the rest of the head's state; inside a HalfSolver,
    whose tableau the check did not see, until a review)."""
    n, k = 4, 2
    ts = gd.uniform_grid(1.0, 1e-3, n)
    y0 = gd.initial_noise(KEY, SDE, (2,), num_particles=2)

    def run(mu, y0, ts, **kw):
        score = gd.Gaussian(mu, COV).score(SDE)
        return gd.sample(
            KEY, SDE, score, (2,), y0=y0, ts=ts, process="ode", solver=solver,
            driver=driver, **kw,
        ).ys  # fmt: skip

    mu = jnp.array([1.0, -2.0])
    truncated = jax.grad(lambda m: run(m, y0, ts, truncate_backprop=k).sum())(mu)
    y_cut = run(mu, y0, ts, save_trajectory=True)[:, n - k]
    tail = jax.grad(lambda m: run(m, y_cut, ts[n - k :]).sum())(mu)
    np.testing.assert_allclose(truncated, tail, rtol=1e-10)


def test_a_solver_asking_for_part_of_a_step_gets_no_grid_noise():
    """diffrax.HalfSolver asks for the noise of half steps; the grid path only has
    whole cells and gives NaN for part of one (the scan driver handed it the whole
    cell's increment twice: a variance of about 4 instead of 1). gd.sample and
    smc_sample refuse the combination up front (every particle failed, and SMC
    took the two half steps for one Gaussian step; a review)."""
    score = gd.Gaussian(jnp.zeros(1), jnp.eye(1)).score(SDE)
    ts = gd.uniform_grid(1.0, 1e-3, 10)
    half = dfx.HalfSolver(dfx.Euler())
    for driver in ("scan", "diffeqsolve"):
        with pytest.raises(ValueError, match="takes half steps"):
            gd.sample(KEY, SDE, score, (1,), num_particles=4, ts=ts, solver=half,
                      driver=driver)  # fmt: skip
    with pytest.raises(ValueError, match="takes half steps"):
        gd.smc_sample(KEY, SDE, score, (1,), lambda x: -jnp.sum(x**2),
                      num_particles=4, ts=ts, solver=half)  # fmt: skip
    path = gd.GridBrownianPath((1,), ts, KEY)
    assert bool(jnp.all(jnp.isnan(path.evaluate(ts[1], (ts[0] + ts[1]) / 2))))


def test_wrapped_solvers_are_checked_as_the_solver_they_wrap():
    """From a review: diffrax.HalfSolver hid its solver's SDE (a DDIM built for
    another SDE was accepted: error 0.59 for 0.037), and its stage at the step's
    end from the network-at-t = 0 check (every particle failed, no reason);
    ReversibleHeun evaluates there too. HalfSolver gives the probability-flow
    solvers the error estimate adaptive steps need."""
    other = gd.VPSDE(gd.LinearBeta(0.1, 10.0))
    score = gd.Gaussian(jnp.zeros(2), COV).score(SDE)
    kw = dict(num_particles=2, ts=gd.uniform_grid(1.0, 1e-3, 4), process="ode")
    with pytest.raises(ValueError, match="different SDE"):
        gd.sample(KEY, SDE, score, (2,), solver=dfx.HalfSolver(gd.DDIM(other)), **kw)
    eps = gd.EpsScore(lambda t, x, a: 0.5 * x, SDE)
    to_zero = dict(num_particles=2, ts=gd.uniform_grid(1.0, 0.0, 4), process="ode")
    for solver in (dfx.HalfSolver(dfx.Heun()), dfx.ReversibleHeun()):
        with pytest.raises(ValueError, match="ends at t = 0"):
            gd.sample(KEY, SDE, eps, (2,), solver=solver, **to_zero)
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    ends = jnp.array([1.0, 1e-3])
    with pytest.raises(ValueError, match=r"wrap it, diffrax.HalfSolver\(gd.UniPC"):
        gd.sample(KEY, SDE, score, (2,), num_particles=2, ts=ends, process="ode",
                  solver=gd.UniPC(SDE), stepsize_controller=pid)  # fmt: skip
    with pytest.raises(ValueError, match="HalfSolver runs on fixed grids only"):
        gd.sample(KEY, SDE, score, (2,), num_particles=2, ts=ends, brownian="tree",
                  solver=dfx.HalfSolver(gd.SDEDPMSolverPP(SDE)),
                  stepsize_controller=pid)  # fmt: skip
    # its dense output is the full step's (saved states off), and BacksolveAdjoint
    # steps a tuple-valued adjoint ODE with the solver (an AttributeError)
    half = dict(num_particles=2, ts=ends, process="ode",
                solver=dfx.HalfSolver(gd.DPMSolverPP(SDE)), stepsize_controller=pid)  # fmt: skip
    with pytest.raises(ValueError, match="dense output is its full step's"):
        gd.sample(KEY, SDE, score, (2,), save_trajectory=True, **half)
    fixed = dict(half, ts=gd.logsnr_grid(SDE, 1.0, 1e-3, 4), stepsize_controller=None)
    with pytest.raises(ValueError, match="dense output is its full step's"):
        gd.sample(KEY, SDE, score, (2,), save_trajectory=True, driver="diffeqsolve",
                  **fixed)  # fmt: skip
    with pytest.raises(ValueError, match="BacksolveAdjoint.*probability-flow terms"):
        gd.sample(KEY, SDE, score, (2,), adjoint=dfx.BacksolveAdjoint(), **half)


def test_adaptive_gradients_with_particles_finishing_first():
    """From a review: adaptive solves are vmapped per particle, and one that has
    finished takes zero-length steps while the others go on. The exponential
    integrator divided 0 by 0 there (and read the direction of time off the step's
    sign: the time -t, a NaN marginal), so the gradient was NaN although the
    samples were right."""
    score = lambda m: gd.Gaussian(m, COV).score(SDE)
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)

    def mean(m):
        return jnp.mean(gd.sample(
            KEY, SDE, score(m), (2,), num_particles=3, ts=jnp.array([1.0, 1e-3]),
            solver=dfx.HalfSolver(gd.ExponentialIntegrator(SDE)), brownian="tree",
            stepsize_controller=pid,
        ).ys)  # fmt: skip

    grad = jax.grad(mean)(jnp.array([1.0, -2.0]))
    # the exact reverse SDE's sample is alpha(1e-3) mu + terms free of mu, so
    # d E[y] / d mu = alpha / 2 per coordinate (the mean over both), up to the
    # discretisation at rtol 1e-3 (1 - 3 % seen)
    np.testing.assert_allclose(grad, SDE.marginal(1e-3)[0] / 2, rtol=0.05)


@pytest.mark.parametrize("sigma_max", [100.0, 1000.0])
def test_float16_particles_with_a_wide_ve_sde(sigma_max):
    """g(t)^2 of VESDE(sigma_max=100) is 1.8e5, beyond float16's 65504: the reverse
    drift is formed in float32 and rounded once (it was inf: every particle NaN),
    and the exact score's squared distances too (a coordinate of 269 at t = T
    overflowed, a NaN score). At sigma_max = 1000 the drift g^2 s itself passes
    65504 for a particle beyond about 2.9 sigma near T (1 % failed): the exponential
    integrator now takes the score from the score, not read back from the 16-bit
    drift."""
    sde = gd.VESDE(sigma_max=sigma_max)
    score = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    out = gd.sample(
        KEY, sde, score, (2,), num_particles=400, ts=gd.uniform_grid(1.0, 1e-3, 100),
        dtype=jnp.float16,
    )  # fmt: skip
    assert out.ys.dtype == jnp.float16 and int(out.num_failed) == 0
    # N(0, I) data: the sample variance of 800 coordinates is 1 within 5 SE
    var = float(jnp.var(out.ys.astype(jnp.float32)))
    assert abs(var - 1.0) < 5 * np.sqrt(2 / 800) + 0.1  # + the 100-step bias


def test_only_explicit_solvers_share_one_batched_solve():
    for solver in (dfx.Euler(), dfx.Heun(), dfx.Tsit5(), gd.ExponentialIntegrator(SDE)):
        assert _per_particle_steps(solver), solver
    tol = optx.Chord(rtol=1e-6, atol=1e-6)
    for solver in (
        dfx.Kvaerno3(root_finder=tol),  # a Newton solve over the whole batch
        dfx.ItoMilstein(),  # the diffusion's Jacobian over the whole batch
    ):
        assert not _per_particle_steps(solver), solver
    # an implicit solver with tolerances: per particle, the scan driver's samples
    score = gd.Gaussian(jnp.zeros(2), COV).score(SDE)
    kw = dict(num_particles=3, ts=gd.uniform_grid(1.0, 1e-3, 8), process="ode")
    a = gd.sample(KEY, SDE, score, (2,), solver=dfx.Kvaerno3(root_finder=tol), **kw)
    b = gd.sample(
        KEY, SDE, score, (2,), solver=dfx.Kvaerno3(root_finder=tol),
        driver="diffeqsolve", **kw,
    )  # fmt: skip
    np.testing.assert_allclose(a.ys, b.ys, rtol=1e-5)


@pytest.mark.parametrize("driver", ["scan", "diffeqsolve"])
def test_implicit_solver_without_tolerances_is_a_clear_error(driver):
    score = gd.Gaussian(jnp.zeros(2), COV).score(SDE)
    with pytest.raises(ValueError, match="root finder has no tolerances"):
        gd.sample(
            KEY, SDE, score, (2,), num_particles=2, process="ode",
            solver=dfx.Kvaerno3(), driver=driver,
        )  # fmt: skip


def test_constant_step_size_controller_points_to_ts():
    score = gd.Gaussian(jnp.zeros(2), COV).score(SDE)
    with pytest.raises(ValueError, match="pass the fixed grid as ts="):
        gd.sample(
            KEY, SDE, score, (2,), num_particles=2,
            stepsize_controller=dfx.ConstantStepSize(),
        )  # fmt: skip


@pytest.mark.parametrize(
    "make, process",
    [
        (gd.ExponentialIntegrator, "sde"),
        (gd.SDEDPMSolverPP, "sde"),
        (gd.DDIM, "ode"),
        (gd.DPMSolverPP, "ode"),
    ],
)
def test_schedule_gradients_on_a_grid_ending_at_zero(make, process):
    """sigma(0) = 0: its square root and the log-SNR there have infinite derivatives;
    the samples are finite and so must the gradients be (they were NaN)."""
    ts = gd.uniform_grid(1.0, 0.0, 6)
    mu = jnp.array([1.0, -2.0])

    def f(beta_max):
        sde = gd.VPSDE(gd.LinearBeta(0.1, beta_max))
        score = gd.Gaussian(mu, COV).score(sde)
        ys = gd.sample(
            KEY, sde, score, (2,), num_particles=2, ts=ts, process=process,
            solver=make(sde),
        ).ys  # fmt: skip
        return jnp.mean(ys**2)

    b, h = jnp.asarray(20.0), 1e-5
    fd = (f(b + h) - f(b - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(b), fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("make", [gd.ExponentialIntegrator, gd.SDEDPMSolverPP])
def test_reverse_sde_solvers_refuse_forward_steps(make):
    """A step forward in the SDE's time has a negative Gaussian variance: it was
    clipped to zero, dropping the noise silently (the law did not converge). It is
    NaN now; backward (sampling) stays finite."""
    sde = gd.VPSDE()
    score = gd.Gaussian(jnp.zeros(1), jnp.eye(1)).score(sde)
    solver = make(sde)

    def run(ts):
        path = gd.GridBrownianPath(jax.ShapeDtypeStruct((1,), ts.dtype), ts, KEY)
        return dfx.diffeqsolve(
            gd.reverse_sde(sde, score, path), solver, ts[0], ts[-1], None,
            jnp.ones(1), stepsize_controller=dfx.StepTo(ts),
            adjoint=dfx.ForwardMode(),
        ).ys  # fmt: skip

    grid = jnp.linspace(0.2, 0.4, 5)
    assert bool(jnp.all(jnp.isfinite(run(grid[::-1]))))
    assert bool(jnp.all(jnp.isnan(run(grid))))


def test_prior_draw_and_brownian_noise_are_independent():
    """One exponential-integrator step from the prior is exact for point-mass data
    (the step is the posterior q(x_t | x_T, x_0)): N(0, sigma_t^2) at the step's end,
    through `gd.sample`'s own keys. Were the prior draw and the step's noise drawn
    from one key they would be the same normals, and the variance half (the step's
    end at lambda_T + log 2, where the coupling matters most). Tolerance: 4 standard
    errors of the pooled sample variance."""
    lam_end = float(SDE.log_snr(SDE.T)) + np.log(2.0)
    t_end = scipy.optimize.brentq(lambda t: float(SDE.log_snr(t)) - lam_end, 1e-3, 1.0)
    score = gd.Gaussian(jnp.zeros(2), 1e-12 * jnp.eye(2)).score(SDE)
    p = 4000
    out = gd.sample(KEY, SDE, score, (2,), num_particles=p,
                    ts=jnp.array([SDE.T, t_end]), solver=gd.ExponentialIntegrator(SDE))  # fmt: skip
    ratio = float(jnp.mean(out.ys**2)) / float(SDE.marginal(t_end)[1]) ** 2
    assert abs(ratio - 1) < 4 * np.sqrt(2 / (2 * p)), ratio


def test_a_foreign_drift_term_gives_the_native_steps():
    """The solvers read the score back from a drift term that is not guidediff's own
    (s = (f x - v) / (c g^2), e.g. a user's `dfx.ODETerm`): the same steps as with
    the native term, for DDIM (the flow) and the exponential integrator (the SDE)."""
    score = gd.Gaussian(jnp.array([1.0, -1.0]), 0.5 * jnp.eye(2)).score(SDE)
    ts = gd.logsnr_grid(SDE, SDE.T, 1e-3, 6)
    y0 = jnp.array([0.3, -0.7])

    def run(terms, solver):
        return dfx.diffeqsolve(terms, solver, ts[0], ts[-1], None, y0,
                               stepsize_controller=dfx.StepTo(ts)).ys[-1]  # fmt: skip

    flow = gd.probability_flow(SDE, score)
    foreign = dfx.ODETerm(lambda t, y, a: flow.vector_field(t, y, a))
    ddim = gd.DDIM(SDE)
    np.testing.assert_allclose(run(foreign, ddim), run(flow, ddim), rtol=1e-10)
    path = gd.GridBrownianPath((2,), ts, KEY)
    native = gd.reverse_sde(SDE, score, path)
    drift = native.terms[0]
    foreign = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, a: drift.vector_field(t, y, a)), native.terms[1]
    )
    expint = gd.ExponentialIntegrator(SDE)
    np.testing.assert_allclose(run(foreign, expint), run(native, expint), rtol=1e-10)
