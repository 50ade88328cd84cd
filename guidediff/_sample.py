r"""Sampling: prior draw -> reverse SDE / probability-flow ODE -> particles.

One particle's solve is written once; particles are a `vmap` over per-particle keys
`fold_in(key, i)`, so particle `i`'s sample does not depend on how many are drawn or
how they are sharded. Two drivers run the same diffrax solvers:

- `"scan"` (default on a fixed grid): a `lax.scan` over the solver's own `init`/`step`,
  with a per-step `jax.checkpoint` for reverse mode (memory O(N·d) per particle for
  the carried states only, recomputing each step's internals);
- `"diffeqsolve"`: `diffrax.diffeqsolve` with `StepTo(ts)`, or with an adaptive
  `stepsize_controller` (then the noise is a `VirtualBrownianTree`).

Both give the same samples for the same key on the same grid.
"""

from typing import Literal

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from ._brownian import GridBrownianPath
from ._custom_types import Args, Key
from ._grid import check_grid, uniform_grid
from ._reverse import probability_flow, reverse_sde
from ._score import AbstractScore, score_to_x0
from ._sde import AbstractSDE
from ._solver import ExponentialIntegrator


class Samples(eqx.Module):
    """The output of `sample`.

    - `ys`: `(particles, *shape)`, or `(particles, len(ts), *shape)` for trajectories.
    - `ts`: the saved times (the grid for trajectories, else the final time).
    - `result`: per-particle `diffrax.RESULTS`.
    - `failed`: per-particle flag: the solver failed or the sample is not finite.
    - `num_steps`: solver steps taken per particle.
    """

    ys: Array
    ts: Array
    result: dfx.RESULTS
    failed: Bool[Array, "..."]
    num_steps: Array

    @property
    def num_failed(self) -> Array:
        return jnp.sum(self.failed)


def _particle_keys(key: Key, n: int) -> Array:
    return jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(n))


def _scan_solve(terms, solver, ts, y0, args, save_all: bool, checkpoint: bool):
    state0 = solver.init(terms, ts[0], ts[1], y0, args)

    def step(carry, t01):
        y, state, result = carry
        t0, t1 = t01
        y1, _, _, state1, res = solver.step(terms, t0, t1, y, args, state, False)
        result = dfx.RESULTS.where(result == dfx.RESULTS.successful, res, result)
        return (y1, state1, result), (y1 if save_all else None)

    if checkpoint:
        step = jax.checkpoint(step)
    carry0 = (y0, state0, dfx.RESULTS.successful)
    (y_final, _, result), ys = lax.scan(step, carry0, (ts[:-1], ts[1:]))
    if save_all:
        ys = jnp.concatenate([y0[None], ys], axis=0)
    else:
        ys = y_final
    return ys, result, jnp.asarray(ts.shape[0] - 1)


def _diffeqsolve(
    terms, solver, ts, y0, args, save_all, controller, adjoint, max_steps, dt0
):
    if controller is None:
        controller = dfx.StepTo(ts)
        dt0 = None
    saveat = dfx.SaveAt(ts=ts) if save_all else dfx.SaveAt(t1=True)
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
    )
    ys = sol.ys if save_all else sol.ys[0]
    return ys, sol.result, sol.stats["num_steps"]


def _sample_particle(
    key,
    sde,
    score,
    shape,
    dtype,
    args,
    ts,
    solver,
    process,
    driver,
    save_all,
    denoise,
    controller,
    adjoint,
    max_steps,
    checkpoint,
    bm_tol,
):
    k_prior, k_bm = jr.split(key)
    y0 = sde.prior_sample(k_prior, shape, dtype)
    struct = jax.ShapeDtypeStruct(shape, dtype)
    if process == "sde":
        if controller is None:
            bm = GridBrownianPath(struct, ts, k_bm)
        else:
            lo, hi = jnp.minimum(ts[0], ts[-1]), jnp.maximum(ts[0], ts[-1])
            bm = dfx.VirtualBrownianTree(lo, hi, tol=bm_tol, shape=struct, key=k_bm)
        terms = reverse_sde(sde, score, bm)
    else:
        terms = probability_flow(sde, score)
    if driver == "scan":
        ys, result, nsteps = _scan_solve(
            terms, solver, ts, y0, args, save_all, checkpoint
        )
    else:
        dt0 = ts[1] - ts[0]
        ys, result, nsteps = _diffeqsolve(
            terms, solver, ts, y0, args, save_all, controller, adjoint, max_steps, dt0
        )
    if denoise:
        t_end = ts[-1]
        final = ys[-1] if save_all else ys
        x0 = score_to_x0(sde, t_end, final, score(t_end, final, args))
        ys = ys.at[-1].set(x0) if save_all else x0
    failed = (result != dfx.RESULTS.successful) | ~jnp.all(jnp.isfinite(ys))
    return ys, result, failed, nsteps


