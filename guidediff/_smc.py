r"""Sequential Monte Carlo over the reverse SDE (Feynman-Kac steering).

`smc_sample` targets the sampler's law tilted by a potential $r$,

$$\pi(x) = \frac{q(x)\,r(x)}{Z},\qquad Z = E_{X\sim q}[r(X)],$$

where $q$ is the law of `gd.sample` with the same score, SDE and grid (with an exact
score and a fine grid, the data law $p$; so $\pi$ is the reward-tilted law $p^r$ of
the paper, reached here by reweighting and resampling instead of by guidance). $P$
particles run the reverse SDE step by step (any SDE solver, the same increments as
`gd.sample`). After step $k$ each particle's log-weight gains

$$\log h_{k+1}(x_{k+1}) - \log h_k(x_k),\qquad
\log h_k(x) = \lambda \log r\big(\hat x_0(t_k, x)\big),\quad \log h_N = \log r,$$

a twist through Tweedie's denoiser $\hat x_0$ (FK steering's difference potential;
$\lambda$ = `twist`, 0 for none). The product telescopes to $r(x_N)$, so the weighted
particles target $\pi$ whatever the twist, which only decides where resampling
happens. When the effective sample size
$\mathrm{ESS} = (\sum_i w_i)^2 / \sum_i w_i^2$ falls below `ess_threshold` $\cdot P$,
the particles are resampled (systematic, stratified or multinomial) and their weights
reset to equal ones that keep the running estimate

$$\hat Z = \frac1P \sum_i w_i,$$

unbiased for $Z$. A resampled particle keeps its slot's noise: slot $i$ draws its
increments from `fold_in(key, i)` as in `gd.sample`, so copies of one ancestor
diverge, and with no resampling (`ess_threshold=0`) the particles are `gd.sample`'s.

Cost: one score evaluation per step for the solver, and one more for the twist
($\lambda \ne 0$). The resampling is a population operation (the only place the
particle axis is seen, DESIGN.md decision 3) and is not differentiated.
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
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._brownian import GridBrownianPath, _StepIncrement, threefry_key
from ._custom_types import Args, Key
from ._grid import uniform_grid
from ._reverse import reverse_sde
from ._sample import (
    _check_sde,
    _grid_in_dtype,
    _grid_ok,
    _particle_keys,
    _prior_draw,
    _split_particle_key,
)
from ._sample_checks import (
    _check_count,
    _check_dtype,
    _check_score_shape,
    _check_shape,
    _check_solver,
)
from ._score import AbstractScore, score_to_x0
from ._sde import AbstractSDE
from ._solver import ExponentialIntegrator


_SCHEMES = ("systematic", "stratified", "multinomial")


class SMCSamples(eqx.Module):
    """The output of `smc_sample`.

    - `ys`: `(P, *shape)` final particles, weighted by `weights`.
    - `log_weights`: `(P,)` unnormalised log-weights;
      `logsumexp(log_weights) - log P` is `log_normalizer`.
    - `log_normalizer`: $\\log \\hat Z$, the log of an unbiased estimate of
      $Z = E_q[r]$.
    - `ess`: `(N,)` effective sample size after each step's reweighting (before any
      resampling at that step).
    - `resampled`: `(N,)` whether the particles were resampled after that step.
    - `failed`: `(P,)` the particle is not finite (its weight is zero).
    """

    ys: Array
    log_weights: Float[Array, " particles"]
    log_normalizer: Float[Array, ""]
    ess: Float[Array, " steps"]
    resampled: Bool[Array, " steps"]
    failed: Bool[Array, " particles"]

    @property
    def weights(self) -> Float[Array, " particles"]:
        """Normalised weights (they sum to one)."""
        return jax.nn.softmax(self.log_weights)

    def resample(
        self,
        key: Key,
        scheme: Literal["systematic", "stratified", "multinomial"] = "systematic",
    ) -> Array:
        """`ys` resampled to equal weights: `(P, *shape)` unweighted draws from $\\pi$."""
        _check_scheme(scheme)
        idx = resample_indices(key, self.log_weights, scheme)
        return self.ys[idx]


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
    (`"stratified"`), or $n$ sorted i.i.d. uniforms (`"multinomial"`).

    !!! example

        ```python
        idx = gd.resample_indices(jr.key(0), jnp.log(jnp.array([0.1, 0.6, 0.3])))
        ```
    """
    _check_scheme(scheme)
    log_weights = jnp.asarray(log_weights)
    n = log_weights.shape[0]
    w = jax.nn.softmax(log_weights)
    cdf = jnp.cumsum(w)
    if scheme == "systematic":
        u = (jnp.arange(n) + jr.uniform(key, (), cdf.dtype)) / n
    elif scheme == "stratified":
        u = (jnp.arange(n) + jr.uniform(key, (n,), cdf.dtype)) / n
    else:
        u = jnp.sort(jr.uniform(key, (n,), cdf.dtype))
    # cdf[-1] may round below 1: u above it goes to the last particle with weight.
    idx = jnp.searchsorted(cdf, u * cdf[-1], side="right")
    return jnp.clip(idx, 0, n - 1)


