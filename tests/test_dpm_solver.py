r"""DDIM, DPM-Solver++(2M) and UniPC against the closed-form probability-flow map.

For Gaussian data $N(\mu, \mathrm{diag}(c))$ the time-$t$ marginal is
$N(\alpha_t\mu, \mathrm{diag}(s_t^2))$ with $s_t^2 = \alpha_t^2 c + \sigma_t^2$, and
the probability-flow ODE keeps each standardised coordinate
$(x_i - \alpha_t\mu_i)/s_{t,i}$ fixed (a monotone affine map between 1-D
Gaussians). So the exact solution from $T$ to $\varepsilon$ is known, and the
solvers' errors and convergence orders are measured against it, in float64,
without Monte Carlo.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


SDE = gd.VPSDE()
MU = jnp.array([1.0, -2.0])
C = jnp.array([0.5, 2.0])
DATA = gd.Gaussian(MU, jnp.diag(C))
EPS = 1e-3
Y_T = jr.normal(jr.key(0), (16, 2))


def _exact(y, t_from, t_to, mu=MU, sde=SDE):
    a0, s0 = sde.marginal(t_from)
    a1, s1 = sde.marginal(t_to)
    std0, std1 = jnp.sqrt(a0**2 * C + s0**2), jnp.sqrt(a1**2 * C + s1**2)
    return a1 * mu[None] + (std1 / std0)[None] * (y - a0 * mu[None])


def _sample(solver, n, driver=None, mu=MU, sde=SDE):
    """Solve from Y_T (standard normals scaled to the SDE's prior) on a log-SNR grid."""
    data = gd.Gaussian(mu, jnp.diag(C))
    ts = gd.logsnr_grid(sde, sde.T, EPS, n)
    return gd.sample(
        jr.key(0),
        sde,
        data.score(sde),
        (2,),
        y0=Y_T * sde.prior_std(),
        ts=ts,
        process="ode",
        solver=solver,
        driver=driver,
    ).ys


def _error(solver, n, sde=SDE):
    exact = _exact(Y_T * sde.prior_std(), sde.T, EPS, sde=sde)
    return float(jnp.max(jnp.abs(_sample(solver, n, sde=sde) - exact)))


VE = gd.VESDE(sigma_max=20.0)


@pytest.mark.parametrize(
    "solver, order, sde",
    [
        (gd.DDIM(SDE), 1, SDE),
        (gd.DPMSolverPP(SDE), 2, SDE),
        (gd.DPMSolverPP(VE), 2, VE),
        (gd.UniPC(SDE), 3, SDE),
        (gd.UniPC(VE, "bh1"), 3, VE),
    ],
    ids=["ddim-vp", "dpm-vp", "dpm-ve", "unipc-vp", "unipc-bh1-ve"],
)
def test_convergence_order_against_the_exact_flow(solver, order, sde):
    errs = np.array([_error(solver, n, sde) for n in (16, 32, 64)])
    observed = np.log2(errs[:-1] / errs[1:])
    assert np.all(errs[1:] < errs[:-1])
    assert abs(observed[-1] - order) < 0.2, observed
    assert solver.order(None) == order


def test_second_order_beats_first_order_and_heun_per_score_evaluation():
    """At 32 score evaluations: DPM-Solver++(2M) with 32 steps against DDIM with 32
    steps and Heun (two evaluations per step) with 16."""
    dpm = _error(gd.DPMSolverPP(SDE), 32)
    assert dpm < 0.25 * _error(gd.DDIM(SDE), 32)
    assert dpm < _error(dfx.Heun(), 16)
    # UniPC's corrector reuses the same evaluations: third order at the same cost
    assert _error(gd.UniPC(SDE), 32) < 0.5 * dpm


def test_unipc_variant_is_checked():
    with pytest.raises(ValueError, match="'bh1' or 'bh2'"):
        gd.UniPC(SDE, "bh3")


@pytest.mark.parametrize("cls", [gd.DDIM, gd.DPMSolverPP, gd.UniPC])
def test_both_drivers_give_the_same_samples(cls):
    scan = _sample(cls(SDE), 12, driver="scan")
    solve = _sample(cls(SDE), 12, driver="diffeqsolve")
    np.testing.assert_allclose(solve, scan, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "solver, order",
    [(gd.DPMSolverPP(SDE), 2), (gd.UniPC(SDE), 3)],
    ids=["dpm", "unipc"],
)
def test_forward_in_time_inverts_the_flow(solver, order):
    """Integrated from EPS up to T (diffrax's forward direction, no time flip), the
    solver maps the exact data-end points onto the exact prior-end points."""
    term = gd.probability_flow(SDE, DATA.score(SDE))
    y_eps = _exact(Y_T, SDE.T, EPS)

    def error(n):
        ts = gd.logsnr_grid(SDE, SDE.T, EPS, n)[::-1]

        def solve(y):
            sol = dfx.diffeqsolve(
                term,
                solver,
                ts[0],
                ts[-1],
                None,
                y,
                stepsize_controller=dfx.StepTo(ts),
                saveat=dfx.SaveAt(t1=True),
            )
            return sol.ys[0]

        return float(jnp.max(jnp.abs(jax.vmap(solve)(y_eps) - Y_T)))

    e16, e64 = error(16), error(64)
    assert e64 < e16 / 2 ** (2 * order - 1)  # order p: / 4^p in the limit


@pytest.mark.parametrize(
    "process, solver",
    [
        ("ode", gd.DPMSolverPP(SDE)),
        ("sde", gd.SDEDPMSolverPP(SDE)),
        ("ode", gd.UniPC(SDE)),
    ],
    ids=["dpm", "sde-dpm", "unipc"],
)
def test_gradient_matches_finite_differences(process, solver):
    """d/d mu of the mean square of the samples, through the multistep solver state
    (and, for the SDE, the grid Brownian path)."""

    def f(mu):
        data = gd.Gaussian(mu, jnp.diag(C))
        ys = gd.sample(
            jr.key(0),
            SDE,
            data.score(SDE),
            (2,),
            y0=Y_T,
            ts=gd.logsnr_grid(SDE, SDE.T, EPS, 10),
            process=process,
            solver=solver,
        ).ys
        return jnp.mean(ys**2)

    g = jax.grad(f)(MU)
    h = 1e-6
    fd = jnp.array([(f(MU + h * e) - f(MU - h * e)) / (2 * h) for e in jnp.eye(2)])
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_solver_and_process_must_match():
    score = DATA.score(SDE)
    ts = gd.uniform_grid(SDE.T, EPS, 4)

    def sample(**kw):
        return gd.sample(jr.key(0), SDE, score, (2,), ts=ts, **kw)

    with pytest.raises(ValueError, match="probability-flow ODE"):
        sample(solver=gd.DPMSolverPP(SDE))
    with pytest.raises(ValueError, match="reverse SDE"):
        sample(process="ode", solver=gd.ExponentialIntegrator(SDE))
    pid = dfx.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="fixed grids only"):
        sample(process="ode", solver=gd.DDIM(SDE), stepsize_controller=pid)


