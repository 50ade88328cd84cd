r"""Guidance weights: a constant or a schedule $t \mapsto w(t)$, always array leaves.

A weight is stored as an array inside an `eqx.Module`, never as a Python float or a
static field, so changing it does not recompile and `jax.grad` can differentiate with
respect to it (optax's `inject_hyperparams` idea).
"""

from collections.abc import Callable
from typing import TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Scalar, Time


class Constant(eqx.Module):
    """A constant weight $w(t) = w$."""

    value: Float[Array, ""]

    def __init__(self, value: ArrayLike):
        self.value = jnp.asarray(value, jnp.result_type(float))
        if self.value.ndim != 0:
            raise ValueError(
                f"a constant weight must be a scalar, got {self.value.shape}"
            )
        if _is_concrete(self.value) and not np.isfinite(np.asarray(self.value)):
            raise ValueError(f"a guidance weight must be finite, got {value!r}")

    def __call__(self, t: Time) -> Scalar:
        return self.value


class PiecewiseLinear(eqx.Module):
    r"""$w(t)$ linearly interpolated between `values` at the knots `times`.

    Knots must be increasing; outside them the end values are held. Both arrays are
    leaves, so a schedule can be learned (see issue "differentiable samplers").
    """

    times: Float[Array, " n"]
    values: Float[Array, " n"]

    def __init__(self, times: ArrayLike, values: ArrayLike):
        self.times = jnp.asarray(times, jnp.result_type(float))
        self.values = jnp.asarray(values, jnp.result_type(float))
        if self.times.ndim != 1 or self.times.shape != self.values.shape:
            raise ValueError("times and values must be 1-D arrays of the same length")
        if self.times.shape[0] < 1:
            raise ValueError("a piecewise-linear weight needs at least one knot")
        for name, a in (("times", self.times), ("values", self.values)):
            if _is_concrete(a) and not np.all(np.isfinite(np.asarray(a))):
                raise ValueError(f"the knots' {name} must be finite, got {a}")
        if _is_concrete(self.times) and not np.all(np.diff(self.times) > 0):
            raise ValueError(
                f"the knots must be strictly increasing, got times={self.times}"
            )

    def __call__(self, t: Time) -> Scalar:
        return jnp.interp(t, self.times, self.values)


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


def _scalar_weight(fn, t: Time) -> Scalar:
    w = jnp.asarray(fn(t))
    if w.ndim != 0:
        raise ValueError(f"a weight schedule must return a scalar, got shape {w.shape}")
    return w


def as_weight(weight: Weight) -> Callable[[Time], Scalar]:
    """Lift a number to a `Constant`; pass guidediff schedules (`Constant`,
    `PiecewiseLinear`, any `eqx.Module`) through; wrap other callables so that their
    output is a scalar array: a plain function as a static field, a callable pytree
    (`jax.tree_util.Partial`) as a pytree, its arrays leaves."""
    if isinstance(weight, str | bool | np.bool_):
        raise TypeError(
            f"a guidance weight must be a number, an array or a callable of t, got "
            f"{type(weight).__name__} {weight!r}"
        )
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


def _is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)
