r"""Log-likelihoods through the probability-flow ODE.

The probability-flow ODE $\dot x = v_t(x) = f(t)x - \tfrac12 g(t)^2 s_t(x)$ carries
the marginal density $p_t$ along its paths (the continuity equation
$\partial_t p_t = -\nabla\cdot(p_t v_t)$), so along a path $x_t$

$$\frac{d}{dt}\log p_t(x_t) = -\nabla\cdot v_t(x_t),\qquad
\log p_{t_0}(x) = \log p_T(x_T) + \int_{t_0}^{T}\nabla\cdot v_t(x_t)\,dt,$$

with $p_T$ replaced by the prior (Song et al., 2021, section D.2). The state
$(x_t, \int\nabla\cdot v)$ is integrated forward in time, from the data end $t_0$ to
$T$, by `diffrax.diffeqsolve`.
"""

import typing
from collections.abc import Callable
from typing import Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from equinox.internal import nondifferentiable_backward
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Key

from ._brownian import check_key, threefry_key, unwrap_solver
from ._custom_types import Args
from ._jit import filter_jit, is_real_scalar
from ._reverse import ReverseDrift
from ._sample import (
    _args_as_arrays,
    _check_sde,
    _grid_in_dtype,
    _grid_ok,
    _safe_grid,
)
from ._sample_checks import (
    _check_count,
    _check_guidance_sde,
    _check_score_shape,
    _check_solver,
)
from ._score import AbstractScore, check_score
from ._sde import AbstractSDE
from ._solver import DDIM, _ReverseSDESolver


class LogLikelihood(eqx.Module):
    """The output of `log_likelihood`, one entry per particle.

    - `log_prob`: $\\log p_{t_0}(x)$.
    - `prior_log_prob`: $\\log p_T(x_T)$ under the prior (or `prior_logp`).
    - `delta_log_prob`: $\\int_{t_0}^T \\nabla\\cdot v_t(x_t)\\,dt$ (exact, or the
      Hutchinson estimate).
    - `ys`: the latents $x_T$, `(particles, *shape)`.
    - `result`: per-particle `diffrax.RESULTS` of the solve (which may read
      successful for a particle failed otherwise: read `failed`).
    - `failed`: the solve failed (`result`, e.g. out of `max_steps`), the point
      or the value is not finite, or a traced time was out of range. A failed
      particle's `log_prob`, `prior_log_prob`, `delta_log_prob` and `ys` are NaN.
    - `num_steps`: solver steps per particle (accepted and rejected).
    - `num_failed` (property): the number of failed particles.
    """

    log_prob: Float[Array, " particles"]
    prior_log_prob: Float[Array, " particles"]
    delta_log_prob: Float[Array, " particles"]
    ys: Array
    result: dfx.RESULTS
    failed: Bool[Array, " particles"]
    num_steps: Int[Array, " particles"]

    @property
    def num_failed(self) -> Array:
        return jnp.sum(self.failed)


def _divergence_vf(drift: ReverseDrift, exact: bool):
    """The vector field of the state $(x, \\ell)$: $(v_t(x), \\nabla\\cdot v_t(x))$,
    the divergence as the trace of the Jacobian (one JVP per coordinate) or as
    $\\varepsilon^\\top (\\partial v/\\partial x)\\varepsilon$ for a probe
    $\\varepsilon$ (Hutchinson)."""

    def vf(t, y, args):
        x, _ = y
        score_args, probe = args

        def v(x_):
            return drift(t, x_, score_args)

        if exact:
            out, lin = jax.linearize(v, x)
            basis = jnp.eye(x.size, dtype=x.dtype).reshape((x.size, *x.shape))
            columns = jax.vmap(lin)(basis).reshape(x.size, x.size)
            div = jnp.trace(columns)
        else:
            out, jv = jax.jvp(v, (x,), (probe,))
            div = jnp.vdot(probe, jv)
        return out, div.astype(x.dtype)

    return vf


_FORWARD_MODE_GRAD_MSG = (
    "gd.log_likelihood(..., adjoint=diffrax.ForwardMode()) is forward-mode only "
    "(jax.jvp / jax.jacfwd) and cannot be reverse-mode differentiated (jax.grad / "
    "jax.vjp): for jax.grad keep the default adjoint "
    "(diffrax.RecursiveCheckpointAdjoint())."
)
# built once: constructing an equinox module costs host time on every direct call
_DEFAULT_CONTROLLER = dfx.PIDController(rtol=1e-5, atol=1e-5)
_DEFAULT_SOLVER = dfx.Tsit5()
_DEFAULT_ADJOINT = dfx.RecursiveCheckpointAdjoint()


