r"""Guidance active on a time interval only."""

import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._jit import is_real_scalar
from .base import AbstractGuidance


class Interval(AbstractGuidance):
    r"""`guidance` on $t\in[t_{lo}, t_{hi}]$, the plain score elsewhere. See
    `interval`, which builds it (with checks) and has an example.

    **Arguments:**

    - `guidance`: the `AbstractGuidance` to switch on and off.
    - `t_lo`, `t_hi`: the interval's ends, scalars (leaves; Python or NumPy
      numbers become arrays of the default float dtype).
    """

    guidance: AbstractGuidance
    t_lo: Float[Array, ""] = eqx.field(converter=lambda b: _as_bound(b))
    t_hi: Float[Array, ""] = eqx.field(converter=lambda b: _as_bound(b))

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


def _as_bound(b):
    """A JAX array (a tracer too) as it is, anything else as a default-float array:
    `apply` compares the bounds in the time's dtype (`.astype`)."""
    return b if isinstance(b, jax.Array) else jnp.asarray(b, jnp.result_type(float))


def interval(guidance: AbstractGuidance, t_lo: ArrayLike, t_hi: ArrayLike) -> Interval:
    r"""Apply `guidance` only for $t_{lo} \le t \le t_{hi}$ (Kynkäänniemi et al.'s
    guidance interval):

    $$\tilde s_t = \begin{cases} G[s]_t & t_{lo} \le t \le t_{hi},\\
    s_t & \text{otherwise.}\end{cases}$$

    The bounds are array leaves: changing them neither recompiles nor traces the
    score again (a sweep of intervals runs one program). The switch is a
    `lax.cond`, so outside the interval the guidance is not evaluated at all (e.g.
    CFG's unconditional call is skipped) when all particles share the time and the
    bounds. Under `jax.vmap` over the bounds (a sweep of intervals in one program)
    or over the time, the predicate is batched and JAX turns the `lax.cond` into a
    select of both branches: the samples are the same, but the guidance is
    evaluated at every step (loop over the intervals to keep the saving).

    Gradients with respect to `t_lo` and `t_hi` are zero almost everywhere: on a
    fixed grid the sampler only sees which grid times (and solver stage times) fall
    inside the interval, so samples are piecewise constant in the bounds, and
    `jax.grad` returns 0 rather than the jumps. To learn *when* to guide,
    differentiate a weight schedule instead (e.g. `gd.PiecewiseLinear` knots).

    **Arguments:**

    - `guidance`: the `AbstractGuidance` to apply inside the interval.
    - `t_lo`, `t_hi`: the interval's ends (inclusive), scalars with
      $t_{lo} \le t_{hi}$ (concrete bounds are checked: NaN or $t_{lo} > t_{hi}$ is
      a `ValueError`). They are times of the SDE, in $[0, T]$, not step indices:
      `gd.sample` and `gd.smc_sample` warn when concrete bounds miss the sampled
      times altogether (the guidance would never apply).

    **Returns:** an `Interval`, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        s = gmm.conditional_score(sde)
        g = gd.cfg(2.0, null_args=gmm.null_label)
        late = gd.guide(s, gd.interval(g, 0.0, 0.5))
        x = jnp.array([0.5, -0.2])
        # outside the interval: the unguided score
        assert jnp.allclose(late(0.8, x, 1), s(0.8, x, 1))
        # inside: the guided one (which differs)
        assert jnp.allclose(late(0.3, x, 1), gd.guide(s, g)(0.3, x, 1))
        assert not jnp.allclose(late(0.3, x, 1), s(0.3, x, 1))

        def f(lo):  # the bounds get zero gradients
            return gd.guide(s, gd.interval(g, lo, 0.5))(0.3, x, 1).sum()

        assert jax.grad(f)(0.0) == 0.0
        ```
    """
    if not isinstance(guidance, AbstractGuidance):
        raise TypeError("interval wraps an AbstractGuidance")
    for name, bound in (("t_lo", t_lo), ("t_hi", t_hi)):
        if np.ndim(bound) == 0 and not is_real_scalar(bound):
            raise TypeError(
                f"interval: {name} must be a real scalar time, got {bound!r}"
            )
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
