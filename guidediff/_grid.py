r"""Fixed time grids for sampling, from the noise end $T$ down to $\varepsilon$."""

import math
import weakref

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._jit import is_real_scalar, reject_traced
from ._sde import AbstractSDE


def uniform_grid(t_start: float, t_end: float, num_steps: int) -> Float[Array, " n"]:
    r"""`num_steps + 1` equally spaced times from `t_start` to `t_end`:

    $$t_i = t_{start} + (t_{end} - t_{start})\,i/N,\qquad i = 0, \dots, N.$$

    The grid runs backwards in time, from the noise end down to the data end:
    `t_start > t_end >= 0`, both finite (checked when they are concrete).

    **Arguments:**

    - `t_start`: the noise end, usually `sde.T`.
    - `t_end`: the data end $\varepsilon$, a small positive time (e.g. `1e-3`).
    - `num_steps`: $N \ge 1$, a Python integer.

    **Returns:** the times, shape $(N + 1,)$, strictly decreasing.

    !!! example

        ```python
        ts = gd.uniform_grid(1.0, 1e-3, 10)
        assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 1e-3
        assert jnp.allclose(jnp.diff(ts), -(1.0 - 1e-3) / 10)  # equal steps
        ```
    """
    _check_steps(num_steps)
    _check_ends("uniform_grid", t_start, t_end)
    ts = jnp.linspace(t_start, t_end, num_steps + 1)
    ends = _host_ends("uniform_grid", t_start, t_end)
    gap = None if ends is None else (ends[0] - ends[1]) / num_steps
    _check_decreasing("uniform_grid", ts, num_steps, ends, gap)
    return ts


def quadratic_grid(t_start: float, t_end: float, num_steps: int) -> Float[Array, " n"]:
    r"""$t_i = t_{end} + (t_{start} - t_{end})(1 - i/N)^2$: finer near the data end.

    The ends are exactly `t_start` and `t_end`. Arguments, checks and the returned
    shape as in `uniform_grid`.

    !!! example

        ```python
        ts = gd.quadratic_grid(1.0, 1e-3, 10)
        assert ts.shape == (11,) and ts[0] == 1.0 and ts[-1] == 1e-3
        steps = -jnp.diff(ts)
        assert jnp.all(steps > 0) and jnp.all(jnp.diff(steps) < 0)  # shrinking
        ```
    """
    _check_steps(num_steps)
    _check_ends("quadratic_grid", t_start, t_end)
    # float ends keep their dtype, as in `uniform_grid` (jnp.linspace); computed in
    # at least float32 and rounded once (16-bit arithmetic would misplace the times
    # and can make neighbouring ones equal)
    dtype = jnp.result_type(t_start, t_end, float)
    work = jnp.promote_types(dtype, jnp.float32)
    u = 1.0 - jnp.arange(num_steps + 1, dtype=work) / num_steps
    lo, hi = jnp.asarray(t_end, work), jnp.asarray(t_start, work)
    ts = (lo + (hi - lo) * u**2).astype(dtype)
    # the ends exactly (the formula can round t_0 an ulp above t_start = sde.T,
    # which `sample` rejects as leaving the SDE's range)
    ts = ts.at[0].set(t_start).at[-1].set(t_end)
    ends = _host_ends("quadratic_grid", t_start, t_end)
    # the narrowest gap is the last: (t_start - t_end) / N^2
    gap = None if ends is None else (ends[0] - ends[1]) / num_steps**2
    _check_decreasing("quadratic_grid", ts, num_steps, ends, gap)
    return ts


