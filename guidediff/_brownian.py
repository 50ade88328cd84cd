r"""A grid Brownian path: fast, reverse-mode differentiable, batch-size invariant.

On a fixed time grid $t_0 < t_1 < \dots < t_N$ (sorted here, whatever direction the
solve runs in), the increment over cell $k$ is

$$W(t_{k+1}) - W(t_k) = \sqrt{t_{k+1} - t_k}\;\xi_k,\qquad
\xi_{k,j} = \sqrt 2\,\operatorname{erf}^{-1}(u_{k,j}),$$

where the uniforms $u_{k,\cdot}$ come from Threefry-2x32 run in counter mode on the
particle's key with the counters $(k, 0), (k, 1), \dots$: one block of two 32-bit
words per two float32 values, as `jax.random.normal` draws a whole batch, with no
per-particle, per-step key derivation (`fold_in`), which would cost one more hash
per particle per step. Keys of other PRNG implementations (`rbg`, `unsafe_rbg`) are
first reduced to a Threefry key hashed from their data (`threefry_key`): JAX draws a
`vmap`-ped batch of such keys from the first key alone (the batching rule of
`lax.rng_bit_generator`), so `normal(key)` under `vmap` would not be the per-key
draw, and samples would change with how particles are batched.

It depends on the particle's key and the cell index only: not on the batch size,
the device count, or the bits of the float times (unlike `UnsafeBrownianPath`). It is
an ordinary function of its inputs, so it can be reverse-differentiated (unlike
`UnsafeBrownianPath`) and is as fast as drawing normals in a `lax.scan` loop (unlike
`VirtualBrownianTree`). It supports steps that are exactly grid cells (use
`diffrax.StepTo(ts)` or guidediff's fixed-grid driver); for adaptive steps use
`diffrax.VirtualBrownianTree`.
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.extend.random import threefry_2x32
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Key


_HASH_IV = (0x67756964, 0x65646966)  # "guid", "edif": the hash's initial state


def check_key(key) -> None:
    """A clear `TypeError` unless `key` is one PRNG key: a typed key of shape `()`
    or raw `uint32` key data of shape `(m,)`, m >= 1. Reads only the shape and
    dtype (no device work), so entry points call it before compiling."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise TypeError(
                f"expected one PRNG key, got a key array of shape {key.shape}; "
                "for a batch of keys use jax.vmap"
            )
        return
    if not isinstance(key, jax.Array | np.ndarray):
        raise TypeError(
            "expected one PRNG key (jax.random.key(seed)) or raw uint32 key data, "
            f"got {type(key).__name__} {key!r}"
        )
    if dtype != jnp.uint32 or key.ndim != 1 or key.shape[0] == 0:
        batch = dtype == jnp.uint32 and key.ndim == 2
        raise TypeError(
            "expected one PRNG key (jax.random.key(seed)) or raw uint32 key data of "
            f"shape (m,), got an array of dtype {dtype} and shape {key.shape}"
            + ("; for a batch of keys use jax.vmap" if batch else "")
        )


def threefry_key(key: Key) -> Key:
    r"""A Threefry key standing for `key`, itself when it already is one.

    Typed Threefry keys pass through; raw `uint32[2]` keys (`jax.random.PRNGKey`) are
    wrapped. Keys of other implementations, typed or raw `uint32[m]`, are hashed
    from their data with Threefry-2x32 as a Davies-Meyer compression (state
    $h \leftarrow E_{b}(h) \oplus h$ for each 2-word block $b$ of the data), an
    elementwise function of one key, so it commutes with `vmap`, unlike the
    `rbg`/`unsafe_rbg` generators themselves (whose batching rule draws a whole
    batch from its first key).
    """
    check_key(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jr.key_impl(key)) == "threefry2x32":
            return key
        data = jr.key_data(key)
    else:
        data = jnp.asarray(key)
        if data.shape == (2,):
            return jr.wrap_key_data(data, impl="threefry2x32")
    words = data.reshape(-1).astype(jnp.uint32)
    if words.shape[0] % 2:
        words = jnp.concatenate([words, jnp.zeros((1,), jnp.uint32)])
    h = jnp.asarray(_HASH_IV, jnp.uint32)
    for i in range(0, words.shape[0], 2):
        h = threefry_2x32(words[i : i + 2], h) ^ h
    return jr.wrap_key_data(h, impl="threefry2x32")