@eqx.filter_jit
def _sample_jit(keys, sde, score, args, ts, solver, adjoint, controller, static):
    (shape, dtype, process, driver, save_all, denoise, max_steps, ckpt, bm_tol) = static

    def one(key):
        return _sample_particle(
            key,
            sde,
            score,
            shape,
            dtype,
            args,
            ts,
            solver,
            process,
            driver,
            save_all,
            denoise,
            controller,
            adjoint,
            max_steps,
            ckpt,
            bm_tol,
        )

    return jax.vmap(one)(keys)


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
    denoise: bool = False,
    adjoint: dfx.AbstractAdjoint | None = None,
    checkpoint: bool = True,
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
    - `sde`, `score`: the forward SDE and a (possibly guided) score.
    - `shape`: one particle's shape.
    - `num_particles`: number of particles (`None`: one particle, no leading axis).
    - `args`: passed to the score (e.g. a class label); shared by all particles.
    - `ts`: decreasing time grid from the noise end to the data end (default:
      500 uniform steps from `sde.T` to `1e-3`). With an adaptive
      `stepsize_controller` only its ends and first step are used.
    - `process`: `"sde"` (reverse SDE) or `"ode"` (probability flow).
    - `solver`: a diffrax solver. Default: `ExponentialIntegrator(sde)` for the SDE,
      `diffrax.Heun()` for the ODE.
    - `driver`: `"scan"` (fixed grid, default) or `"diffeqsolve"` (default when a
      `stepsize_controller` is given).
    - `stepsize_controller`: e.g. `diffrax.PIDController(rtol, atol)` for adaptive
      steps (then the SDE noise is a `VirtualBrownianTree` with `brownian_tol`).
    - `save_trajectory`: save every grid time (`ys` gains a time axis).
    - `denoise`: replace the final state by Tweedie's $\hat x_0$ at `ts[-1]`.
    - `adjoint`: diffrax adjoint for the `"diffeqsolve"` driver.
    - `checkpoint`: per-step `jax.checkpoint` in the `"scan"` driver (reverse mode).
    - `sharding`: shard the particle axis (e.g. a `NamedSharding` over a mesh).

    **Returns:** a `Samples`. Failed particles are flagged in `failed`, never raised.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        out = gd.sample(jr.key(0), sde, gmm.score(sde), (2,), num_particles=1000)
        out.ys.shape  # (1000, 2)
        ```
    """
    shape = tuple(int(s) for s in shape)
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    if process not in ("sde", "ode"):
        raise ValueError(f"process must be 'sde' or 'ode', got {process!r}")
    if driver is None:
        driver = "scan" if stepsize_controller is None else "diffeqsolve"
    if driver not in ("scan", "diffeqsolve"):
        raise ValueError(f"driver must be 'scan' or 'diffeqsolve', got {driver!r}")
    if driver == "scan" and stepsize_controller is not None:
        raise ValueError("adaptive step sizes need driver='diffeqsolve'")
    if not isinstance(score, AbstractScore):
        raise TypeError(
            f"score must be an AbstractScore (got {type(score).__name__}); wrap a plain "
            "function with gd.ScoreFn"
        )
    if ts is None:
        ts = uniform_grid(sde.T, 1e-3, 500)
    ts = jnp.asarray(ts, dtype)
    check_grid(sde, ts)
    if solver is None:
        solver = ExponentialIntegrator(sde) if process == "sde" else dfx.Heun()
    if adjoint is None:
        adjoint = dfx.RecursiveCheckpointAdjoint()
    _check_score_shape(score, ts, shape, dtype, args)
    # Numbers in args become array leaves, so a new label does not recompile.
    args = jtu.tree_map(
        lambda a: (
            jnp.asarray(a) if isinstance(a, int | float | bool | np.ndarray) else a
        ),
        args,
    )

    single = num_particles is None
    keys = _particle_keys(key, 1 if single else int(num_particles))
    if sharding is not None:
        keys = jax.device_put(keys, sharding)
    static = (
        shape,
        dtype,
        process,
        driver,
        bool(save_trajectory),
        bool(denoise),
        int(max_steps),
        bool(checkpoint),
        float(brownian_tol),
    )
    ys, result, failed, nsteps = _sample_jit(
        keys, sde, score, args, ts, solver, adjoint, stepsize_controller, static
    )
    out_ts = ts if save_trajectory else ts[-1]
    if single:
        ys, result, failed, nsteps = jtu.tree_map(
            lambda a: a[0], (ys, result, failed, nsteps)
        )
    return Samples(ys, out_ts, result, failed, nsteps)


def _check_score_shape(score, ts, shape, dtype, args) -> None:
    x = jax.ShapeDtypeStruct(shape, dtype)
    try:
        out = eqx.filter_eval_shape(score, ts[0], x, args)
    except Exception as e:  # re-raised with context: which call failed and why
        raise ValueError(
            f"calling the score on one particle of shape {shape} with args={args!r} "
            f"failed: {e}"
        ) from e
    if not hasattr(out, "shape") or tuple(out.shape) != shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"the score returned shape {got} for a particle of shape {shape}; a score "
            "must return an array shaped like x (scores are per particle: vmap is "
            "applied by gd.sample)"
        )
