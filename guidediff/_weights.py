r"""Guidance weights: a constant or a schedule $t \mapsto w(t)$, always array leaves.

A weight is stored as an array inside an `eqx.Module`, never as a Python float or a
static field, so changing it does not recompile and `jax.grad` can differentiate with
respect to it (optax's `inject_hyperparams` idea).
"""

from collections.abc import Callable
from typing import TypeAlias

import equinox as eqx
import jax.numpy as jnp
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

    def __call__(self, t: Time) -> Scalar:
        return jnp.interp(t, self.times, self.values)


Weight: TypeAlias = float | ArrayLike | Callable[[Time], Scalar]
"""A guidance weight: a number (stored as a `Constant`) or a callable of $t$."""


def as_weight(weight: Weight) -> Callable[[Time], Scalar]:
    """Lift a number to a `Constant`; pass callables (schedules) through."""
    if callable(weight):
        return weight
    return Constant(weight)