# --- the reverse SDE ---------------------------------------------------------------
#
# With the Gaussian data's exact (affine) score every step is affine in the state
# and in its standard-normal draw xi_k, so a scheme's output is
# y_N = A y_0 + sum_k C_k xi_k + b: its law is Gaussian and, started from the exact
# time-T marginal N(alpha_T mu, diag(s_T^2)), has mean y_N(alpha_T mu, xi = 0) and
# variance A^2 s_T^2 + sum_k C_k^2 per coordinate (A and C_k by automatic
# differentiation). The target is the time-EPS marginal, exactly; no Monte Carlo.


class _GivenNormals(dfx.AbstractBrownianPath):
    """Increments sqrt(|dt|) xi_k over grid cell k, for given xi (like the grid path)."""

    grid: jax.Array  # increasing
    xi: jax.Array  # (cells, d)
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    @property
    def t0(self):
        return self.grid[0]

    @property
    def t1(self):
        return self.grid[-1]

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        mid = 0.5 * (t0 + t1)
        k = jnp.clip(jnp.searchsorted(self.grid, mid) - 1, 0, self.xi.shape[0] - 1)
        dt = t1 - t0
        return jnp.sign(dt) * jnp.sqrt(jnp.abs(dt)) * self.xi[k]


def _sde_law(solver, n, mu=MU, c=C):
    """Exact mean and variance of `solver`'s samples on an n-step log-SNR grid, for
    data N(mu, diag(c))."""
    ts = gd.logsnr_grid(SDE, SDE.T, EPS, n)
    score = gd.Gaussian(mu, jnp.diag(c)).score(SDE)

    def final(y0, xi):
        path = _GivenNormals(ts[::-1], xi)
        sol = dfx.diffeqsolve(
            gd.reverse_sde(SDE, score, path),
            solver,
            ts[0],
            ts[-1],
            None,
            y0,
            stepsize_controller=dfx.StepTo(ts),
            saveat=dfx.SaveAt(t1=True),
            adjoint=dfx.ForwardMode(),  # for jacfwd
        )
        return sol.ys[0]

    a_T, sig_T = SDE.marginal(SDE.T)
    m_T, v_T = a_T * mu, a_T**2 * c + sig_T**2
    zeros = jnp.zeros((n, 2))
    mean = final(m_T, zeros)
    A = jax.jacfwd(final, argnums=0)(m_T, zeros)  # (2, 2), diagonal
    Ck = jax.jacfwd(final, argnums=1)(m_T, zeros)  # (2, n, 2)
    var = jnp.sum(A**2 * v_T[None], axis=1) + jnp.sum(Ck**2, axis=(1, 2))
    return mean, var


