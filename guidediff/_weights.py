r"""Guidance weights: a constant or a schedule $t \mapsto w(t)$, always array leaves.

A weight is stored as an array inside an `eqx.Module`, never as a Python float or a
static field, so changing it does not recompile and `jax.grad` can differentiate with
respect to it (optax's `inject_hyperparams` idea).
"""

import weakref
from collections.abc import Callable
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Scalar, Time


class Constant(eqx.Module):
    r"""A constant weight $w(t) = w$ (what `gd.as_weight` makes of a number).

    **Arguments:**

    - `value`: $w$, a finite scalar (stored as a float array leaf, so `jax.grad`
      reaches it and a new value does not recompile).

    !!! example

        ```python
        w = gd.Constant(1.5)
        assert w(0.0) == w(0.9) == 1.5
        assert jax.grad(lambda c: c(0.3))(w).value == 1.0  # dw/dw
        ```
    """

    value: Float[Array, ""]

    def __init__(self, value: ArrayLike):
        _reject_non_number(value)
        self.value = jnp.asarray(value, jnp.result_type(float))
        if self.value.ndim != 0:
            raise ValueError(
                f"a constant weight must be a scalar, got shape {self.value.shape}: "
                "to sample at several weights, jax.vmap over a scalar weight (e.g. "
                "jax.vmap(lambda w: gd.sample(..., gd.guide(s, gd.cfg(w, ...)), "
                "...))(weights)); for a weight that changes with t, use a schedule "
                "(gd.PiecewiseLinear)"
            )
        host = _host_values(value, self.value)
        if host is not None and not np.isfinite(host):
            raise ValueError(f"a guidance weight must be finite, got {value!r}")

    def __call__(self, t: Time) -> Scalar:
        return self.value


class PiecewiseLinear(eqx.Module):
    r"""$w(t)$ linearly interpolated between `values` at the knots `times`:

    $$w(t) = v_i + (v_{i+1} - v_i)\,\frac{t - t_i}{t_{i+1} - t_i},\qquad
    t_i \le t \le t_{i+1}.$$

    Knots must be increasing; outside them the end values are held. Both arrays are
    leaves, so a schedule can be learned (see issue "differentiable samplers").

    **Arguments:**

    - `times`: the knots $t_i$, a 1-D array, finite and strictly increasing.
    - `values`: the weights $v_i$ at the knots, finite, of the same length
      (at least one knot).

    !!! example

        ```python
        w = gd.PiecewiseLinear([0.0, 0.5, 1.0], [0.0, 2.0, 2.0])  # ramp, then hold
        assert w(0.25) == 1.0 and w(0.75) == 2.0
        assert w(-1.0) == 0.0 and w(2.0) == 2.0  # the end values held outside
        # the knots' values are leaves: d w(0.25) / d v = (1/2, 1/2, 0)
        dv = jax.grad(lambda pw: pw(0.25))(w).values
        assert jnp.allclose(dv, jnp.array([0.5, 0.5, 0.0]))
        ```
    """

    times: Float[Array, " n"]
    values: Float[Array, " n"]

    def __init__(self, times: ArrayLike, values: ArrayLike):
        self.times, self.values = _float_arrays(
            "the knots' ", times=times, values=values
        )
        if self.times.ndim != 1 or self.times.shape != self.values.shape:
            raise ValueError("times and values must be 1-D arrays of the same length")
        if self.times.shape[0] < 1:
            raise ValueError("a piecewise-linear weight needs at least one knot")
        host = _finite_on_host(
            "the knots' ", times=(times, self.times), values=(values, self.values)
        )
        knots = host["times"]  # compared: np.diff wraps around for unsigned ints
        if knots is not None and not np.all(knots[1:] > knots[:-1]):
            raise ValueError(
                f"the knots must be strictly increasing, got times={host['times']}"
            )
        if knots is not None and host["values"] is not None:
            _remember_knots(self, host["times"], host["values"])

    def __call__(self, t: Time) -> Scalar:
        return jnp.interp(t, self.times, self.values)


