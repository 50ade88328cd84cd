r"""Sampling: prior draw -> reverse SDE / probability-flow ODE -> particles.

One particle's solve is written once; particles are a `vmap` over per-particle keys
`fold_in(key, i)`, so particle `i`'s sample does not depend on how many are drawn or
how they are sharded. Two drivers run the same diffrax solvers:

- `"scan"` (default on a fixed grid): a `lax.scan` over the solver's own `init`/`step`,
  checkpointed for reverse mode (see "Memory" below);
- `"diffeqsolve"`: `diffrax.diffeqsolve` with `StepTo(ts)`, or with an adaptive
  `stepsize_controller` (then the noise is a `VirtualBrownianTree`).

Both give the same samples for the same key on the same grid (an implicit
solver's to its root finder's tolerance).

Everything is differentiable (DESIGN.md, decision 4; STYLE.md 2.5): `jax.grad` of any
scalar function of the samples reaches the guidance weights, network parameters, SDE
schedule parameters (all array leaves) and the initial states (`y0=`), through the
SDE or the PF-ODE, with the grid Brownian path or a `VirtualBrownianTree`.

- Memory. With `checkpoint=True` the `"scan"` driver stores $O(\sqrt N)$ states for
  reverse mode, not $O(N)$: the $N$ steps are split into about $\sqrt N$ chunks of
  about $\sqrt N$ steps; the backward pass recomputes one chunk at a time (each step
  under its own `jax.checkpoint`): a gradient costs about 5 forward passes.
  `checkpoint="chunk"` uses the same chunks without a checkpoint per step: it keeps
  one chunk's step internals (about $\sqrt N$ steps' activations, still sublinear
  in $N$) and costs 4 forward passes, the least without storing every step.
  `checkpoint="step"` stores the $N$ states (one `jax.checkpoint` per step: a bit
  under 4 passes), `checkpoint=False` every step's internals (3 passes, memory
  linear in $N$).
  The `"diffeqsolve"` driver uses diffrax's adjoints (`RecursiveCheckpointAdjoint`
  by default, `DirectAdjoint`, `ForwardMode`; `BacksolveAdjoint` for the
  probability-flow ODE with adaptive steps only). On a fixed grid
  it solves all particles as one batched state in one `diffeqsolve` (the same
  samples; explicit solvers only: implicit and Milstein solvers are `vmap`-ped, as
  their steps would couple the batch), so its adjoint keeps one cotangent of the
  score's parameters, not one per particle; with a `stepsize_controller` each
  particle is its own `vmap`-ped
  solve (its own steps), and parameter gradients then cost one cotangent per
  particle: prefer fixed grids for those.
- Truncated backprop (DRaFT-K): `truncate_backprop=K` stops the gradient at the state
  $K$ steps before the end, so only the last $K$ steps are differentiated (and
  stored); the samples are unchanged.
- Noise. `brownian="grid"` (default on a fixed grid) and `"tree"`
  (`VirtualBrownianTree`) are differentiable; `"unsafe"` (`UnsafeBrownianPath`) is a
  forward-only fast path for `driver="diffeqsolve"`, and reverse-mode
  differentiation through it raises an error naming the fix.
"""

import functools
import math
from typing import Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from equinox.internal import nondifferentiable_backward
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float

from ._batched import BatchedBrownianPath, BatchedScore, brownian_path
from ._brownian import check_key, levy_area_for, threefry_key
from ._custom_types import Args, Key
from ._driver import _solve
from ._grid import check_grid, grid_ends, remember_grid, uniform_grid
from ._jit import StaticFloat, filter_jit
from ._reverse import probability_flow, reverse_sde
from ._sample_checks import (
    _call_laid_out,
    _check_adaptive_solver,
    _check_brownian,
    _check_count,
    _check_dtype,
    _check_flag,
    _check_guidance_sde,
    _check_half_steps,
    _check_intervals,
    _check_network_end,
    _check_save_every,
    _check_score_shape,
    _check_shape,
    _check_sharding,
    _check_solver,
    _check_static_float,
    _check_truncate,
    _check_unroll,
    _check_y0,
    _checkpoint_mode,
    _leading_axis_sharding,
    _output_sharding,
    _saveat_flags,
)
from ._score import AbstractScore, check_score, score_to_x0
from ._sde import AbstractSDE
from ._solver import DDIM, ExponentialIntegrator, SDEDPMSolverPP


class Samples(eqx.Module):
    """The output of `sample`.

    - `ys`: `(particles, *shape)`, or `(particles, len(ts[::save_every]), *shape)`
      for trajectories.
    - `ts`: the saved times (`ts[::save_every]` for trajectories, else the final
      time).
    - `result`: per-particle `diffrax.RESULTS`.
    - `failed`: per-particle flag: the solver failed (`result`) or the sample is
      not finite. A failed particle's `ys` are NaN (the metrics reject them),
      whatever state the solver stopped in.
    - `num_steps`: solver steps per particle: the grid's steps on a fixed grid;
      with an adaptive controller, diffrax's count of steps tried (accepted and
      rejected).
    - `num_failed` (property): the number of failed particles.

    A failed particle does not stop the others: read `failed`, never an exception.
    Its values never reach the others', but under `jax.grad` a particle whose
    values went non-finite inside the solve makes the gradient of shared leaves
    (guidance weights, network parameters) NaN even when a loss masks it out:
    reverse mode multiplies the mask's zero cotangent by its NaN partial
    derivatives (JAX's rule for `jnp.where` over NaN). (A particle failed by the
    solver's result code with finite values does not: reverse mode drops its
    contribution, as `ys`'s NaN is a constant put in after the solve, so even with
    every particle failed `jax.grad` returns a finite gradient (zero) of a NaN
    value, while forward mode (`jax.jvp`, `jax.jacfwd`) gives NaN, a loss such as
    `mean(ys**2)` multiplying the NaN values by their zero tangents.) Keep the
    score finite where the particles go, and check `failed` (or `num_failed`)
    before using a gradient, as `gd.tune_guidance` and
    `gd.finetune_through_sampler` do.

    !!! example

        ```python
        sde = gd.VPSDE()
        data = gd.Gaussian(jnp.zeros(2), jnp.eye(2))
        y0 = jnp.array([[0.0, 0.0], [jnp.nan, 0.0]])  # the second particle is bad
        out = gd.sample(jr.key(0), sde, data.score(sde), (2,), y0=y0,
                        ts=gd.uniform_grid(1.0, 1e-3, 10))
        assert out.failed.tolist() == [False, True] and out.num_failed == 1
        good = out.ys[~out.failed]  # (1, 2)
        ```
    """

    ys: Array
    ts: Array
    result: dfx.RESULTS
    failed: Bool[Array, "..."]
    num_steps: Array

    @property
    def num_failed(self) -> Array:
        return jnp.sum(self.failed)