def _sde_errors(solver, n):
    a, sig = SDE.marginal(EPS)
    mean, var = _sde_law(solver, n)
    return (
        float(jnp.max(jnp.abs(mean - a * MU))),
        float(jnp.max(jnp.abs(var / (a**2 * C + sig**2) - 1))),
    )


@pytest.fixture(scope="module")
def sde_errors():
    """(mean error, relative variance error) per solver at 40 and 80 steps."""
    return {
        cls: np.array([_sde_errors(cls(SDE), n) for n in (40, 80)])
        for cls in (gd.ExponentialIntegrator, gd.SDEDPMSolverPP)
    }


@pytest.mark.parametrize(
    "cls, order", [(gd.ExponentialIntegrator, 1), (gd.SDEDPMSolverPP, 2)]
)
def test_sde_solvers_weak_order_against_the_exact_marginal(sde_errors, cls, order):
    mean_errs, var_errs = sde_errors[cls].T
    observed = np.log2(var_errs[0] / var_errs[1])
    assert abs(observed - order) < 0.2, (var_errs, observed)
    assert np.all(mean_errs < 1e-12)  # started at the exact mean, which is kept


def test_sde_2m_is_far_more_accurate_at_the_same_cost(sde_errors):
    one = sde_errors[gd.ExponentialIntegrator][:, 1]
    two = sde_errors[gd.SDEDPMSolverPP][:, 1]
    assert np.all(two < one / 10)


@pytest.mark.parametrize("cls", [gd.ExponentialIntegrator, gd.SDEDPMSolverPP])
def test_sde_solvers_are_exact_for_point_mass_data_on_any_grid(cls):
    """For point-mass data the denoiser is the constant mu: the exponential
    integrator's step is then the exact posterior q(x_t | x_s, x_0 = mu), and its
    samples have the exact time-EPS law N(alpha mu, sigma^2) after 1 or 3 steps (the
    2M correction, a difference of denoisers, vanishes). The weak-order test above
    checks rates only: a wrong noise scale of first order keeps the rate."""
    a, sig = SDE.marginal(EPS)
    for n in (1, 3):
        mean, var = _sde_law(cls(SDE), n, c=jnp.full(2, 1e-12))
        np.testing.assert_allclose(mean, a * MU, rtol=1e-9)
        np.testing.assert_allclose(var, a**2 * 1e-12 + sig**2, rtol=1e-6)


