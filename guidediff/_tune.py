r"""Optimising through the sampler: learned guidance schedules and DRaFT fine-tuning.

Both optimisers here backpropagate a reward through `sample` (discretise-then-optimise,
memory-bounded by the scan driver's checkpointing, optionally truncated to the last
$K$ steps):

- `tune_guidance` learns a guidance schedule $w(t)$ (a `PiecewiseLinear` with $K$
  knots, its values the parameters) that maximises
  $J(w) = E[r(Y^w)] - \lambda\,E\|Y^w - Y^0\|^2$, where $Y^0$ is the unguided sample
  driven by the same noise;
- `finetune_through_sampler` fine-tunes a score network's parameters to maximise
  $E[r(Y^\theta)]$ (DRaFT, Clark et al. 2024; DRaFT-K with `truncate_backprop=K`).

Both return the result and a learning curve (a list of dicts), which
`save_learning_curve` writes as JSON and PNG.
"""

import collections
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._brownian import threefry_key
from ._custom_types import Args, Key, Scalar
from ._grid import uniform_grid
from ._jit import _combine, _partition, is_real_scalar
from ._sample import (
    _args_as_arrays,
    _check_sde,
    _default_sde_solver,
    _grid_in_dtype,
    sample,
)
from ._sample_checks import (
    _check_count,
    _check_dtype,
    _check_guidance_sde,
    _check_intervals,
    _check_network_end,
    _check_score_shape,
    _check_shape,
    _check_solver,
)
from ._score import AbstractScore
from ._sde import AbstractSDE
from ._weights import PiecewiseLinear, Weight


def squared_displacement(y: Array, y_ref: Array) -> Scalar:
    r"""$\|y - y_{\text{ref}}\|^2$ for one particle: the default penalty (its mean over
    particles is the mean squared displacement from the unguided samples).

    !!! example

        ```python
        assert gd.squared_displacement(jnp.array([3.0, 4.0]), jnp.zeros(2)) == 25.0
        ```
    """
    return jnp.sum((y - y_ref) ** 2)


class TuneResult(NamedTuple):
    """What `tune_guidance` returns.

    - `schedule`: the learned `PiecewiseLinear` weight $w(t)$.
    - `curve`: one dict per optimiser step: `step`, `objective`, `reward`, `penalty`
      (minibatch estimates before that step's update) and `time_s` (wall time
      since the first step, compilation excluded).
    - `compile_s`: the compilation time of the optimiser step (0 when a call with
      the same sampler, reward and optimiser compiled it before).
    """

    schedule: PiecewiseLinear
    curve: list[dict[str, float]]
    compile_s: float


class FinetuneResult(NamedTuple):
    """What `finetune_through_sampler` returns.

    - `params`: the fine-tuned parameters.
    - `curve`: one dict per optimiser step: `step`, `objective`, `reward` (and
      `penalty` when `lam != 0`), `time_s` (compilation excluded).
    - `compile_s`: the compilation time of the optimiser step (0 when a call with
      the same sampler, reward and optimiser compiled it before).
    """

    params: PyTree[Any]
    curve: list[dict[str, float]]
    compile_s: float


def _check_learning_rate(lr) -> float:
    """A finite, positive learning rate (a negative one would minimise the reward)."""
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise TypeError(f"learning_rate must be a number, got {lr!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"learning_rate must be finite and positive, got {lr!r}")
    return value


def _check_per_particle(fn: Callable, name: str, *structs) -> None:
    """`fn` must map one particle (or a pair) to one real scalar."""
    try:
        out = jax.eval_shape(fn, *structs)
    except Exception as e:  # re-raised with context
        raise ValueError(
            f"calling `{name}` on one particle of shape {structs[0].shape} failed: {e}"
        ) from e
    shape = getattr(out, "shape", None)
    if shape == () and not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must return a real floating-point scalar per particle (it is "
            f"differentiated), but it returned a scalar of dtype {out.dtype}; "
            "return a float, e.g. `(x[0] > 1).astype(float)` (whose gradient is "
            "zero: a differentiable reward gives the optimiser a direction)"
        )
    if shape != ():
        got = shape if shape is not None else type(out).__name__
        raise ValueError(
            f"`{name}` must return one real scalar per particle (the objective is its "
            f"mean over particles), but it returned {got} for a particle of shape "
            f"{structs[0].shape}; reduce it to a scalar, e.g. `jnp.sum(...)`, and let "
            "guidediff average over particles"
        )


class _Project(eqx.Module):
    """Clip the parameters into `[lo, hi]` after each update (identity if None)."""

    lo: Array | None = None
    hi: Array | None = None

    def __call__(self, params):
        if self.lo is None:
            return params
        return jnp.clip(params, self.lo, self.hi)


def _step(loss, project, optimizer, params, opt_state, key, ts):
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params, key, ts)
    if isinstance(optimizer, optax.GradientTransformationExtraArgs):
        # what line-search optimisers (optax.lbfgs) need: the loss at the current
        # parameters, its gradient, and the loss as a function of the parameters
        # (the same noise); transformations that need none ignore them
        updates, opt_state = optimizer.update(
            grads,
            opt_state,
            params,
            value=value,
            grad=grads,
            value_fn=lambda p: loss(p, key, ts)[0],
        )
    else:
        updates, opt_state = optimizer.update(grads, opt_state, params)
    params = project(optax.apply_updates(params, updates))
    # a finite objective can still have a non-finite gradient (e.g. sqrt at 0)
    finite = jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
    )
    return params, opt_state, value, aux, finite


