r"""Guidance active on a time interval only."""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .base import AbstractGuidance


class Interval(AbstractGuidance):
    r"""`guidance` on $t\in[t_{lo}, t_{hi}]$, the plain score elsewhere. See `interval`."""

    guidance: AbstractGuidance
    t_lo: Float[Array, ""]
    t_hi: Float[Array, ""]

    def apply(self, score, t, x, args):
        t = jnp.asarray(t)
        tc = t  # compared in a float dtype: bounds cast to an int dtype would move
        if not jnp.issubdtype(t.dtype, jnp.inexact):
            tc = t.astype(jnp.result_type(float))
        active = (tc >= self.t_lo.astype(tc.dtype)) & (tc <= self.t_hi.astype(tc.dtype))
        # With an unbatched t (all particles share the grid) this stays a real branch
        # under vmap, so work outside the interval (e.g. CFG's unconditional call) is
        # skipped.
        # Both branches in the plain score's dtype (as every guidance returns), so a
        # guidance that promotes (a custom one) cannot break the cond.
        dtype = jax.eval_shape(lambda: score(t, x, args)).dtype
        return lax.cond(
            active,
            lambda: self.guidance.apply(score, t, x, args).astype(dtype),
            lambda: score(t, x, args),
        )


def interval(guidance: AbstractGuidance, t_lo: ArrayLike, t_hi: ArrayLike) -> Interval:
    r"""Apply `guidance` only for $t_{lo} \le t \le t_{hi}$ (Kynkäänniemi et al.'s
    guidance interval). The bounds are array leaves: changing them does not retrace."""
    if not isinstance(guidance, AbstractGuidance):
        raise TypeError("interval wraps an AbstractGuidance")
    dtype = jnp.result_type(float)
    lo, hi = jnp.asarray(t_lo, dtype), jnp.asarray(t_hi, dtype)
    if lo.ndim or hi.ndim:
        raise ValueError(
            f"interval bounds must be scalars, got shapes {lo.shape} and {hi.shape}"
        )
    try:
        lo_f, hi_f = float(lo), float(hi)
    except TypeError:  # traced bounds: checked by the caller
        return Interval(guidance, lo, hi)
    if math.isnan(lo_f) or math.isnan(hi_f):
        raise ValueError(f"interval bounds must not be NaN, got [{lo_f}, {hi_f}]")
    if lo_f > hi_f:
        raise ValueError(f"interval needs t_lo <= t_hi, got {lo_f} > {hi_f}")
    return Interval(guidance, lo, hi)
