r"""Variants of classifier-free guidance: CFG++ (`gd.cfgpp`) with per-step weights
(`gd.PerStep`), and adaptive projected guidance (`gd.apg`).

CFG++ (Chung et al. 2024) is checked against its own algorithm, written out here
step by step from the paper (not through guidediff's solvers): DDIM's data
prediction with the guided noise $\varepsilon^\lambda = \varepsilon^\varnothing +
\lambda(\varepsilon^c - \varepsilon^\varnothing)$ and re-noising with the
unconditional $\varepsilon^\varnothing$, the noises of exact Gaussian-mixture
scores, $\varepsilon = -\sigma s$. APG (Sadat et al. 2024) likewise, against its
update written out in the denoiser's units with NumPy.
"""

import warnings

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd
from guidediff._sample_checks import _on_grid


VP = gd.VPSDE()
VE = gd.VESDE(sigma_max=20.0)
GMM = gd.GaussianMixture(
    [0.3, 0.7], [[-2.0, 0.5], [1.5, -1.0]], [0.4, 0.6], labels=[0, 1]
)
Y0 = jr.normal(jr.key(3), (16, 2))


def _cfgpp_by_the_paper(sde, score, ts, lam, y0, label, null):
    """Algorithm "DDIM with CFG++", one particle, in the paper's noise form."""
    ts = np.asarray(ts)

    def one(x):
        for k in range(len(ts) - 1):
            a0, s0 = sde.marginal(ts[k])
            a1, s1 = sde.marginal(ts[k + 1])
            e_c = -s0 * score(ts[k], x, label)
            e_u = -s0 * score(ts[k], x, null)
            e_lam = e_u + lam * (e_c - e_u)
            x0 = (x - s0 * e_lam) / a0
            x = a1 * x0 + s1 * e_u  # re-noised with the unconditional noise
        return x

    return jax.vmap(one)(y0)


@pytest.mark.parametrize(
    "sde, grid",
    [
        (VP, "uniform"),  # unequal log-SNR steps: the weights vary per step
        (VP, "to_zero"),  # a last step to sigma = 0: h = inf, scale lam
        (VE, "uniform"),
    ],
)
def test_cfgpp_is_the_ddim_cfgpp_algorithm(sde, grid):
    end = 0.0 if grid == "to_zero" else 1e-3
    ts = gd.uniform_grid(sde.T, end, 9)
    if sde is VE:
        y0 = Y0 * sde.prior_std()
    else:
        y0 = Y0
    score = GMM.conditional_score(sde)
    lam = 0.7
    ref = _cfgpp_by_the_paper(sde, score, ts, lam, y0, 1, GMM.null_label)
    kw = dict(y0=y0, ts=ts, args=1, process="ode", solver=gd.DDIM(sde))
    g = gd.cfgpp(lam, sde, ts, null_args=GMM.null_label)
    out = gd.sample(jr.key(0), sde, gd.guide(score, g), (2,), **kw)
    np.testing.assert_allclose(out.ys, ref, rtol=1e-12, atol=1e-12)
    w = np.asarray(g.weight.values)
    assert np.ptp(w) > 0.1  # the steps' weights differ: a per-step schedule
    if grid == "to_zero":
        assert w[-1] == lam - 1.0
    if sde is not VP or grid != "uniform":
        return
    # the other driver, the two-call path and a separate unconditional score
    # (the same law as the null label's)
    for variant, driver in (
        (g, "diffeqsolve"),
        (gd.cfgpp(lam, sde, ts, null_args=GMM.null_label, batched=False), "scan"),
        (gd.cfgpp(lam, sde, ts, unconditional=GMM.score(sde)), "scan"),
    ):
        guided = gd.guide(score, variant)
        out = gd.sample(jr.key(0), sde, guided, (2,), driver=driver, **kw)
        np.testing.assert_allclose(out.ys, ref, rtol=1e-10, atol=1e-10)
    # float32 particles (under x64) step on the float32 grid and find their weights
    out32 = gd.sample(jr.key(0), sde, gd.guide(score, g), (2,), **{
        **kw, "y0": y0.astype(jnp.float32)})  # fmt: skip
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out32.ys, ref, atol=1e-5 * scale)