# Compiled optimiser steps, keyed by the static parts of (loss, project, optimizer,
# ...) and the arrays' shapes, dtypes and (committed) placements: a second call with
# the same loss ingredients (sampler, score maker, reward: the same objects, as for
# `jax.jit`; the same optax object) and new values (init, key, lam, bounds, number
# of iterations) reuses its program. At most `_MAX_STEPS` are kept; each step is
# compiled from a fresh closure, so an evicted entry releases its callables (and
# whatever they hold). Static parts that cannot be hashed are compiled, not cached.
_STEPS: collections.OrderedDict = collections.OrderedDict()
_MAX_STEPS = 16


def _aval(leaf) -> tuple | None:
    if leaf is None:
        return None
    # a committed array's placement is part of the program (AOT executables check it)
    placed = leaf.sharding if getattr(leaf, "committed", False) else None
    return (leaf.shape, leaf.dtype, bool(getattr(leaf, "weak_type", False)), placed)


def _compiled_step(*args):
    """The compiled `_step` for these arguments (from `_STEPS` when it holds one),
    and the seconds spent compiling it (0 for a reused one)."""
    dynamic, static = _partition(args)
    try:
        memo = (static, tuple(map(_aval, dynamic)))
        hash(memo)
    except TypeError:  # e.g. an unhashable reward object: compile, do not cache
        memo = None
    compiled = None if memo is None else _STEPS.get(memo)
    if compiled is not None:
        _STEPS.move_to_end(memo)
        return compiled, 0.0
    start = time.perf_counter()
    step = jax.jit(lambda dynamic: _step(*_combine(dynamic, static)))
    compiled = step.lower(dynamic).compile()
    compile_s = time.perf_counter() - start
    if memo is not None:
        _STEPS[memo] = compiled
        while len(_STEPS) > _MAX_STEPS:
            _STEPS.popitem(last=False)
    return compiled, compile_s


def _check_optimizer(
    optimizer, learning_rate
) -> tuple[optax.GradientTransformation, float | None]:
    """`(optimizer, None)`, or for None the default Adam and the learning rate to
    put in its state (see `_default_optimizer`)."""
    if optimizer is None:
        return _default_optimizer(), _check_learning_rate(learning_rate)
    if not (
        callable(getattr(optimizer, "init", None))
        and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            "optimizer must be an optax optimiser, with init and update (e.g. "
            f"optax.adam(1e-2), optax.lbfgs(), optax.MultiSteps), got {optimizer!r}"
        )
    return optimizer, None


@functools.cache
def _default_optimizer() -> optax.GradientTransformation:
    """Adam with its learning rate in its state (`optax.inject_hyperparams`): one
    object, so that every call of a learning-rate sweep reuses one compiled step
    (`optax.adam(rate)` bakes the rate into its update: one compile per rate).
    `_optimise` sets the rate in the state; the updates are `optax.adam(rate)`'s
    (to rounding: the rate is an array in float32, not a constant folded in)."""
    return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def _strong(tree):
    """Python numbers as arrays, and weakly typed arrays made strong: an update's
    output is a strongly typed array, and the compiled step must see the same
    structure and types on every iteration."""

    def strong(a):
        if isinstance(a, bool | int | float | complex):
            a = jnp.asarray(a)
        if getattr(a, "weak_type", False):
            return lax.convert_element_type(a, a.dtype)
        return a

    return jax.tree.map(strong, tree)