def logsnr_grid(
    sde: AbstractSDE, t_start: float, t_end: float, num_steps: int
) -> Float[Array, " n"]:
    r"""Times equally spaced in log-SNR $\lambda(t) = \log(\alpha^2/\sigma^2)$.

    $\lambda$ is inverted by bisection (it is monotone decreasing in $t$). The
    times are differentiable in the SDE's parameters and the ends (the implicit
    function theorem: $\partial t = -(\partial\lambda(t) - \partial\lambda_k) /
    \lambda'(t)$), so `jax.grad` through samples on this grid sees the grid move.

    **Arguments:**

    - `sde`: the `gd.AbstractSDE` whose `log_snr` defines $\lambda$.
    - `t_start`: the noise end, usually `sde.T`.
    - `t_end`: the data end $\varepsilon > 0$ ($\lambda(0)$ is infinite: a
      `ValueError`).
    - `num_steps`: $N \ge 1$, a Python integer.

    **Returns:** the times, shape $(N + 1,)$, strictly decreasing from `t_start`
    to `t_end` exactly, with $\lambda(t_{i+1}) - \lambda(t_i)$ constant.

    !!! example

        ```python
        sde = gd.VPSDE()
        ts = gd.logsnr_grid(sde, sde.T, 1e-3, 10)
        assert ts.shape == (11,) and ts[0] == sde.T and ts[-1] == 1e-3
        assert jnp.all(jnp.diff(ts) < 0)
        dlam = jnp.diff(jax.vmap(sde.log_snr)(ts))  # equal steps in log-SNR
        assert jnp.allclose(dlam, dlam[0], rtol=1e-3)
        ```
    """
    _check_steps(num_steps)
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"logsnr_grid: sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got "
            f"{type(sde).__name__}"
        )
    lo_hi = _end_values("logsnr_grid", t_start, t_end)  # None: traced ends
    if lo_hi is not None:
        if not lo_hi[0] > lo_hi[1]:
            raise ValueError(
                "logsnr_grid runs from the noise end down to the data end: it needs "
                f"t_start > t_end, got {lo_hi[0]} and {lo_hi[1]}"
            )
        sde.check_time(lo_hi[0])  # e.g. t_start = 1 beyond a cosine SDE's T
        sde.check_time(lo_hi[1])
        # on the host (NumPy): jnp ops on constants are staged under jit
        start = np.asarray(lo_hi[0], _end_dtype(t_start))
        _check_below_one(sde, float(start), start.dtype)
        ends = [sde.log_snr(t) for t in lo_hi]
        if any(isinstance(e, jax.core.Tracer) for e in ends):
            ends = None  # a traced SDE (jit/grad/vmap over its parameters)
        else:
            ends = np.asarray(ends, np.float64)
        if ends is not None and not np.isfinite(ends[0]):
            raise ValueError(
                f"the log-SNR is not finite at t_start = {lo_hi[0]} ({ends[0]}; e.g. a "
                "T that rounds to 1, where alpha = 0): start the grid below that"
            )
        if ends is not None and not np.isfinite(ends[1]):
            raise ValueError(
                f"the log-SNR is not finite at the grid's ends ({ends[0]}, {ends[1]}; "
                "t_end = 0 has sigma = 0): end the grid at a small t_end > 0"
            )
    ts = _logsnr_times(sde, _as_array(t_start), _as_array(t_end), num_steps)
    ts = ts.at[0].set(t_start).at[-1].set(t_end)
    _check_decreasing("logsnr_grid", ts, num_steps)
    return ts


def _as_array(t):
    # Ends become strongly typed arrays (`filter_jit` would hold Python numbers as
    # static values: every new end compiled anew), of the end's own floating dtype
    # (canonical: np.float64 is float32 without x64) or the default float: a weakly
    # typed 1.0, an int 1 and np.float64(1.0) keyed one program each
    return jnp.asarray(t, _end_dtype(t))


def _end_dtype(t):
    """The dtype `_as_array` gives the end `t`."""
    dt = getattr(t, "dtype", None)
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.result_type(float)
    return jax.dtypes.canonicalize_dtype(dt)