class PerStep(eqx.Module):
    r"""One weight per step of a sampling grid (a per-step guidance-scale list):

    $$w(t) = v_k \quad\text{for } t_{k+1} < t \le t_k,\qquad k = 0, \dots, N-1,$$

    on the decreasing grid $t_0 > t_1 > \dots > t_N$ that `gd.sample` steps on
    (`ts=`), so the score evaluated at a step's start $t_k$ sees that step's weight
    $v_k$. Above $t_0$ it holds $v_0$, at or below $t_N$ it holds $v_{N-1}$ (the
    final denoising step of `denoise=True` takes the last step's weight). A solver
    with stages inside a step (Heun's at its end $t_{k+1}$) sees the weight of the
    step each stage's time falls in. A time within float32 rounding of a grid
    time (16 float32 ulps of the grid's largest time, at most 1/64 of the
    neighbouring steps) counts as that time, so float32 particles, which step on
    the grid rounded to float32, and the same grid computed another way in float32
    find their steps' weights.
    Called on an array of times, it returns their weights.

    Sampling on another grid than `ts`, or with adaptive steps, reads the weights
    as this piecewise-constant function of $t$; the samplers warn when they see
    that (concrete grids only). `gd.log_likelihood` integrates the probability
    flow forward in time: on the same grid, a step's first stage is at its end
    $t_{k+1}$ and takes the weight $v_{k+1}$.

    **Arguments:**

    - `ts`: the sampling grid $t_0 > \dots > t_N$, 1-D, finite and strictly
      decreasing (at least two times): pass the same grid to `gd.sample`.
    - `values`: the $N$ weights $v_k$, one per step, finite. They are array leaves:
      `jax.grad` reaches them and new values do not recompile.

    !!! example

        ```python
        sde = gd.VPSDE()
        ts = gd.uniform_grid(sde.T, 1e-3, 4)
        w = gd.PerStep(ts, [3.0, 3.0, 1.0, 0.0])  # CFG off for the last step
        assert [float(w(t)) for t in ts[:-1]] == [3.0, 3.0, 1.0, 0.0]
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        guided = gd.guide(
            gmm.conditional_score(sde), gd.cfg(w, null_args=gmm.null_label)
        )
        out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=8, ts=ts, args=1)
        ```
    """

    times: Float[Array, " n"]
    values: Float[Array, " n-1"]

    def __init__(self, ts: ArrayLike, values: ArrayLike):
        self.times, self.values = _float_arrays("gd.PerStep's ", ts=ts, values=values)
        if self.times.ndim != 1 or self.times.shape[0] < 2:
            raise ValueError(
                "gd.PerStep's ts must be a 1-D grid of at least two times (one "
                f"step), got shape {self.times.shape}"
            )
        n = self.times.shape[0] - 1
        if self.values.shape != (n,):
            raise ValueError(
                f"gd.PerStep needs one value per step: a grid of {n + 1} times has "
                f"{n} steps, got values of shape {self.values.shape}"
            )
        host = _finite_on_host(
            "gd.PerStep's ", ts=(ts, self.times), values=(values, self.values)
        )
        grid = host["ts"]
        if grid is not None and not np.all(grid[1:] < grid[:-1]):
            raise ValueError(
                "gd.PerStep's ts must be strictly decreasing, from the noise end "
                f"towards the data as gd.sample steps, got {grid}"
            )
        if grid is not None:  # (the samplers' grid check needs the times only)
            _remember_knots(self, grid, host["values"])

    def __call__(self, t: Time) -> Scalar:
        # k = the number of the grid's inner times t_1 .. t_{N-1} at or above t,
        # each within float32 rounding at the grid's scale (a small share of its
        # gaps at most): the grid rounded to float32 (float32 particles step on it, or
        # a float32 copy given to the sampler) or computed in float32 by another
        # formula finds the same steps as the grid itself
        times = self.times
        t = jnp.asarray(t)
        eps = float(np.finfo(np.float32).eps)
        if jnp.issubdtype(t.dtype, jnp.floating):  # (a 16-bit time rounds coarser)
            eps = max(eps, float(jnp.finfo(t.dtype).eps))
        t = t.astype(times.dtype)
        inner = times[1:-1]
        gaps = times[:-1] - times[1:]
        scale = jnp.maximum(jnp.abs(times[0]), jnp.abs(times[-1]))
        # capped at a small share of the neighbouring steps, so that a solver's
        # stages late in a step keep its weight (a 16-bit time, rounded coarser,
        # is a direct call: up to a quarter)
        share = 0.25 if eps > float(np.finfo(np.float32).eps) else 1 / 64
        tol = jnp.minimum(16 * eps * scale, share * jnp.minimum(gaps[:-1], gaps[1:]))
        # the edges decrease strictly (tol < half a gap): k by binary search
        # (unrolled: no loop on the device per score call; a NaN time: step 0)
        k = jnp.searchsorted(-(inner + tol), -t, side="right", method="scan_unrolled")
        return self.values[jnp.where(jnp.isnan(t), 0, k)]


