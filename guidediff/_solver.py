r"""Diffusion-specific diffrax solvers.

`ExponentialIntegrator` solves the reverse SDE exactly over each step with the data
prediction $\hat x_0$ frozen at the step's start (not the score: with the score
frozen the linear solve differs at second order). Between times $t > s$ with
$\alpha_{t|s} = \alpha_t/\alpha_s$ and $\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2
\sigma_s^2$, the step is the Gaussian posterior $q(x_s \mid x_t, \hat x_0)$:

$$x_s = \frac{x_t + \sigma_{t|s}^2\,s_t(x_t)}{\alpha_{t|s}}
      + \frac{\sigma_{t|s}\,\sigma_s}{\sigma_t}\,\xi,\qquad \xi\sim\mathcal N(0, I).$$

Writing $s_t = (\alpha_t\hat x_0 - x_t)/\sigma_t^2$ gives the DDPM ancestral step of
PAPER.md §5.1 (SDE-DPM-Solver-1). It has no $1/\alpha_t$ in it, so it is stable from a
start time where $\beta$ is large.

`DDIM` and `DPMSolverPP` solve the probability-flow ODE in log-SNR time
$\lambda_t = \log(\alpha_t/\sigma_t)$ (DPM-Solver's convention: half of
`AbstractSDE.log_snr`, which is $\log(\alpha_t^2/\sigma_t^2)$) with the data prediction
$\hat x_0 = (x + \sigma_t^2 s_t(x))/\alpha_t$ (Lu et al., DPM-Solver++): with
$h = \lambda_s - \lambda_t$,

$$x_s = \frac{\sigma_s}{\sigma_t}\,x_t + \alpha_s\,(1 - e^{-h})\,D,$$

$D = \hat x_0(t)$ for `DDIM` (first order), and for `DPMSolverPP` (2M, second order)
$D = \hat x_0(t) + \frac{1}{2r}\,(\hat x_0(t) - \hat x_0(t_{\rm prev}))$ with
$r = (\lambda_t - \lambda_{t_{\rm prev}})/h$, from the previous step's prediction
(its first step is a `DDIM` step). One score evaluation per step either way.
`SDEDPMSolverPP` is the reverse-SDE counterpart (2M), whose first-order form is the
`ExponentialIntegrator` step. `UniPC` adds UniC-2's correction of each step's start
to `DPMSolverPP`'s step (third order, same cost).
"""

from typing import ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from diffrax._local_interpolation import LocalLinearInterpolation
from diffrax._term import WrapTerm  # diffeqsolve's wrapper when time runs backwards
from jaxtyping import Array, Bool, Float, Int

from ._sde import AbstractSDE


def _working_dtype(y) -> jnp.dtype:
    """The dtype a step's arithmetic runs in: the state's, or float32 for 16-bit
    states. A 16-bit step combining the state with coefficients near 1 (e.g.
    $1/\alpha_{t|s}$, rounded to bfloat16 with the same error at every step) would
    drift by a rounding error per step; the score is still evaluated on the
    16-bit state, and the new state is rounded once."""
    return jnp.promote_types(y.dtype, jnp.float32)


def _sde_times(term, t0, t1):
    """The step's start and end in the SDE's own time, and the ODE term's control
    (the signed step in the SDE's time), also when `diffeqsolve` has flipped time to
    integrate backwards (the control then has the opposite sign to `t1 - t0`)."""
    dt = term.contr(t0, t1)
    # The sign of the control against the step; for the zero-length steps a
    # finished particle takes inside a vmapped adaptive loop (dt = 0: the test
    # says +1, and times -t read as SDE times gave NaN marginals and gradients)
    # the sign of the time itself, as SDE times are never negative (diffeqsolve's
    # wrapper and a user's term in flipped time both run at -t)
    direction = jnp.where(
        dt == 0, jnp.where(t0 < 0, -1, 1), jnp.where(dt * (t1 - t0) < 0, -1, 1)
    )
    return t0 * direction, t1 * direction, dt