def _optimise(
    loss, params, optimizer, num_iters, key, fixed_noise, project, ts, learning_rate
):
    """Run `num_iters` compiled optax steps of `loss(params, key, ts) -> (loss, aux)`.

    `loss` and `project` are pytrees (`eqx.Module`s): their arrays are arguments of
    the compiled step, the rest keys its cache (see `_STEPS`). The time grid `ts` is
    an argument too, not a constant closed over (XLA:GPU in jax 0.11 failed to
    compile some sampler gradients whose grid was a constant). Returns the
    parameters, the curve, and the compile time (excluded from the curve's
    `time_s`; 0 when a compiled step is reused). A `learning_rate` (not None) goes
    into the state of the default optimiser (in the dtype optax chose for it)."""
    params = _strong(params)
    opt_state = optimizer.init(params)
    if learning_rate is not None:
        rate = opt_state.hyperparams["learning_rate"]
        opt_state.hyperparams["learning_rate"] = jnp.asarray(learning_rate, rate.dtype)
    step, compile_s = _compiled_step(
        loss, project, optimizer, params, opt_state, key, ts
    )
    curve = []
    start = time.perf_counter()
    for k in range(int(num_iters)):
        k_step = key if fixed_noise else jr.fold_in(key, k)
        dynamic, _ = _partition(
            (loss, project, optimizer, params, opt_state, k_step, ts)
        )
        new_params, opt_state, value, aux, finite = step(dynamic)
        row = {"step": k, "objective": -float(value)}
        num_failed = int(aux.pop(_FAILED))
        row.update({name: float(v) for name, v in aux.items()})
        row["time_s"] = time.perf_counter() - start
        if num_failed:
            raise FloatingPointError(
                f"{num_failed} particle(s) failed in the sampler runs of step {k} (the "
                "solver reported a failure, or values went non-finite: see "
                "`Samples.failed`), so the objective is NaN; check the score and "
                "the solver (e.g. gd.sample with the step's parameters), lower the "
                "learning rate or bound the parameters"
            )
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(
                f"the objective is not finite at step {k} ({row}); lower the "
                "learning rate, bound the parameters, or check the reward"
            )
        if not bool(finite):
            raise FloatingPointError(
                f"the parameters are not finite after step {k}'s update (the "
                f"objective was finite, {row}, its gradient was not: e.g. a reward "
                "like sqrt(x) at 0); check the reward's gradient or lower the "
                "learning rate"
            )
        curve.append(row)
        params = new_params
    return params, curve, compile_s