@filter_jit
def _log_likelihood_jit(
    xs, probes, ok, sde, score, args, t0, t1, ts, solver, controller, adjoint, static
):
    exact, max_steps, prior_logp, forward = static
    term = dfx.ODETerm(_divergence_vf(ReverseDrift(sde, score, 0.5), exact))
    controller = dfx.StepTo(ts) if ts is not None else controller

    def one(x, probe):
        # a non-finite point is flagged at once (it would take every step first)
        finite = jnp.all(jnp.isfinite(x))
        sol = dfx.diffeqsolve(
            term,
            solver,
            t0,
            t1,
            None,
            (jnp.where(finite, x, 0), jnp.zeros((), x.dtype)),
            args=(args, probe),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
            throw=False,
        )
        y1, delta = sol.ys[0][0], sol.ys[1][0]
        prior = (sde.prior_logp if prior_logp is None else prior_logp)(y1)
        prior = jnp.asarray(prior, x.dtype)
        failed = (sol.result != dfx.RESULTS.successful) | ~finite
        return y1, delta, prior, sol.result, failed, sol.stats["num_steps"]

    y1, delta, prior, result, failed, nsteps = jax.vmap(one)(xs, probes)
    log_prob = prior + delta
    failed = failed | ~jnp.isfinite(log_prob) | ~ok
    # a failed particle's values are NaN, wherever its solve stopped (as gd.sample's)
    log_prob, prior, delta = (
        jnp.where(failed, jnp.nan, a) for a in (log_prob, prior, delta)
    )
    y1 = jnp.where(failed.reshape(failed.shape + (1,) * (y1.ndim - 1)), jnp.nan, y1)
    out = LogLikelihood(log_prob, prior, delta, y1, result, failed, nsteps)
    if forward:
        # diffeqsolve's loop under ForwardMode has no transpose: JAX's own error
        # (about while loops) would name none of this
        out = nondifferentiable_backward(out, msg=_FORWARD_MODE_GRAD_MSG, symbolic=True)
    return out


def _check_likelihood_solver(solver, controller) -> None:
    """The solver steps the state and its log-density forward in time: a diffrax
    ODE solver (with an error estimate for adaptive steps)."""
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(
            f"log_likelihood: solver must be a diffrax solver, got {solver!r}"
        )
    name = type(solver).__name__
    # (DPMSolverPP and UniPC are DDIMs; SDEDPMSolverPP a _ReverseSDESolver)
    if isinstance(unwrap_solver(solver), DDIM | _ReverseSDESolver):
        raise TypeError(
            f"log_likelihood: {name} is (or wraps) a sampling solver (reverse "
            "time, the state alone); the likelihood integrates the state and its "
            "log-density forward in time: pass a diffrax ODE solver, e.g. "
            "diffrax.Tsit5() (the default) or diffrax.Heun()"
        )
    if typing.get_origin(getattr(solver, "term_structure", None)) is dfx.MultiTerm:
        raise ValueError(
            f"log_likelihood: {name} steps a pair of terms (an SDE's drift and "
            "diffusion); the probability-flow ODE is one term: pass a diffrax ODE "
            "solver, e.g. diffrax.Tsit5() (the default) or diffrax.Heun()"
        )
    if controller is not None and not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(
            f"log_likelihood: {name} gives no error estimate, so it cannot take the "
            f"adaptive steps of stepsize_controller={type(controller).__name__}: "
            "pass a fixed grid as ts= (decreasing from sde.T), or a solver with "
            "an error estimate, e.g. diffrax.Tsit5() (the default)"
        )