def _prior_draw(sde: AbstractSDE, key: Key, shape, dtype) -> Array:
    """One particle's prior draw; 16-bit dtypes are drawn in float32 and rounded (as
    the grid Brownian path's increments are), so they are the float32 draws."""
    gen = jnp.promote_types(dtype, jnp.float32)
    return sde.prior_sample(key, shape, gen).astype(dtype)


# SDE classes of users whose methods were seen to return JAX arrays
_CHECKED_SDE_TYPES: set[type] = set()


def _check_sde(sde) -> None:
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got {type(sde).__name__}"
        )
    name = type(sde).__name__
    if isinstance(sde.T, jax.core.Tracer):
        raise TypeError(
            f"{name}.T is traced (the SDE passed through jax.jit with T an ordinary "
            "field); grids and time checks need it on the host: declare it static, "
            "T: float = eqx.field(static=True, default=1.0), as guidediff's SDEs do"
        )
    cls = type(sde)
    if cls in _CHECKED_SDE_TYPES or cls.__module__.startswith("guidediff."):
        return
    # once per class of a user's: methods returning Python numbers fail deep in
    # the solvers (a float has no .astype)
    t = jnp.asarray(sde.T, jnp.result_type(float))
    for method, out in (
        ("drift_coeff", sde.drift_coeff(t)),
        ("diffusion", sde.diffusion(t)),
        ("marginal", sde.marginal(t)),
        ("prior_std", sde.prior_std()),
    ):
        leaves = tuple(out) if isinstance(out, tuple | list) else (out,)
        if method == "marginal" and len(leaves) != 2:
            raise TypeError(f"{name}.marginal must return (alpha(t), sigma(t))")
        for leaf in leaves:
            if not isinstance(leaf, jax.Array | np.ndarray | np.generic):
                raise TypeError(
                    f"{name}.{method} returned a {type(leaf).__name__}; an SDE's "
                    "methods return JAX arrays (e.g. jnp.zeros_like(t) for a zero "
                    "drift, jnp.asarray(1.0) for a constant)"
                )
    _CHECKED_SDE_TYPES.add(cls)


def _time_dtype(dtype) -> jnp.dtype:
    """The dtype of the time grid for particles of `dtype`: at least float32.

    16-bit times cannot resolve a sampling grid (bfloat16 has 8 significant bits:
    a 500-step grid from 1 rounds neighbouring times together, and `T = 0.999`
    rounds to 1), so 16-bit particles step on a float32 grid: each step's scalar
    coefficients are computed in float32 and only the state is 16-bit."""
    return jnp.promote_types(dtype, jnp.float32)


def _grid_in_dtype(
    sde: AbstractSDE, ts, dtype, start_at_T: bool, takes_y0: bool = True
) -> Array:
    """`ts` checked (clear errors on concrete grids), then cast to the time dtype of
    particles of `dtype` (`_time_dtype`) and checked again: float32 particles under
    x64 can round neighbouring float64 times together. With `start_at_T` (no `y0`:
    the particles start from the prior) the grid must start at `sde.T`."""
    # (a jax array as it is: jnp.asarray and a same-dtype astype cost host time on
    # every direct call)
    host = None  # the grid's values on the host, where it came from there
    if isinstance(ts, jax.Array):
        given = ts
        check_grid(sde, given)
    else:
        try:
            given = jnp.asarray(ts)
        except TypeError as e:  # strings, objects: JAX's own message names no grid
            raise TypeError(f"the time grid must hold real times, got {ts!r}") from e
        if isinstance(given, jax.core.Tracer):  # a list holding traced times
            check_grid(sde, given)
        else:
            # checked on the host, in the dtype jnp.asarray gave it (it rounds on
            # the host, as NumPy does): reading the new device array back would
            # wait for all the work queued before it
            with np.errstate(over="ignore"):  # as jnp.asarray rounded it
                host = np.asarray(ts).astype(given.dtype)
            check_grid(sde, host)
            remember_grid(given, host[0], host[-1], host)
    tdtype = _time_dtype(dtype)
    ts = given if given.dtype == tdtype else given.astype(tdtype)
    if ts.dtype != given.dtype:
        try:
            if host is not None:
                # a device cast flushes subnormals (of either dtype: float32's are
                # normal in float64) to zero, NumPy's does not: such a grid is read
                # back
                subnormal = _has_subnormal(host)
                with np.errstate(over="ignore"):  # 1e39 in float32: inf, rejected
                    host = host.astype(tdtype)
                if subnormal or _has_subnormal(host):
                    host = None
            if host is not None:
                check_grid(sde, host)
                remember_grid(ts, host[0], host[-1], host)
            else:
                check_grid(sde, ts)
        except ValueError as e:
            raise ValueError(
                f"the time grid is valid, but not once rounded to {ts.dtype} (the "
                f"times of dtype={dtype} particles): {e}. Use fewer steps or a wider "
                "dtype"
            ) from None
    if start_at_T and not isinstance(ts, jax.core.Tracer):
        ends = grid_ends(ts)  # host values: no tracing, no read back
        t0 = float(ends[0] if ends is not None else np.asarray(ts)[0])
        T = float(sde.T)
        if abs(t0 - T) > 1e-6 * max(T, 1.0):
            fix = ", or pass y0 (e.g. an SDEdit start)" if takes_y0 else ""
            raise ValueError(
                f"the grid starts at ts[0]={t0}, but the prior is the law at "
                f"sde.T={T}: start the grid at sde.T{fix}"
            )
    return ts


