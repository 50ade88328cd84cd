r"""Sequential Monte Carlo over the reverse SDE (Feynman-Kac steering).

`smc_sample` targets the sampler's law tilted by a potential $r$,

$$\pi(x) = \frac{q(x)\,r(x)}{Z},\qquad Z = E_{X\sim q}[r(X)],$$

where $q$ is the law of `gd.sample` with the same score, SDE and grid (with an exact
score and a fine grid, the data law $p$; so $\pi$ is the reward-tilted law $p^r$ of
the paper, reached here by reweighting and resampling instead of by guidance). $P$
particles run the reverse SDE step by step (any SDE solver, the same increments as
`gd.sample`). At each grid time $t_k$, before the step from $x_k$, a particle's
log-weight gains

$$\log h_k(x_k) - \log h_{k-1}(x_{k-1}),\qquad
\log h_k(x) = \max\big(\lambda \log r(\hat x_0(t_k, x)),\ f\big),\quad
\log h_N = \log r,$$

($\log h_{-1} = 0$), a twist through Tweedie's denoiser $\hat x_0$ (FK steering's
difference potential; $\lambda$ = `twist`, 0 for none; $f$ = `twist_floor`,
$-\infty$ for none). The product telescopes to $r(x_N)$, so the weighted particles
target $\pi$ for any twist that is positive wherever $\pi$ has mass; the twist only
decides where resampling happens. (A potential that vanishes, such as a hard
constraint, gives zero twists: a particle with $h_k = 0$ has weight zero from then
on, although its path may end where $r > 0$. A finite floor $f$ keeps every $h_k$
positive, so the estimate stays unbiased; see `smc_sample`'s `twist_floor`.) When
the effective sample size
$\mathrm{ESS} = (\sum_i w_i)^2 / \sum_i w_i^2$ falls below `ess_threshold` $\cdot P$,
the particles are resampled (systematic, stratified or multinomial) and their weights
reset to equal ones that keep the running estimate

$$\hat Z = \frac1P \sum_i w_i,$$

unbiased for $Z$. Resampling picks among the $x_k$, before the step from $x_k$, and
a resampled particle keeps its slot's noise: slot $i$ draws its increments from
`fold_in(key, i)` as in `gd.sample`, so copies of one ancestor diverge at the next
step, and with no resampling (`ess_threshold=0`) the particles are `gd.sample`'s
(but for failed ones, which `gd.sample` sets to NaN).

Cost: the twist at $x_k$ needs the score there, which the step from $x_k$ needs
too: solvers that evaluate the score once per step, at its start
(`ExponentialIntegrator`, `SDEDPMSolverPP`, `diffrax.Euler`), are handed that value,
so SMC costs what `gd.sample` does plus the potential; other solvers evaluate it once
more. With a `proposal` (e.g. the paper's reward guidance) the particles move with
that score and each move's weight gains the ratio of the two steps' Gaussian
transition densities (twisted-SMC style), so the target is still $\pi$: guidance
proposes, the weights correct it. The resampling is a population operation (the only
place the particle axis is seen, DESIGN.md decision 3); its ancestor indices are not
differentiated, but each copy carries its ancestor's log-weight as a zero-valued
stop-gradient term, through which gradients flow (see `smc_sample`).
"""

import math
from collections.abc import Callable
from typing import Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._brownian import (
    GridBrownianPath,
    _StepIncrement,
    check_key,
    levy_area_for,
    threefry_key,
)
from ._custom_types import Args, Key
from ._driver import _like
from ._grid import uniform_grid
from ._jit import filter_jit, is_real_scalar
from ._reverse import reverse_sde
from ._sample import (
    _args_as_arrays,
    _check_sde,
    _default_sde_solver,
    _grid_in_dtype,
    _grid_ok,
    _particle_keys,
    _prior_draw,
    _split_particle_key,
    _time_dtype,
)
from ._sample_checks import (
    _call_laid_out,
    _check_count,
    _check_dtype,
    _check_guidance_sde,
    _check_half_steps,
    _check_intervals,
    _check_log_potential,
    _check_network_end,
    _check_score_shape,
    _check_shape,
    _check_sharding,
    _check_solver,
    _leading_axis_sharding,
)
from ._score import AbstractScore, check_score, score_to_x0
from ._sde import AbstractSDE
from ._solver import ExponentialIntegrator, SDEDPMSolverPP


_SCHEMES = ("systematic", "stratified", "multinomial")