def _reverse_drift(term):
    """The `ReverseDrift` of a drift term built by `reverse_sde` /
    `probability_flow`, also inside diffrax's direction wrapper; else `None`."""
    from ._reverse import ReverseDrift

    while isinstance(term, WrapTerm):
        term = term.term
    field = getattr(term, "vector_field", None)
    return field if isinstance(field, ReverseDrift) else None


def _read_score(sde, drift_term, t0, ta, y0, args, score_scale) -> Array:
    r"""The score at the step's start, in the step's working dtype.

    From guidediff's own terms, the score itself (evaluated at the SDE time `ta`,
    as the drift evaluates it). From any other drift term $v = f x - c\,g^2 s$
    ($c$ = `score_scale`), read back: $s = (f x - v)/(c\,g^2)$, with $f x$ and
    $c\,g^2$ computed as `ReverseDrift` computes them (in the working dtype).
    Reading back from a 16-bit drift costs its rounding, and overflows where the
    drift exceeds the 16-bit range although its step does not (float16: a VE SDE's
    $g^2 s$ near $T$ for $\sigma_{\max} = 1000$)."""
    dtype = _working_dtype(y0)
    drift = _reverse_drift(drift_term)
    if drift is not None and drift.score_scale == score_scale:
        return drift.score(ta, y0, args).astype(dtype)
    v = drift_term.vf(t0, y0, args).astype(dtype)
    g2 = (sde.diffusion(ta) ** 2).astype(dtype)
    return (sde.drift(ta, y0.astype(dtype)) - v) / (score_scale * g2)


def _end_marginal(sde, ta, tb):
    r"""$(\alpha, \sigma, \lambda)$ at a step's end `tb`, differentiable also where
    $\sigma(t_b) = 0$ (a grid ending at $t = 0$): there $\sigma = \sqrt{\cdot}$ and
    $\lambda = \log(\alpha/\sigma)$ have infinite derivatives, which reverse mode
    multiplies by 0 into NaN (the values are finite). $\sigma$ and $\lambda$ are
    then taken at the step's start `ta` and replaced by $0$ and $\infty$ (the
    double-`where` pattern: the replaced branch's derivatives are finite)."""
    alpha, sigma = sde.marginal(tb)
    end = lax.stop_gradient(sigma) == 0
    alpha_s, sigma_s = sde.marginal(jnp.where(end, ta, tb))
    sigma_b = jnp.where(end, 0.0, sigma_s).astype(sigma.dtype)
    lam_b = jnp.where(end, jnp.inf, jnp.log(alpha_s / sigma_s)).astype(sigma.dtype)
    return alpha, sigma_b, lam_b


def _nan_if_forward(y1, ta, tb):
    """NaN (a failed particle) for a step forward in the SDE's time: the reverse
    SDE's Gaussian step has a negative variance there, and clipping it to zero
    would drop the noise silently (an inconsistent solver, not an error)."""
    return jnp.where(tb > ta, jnp.nan, y1)