@eqx.filter_jit
def _logsnr_times(sde: AbstractSDE, t_start, t_end, num_steps: int) -> Array:
    """The bisection of `logsnr_grid`, compiled once per SDE and `num_steps` (run
    eagerly, its loop's new closures compiled at every call)."""
    lam = jnp.linspace(sde.log_snr(t_start), sde.log_snr(t_end), num_steps + 1)

    def invert(target):
        def body(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            go_up = sde.log_snr(mid) > target  # too little noise: move towards t_start
            return jnp.where(go_up, mid, lo), jnp.where(go_up, hi, mid)

        lo, hi = jax.lax.fori_loop(
            0,
            100,
            body,
            (jnp.asarray(t_end, lam.dtype), jnp.asarray(t_start, lam.dtype)),
        )
        t = lax.stop_gradient(0.5 * (lo + hi))
        # The bisection only selects between constants: its derivative would be 0.
        # The implicit function theorem gives dt = -(d lambda - d target) /
        # lambda'(t) (the grid moves with the schedule's parameters and the ends);
        # added as a term whose value is 0, so the times stay the bisection's.
        slope = lax.stop_gradient(jax.grad(sde.log_snr)(t))
        step = (sde.log_snr(t) - target) / slope
        return t - (step - lax.stop_gradient(step))

    ts = jax.vmap(invert)(lam)
    return ts


def _end_values(name: str, t_start, t_end) -> tuple[float, float] | None:
    """The ends as floats, None if either is traced; a `TypeError` unless each is
    a real scalar (a Python or NumPy number, or a 0-d real array)."""
    values = []
    for label, t in (("t_start", t_start), ("t_end", t_end)):
        if not is_real_scalar(t):
            shape = f" of shape {np.shape(t)}" if hasattr(t, "dtype") else ""
            raise TypeError(
                f"{name}: {label} must be a real scalar time, got "
                f"{type(t).__name__}{shape} {t!r}"
            )
        values.append(None if isinstance(t, jax.core.Tracer) else float(t))
    return None if None in values else (values[0], values[1])


def _check_decreasing(
    name: str, ts, num_steps: int, ends=None, gap: float | None = None
) -> None:
    """A concrete grid must be strictly decreasing: ends too close for the dtype
    (or for float64) round neighbouring times together.

    With the ends as Python floats and `gap`, the exact grid's narrowest spacing,
    decided on the host when `gap` is many times the dtype's resolution at the
    ends (rounding each time by a few ulps cannot close it): the grid is not read
    back. Reading a new device array waits for all the work queued before it (in a
    loop, the previous call's samples). Otherwise the grid is read and checked.
    Either way the grid is remembered as checked (`check_grid` does not read it)."""
    if isinstance(ts, jax.core.Tracer):
        return
    if ends is not None and gap is not None and _spacing_resolved(ends, gap, ts.dtype):
        remember_grid(ts, *(np.asarray(e, ts.dtype)[()] for e in ends))
        return
    arr = np.asarray(ts)
    # (compared, not differenced: np.diff wraps around for unsigned integers)
    if not np.all(arr[1:] < arr[:-1]):
        bad = int(np.argmax(arr[1:] >= arr[:-1]))
        raise ValueError(
            f"{name}: {num_steps} steps from {arr[0]} to {arr[-1]} in {arr.dtype} "
            f"repeat times (ts[{bad}] = {arr[bad]}, ts[{bad + 1}] = {arr[bad + 1]}): "
            "the ends are too close for this many steps in this dtype; use fewer "
            "steps, ends further apart or a wider dtype"
        )
    remember_grid(ts, arr[0], arr[-1])


def _host_ends(name: str, t_start, t_end) -> tuple[float, float] | None:
    """The ends as Python floats for the host-side checks, None if traced or if
    an end is not what JAX computes with: an integer beyond float64's exact
    integers (rounded twice) or beyond JAX's integer type (int32 without x64:
    wrapped), or a float subnormal in its own dtype (a device cast, say float32 to
    float64 under x64, flushes it to zero; the host keeps it)."""
    for t in (t_start, t_end):
        dtype = getattr(t, "dtype", None)
        if (
            dtype is not None
            and jnp.issubdtype(dtype, jnp.floating)
            and not isinstance(t, jax.core.Tracer)
        ):
            value = abs(float(t))
            if 0 < value < float(jnp.finfo(dtype).tiny):
                return None
        integer = isinstance(t, int | np.integer) or (
            dtype is not None and jnp.issubdtype(dtype, jnp.integer)
        )
        if integer and not isinstance(t, jax.core.Tracer):
            int_dtype = np.int64 if dtype is None else dtype  # (a dtype is falsy)
            info = np.iinfo(jax.dtypes.canonicalize_dtype(int_dtype))
            if abs(int(t)) > 2**53 or not info.min <= int(t) <= info.max:
                return None
    return _end_values(name, t_start, t_end)


def _spacing_resolved(ends, gap: float, dtype) -> bool:
    """Whether a grid between `ends` (Python floats) whose exact spacing is at least
    `gap` is certainly strictly decreasing in `dtype`, its ends exactly `ends`
    rounded to `dtype`: a float32 or float64 grid (a 16-bit one is computed in
    float32 and rounded twice), both ends finite there, each 0 or a normal number
    (CPUs flush subnormal results to zero), and `gap` many times both the
    resolution at the ends (each time is rounded by a few ulps) and the smallest
    normal number (every time but a zero end is normal)."""
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return False
    info = jnp.finfo(dtype)
    eps, tiny = float(info.eps), float(info.tiny)
    with np.errstate(over="ignore"):  # an end beyond the dtype's range: inf
        rounded = [float(np.asarray(e, dtype)) for e in ends]
    if not all(math.isfinite(e) and (e == 0 or abs(e) >= tiny) for e in rounded):
        return False
    return gap > 16 * max(eps * max(abs(e) for e in ends), tiny)


def _check_ends(name: str, t_start, t_end) -> None:
    """Ends must be real scalars; concrete ones finite with `t_start > t_end >= 0`
    (traced ends are the caller's; `sample` checks the grid it is given)."""
    lo_hi = _end_values(name, t_start, t_end)
    if lo_hi is None:
        return
    if not np.all(np.isfinite(lo_hi)):
        raise ValueError(f"{name}: the grid's ends must be finite, got {lo_hi}")
    if not lo_hi[0] > lo_hi[1] >= 0:
        raise ValueError(
            f"{name} runs from the noise end down to the data end: it needs "
            f"t_start > t_end >= 0, got t_start={lo_hi[0]}, t_end={lo_hi[1]}"
        )


def _check_steps(num_steps) -> int:
    """A positive Python/NumPy integer (not a bool, a float or a string)."""
    reject_traced("num_steps", num_steps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise TypeError(f"num_steps must be a positive int, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return int(num_steps)


def _check_grid_shape(shape: tuple, dtype=None) -> None:
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(
            f"the time grid must be 1-D with at least 2 times, got {shape}"
        )
    if dtype is not None and not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise TypeError(f"the time grid must hold real times, got dtype {dtype}")


# Grids known to be valid, by identity while they live: id -> (weakref, first time,
# last time, the times on the host or None). The grid constructors above remember what they made (checked on the
# host where they can), and `check_grid` what it read: a grid is read back at most
# once, and a grid made per call (`ts=None`, or `uniform_grid` inline) not at all.
_GRID_FACTS: dict = {}
_MAX_GRID_FACTS = 64


def remember_grid(ts, first: np.generic, last: np.generic, host=None) -> None:
    if not isinstance(ts, jax.Array) or isinstance(ts, jax.core.Tracer):
        return
    if len(_GRID_FACTS) >= _MAX_GRID_FACTS:  # drop the dead, then the oldest
        for key in [k for k, v in _GRID_FACTS.items() if v[0]() is None]:
            del _GRID_FACTS[key]
        while len(_GRID_FACTS) >= _MAX_GRID_FACTS:
            del _GRID_FACTS[next(iter(_GRID_FACTS))]
    if host is not None:
        host = np.array(host)  # a read-only copy: callers share it
        host.flags.writeable = False
    _GRID_FACTS[id(ts)] = (weakref.ref(ts), first, last, host)


def grid_ends(ts) -> tuple[np.generic, np.generic] | None:
    """The first and last times (NumPy scalars of the grid's dtype) of a grid known
    to be valid (made by a constructor here or read by `check_grid`), without
    reading it; None if unknown."""
    hit = _GRID_FACTS.get(id(ts))
    if hit is not None and hit[0]() is ts:
        return hit[1], hit[2]
    return None


def grid_values(ts) -> np.ndarray:
    """A concrete grid's times on the host: the copy remembered with a grid made
    from host values (a NumPy grid given to `sample`), else read from the array."""
    hit = _GRID_FACTS.get(id(ts))
    if hit is not None and hit[0]() is ts and hit[3] is not None:
        return hit[3]
    return np.asarray(ts)


def _check_below_one(sde: AbstractSDE, t0, dtype) -> None:
    """A clear error where a schedule singular at t = 1 would start at 1: `T < 1`
    itself, but rounded to the grid's dtype (`T = 1 - 1e-8` in float32)."""
    schedule = getattr(sde, "schedule", None)
    if getattr(schedule, "singular_at_one", False) and t0 >= 1:
        raise ValueError(
            f"the time grid starts at t = 1 in {dtype} (sde.T = {sde.T} rounds to 1 "
            f"there), where {type(schedule).__name__} is singular (alpha = 0, beta = "
            "inf): use a T that float32 resolves below 1, e.g. the default "
            f"{schedule.default_T}"
        )


def check_grid(sde: AbstractSDE, ts) -> float | None:
    """Clear errors for a grid that is not strictly decreasing from the noise end
    towards the data, or that leaves the SDE's time range `[0, T]`.

    Returns the grid's last time (None for a traced grid). A device array is read
    at most once: one that passed, or that a grid constructor made, is remembered
    (by identity, while it lives), and only its ends are checked against this SDE.
    Reading a new device array waits for all the work queued before it."""
    if isinstance(ts, jax.core.Tracer):
        _check_grid_shape(ts.shape, ts.dtype)  # known when traced
        return None  # its values: checked by the caller's own tests
    if isinstance(ts, jax.Array):
        ends = grid_ends(ts)
        if ends is not None:
            _check_grid_shape(ts.shape)
            _check_in_range(sde, *ends, ts.dtype)
            return float(ends[1])
    try:
        arr = np.asarray(ts)
    except (TypeError, jax.errors.TracerArrayConversionError):
        return None  # traced: checked by the caller's own tests
    _check_grid_shape(arr.shape, arr.dtype)
    if not np.all(np.isfinite(arr)):
        raise ValueError("the time grid contains non-finite times")
    # (compared, not differenced: np.diff wraps around for unsigned integers)
    if not np.all(arr[1:] < arr[:-1]):
        bad = int(np.argmax(arr[1:] >= arr[:-1]))
        raise ValueError(
            "the time grid must be strictly decreasing (from the noise end T to the data "
            f"end), but ts[{bad}]={arr[bad]} <= ts[{bad + 1}]={arr[bad + 1]}"
        )
    _check_in_range(sde, arr[0], arr[-1], arr.dtype)
    remember_grid(ts, arr[0], arr[-1])
    return float(arr[-1])


def _check_in_range(sde: AbstractSDE, first, last, dtype) -> None:
    """A valid grid's ends within the SDE's time range `[0, T]` (and below a
    singular schedule's 1)."""
    try:
        T = float(sde.T)
    except (TypeError, jax.errors.ConcretizationTypeError):
        T = None  # a traced T (a custom SDE under jit): its end is checked on device
    if last < 0 or (T is not None and first > T * (1 + 1e-12)):
        raise ValueError(
            f"the time grid [{first}, ..., {last}] leaves the SDE's range "
            f"[0, {'T' if T is None else T}]"
        )
    _check_below_one(sde, first, dtype)