def _placed_y0(y0, sharding):
    """`y0` on the sharding's devices before the program lays it out (a `y0`
    committed to one device would clash with the program's layout). A concrete
    `y0` is put in the sharding itself; a traced one (under `jax.grad`,
    `jax.vmap`, `jax.checkpoint`, ...) replicated over the devices, which splits
    no axis (`jax.vmap`'s batch axis would take the sharding's first entry), and
    `_sample_jit`'s constraint lays it out."""
    if not isinstance(y0, jax.core.Tracer) or len(sharding.device_set) == 1:
        return jax.device_put(y0, sharding)
    if isinstance(sharding, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec()
        )
        return jax.device_put(y0, replicated)
    return y0


def _has_subnormal(a: np.ndarray) -> bool:
    """Whether `a` holds a non-zero value below its dtype's smallest normal (never,
    for integers)."""
    if not jnp.issubdtype(a.dtype, jnp.floating):
        return False
    tiny = float(jnp.finfo(a.dtype).tiny)
    return bool(np.any((a != 0) & (np.abs(a) < tiny)))


def _grid_ok(sde: AbstractSDE, ts, start_at_T: bool) -> Array:
    """On-device `_grid_in_dtype` for traced grids: False flags every particle."""
    T = jnp.asarray(sde.T, ts.dtype)
    ok = jnp.all(ts[1:] < ts[:-1]) & (ts[-1] >= 0) & (ts[0] <= T * (1 + 1e-6))
    if start_at_T:
        ok = ok & (jnp.abs(ts[0] - T) <= 1e-6 * jnp.maximum(T, 1.0))
    return ok & jnp.all(jnp.isfinite(ts))


def _step_to_grid(controller: dfx.StepTo, ts):
    """The grid of a `StepTo` controller, which must be `ts` if both are given."""
    grid = jnp.asarray(controller.ts)
    if ts is None:
        return grid
    given = jnp.asarray(ts)
    traced = isinstance(grid, jax.core.Tracer) or isinstance(given, jax.core.Tracer)
    if (
        traced
        or grid.shape != given.shape
        or not np.array_equal(np.asarray(grid), np.asarray(given))
    ):
        raise ValueError(
            "stepsize_controller=diffrax.StepTo(ts=...) and ts= both give the time "
            "grid, and they differ (or one is traced): pass the grid once, as ts= "
            "(or as StepTo's ts)"
        )
    return given


def _safe_grid(sde: AbstractSDE, ts, ok) -> Array:
    """`ts` where the on-device grid check passed, else a valid grid of the same
    length from `sde.T` (diffrax raises a runtime error on a bad grid; the
    particles of a bad traced grid are flagged and set to NaN instead)."""
    T = jnp.asarray(sde.T, ts.dtype)
    fallback = T * jnp.linspace(1.0, 0.5, ts.shape[0], dtype=ts.dtype)
    return jnp.where(ok, ts, fallback)


def _args_as_arrays(args):
    """Numbers in args become array leaves, so a new label does not recompile.

    As `jax.jit` would see them: Python numbers weakly typed, NumPy scalars and
    arrays strongly typed in JAX's canonical dtype (`np.int64(1)` is int32 without
    x64). Converting NumPy scalars here (not only at the compiled call) makes the
    tuners' cache of compiled steps key them by that dtype (by `int64` it compiled
    the step again for `np.int64(1)` after `jnp.array(1, jnp.int32)`). The types
    are not changed otherwise: a weak `1` and a strong int32 differ in how they
    promote with 16-bit and 8-bit arrays, and the score sees what it was given."""
    return jtu.tree_map(
        lambda a: (
            jnp.asarray(a)
            if isinstance(a, int | float | bool | np.ndarray | np.generic)
            else a
        ),
        args,
    )


def _split_particle_key(key: Key) -> tuple[Key, Key]:
    """A particle's prior-draw key and Brownian-path key."""
    k_prior, k_bm = jr.split(key)
    return k_prior, k_bm


def _particle_keys(key: Key, n: int) -> Array:
    # Non-Threefry keys (rbg, unsafe_rbg) are hashed to a Threefry key first: their
    # generators draw a vmapped batch from its first key only (see `threefry_key`).
    key = threefry_key(key)
    return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(n))


_FORWARD_MODE_GRAD_MSG = (
    "gd.sample(..., driver='diffeqsolve', adjoint=diffrax.ForwardMode()) is "
    "forward-mode only (jax.jvp / jax.jacfwd) and cannot be reverse-mode "
    "differentiated (jax.grad / jax.vjp). For jax.grad keep the default adjoint "
    "(diffrax.RecursiveCheckpointAdjoint()), or on a fixed grid use driver='scan', "
    "which supports both modes."
)
_UNSAFE_GRAD_MSG = (
    "gd.sample(..., brownian='unsafe') uses diffrax.UnsafeBrownianPath, which cannot "
    "be reverse-mode differentiated (jax.grad / jax.vjp). To differentiate through "
    "the sampler use brownian='grid' (the default on a fixed grid: a "
    "GridBrownianPath, reverse-differentiable) or brownian='tree' (a "
    "diffrax.VirtualBrownianTree); keep 'unsafe' for forward-only sampling or "
    "forward mode (jax.jvp, adjoint=diffrax.ForwardMode())."
)