class _ReverseSDESolver(dfx.AbstractItoSolver):
    """Shared by the one-evaluation-per-step solvers of `reverse_sde` terms."""

    sde: AbstractSDE
    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def strong_order(self, terms):
        return 0.5

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class ExponentialIntegrator(_ReverseSDESolver):
    r"""The exponential-integrator (DDPM-ancestral) step for `reverse_sde` terms.

    It takes the score from guidediff's own drift term (`ReverseDrift`); a foreign
    drift term's score is read back, $s = (f(t)x - v)/g(t)^2$ where $v$ is the
    reverse drift. It reads the Brownian increment $\Delta W$ from the noise term, using
    $\xi = \Delta W/\sqrt{|\Delta t|}$, so for the same Brownian path it is coupled to
    Euler-Maruyama. Steps backward in the SDE's time (from noise to data; a forward
    step returns NaN: its Gaussian step would have a negative variance), with
    `diffrax.diffeqsolve` (`StepTo` grids) or guidediff's fixed-grid driver.

    **Arguments:**

    - `sde`: the forward SDE whose reverse is being solved.

    !!! example

        ```python
        # X0 ~ N(2, 1) in 1-D, only 20 steps: the mean is right; the variance is
        # biased low at so few steps (0.71 by the chain's exact variance recursion)
        sde = gd.VPSDE()
        out = gd.sample(jr.key(0), sde, gd.Gaussian(jnp.array([2.0]), 1.0).score(sde),
                        (1,), num_particles=4096, solver=gd.ExponentialIntegrator(sde),
                        ts=gd.uniform_grid(sde.T, 1e-3, 20))
        mean, se = jnp.mean(out.ys), jnp.std(out.ys) / jnp.sqrt(4096)
        assert abs(mean - 2.0) < 4 * se + 0.02  # MC error + a 20-step bias bound
        ```
    """

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        drift_term, noise_term = terms.terms
        ta, tb, dt = _sde_times(drift_term, t0, t1)
        dtype = _working_dtype(y0)
        score = _read_score(self.sde, drift_term, t0, ta, y0, args, 1.0)
        y = y0.astype(dtype)
        alpha_a, sigma_a = self.sde.marginal(ta)
        alpha_b, sigma_b, _ = _end_marginal(self.sde, ta, tb)
        a_ab = (alpha_a / alpha_b).astype(dtype)
        var_ab = (sigma_a**2 - (alpha_a / alpha_b) ** 2 * sigma_b**2).astype(dtype)
        mean = (y + var_ab * score) / a_ab
        # a zero-length step (a finished particle's, inside a vmapped adaptive
        # loop) is the identity, with finite values in the branch not taken
        zero = dt == 0
        var_ab = jnp.where(zero, 1.0, var_ab)
        std = jnp.sqrt(jnp.maximum(var_ab, 0.0)) * (sigma_b / sigma_a).astype(dtype)
        dw = noise_term.contr(t0, t1).astype(dtype)
        xi = dw / jnp.sqrt(jnp.abs(jnp.where(zero, 1.0, dt))).astype(dtype)
        y1 = jnp.where(zero, y, mean + std * xi).astype(y0.dtype)
        y1 = _nan_if_forward(y1, ta, tb)
        dense_info = dict(y0=y0, y1=y1)
        return y1, None, dense_info, None, dfx.RESULTS.successful


class _DataPredictionState(eqx.Module):
    x0: Float[Array, "*x"]  # the previous step's data prediction
    log_snr: Float[Array, ""]  # lambda at the previous step's start
    ready: Bool[Array, ""]  # False before the first step


def _initial_state(t0, y0) -> _DataPredictionState:
    # log-SNRs stay in the time dtype (float32 for 16-bit states: `r` below is a
    # ratio of log-SNR differences, which 16 bits would cancel away)
    time_dtype = jnp.promote_types(jnp.result_type(t0), jnp.float32)
    return _DataPredictionState(
        jnp.zeros(y0.shape, _working_dtype(y0)),
        jnp.zeros((), time_dtype),
        jnp.asarray(False),
    )


class _Prediction(NamedTuple):
    # the scalars are in the time dtype, x0 in the step's working dtype
    ta: Array  # the step's start and end in the SDE's time
    tb: Array
    dt: Array  # the drift term's control
    x0: Array  # Tweedie's data prediction at ta
    ratio: Array  # sigma_b / sigma_a
    alpha_b: Array
    sigma_b: Array
    log_snr_a: Array
    h: Array  # lambda_b - lambda_a


def _predict(sde, drift_term, t0, t1, y0, args, score_scale) -> _Prediction:
    r"""Read the score back from a reverse drift $f x - c\,g^2 s$ ($c$ = `score_scale`)
    and turn it into $\hat x_0$ and the step's log-SNR increment."""
    ta, tb, dt = _sde_times(drift_term, t0, t1)
    dtype = _working_dtype(y0)
    score = _read_score(sde, drift_term, t0, ta, y0, args, score_scale)
    y = y0.astype(dtype)
    alpha_a, sigma_a = sde.marginal(ta)
    alpha_b, sigma_b, lam_b = _end_marginal(sde, ta, tb)
    x0 = (y + (sigma_a**2).astype(dtype) * score) / alpha_a.astype(dtype)
    lam_a = jnp.log(alpha_a / sigma_a)
    ratio = sigma_b / sigma_a
    return _Prediction(ta, tb, dt, x0, ratio, alpha_b, sigma_b, lam_a, lam_b - lam_a)