class SMCSamples(eqx.Module):
    r"""The output of `smc_sample`.

    - `ys`: `(P, *shape)` final particles, weighted by `weights`.
    - `log_weights`: `(P,)` unnormalised log-weights;
      `logsumexp(log_weights) - log P` is `log_normalizer`.
    - `log_normalizer`: $\log \hat Z$, the log of an unbiased estimate of
      $Z = E_q[r]$.
    - `ess`: `(N + 1,)` effective sample size of the weights at `ts[0]`, ...,
      `ts[-1]` (before any resampling there; the last with the final $r$).
    - `resampled`: `(N,)` whether the particles were resampled at `ts[k]`, before
      the step from it.
    - `failed`: `(P,)` the particle, or its potential, is NaN or infinite, or a
      solver step reaching it failed (diffrax's result code, as in `gd.sample`: an
      implicit solver's root finder that did not converge, with finite values); a
      potential of zero, $\log r = -\infty$, is a zero weight, not a failure.
      `num_failed` counts them. Unlike `gd.sample`, a failed particle keeps the
      values it reached (its weight is zero; NaN values would make weighted sums
      such as `weights @ ys` NaN).
      A failed particle weighs zero. Resampling replaces failed slots by copies of
      live particles, so `failed` shows only the failures since the last
      resampling; `num_failed_per_step` keeps the record.
    - `num_failed_per_step`: `(N + 1,)` how many particles failed at `ts[k]` (the
      last entry: at the end, with the final potential). Any failure biases
      `log_normalizer` low (it then estimates $E_q[r\,1\{\text{no failure}\}]$).

    If every particle ends with weight zero, `log_normalizer` is $-\infty$ and the
    weights are NaN; `ess` is 0 from the step where the whole population died
    (a hard constraint that every denoised estimate violates, for instance).

    Averages with `weights` are self-normalised and biased at finite $P$. With
    heavy-tailed weights (the default twist and a moderately sharp reward) the
    bias can shrink much more slowly than $1/P$: a bump of width 0.5 on the
    README's mixture left weighted means many standard errors off over a 64-fold
    range of $P$. Check a weighted average against `twist=0` or
    another `ess_threshold` before trusting it. A NaN or
    $+\infty$ potential (at the end, or at any intermediate $\hat x_0$ when
    `twist > 0`) fails the particle for good: `jnp.log` of a negative number drops
    those paths, and a $+\infty$ reward is dropped rather than favoured.
    """

    ys: Array
    log_weights: Float[Array, " particles"]
    log_normalizer: Float[Array, ""]
    ess: Float[Array, " times"]
    resampled: Bool[Array, " steps"]
    failed: Bool[Array, " particles"]
    num_failed_per_step: Int[Array, " times"]

    @property
    def weights(self) -> Float[Array, " particles"]:
        """Normalised weights (they sum to one)."""
        return jax.nn.softmax(self.log_weights)

    @property
    def num_failed(self) -> Array:
        """How many of the final particles are flagged `failed` (as
        `Samples.num_failed`; `num_failed_per_step` counts every failure)."""
        return jnp.sum(self.failed)

    def resample(
        self,
        key: Key,
        scheme: Literal["systematic", "stratified", "multinomial"] = "systematic",
    ) -> Array:
        """`ys` resampled to equal weights: `(P, *shape)` unweighted draws from $\\pi$.

        The draws keep the layout of `ys` (particles sharded over devices stay
        sharded; the gather alone would return them replicated)."""
        _check_scheme(scheme)
        idx = resample_indices(key, self.log_weights, scheme)
        out = self.ys[idx]
        sharding = getattr(self.ys, "sharding", None)
        if (
            not isinstance(self.ys, jax.core.Tracer)
            and sharding is not None
            and len(sharding.device_set) > 1  # one device: keep it uncommitted
        ):
            out = jax.device_put(out, sharding)
        return out


def _check_scheme(scheme) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"resampling must be one of {_SCHEMES}, got {scheme!r}")