def tune_guidance(
    key: Key,
    sde: AbstractSDE,
    guided: Callable[[Weight], AbstractScore],
    reward: Callable[[Array], Scalar],
    shape: tuple[int, ...],
    *,
    num_knots: int = 8,
    init: float | PiecewiseLinear = 0.0,
    lam: float = 0.0,
    penalty: Callable[[Array, Array], Scalar] = squared_displacement,
    num_iters: int = 100,
    num_particles: int = 256,
    learning_rate: float = 0.05,
    optimizer: optax.GradientTransformation | None = None,
    bounds: tuple[float, float] | None = None,
    fixed_noise: bool = False,
    ts: Float[ArrayLike, " n"] | None = None,
    args: Args = None,
    process: Literal["sde", "ode"] = "sde",
    solver: dfx.AbstractSolver | None = None,
    truncate_backprop: int | None = None,
    dtype: Any = None,
) -> TuneResult:
    r"""Learn a guidance schedule $w(t)$ by gradient ascent through the sampler.

    The schedule is a `PiecewiseLinear` with `num_knots` knots equally spaced on
    $[t_{\text{end}}, T]$; its knot values $v$ are the parameters. Each step draws
    `num_particles` samples $Y^w_i$ with `guided(w)`, and the unguided samples
    $Y^0_i$ (`guided` at $w \equiv 0$, which every guidance maps to the identity)
    driven by the same noise, and ascends

    $$J(v) = \frac1n\sum_i r(Y^w_i) - \lambda\,\frac1n\sum_i
    \text{penalty}(Y^w_i, Y^0_i),$$

    with `penalty` the squared displacement $\|Y^w_i - Y^0_i\|^2$ by default: the
    reward is traded against how far guidance moves each sample. Step $k$ uses the
    key `fold_in(key, k)` (`fixed_noise=True`: always `key`).

    The compiled optimiser step is reused by later calls with the same `guided`,
    `reward`, `penalty` and optimiser objects and arguments of the same shapes (as
    `jax.jit` reuses a function's compilation; `compile_s` is then 0): a function
    that reads a global variable sees the value it had when first compiled, so pass
    a new function object after changing it. The same holds for
    `finetune_through_sampler`.

    **Arguments:**

    - `key`, `sde`, `shape`: as for `sample`.
    - `guided`: `weight -> score`, e.g.
      `lambda w: gd.guide(s, gd.reward_guidance(s_r, w))`.
    - `reward`: `r(x) -> scalar` for one particle, differentiable (e.g. a
      `gd.GaussianBumpReward`).
    - `num_knots`, `init`: the schedule's knots, and its initial value (a number) or
      an initial `PiecewiseLinear` (its knot times are kept).
    - `lam`, `penalty`: the penalty weight and `penalty(y, y_ref) -> scalar`.
    - `num_iters`, `num_particles`: optimiser steps, particles per step.
    - `learning_rate`, `optimizer`: `optax.adam(learning_rate)` by default (the
      rate is an array in its state: a sweep over rates compiles once); any
      optax transformation, line searches included (`optax.lbfgs()`: its `update`
      receives `value`, `grad` and `value_fn`, the objective at the step's noise;
      with `fixed_noise=True` that is one deterministic function to minimise).
    - `bounds`: `(lo, hi)`: the knot values are clipped into it after each step;
      the initial values must lie inside it.
    - `ts`, `args`, `process`, `solver`, `truncate_backprop`, `dtype`: passed to
      `sample` (default grid: 100 uniform steps from `sde.T` to `1e-3`; default
      dtype: JAX's default float). The schedule's knots are in JAX's default
      float, whatever the particles' dtype.

    **Returns:** a `TuneResult` `(schedule, curve, compile_s)`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
        s, s_r = gmm.score(sde), gmm.tilt(reward).score(sde)
        result = gd.tune_guidance(
            jr.key(0), sde, lambda w: gd.guide(s, gd.reward_guidance(s_r, w)),
            reward, (2,), lam=0.05, num_iters=50,
        )
        result.schedule(0.5), result.curve[-1]["reward"]
        gd.save_learning_curve(result.curve, "out/tune")  # out/tune.json, .png
        ```
    """
    if isinstance(guided, AbstractScore) or not callable(guided):
        raise TypeError(
            "guided must be a function from a weight schedule to a score (e.g. "
            "lambda w: gd.guide(s, gd.reward_guidance(s_r, w))), got "
            f"{type(guided).__name__}"
        )
    _check_count("num_iters", num_iters)
    _check_lam(lam)
    if not isinstance(init, PiecewiseLinear) and not is_real_scalar(init):
        raise TypeError(f"init must be a number or a gd.PiecewiseLinear, got {init!r}")
    key = threefry_key(key)  # as `sample` takes keys (others are hashed)
    dtype = _check_dtype(dtype)
    shape, kw = _sampler_setup(
        sde, shape, ts, num_particles, args, process, solver, truncate_backprop, dtype
    )
    ts = kw["ts"]
    wdtype = jnp.result_type(float)  # the knots' (as PiecewiseLinear stores them)
    if isinstance(init, PiecewiseLinear):
        schedule0 = init
    else:
        if _check_count("num_knots", num_knots) < 2:
            raise ValueError(f"num_knots must be an integer >= 2, got {num_knots!r}")
        times = jnp.linspace(ts[-1], ts[0], int(num_knots))
        schedule0 = PiecewiseLinear(times, jnp.full(int(num_knots), init, wdtype))
    x = jax.ShapeDtypeStruct(shape, dtype)
    _check_per_particle(reward, "reward", x)
    _check_per_particle(penalty, "penalty", x, x)
    zero = PiecewiseLinear(schedule0.times, jnp.zeros_like(schedule0.values))
    for w in (schedule0, zero):
        if not isinstance(guided(w), AbstractScore):
            raise TypeError(
                "`guided(weight)` must return a score (an AbstractScore), e.g. "
                "lambda w: gd.guide(score, gd.reward_guidance(reward_score, w))"
            )
    _check_sampled_score(guided(schedule0), sde, shape, dtype, args, kw)
    loss = _TuneLoss(
        sde, guided, reward, penalty, jnp.asarray(lam, wdtype), schedule0.times,
        zero, shape, _without_ts(kw),
    )  # fmt: skip
    optimizer, rate = _check_optimizer(optimizer, learning_rate)
    if bounds is None:
        project = _Project()
    else:
        if np.shape(bounds) != (2,):
            raise TypeError(f"bounds must be a pair (lo, hi), got {bounds!r}")
        lo, hi = bounds
        if not float(lo) <= float(hi):
            raise ValueError(f"bounds must be (lo, hi) with lo <= hi, got {bounds}")
        v0 = np.asarray(schedule0.values)
        if not np.all((v0 >= float(lo)) & (v0 <= float(hi))):
            raise ValueError(
                f"the initial knot values {v0.tolist()} lie outside bounds {bounds}: "
                "the first step would evaluate the objective there; start inside "
                "(e.g. `init` within the bounds)"
            )
        project = _Project(jnp.asarray(lo, wdtype), jnp.asarray(hi, wdtype))
    values, curve, compile_s = _optimise(
        loss, schedule0.values, optimizer, num_iters, key, fixed_noise, project, ts,
        rate,
    )  # fmt: skip
    return TuneResult(PiecewiseLinear(schedule0.times, values), curve, compile_s)