def _keep_if_zero(dt, old, new):
    """A multistep solver's state after a zero-length step (a finished particle's
    inside a vmapped adaptive loop): the previous one, so the history stays that
    of the last real step."""
    return jax.tree.map(lambda a, b: jnp.where(dt == 0, a, b), old, new)


def _multistep_x0(p: _Prediction, state: _DataPredictionState, multistep: bool):
    r"""$D$: $\hat x_0$, or with `multistep` its 2M extrapolation from the previous
    step's prediction, $\hat x_0 + (\hat x_0 - \hat x_0^{\rm prev})/(2r)$."""
    if not multistep:
        return p.x0
    # Before the first step there is no previous prediction, and a step to sigma = 0
    # (t = 0: h = inf, r = 0) takes the first-order step ("lower order final"). In
    # both cases r = 1 keeps the unused branch finite (a NaN there would poison
    # gradients through jnp.where).
    # (and zero-length steps, a finished particle's inside a vmapped adaptive loop)
    second = state.ready & jnp.isfinite(p.h) & (p.h != 0)
    second = second & (p.log_snr_a != state.log_snr)
    h = jnp.where(second, p.h, 1.0)
    r = jnp.where(second, (p.log_snr_a - state.log_snr) / h, 1.0)
    corrected = p.x0 + (p.x0 - state.x0) / (2 * r).astype(p.x0.dtype)
    return jnp.where(second, corrected, p.x0)