def resample_indices(
    key: Key,
    log_weights: Float[ArrayLike, " n"],
    scheme: Literal["systematic", "stratified", "multinomial"] = "systematic",
) -> Int[Array, " n"]:
    r"""Ancestor indices $a_1, \dots, a_n$ with $E[\#\{j: a_j = i\}] = n w_i$.

    With $W$ the cumulative normalised weights, $a_j$ is the first $i$ with
    $W_i > u_j$, where $u_j = (j + U)/n$ with one uniform $U$ (`"systematic"`: each
    count is $\lfloor n w_i \rfloor$ or $\lceil n w_i \rceil$), $u_j = (j + U_j)/n$
    (`"stratified"`), or $n$ sorted i.i.d. uniforms (`"multinomial"`). A particle
    of weight zero ($-\infty$) is never picked.

    $W$ is computed in JAX's default float (float64 with `jax_enable_x64`, else
    float32). In float32 its resolution near 1 is $2^{-24}$: from about $2^{18}$
    particles a systematic count can miss $\lfloor n w_i \rfloor$ /
    $\lceil n w_i \rceil$ by one (in a few slots per draw), and more
    than $2^{24}$ particles cannot be resampled (an error; enable x64).

    Concrete log-weights with a NaN or $+\infty$, or none finite, raise
    `ValueError`; traced ones raise when the computation runs.

    !!! example

        ```python
        idx = gd.resample_indices(jr.key(0), jnp.log(jnp.array([0.1, 0.6, 0.3])))
        ```
    """
    check_key(key)
    _check_scheme(scheme)
    log_weights = jnp.asarray(log_weights)
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(
            f"log_weights must be floating point, got dtype {log_weights.dtype} (for "
            "a mask use jnp.where(mask, 0.0, -jnp.inf))"
        )
    if log_weights.ndim != 1 or log_weights.shape[0] < 1:
        raise ValueError(
            f"log_weights must be a non-empty 1-D array, got shape {log_weights.shape}"
        )
    msg = "log_weights must have no NaN or +inf and at least one finite entry"
    if not isinstance(log_weights, jax.core.Tracer):
        lw = np.asarray(log_weights)
        if np.any(np.isnan(lw)) or not np.any(lw > -np.inf) or np.any(lw == np.inf):
            raise ValueError(msg)
    else:
        bad = (
            jnp.any(jnp.isnan(log_weights))
            | jnp.all(log_weights == -jnp.inf)
            | jnp.any(log_weights == jnp.inf)
        )
        log_weights = eqx.error_if(log_weights, bad, msg)
    # keys of other generators are hashed to a Threefry key, as `sample` does: raw
    # uint32[4] (rbg) data failed in JAX's draws, and rbg keys drew other numbers
    # under jax.vmap than in a loop
    return _resample_indices(threefry_key(key), log_weights, scheme)


def _resample_indices(key, log_weights, scheme):
    """`resample_indices` without the input checks (`smc_sample` resamples only
    weights with a positive ESS)."""
    n = log_weights.shape[0]
    # JAX's default float, at least the log-weights' dtype: a 16-bit running sum
    # stops growing once the weights fall below half its resolution
    wdt = jnp.promote_types(log_weights.dtype, jnp.result_type(float))
    if jnp.finfo(wdt).nmant < 52 and n > 2**24:
        raise ValueError(
            f"resampling {n} > 2^24 particles needs float64 cumulative weights (the "
            "positions (j + U) / n no longer resolve j in float32): enable "
            "jax_enable_x64"
        )
    w = jax.nn.softmax(log_weights.astype(wdt))
    # Monotone and flat across zero weights: XLA's parallel cumsum is not monotone
    # (steps of an ulp down, and up at a zero weight), and a zero-weight slot whose
    # cdf stepped up could be picked (a failed, NaN particle drawn).
    cdf = lax.cummax(jnp.where(w > 0, jnp.cumsum(w), 0))
    if scheme == "systematic":
        u = (jnp.arange(n) + jr.uniform(key, (), cdf.dtype)) / n
    elif scheme == "stratified":
        u = (jnp.arange(n) + jr.uniform(key, (n,), cdf.dtype)) / n
    else:
        u = jnp.sort(jr.uniform(key, (n,), cdf.dtype))
    # u (or its rounding) at or above cdf[-1] goes to the last particle with weight,
    # the first index where the cdf reaches its total.
    last = jnp.searchsorted(cdf, cdf[-1], side="left")
    idx = jnp.searchsorted(cdf, u.astype(cdf.dtype) * cdf[-1], side="right")
    return jnp.minimum(idx, last)


def _ess(log_weights: Array) -> Array:
    r"""$(\sum_i w_i)^2 / \sum_i w_i^2$, from log-weights shifted by their maximum
    (unshifted, log-weights of size 1e3 lose the float32 digits that tell equal
    weights, ESS = n, from unequal ones)."""
    m = jnp.max(log_weights)
    none = m == -jnp.inf  # every weight zero: an ESS of 0 (the formula's 0 / 0)
    lw = jnp.where(none, 0.0, log_weights - jnp.where(jnp.isfinite(m), m, 0))
    ess = jnp.exp(2 * jax.nn.logsumexp(lw) - jax.nn.logsumexp(2 * lw))
    return jnp.where(none, jnp.zeros_like(ess), ess)