def cell_normal(key: Key, k, shape: tuple[int, ...], dtype, stream: int = 0) -> Array:
    r"""Standard normals for grid cell `k` of the particle with key `key`.

    Threefry-2x32 in counter mode: block $j$ hashes the counter $(k, j)$ under the
    key (`threefry_key(key)`), giving two 32-bit words (`stream=1`, the space-time
    Levy areas, hashes $(k + 2^{31}, j)$ instead: independent of the increments); float32 values use one word
    each, float64 two (16-bit floats are drawn in float32 and rounded). The words become uniforms on
    $(-1, 1)$ from their top mantissa bits and normals through
    $\sqrt2\,\mathrm{erf}^{-1}$, as `jax.random.normal` does.
    """
    # float64 without jax_enable_x64 is float32, as for JAX's own arrays
    dtype = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
    data = jr.key_data(threefry_key(key))
    gen = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
    nbits = 8 * gen.itemsize
    n = math.prod(shape)
    words = n * (nbits // 32)
    blocks = (words + 1) // 2
    cell = jnp.asarray(k).astype(jnp.uint32) | jnp.uint32(stream << 31)
    counts = jnp.concatenate(
        [
            jnp.full((blocks,), cell, jnp.uint32),
            jnp.arange(blocks, dtype=jnp.uint32),
        ]
    )
    bits = threefry_2x32(data, counts)[:words]
    if nbits == 64:
        hi, lo = bits[0::2].astype(jnp.uint64), bits[1::2].astype(jnp.uint64)
        bits, utype = (hi << jnp.uint64(32)) | lo, jnp.uint64
    else:
        utype = jnp.uint32
    finfo = jnp.finfo(gen)
    one = lax.bitcast_convert_type(jnp.ones((), gen), utype)
    shift = utype(nbits - finfo.nmant)
    unit = lax.bitcast_convert_type((bits >> shift) | one, gen) - 1  # [0, 1)
    lo = jnp.nextafter(jnp.asarray(-1.0, gen), jnp.asarray(0.0, gen))
    u = jnp.maximum(lo, unit * (1 - lo) + lo)  # [lo, 1): never -1
    xi = jnp.sqrt(jnp.asarray(2.0, gen)) * lax.erf_inv(u)
    return xi.reshape(shape).astype(dtype)


class GridBrownianPath(dfx.AbstractBrownianPath):
    r"""Brownian motion on a fixed grid with increments from `(key, cell index)`.

    Over grid cell $k$, $[t_k, t_{k+1}]$, the increment is
    $W_{t_{k+1}} - W_{t_k} = \sqrt{|t_{k+1} - t_k|}\,\xi_k$ with
    $\xi_k \sim \mathcal N(0, I)$ = `cell_normal(key, k, ...)` (Threefry-2x32 in
    counter mode on `(k, block)` under the particle's key, no `fold_in`): independent
    across cells, reproducible, reverse-differentiable (no hidden state), and a
    particle's path does not depend on the batch it is in. Queries must be whole grid cells (a
    `diffrax.StepTo` grid): any other interval gets NaN increments (so its
    particles fail visibly), and point values are an error.

    With `levy_area=diffrax.SpaceTimeLevyArea` (for diffrax's stochastic Runge-Kutta
    solvers, e.g. `diffrax.ShARK()`) each cell also has its space-time Levy area
    $H_k = \sqrt{|t_{k+1} - t_k| / 12}\;\eta_k$, $\eta_k \sim \mathcal N(0, I)$
    independent of $\xi_k$ (`cell_normal(..., stream=1)`), the law of
    $\frac1h\int (W_u - W_{t_k} - \frac{u - t_k}{h} W_{t_k, t_{k+1}})\,du$. A query
    against the grid's order returns the cell's `(dt, W, H)` negated, diffrax's
    convention for reversed time (`diffrax.diffeqsolve` from `t0 > t1` asks for the
    forward cell and negates it), so both of `gd.sample`'s drivers see the same
    values. Run such solvers through `gd.sample` (its `"scan"` driver): inside
    `diffrax.diffeqsolve` from `t0 > t1` diffrax's SRK steps are wrong (diffrax
    issue #598, in 0.7.2: a sample standard deviation of about 840 for 0.5), with
    this path or diffrax's own.

    **Arguments:**

    - `shape`: the shape of one particle's state (a tuple or `jax.ShapeDtypeStruct`).
    - `ts`: the grid, increasing or decreasing.
    - `key`: the particle's key.
    - `levy_area`: `diffrax.BrownianIncrement` (default) or
      `diffrax.SpaceTimeLevyArea`.

    See `gd.reverse_sde` for an example with `diffrax.diffeqsolve`.
    """

    shape: jax.ShapeDtypeStruct = eqx.field(static=True)
    grid: Float[Array, " n"]
    key: Key
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    def __init__(
        self, shape, ts: ArrayLike, key: Key, levy_area: type = dfx.BrownianIncrement
    ):
        if levy_area not in (dfx.BrownianIncrement, dfx.SpaceTimeLevyArea):
            raise ValueError(
                "GridBrownianPath's levy_area must be diffrax.BrownianIncrement or "
                f"diffrax.SpaceTimeLevyArea, got {levy_area!r}"
            )
        if not isinstance(shape, jax.ShapeDtypeStruct):
            shape = jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(float))
        self.shape = shape
        ts = jnp.asarray(ts)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError("GridBrownianPath needs a 1-D grid of at least 2 times")
        self.grid = jnp.sort(ts)
        self.key = key
        self.levy_area = levy_area

    @property
    def t0(self):
        return self.grid[0]

    @property
    def t1(self):
        return self.grid[-1]

    def cell_increment(self, k, dt) -> Array:
        """$\\sqrt{|dt|}\\,\\xi_k$: the increment over cell `k` of (signed) length dt.

        16-bit paths compute it in float32 and round it once."""
        dtype = self.shape.dtype
        gen = jnp.promote_types(dtype, jnp.float32)
        xi = cell_normal(self.key, k, self.shape.shape, gen)
        scale = jnp.sign(dt).astype(gen) * jnp.sqrt(jnp.abs(dt)).astype(gen)
        return (scale * xi).astype(dtype)

    def cell_area(self, k, dt) -> Array | None:
        r"""$\operatorname{sign}(dt)\sqrt{|dt|/12}\,\eta_k$: the space-time Levy area
        of cell `k` (signed as the increment is), or `None` without one."""
        if self.levy_area is not dfx.SpaceTimeLevyArea:
            return None
        dtype = self.shape.dtype
        gen = jnp.promote_types(dtype, jnp.float32)
        eta = cell_normal(self.key, k, self.shape.shape, gen, stream=1)
        scale = jnp.sign(dt).astype(gen) * jnp.sqrt(jnp.abs(dt) / 12).astype(gen)
        return (scale * eta).astype(dtype)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
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
        inc = jnp.where(bad, jnp.nan, inc)
        if not use_levy:
            return inc
        area = self.cell_area(k, t1 - t0)
        return _levy(
            t1 - t0, inc, None if area is None else jnp.where(bad, jnp.nan, area)
        )


