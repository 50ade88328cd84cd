r"""The two fixed-grid/adaptive drivers that run a diffrax solver over ONE particle.

- `"scan"`: `lax.scan` over the solver's own `init`/`step`, checkpointed for reverse
  mode (`"sqrt"`, `"chunk"`, `"step"` or none); with a `GridBrownianPath` each
  step's increment is drawn from its known cell index.
- `"diffeqsolve"`: `diffrax.diffeqsolve` with `StepTo(ts)` or an adaptive controller.

`_solve` adds truncated backprop (DRaFT-K) on top of either. `gd.sample` (in
`_sample.py`) builds the terms and vmaps these over particles.
"""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._brownian import GridBrownianPath, _StepIncrement, unwrap_solver
from ._reverse import AdditiveNoiseTerm


def _stop_gradient(tree):
    """`lax.stop_gradient` on every floating-point array leaf of a pytree."""
    return jtu.tree_map(
        lambda a: lax.stop_gradient(a) if eqx.is_inexact_array(a) else a, tree
    )


def _first_failure(result, res):
    """The first non-successful of two `diffrax.RESULTS`. An explicit solver's step
    returns the constant `successful`: then no select is traced (on a GPU even a
    scalar select is a kernel launched every step)."""
    (value,) = jtu.tree_leaves(res)
    if not isinstance(value, jax.core.Tracer) and int(value) == int(
        jtu.tree_leaves(dfx.RESULTS.successful)[0]
    ):
        return result
    return dfx.RESULTS.where(result == dfx.RESULTS.successful, res, result)


def _scan_steps(step, carry, xs, checkpoint: str, unroll: int = 1):
    """`lax.scan(step, carry, xs)`, checkpointed for reverse mode, with `unroll` steps
    per loop iteration (the chunk loops of "sqrt" and "chunk" are not unrolled).

    With $F$ the cost of one step's forward pass, and the backward of a step costing
    about $2F$ (input and parameter cotangents of its matmuls), the gradient of $N$
    steps costs:

    - `"sqrt"`: the N steps run as an outer scan over about sqrt(N) chunks of about
      sqrt(N) steps, each chunk under `jax.checkpoint` and each step inside it under
      its own `jax.checkpoint`. Reverse mode stores the chunk-boundary states and one
      chunk's step states at a time (about 2 sqrt(N) states) and recomputes each
      step twice: about $5NF$ in all.
    - `"chunk"`: the same chunks, with no checkpoint per step: reverse mode
      recomputes one chunk at a time and keeps that chunk's step internals (about
      sqrt(N) steps' activations): $4NF$, the least a gradient can cost without
      storing all N steps' internals.
    - `"step"`: each step under `jax.checkpoint`: N states stored, each step's
      internals recomputed once: a little under $4NF$ (a step's last layer need not
      be recomputed).
    - `"none"`: every step's internals are stored: $3NF$, memory linear in N.

    The values are those of the plain scan in every case.
    """
    if checkpoint == "none":
        return lax.scan(step, carry, xs, unroll=unroll)
    if checkpoint != "chunk":
        step = jax.checkpoint(step, prevent_cse=False)
    if checkpoint == "step":
        return lax.scan(step, carry, xs, unroll=unroll)
    n = jtu.tree_leaves(xs)[0].shape[0]
    chunk_len = max(1, math.isqrt(n))
    num_chunks, rest = divmod(n, chunk_len)
    if num_chunks <= 1:
        return lax.scan(step, carry, xs, unroll=unroll)

    def chunk(c, xs_chunk):
        return lax.scan(step, c, xs_chunk, unroll=unroll)

    split = num_chunks * chunk_len
    head = jtu.tree_map(
        lambda a: a[:split].reshape(num_chunks, chunk_len, *a.shape[1:]), xs
    )
    carry, ys = lax.scan(jax.checkpoint(chunk, prevent_cse=False), carry, head)
    ys = jtu.tree_map(lambda a: a.reshape(split, *a.shape[2:]), ys)
    if rest:
        tail = jtu.tree_map(lambda a: a[split:], xs)
        carry, ys_tail = lax.scan(step, carry, tail, unroll=unroll)
        ys = jtu.tree_map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def _like(new, old):
    """`new` with each array leaf cast to the dtype of `old`'s leaf: a diffrax
    solver's step promotes a 16-bit state through its float32 time step (e.g.
    Euler's `y + dt * f`), and a scan carry keeps its dtypes."""
    return jtu.tree_map(
        lambda a, b: a.astype(b.dtype) if eqx.is_array(a) and eqx.is_array(b) else a,
        new,
        old,
    )