def smc_sample(
    key: Key,
    sde: AbstractSDE,
    score: AbstractScore,
    shape: tuple[int, ...],
    log_potential: Callable[[Array], Array],
    *,
    num_particles: int,
    args: Args = None,
    ts: Float[ArrayLike, " n"] | None = None,
    solver: dfx.AbstractSolver | None = None,
    twist: float = 1.0,
    twist_floor: float = -math.inf,
    ess_threshold: float = 0.5,
    resampling: Literal["systematic", "stratified", "multinomial"] = "systematic",
    proposal: AbstractScore | None = None,
    dtype=None,
    sharding: jax.sharding.Sharding | None = None,
) -> SMCSamples:
    r"""Sample $\pi \propto q\,r$ with $P$ reweighted, resampled reverse-SDE particles.

    $q$ is the law of the discretised sampler on `ts` (what `gd.sample` draws with
    the same solver and grid), not the exact data law $p$: on a coarse grid
    compare with importance sampling of `gd.sample` draws on the same grid, and
    with an exact tilt `gmm.tilt(r)` only on fine grids (100 uniform steps leave a
    variance a few percent low, visible at a few thousand particles).

    `jax.grad` through resampling: each resampled copy carries its ancestor's
    log-weight as a zero-valued stop-gradient term (Scibior & Wood 2021), so the
    gradient of `log_normalizer` with respect to the potential's parameters is
    the weighted average of the lineages' log-weight gradients (Fisher's
    identity), consistent as $P \to \infty$ like any self-normalised estimate
    (a test checks it against the gradient without resampling); at finite $P$ it
    carries that estimate's bias (see `SMCSamples`).
    Gradients also flow through the particles' moves (reparametrised), e.g. to a
    score's parameters: each lineage is differentiated with its noise held fixed,
    and in noise space $\pi$ is $N(0, I)$ times the lineage's weight, so that
    gradient is consistent too (the same test checks a mixture's means). When the
    weights collapse (an ESS of a few particles) the bias at finite $P$ can be
    large: compare with `ess_threshold=0` on a few keys.

    See the module docstring for the weights. **Arguments:**

    - `key`: slot `i` uses `fold_in(key, i)` for its prior draw and noise, as
      `gd.sample`'s particle `i`; the resampling draws from another stream.
    - `sde`, `score`, `shape`, `args`, `ts`, `solver`, `dtype`: as in `gd.sample`
      (reverse SDE, fixed grid; default solver `ExponentialIntegrator(sde)`). The
      log-weights, ESS and $\log\hat Z$ of 16-bit particles are float32.
    - `log_potential`: $\log r$ of one particle, a scalar (e.g. `reward.log`).
    - `num_particles`: $P$.
    - `twist`: $\lambda$ in $\log h_k = \lambda \log r(\hat x_0)$; 0 reweights at the
      last step only (importance sampling, no extra score evaluation). The twist
      must be positive wherever $\pi$ has mass: a potential that can be zero (a
      hard constraint, `log r = -inf`) zeroes for good every particle whose
      denoised estimate $\hat x_0$ ever violates it, although its path may end
      inside, which biases the weights and $\log\hat Z$ (by orders of magnitude
      for a half-space constraint). Use `twist=0` there, a smoothed potential, or
      a `twist_floor`. The twist evaluates $r$ at Tweedie's $\hat x_0$, which at
      high noise is shrunk towards the data mean: for a reward much narrower than
      the data's spread (a bump of width 0.1 on unit-scale data) $\log\hat Z$ can
      be far too low while the final ESS looks healthy. For sharp rewards
      start with `twist=0` or a guided `proposal`, and compare $\log\hat Z$
      across settings.
    - `twist_floor`: $f$, a lower bound on each intermediate $\log h_k$ (default
      $-\infty$: none; the last factor is always the exact $r$). Any finite floor
      keeps $h_k > 0$, so the weights target $\pi$ and $\hat Z$ is unbiased with
      a hard constraint too. A moderate floor (a few units, e.g. -3) is the useful
      range: a very low one makes $\hat Z$ heavy-tailed (a path whose $\hat x_0$
      left the constraint and came back is rarely kept by resampling, and weighs
      $e^{-f}$ times its siblings when it is), so its typical value sits far below
      $Z$; a floor near 0 flattens the twist and resamples less.
    - `ess_threshold`: resample when ESS $<$ `ess_threshold` $\cdot P$ (0: never,
      1: whenever the weights are not all equal, beyond a relative 1e-5 of rounding).
    - `resampling`: `"systematic"` (default), `"stratified"` or `"multinomial"`.
    - `sharding`: shard the particle axis, as in `gd.sample` (resampling gathers
      particles across the devices).
    - `proposal`: a score to move the particles with instead of `score` (e.g. the
      reward-guided one), the target staying $\pi \propto q\,r$: each move
      $x_k \to x_{k+1}$ multiplies the weight by the ratio of the two Gaussian
      transition densities, $\mathcal N(x_{k+1}; m_p, \Sigma) /
      \mathcal N(x_{k+1}; m_q, \Sigma)$, where $m_p$, $m_q$ are the step's means
      with `score` and with `proposal` (same covariance: the noise does not depend
      on the score). A good proposal keeps the ESS high. Needs a solver that
      evaluates the score once per step (`ExponentialIntegrator`,
      `SDEDPMSolverPP`, `diffrax.Euler`); costs one more score evaluation per step.
      For the multistep `SDEDPMSolverPP` the step's mean depends on the last
      denoised value too: the particles move with the proposal's history, and
      $m_p$ uses the base score's history along the same path (the base sampler's
      kernel), so the weights are the ratio of the two path densities. A step without noise (the exponential integrator's last step to
      $t = 0$) moves with `score`.

    **Returns:** an `SMCSamples` (weighted particles, ESS trace, $\log\hat Z$).

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
        out = gd.smc_sample(jr.key(0), sde, gmm.score(sde), (2,), reward.log,
                            num_particles=512, ts=gd.uniform_grid(1.0, 1e-3, 100))
        ys = out.resample(jr.key(1))  # (512, 2), approximately gmm.tilt(reward)
        ```
    """
    check_key(key)
    _check_sde(sde)
    shape = _check_shape(shape)
    dtype = _check_dtype(dtype)
    num_particles = _check_count("num_particles", num_particles)
    check_score(score)
    if not callable(log_potential):
        raise TypeError("log_potential must be a callable x -> log r(x)")
    if hasattr(log_potential, "tilt_mixture") and hasattr(log_potential, "log"):
        raise TypeError(
            f"log_potential is the log of the reward, but a {type(log_potential).__name__}"
            " (r itself) was given: pass its `.log` (e.g. reward.log)"
        )
    twist = _check_number("twist", twist)
    if not isinstance(twist, jax.core.Tracer) and float(twist) < 0:
        raise ValueError(
            f"twist must be >= 0 (the intermediate targets are q r^twist), got {twist}"
        )
    twist_floor = _check_number("twist_floor", twist_floor, allow_minus_inf=True)
    ess_threshold = _check_number("ess_threshold", ess_threshold)
    if not isinstance(ess_threshold, jax.core.Tracer) and not (
        0.0 <= float(ess_threshold) <= 1.0
    ):
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    _check_scheme(resampling)
    if ts is None:
        ts = uniform_grid(sde.T, 1e-3, 500)
    ts = _grid_in_dtype(sde, ts, dtype, start_at_T=True, takes_y0=False)
    if solver is None:
        solver = _default_sde_solver(sde)
    _check_solver(solver, "sde", None, sde)
    _check_half_steps(solver, "sde", "grid")  # its noise is a grid path
    _check_score_shape(score, ts, shape, dtype, args)
    _check_log_potential(log_potential, shape, dtype)
    _check_guidance_sde(score, sde)
    _check_network_end(score, solver, sde, ts)
    if proposal is not None:
        check_score(proposal, "proposal")
        if not isinstance(solver, _ONE_EVALUATION):
            raise ValueError(
                f"a proposal needs the transition density of each step from one "
                f"score value at its start: use ExponentialIntegrator, "
                f"SDEDPMSolverPP or diffrax.Euler, not {type(solver).__name__}"
            )
        _check_score_shape(proposal, ts, shape, dtype, args)
        _check_guidance_sde(proposal, sde)
    # (together: a schedule in both warns once)
    _check_intervals((score, proposal), ts, solver, entry="gd.smc_sample")
    args = _args_as_arrays(args)  # a new label does not recompile
    # Only twist == 0 (no twist: not even 0 * log r, which is NaN where r = 0)
    # selects code; any other value is traced, so a new one does not recompile.
    use_twist = isinstance(twist, jax.core.Tracer) or twist != 0.0
    _check_sharding(sharding, num_particles, shape)
    static = (num_particles, shape, dtype, use_twist, resampling, sharding)
    wdt = _time_dtype(dtype)  # the weights: at least float32
    numbers = tuple(jnp.asarray(v, wdt) for v in (ess_threshold, twist, twist_floor))
    return _call_laid_out(
        _smc_sample_jit,
        sharding,
        *(key, sde, score, proposal, log_potential, args, ts, solver, numbers, static),
    )