def test_sde_2m_first_step_is_the_exponential_integrator():
    """On a one-step grid SDE-DPM-Solver++(2M) is the exponential integrator (same
    noise): the multistep correction starts at the second step."""
    ts = gd.logsnr_grid(SDE, SDE.T, EPS, 1)
    kw = dict(num_particles=5, ts=ts)
    a, b = (
        gd.sample(jr.key(1), SDE, DATA.score(SDE), (2,), solver=s(SDE), **kw).ys
        for s in (gd.ExponentialIntegrator, gd.SDEDPMSolverPP)
    )
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_sde_2m_both_drivers_give_the_same_samples():
    ts = gd.logsnr_grid(SDE, SDE.T, EPS, 12)
    a, b = (
        gd.sample(
            jr.key(1),
            SDE,
            DATA.score(SDE),
            (2,),
            num_particles=5,
            ts=ts,
            solver=gd.SDEDPMSolverPP(SDE),
            driver=driver,
        ).ys
        for driver in ("scan", "diffeqsolve")
    )
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "process, cls, driver",
    [
        ("ode", gd.DPMSolverPP, "scan"),
        ("sde", gd.SDEDPMSolverPP, "diffeqsolve"),
        ("ode", gd.UniPC, "scan"),
    ],
)
def test_truncated_backprop_keeps_the_multistep_samples(process, cls, driver):
    """DRaFT-K splits the solve in two; the second part starts from the first's
    solver state (the previous data prediction), so the samples do not change."""
    ts = gd.logsnr_grid(SDE, SDE.T, EPS, 12)
    kw = dict(
        num_particles=4,
        ts=ts,
        process=process,
        solver=cls(SDE),
        driver=driver,
        save_trajectory=True,
    )
    full, cut = (
        gd.sample(jr.key(0), SDE, DATA.score(SDE), (2,), truncate_backprop=k, **kw).ys
        for k in (None, 5)
    )
    np.testing.assert_allclose(cut, full, rtol=1e-12, atol=1e-12)


def test_multistep_solvers_step_to_time_zero():
    """A grid ending at t = 0 (sigma = 0, h = inf): the last step is first order
    ("lower order final"), so the particles stay finite, and DPM-Solver++(2M)'s last
    state is the first-order (DDIM) step from the same previous state."""
    ts = gd.uniform_grid(1.0, 0.0, 10)
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    score = gmm.score(SDE)
    for process, solver in (
        ("ode", gd.DPMSolverPP(SDE)),
        ("sde", gd.SDEDPMSolverPP(SDE)),
        ("ode", gd.UniPC(SDE)),
    ):
        out = gd.sample(jr.key(0), SDE, score, (2,), num_particles=4, ts=ts,
                        process=process, solver=solver)  # fmt: skip
        assert not np.any(out.failed), process
    traj = gd.sample(jr.key(0), SDE, score, (2,), num_particles=4, ts=ts,
                     process="ode", solver=gd.DPMSolverPP(SDE),
                     save_trajectory=True).ys  # fmt: skip
    last = gd.sample(jr.key(0), SDE, score, (2,), y0=traj[:, -2], ts=ts[-2:],
                     process="ode", solver=gd.DDIM(SDE)).ys  # fmt: skip
    np.testing.assert_allclose(traj[:, -1], last, rtol=1e-12, atol=1e-12)


def test_multistep_float32_particles_under_x64_with_diffeqsolve():
    """From a numerical audit: under x64 (the tests' setting) the multistep solvers'
    state took the float64 log-SNR of the SDE's parameters, which diffeqsolve's loop
    rejected for float32 particles; both drivers now give the same samples."""
    sde = gd.VPSDE()
    score = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    ts = gd.logsnr_grid(sde, sde.T, 1e-3, 12)
    for solver, process in (
        (gd.DPMSolverPP(sde), "ode"),
        (gd.SDEDPMSolverPP(sde), "sde"),
        (gd.UniPC(sde), "ode"),
    ):
        a, b = (
            gd.sample(
                jr.key(0), sde, score, (2,), num_particles=4, ts=ts, process=process,
                solver=solver, driver=driver, dtype=jnp.float32,
            ).ys
            for driver in ("scan", "diffeqsolve")
        )  # fmt: skip
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_dpm_solver_on_a_uniform_grid_to_a_tiny_t_amplifies_the_variance():
    """The docstring's warning, exactly (Gaussian data: the probability-flow map is
    linear, so one particle from y0 = 1 gives the variance ratio): with the 1 - t
    schedule down to 1e-6 and data N(0, 0.1^2), 100 uniform steps give 2.4x the
    target's variance; a 100-step log-SNR grid is within 1 %."""
    sde = gd.VPSDE(gd.OneMinusT())
    var = 0.01
    score = gd.Gaussian(jnp.zeros(1), var).score(sde)
    ratios = []
    for ts in (
        gd.uniform_grid(sde.T, 1e-6, 100),
        gd.logsnr_grid(sde, sde.T, 1e-6, 100),
    ):
        out = gd.sample(jr.key(0), sde, score, (1,), y0=jnp.ones((1, 1)), ts=ts,
                        process="ode", solver=gd.DPMSolverPP(sde))  # fmt: skip
        ratios.append(float(out.ys[0, 0]) ** 2 * float(sde.prior_std()) ** 2 / var)
    assert 2.35 < ratios[0] < 2.55 and abs(ratios[1] - 1) < 0.01, ratios


