r"""CFG++ (`gd.cfgpp`) and per-step weights (`gd.PerStep`).

CFG++ (Chung et al. 2024) is checked against its own algorithm, written out here
step by step from the paper (not through guidediff's solvers): DDIM's data
prediction with the guided noise $\varepsilon^\lambda = \varepsilon^\varnothing +
\lambda(\varepsilon^c - \varepsilon^\varnothing)$ and re-noising with the
unconditional $\varepsilon^\varnothing$, the noises of exact Gaussian-mixture
scores, $\varepsilon = -\sigma s$.
"""

import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd


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
    for batched in (True, False):
        g = gd.cfgpp(lam, sde, ts, null_args=GMM.null_label, batched=batched)
        for driver in ("scan", "diffeqsolve"):
            out = gd.sample(
                jr.key(0), sde, gd.guide(score, g), (2,), driver=driver, **kw
            )
            np.testing.assert_allclose(out.ys, ref, rtol=1e-12, atol=1e-12)
    w = np.asarray(g.weight.values)
    assert np.ptp(w) > 0.1  # the steps' weights differ: a per-step schedule
    if grid == "to_zero":
        assert w[-1] == lam - 1.0
    # float32 particles (under x64) step on the float32 grid and find their weights
    out32 = gd.sample(jr.key(0), sde, gd.guide(score, g), (2,), **{
        **kw, "y0": y0.astype(jnp.float32)})  # fmt: skip
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out32.ys, ref, atol=1e-5 * scale)
    # a separate unconditional score: the same law as the null label's
    g_u = gd.cfgpp(lam, sde, ts, unconditional=GMM.score(sde))
    out = gd.sample(jr.key(0), sde, gd.guide(score, g_u), (2,), **kw)
    np.testing.assert_allclose(out.ys, ref, rtol=1e-10, atol=1e-10)


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
        with pytest.warns(UserWarning, match="made for a grid of 8 steps") as rec:
            gd.sample(jr.key(0), VP, g, (2,), num_particles=4, ts=other, **kw)
        assert rec[0].filename == __file__
    # a constant weight on a log-SNR grid depends on its number of steps too
    log_ts = gd.logsnr_grid(VP, VP.T, 1e-3, 8)
    g_log = gd.guide(GMM.conditional_score(VP), gd.cfgpp(0.5, VP, log_ts, null_args=2))
    with pytest.warns(UserWarning, match="Pass the same ts"):
        gd.sample(jr.key(0), VP, g_log, (2,), num_particles=4,
                  ts=gd.logsnr_grid(VP, VP.T, 1e-3, 16), **kw)  # fmt: skip


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
        (lambda: gd.cfgpp(0.5, VP, ts), ValueError, "exactly one of"),
    ]
    for make, kind, match in cases:
        with pytest.raises(kind, match=match):
            make()