def _score_has_jvp(score, t, shape, dtype, args) -> bool:
    """Whether the score can be differentiated in forward mode (a JVP): no
    `jax.custom_vjp` in its program. Read from its jaxpr, not run: under `jax.jit`
    a JVP is only recorded, so its error would not be raised. Called only on the
    error path; when the program cannot be read, taken as differentiable."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    try:
        closed = jax.make_jaxpr(lambda z: score(t, z, args))(x)
    except Exception:
        return True
    return not _holds_custom_vjp(closed.jaxpr)


def _holds_custom_vjp(jaxpr, depth: int = 0) -> bool:
    if depth > 32:
        return False
    for eqn in jaxpr.eqns:
        if "custom_vjp" in eqn.primitive.name:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(inner, "eqns") and _holds_custom_vjp(inner, depth + 1):
                    return True
    return False


def log_likelihood(
    sde: AbstractSDE,
    score: AbstractScore,
    xs: Float[ArrayLike, " particles *shape"],
    *,
    args: Args = None,
    t0: float | None = None,
    ts: Float[ArrayLike, " n"] | None = None,
    divergence: Literal["exact", "hutchinson"] = "exact",
    key: Key | None = None,
    solver: dfx.AbstractSolver | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    adjoint: dfx.AbstractAdjoint | None = None,
    max_steps: int = 4096,
    prior_logp: Callable[[Array], ArrayLike] | None = None,
) -> LogLikelihood:
    r"""The log-density of each particle under the probability-flow ODE's model:

    $$\log p_{t_0}(x) = \log \pi(x_T) + \int_{t_0}^{T}\nabla\cdot v_t(x_t)\,dt,
    \qquad \dot x_t = v_t(x_t) = f(t)x_t - \tfrac12 g(t)^2 s_t(x_t),\ x_{t_0} = x,$$

    where $\pi$ is the prior. With the exact score and $\pi = p_T$ this is the exact
    $\log p_{t_0}(x)$ up to the solver's tolerance; with the default prior
    $\mathcal N(0, \sigma_T^2 I)$ for $p_T$ it is off by the mismatch of the two at
    $x_T$ (about 0.01 in the example below, where $p_T$'s mean is 0.007). With a
    learned or guided score it is the log-density of the law that the
    probability-flow ODE carries the prior to at $t_0$: the model's likelihood
    (Song et al., 2021), the law that `gd.sample(..., process="ode")` (ending at
    $t_0$, without `denoise`) draws from in the limit of small steps (its own
    discrete steps are not the exact flow). For a guided score that is the
    guided ODE's law, which need not be a tilt of $p$.

    **Arguments:**

    - `sde`, `score`: the forward SDE and a (possibly guided) score.
    - `xs`: the points, `(particles, *shape)` (a leading particle axis, even for
      one particle).
    - `args`: passed to the score (e.g. a class label, for $\log p(x\mid c)$);
      shared by all particles (`jax.vmap` over labels for one per particle).
    - `t0`: the data end (default `1e-3`, the samplers' default end), in
      $[0, T)$; $T$ is `sde.T`.
    - `ts`: instead of `t0` and adaptive steps, a fixed grid as the samplers take
      it, decreasing from $T$ to $t_0$ (e.g. `gd.uniform_grid(sde.T, 1e-3, n)`),
      stepped in reverse order (`diffrax.StepTo(ts[::-1])`). Checked as
      `gd.sample` checks it; a traced `t0` or grid is checked on the device
      (a bad one flags every particle as failed).
    - `divergence`: `"exact"` (the trace of the Jacobian of $v$: one
      Jacobian-vector product per coordinate, for small dimensions) or
      `"hutchinson"`, the unbiased estimate $\varepsilon^\top \partial_x v\,
      \varepsilon$ with one Rademacher probe $\varepsilon$ per particle, held
      fixed over the solve (one JVP per step; for images). Its `log_prob` is
      unbiased; average several keys to shrink its variance.
    - `key`: the probes' key (`"hutchinson"` only): particle `i` uses
      `fold_in(key, i)`, as in `gd.sample`: the first `k` particles' values do
      not depend on how many follow.
    - `solver`: a diffrax ODE solver (default `diffrax.Tsit5()`; guidediff's
      sampling solvers integrate the reverse direction and are refused).
    - `stepsize_controller`: an adaptive controller, default
      `diffrax.PIDController(rtol=1e-5, atol=1e-5)`; for fixed steps pass `ts`.
    - `adjoint`: diffrax's adjoint (default `RecursiveCheckpointAdjoint()`:
      reverse mode, `jax.grad` reaches `xs` and the score's parameters); forward
      mode (`jax.jvp`, `jax.jacfwd`) needs `diffrax.ForwardMode()`.
    - `max_steps`: the most steps a particle may take; one that needs more is
      flagged failed.
    - `prior_logp`: $\log\pi$ of one latent, a float scalar (default
      `sde.prior_logp`); e.g. the exact $\log p_T$ of an oracle, for a check
      against its closed form. A static part of the compiled program: define the
      function once (a new `lambda` per call compiles again).

    **Returns:** a `LogLikelihood` (a failed particle's values are all NaN, never
    a plausible number); divide `-log_prob` by $d\log 2$ for bits per
    dimension (of the continuous density: a dequantised image needs its own
    correction).

    !!! example

        ```python
        # X0 ~ N(1, 0.5^2 I) under the VP SDE: X_t ~ N(alpha, alpha^2/4 + sigma^2)
        sde = gd.VPSDE()
        data = gd.Gaussian(jnp.ones(2), 0.25 * jnp.eye(2))

        def log_p(t, x):  # the exact log p_t
            alpha, sigma = sde.marginal(t)
            std = jnp.sqrt(alpha**2 / 4 + sigma**2)
            return jax.scipy.stats.norm.logpdf(x, alpha, std).sum()

        xs = jnp.array([[0.5, 1.0], [2.0, -1.0]])
        # with the exact p_T as the prior: the exact log p_t0, to the tolerance
        out = gd.log_likelihood(sde, data.score(sde), xs, t0=1e-3,
                                prior_logp=lambda y: log_p(sde.T, y))
        exact = jax.vmap(lambda x: log_p(1e-3, x))(xs)
        assert jnp.allclose(out.log_prob, exact, atol=1e-3)
        assert int(out.num_failed) == 0
        ```
    """
    check_score(score)
    _check_sde(sde)  # a traced T is refused: the time checks need it on the host
    T = float(sde.T)
    xs = jnp.asarray(xs)
    if xs.ndim < 1:
        raise ValueError(
            "log_likelihood: xs needs a leading particle axis, (particles, *shape); "
            "got a scalar (for one particle x, pass x[None])"
        )
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        xs = xs.astype(jnp.result_type(float))
    # 16-bit points are integrated in float32: the divergence's integral needs it
    dtype = jnp.promote_types(xs.dtype, jnp.float32)
    xs = xs.astype(dtype)
    shape = xs.shape[1:]
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(
            f"log_likelihood: divergence must be 'exact' or 'hutchinson', got "
            f"{divergence!r}"
        )
    exact = divergence == "exact"
    if exact and key is not None:
        raise ValueError(
            "log_likelihood: key draws the probes of divergence='hutchinson'; the "
            "exact divergence uses none (pass divergence='hutchinson', or no key)"
        )
    if not exact and key is None:
        raise ValueError(
            "log_likelihood: divergence='hutchinson' needs a key for its probes"
        )
    max_steps = _check_count("max_steps", max_steps)
    if prior_logp is not None and not callable(prior_logp):
        raise TypeError(
            "log_likelihood: prior_logp must be a function of one latent, got "
            f"{type(prior_logp).__name__}"
        )
    if ts is not None:
        if t0 is not None:
            raise ValueError(
                "log_likelihood: give t0 or ts, not both (ts[-1] is the data end)"
            )
        if stepsize_controller is not None:
            raise ValueError(
                "log_likelihood: ts is the fixed grid diffrax.StepTo(ts[::-1]); it "
                "takes no stepsize_controller"
            )
        # the samplers' checks and messages: strictly decreasing from sde.T (to
        # float32's resolution) down to t0 >= 0; a traced grid on the device
        ts = _grid_in_dtype(sde, ts, dtype, start_at_T=True, takes_y0=False)
        ok = _grid_ok(sde, ts, start_at_T=True)
        ts = _safe_grid(sde, ts, ok)[::-1]
        t0_, t1_ = ts[0], ts[-1]
        controller = None
    else:
        t0 = 1e-3 if t0 is None else t0
        if not is_real_scalar(t0):
            raise TypeError(f"log_likelihood: t0 must be a real scalar, got {t0!r}")
        t0_ = jnp.asarray(t0, dtype)
        T_ = jnp.asarray(T, dtype)
        # judged in the points' dtype, where the solve runs: a t0 just below T can
        # round up to it there
        if not isinstance(t0_, jax.core.Tracer) and not 0 <= float(t0_) < float(T_):
            raise ValueError(
                f"log_likelihood: t0 must lie in [0, sde.T) = [0, {T:g}) in the "
                f"points' dtype {dtype}, got {t0} (as {dtype}: {float(t0_)})"
            )
        ok = (t0_ >= 0) & (t0_ < T_)  # a traced t0: flags every particle when bad
        t0_ = jnp.where(ok, t0_, T / 2)
        t1_ = T_
        controller = stepsize_controller
        if controller is None:
            controller = _DEFAULT_CONTROLLER
        if isinstance(controller, dfx.ConstantStepSize | dfx.StepTo):
            raise ValueError(
                "log_likelihood: for fixed steps pass the grid as ts= (decreasing "
                "from sde.T, as the samplers take it, e.g. gd.uniform_grid(sde.T, "
                f"1e-3, n)), not stepsize_controller={type(controller).__name__}"
            )
    solver = _DEFAULT_SOLVER if solver is None else solver
    _check_likelihood_solver(solver, controller)
    _check_solver(solver, "ode", controller, sde, "diffeqsolve")
    if adjoint is None:
        adjoint = _DEFAULT_ADJOINT
    elif not isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(
            f"log_likelihood: adjoint must be a diffrax adjoint, got {adjoint!r}"
        )
    elif isinstance(adjoint, dfx.ImplicitAdjoint):
        raise ValueError(
            "log_likelihood: adjoint=diffrax.ImplicitAdjoint() differentiates a "
            "steady state, which this solve never reaches; use the default "
            "RecursiveCheckpointAdjoint(), BacksolveAdjoint() or ForwardMode()"
        )
    if prior_logp is not None:
        try:
            probe = jax.eval_shape(prior_logp, jax.ShapeDtypeStruct(shape, dtype))
        except Exception as e:
            raise ValueError(
                f"log_likelihood: calling prior_logp on one latent of shape {shape} "
                f"failed: {e}"
            ) from e
        if getattr(probe, "shape", None) != () or not jnp.issubdtype(
            probe.dtype, jnp.floating
        ):
            raise ValueError(
                "log_likelihood: prior_logp must return one real number per latent "
                f"(a float scalar), got {probe}"
            )
    _check_guidance_sde(score, sde)
    try:
        _check_score_shape(
            score,
            jnp.stack([t0_]),
            shape,
            dtype,
            args,
            entry="jax.vmap(lambda x, c: gd.log_likelihood(sde, score, x[None], "
            "args=c).log_prob[0])(xs, labels)",
        )
    except ValueError as e:
        if xs.ndim != 1:
            raise
        raise ValueError(
            f"{e}; log_likelihood read xs of shape {xs.shape} as {xs.shape[0]} "
            f"particles of shape (): for ONE point of shape {xs.shape}, pass "
            "xs[None] (xs is (particles, *shape))"
        ) from e
    num = xs.shape[0]
    if exact:
        probes = jnp.zeros((num, 0), dtype)  # unused: a placeholder with an axis
    else:
        check_key(key)
        key = threefry_key(key)  # other generators draw a vmapped batch from one key
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(num))
        probes = jax.vmap(lambda k: jr.rademacher(k, shape, dtype))(keys)
    forward = isinstance(adjoint, dfx.ForwardMode)
    try:
        return _log_likelihood_jit(
            xs,
            probes,
            ok,
            sde,
            score,
            _args_as_arrays(args),
            t0_,
            t1_,
            ts,
            solver,
            controller,
            adjoint,
            (exact, max_steps, prior_logp, forward),
        )
    except TypeError as e:
        if forward or "custom_vjp" not in str(e):
            raise
        if not _score_has_jvp(score, t0_, shape, dtype, _args_as_arrays(args)):
            raise TypeError(
                "log_likelihood: the divergence differentiates the score in forward "
                "mode (Jacobian-vector products), and the score holds a "
                "jax.custom_vjp function, which has none: give it a jax.custom_jvp "
                f"rule (or none). JAX: {e}"
            ) from e
        raise TypeError(
            "log_likelihood: forward-mode differentiation (jax.jvp, jax.jacfwd) "
            "needs adjoint=diffrax.ForwardMode() (forward mode only); "
            f"adjoint={type(adjoint).__name__}() is reverse mode (jax.grad). "
            f"JAX: {e}"
        ) from e