def _check_number(name: str, value, allow_minus_inf: bool = False):
    """A finite real number, or -inf where allowed (traced values pass unchecked)."""
    if not is_real_scalar(value):
        raise TypeError(f"{name} must be a number (a real scalar), got {value!r}")
    if isinstance(value, jax.core.Tracer):
        return value
    v = float(value)
    if not (math.isfinite(v) or (allow_minus_inf and v == -math.inf)):
        extra = " or -inf" if allow_minus_inf else ""
        raise ValueError(f"{name} must be finite{extra}, got {v}")
    return v


def _failed(x, log_h):
    """A particle fails when it is not finite or its log-potential is NaN or +inf
    (log_h = -inf is a potential of zero: a zero weight, not a failure)."""
    return ~jnp.all(jnp.isfinite(x)) | jnp.isnan(log_h) | (log_h == jnp.inf)


def _widen(tree, dtype):
    """Floating leaves narrower than `dtype` cast to it (exactly)."""

    def widen(a):
        if eqx.is_array(a) and jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(jnp.promote_types(a.dtype, dtype))
        return a

    return jax.tree.map(widen, tree)


class _FrozenScore(AbstractScore):
    """A score already evaluated at the step's start: returned whatever it is asked."""

    value: Array

    def __call__(self, t, x, args=None):
        return self.value