def _grid_path(terms) -> GridBrownianPath | None:
    """The `GridBrownianPath` of `reverse_sde` terms, if that is what they hold."""
    if isinstance(terms, dfx.MultiTerm) and len(terms.terms) == 2:
        noise = terms.terms[1]
        if isinstance(noise, AdditiveNoiseTerm) and isinstance(
            noise.path, GridBrownianPath
        ):
            return noise.path
    return None


def _differentiable_stages(solver):
    """Runge-Kutta solvers with `scan_kind=None` loop over their stages with a
    `custom_vjp` ("checkpointed"), which forward mode (`jax.jvp`) cannot enter, and
    "lax" (diffrax's choice under ForwardMode) cannot be reverse-differentiated. The
    scan driver does not know which mode a caller will use: "bounded" supports
    both (the driver checkpoints whole steps itself). Stochastic Runge-Kutta
    solvers pass `scan_kind` to `equinox.internal.scan`, whose "bounded" kind is
    reverse mode only and whose "lax" kind (`lax.scan`) supports both."""
    if isinstance(solver, dfx.HalfSolver):  # the wrapped solver's stages
        inner = _differentiable_stages(solver.solver)
        return eqx.tree_at(lambda s: s.solver, solver, inner)
    if getattr(solver, "scan_kind", "lax") is None:
        kind = "lax" if isinstance(solver, dfx.AbstractSRK) else "bounded"
        return eqx.tree_at(
            lambda s: s.scan_kind, solver, kind, is_leaf=lambda x: x is None
        )
    return solver


