r"""Guidance active on a time interval only."""

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
        active = (t >= self.t_lo.astype(t.dtype)) & (t <= self.t_hi.astype(t.dtype))
        # With an unbatched t (all particles share the grid) this stays a real branch
        # under vmap, so work outside the interval (e.g. CFG's unconditional call) is
        # skipped.
        return lax.cond(
            active,
            lambda: self.guidance.apply(score, t, x, args),
            lambda: score(t, x, args),
        )


def interval(guidance: AbstractGuidance, t_lo: ArrayLike, t_hi: ArrayLike) -> Interval:
    r"""Apply `guidance` only for $t_{lo} \le t \le t_{hi}$ (Kynkäänniemi et al.'s
    guidance interval). The bounds are array leaves: changing them does not retrace."""
    if not isinstance(guidance, AbstractGuidance):
        raise TypeError("interval wraps an AbstractGuidance")
    dtype = jnp.result_type(float)
    lo, hi = jnp.asarray(t_lo, dtype), jnp.asarray(t_hi, dtype)
    try:
        if float(lo) > float(hi):
            raise ValueError(
                f"interval needs t_lo <= t_hi, got {float(lo)} > {float(hi)}"
            )
    except TypeError:
        pass
    return Interval(guidance, lo, hi)