Weight: TypeAlias = float | ArrayLike | Callable[[Time], Scalar]
"""A guidance weight: a number (stored as a `Constant`) or a callable of $t$."""


class _Schedule(eqx.Module):
    """A plain callable weight, its output made a scalar array. The function is a
    static field (as in `gd.ScoreFn`), so a guided score holding it can still be
    passed through `jax.jit` as an argument."""

    fn: Callable[[Time], ArrayLike] = eqx.field(static=True)

    def __call__(self, t: Time) -> Scalar:
        return _scalar_weight(self.fn, t)


class _PytreeSchedule(eqx.Module):
    """A callable weight that is itself a pytree with array leaves (e.g. a
    `jax.tree_util.Partial` over arrays): held as a pytree, so its arrays are leaves
    (`jax.grad` reaches them; a new value does not recompile a jitted sampler)."""

    fn: Callable[[Time], ArrayLike]

    def __call__(self, t: Time) -> Scalar:
        return _scalar_weight(self.fn, t)


def _is_real_dtype(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def _float_arrays(owner: str, **given) -> list[Array]:
    """A schedule's inputs, each checked to hold real numbers, as float arrays."""
    for name, a in given.items():
        _check_real(a, f"{owner}{name}")
    return [jnp.asarray(a, jnp.result_type(float)) for a in given.values()]


def _finite_on_host(owner: str, **given) -> dict:
    """`{name: host copy or None}` of a schedule's `(input, stored)` arrays (None
    where traced), each checked to be finite."""
    host = {name: _host_values(a, stored) for name, (a, stored) in given.items()}
    for name, a in host.items():
        if a is not None and not np.all(np.isfinite(a)):
            raise ValueError(f"{owner}{name} must be finite, got {a}")
    return host


def _check_real(a, what: str) -> None:
    """A `TypeError` unless `a` is an array (or nested list) of real numbers."""
    try:  # jnp: a list of traced values is fine (under jit, grad, vmap)
        dtype = jnp.result_type(a) if hasattr(a, "dtype") else None
        dtype = jnp.asarray(a).dtype if dtype is None else dtype
    except (TypeError, ValueError):
        dtype = np.asarray(a).dtype  # strings: named below
    if not _is_real_dtype(dtype):
        raise TypeError(f"{what} must be real numbers, got {dtype} ({a!r})")


def _reject_non_number(weight) -> None:
    """Only a callable, a real number or a real array is a weight: a bool (Python,
    NumPy or a bool array) would silently become 1, a string its value, and None or
    a dict would fail deep inside JAX."""
    if callable(weight):
        return
    dtype = getattr(weight, "dtype", None)
    if dtype is None:
        real = isinstance(weight, int | float | np.integer | np.floating)
    else:
        real = _is_real_dtype(dtype)
    if isinstance(weight, bool) or not real:
        raise TypeError(
            f"a guidance weight must be a number, an array or a callable of t, got "
            f"{type(weight).__name__} {weight!r}"
        )


def _scalar_weight(fn, t: Time) -> Scalar:
    w = jnp.asarray(fn(t))
    if w.ndim != 0:
        raise ValueError(f"a weight schedule must return a scalar, got shape {w.shape}")
    return w


def as_weight(weight: Weight) -> Callable[[Time], Scalar]:
    r"""A guidance weight as a module $t \mapsto w(t)$ (what every guidance does with
    its `weight` argument).

    Lift a number to a `Constant`; pass guidediff schedules (`Constant`,
    `PiecewiseLinear`, any `eqx.Module`) through; wrap other callables so that their
    output is a scalar array: a plain function as a static field, a callable pytree
    (`jax.tree_util.Partial`) as a pytree, its arrays leaves.

    **Arguments:**

    - `weight`: a number or scalar array, or a callable of $t$ returning a scalar.
      A string or a boolean (also a bool array) is a `TypeError`; a non-finite
      number is a `ValueError`.

    **Returns:** a callable `w(t)` returning a scalar array (a non-scalar output of
    a schedule is a `ValueError` when called).

    !!! example

        ```python
        w = gd.as_weight(1.5)
        assert isinstance(w, gd.Constant) and w(0.3) == 1.5
        ramp = gd.PiecewiseLinear([0.0, 1.0], [0.0, 4.0])
        assert gd.as_weight(ramp) is ramp  # schedules pass through
        sq = gd.as_weight(lambda t: t**2)  # a plain function
        assert sq(0.5) == 0.25 and sq(jnp.asarray(0.5)).shape == ()
        ```
    """
    _reject_non_number(weight)
    if isinstance(weight, eqx.Module) and callable(weight):
        return weight
    if callable(weight):
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(weight)):
            return _Schedule(weight)
        return _PytreeSchedule(weight)
    return Constant(weight)