def _without_ts(kw: dict) -> dict:
    """`sample`'s keyword arguments less the grid (an argument of the step)."""
    return {k: v for k, v in kw.items() if k != "ts"}


_FAILED = "num_failed"  # an aux entry of the losses, not a column of the curve


def _num_failed(*samples) -> Array:
    """Particles failed in any of the runs (NaN: they make the objective NaN)."""
    return sum(jnp.sum(out.failed) for out in samples)


class _TuneLoss(eqx.Module):
    """`tune_guidance`'s negated objective of the knot values (a pytree: its arrays
    are traced, its callables key the compiled step)."""

    sde: AbstractSDE
    guided: Callable
    reward: Callable
    penalty: Callable
    lam: Array
    times: Array
    zero: PiecewiseLinear
    shape: tuple
    kw: dict

    def __call__(self, values, k, ts):
        w = PiecewiseLinear(self.times, values)
        out = sample(k, self.sde, self.guided(w), self.shape, ts=ts, **self.kw)
        ref = sample(k, self.sde, self.guided(self.zero), self.shape, ts=ts, **self.kw)
        r = jnp.mean(jax.vmap(self.reward)(out.ys))
        pen = jnp.mean(jax.vmap(self.penalty)(out.ys, lax.stop_gradient(ref.ys)))
        aux = {"reward": r, "penalty": pen, _FAILED: _num_failed(out, ref)}
        return -(r - self.lam * pen), aux


class _FinetuneLoss(eqx.Module):
    """`finetune_through_sampler`'s negated objective of the network parameters."""

    sde: AbstractSDE
    make_score: Callable
    reward: Callable
    penalty: Callable
    lam: Array
    use_penalty: bool = eqx.field(static=True)
    params0: PyTree[Any]
    shape: tuple
    kw: dict

    def __call__(self, params, k, ts):
        score = self.make_score(params)
        out = sample(k, self.sde, score, self.shape, ts=ts, **self.kw)
        r = jnp.mean(jax.vmap(self.reward)(out.ys))
        if not self.use_penalty:
            return -r, {"reward": r, _FAILED: _num_failed(out)}
        ref = sample(k, self.sde, self.make_score(self.params0), self.shape, ts=ts,
                     **self.kw)  # fmt: skip
        pen = jnp.mean(jax.vmap(self.penalty)(out.ys, lax.stop_gradient(ref.ys)))
        aux = {"reward": r, "penalty": pen, _FAILED: _num_failed(out, ref)}
        return -(r - self.lam * pen), aux


def _sampler_setup(
    sde, shape, ts, num_particles, args, process, solver, truncate_backprop, dtype
):
    """The particle shape and the keyword arguments of `sample`
    (default grid: 100 uniform steps from `sde.T` to 1e-3), checked as `sample`
    checks them: the grid reaches `sample` traced (an argument of the compiled
    step), where its Python checks cannot run."""
    _check_sde(sde)
    shape = _check_shape(shape)
    num_particles = _check_count("num_particles", num_particles)
    if ts is None:
        ts = uniform_grid(sde.T, 1e-3, 100)
    kw = dict(
        num_particles=num_particles,
        ts=_grid_in_dtype(sde, ts, dtype, start_at_T=True, takes_y0=False),
        # numbers as array leaves (as `sample` takes them): a new class label must
        # not compile a new step
        args=_args_as_arrays(args),
        process=process,
        solver=solver,
        truncate_backprop=truncate_backprop,
        dtype=dtype,
    )
    return shape, kw