# Built once: constructing an equinox module costs host time on every direct call.
_DEFAULT_ADJOINT = dfx.RecursiveCheckpointAdjoint()
_FORWARD_MODE = dfx.ForwardMode()
_DEFAULT_SOLVERS: dict = {}  # id(sde) -> (sde, its ExponentialIntegrator)


def _default_sde_solver(sde: AbstractSDE) -> ExponentialIntegrator:
    """`ExponentialIntegrator(sde)`, the same object for the same `sde` object: a
    direct `gd.sample` call then neither builds a module nor has `jit` compare a new
    one against its cache key (tens of microseconds of host time per call). SDEs
    holding tracers (built inside a traced function) are not remembered."""
    hit = _DEFAULT_SOLVERS.get(id(sde))
    if hit is not None and hit[0] is sde:
        return hit[1]
    solver = ExponentialIntegrator(sde)
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(sde)):
        if len(_DEFAULT_SOLVERS) >= 16:
            _DEFAULT_SOLVERS.clear()
        _DEFAULT_SOLVERS[id(sde)] = (sde, solver)
    return solver


def _sample_core(
    key,
    y0,
    *,
    sde,
    score,
    shape,
    dtype,
    args,
    ts,
    solver,
    process,
    driver,
    save_every,
    denoise,
    controller,
    adjoint,
    max_steps,
    checkpoint,
    bm_tol,
    brownian,
    truncate,
    unroll=1,
    batched: bool = False,
):
    """One particle's solve (`key` one key), or, with `batched=True`, all particles
    as one `(P, *shape)` state in one solve (`key` the `(P,)` particle keys; see
    `_batched.py`): the same samples either way on a fixed grid."""
    lead = jax.vmap if batched else (lambda f: f)
    k_prior, k_bm = lead(_split_particle_key)(key)
    if y0 is None:
        y0 = lead(lambda k: _prior_draw(sde, k, shape, dtype))(k_prior)
    if batched:
        score = BatchedScore(score)
    if process == "sde":
        struct = jax.ShapeDtypeStruct(shape, dtype)
        levy = levy_area_for(solver)
        if batched:
            bm = BatchedBrownianPath(brownian, struct, ts, k_bm, bm_tol, levy)
        else:
            bm = brownian_path(brownian, struct, ts, k_bm, bm_tol, levy)
        terms = reverse_sde(sde, score, bm)
    else:
        terms = probability_flow(sde, score)
    ys, result, nsteps = _solve(
        terms,
        solver,
        ts,
        y0,
        args,
        driver=driver,
        save_every=save_every,
        controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
        checkpoint=checkpoint,
        truncate=truncate,
        unroll=unroll,
    )
    if batched and save_every:
        ys = jnp.swapaxes(ys, 0, 1)  # (time, P, ...) -> (P, time, ...)
    if process == "sde" and brownian == "unsafe":
        ys = nondifferentiable_backward(ys, msg=_UNSAFE_GRAD_MSG, symbolic=True)
    elif isinstance(adjoint, dfx.ForwardMode):
        # diffeqsolve's loop under ForwardMode has no transpose: JAX's own error
        # (about while loops with dynamic bounds) would name none of this
        ys = nondifferentiable_backward(ys, msg=_FORWARD_MODE_GRAD_MSG, symbolic=True)
    if denoise:
        t_end = ts[-1]
        last = (slice(None), -1) if batched else (-1,)
        final = ys[last] if save_every else ys
        # Tweedie at sigma = 0 is the identity; a network's score is infinite
        # there (0 * inf = NaN), so it is not evaluated
        x0 = lax.cond(
            sde.marginal(t_end)[1] > 0,
            lambda y: score_to_x0(sde, t_end, y, score(t_end, y, args)).astype(y.dtype),
            lambda y: y,
            final,
        )
        ys = ys.at[last].set(x0) if save_every else x0
    if batched:
        num = key.shape[0]
        result = jtu.tree_map(lambda r: jnp.broadcast_to(r, (num,)), result)
        nsteps = jnp.broadcast_to(nsteps, (num,))
        finite = jnp.all(jnp.isfinite(ys.reshape(num, -1)), axis=1)
    else:
        finite = jnp.all(jnp.isfinite(ys))
    failed = (result != dfx.RESULTS.successful) | ~finite
    return ys, result, failed, nsteps


def _per_particle_steps(solver) -> bool:
    """Whether `solver` steps a batch of particles as it steps each one alone, so
    that all particles can be one batched `diffeqsolve` state: explicit Runge-Kutta,
    Euler-type and SRK steps and guidediff's own. Not implicit solvers (a Newton
    solve over the whole batch: a Jacobian of size P^2 and batch-wide convergence),
    not Milstein (the diffusion's Jacobian over the batch), and not solvers unknown
    here: those are vmapped per particle."""
    if isinstance(solver, dfx.AbstractImplicitSolver):
        return False
    explicit = (
        dfx.AbstractRungeKutta,
        dfx.AbstractSRK,
        dfx.Euler,
        dfx.EulerHeun,
        dfx.ReversibleHeun,
        ExponentialIntegrator,
        SDEDPMSolverPP,
        DDIM,
    )
    return isinstance(solver, explicit)