def test_probability_flow_solvers_step_adaptively_inside_a_half_solver():
    """diffrax.HalfSolver gives the data-prediction solvers an error estimate; a
    rejected step keeps the previous state, so even the multistep ones follow the
    tolerance (UniPC at rtol 1e-6: within 1e-4 of the exact flow; DDIM at 1e-5,
    DPMSolverPP 2e-4, UniPC 3e-5 at rtol 1e-5 when measured)."""
    ts = jnp.array([SDE.T, EPS])
    y0 = Y_T[:4] * SDE.prior_std()

    def run(y0):
        return gd.sample(jr.key(0), SDE, DATA.score(SDE), (2,), y0=y0, ts=ts,
                         process="ode", solver=dfx.HalfSolver(gd.UniPC(SDE)),
                         stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
                         max_steps=4096)  # fmt: skip

    out = run(y0)
    assert not np.any(out.failed)
    assert float(jnp.max(jnp.abs(out.ys - _exact(y0, SDE.T, EPS)))) < 1e-4
    # The flow is linear: d y_eps / d y_T is the ratio of the marginal stds. A
    # particle that finishes first takes zero-length steps in the vmapped loop,
    # which gave NaN gradients (a review: the step's direction, and 0 / 0)
    grad = jax.grad(lambda y: jnp.sum(run(y).ys))(y0)
    ratio = _exact(jnp.ones((1, 2)), SDE.T, EPS) - _exact(jnp.zeros((1, 2)), SDE.T, EPS)
    np.testing.assert_allclose(grad, jnp.broadcast_to(ratio, grad.shape), rtol=1e-4)


@pytest.mark.parametrize(
    "solver", [gd.DPMSolverPP(SDE), gd.UniPC(SDE)], ids=["dpm", "unipc"]
)
def test_zero_length_steps_and_terms_in_flipped_time(solver):
    """From reviews: a zero-length step (a finished particle's inside a vmapped
    adaptive loop) is the identity and keeps the multistep history (UniPC
    corrected there); a user's term written in flipped time s = -t, which
    diffeqsolve runs forward, reads its SDE times from the step's sign (NaN when
    the direction came from diffeqsolve's wrapper alone)."""
    term = gd.probability_flow(SDE, DATA.score(SDE))
    y, state = Y_T[0], solver.init(term, 0.9, 0.8, Y_T[0], None)
    for t0, t1 in ((0.9, 0.8), (0.8, 0.65)):
        y, _, _, state, _ = solver.step(term, t0, t1, y, None, state, False)
    y_same, _, _, state_same, _ = solver.step(term, 0.65, 0.65, y, None, state, False)
    np.testing.assert_array_equal(y_same, y)
    jax.tree.map(np.testing.assert_array_equal, state_same, state)

    class Flip(dfx.AbstractTerm):
        term: dfx.AbstractTerm

        def vf(self, t, y, args):
            return self.term.vf(-t, y, args)

        def contr(self, t0, t1, **kw):
            return self.term.contr(-t0, -t1, **kw)

        def prod(self, vf, control):
            return self.term.prod(vf, control)

    # its zero-length step at -t too (NaN when read at the SDE time -t)
    flipped = Flip(term)
    state = solver.init(flipped, -0.5, -EPS, Y_T[0], None)
    y, _, _, state, _ = solver.step(flipped, -0.5, -0.1, Y_T[0], None, state, False)
    y_same = solver.step(flipped, -EPS, -EPS, y, None, state, False)[0]
    np.testing.assert_array_equal(y_same, y)
    ts = -gd.logsnr_grid(SDE, SDE.T, EPS, 40)
    y0 = Y_T[:2] * SDE.prior_std()
    ys = jax.vmap(
        lambda y: dfx.diffeqsolve(Flip(term), solver, ts[0], ts[-1], None, y,
                                  stepsize_controller=dfx.StepTo(ts)).ys[-1]
    )(y0)  # fmt: skip
    assert float(jnp.max(jnp.abs(ys - _exact(y0, SDE.T, EPS)))) < 0.01