def _check_sampled_score(score, sde, shape, dtype, args, kw) -> None:
    """What `sample` checks of its concrete inputs, on the score at the initial
    parameters: inside the compiled step the SDE, the grid and the args are traced,
    and these checks would pass a score or solver built for another SDE, a network
    read at sigma = 0, or interval bounds that miss the grid."""
    ts, process, solver = kw["ts"], kw["process"], kw["solver"]
    if process not in ("sde", "ode"):
        raise ValueError(f"process must be 'sde' or 'ode', got {process!r}")
    if solver is None:  # sample's default
        solver = _default_sde_solver(sde) if process == "sde" else dfx.Heun()
    _check_solver(solver, process, None, sde)
    # with the concrete args (e.g. an unknown class label)
    _check_score_shape(score, ts, shape, dtype, args)
    _check_network_end(score, solver, sde, ts)
    _check_guidance_sde(score, sde)
    _check_intervals(score, ts, solver, stacklevel=4)  # the tuner's caller


def finetune_through_sampler(
    key: Key,
    sde: AbstractSDE,
    make_score: Callable[[PyTree[Any]], AbstractScore],
    params: PyTree[Any],
    reward: Callable[[Array], Scalar],
    shape: tuple[int, ...],
    *,
    num_iters: int = 100,
    num_particles: int = 64,
    learning_rate: float = 1e-4,
    optimizer: optax.GradientTransformation | None = None,
    truncate_backprop: int | None = None,
    lam: float = 0.0,
    penalty: Callable[[Array, Array], Scalar] = squared_displacement,
    fixed_noise: bool = False,
    ts: Float[ArrayLike, " n"] | None = None,
    args: Args = None,
    process: Literal["sde", "ode"] = "sde",
    solver: dfx.AbstractSolver | None = None,
    dtype: Any = None,
) -> FinetuneResult:
    r"""DRaFT: fine-tune a score network by backpropagating a reward through sampling.

    With $Y^\theta_i$ the samples of `make_score(θ)` (particle keys from
    `fold_in(key, k)` at step $k$), each optax step ascends

    $$J(\theta) = \frac1n\sum_i r(Y^\theta_i)
    \;\big[-\ \lambda\,\frac1n\sum_i \text{penalty}(Y^\theta_i, Y^{\theta_0}_i)\big],$$

    differentiating through every solver step (checkpointed), or through the last
    $K$ steps only with `truncate_backprop=K` (DRaFT-K: the state $K$ steps before
    the end is treated as a constant, so the cost is $K$ differentiated steps). The
    optional penalty keeps samples near those of the initial parameters $\theta_0$
    under the same noise.

    This is the trajectory-based baseline: every step simulates whole trajectories,
    unlike reward-weighted denoising score matching (`gd.reward_weighted_dsm_loss`).

    **Arguments:**

    - `make_score`: `params -> score`, e.g.
      `lambda p: gd.flax_score(net, p, sde)`.
    - `params`: the initial (pretrained) parameters.
    - `reward`: differentiable `r(x) -> scalar` for one particle.
    - `truncate_backprop`: `K` for DRaFT-K, `None` for full backpropagation.
    - `lam`, `penalty`: optional penalty towards the initial model's samples.
    - the rest as in `tune_guidance` (default grid: 100 uniform steps; `dtype`:
      the particles', as for `sample`).

    **Returns:** a `FinetuneResult` `(params, curve, compile_s)`.

    !!! example

        ```python
        sde, net = gd.VPSDE(), gd.MLPScoreNet()
        pretrained = net.init(jr.key(0), 0.5, jnp.zeros(2))  # or gd.fit(...).ema_params
        reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
        # read as an x0-prediction, the untrained net (output 0) is data at the
        # origin: finite samples, a non-zero reward and gradient to start from
        make = lambda p: gd.flax_score(net, p, sde, prediction="x0")
        result = gd.finetune_through_sampler(
            jr.key(1), sde, make, pretrained, reward, (2,),
            num_iters=50, truncate_backprop=10, learning_rate=1e-4,
        )
        score = make(result.params)
        ```
    """
    _check_count("num_iters", num_iters)
    _check_lam(lam)
    key = threefry_key(key)  # as `sample` takes keys (others are hashed)
    dtype = _check_dtype(dtype)
    shape, kw = _sampler_setup(
        sde, shape, ts, num_particles, args, process, solver, truncate_backprop, dtype
    )
    x = jax.ShapeDtypeStruct(shape, dtype)
    _check_per_particle(reward, "reward", x)
    if lam:
        _check_per_particle(penalty, "penalty", x, x)
    if not isinstance(make_score(params), AbstractScore):
        raise TypeError(
            "`make_score(params)` must return a score (an AbstractScore), e.g. "
            "lambda p: gd.flax_score(net, p, sde)"
        )
    _check_sampled_score(make_score(params), sde, shape, dtype, args, kw)
    loss = _FinetuneLoss(
        sde, make_score, reward, penalty,
        jnp.asarray(lam, jnp.result_type(float)), bool(lam),
        params if lam else None, shape, _without_ts(kw),
    )  # fmt: skip
    optimizer, rate = _check_optimizer(optimizer, learning_rate)
    params, curve, compile_s = _optimise(
        loss, params, optimizer, num_iters, key, fixed_noise, _Project(), kw["ts"],
        rate,
    )  # fmt: skip
    return FinetuneResult(params, curve, compile_s)