def unwrap_solver(solver):
    """The solver inside diffrax's wrappers (`diffrax.HalfSolver`), which forward
    `isinstance` checks to it (a diffrax metaclass) but not its attributes."""
    while isinstance(solver, dfx.AbstractWrappedSolver):
        solver = solver.solver
    return solver


def levy_area_for(solver) -> type:
    """The Brownian increment object `solver` needs: `diffrax.SpaceTimeLevyArea`
    for diffrax's stochastic Runge-Kutta solvers (their `minimal_levy_area`),
    else `diffrax.BrownianIncrement`. Space-time-time areas are refused."""
    need = getattr(unwrap_solver(solver), "minimal_levy_area", dfx.BrownianIncrement)
    if issubclass(need, dfx.AbstractSpaceTimeTimeLevyArea):
        raise ValueError(
            f"{type(solver).__name__} needs space-time-time Levy areas, which "
            "gd.sample's Brownian paths do not provide; solvers that need space-time "
            "Levy areas (diffrax.ShARK, SEA, SRA1, SPaRK, GeneralShARK, SlowRK) work"
        )
    if issubclass(need, dfx.AbstractSpaceTimeLevyArea):
        return dfx.SpaceTimeLevyArea
    return dfx.BrownianIncrement


def _levy(dt, w, h):
    """diffrax's increment object: `BrownianIncrement(dt, W)` without an area `h`,
    else `SpaceTimeLevyArea(dt, W, H)`."""
    dt = jnp.asarray(dt, w.dtype)
    if h is None:
        return dfx.BrownianIncrement(dt=dt, W=w)
    return dfx.SpaceTimeLevyArea(dt=dt, W=w, H=h)


class _StepIncrement(dfx.AbstractBrownianPath):
    """The increment of one known step `[step_t0, step_t1]`.

    Used by guidediff's fixed-grid driver, which knows each step's cell index: it
    draws `GridBrownianPath.cell_increment(k, dt)` directly and hands the solver this
    one-step path, so no per-step search of the grid is needed (a `searchsorted`
    loop per step costs device-host round trips on GPUs). Any other interval (a
    solver asking for part of the step, e.g. `diffrax.HalfSolver`) gets NaN, as
    from `GridBrownianPath`: its particles are flagged as failed, never given the
    whole step's noise twice.
    """

    increment: Array
    step_t0: Array
    step_t1: Array
    area: Array | None = None
    levy_area: type = eqx.field(static=True, default=dfx.BrownianIncrement)

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        del left
        if t1 is None:
            raise ValueError(
                "the grid Brownian path gives increments over grid cells only; "
                "use diffrax.VirtualBrownianTree for point values (dense output)"
            )
        if t0 is self.step_t0 and t1 is self.step_t1:
            # The driver's own step times (the same traced values: diffrax's Euler
            # passes them through): the interval is the cell by construction, so no
            # per-step compare-and-select is traced (XLA cannot fold `t == t`).
            inc, area = self.increment, self.area
        else:
            same = (t0 == self.step_t0) & (t1 == self.step_t1)
            inc = jnp.where(same, self.increment, jnp.nan)
            area = None if self.area is None else jnp.where(same, self.area, jnp.nan)
        if not use_levy:
            return inc
        return _levy(t1 - t0, inc, area)