def _scan_solve(
    terms,
    solver,
    ts,
    y0,
    args,
    save_every: int,
    checkpoint: str,
    step_offset: int = 0,
    unroll: int = 1,
    state0=None,
):
    solver = _differentiable_stages(solver)
    if state0 is None:
        state0 = solver.init(terms, ts[0], ts[1], y0, args)
    num = ts.shape[0] - 1
    path = _grid_path(terms)
    if path is not None:
        # Each step's cell of the (sorted) path grid is known here: draw its increment
        # directly instead of searching the grid (same values as path.evaluate).
        total = path.grid.shape[0] - 1
        global_step = step_offset + jnp.arange(num)
        cells = jnp.where(ts[0] > ts[-1], total - 1 - global_step, global_step)
    else:
        cells = jnp.zeros(num, jnp.int32)

    def step(carry, xs):
        y, state, result = carry
        t0, t1, cell = xs
        step_terms = terms
        if path is not None:
            inc = path.cell_increment(cell, t1 - t0)
            area = path.cell_area(cell, t1 - t0)
            one_step = _StepIncrement(inc, t0, t1, area, path.levy_area)
            step_terms = eqx.tree_at(lambda tm: tm.terms[1].path, terms, one_step)
        y1, _, _, state1, res = solver.step(step_terms, t0, t1, y, args, state, False)
        y1, state1 = _like((y1, state1), (y, state))
        result = _first_failure(result, res)
        return (y1, state1, result), (y1 if save_every == 1 else None)

    carry0 = (y0, state0, dfx.RESULTS.successful)
    xs = (ts[:-1], ts[1:], cells)
    if save_every > 1:
        # Save every k-th state only: an outer scan over groups of k steps, each run
        # (and checkpointed) as `checkpoint` says, returning its last state.
        k = save_every
        groups = jtu.tree_map(lambda a: a.reshape(num // k, k, *a.shape[1:]), xs)

        def group(c, g):
            c, _ = _scan_steps(step, c, g, checkpoint, unroll)
            return c, c[0]

        carry, ys = lax.scan(group, carry0, groups)
    else:
        carry, ys = _scan_steps(step, carry0, xs, checkpoint, unroll)
    y_final, state_final, result = carry
    if save_every:
        ys = jnp.concatenate([y0[None], ys], axis=0)
    else:
        ys = y_final
    return ys, result, jnp.asarray(ts.shape[0] - 1), state_final


def _diffeqsolve(
    terms,
    solver,
    ts,
    y0,
    args,
    save_every,
    controller,
    adjoint,
    max_steps,
    dt0,
    solver_state=None,
    return_state: bool = False,
):
    if controller is None:
        controller = dfx.StepTo(ts)
    if isinstance(controller, dfx.StepTo):
        dt0 = None  # the steps are the controller's
    kind = dict(ts=ts[::save_every]) if save_every else dict(t1=True)
    saveat = dfx.SaveAt(**kind, solver_state=return_state)
    sol = dfx.diffeqsolve(
        terms,
        solver,
        ts[0],
        ts[-1],
        dt0,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
        throw=False,
        solver_state=solver_state,
    )
    ys = sol.ys if save_every else sol.ys[0]
    return ys, sol.result, sol.stats["num_steps"], sol.solver_state


def _solve(
    terms,
    solver,
    ts,
    y0,
    args,
    *,
    driver,
    save_every,
    controller,
    adjoint,
    max_steps,
    checkpoint,
    truncate,
    unroll=1,
):
    """One particle's solve; with `truncate = K`, the gradient stops K steps early."""

    def run(terms, solver, ts, y0, args, step_offset=0, state=None, want_state=False):
        if driver == "scan":
            return _scan_solve(
                terms,
                solver,
                ts,
                y0,
                args,
                save_every,
                checkpoint,
                step_offset,
                unroll,
                state,
            )
        dt0 = ts[1] - ts[0]
        return _diffeqsolve(
            terms,
            solver,
            ts,
            y0,
            args,
            save_every,
            controller,
            adjoint,
            max_steps,
            dt0,
            state,
            want_state,
        )

    num_steps = ts.shape[0] - 1
    if truncate is None or truncate >= num_steps:
        return run(terms, solver, ts, y0, args)[:3]
    # DRaFT-K: the first N - K steps see no tangents at all (so nothing is stored for
    # them), the last K steps are differentiated. Both segments use the same noise
    # (the Brownian path is built on the whole grid) and the second starts from the
    # first's solver state (a multistep solver's previous prediction), so the samples
    # are unchanged.
    split = num_steps - truncate
    head = _stop_gradient((terms, solver, ts[: split + 1], y0, args))
    ys_a, res_a, n_a, state_a = run(*head, want_state=True)
    y_mid = lax.stop_gradient(ys_a[-1] if save_every else ys_a)
    state_mid = _stop_gradient(state_a)
    if getattr(getattr(unwrap_solver(solver), "tableau", None), "fsal", False):
        # An FSAL Runge-Kutta state holds f(t_cut, y_cut), a value of the tail's own
        # first step: rebuilt there (same value) so its parameter gradient counts.
        state_mid = None
    ys_b, res_b, n_b, _ = run(terms, solver, ts[split:], y_mid, args, split, state_mid)
    result = _first_failure(res_a, res_b)
    ys = jnp.concatenate([lax.stop_gradient(ys_a), ys_b[1:]]) if save_every else ys_b
    return ys, result, n_a + n_b