# Solvers that evaluate the score once per step, at (t0, y0): they can take the score
# value the twist already needed (no second evaluation). Each step is Gaussian given
# its start and the solver's history (SDEDPMSolverPP: the last denoised value).
_ONE_EVALUATION = (ExponentialIntegrator, SDEDPMSolverPP, dfx.Euler)


@filter_jit
def _smc_sample_jit(
    key, sde, score, proposal, log_potential, args, ts, solver, numbers, static
):
    n, shape, dtype, use_twist, scheme, sharding = static
    # log-weights accumulate over every step: float32 at least (a bfloat16 sum of
    # hundreds of increments would keep 8 bits)
    wdt = _time_dtype(dtype)
    threshold, twist, floor = numbers
    keys = _particle_keys(key, n)
    if sharding is not None:
        lead = _leading_axis_sharding(sharding)
        keys = jax.lax.with_sharding_constraint(keys, lead)

        def constrain(tree):
            """Particles laid out as `sharding` says, every other per-particle
            array (weights, solver state) along its particle axis."""
            return jax.tree.map(
                lambda a: jax.lax.with_sharding_constraint(
                    a, sharding if a.shape == (n, *shape) else lead
                ),
                tree,
            )

    k_prior, k_bm = jax.vmap(_split_particle_key)(keys)
    # The resampling stream: a fold_in index no slot uses (slots are 0, ..., n - 1).
    k_resample = jr.fold_in(threefry_key(key), jnp.uint32(0xFFFFFFFF))
    y0 = jax.vmap(lambda k: _prior_draw(sde, k, shape, dtype))(k_prior)
    struct = jax.ShapeDtypeStruct(shape, dtype)
    num_steps = ts.shape[0] - 1
    steps = jnp.arange(num_steps)
    cells = jnp.where(ts[0] > ts[-1], num_steps - 1 - steps, steps)
    frozen = isinstance(solver, _ONE_EVALUATION)

    # diffrax's stochastic Runge-Kutta solvers (e.g. ShARK) also need each cell's
    # space-time Levy area
    levy = levy_area_for(solver)

    def terms_with(s, inc, t0, t1, area=None):
        return reverse_sde(sde, s, _StepIncrement(inc, t0, t1, area, levy))

    def log_h(t, x, s):
        """The twist at (t, x) from the score value s there, and whether x failed."""
        if not use_twist:
            lh = jnp.zeros((), wdt)
        else:
            lp = jnp.asarray(log_potential(score_to_x0(sde, t, x, s)), wdt)
            # A zero potential (log r = -inf) gives twist * (-inf) (0 for twist 0,
            # also a traced twist that is 0 at run time) without forming that
            # product, whose derivative in the twist is NaN.
            zero = lp == -jnp.inf
            lh = twist * jnp.where(zero, 0, lp)
            lh = jnp.where(zero, -jnp.inf * jnp.sign(twist), lh)  # r^twist
            lh = jnp.where(twist == 0, 0, lh).astype(wdt)
            # floored: any positive h_k keeps the product telescoping to r(x_N)
            lh = jnp.maximum(lh, floor)
        return lh, _failed(x, lh)

    def step_exact(s, inc, x, state, t0, t1, area=None):
        """The solver's step, and whether it failed (diffrax's result code: e.g.
        an implicit solver's root finder not converging, with finite values)."""
        x1, _, _, state1, result = solver.step(
            terms_with(s, inc, t0, t1, area), t0, t1, x, args, state, False
        )
        return x1, state1, result != dfx.RESULTS.successful

    def move(s, inc, x, state, t0, t1, area=None):
        x1, state1, bad = step_exact(s, inc, x, state, t0, t1, area)
        return (*_like((x1, state1), (x, state)), bad)

    def evaluate(x, t0):
        """The score(s) at x_k, which the twist and the move both use."""
        s = score(t0, x, args)
        sq = None if proposal is None else proposal(t0, x, args)
        return (s, sq), log_h(t0, x, s)

    def move_one(kb, x, state, s, sq, t0, t1, cell):
        path = GridBrownianPath(struct, ts, kb, levy)
        inc = path.cell_increment(cell, t1 - t0)
        # A failed step (`bad`) makes the move's log density ratio NaN, which
        # `reweight` counts as a failure of the particle it reached.
        if proposal is None:
            area = path.cell_area(cell, t1 - t0)
            x1, state1, bad = move(
                _FrozenScore(s) if frozen else score, inc, x, state, t0, t1, area
            )
            return x1, state1, jnp.where(bad, jnp.nan, jnp.zeros((), wdt))
        # x1 = m_q + c * inc; the base kernel has mean m_p and the same
        # covariance c^2 |dt|: log N(x1; m_p) - log N(x1; m_q), summed over
        # coordinates, is -(inc d / (c |dt|) + d^2 / (2 c^2 |dt|)), d = m_q - m_p.
        # Two solver states: a multistep solver's step depends on the history of
        # its own score's values along the path, so the proposal moves with the
        # proposal's history and the base kernel's mean uses the base score's
        # history on the same path (one-step solvers keep no history: both empty).
        state_q, state_p = state
        # (the explicit solvers a proposal allows report no failures)
        x1, state_q1, _ = move(_FrozenScore(sq), inc, x, state_q, t0, t1)
        # The kernels' means and noise scale in the weights' dtype, from the same
        # (exactly widened) inputs: for 16-bit particles, means rounded to 16 bits
        # would make d and c differences of rounded numbers (c quantised to the
        # state's resolution, d's error a large part of the correction).
        xw, sq, s, stq, stp = _widen((x, sq, s, state_q, state_p), wdt)
        sq = _FrozenScore(sq)
        zero = jnp.zeros(x.shape, wdt)
        m_q = step_exact(sq, zero, xw, stq, t0, t1)[0].astype(wdt)
        m_p, state_p1, _ = step_exact(_FrozenScore(s), zero, xw, stp, t0, t1)
        c = step_exact(sq, jnp.ones(x.shape, wdt), xw, stq, t0, t1)[0] - m_q
        state1 = (state_q1, _like(state_p1, state_p))
        m_p, c = m_p.astype(wdt), c.astype(wdt)
        d, dt, inc = m_q - m_p, jnp.abs(t1 - t0).astype(wdt), inc.astype(wdt)
        c_safe = jnp.where(c == 0, 1.0, c)
        term = inc * d / (c_safe * dt) + d**2 / (2 * c_safe**2 * dt)
        # A coordinate the step moves without noise (e.g. the exponential
        # integrator's last step to t = 0) has point-mass kernels: it follows
        # the base score there (ratio 1) instead of the proposal's.
        x1 = jnp.where(c == 0, m_p.astype(dtype), x1)
        return x1, state1, -jnp.sum(jnp.where(c == 0, 0.0, term))

    def reweight(v, dead, lh, log_ratio, dead_now):
        # The weight is carried untwisted: v = log w - log h_{k-1}(x_{k-1}), which
        # changes only by the proposal's density ratio of each move (and at a
        # resampling); log w_k = v + log h_k(x_k) is formed afresh at every step.
        # (Accumulating log w += log h_k - log h_{k-1} instead lost a resampling's
        # offset whenever a twist of huge magnitude (a hard constraint written as
        # log r = -1e8) rounded it away, and overflowed for log r = -finfo.max.)
        # A failed particle, or one whose twist is zero (log h = -inf, now or
        # before: v = -inf), weighs zero. Also returns how many failed just now.
        new_dead = dead | dead_now | jnp.isnan(log_ratio)
        v = v + log_ratio
        zero = new_dead | (lh == -jnp.inf) | (v == -jnp.inf)
        logw = jnp.where(zero, -jnp.inf, v + lh)
        v = jnp.where(zero, -jnp.inf, v)
        return logw, v, new_dead, jnp.sum(new_dead & ~dead)

    def step(carry, xs):
        x, state, v, log_ratio, dead = carry
        k, t0, t1, cell = xs
        # Reweight at x_k with the twist there, resample x_k (with its solver state
        # and the score value the move reuses), then move every slot with its own
        # increment: copies of one ancestor diverge at once.
        scores, (lh, dead_now) = jax.vmap(evaluate, in_axes=(0, None))(x, t0)
        logw, v, dead, num_failed = reweight(v, dead, lh, log_ratio, dead_now)
        ess = _ess(logw)
        # equal weights give an ESS of n up to rounding: not a reason to resample
        # (and nothing to resample from once every weight is zero: ESS = 0)
        do = (ess < threshold * n * (1 - 1e-5)) & (ess > 0)

        def resample(operand):
            tree, logw, v = operand
            idx = _resample_indices(jr.fold_in(k_resample, k), logw, scheme)
            tree = jax.tree.map(lambda a: a[idx], tree)
            log_mean = jax.nn.logsumexp(logw) - math.log(n)
            # Equal weights log_mean (untwisted: log_mean - log h_k of each copy).
            # For gradients, each copy also carries its ancestor's log-weight as
            # logw_a - stop_gradient(logw_a), zero in value (Scibior & Wood 2021):
            # the gradient of log Z is then the weighted sum of each lineage's
            # log-weight gradient (Fisher's identity). Without it the ancestor
            # selection went undifferentiated and every resampling biased the
            # gradient; log_mean's own gradient is stopped, as it is counted
            # along the lineages.
            carried = logw[idx] - lax.stop_gradient(logw[idx])
            carried = jnp.where(jnp.isfinite(logw[idx]), carried, 0.0)
            new = lax.stop_gradient(log_mean) + carried
            return tree, new, new - tree[3]

        tree = (x, state, scores, lh, dead)
        tree, logw, v = lax.cond(do, resample, lambda o: o, (tree, logw, v))
        if sharding is not None:  # keep the particles laid out after the gather
            tree, logw, v = constrain((tree, logw, v))
        x, state, (s, sq), lh, dead = tree
        x1, state1, ratio1 = jax.vmap(
            move_one, in_axes=(0, 0, 0, 0, 0, None, None, None)
        )(k_bm, x, state, s, sq, t0, t1, cell)
        return (x1, state1, v, ratio1, dead), (ess, do, num_failed)

    state0 = jax.vmap(
        lambda x: solver.init(
            terms_with(score, jnp.zeros_like(x), ts[0], ts[1]), ts[0], ts[1], x, args
        )
    )(y0)
    if proposal is not None:
        state0 = (state0, state0)  # the proposal's history and the base score's
    # a traced grid skipped the Python checks: a bad one fails every particle
    dead0 = jnp.broadcast_to(~_grid_ok(sde, ts, True), (n,))
    zeros = jnp.zeros((n,), wdt)
    carry0 = (y0, state0, jnp.where(dead0, -jnp.inf, zeros), zeros, dead0)
    xs = (steps, ts[:-1], ts[1:], cells)
    (ys, _, v, ratio, dead), (ess, did, num_failed) = lax.scan(step, carry0, xs)
    # the last factor: r(x_N) / h_{N-1}(x_{N-1}) (and the last move's ratio)
    # (asarray: a potential may return a Python number)
    final = jax.vmap(lambda y: jnp.asarray(log_potential(y), wdt))(ys)
    failed = jax.vmap(_failed)(ys, final)
    logw, _, dead, last_failed = reweight(v, dead, final, ratio, failed)
    ess = jnp.concatenate([ess, _ess(logw)[None]])
    log_z = jax.nn.logsumexp(logw) - math.log(n)
    # particles dead from the start (a bad traced grid) count as failing at ts[0]
    failures = jnp.concatenate([num_failed, last_failed[None]])
    failures = failures.at[0].add(jnp.sum(dead0).astype(failures.dtype))
    return SMCSamples(ys, logw, log_z, ess, did, dead, failures)