def save_learning_curve(
    curve: list[dict[str, float]],
    path: str | Path,
    *,
    title: str | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write a learning curve as `PATH.json` and `PATH.png` (matplotlib, Agg).

    The JSON is `{"curve": curve, **meta}`; the figure has one panel per quantity
    (`objective`, `reward`, `penalty`, those present) against `step`, under
    `title` (default: none). A `.json` or `.png` suffix on `path` is dropped.
    `meta` holds extra JSON-serialisable fields (not named `curve`). Returns the
    two paths.

    !!! example

        ```python
        curve = [  # e.g. the `curve` of a `TuneResult` or a `FinetuneResult`
            {"step": k, "objective": 1 - 0.9**k, "reward": 1 - 0.9**k}
            for k in range(50)
        ]
        json_path, png_path = gd.save_learning_curve(curve, "out/tune")
        ```
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curve:
        raise ValueError("the learning curve is empty")
    path = Path(path)
    if path.suffix in (".json", ".png"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    # appended, not with_suffix: "tune_lam0.05" must not become "tune_lam0.json"
    json_path = path.with_name(path.name + ".json")
    png_path = path.with_name(path.name + ".png")
    if meta is not None and "curve" in meta:
        raise ValueError(
            "meta must not hold a 'curve' key (it would replace the curve)"
        )
    names = [n for n in ("objective", "reward", "penalty") if curve and n in curve[0]]
    for i, row in enumerate(curve):  # checked before anything is written
        missing = [k for k in ("step", *names) if k not in row]
        if missing:
            raise ValueError(f"curve row {i} lacks {missing} (row 0 has them)")
    payload = {"curve": _jsonable(list(curve)), **_jsonable(dict(meta or {}))}
    text = json.dumps(payload, indent=2, allow_nan=False)  # raises before writing
    json_path.write_text(text)

    steps = np.array([r["step"] for r in curve])
    fig = Figure(figsize=(3.6 * len(names), 3.2))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        ax.plot(steps, [r[name] for r in curve], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return json_path, png_path


def _check_lam(lam) -> None:
    """A finite scalar >= 0 (traced values pass): a negative one rewards moving
    away from the reference samples, and the objective is unbounded."""
    if not is_real_scalar(lam):
        raise TypeError(f"lam must be a real number, got {lam!r}")
    if not isinstance(lam, jax.core.Tracer) and not 0.0 <= float(lam) < math.inf:
        raise ValueError(f"lam must be finite and >= 0, got {float(lam)}")


def _jsonable(v):
    """Strict JSON: numpy/jax scalars and arrays to Python, NaN and inf to null
    (what `json.dumps` would write bare, which strict parsers reject)."""
    if isinstance(v, dict):
        out = {str(k): _jsonable(x) for k, x in v.items()}
        if len(out) != len(v):  # {1: .., "1": ..} would lose one silently
            raise ValueError(f"keys that read the same as text: {list(v)}")
        return out
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic | np.ndarray | jax.Array):
        return _jsonable(np.asarray(v).tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