@filter_jit
def _sample_jit(key, y0, sde, score, args, ts, solver, adjoint, controller, static):
    (
        num,
        sharding,
        shape,
        dtype,
        process,
        driver,
        save_every,
        denoise,
        max_steps,
        ckpt,
        bm_tol,
        brownian,
        truncate,
        single,
        save_trajectory,
        unroll,
    ) = static
    core = functools.partial(
        _sample_core,
        sde=sde,
        score=score,
        shape=shape,
        dtype=dtype,
        args=args,
        ts=ts,
        solver=solver,
        process=process,
        driver=driver,
        save_every=save_every,
        denoise=denoise,
        controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
        checkpoint=ckpt,
        bm_tol=bm_tol,
        brownian=brownian,
        truncate=truncate,
        unroll=unroll,
    )
    # Particle keys are made inside the compiled program (no eager dispatch per call)
    # and laid out over the devices when a sharding is given.
    keys = _particle_keys(key, num)
    if sharding is not None:
        keys = jax.lax.with_sharding_constraint(keys, _leading_axis_sharding(sharding))
        if y0 is not None:
            y0 = jax.lax.with_sharding_constraint(y0, sharding)
    # A traced grid skipped the Python checks: a bad one fails every particle.
    grid_ok = _grid_ok(sde, ts, y0 is None)
    if driver == "diffeqsolve" and isinstance(ts, jax.core.Tracer):
        core = functools.partial(core, ts=_safe_grid(sde, ts, grid_ok))
    if driver == "diffeqsolve" and controller is None and _per_particle_steps(solver):
        # A fixed grid: one diffeqsolve over the whole batch (one adjoint, not one
        # per particle). Adaptive steps stay per particle (vmap).
        out = core(keys, y0, batched=True)
    else:
        out = jax.vmap(core)(keys, y0)
    ys, result, failed, nsteps = out
    # A failed particle's values are NaN, whatever the solver left (the state where
    # an adaptive solve ran out of steps, an implicit step that did not converge):
    # code that reads `ys` without `failed` (the metrics) then rejects it.
    failed = failed | ~grid_ok
    ys = jnp.where(failed.reshape(failed.shape + (1,) * (ys.ndim - 1)), jnp.nan, ys)
    layout = None if sharding is None else _output_sharding(sharding, save_trajectory)
    if layout is not None:
        # every axis the sharding names, as smc_sample lays out its particles (the
        # keys' constraint above lays out the particle axis only)
        ys = jax.lax.with_sharding_constraint(ys, layout)
    out = (ys, result, failed, nsteps)
    if single:
        out = jtu.tree_map(lambda a: a[0], out)
    # The saved times are computed here too: no eager op after the compiled call.
    out_ts = ts[::save_every] if save_trajectory else ts[-1]
    ys, result, failed, nsteps = out
    # built here, so the call returns it by unflattening (cheaper on the host than
    # constructing a Module after the call)
    return Samples(ys, out_ts, result, failed, nsteps)


def initial_noise(
    key: Key,
    sde: AbstractSDE,
    shape: tuple[int, ...],
    *,
    num_particles: int | None = None,
    dtype=None,
) -> Float[Array, "*particles_x"]:
    r"""The prior draws $X_T \sim \mathcal N(0, \sigma_T^2 I)$ that `sample` starts from.

    Particle `i` draws from `fold_in(key, i)` exactly as `sample` does, so
    `sample(key, ..., y0=initial_noise(key, ...))` equals `sample(key, ...)`. Pass
    `y0` explicitly to differentiate with respect to the initial noise.

    **Arguments:** `key`, `sde`, `shape` and `num_particles` as in `sample`;
    `dtype`: the draws' floating dtype (default: JAX's default float), as
    `sample`'s `dtype`.

    **Returns:** `(num_particles, *shape)`, or `shape` when `num_particles` is None.

    !!! example

        ```python
        key, sde = jr.key(0), gd.VPSDE()
        score = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
        y0 = gd.initial_noise(key, sde, (2,), num_particles=64)
        dy = jax.grad(lambda y0: gd.sample(key, sde, score, (2,), y0=y0).ys.sum())(y0)
        ```
    """
    check_key(key)
    _check_sde(sde)
    shape = _check_shape(shape)
    dtype = _check_dtype(dtype)
    num_particles = _check_count("num_particles", num_particles, allow_none=True)
    n = 1 if num_particles is None else num_particles
    y0 = _initial_noise_jit(key, sde, shape, dtype, n)
    return y0[0] if num_particles is None else y0


@filter_jit
def _initial_noise_jit(key, sde, shape, dtype, n):
    keys = _particle_keys(key, n)
    k_prior = jax.vmap(_split_particle_key)(keys)[0]
    return jax.vmap(lambda k: _prior_draw(sde, k, shape, dtype))(k_prior)