def _ess(log_weights: Array) -> Array:
    return jnp.exp(
        2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights)
    )


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
    ess_threshold: float = 0.5,
    resampling: Literal["systematic", "stratified", "multinomial"] = "systematic",
    dtype=None,
) -> SMCSamples:
    r"""Sample $\pi \propto q\,r$ with $P$ reweighted, resampled reverse-SDE particles.

    See the module docstring for the weights. **Arguments:**

    - `key`: slot `i` uses `fold_in(key, i)` for its prior draw and noise, as
      `gd.sample`'s particle `i`; the resampling draws from another stream.
    - `sde`, `score`, `shape`, `args`, `ts`, `solver`, `dtype`: as in `gd.sample`
      (reverse SDE, fixed grid; default solver `ExponentialIntegrator(sde)`).
    - `log_potential`: $\log r$ of one particle, a scalar (e.g. `reward.log`).
    - `num_particles`: $P$.
    - `twist`: $\lambda$ in $\log h_k = \lambda \log r(\hat x_0)$; 0 reweights at the
      last step only (importance sampling, no extra score evaluation).
    - `ess_threshold`: resample when ESS $<$ `ess_threshold` $\cdot P$ (0: never,
      1: whenever the weights are not all equal).
    - `resampling`: `"systematic"` (default), `"stratified"` or `"multinomial"`.

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
    _check_sde(sde)
    shape = _check_shape(shape)
    dtype = _check_dtype(dtype)
    num_particles = _check_count("num_particles", num_particles)
    if not isinstance(score, AbstractScore):
        raise TypeError(
            f"score must be an AbstractScore (got {type(score).__name__}); wrap a plain "
            "function with gd.ScoreFn"
        )
    if not callable(log_potential):
        raise TypeError("log_potential must be a callable x -> log r(x)")
    if not 0.0 <= float(ess_threshold) <= 1.0:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    _check_scheme(resampling)
    if ts is None:
        ts = uniform_grid(sde.T, 1e-3, 500)
    ts = _grid_in_dtype(sde, ts, dtype, start_at_T=True)
    if solver is None:
        solver = ExponentialIntegrator(sde)
    _check_solver(solver, "sde", None, sde)
    _check_score_shape(score, ts, shape, dtype, args)
    probe = jax.eval_shape(log_potential, jax.ShapeDtypeStruct(shape, dtype))
    if getattr(probe, "shape", None) != ():
        raise ValueError(
            "log_potential must return a scalar for one particle, got shape "
            f"{getattr(probe, 'shape', type(probe).__name__)}"
        )
    static = (num_particles, shape, dtype, float(twist), resampling)
    return _smc_jit(
        key, sde, score, log_potential, args, ts, solver, ess_threshold, static
    )


@eqx.filter_jit
def _smc_jit(key, sde, score, log_potential, args, ts, solver, threshold, static):
    n, shape, dtype, twist, scheme = static
    keys = _particle_keys(key, n)
    k_prior, k_bm = jax.vmap(_split_particle_key)(keys)
    # The resampling stream: a fold_in index no slot uses (slots are 0, ..., n - 1).
    k_resample = jr.fold_in(threefry_key(key), jnp.uint32(0xFFFFFFFF))
    y0 = jax.vmap(lambda k: _prior_draw(sde, k, shape, dtype))(k_prior)
    struct = jax.ShapeDtypeStruct(shape, dtype)
    num_steps = ts.shape[0] - 1
    steps = jnp.arange(num_steps)
    cells = jnp.where(ts[0] > ts[-1], num_steps - 1 - steps, steps)
    last = num_steps - 1

    def terms_with(inc):
        return reverse_sde(sde, score, _StepIncrement(inc))

    def log_h(t, x, final):
        if twist == 0.0:
            twisted = jnp.zeros((), dtype)
        else:
            x0 = score_to_x0(sde, t, x, score(t, x, args))
            twisted = twist * log_potential(x0)
        return jnp.where(final, log_potential(x), twisted).astype(dtype)

    def finite_or_dead(x, lh):
        ok = jnp.all(jnp.isfinite(x)) & jnp.isfinite(lh)
        return jnp.where(ok, lh, -jnp.inf), ~ok

    def init_one(x):
        state = solver.init(terms_with(jnp.zeros_like(x)), ts[0], ts[1], x, args)
        lh, dead = finite_or_dead(x, log_h(ts[0], x, False))
        return state, lh, dead

    state0, lh0, dead0 = jax.vmap(init_one)(y0)
    # a traced grid skipped the Python checks: a bad one fails every particle
    dead0 = dead0 | ~_grid_ok(sde, ts, True)

    def step_one(kb, x, state, lh, t0, t1, cell, final):
        inc = GridBrownianPath(struct, ts, kb).cell_increment(cell, t1 - t0)
        x1, _, _, state1, _ = solver.step(
            terms_with(inc), t0, t1, x, args, state, False
        )
        lh1, dead = finite_or_dead(x1, log_h(t1, x1, final))
        # a dead particle's increment is masked below (its log-weight stays -inf)
        return x1, state1, lh1, lh1 - lh, dead

    def step(carry, xs):
        x, state, lh, logw, dead = carry
        k, t0, t1, cell = xs
        x1, state1, lh1, inc, dead1 = jax.vmap(
            step_one, in_axes=(0, 0, 0, 0, None, None, None, None)
        )(k_bm, x, state, lh, t0, t1, cell, k == last)
        dead1 = dead | dead1
        logw = jnp.where(dead1, -jnp.inf, logw + inc)
        ess = _ess(logw)
        do = ess < threshold * n

        def resample(operand):
            tree, logw = operand
            idx = resample_indices(jr.fold_in(k_resample, k), logw, scheme)
            tree = jax.tree.map(lambda a: a[idx], tree)
            log_mean = jax.nn.logsumexp(logw) - math.log(n)
            return tree, jnp.full_like(logw, log_mean)

        tree = (x1, state1, lh1, dead1)
        tree, logw = lax.cond(do, resample, lambda o: o, (tree, logw))
        x1, state1, lh1, dead1 = tree
        return (x1, state1, lh1, logw, dead1), (ess, do)

    carry0 = (y0, state0, lh0, jnp.where(dead0, -jnp.inf, lh0), dead0)
    xs = (steps, ts[:-1], ts[1:], cells)
    (ys, _, _, logw, dead), (ess, did) = lax.scan(step, carry0, xs)
    log_z = jax.nn.logsumexp(logw) - math.log(n)
    return SMCSamples(ys, logw, log_z, ess, did, dead)