class DDIM(dfx.AbstractSolver):
    r"""DDIM: the first-order data-prediction step of the probability-flow ODE.

    $$x_s = \frac{\sigma_s}{\sigma_t}\,x_t + \alpha_s\,(1 - e^{-h})\,\hat x_0(t),
    \qquad h = \lambda_s - \lambda_t,\quad \lambda = \log\frac{\alpha}{\sigma},$$

    which is DPM-Solver++(1). Exact when $\hat x_0$ does not depend on the time
    (a point mass); one score evaluation per step. For `probability_flow` terms
    (`gd.sample(..., process="ode")`), with either driver, in either time direction.

    **Arguments:**

    - `sde`: the forward SDE whose probability-flow ODE is being solved.

    ```python
    import jax.numpy as jnp, jax.random as jr, guidediff as gd
    sde = gd.VPSDE()
    data = gd.Gaussian(jnp.zeros(2), jnp.eye(2))
    ts = gd.logsnr_grid(sde, sde.T, 1e-3, 20)
    out = gd.sample(jr.key(0), sde, data.score(sde), (2,), num_particles=8, ts=ts,
                    process="ode", solver=gd.DDIM(sde))
    ```
    """

    sde: AbstractSDE
    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = LocalLinearInterpolation
    _multistep: ClassVar[bool] = False

    def order(self, terms):
        return 2 if self._multistep else 1

    def init(self, terms, t0, t1, y0, args):
        # DDIM needs no memory; the multistep subclass carries the last prediction.
        return _initial_state(t0, y0) if self._multistep else None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        p = _predict(self.sde, terms, t0, t1, y0, args, 0.5)
        d = _multistep_x0(p, solver_state, self._multistep)
        dtype = d.dtype  # the working dtype
        y = y0.astype(dtype)
        y1 = p.ratio.astype(dtype) * y - (p.alpha_b * jnp.expm1(-p.h)).astype(dtype) * d
        y1 = y1.astype(y0.dtype)
        state = None
        if self._multistep:
            state = _DataPredictionState(
                p.x0, p.log_snr_a.astype(solver_state.log_snr.dtype), jnp.asarray(True)
            )
            state = _keep_if_zero(p.dt, solver_state, state)
        return y1, None, dict(y0=y0, y1=y1), state, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class DPMSolverPP(DDIM):
    r"""DPM-Solver++(2M): the second-order multistep data-prediction step of the
    probability-flow ODE (Lu et al. 2022), the usual few-step solver for guided
    sampling.

    $$x_s = \frac{\sigma_s}{\sigma_t}\,x_t + \alpha_s\,(1 - e^{-h})
    \Big[\hat x_0(t) + \frac{\hat x_0(t) - \hat x_0(t_{\rm prev})}{2r}\Big],
    \qquad r = \frac{\lambda_t - \lambda_{t_{\rm prev}}}{h},$$

    with the previous step's prediction carried in the solver state; the first step
    is a `DDIM` step. One score evaluation per step; global error $O(h^2)$ (on a
    grid uniform in log-SNR, `gd.logsnr_grid`). It has no error estimate: fixed
    grids (`StepTo` or the scan driver), or adaptive steps inside
    `diffrax.HalfSolver`, whose two half steps give one (a rejected step keeps the
    previous state, so the carried prediction stays that of the last accepted
    step; a test checks UniPC's error against the tolerance). Use a
    grid whose log-SNR steps change gradually: on a uniform grid ending at a tiny
    $t$ the last step's $h$ is many times the previous one's ($r$ small), and the
    correction $(\hat x_0(t) - \hat x_0(t_{\rm prev}))/(2r)$ is amplified (with
    the 1 - t schedule down to $10^{-6}$ and data $\mathcal N(0, 0.1^2)$, 100
    uniform steps give 2.4x the target's variance, a 100-step log-SNR grid is within
    1 %: the flow of Gaussian data is linear, so these are exact, and a test checks
    them). The same holds for
    `SDEDPMSolverPP`.

    **Arguments:**

    - `sde`: the forward SDE whose probability-flow ODE is being solved.

    ```python
    import jax.random as jr, guidediff as gd
    sde = gd.VPSDE()
    gmm = gd.GaussianMixture(weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]],
                             covs=[0.5, 0.5], labels=[0, 1])
    score = gd.guide(gmm.conditional_score(sde), gd.cfg(2.0, null_args=gmm.null_label))
    out = gd.sample(jr.key(0), sde, score, (2,), num_particles=8, args=1,
                    ts=gd.logsnr_grid(sde, sde.T, 1e-3, 20), process="ode",
                    solver=gd.DPMSolverPP(sde))
    ```
    """

    _multistep: ClassVar[bool] = True


def _phi_ratios(z, bh2: bool):
    r"""UniC-2's $(b_1, b_2) = (\varphi_2(z), 2\varphi_3(z))\, z / B$ at $z = -h$
    (`UniPC`'s $\rho_1 + \rho_2$ and $r_1\rho_1 + \rho_2$), with $B = z$
    (`bh2=False`, UniPC's B1(h): the ratios are $\varphi_2$, $2\varphi_3$) or
    $B = e^z - 1 = z\varphi_1(z)$ (B2(h): both divided by $\varphi_1$).
    $\varphi_1(z) = (e^z - 1)/z$, $\varphi_{k+1}(z) = (\varphi_k(z) - 1/k!)/z$: a
    Taylor series below $|z| = 1$ (the recursion cancels there), the recursion
    above (it loses at most a factor 3 there)."""
    small = jnp.abs(z) < 1
    zs = jnp.where(small, z, 1.0)  # each branch finite where it is not taken
    zl = jnp.where(small, 1.0, z)
    # series: phi_k(z) = sum_j z^j / (j + k)!, 17 terms (the first omitted term of
    # phi_1 is below 1/18! < 2e-16 for |z| < 1)
    fact = [1.0]
    for j in range(1, 21):
        fact.append(fact[-1] * j)
    phi1_s = sum(zs**j / fact[j + 1] for j in range(17))
    phi2_s = sum(zs**j / fact[j + 2] for j in range(17))
    phi3_s = sum(zs**j / fact[j + 3] for j in range(17))
    phi1_l = jnp.expm1(zl) / zl
    phi2_l = (phi1_l - 1) / zl
    phi3_l = (phi2_l - 0.5) / zl
    phi1 = jnp.where(small, phi1_s, phi1_l)
    phi2 = jnp.where(small, phi2_s, phi2_l)
    phi3 = jnp.where(small, phi3_s, phi3_l)
    scale = phi1 if bh2 else jnp.ones_like(phi1)
    return phi2 / scale, 2 * phi3 / scale