def sample(
    key: Key,
    sde: AbstractSDE,
    score: AbstractScore,
    shape: tuple[int, ...],
    *,
    num_particles: int | None = None,
    args: Args = None,
    ts: Float[ArrayLike, " n"] | None = None,
    process: Literal["sde", "ode"] = "sde",
    solver: dfx.AbstractSolver | None = None,
    driver: Literal["scan", "diffeqsolve"] | None = None,
    stepsize_controller: dfx.AbstractStepSizeController | None = None,
    save_trajectory: bool = False,
    save_every: int = 1,
    saveat: dfx.SaveAt | None = None,
    denoise: bool = False,
    adjoint: dfx.AbstractAdjoint | None = None,
    checkpoint: bool | Literal["sqrt", "chunk", "step"] = True,
    unroll: int = 1,
    truncate_backprop: int | None = None,
    y0: Float[ArrayLike, "*particles_x"] | None = None,
    brownian: Literal["grid", "tree", "unsafe"] | None = None,
    max_steps: int = 16384,
    brownian_tol: float = 1e-3,
    sharding: jax.sharding.Sharding | None = None,
    dtype=None,
) -> Samples:
    r"""Draw samples by integrating the reverse SDE or the probability-flow ODE.

    Each particle starts from the prior at `ts[0]` and is integrated down to `ts[-1]`:

    $$dX = [f(t)X - \lambda g(t)^2 s_t(X)]\,dt + \mathbb 1_{\text{sde}}\,g(t)\,d\bar W,
    \quad \lambda = 1\ (\text{sde}),\ \tfrac12\ (\text{ode}).$$

    **Arguments:**

    - `key`: particle `i` uses `fold_in(key, i)` (prior draw and Brownian path).
      Keys of other PRNG implementations (`rbg`, `unsafe_rbg`) are first hashed
      to a Threefry key: JAX draws a vmapped batch of those from its first key
      only, which would tie a particle's sample to how particles are batched.
    - `sde`, `score`: the forward SDE and a (possibly guided) score.
    - `shape`: one particle's shape.
    - `num_particles`: number of particles (`None`: one particle, no leading axis).
    - `args`: passed to the score (e.g. a class label); shared by all particles.
    - `ts`: decreasing time grid from the noise end to the data end (default:
      500 uniform steps from `sde.T` to `1e-3`), inside `[0, sde.T]`; without `y0`
      it starts at `sde.T`, where the prior $\mathcal N(0, \sigma_T^2 I)$ stands in
      for the law $p_T$ (for an SDE that has not mixed by $T$, $\alpha(T)$ not
      small, the mismatch biases the samples, the probability-flow ODE's most:
      start from draws of $p_T$ with `y0`). It is cast to `dtype`, or
      to float32 for 16-bit particles (a grid whose times round together there is
      an error). A traced grid (under `jit`/`vmap`) is checked on the device
      instead: a bad one flags every particle as failed and its samples are NaN.
      With an adaptive `stepsize_controller` only its ends and first step are
      used; `diffrax.StepTo(ts)` is the fixed grid `ts`.
    - `process`: `"sde"` (reverse SDE) or `"ode"` (probability flow).
    - `solver`: a diffrax solver; guidediff's solvers must be built with the same
      `sde`. Default: `ExponentialIntegrator(sde)` (DDPM ancestral, the paper's
      sampler) for the SDE, `diffrax.Heun()` for the ODE and, with an adaptive
      `stepsize_controller` (which needs an error estimate), for the SDE too.
      For few steps use the multistep `SDEDPMSolverPP(sde)` / `DPMSolverPP(sde)`
      or `UniPC(sde)` on a `logsnr_grid`; benchmarks/work_precision.py compares the solvers'
      error per step on both kinds of grid. diffrax's stochastic Runge-Kutta
      solvers for additive noise (`diffrax.ShARK()`, `SRA1()`, `SEA()`, ...) run
      on the `"scan"` driver (fixed grids), whose Brownian paths then also give
      each cell's space-time Levy area; inside `diffrax.diffeqsolve` they are
      wrong backwards in time (diffrax issue #598), so `"diffeqsolve"` refuses them.
    - `driver`: `"scan"` (fixed grid, default) or `"diffeqsolve"` (default when a
      `stepsize_controller` is given).
    - `stepsize_controller`: e.g. `diffrax.PIDController(rtol, atol)` for adaptive
      steps (then the SDE noise is a `VirtualBrownianTree` with `brownian_tol`).
      Gradients through adaptive SDE steps are those of the solve with its
      accepted/rejected steps held fixed (discretise-then-optimise): the sampled
      value itself jumps when a step decision flips, so finite differences of it
      need not agree. Fixed grids have no such jumps.
    - `max_steps`: the most steps a `"diffeqsolve"` solve may take (diffrax's
      `max_steps`): with adaptive steps a particle that needs more is flagged
      failed (NaN); on a fixed grid it must be at least the grid's step count.
      The `"scan"` driver takes exactly the grid's steps and ignores it.
    - `brownian_tol`: the `VirtualBrownianTree`'s tolerance (its finest time
      resolution) for `brownian="tree"`.
    - `save_trajectory`: save every grid time (`ys` gains a time axis).
    - `save_every`: with `save_trajectory`, save every k-th grid time only,
      `ts[::k]` (k must divide the number of steps): `ys` holds
      `(len(ts) - 1) / k + 1` states per particle instead of `len(ts)`.
    - `saveat`: the same choice in diffrax's words, instead of the two above:
      a `diffrax.SaveAt` saving the grid times `ts[::k]` (e.g.
      `SaveAt(t0=True, steps=True)`, `SaveAt(ts=ts[::k])`, or
      `SaveAt(t0=True, t1=True)` for the ends) or `SaveAt(t1=True)` (the final
      state, the default). Particles stay the leading axis of `ys`. Other times,
      `fn=`, nested `SubSaveAt`s and dense output are errors: for those drive
      `diffrax.diffeqsolve` with `gd.reverse_sde` / `gd.probability_flow`.
    - `denoise`: replace the final state by Tweedie's $\hat x_0$ at `ts[-1]`.
    - `adjoint`: diffrax adjoint for the `"diffeqsolve"` driver (default
      `RecursiveCheckpointAdjoint()`, reverse mode only; `ForwardMode()` for
      forward mode, `jax.jvp` / `jax.jacfwd`, and with `brownian="unsafe"`; then
      `jax.grad` is an error naming the fix). The `"scan"` driver supports both
      modes with any `checkpoint`.
    - `checkpoint`: reverse-mode memory of the `"scan"` driver. `True` (= `"sqrt"`):
      about $2\sqrt N$ stored states for $N$ steps, at the cost of two extra forward
      passes; `"chunk"`: the same chunks with no checkpoint per step, one chunk's
      step internals kept (about $\sqrt N$ steps' activations) and one extra forward
      pass; `"step"`: one `jax.checkpoint` per step, $N$ stored states and one
      extra forward pass (often faster when states are small); `False`: every
      step's internals are stored. With `driver="diffeqsolve"` only the default
      is accepted (its reverse mode is `adjoint=`). Without a gradient every mode
      gives the same samples; `"sqrt"` and `"chunk"` still run as nested loops
      (chunks of steps), so sampling that is never differentiated may pass
      `False`: one loop, a little less per-step overhead where steps are tiny.
    - `unroll`: steps per loop iteration of the `"scan"` driver (`lax.scan`'s
      `unroll`): fewer loop iterations on accelerators, where each costs a kernel
      launch or more, at the price of a longer compile. The same values up to float
      rounding (XLA may fuse the unrolled steps' arithmetic differently).
    - `truncate_backprop`: `K` differentiates only the last `K` steps (DRaFT-K): the
      gradient stops at the state `K` steps before the end (fixed grids only).
    - `y0`: explicit initial states, `(num_particles, *shape)` (or `shape` for one
      particle), instead of prior draws; `jax.grad` reaches them. The keys still
      give the Brownian paths. See `initial_noise` for the default draws.
    - `brownian`: the SDE noise: `"grid"` (`GridBrownianPath`, default on a fixed
      grid), `"tree"` (`diffrax.VirtualBrownianTree` with `brownian_tol`; default
      with a `stepsize_controller`) or `"unsafe"` (`diffrax.UnsafeBrownianPath`:
      forward only, `driver="diffeqsolve"` on a fixed grid).
    - `sharding`: the layout of the `(num_particles, *shape)` particles over
      devices, e.g. `NamedSharding(mesh, PartitionSpec("p"))` with
      `mesh = jax.sharding.Mesh(np.array(jax.devices()), ("p",))` shards the
      particle axis (the number of particles must split evenly over its devices;
      `jax.make_mesh` needs `axis_types=(jax.sharding.AxisType.Auto,)` here, its
      default axis types are not `Auto`); a spec
      such as `PartitionSpec("p", "q")` also splits each particle's first axis
      (a saved trajectory keeps its save axis replicated). Each particle keeps its
      noise and prior draw, so its sample does not depend on the device count up
      to float rounding: XLA may compile the partitioned program with other
      algebraic rewrites (seen on forced CPU devices: a mixture oracle's division
      by a variance shared by all particles became a multiplication by its
      reciprocal, a few float32 ulps per step; tests/test_sharding.py checks which
      cases are bit-identical). With adaptive steps, the accept/reject decisions can
      amplify such a difference to the solver's tolerance or beyond (an adaptive
      SDE solve is that sensitive to its tolerances too). Array arguments must not
      be committed to other devices than the sharding's (`jax.device_put(x,
      device)` commits `x`); `y0` is moved there (traced, for a `NamedSharding`),
      except when it is a committed argument of the caller's own `jax.jit`, which
      JAX refuses before the sampler runs: move it before. The spec may name mesh
      axes of type `Auto` only (`jax.make_mesh(..., axis_types=...)`); with a mesh
      that has axes of other types, `jax.grad` outside `jax.jit` needs `with
      jax.set_mesh(mesh):` around it (JAX's own limitation: "cannot reshape
      array"). Inside a `jax.set_mesh` block the sharding's mesh is that
      block's. Not inside `jax.shard_map` (the body already runs per shard).
    - `dtype`: the particles' floating-point dtype (default: JAX's default float;
      float64 needs `jax_enable_x64`, as for JAX's own arrays). 16-bit particles
      (`driver="scan"` only) step on a float32 time grid: the prior, the noise and
      each step's scalar coefficients are computed in float32, and the state is
      rounded to `dtype` after every step; `Samples.ts` is then float32. A 16-bit
      state loses any step's change smaller than half its resolution: with noise
      (the SDE) rounding averages out, but hundreds of small deterministic steps
      (the probability-flow ODE on a fine grid) shrink the samples measurably in
      bfloat16. For accuracy keep `dtype=float32` and compute the network in
      bfloat16 (`gd.MLPScoreNet(dtype=jnp.bfloat16)`): the matmuls are most of a
      step's cost.

    **Returns:** a `Samples`. Failed particles are flagged in `failed`, never raised.

    **Gradients.** `jax.grad` of any scalar function of `out.ys` differentiates
    through every step (discretise-then-optimise): with respect to guidance weights
    and schedules, network parameters, SDE schedule parameters (e.g.
    `LinearBeta.beta_max`) and `y0`. The grid path and the virtual tree are smooth
    functions of everything but the key; `brownian="unsafe"` raises on reverse mode.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        out = gd.sample(jr.key(0), sde, gmm.score(sde), (2,), num_particles=1000)
        out.ys.shape  # (1000, 2)
        ```

    !!! example "Gradient with respect to a guidance weight"

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
        s_r = gmm.tilt(reward).score(sde)  # the score of p^r ∝ p r

        def mean_reward(w):
            guided = gd.guide(gmm.score(sde), gd.reward_guidance(s_r, w))
            ys = gd.sample(jr.key(0), sde, guided, (2,), num_particles=256).ys
            return jnp.mean(jax.vmap(reward)(ys))

        dw = jax.grad(mean_reward)(0.5)
        ```
    """
    check_key(key)
    _check_sde(sde)
    shape = _check_shape(shape)
    dtype = _check_dtype(dtype)
    num_particles = _check_count("num_particles", num_particles, allow_none=True)
    save_trajectory = _check_flag("save_trajectory", save_trajectory)
    denoise = _check_flag("denoise", denoise)
    if process not in ("sde", "ode"):
        raise ValueError(f"process must be 'sde' or 'ode', got {process!r}")
    if driver is None:
        driver = "scan" if stepsize_controller is None else "diffeqsolve"
    if isinstance(stepsize_controller, dfx.StepTo):
        # StepTo(ts) is a fixed grid: the same as ts= (one batched solve, the
        # grid Brownian path), so its grid is checked as ts= is
        ts = _step_to_grid(stepsize_controller, ts)
        stepsize_controller = None
    if driver not in ("scan", "diffeqsolve"):
        raise ValueError(f"driver must be 'scan' or 'diffeqsolve', got {driver!r}")
    if driver == "scan" and stepsize_controller is not None:
        raise ValueError("adaptive step sizes need driver='diffeqsolve'")
    if driver == "diffeqsolve" and dtype.itemsize < 4:
        raise ValueError(
            f"driver='diffeqsolve' cannot integrate {dtype} particles: "
            "diffrax.diffeqsolve promotes the state to its time dtype, and 16-bit "
            "times cannot resolve a sampling grid. Use driver='scan' (the default on "
            f"a fixed grid), which steps {dtype} particles on a float32 grid, or "
            "dtype=jnp.float32"
        )
    check_score(score)
    if stepsize_controller is not None and not isinstance(
        stepsize_controller, dfx.AbstractStepSizeController
    ):
        raise TypeError(
            "stepsize_controller must be a diffrax step size controller (e.g. "
            f"diffrax.PIDController(rtol=1e-3, atol=1e-3)), got {stepsize_controller!r}"
        )
    if adjoint is not None and not isinstance(adjoint, dfx.AbstractAdjoint):
        raise TypeError(
            f"adjoint must be a diffrax adjoint (e.g. diffrax.RecursiveCheckpointAdjoint"
            f"()), got {adjoint!r}"
        )
    if isinstance(adjoint, dfx.ImplicitAdjoint):
        raise ValueError(
            "adjoint=diffrax.ImplicitAdjoint() differentiates a steady state (the "
            "implicit function theorem at the solve's end), which a sampler never "
            "reaches: its gradient would be zero. Use RecursiveCheckpointAdjoint "
            "(default), ForwardMode(), or BacksolveAdjoint() for the adaptive ODE"
        )
    if adjoint is not None and driver == "scan":
        raise ValueError(
            "adjoint= applies to driver='diffeqsolve'; the 'scan' driver's reverse "
            "mode is set by checkpoint= ('sqrt', 'chunk', 'step' or False)"
        )
    if ts is None:
        ts = uniform_grid(sde.T, 1e-3, 500)
    ts = _grid_in_dtype(sde, ts, dtype, start_at_T=y0 is None)
    brownian = _check_brownian(brownian, process, driver, stepsize_controller, adjoint)
    max_steps = _check_count("max_steps", max_steps)
    if driver == "diffeqsolve" and stepsize_controller is None:
        if max_steps < ts.shape[0] - 1:
            raise ValueError(
                f"max_steps={max_steps} is fewer than the grid's {ts.shape[0] - 1} "
                "steps: diffeqsolve would stop early and fail every particle"
            )
    tol = _check_static_float("brownian_tol", brownian_tol)
    if process == "sde" and brownian == "tree":
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"brownian_tol must be finite and positive, got {tol}")
    if isinstance(adjoint, dfx.BacksolveAdjoint) and (
        process != "ode" or stepsize_controller is None
    ):
        raise ValueError(
            "adjoint=BacksolveAdjoint() (a continuous adjoint) is supported for the "
            "probability-flow ODE with an adaptive stepsize_controller only; use "
            "RecursiveCheckpointAdjoint (default) or the scan driver's checkpoint="
        )
    if adjoint is None:
        unsafe = process == "sde" and brownian == "unsafe"
        adjoint = _FORWARD_MODE if unsafe else _DEFAULT_ADJOINT
    truncate = _check_truncate(truncate_backprop, stepsize_controller)
    if saveat is not None:
        save_trajectory, save_every = _saveat_flags(
            saveat, ts, save_trajectory, save_every, stepsize_controller is not None
        )
    save_every = _check_save_every(save_every, save_trajectory, ts, truncate)
    checkpoint = _checkpoint_mode(checkpoint, driver)
    unroll = _check_unroll(unroll, driver)
    adaptive = stepsize_controller is not None
    if solver is None:
        sde_default = dfx.Heun() if adaptive else _default_sde_solver(sde)
        solver = sde_default if process == "sde" else dfx.Heun()
    _check_solver(solver, process, stepsize_controller, sde, driver)
    _check_half_steps(solver, process, brownian)
    _check_adaptive_solver(solver, adaptive, adjoint, bool(save_trajectory), driver)
    _check_score_shape(score, ts, shape, dtype, args)
    _check_network_end(score, solver, sde, ts)
    _check_guidance_sde(score, sde)
    _check_intervals(score, ts, solver, adaptive, denoise, sde)
    args = _args_as_arrays(args)

    if y0 is not None:
        y0, num_particles = _check_y0(y0, shape, dtype, num_particles)
    single = num_particles is None
    if y0 is not None and single:
        y0 = y0[None]
    _check_sharding(sharding, 1 if single else num_particles, shape, single)
    if sharding is not None and y0 is not None:
        y0 = _placed_y0(y0, sharding)
    static = (
        1 if single else num_particles,
        sharding,
        shape,
        dtype,
        process,
        driver,
        save_every if save_trajectory else 0,
        bool(denoise),
        # what the program does not use is left out of its cache key (a new
        # max_steps for the scan driver, or a tolerance of a tree that is not
        # drawn, compiled again for the same program)
        max_steps if driver == "diffeqsolve" else None,
        checkpoint,
        StaticFloat(tol) if process == "sde" and brownian == "tree" else None,
        brownian if process == "sde" else None,
        truncate,
        single,
        bool(save_trajectory),
        unroll,
    )
    try:
        return _call_laid_out(
            _sample_jit,
            sharding,
            *(key, y0, sde, score, args, ts, solver, adjoint, stepsize_controller),
            static,
        )
    except TypeError as e:
        # jax.jvp / jacfwd over diffrax's reverse-mode adjoint (a custom_vjp)
        reverse_only = not isinstance(adjoint, dfx.ForwardMode)
        if driver == "diffeqsolve" and reverse_only and "forward-mode" in str(e):
            raise TypeError(
                f"forward-mode differentiation (jax.jvp, jax.jacfwd) through "
                f"driver='diffeqsolve' needs adjoint=diffrax.ForwardMode(); "
                f"{type(adjoint).__name__} is reverse mode only. Or use "
                "driver='scan' (the default on a fixed grid), which supports both"
            ) from e
        raise
