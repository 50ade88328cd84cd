r"""One `diffrax.diffeqsolve` over all particles at once, on a fixed grid.

`gd.sample(..., driver="diffeqsolve")` on a fixed grid solves the particles as one
batched state `(P, *shape)` instead of `vmap`-ing `diffeqsolve` over particles. On a
`StepTo` grid every particle takes the same steps, so the samples are the same; but
diffrax's adjoint is then not run under `vmap`, so reverse mode keeps ONE cotangent of
what the score closes over (e.g. network parameters), not one per particle (4 bytes
x parameters x particles: gigabytes for the benchmarks' 64-D MLP at 4,096
particles, `compiled_memory` in `benchmarks/results/grad_cost_gpu.json`). Adaptive step sizes keep the
per-particle `vmap`, so that each particle has its own steps, and so do solvers
whose step couples the state's entries (implicit solvers' Newton solves and
Milstein's Jacobian would span the whole batch): see `_per_particle_steps`.

The score is applied per particle (`vmap` over the leading axis) and the noise is each
particle's own Brownian path, so particle `i`'s sample still depends on its key only.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import nondifferentiable
from jaxtyping import Array

from ._brownian import GridBrownianPath
from ._custom_types import Args, Time
from ._score import AbstractScore


def brownian_path(
    kind: str, shape, ts, key, tol, levy_area: type = dfx.BrownianIncrement
) -> dfx.AbstractBrownianPath:
    """One particle's Brownian path: `"grid"` (`GridBrownianPath` on `ts`), `"tree"`
    (`diffrax.VirtualBrownianTree` of tolerance `tol` over the grid's range) or
    `"unsafe"` (`diffrax.UnsafeBrownianPath`), with Levy areas of type `levy_area`
    (`levy_area_for(solver)`)."""
    if kind == "grid":
        return GridBrownianPath(shape, ts, key, levy_area)
    if kind == "tree":
        lo, hi = jnp.minimum(ts[0], ts[-1]), jnp.maximum(ts[0], ts[-1])
        lo, hi = nondifferentiable((lo, hi), msg=_TREE_TIME_GRAD_MSG)
        out_dtype = None
        if levy_area is not dfx.BrownianIncrement and shape.dtype.itemsize < 4:
            # diffrax's space-time tree is NaN in float16: drawn in float32 and
            # rounded, as the grid path draws 16-bit values
            out_dtype = shape.dtype
            shape = jax.ShapeDtypeStruct(shape.shape, jnp.float32)
        tree = dfx.VirtualBrownianTree(
            lo, hi, tol=tol, shape=shape, key=key, levy_area=levy_area
        )
        return _FixedTimeTree(tree, out_dtype)
    return dfx.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy_area)


_TREE_TIME_GRAD_MSG = (
    "gd.sample(..., brownian='tree') cannot be differentiated with respect to the "
    "time grid ts: a diffrax.VirtualBrownianTree's value is not differentiable in "
    "time (nor is Brownian motion). Use brownian='grid' (the default on a fixed "
    "grid), whose increments sqrt(|dt|) * xi_k are smooth in the grid's times, or "
    "jax.lax.stop_gradient(ts)."
)


class _FixedTimeTree(dfx.AbstractBrownianPath):
    """A `VirtualBrownianTree` whose evaluation times may not carry tangents: a
    gradient with respect to the grid raises `_TREE_TIME_GRAD_MSG` (diffrax's own
    error names its internal argument `t0` only)."""

    tree: dfx.VirtualBrownianTree
    dtype: object = eqx.field(static=True, default=None)  # rounded to it if set

    @property
    def t0(self):
        return self.tree.t0

    @property
    def t1(self):
        return self.tree.t1

    @property
    def levy_area(self):
        return self.tree.levy_area

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        t0, t1 = nondifferentiable((t0, t1), msg=_TREE_TIME_GRAD_MSG)
        if not use_levy or t1 is None:
            return self._round(self.tree.evaluate(t0, t1, left=left, use_levy=use_levy))
        # Against the tree's direction: the forward interval's areas negated, as
        # diffrax.diffeqsolve asks for them in reversed time (the tree's own
        # reversed query does not give that), so both drivers see the same values
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        fwd = self.tree.evaluate(lo, hi, left=left, use_levy=True)
        sign = jnp.where(t1 < t0, -1, 1)
        return self._round(jtu.tree_map(lambda a: (sign * a).astype(a.dtype), fwd))

    def _round(self, out):
        if self.dtype is None:
            return out
        return jtu.tree_map(lambda a: a.astype(self.dtype), out)


class BatchedScore(AbstractScore):
    """`score` applied to each row of a `(P, *shape)` batch (shared `t` and `args`)."""

    score: AbstractScore

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return jax.vmap(self.score, in_axes=(None, 0, None))(t, x, args)


class BatchedBrownianPath(dfx.AbstractBrownianPath):
    """Each particle's own Brownian path, evaluated together: row `i` is the path
    that `gd.sample` gives particle `i` (`kind` = "grid", "tree" or "unsafe")."""

    kind: str = eqx.field(static=True)
    shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    ts: Array
    keys: Array
    tol: float = eqx.field(static=True)
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    @property
    def t0(self):
        return jnp.minimum(self.ts[0], self.ts[-1])

    @property
    def t1(self):
        return jnp.maximum(self.ts[0], self.ts[-1])

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        def one(key):
            path = brownian_path(
                self.kind, self.shape, self.ts, key, self.tol, self.levy_area
            )
            out = path.evaluate(t0, t1, left=left, use_levy=use_levy)
            # the areas' dt is one time step, shared (not batched) by the particles
            return (out.W, getattr(out, "H", None)) if use_levy else out

        out = jax.vmap(one)(self.keys)
        if not use_levy:
            return out
        w, h = out
        dt = jnp.asarray(t1 - t0, w.dtype)
        if h is None:
            return dfx.BrownianIncrement(dt=dt, W=w)
        return dfx.SpaceTimeLevyArea(dt=dt, W=w, H=h)