class _UniPCState(eqx.Module):
    x: Float[Array, "*x"]  # the corrected state at the previous step's start
    x0: Float[Array, "*x"]  # the data prediction there (from the uncorrected state)
    x0_prev: Float[Array, "*x"]  # and one step before
    log_snr: Float[Array, ""]  # lambda at the previous step's start
    log_snr_prev: Float[Array, ""]  # and one step before
    sigma: Float[Array, ""]  # sigma at the previous step's start
    count: Int[Array, ""]  # steps taken so far, up to 2


class UniPC(DDIM):
    r"""UniPC-2 (Zhao et al. 2023): DPM-Solver++(2M)'s predictor followed by the
    unified corrector UniC-2, third order for one score evaluation per step (the
    default solver of many diffusion pipelines for few-step guided sampling).

    With $h = \lambda_s - \lambda_t$, $z = -h$, $\hat x_0$ Tweedie's data prediction
    and $B(h) = e^{z} - 1$ (`variant="bh2"`, the default, for guided sampling) or
    $B(h) = z$ (`"bh1"`), a step from $t$ to $s$ is

    1. **correct** the state at $t$ (the previous step's prediction $\tilde x_t$)
       with the score just evaluated there, re-solving the previous step from its
       corrected start $x_u$ ($u$ the previous time, $h_u = \lambda_t - \lambda_u$):
       $$x_t = \frac{\sigma_t}{\sigma_u}x_u + \alpha_t(1 - e^{-h_u})\,\hat x_0(u)
       - \alpha_t B(h_u)\Big[\rho_1 D_1 + \rho_2\big(\hat x_0(t) - \hat x_0(u)\big)
       \Big],$$
       $D_1 = (\hat x_0(u') - \hat x_0(u))/r_1$, $r_1 = (\lambda_{u'} - \lambda_u)/h_u$
       from the step before ($u'$), and $(\rho_1, \rho_2)$ solving
       $\rho_1 + \rho_2 = \varphi_2(z)\,z/B$, $r_1\rho_1 + \rho_2 = 2\varphi_3(z)\,z/B$
       ($\varphi_k$ the exponential-integrator functions; UniC-1, $\rho_1 = 0$,
       $\rho_2 = 1/2$, on the second step);
    2. **predict** $\tilde x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1 -
       e^{-h})\,\hat x_0(t) - \frac{\alpha_s B(h)}{2}\,\frac{\hat x_0(u) - \hat
       x_0(t)}{r}$ with $r = (\lambda_u - \lambda_t)/h$ (UniP-2; with B2 this is
       exactly `DPMSolverPP`'s step; a `DDIM` step first and where $\sigma_s = 0$).

    The score at $t$ is evaluated once, at the uncorrected $\tilde x_t$, and
    serves both the corrector and the next predictor, so the cost is one score
    evaluation per step, as `DPMSolverPP`'s, for a global error $O(h^3)$ (on a grid
    uniform in log-SNR, `gd.logsnr_grid`). The returned particles (and a saved
    trajectory) are the predictions $\tilde x$: the last one is not corrected,
    which would cost one more evaluation. For `probability_flow` terms
    (`gd.sample(..., process="ode")`), either driver, in either time direction;
    fixed grids, or adaptive steps inside `diffrax.HalfSolver`, as `DPMSolverPP`.
    Same caveat as `DPMSolverPP` on grids whose log-SNR steps change abruptly.

    **Arguments:**

    - `sde`: the forward SDE whose probability-flow ODE is being solved.
    - `variant`: `"bh2"` ($B(h) = e^{-h} - 1$, the default) or `"bh1"`
      ($B(h) = -h$).

    ```python
    import jax.numpy as jnp, jax.random as jr, guidediff as gd
    sde = gd.VPSDE()
    mu, c = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0])
    score = gd.Gaussian(mu, jnp.diag(c)).score(sde)
    ts = gd.logsnr_grid(sde, sde.T, 1e-3, 32)
    y0 = jr.normal(jr.key(0), (8, 2))

    def std(t):  # of Gaussian data's marginal, whose flow keeps (x - a mu) / std
        a, s = sde.marginal(t)
        return a, jnp.sqrt(a**2 * c + s**2)

    (a0, s0), (a1, s1) = std(ts[0]), std(ts[-1])
    exact = a1 * mu + s1 / s0 * (y0 - a0 * mu)

    def error(solver):
        ys = gd.sample(jr.key(0), sde, score, (2,), y0=y0, ts=ts, process="ode",
                       solver=solver).ys
        return jnp.max(jnp.abs(ys - exact))

    assert error(gd.UniPC(sde)) < 0.5 * error(gd.DPMSolverPP(sde))  # same cost
    ```
    """

    variant: str = eqx.field(static=True, default="bh2")

    def __check_init__(self):
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(
                f"UniPC's variant must be 'bh1' or 'bh2', got {self.variant!r}"
            )

    def order(self, terms):
        return 3

    def init(self, terms, t0, t1, y0, args):
        s = _initial_state(t0, y0)
        return _UniPCState(
            s.x0, s.x0, s.x0, s.log_snr, s.log_snr, s.log_snr, jnp.asarray(0)
        )

    def _b(self, z):
        """$B(h)$ at $z = -h$."""
        return jnp.expm1(z) if self.variant == "bh2" else z

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        st = solver_state
        p = _predict(self.sde, terms, t0, t1, y0, args, 0.5)
        dtype = p.x0.dtype  # the working dtype
        tdtype = st.log_snr.dtype
        m = p.x0
        alpha_a, sigma_a = self.sde.marginal(p.ta)
        # -- corrector (from the second step on): re-solve the previous step from
        # its corrected start with the score at this step's start
        # (a zero-length step, a finished particle's inside a vmapped adaptive
        # loop, neither corrects nor extrapolates: every branch stays finite)
        zero = p.dt == 0
        corrects = (st.count >= 1) & (p.log_snr_a != st.log_snr) & ~zero
        hc = jnp.where(corrects, p.log_snr_a - st.log_snr, 1.0)
        zc = -hc
        base = (sigma_a / jnp.where(corrects, st.sigma, 1.0)).astype(dtype) * st.x - (
            alpha_a * jnp.expm1(zc)
        ).astype(dtype) * st.x0
        r1 = (st.log_snr_prev - st.log_snr) / hc
        second = corrects & (st.count >= 2) & (r1 != 0) & (r1 != 1)
        r1 = jnp.where(second, r1, -1.0)
        b1, b2 = _phi_ratios(zc, self.variant == "bh2")
        rho1 = jnp.where(second, (b1 - b2) / (1 - r1), 0.0)
        rho2 = jnp.where(second, b1 - rho1, 0.5)
        d1 = (st.x0_prev - st.x0) / r1.astype(dtype)
        coeff = alpha_a * self._b(zc)
        x = base - coeff.astype(dtype) * (
            rho1.astype(dtype) * d1 + rho2.astype(dtype) * (m - st.x0)
        )
        x = jnp.where(corrects, x, y0.astype(dtype))
        # -- predictor UniP-2 (DDIM on the first step and to sigma = 0)
        pred2 = corrects & jnp.isfinite(p.h) & (p.h != 0)
        h = jnp.where(pred2, p.h, 1.0)
        r = jnp.where(pred2, (st.log_snr - p.log_snr_a) / h, -1.0)
        y1 = (
            p.ratio.astype(dtype) * x + (p.alpha_b * -jnp.expm1(-p.h)).astype(dtype) * m
        )
        slope = (st.x0 - m) / r.astype(dtype)
        y1 = y1 - jnp.where(
            pred2, (p.alpha_b * self._b(-h) / 2).astype(dtype) * slope, 0.0
        )
        y1 = y1.astype(y0.dtype)
        state = _UniPCState(
            x,
            m,
            st.x0,
            p.log_snr_a.astype(tdtype),
            st.log_snr,
            sigma_a.astype(tdtype),
            jnp.minimum(st.count + 1, 2),
        )
        # a zero-length step is the identity and leaves the history as it was
        y1 = jnp.where(zero, y0, y1)
        state = _keep_if_zero(p.dt, st, state)
        return y1, None, dict(y0=y0, y1=y1), state, dfx.RESULTS.successful


