r"""A grid Brownian path: fast, reverse-mode differentiable, batch-size invariant.

On a fixed time grid $t_0 < t_1 < \dots < t_N$ (sorted here, whatever direction the
solve runs in), the increment over cell $k$ is

$$W(t_{k+1}) - W(t_k) = \sqrt{t_{k+1} - t_k}\;\xi_k,\qquad
\xi_k = \texttt{normal}(\texttt{fold\_in}(\text{key}, k)).$$

It depends on the particle's key and the cell index only: not on the batch size,
the device count, or the bits of the float times (unlike `UnsafeBrownianPath`). It is
an ordinary function of its inputs, so it can be reverse-differentiated (unlike
`UnsafeBrownianPath`) and is as fast as drawing normals in a `lax.scan` loop (unlike
`VirtualBrownianTree`). It supports steps that are exactly grid cells (use
`diffrax.StepTo(ts)` or guidediff's fixed-grid driver); for adaptive steps use
`diffrax.VirtualBrownianTree`.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Key


class GridBrownianPath(dfx.AbstractBrownianPath):
    """Brownian motion on a fixed grid with increments from `(key, cell index)`.

    **Arguments:**

    - `shape`: the shape of one particle's state (a tuple or `jax.ShapeDtypeStruct`).
    - `ts`: the grid, increasing or decreasing.
    - `key`: the particle's key.
    """

    shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    grid: Float[Array, " n"]
    key: Key
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    def __init__(self, shape, ts: ArrayLike, key: Key):
        if not isinstance(shape, jax.ShapeDtypeStruct):
            shape = jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(float))
        self.shape = shape
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError("GridBrownianPath needs a 1-D grid of at least 2 times")
        self.grid = jnp.sort(ts)
        self.key = key
        self.levy_area = dfx.BrownianIncrement

    @property
    def t0(self):
        return self.grid[0]

    @property
    def t1(self):
        return self.grid[-1]

    def cell_increment(self, k, dt) -> Array:
        """$\\sqrt{|dt|}\\,\\xi_k$: the increment over cell `k` of (signed) length dt."""
        xi = jr.normal(jr.fold_in(self.key, k), self.shape.shape, self.shape.dtype)
        return (
            jnp.sign(dt).astype(xi.dtype) * jnp.sqrt(jnp.abs(dt)).astype(xi.dtype) * xi
        )

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if use_levy:
            raise ValueError("GridBrownianPath provides no Levy area: use Ito solvers")
        if t1 is None:
            raise ValueError(
                "GridBrownianPath gives increments over grid cells only; "
                "use diffrax.VirtualBrownianTree for point values (dense output)"
            )
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        mid = 0.5 * (lo + hi)
        k = jnp.clip(jnp.searchsorted(self.grid, mid) - 1, 0, self.grid.shape[0] - 2)
        cell = self.grid[k + 1] - self.grid[k]
        inc = self.cell_increment(k, t1 - t0)
        # An interval that is not one grid cell gets NaN increments, so every particle
        # of such a solve is flagged as failed by `gd.sample` (and by diffrax's own
        # NaN checks). A raising runtime check (eqx.error_if) would cost a
        # device-to-host sync per step on GPUs.
        bad = jnp.abs((hi - lo) - cell) > 1e-6 * jnp.maximum(cell, 1e-12) + 1e-12
        return jnp.where(bad, jnp.nan, inc)


class _StepIncrement(dfx.AbstractBrownianPath):
    """The increment of one known step, returned for whatever interval is asked.

    Used by guidediff's fixed-grid driver, which knows each step's cell index: it
    draws `GridBrownianPath.cell_increment(k, dt)` directly and hands the solver this
    one-step path, so no per-step search of the grid is needed (a `searchsorted`
    loop per step costs device-host round trips on GPUs).
    """

    increment: Array
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del t0, t1, left
        if use_levy:
            raise ValueError("no Levy area on a grid Brownian path: use Ito solvers")
        return self.increment
