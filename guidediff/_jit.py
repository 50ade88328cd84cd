"""`filter_jit`: compile a function of a pytree, dispatching asynchronously.

Like `equinox.filter_jit` (array leaves are traced, every other leaf is static and
must be hashable), but the call returns as soon as the program is enqueued, as
`jax.jit` does. `equinox.filter_jit` waits for every call to finish (it blocks on an
output to surface `eqx.error_if` failures), so a Python loop of `gd.sample` calls
could not overlap host work with the device's, and each call paid a round trip.
The entry points compiled here raise no runtime errors: failures are flagged in
their outputs (`Samples.failed`).

Also the argument checks that follow from it: which values may be traced
(`is_real_scalar`) and which fix the program and must not be (`reject_traced`).
"""

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)  # what `eqx.is_array` accepts


def _partition(tree: Any) -> tuple[tuple, tuple]:
    leaves, treedef = jtu.tree_flatten(tree)
    arrays = [isinstance(x, _ARRAY_TYPES) for x in leaves]
    dynamic = tuple(x if a else None for x, a in zip(leaves, arrays, strict=True))
    # each static leaf with its type: 2, 2.0 and True are equal and hash alike, but
    # may trace different programs (x // 2 vs x / 2.0)
    static = tuple(
        None if a else (type(x), x) for x, a in zip(leaves, arrays, strict=True)
    )
    return dynamic, (static, treedef)


def _combine(dynamic: tuple, static: tuple) -> Any:
    static_leaves, treedef = static
    leaves = [
        d if s is None else s[1] for d, s in zip(dynamic, static_leaves, strict=True)
    ]
    return jtu.tree_unflatten(treedef, leaves)


def is_real_scalar(value) -> bool:
    """A real Python/NumPy number or a 0-d real (integer or floating) array, traced
    or not; not a bool, a string or None."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        real = isinstance(value, int | float | np.integer | np.floating)
    else:
        real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    return real and not isinstance(value, bool) and np.ndim(value) == 0


def reject_traced(name: str, value, kind: str = "a Python int") -> None:
    """A `TypeError` for a traced value of an argument that fixes the program (a
    count, a shape, a flag): say it is static, and how to keep it so under jit."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} is static (it fixes the compiled program's shapes or structure) "
            f"and must be {kind}, not a traced value: under jax.jit, close over it "
            "or mark it static (static_argnums / static_argnames)"
        )


def _over_concrete(x) -> bool:
    """A tracer of an eager transformation (`jax.grad`, `jax.vmap`, `jax.jvp`
    called outside `jit`): a concrete value underneath. Each call of the transformed
    function traces everything in it anew."""
    if not isinstance(x, jax.core.Tracer):
        return False
    while isinstance(x, jax.core.Tracer):
        inner = getattr(x, "primal", None)
        x = getattr(x, "val", None) if inner is None else inner
    return isinstance(x, (*_ARRAY_TYPES, int, float, complex))


_RETRACED_CODE: dict = {}  # code objects of closures over eager tracers (bounded)


def warn_if_retraced(fn, what: str) -> None:
    """Warn when a plain function that closes over an eager transformation's traced
    value is built a second time from the same code: held as a static part of the
    compiled program, each new function compiles the program again (seconds per
    call in a `jax.grad` loop), though nothing about the program changed."""
    cells = getattr(fn, "__closure__", None)
    code = getattr(fn, "__code__", None)
    if not cells or code is None:
        return
    contents = []
    for cell in cells:
        try:
            contents.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    if not any(_over_concrete(x) for x in jtu.tree_leaves(contents)):
        return
    seen = code in _RETRACED_CODE
    _RETRACED_CODE[code] = None
    if len(_RETRACED_CODE) > 64:
        del _RETRACED_CODE[next(iter(_RETRACED_CODE))]
    if seen:
        warnings.warn(
            f"{what} is a plain Python function that closes over a value traced by "
            "jax.grad / jax.vmap (such as the weight being differentiated). A plain "
            "function is a static part of the compiled sampler, so each call builds "
            "a new one and compiles the sampler again. Make the value an array leaf "
            "instead: jax.tree_util.Partial(lambda a, t: a * (1 - t), a), a "
            "gd.PiecewiseLinear schedule, or jax.jit the transformed function",
            stacklevel=4,
        )


def filter_jit(fun: Callable) -> Callable:
    """`fun(*args)` compiled once per static structure; array leaves are traced.

    A static leaf that is not hashable raises jax's error for unhashable static
    arguments. Keyword arguments are not supported (the entry points take none).
    """

    @functools.partial(jax.jit, static_argnums=1)
    def compiled(dynamic, static):
        return fun(*_combine(dynamic, static))

    @functools.wraps(fun)
    def call(*args):
        dynamic, static = _partition(args)
        return compiled(dynamic, static)

    call._cached = compiled  # the jitted function (its `_cache_size()` for tests)
    return call