def test_cfgpp_is_not_cfg_at_a_constant_weight_except_on_a_logsnr_grid():
    """The scale 1 + w_k = lam / (1 - exp(-h_k)) in closed form; on a log-SNR
    uniform grid it is one constant, and CFG++ is plain CFG there."""
    lam = 0.6
    ts = gd.uniform_grid(VP.T, 1e-3, 6)
    ell = np.array([0.5 * float(VP.log_snr(t)) for t in ts])
    expected = lam / -np.expm1(-np.diff(ell)) - 1.0
    w = gd.cfgpp(lam, VP, ts, null_args=2).weight
    np.testing.assert_allclose(w.values, expected, rtol=1e-12)
    log_ts = gd.logsnr_grid(VP, VP.T, 1e-3, 6)
    w_log = np.asarray(gd.cfgpp(lam, VP, log_ts, null_args=2).weight.values)
    np.testing.assert_allclose(w_log, w_log[0], rtol=1e-10)
    score = GMM.conditional_score(VP)
    kw = dict(y0=Y0, ts=log_ts, args=1, process="ode", solver=gd.DDIM(VP))
    pp = gd.guide(score, gd.cfgpp(lam, VP, log_ts, null_args=GMM.null_label))
    plain = gd.guide(score, gd.cfg(float(w_log[0]), null_args=GMM.null_label))
    a = gd.sample(jr.key(0), VP, pp, (2,), **kw).ys
    b = gd.sample(jr.key(0), VP, plain, (2,), **kw).ys
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_cfgpp_sweeps_and_differentiates_in_lam():
    """lam is an array leaf: a vmap over it is one program, and d E[x_0] / d lam
    matches central finite differences (the samples are smooth in lam)."""
    ts = gd.uniform_grid(VP.T, 1e-3, 8)
    score = GMM.conditional_score(VP)
    kw = dict(y0=Y0, ts=ts, args=1, process="ode", solver=gd.DDIM(VP))

    def mean_x(lam):
        g = gd.cfgpp(lam, VP, ts, null_args=GMM.null_label)
        return jnp.mean(
            gd.sample(jr.key(0), VP, gd.guide(score, g), (2,), **kw).ys[:, 0]
        )

    lams = jnp.array([0.2, 0.5, 0.8])
    swept = jax.vmap(mean_x)(lams)
    np.testing.assert_allclose(swept, [mean_x(v) for v in lams], rtol=1e-12)
    h = 1e-5
    fd = (mean_x(0.5 + h) - mean_x(0.5 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(mean_x)(0.5), fd, rtol=1e-6)


def test_per_step_weights_on_the_grid_and_between():
    ts = gd.uniform_grid(VP.T, 1e-3, 7)
    values = jnp.arange(7.0) * 1.5
    w = gd.PerStep(ts, values)
    for k in range(7):  # a step's start sees its step's weight, in both dtypes
        assert float(w(ts[k])) == values[k]
        assert float(w(jnp.float32(ts[k]))) == values[k]
        mid = 0.5 * (ts[k] + ts[k + 1])
        assert float(w(mid)) == values[k]
    assert float(w(ts[-1])) == values[-1] and float(w(0.0)) == values[-1]
    assert float(w(2.0)) == values[0]
    # a float32 grid whose rounding goes either way finds the same steps
    fine = jnp.asarray(np.linspace(1.0, 1e-3, 301))
    w_fine = gd.PerStep(fine, jnp.arange(300.0))
    picked = jax.vmap(w_fine)(fine[:-1].astype(jnp.float32))
    np.testing.assert_array_equal(picked, np.arange(300.0))
    # the values are leaves: the gradient is the step's indicator
    g = jax.grad(lambda v: gd.PerStep(ts, v)(ts[3]))(values)
    np.testing.assert_array_equal(g, np.eye(7)[3])
    # new values do not retrace a jitted function of the weight
    traces = []

    @jax.jit
    def f(weight, t):
        traces.append(1)
        return weight(t)

    assert float(f(w, ts[2])) == values[2]
    assert float(f(gd.PerStep(ts, values + 1.0), ts[2])) == values[2] + 1.0
    assert len(traces) == 1


def test_sampling_on_another_grid_warns_at_the_callers_line():
    ts = gd.uniform_grid(VP.T, 1e-3, 8)
    g = gd.guide(GMM.conditional_score(VP), gd.cfgpp(0.5, VP, ts, null_args=2))
    kw = dict(args=1, process="ode", solver=gd.DDIM(VP))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gd.sample(jr.key(0), VP, g, (2,), num_particles=4, ts=ts, **kw)
        # a segment of the grid (a split run) takes its own steps' weights
        gd.sample(jr.key(0), VP, g, (2,), y0=Y0, ts=ts[2:6], **kw)
    for other in (gd.uniform_grid(VP.T, 1e-3, 9), ts[::2]):
        with pytest.warns(UserWarning, match="were made for a grid of 8 steps") as rec:
            gd.sample(jr.key(0), VP, g, (2,), num_particles=4, ts=other, **kw)
        assert rec[0].filename == __file__
    # a constant weight on a log-SNR grid depends on its number of steps too
    log_ts = gd.logsnr_grid(VP, VP.T, 1e-3, 8)
    g_log = gd.guide(GMM.conditional_score(VP), gd.cfgpp(0.5, VP, log_ts, null_args=2))
    with pytest.warns(UserWarning, match="Pass the same ts"):
        gd.sample(jr.key(0), VP, g_log, (2,), num_particles=4,
                  ts=gd.logsnr_grid(VP, VP.T, 1e-3, 16), **kw)  # fmt: skip


def test_the_grid_warning_also_under_transformations_and_adaptive_steps():
    """The check needs the grid only: it also warns where lam is traced (grad,
    vmap); adaptive steps are not the grid's steps; and CFG++'s weights with
    another solver than DDIM are not CFG++."""
    ts, other = gd.uniform_grid(VP.T, 1e-3, 8), gd.uniform_grid(VP.T, 1e-3, 6)
    score = GMM.conditional_score(VP)
    kw = dict(num_particles=2, args=1, process="ode", solver=gd.DDIM(VP))

    def mean(lam, grid=other, **extra):
        g = gd.guide(score, gd.cfgpp(lam, VP, ts, null_args=GMM.null_label))
        return gd.sample(jr.key(0), VP, g, (2,), ts=grid, **{**kw, **extra}).ys.mean()

    for run, lam in ((jax.grad(mean), 0.5), (jax.vmap(mean), jnp.array([0.5, 0.6]))):
        with pytest.warns(UserWarning, match="another grid"):
            run(lam)
    pid = dict(
        driver="diffeqsolve",
        solver=dfx.Tsit5(),
        stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
    )
    with pytest.warns(UserWarning, match="steps adaptively"):
        mean(0.5, ts, **pid)
    for extra in (dict(solver=gd.DPMSolverPP(VP)), dict(solver=dfx.Heun())):
        with pytest.warns(UserWarning, match="not CFG\\+\\+") as rec:
            mean(0.5, ts, **extra)
        assert rec[0].filename == __file__
    with pytest.warns(UserWarning, match="not CFG\\+\\+"):
        mean(0.5, ts, process="sde", solver=None)
    # a wrapped DDIM evaluates between the grid times: not CFG++ either
    with pytest.warns(UserWarning, match="with HalfSolver"):
        mean(0.5, ts, solver=dfx.HalfSolver(gd.DDIM(VP)))
    # smc_sample steps the reverse SDE: said so, once for a score and proposal
    guided = gd.guide(score, gd.cfgpp(0.5, VP, ts, null_args=GMM.null_label))
    with pytest.warns(UserWarning, match="gd.smc_sample steps the reverse SDE") as rec:
        gd.smc_sample(jr.key(0), VP, guided, (2,), lambda x: -jnp.sum(x**2),
                      num_particles=4, ts=ts, args=1, proposal=guided)  # fmt: skip
    assert len(rec) == 1


def test_a_float32_copy_of_the_grid_finds_the_same_steps():
    """float64 particles on the float32-rounded grid (or the other way round):
    each step still takes its own weight (within float32 ulps), and no warning."""
    ts = gd.uniform_grid(VP.T, 1e-3, 40)
    ts32 = ts.astype(jnp.float32)
    score = GMM.conditional_score(VP)
    kw = dict(y0=Y0, args=1, process="ode", solver=gd.DDIM(VP))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for made, used in ((ts, ts32), (ts32, ts)):
            g = gd.guide(score, gd.cfgpp(0.7, VP, made, null_args=GMM.null_label))
            out = gd.sample(jr.key(0), VP, g, (2,), ts=used, **kw)
            ref = _cfgpp_by_the_paper(VP, score, used, 0.7, Y0, 1, GMM.null_label)
            np.testing.assert_allclose(out.ys, ref, atol=1e-6)
    # an array of times gets their weights; 16-bit times (a direct call) too
    w = gd.PerStep(ts32, jnp.arange(40.0))
    np.testing.assert_array_equal(w(ts[:-1]), np.arange(40.0))
    np.testing.assert_array_equal(w(ts[None, 3:5]), [[3.0, 4.0]])
    coarse = gd.uniform_grid(VP.T, 1e-3, 20)
    w = gd.PerStep(coarse, jnp.arange(20.0))
    for dtype in (jnp.bfloat16, jnp.float16):
        np.testing.assert_array_equal(w(coarse[:-1].astype(dtype)), np.arange(20.0))


def test_the_walkthroughs_cases():
    """From a user walkthrough and a review: a cfgpp built for another SDE is
    refused where it is sampled (its weights hold their SDE); a grid outside its
    SDE's range names gd.cfgpp; the same grid computed another way in float32 is
    the same grid; a grid that differs says where; a NaN time takes step 0."""
    ts = gd.uniform_grid(VP.T, 1e-3, 8)
    score = GMM.conditional_score(VP)
    kw = dict(num_particles=2, ts=ts, args=1, process="ode", solver=gd.DDIM(VP))
    other = gd.VPSDE(gd.LinearBeta(0.1, 10.0))
    g = gd.guide(score, gd.cfgpp(0.5, other, ts, null_args=GMM.null_label))
    with pytest.raises(ValueError, match="differs"):
        gd.sample(jr.key(0), VP, g, (2,), **kw)
    with pytest.raises(ValueError, match="gd.cfgpp's ts, for its sde: the time grid"):
        gd.cfgpp(0.5, gd.VPSDE(gd.CosineSchedule()), ts, null_args=2)
    # np.linspace in float64, rounded to float32, against gd.uniform_grid's float64
    # formula: 5e-8 apart near t = 0.01 (50 float32 ulps there), the same steps
    made = np.linspace(1.0, 1e-3, 101).astype(np.float32)
    w = gd.PerStep(made, np.arange(100.0))
    fine = gd.uniform_grid(1.0, 1e-3, 100)
    np.testing.assert_array_equal(w(fine[:-1]), np.arange(100.0))
    guided = gd.guide(score, gd.cfg(w, null_args=GMM.null_label))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gd.sample(jr.key(0), VP, guided, (2,), **{**kw, "ts": fine, "solver": None})
    logsnr = gd.logsnr_grid(VP, 1.0, 1e-3, 100)
    with pytest.warns(UserWarning, match=r"its time \d+ differs by"):
        gd.sample(jr.key(0), VP, guided, (2,), **{**kw, "ts": logsnr, "solver": None})
    assert float(w(jnp.nan)) == 0.0
    # a solver's stages late in a step (Tsit5's c = 0.98, Dopri5's 8/9) keep the
    # step's weight, also on fine log-SNR and geometric grids
    for grid in (gd.logsnr_grid(VP, 1.0, 1e-3, 1000), np.geomspace(1000, 1e-3, 101)):
        steps = gd.PerStep(grid, np.arange(len(grid) - 1.0))
        for c in (0.5, 5 / 6, 8 / 9, 0.98):
            stage = grid[:-1] - c * (grid[:-1] - grid[1:])
            np.testing.assert_array_equal(steps(stage), np.arange(len(grid) - 1.0))


def test_apg_and_cfgpp_get_cfgs_sampling_checks():
    """gd.cfg's checks of its null args and of a score that ignores its args
    apply to gd.apg and gd.cfgpp too (an unknown null label made every particle
    NaN, and a score ignoring its args a silent no-op), in their own names."""
    ts = gd.uniform_grid(VP.T, 1e-3, 4)
    kw = dict(num_particles=2, ts=ts, args=1)
    cond, plain = GMM.conditional_score(VP), GMM.score(VP)
    for name, make in (
        ("gd.apg", lambda null: gd.apg(2.0, VP, null_args=null)),
        ("gd.cfgpp", lambda null: gd.cfgpp(0.5, VP, ts, null_args=null)),
    ):
        with pytest.raises(ValueError, match=f"{name}'s null_args=7"):
            gd.sample(jr.key(0), VP, gd.guide(cond, make(7)), (2,), **kw)
        with pytest.raises(ValueError, match=f"{name}\\(null_args=...\\) guides a"):
            gd.sample(jr.key(0), VP, gd.guide(plain, make(2)), (2,), **kw)


def test_a_pair_guidance_inside_another_score_keeps_its_own_labels():
    """gd.apg (or gd.cfg) guiding the s_r of a reward guidance is checked against
    that score, not the outer one: its null label 3 of a 3-class mixture is not
    tried on the 2-class outer score (it was refused)."""
    three = gd.GaussianMixture(
        [0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.5, 0.5, 0.5]
    )
    s_r = gd.guide(three.conditional_score(VP), gd.apg(1.0, VP, null_args=3))
    outer = gd.guide(GMM.conditional_score(VP), gd.reward_guidance(s_r, 0.5))
    out = gd.sample(jr.key(0), VP, outer, (2,), num_particles=2, args=1,
                    ts=gd.uniform_grid(VP.T, 1e-3, 4))  # fmt: skip
    assert int(out.num_failed) == 0


class _Wrap(gd.AbstractGuidance):
    """A user's guidance that applies another one."""

    inner: gd.AbstractGuidance

    def apply(self, score, t, x, args):
        return gd.guide(score, self.inner)(t, x, args)


def test_a_pair_guidance_inside_a_users_wrapper_is_checked():
    """The null-args check looks inside any guidance applied to the base score
    (not inside the scores it holds): an unknown null label through a user's
    wrapper is an error, not NaN samples."""
    kw = dict(num_particles=2, args=1, ts=gd.uniform_grid(VP.T, 1e-3, 4))
    for inner in (gd.cfg(1.0, null_args=7), gd.apg(1.0, VP, null_args=7)):
        wrapped = gd.guide(GMM.conditional_score(VP), _Wrap(inner))
        with pytest.raises(ValueError, match="null_args=7"):
            gd.sample(jr.key(0), VP, wrapped, (2,), **kw)


def test_small_fixes_from_the_walkthrough():
    # APG built under jax.jit with its default (infinite) threshold
    eta = jax.jit(lambda w: gd.apg(w, VP, null_args=2).norm_threshold.value)(2.0)
    assert float(eta) == np.inf
    # a solver class instead of an instance says how to make one
    with pytest.raises(
        TypeError, match=r"got the class DDIM: pass an instance, DDIM\(sde\)"
    ):
        gd.sample(jr.key(0), VP, GMM.score(VP), (2,), num_particles=2,
                  process="ode", solver=gd.DDIM)  # fmt: skip
    # the grid check's tolerance at the ends, which only hold their weights: the
    # float32 copy of a 20000-step quadratic grid (last gap 2.5e-9) is the grid
    q = np.asarray(gd.quadratic_grid(1.0, 1e-3, 20_000))
    assert _on_grid(q, q.astype(np.float32))
    # a diagonal mixture's class-conditional law stays diagonal
    assert GMM.diagonal and GMM.conditional(1).diagonal


def test_bad_inputs_name_the_problem():
    ts = gd.uniform_grid(VP.T, 1e-3, 4)
    cases = [
        (lambda: gd.PerStep(ts, [1.0, 2.0]), ValueError, "one value per step"),
        (lambda: gd.PerStep(ts[::-1], jnp.ones(4)), ValueError, "strictly decreasing"),
        (lambda: gd.PerStep([1.0], []), ValueError, "at least two times"),
        (lambda: gd.PerStep(ts, [1.0, np.nan, 0.0, 0.0]), ValueError, "finite"),
        (lambda: gd.PerStep(ts, np.ones(4, bool)), TypeError, "real numbers"),
        (lambda: gd.PerStep("abc", [1.0]), TypeError, "real numbers"),
        (lambda: gd.cfgpp(0.5, "vp", ts, null_args=2), TypeError, "AbstractSDE"),
        (lambda: gd.cfgpp(lambda t: t, VP, ts, null_args=2), TypeError, "one number"),
        (lambda: gd.cfgpp([0.5, 0.6], VP, ts, null_args=2), ValueError, "scalar"),
        (lambda: gd.cfgpp(np.inf, VP, ts, null_args=2), ValueError, "finite"),
        (lambda: gd.cfgpp(True, VP, ts, null_args=2), TypeError, "real numbers"),
        (lambda: gd.cfgpp(0.5, VP, ts[::-1], null_args=2), ValueError, "decreasing"),
        (lambda: gd.cfgpp(0.5, VP, [2.0, 1.0, 0.5], null_args=2), ValueError, "range"),
        (lambda: gd.cfgpp(0.5, VP, ts), ValueError, "gd.cfgpp needs exactly one of"),
    ]
    for make, kind, match in cases:
        with pytest.raises(kind, match=match):
            make()


# -- adaptive projected guidance ------------------------------------------------------


def _apg_by_the_paper(sde, score, t, x, w, eta, r):
    """APG's guided denoiser (no momentum) in NumPy, returned as a score."""
    a, s = (float(v) for v in sde.marginal(t))
    x = np.asarray(x)
    d_c = (x + s**2 * np.asarray(score(t, x, 1))) / a
    d_u = (x + s**2 * np.asarray(score(t, x, GMM.null_label))) / a
    diff = d_c - d_u
    with np.errstate(divide="ignore"):  # no difference: nothing to cap
        diff = diff * min(1.0, r / np.linalg.norm(diff))
    unit = d_c / np.linalg.norm(d_c)
    parallel = np.dot(diff, unit) * unit
    d = d_c + w * (diff - parallel + eta * parallel)
    return (a * d - x) / s**2


@jax.jit
def _jitted_guided(score, g, t, x):  # traced: the batched path stacks the calls
    return gd.guide(score, g)(t, x, 1)


@pytest.mark.parametrize("sde", [VP, VE], ids=["vp", "ve"])
def test_apg_is_the_papers_update(sde):
    score = GMM.conditional_score(sde)
    scale = float(sde.prior_std())
    for t in (0.05, 0.4, 0.9):
        for x in (np.array([0.5, -0.2]), np.array([-3.0, 2.0]) * scale):
            for w, eta, r in ((3.0, 0.0, np.inf), (3.0, 0.3, 0.5), (1.5, 1.0, 0.01)):
                ref = _apg_by_the_paper(sde, score, t, x, w, eta, r)
                kw = dict(eta=eta, norm_threshold=None if np.isinf(r) else r)
                for g in (
                    gd.apg(w, sde, null_args=GMM.null_label, **kw),
                    gd.apg(w, sde, null_args=GMM.null_label, batched=False, **kw),
                    gd.apg(w, sde, unconditional=GMM.score(sde), **kw),
                ):
                    got = _jitted_guided(score, g, t, x)
                    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_apg_properties():
    """eta = 0 moves the denoised point orthogonally to D_c; the threshold caps the
    move at w r; eta = 1 without a threshold samples as gd.cfg does."""
    score = GMM.conditional_score(VP)
    t = 0.3
    for x in (jnp.array([0.5, -0.2]), jnp.array([2.0, 1.0])):
        d_c = gd.denoise(VP, score, t, x, 1)
        ortho = gd.guide(score, gd.apg(4.0, VP, null_args=GMM.null_label))
        moved = gd.denoise(VP, ortho, t, x, 1) - d_c
        assert abs(float(jnp.dot(moved, d_c))) < 1e-12 * float(jnp.sum(d_c**2))
        assert float(jnp.linalg.norm(moved)) > 1e-3  # it does move
        capped = gd.apg(4.0, VP, eta=1.0, norm_threshold=1e-3, null_args=2)
        move = gd.denoise(VP, gd.guide(score, capped), t, x, 1) - d_c
        np.testing.assert_allclose(jnp.linalg.norm(move), 4.0 * 1e-3, rtol=1e-10)
    kw = dict(y0=Y0, ts=gd.uniform_grid(VP.T, 1e-3, 10), args=1)
    same = gd.guide(score, gd.apg(2.0, VP, eta=1.0, null_args=GMM.null_label))
    plain = gd.guide(score, gd.cfg(2.0, null_args=GMM.null_label))
    a = gd.sample(jr.key(0), VP, same, (2,), **kw).ys
    b = gd.sample(jr.key(0), VP, plain, (2,), **kw).ys
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # where the two scores agree the update is zero, and its gradient finite
    agree = gd.apg(2.0, VP, norm_threshold=1.0, unconditional=score)
    grad = jax.grad(lambda x: gd.guide(score, agree)(t, x, 1).sum())(X_AGREE)
    np.testing.assert_allclose(grad, jax.grad(lambda x: score(t, x, 1).sum())(X_AGREE))


X_AGREE = jnp.array([0.5, 0.1])


def test_apg_keeps_high_weight_samples_near_the_class():
    """The paper's point: at a high weight CFG pushes samples past the class (its
    mean of x_1 overshoots the class mean 1), APG's update without the component
    along D_c does much less. Paired by shared noise; 4 standard errors."""
    gmm = gd.GaussianMixture(
        [0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.3, 0.3], labels=[0, 1]
    )
    score = gmm.conditional_score(VP)
    kw = dict(num_particles=1000, args=1, ts=gd.uniform_grid(VP.T, 1e-3, 50))
    dist = {}
    for name, g in (
        ("cfg", gd.cfg(8.0, null_args=2)),
        ("apg", gd.apg(8.0, VP, null_args=2)),
    ):
        ys = gd.sample(jr.key(0), VP, gd.guide(score, g), (2,), **kw).ys
        dist[name] = jnp.linalg.norm(ys - jnp.array([[1.0, 0.0]]), axis=1)
    d, se = gd.mean_stderr(dist["cfg"] - dist["apg"])
    assert float(d) > 4 * float(se), (float(d), float(se))


def test_apg_parameters_are_leaves():
    """w, eta and r: one compiled sampler for new values, a vmap over eta equals
    the calls one by one, and d E[x] / d eta matches finite differences."""
    score = GMM.conditional_score(VP)
    kw = dict(y0=Y0, ts=gd.uniform_grid(VP.T, 1e-3, 8), args=1)

    def mean_x(eta, r=1.0, w=3.0):
        g = gd.apg(w, VP, eta=eta, norm_threshold=r, null_args=GMM.null_label)
        return jnp.mean(
            gd.sample(jr.key(0), VP, gd.guide(score, g), (2,), **kw).ys[:, 0]
        )

    etas = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(
        jax.vmap(mean_x)(etas), [mean_x(e) for e in etas], rtol=1e-12
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recompile warning, were it recompiling
        for r, w in ((0.5, 2.0), (2.0, 4.0), (3.0, 1.0)):
            mean_x(0.2, r, w)
    h = 1e-5
    fd = (mean_x(0.5 + h) - mean_x(0.5 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(mean_x)(0.5), fd, rtol=1e-6)


def test_apg_of_16_bit_particles_in_a_large_state():
    """|D_c|^2 of a 20000-dimensional state passes float16's largest value: the
    projection is computed in float32 (in float16 the norm was inf, the parallel
    part 0, and APG silently plain CFG)."""
    d = 20_000
    x = 4.0 * jr.normal(jr.key(0), (d,))
    score = gd.ScoreFn(lambda t, x, args: -x)  # N(0, I) data under the VP SDE
    uncond = gd.ScoreFn(lambda t, x, args: -0.9 * x + 0.1)
    out = {}
    for dtype in (jnp.float16, jnp.float32):
        xd = x.astype(dtype)
        for name, g in (
            ("apg", gd.apg(3.0, VP, unconditional=uncond)),
            ("cfg", gd.cfg(3.0, unconditional=uncond)),
        ):
            out[name, dtype] = np.asarray(gd.guide(score, g)(0.1, xd), np.float64)
            assert out[name, dtype].dtype == np.float64  # (cast above)
    assert gd.guide(score, gd.apg(3.0, VP, unconditional=uncond))(0.1, x.astype(
        jnp.float16)).dtype == jnp.float16  # fmt: skip
    ref = out["apg", jnp.float32]
    rel = np.linalg.norm(out["apg", jnp.float16] - ref) / np.linalg.norm(ref)
    assert rel < 1e-2, rel
    gap = np.linalg.norm(out["cfg", jnp.float32] - ref) / np.linalg.norm(ref)
    assert gap > 0.05, gap  # APG is not CFG here


def test_an_apg_sweep_does_not_trace_the_score_again():
    """eta and r are keyed by shape in gd.sample's check, as weights are: new
    values neither trace the score again nor recompile."""
    traces = []

    def fn(t, x, args):
        traces.append(1)  # runs only while tracing
        return -x + 0.1 * args

    score = gd.ScoreFn(fn)
    ts = gd.uniform_grid(VP.T, 1e-3, 4)
    kw = dict(num_particles=2, ts=ts, args=1.0)

    def run(eta, r):
        g = gd.apg(2.0, VP, eta=eta, norm_threshold=r, null_args=0.0)
        return gd.sample(jr.key(0), VP, gd.guide(score, g), (2,), **kw)

    run(0.0, 1.0)
    first = len(traces)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for eta, r in ((0.5, 1.0), (0.5, 2.0), (0.1, 3.0), (1.0, None)):
            run(eta, r)
    assert len(traces) == first


def test_apg_bad_inputs_name_the_problem():
    cases = [
        (lambda: gd.apg(1.0, "vp", null_args=2), TypeError, "AbstractSDE"),
        (lambda: gd.apg(1.0, VP), ValueError, "exactly one of"),
        (lambda: gd.apg(1.0, VP, null_args=2, batched=1), TypeError, "True or False"),
        (lambda: gd.apg(1.0, VP, eta=np.nan, null_args=2), ValueError, "finite"),
        (lambda: gd.apg(1.0, VP, eta=[0.0, 1.0], null_args=2), TypeError, "scalar"),
        (lambda: gd.apg(1.0, VP, eta=True, null_args=2), TypeError, "scalar"),
        (lambda: gd.apg(1.0, VP, norm_threshold=0.0, null_args=2), ValueError, "> 0"),
        (lambda: gd.apg(1.0, VP, norm_threshold=-1, null_args=2), ValueError, "> 0"),
        (lambda: gd.apg("big", VP, null_args=2), TypeError, "number"),
        (
            lambda: gd.apg(1.0, VP, unconditional=lambda t, x, a: x),
            TypeError,
            r"gd.apg: `unconditional` must be",
        ),
    ]
    for make, kind, match in cases:
        with pytest.raises(kind, match=match):
            make()
    with jax.enable_x64(False):  # checked as stored, in float32: inf, and 0
        with pytest.raises(ValueError, match=r"finite, got 1e\+39 \(inf in float32"):
            gd.apg(1.0, VP, eta=1e39, null_args=2)
        with pytest.raises(ValueError, match="> 0"):
            gd.apg(1.0, VP, norm_threshold=1e-50, null_args=2)
    # a negative traced threshold turns the update off (it reversed it)
    neg = gd.apg(2.0, VP, norm_threshold=1.0, null_args=GMM.null_label)
    neg = eqx.tree_at(lambda g: g.norm_threshold.value, neg, jnp.asarray(-0.1))
    score = GMM.conditional_score(VP)
    np.testing.assert_array_equal(
        gd.guide(score, neg)(0.5, X_AGREE, 1), score(0.5, X_AGREE, 1)
    )
    # built directly from Python numbers, it works
    direct = gd.AdaptiveProjected(gd.Constant(2.0), VP, 0.0, np.inf, 2, None, True)
    np.testing.assert_allclose(
        gd.guide(score, direct)(0.5, X_AGREE, 1),
        gd.guide(score, gd.apg(2.0, VP, null_args=2))(0.5, X_AGREE, 1),
    )
    with pytest.raises(TypeError, match=r"gd.apg\(null_args=...\) needs the"):
        gd.guide(GMM.conditional_score(VP), gd.apg(1.0, VP, null_args=2))(0.5, X_AGREE)