class SDEDPMSolverPP(_ReverseSDESolver):
    r"""SDE-DPM-Solver++(2M): the second-order multistep data-prediction step of the
    reverse SDE (Lu et al. 2022; "DPM++ 2M SDE").

    $$x_s = \frac{\sigma_s}{\sigma_t}e^{-h}\,x_t + \alpha_s\,(1 - e^{-2h})\,D
    + \sigma_s\sqrt{1 - e^{-2h}}\;\xi,\qquad
    D = \hat x_0(t) + \frac{\hat x_0(t) - \hat x_0(t_{\rm prev})}{2r},$$

    with $h$, $r$ as in `DPMSolverPP` and $\xi = \Delta W/\sqrt{|\Delta t|}$ from the
    noise term (so it is coupled to `ExponentialIntegrator`, which is this step
    with $D = \hat x_0(t)$, as is its own first step). For `reverse_sde` terms
    (`gd.sample(..., process="sde")`, the default), on fixed grids, with either
    driver; backward in the SDE's time only (a forward step returns NaN).

    **Arguments:**

    - `sde`: the forward SDE whose reverse is being solved.

    ```python
    import jax.numpy as jnp, jax.random as jr, guidediff as gd
    sde = gd.VPSDE()
    data = gd.Gaussian(jnp.zeros(2), jnp.eye(2))
    out = gd.sample(jr.key(0), sde, data.score(sde), (2,), num_particles=8,
                    ts=gd.logsnr_grid(sde, sde.T, 1e-3, 20),
                    solver=gd.SDEDPMSolverPP(sde))
    ```
    """

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        return _initial_state(t0, y0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        drift_term, noise_term = terms.terms
        p = _predict(self.sde, drift_term, t0, t1, y0, args, 1.0)
        d = _multistep_x0(p, solver_state, True)
        zero = p.dt == 0  # a zero-length step: the identity, finite throughout
        one_minus = -jnp.expm1(-2 * jnp.where(zero, 1.0, p.h))  # 1 - e^{-2h}
        dw = noise_term.contr(t0, t1)
        dtype = d.dtype  # the working dtype
        xi = dw.astype(dtype) / jnp.sqrt(jnp.abs(jnp.where(zero, 1.0, p.dt))).astype(
            dtype
        )
        noise_std = p.sigma_b * jnp.sqrt(jnp.maximum(one_minus, 0.0))
        y1 = (
            (p.ratio * jnp.exp(-p.h)).astype(dtype) * y0.astype(dtype)
            + (p.alpha_b * one_minus).astype(dtype) * d
            + noise_std.astype(dtype) * xi
        )
        y1 = jnp.where(zero, y0.astype(dtype), y1).astype(y0.dtype)
        y1 = _nan_if_forward(y1, p.ta, p.tb)
        state = _DataPredictionState(
            p.x0, p.log_snr_a.astype(solver_state.log_snr.dtype), jnp.asarray(True)
        )
        state = _keep_if_zero(p.dt, solver_state, state)
        return y1, None, dict(y0=y0, y1=y1), state, dfx.RESULTS.successful
