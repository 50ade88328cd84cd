"""Count the matmul FLOPs a JAX program performs, from its jaxpr.

`matmul_flops(fn, *args)` traces `fn` and adds `2 * (output size) * (contracted
size)` for every `dot_general`, multiplying the body of a `lax.scan` by its length
(nested scans multiply), and recursing into every other sub-program (`jit`,
`checkpoint`/`remat`, custom derivatives). Under `jax.grad`, the recomputation that
`jax.checkpoint` asks for appears in the traced program, so the count of a gradient
includes it: the count is what the program asks the device to do, whatever the
device and however noisy its timings.

Loops of unknown trip count (`while`) and branches (`cond`, which runs one branch)
cannot be counted statically: their presence is reported (`exact: False`), with
`while` bodies counted once and the largest `cond` branch counted.
"""

import math

import jax
from jax.extend import core as jex_core


def _sub_jaxprs(value):
    """The jaxprs inside one equation parameter (a jaxpr, or a tuple of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def _dot_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[i] for i in lhs_contract)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _count(jaxpr, notes: set) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, notes)
        elif name == "cond":
            notes.add("cond: largest branch counted")
            total += max(_count(b.jaxpr, notes) for b in eqn.params["branches"])
        elif name == "while":
            notes.add("while: body counted once (trip count unknown)")
            total += _count(eqn.params["body_jaxpr"].jaxpr, notes)
            total += _count(eqn.params["cond_jaxpr"].jaxpr, notes)
        elif name == "conv_general_dilated":
            notes.add("conv_general_dilated: not counted")
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += _count(sub, notes)
    return total


def matmul_flops(fn, *args, **kwargs) -> dict:
    """`{"flops": int, "exact": bool, "notes": [...]}` for `fn(*args, **kwargs)`.

    ```python
    import jax.numpy as jnp
    w = jnp.ones((3, 4))
    assert matmul_flops(lambda x: x @ w, jnp.ones((5, 3)))["flops"] == 2 * 5 * 4 * 3
    ```
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    notes: set = set()
    flops = _count(closed.jaxpr, notes)
    return {"flops": flops, "exact": not notes, "notes": sorted(notes)}