class _StaticFn(eqx.Module):
    """A plain function held as a static field: not a pytree leaf of the module that
    holds it (arrays it closes over are compile-time constants)."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def as_callable_leaf(fn: Callable) -> Callable:
    """`fn` as a guidance field: pytrees (an `eqx.Module`, `jax.tree_util.Partial`)
    as they are, so `jax.grad` reaches their arrays; a plain function wrapped as a
    static field, so the guided score stays a valid argument of `jax.jit` (a plain
    function is not an array leaf)."""
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(fn)):
        return _StaticFn(fn)
    return fn


# Host copies of the knots of schedules made from concrete values (the copies the
# constructor checked), by the identity of
# their arrays (while those live): `knots_on_host` gives them to the samplers' checks
# without reading the device arrays back (which waits for the work queued before).
_HOST_KNOTS: dict = {}
_MAX_HOST_KNOTS = 64


def _remember_knots(
    w: PiecewiseLinear | PerStep, times: np.ndarray, values: np.ndarray
):
    if len(_HOST_KNOTS) >= _MAX_HOST_KNOTS:  # drop the dead, then the oldest
        dead = [k for k, v in _HOST_KNOTS.items() if v[0]() is None or v[1]() is None]
        for key in dead:
            del _HOST_KNOTS[key]
        while len(_HOST_KNOTS) >= _MAX_HOST_KNOTS:
            del _HOST_KNOTS[next(iter(_HOST_KNOTS))]
    # keyed by both arrays: schedules may share their times (a tuner's zero schedule)
    _HOST_KNOTS[id(w.times), id(w.values)] = (
        weakref.ref(w.times),
        weakref.ref(w.values),
        times,
        values,
    )


def knots_on_host(w: PiecewiseLinear | PerStep) -> tuple[np.ndarray, np.ndarray] | None:
    """`(times, values)` of `w` on the host if its constructor saw concrete values
    (and its arrays are still the ones made then); None otherwise: not read from
    the device."""
    hit = _HOST_KNOTS.get((id(w.times), id(w.values)))
    if hit is None or hit[0]() is not w.times or hit[1]() is not w.values:
        return None
    return hit[2], hit[3]


def _host_values(a, stored: Array) -> np.ndarray | None:
    """A weight's input as stored (`stored`, the array made of it), computed on the
    host for its checks; None if any of it is traced. Read from the input, not from
    `stored`: a Python number then costs no device round trip, and reading a new
    device array waits for all the work queued before it (in a sweep, the previous
    samples). Finite values beyond float64's exact integers are read from `stored`
    (unless it is traced: made under `jax.jit`): such integers are rounded once or
    twice depending on how they are given (a NumPy int64 array once, Python ints
    through float64)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(a)):
        return None
    with np.errstate(over="ignore", invalid="ignore"):  # 1e39 in float32: inf
        exact = np.asarray(a, np.float64)
        huge = np.isfinite(exact) & (np.abs(exact) > 2.0**53)
        if np.any(huge):  # rounded once, as stored (made traced under jax.jit)
            if isinstance(stored, jax.core.Tracer):
                return np.asarray(a).astype(stored.dtype)
            return np.asarray(stored)
        return exact.astype(stored.dtype)
