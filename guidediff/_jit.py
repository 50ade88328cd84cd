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

import collections
import functools
import os
import sys
import threading
import types
import warnings
import weakref
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


def _full(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


class StaticFloat(float):
    """A float option that fixes the compiled program on purpose (e.g. the
    Brownian tree's tolerance, which sets its depth): the recompile warning does
    not count its new values, as it counts those of a module's float field."""


def _code_key(obj, functions: list, depth: int = 0, floats: bool = True):
    """`obj` (the static part of a compiled call) with every plain function
    replaced by its code object (and appended to `functions`), a
    `functools.partial` by its function's code and arguments, recursively through
    tuples, lists, dicts and tree structures, and every Python float by a
    placeholder (also appended). Two statics with equal code keys differ at most
    in function objects of the same code (a lambda or closure built anew for each
    call) and in the values of Python floats that are pytree leaves (a module's
    float field). Floats in a tree structure's node data (fields declared
    `eqx.field(static=True)`, such as an SDE's `T`) are static by the user's
    choice and part of the key; so are `StaticFloat` options."""
    if depth > 64:
        raise TypeError("too deep (a cycle?)")  # note_trace gives up
    d = depth + 1
    if floats and type(obj) is float:
        functions.append(obj)
        return "<float>"
    if isinstance(obj, types.FunctionType):
        functions.append(obj)
        # the functions it wraps (jax.checkpoint(f), a decorator, a factory's
        # argument): different functions behind one wrapper are not one code
        inner = [c.cell_contents for c in obj.__closure__ or () if _full(c)]
        inner = [f for f in inner if isinstance(f, types.FunctionType)]
        return ("<code>", obj.__code__, tuple(_code_key(f, [], d) for f in inner))
    if isinstance(obj, functools.partial):
        parts = (obj.func, obj.args, obj.keywords)
        return ("<partial>", *(_code_key(x, functions, d, floats) for x in parts))
    if isinstance(obj, jtu.PyTreeDef):
        children = tuple(_code_key(c, functions, d, floats) for c in obj.children())
        data = _code_key(obj.node_data(), functions, d, floats=False)
        return ("<treedef>", data, children)
    if isinstance(obj, tuple | list):
        return (type(obj), *(_code_key(x, functions, d, floats) for x in obj))
    if isinstance(obj, dict):
        items = ((k, _code_key(v, functions, d, floats)) for k, v in obj.items())
        return (dict, *items)
    return obj


# code key -> (weak references to the function objects and the floats traced with
# it, the last few of each; the number of traces with new functions and with new
# floats, each counting the first)
_TRACED: collections.OrderedDict = collections.OrderedDict()
_TRACED_LOCK = threading.Lock()
_MAX_TRACED = 64
_MAX_SEEN = 8  # the function objects and float values remembered per program
_OWN_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep for m in (jax, np, functools)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _user_stacklevel() -> int:
    """The `stacklevel` of the innermost frame outside guidediff, jax and the
    standard library: the user's line that led to the trace."""
    frame, level = sys._getframe(1), 1  # the caller, as warn counts it
    while frame is not None and (
        frame.f_code.co_filename.startswith(_OWN_DIRS)
        or frame.f_code.co_filename.startswith("<frozen")
        or "/site-packages/" in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level


def note_trace(name: str, static, avals=()) -> None:
    """Called while tracing a program for `static`: warn when programs were traced
    twice before for statics that differ from this one only in function objects of
    the same code, or only in the values of Python floats. A plain function is a
    static part of the program (as for `jax.jit`'s static arguments), so a lambda
    or closure built anew for each call (a weight schedule over the value
    `jax.grad` differentiates, an SMC potential written inline) compiles the
    program again on every call; so does a new value of a Python float field of a
    module (a guidance's `k: float`), which is not an array leaf."""
    found: list = []
    new_fn = new_floats = False
    try:  # a diagnostic: whatever goes wrong here, the call goes on
        # (the shapes too: a new shape is a new program, not a wasted one)
        key = (name, _code_key(static, found), avals)
        if not found:
            return
        functions = [f for f in found if type(f) is not float]
        # a float by its bits; a NaN by its object (JAX's cache tells NaN objects
        # apart: nan != nan), so a new NaN per call counts as a new value
        floats = tuple(
            float.hex(f) if f == f else ("nan", id(f))
            for f in found
            if type(f) is float
        )
        with _TRACED_LOCK:
            seen_fn, seen_floats, n_fn, n_float = _TRACED.pop(key, ((), (), 0, 0))
            # a kind counts when it is new to this program: not among the function
            # objects (by identity: a dead function's id is reused by the next) or
            # the float values traced before (a trace for another reason, e.g. a
            # transformation, or the other kind's change, does not count for it)
            new_fn = not any(
                all(r() is f for r, f in zip(refs, functions, strict=True))
                for refs in seen_fn
            )
            new_floats = floats not in seen_floats
            n_fn += new_fn
            n_float += new_floats
            seen_fn = (*seen_fn, tuple(map(weakref.ref, functions)))[-_MAX_SEEN:]
            seen_floats = (*seen_floats, floats)[-_MAX_SEEN:]
            _TRACED[key] = (seen_fn, seen_floats, n_fn, n_float)
            while len(_TRACED) > _MAX_TRACED:
                _TRACED.popitem(last=False)
    except Exception:
        return
    # the third: a first call and a first call under jax.jit compile twice anyway
    # only a trace that is new in that kind warns (a retrace after
    # jax.clear_caches(), or for the other kind's change, does not)
    if new_fn and n_fn >= 3:
        warnings.warn(
            f"{name} is compiling again, a third time at least, for new function "
            "objects with the same code as before (a lambda or closure built "
            "anew in each call?). A plain function is a static part of the "
            "compiled program, so each new one compiles it again, seconds per "
            "call. Define the function once, outside the loop; numbers it closes "
            "over can be array leaves instead: gd.PiecewiseLinear for a weight "
            "schedule, or jax.tree_util.Partial(f, a) with f defined once (under "
            "jax.grad, or jax.jit the differentiated function)",
            stacklevel=_user_stacklevel(),
        )
    if new_floats and n_float >= 3:
        warnings.warn(
            f"{name} is compiling again, a third time at least, for new values of a "
            "Python float in its arguments (a float field of a guidance, score, "
            "SDE or solver module, e.g. `k: float`). A Python float is a static "
            "part of the compiled program, so each new value compiles it again, "
            "seconds per call. Make such a number an array leaf: `k: jax.Array = "
            "eqx.field(converter=jnp.asarray)` in a module, or pass "
            "jnp.asarray(value)",
            stacklevel=_user_stacklevel(),
        )


def filter_jit(fun: Callable) -> Callable:
    """`fun(*args)` compiled once per static structure; array leaves are traced.

    A static leaf that is not hashable raises jax's error for unhashable static
    arguments. Keyword arguments are not supported (the entry points take none).
    """

    name = fun.__name__.strip("_").removesuffix("_jit")

    @functools.partial(jax.jit, static_argnums=1)
    def compiled(dynamic, static):
        avals = tuple(
            (x.shape, x.dtype) for x in dynamic if x is not None and hasattr(x, "shape")
        )
        note_trace(f"gd.{name}", static, avals)
        return fun(*_combine(dynamic, static))

    @functools.wraps(fun)
    def call(*args):
        dynamic, static = _partition(args)
        return compiled(dynamic, static)

    call._cached = compiled  # the jitted function (its `_cache_size()` for tests)
    return call


def check_real_scalar(out, what: str, hint: str = "") -> None:
    """A clear `ValueError` unless `out` (a value or `jax.eval_shape`'s result) is
    one real floating-point number: `what` names the function that returned it."""
    dtype = getattr(out, "dtype", None)
    if getattr(out, "shape", None) != () or not (
        dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    ):
        raise ValueError(
            f"{what} must return a real scalar (one number) for one particle, got "
            f"{getattr(out, 'shape', type(out).__name__)} of dtype {dtype}{hint}"
        )
