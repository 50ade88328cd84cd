"""The problems the benchmarks share: sizes, score networks, and samplers.

Three sizes (DESIGN.md, the performance issue):

- `2d`: a 2-D, 8-component Gaussian mixture with its exact score (`gd.GaussianMixture`);
- `64d`: a 64-D state and a score MLP with 3 hidden SiLU layers of 512;
- `3072d`: a 3072-D state (a 32x32x3 image, flattened) and an MLP of 3 x 1024.

Every sampler integrates the reverse VP SDE (linear beta) from T = 1 to 1e-3 on a
uniform grid with Euler-Maruyama: it is a function `run(params, key, ts)` returning
the final particles `(P, d)`. The grid is an argument, not a constant closed over
under `jax.jit` (XLA:GPU in jax 0.11.2 fails to run some of guidediff's scans with a
constant grid: "Failed to evaluate instruction ... since it depends on infeed or
parameters to its parent computation").

- `gd_sampler`: `gd.sample(..., solver=diffrax.Euler(), driver="scan")` with
  guidediff's grid Brownian path (or `driver="diffeqsolve"`);
- `hand_sampler`: the baseline, a hand-fused `lax.scan` Euler-Maruyama loop over the
  whole particle batch with the same score inlined. `noise="batch"` draws one
  `(P, d)` normal per step (the loop one would write by hand); `noise="particle"`
  draws the noise exactly as guidediff does (per-particle keys), so its samples
  equal `gd_sampler`'s up to float rounding;
- `diffrax_sampler`: plain `diffrax.diffeqsolve` (per particle, or `batched`: one
  solve of the whole population) with `UnsafeBrownianPath` or
  `VirtualBrownianTree`, vmapped over particles, as diffrax's documentation writes it.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
from jaxtyping import Array

import guidediff as gd
from guidediff._brownian import cell_normal


SDE = gd.VPSDE()
T_END = 1e-3
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Size:
    """A benchmark size: state dimension, network and default particle counts."""

    name: str
    dim: int
    width: int | None  # hidden width of the MLP; None for the exact GMM score
    depth: int  # number of hidden layers
    particles: int  # on an accelerator
    cpu_particles: int  # on a CPU (not --quick)
    quick_particles: int  # --quick
    quick_width: int | None


SIZES = {
    "2d": Size("2d", 2, None, 0, 65536, 4096, 64, None),
    "64d": Size("64d", 64, 512, 3, 65536, 1024, 32, 64),
    "3072d": Size("3072d", 3072, 1024, 3, 4096, 64, 8, 64),
}


def particles_for(size: Size, args) -> int:
    """Particle count: `--particles`, else the size's count for the run kind."""
    from ._common import on_accelerator

    if args.particles is not None:
        return int(args.particles)
    if args.quick:
        return size.quick_particles
    return size.particles if on_accelerator() else size.cpu_particles


def steps_for(args, default: int = 500, quick: int = 8) -> int:
    if args.steps is not None:
        return int(args.steps)
    return quick if args.quick else default


def run_fields(size: Size, particles: int, steps: int, width=None) -> dict:
    """The sizes a result row records."""
    return {
        "size": size.name,
        "dim": size.dim,
        "particles": particles,
        "steps": steps,
        "network_width": width,
    }


def time_grid(steps: int) -> Array:
    return gd.uniform_grid(SDE.T, T_END, steps)


# ---------------------------------------------------------------------------------
# Score models
# ---------------------------------------------------------------------------------


class MLP(eqx.Module):
    """An MLP on plain jnp weights (a Flax-free stand-in for a score network).

    `h = silu(x W0 + b0 + t w_t [+ E[label]])`, then `depth - 1` more SiLU layers, then
    a linear read-out. Works on one particle `x: (d,)` or a batch `(..., d)` (a shared
    `t` and `label`): the hand-fused loop calls it on the whole batch. Computes in the
    weights' dtype and returns `x`'s dtype.
    """

    layers: tuple[tuple[Array, Array], ...]
    time_w: Array
    label_emb: Array | None

    def __call__(self, t, x, label=None):
        cdt = self.layers[0][0].dtype
        w0, b0 = self.layers[0]
        h = x.astype(cdt) @ w0 + b0 + jnp.asarray(t, cdt) * self.time_w
        if self.label_emb is not None:
            null = self.label_emb.shape[0] - 1
            h = h + self.label_emb[null if label is None else label]
        for w, b in self.layers[1:]:
            h = jax.nn.silu(h) @ w + b
        return h.astype(x.dtype)


def init_mlp(
    key, dim: int, width: int, depth: int, *, num_classes=None, dtype=jnp.float32
) -> MLP:
    """LeCun-normal weights, small read-out (the output stays O(1))."""
    sizes = [dim] + [width] * depth + [dim]
    keys = jr.split(key, len(sizes) + 1)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        scale = (0.1 if i == len(sizes) - 2 else 1.0) / jnp.sqrt(n_in)
        w = (scale * jr.normal(keys[i], (n_in, n_out))).astype(dtype)
        layers.append((w, jnp.zeros((n_out,), dtype)))
    time_w = jr.normal(keys[-2], (width,)).astype(dtype)
    emb = None
    if num_classes is not None:
        emb = jr.normal(keys[-1], (num_classes + 1, width)).astype(dtype)
    return MLP(tuple(layers), time_w, emb)


def mlp_flops(dim: int, width: int, depth: int) -> int:
    """Matmul FLOPs of one MLP evaluation on one particle: sum of 2 * in * out."""
    sizes = [dim] + [width] * depth + [dim]
    return sum(2 * a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def ring_gmm(k: int = 8, radius: float = 4.0, var: float = 0.1) -> gd.GaussianMixture:
    angles = jnp.arange(k) * (2 * jnp.pi / k)
    means = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    return gd.GaussianMixture(
        jnp.full((k,), 1.0 / k), means, jnp.full((k,), var), labels=jnp.arange(k) % 2
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    """A size made concrete: differentiable `params` and how to score with them."""

    size: Size
    particles: int
    params: Any  # the pytree that gradients are taken with respect to
    score_of: Callable  # params -> a per-particle gd score
    batchable: bool  # the score also works on a (P, d) batch (the MLP does)
    flops_per_eval: int | None  # matmul FLOPs per particle per score evaluation
    width: int | None

    @property
    def dim(self) -> int:
        return self.size.dim

    def batch_score(self, params, t, x, args=None):
        """The score of a `(P, d)` batch at a shared time `t` (the hand loop's call)."""
        score = self.score_of(params)
        if self.batchable:
            return score(t, x, args)
        return jax.vmap(score, in_axes=(None, 0, None))(t, x, args)


def _gmm_score_of(gmm):
    def score_of(means):
        return eqx.tree_at(lambda g: g.means, gmm, means).score(SDE)

    return score_of


class MLPScore(gd.AbstractScore):
    """`s(t, x) = -x + mlp(t, x, label)`: the N(0, I) score plus a learned-looking
    correction (the reverse SDE stays stable with random weights). Works on one
    particle or on a batch."""

    mlp: MLP

    def __call__(self, t, x, args=None):
        return self.mlp(t, x, args) - x


def _mlp_score_of(model):
    return MLPScore(model)


def make_problem(
    size: Size,
    particles: int,
    *,
    quick: bool = False,
    num_classes: int | None = None,
    dtype=jnp.float32,
    key=None,
) -> Problem:
    key = jr.key(1234) if key is None else key
    if size.width is None:
        gmm = ring_gmm()
        return Problem(
            size, particles, gmm.means, _gmm_score_of(gmm), False, None, None
        )
    width = size.quick_width if quick else size.width
    model = init_mlp(
        key, size.dim, width, size.depth, num_classes=num_classes, dtype=dtype
    )
    flops = mlp_flops(size.dim, width, size.depth)
    return Problem(size, particles, model, _mlp_score_of, True, flops, width)


def per_particle_cotangent_bytes(problem: Problem) -> int:
    """Bytes of one float32 copy of the parameters per particle: what a diffrax
    adjoint vmapped over particles materialises for the parameter cotangents."""
    n = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(problem.params))
    return 4 * n * problem.particles


def loss_mean_square(ys):
    """The objective whose gradient is timed: the mean of the samples squared."""
    return jnp.mean(jnp.square(ys.astype(jnp.float32)))


# ---------------------------------------------------------------------------------
# Samplers: each returns fn(params, key) -> (P, d) final particles.
# ---------------------------------------------------------------------------------


def gd_sampler(
    problem: Problem,
    *,
    driver="scan",
    guidance=None,
    args=None,
    particles=None,
    **sample_kwargs,
):
    """`gd.sample` with `diffrax.Euler()` on the grid `ts` (guidediff's grid noise)."""
    n = problem.particles if particles is None else particles

    def run(params, key, ts):
        score = problem.score_of(params)
        if guidance is not None:
            score = gd.guide(score, guidance)
        out = gd.sample(
            key,
            SDE,
            score,
            (problem.dim,),
            num_particles=n,
            args=args,
            ts=ts,
            solver=dfx.Euler(),
            driver=driver,
            **sample_kwargs,
        )
        return out.ys

    return run


def flax_mlp_sampler(problem: Problem, dtype, *, args=None):
    """`gd.sample` (scan driver, Euler) with the library's own Flax network,
    `gd.MLPScoreNet(hidden=(width,) * depth, dtype=dtype)` read as an eps-prediction
    score (`gd.flax_score`), on the problem's size. Returns `(run, variables)`:
    `run(variables, key, ts)`; float32 parameters, `dtype` computation."""
    net = gd.MLPScoreNet(
        hidden=(problem.width,) * problem.size.depth,
        num_classes=NUM_CLASSES,
        dtype=dtype,
    )
    variables = jax.jit(net.init)(jr.key(5), 0.5, jnp.zeros(problem.dim), 0)

    def run(variables, key, ts):
        out = gd.sample(
            key,
            SDE,
            gd.flax_score(net, variables, SDE),
            (problem.dim,),
            num_particles=problem.particles,
            args=args,
            ts=ts,
            solver=dfx.Euler(),
        )
        return out.ys

    return run, variables


def _em_increment(t0, t1, x, score, xi):
    """One Euler-Maruyama step of the reverse SDE: the same arithmetic as
    `diffrax.Euler` on `gd.reverse_sde` (drift * dt + g * dW)."""
    dt = t1 - t0
    g = SDE.diffusion(t0)
    drift = SDE.drift(t0, x) - (g**2) * score
    dw = jnp.sign(dt) * jnp.sqrt(jnp.abs(dt)) * xi
    return x + (drift * dt + g * dw)


def hand_sampler(
    problem: Problem,
    *,
    noise="batch",
    checkpoint=False,
    args=None,
    network=True,
    unroll=1,
):
    """The hand-fused `lax.scan` Euler-Maruyama baseline (see the module docstring).

    For attributing a step's time: `noise="none"` drops the noise (network and
    update only), `network=False` replaces the score by 0 (noise and update only).
    """
    p, d = problem.particles, problem.dim

    def run(params, key, ts):
        n = ts.shape[0] - 1
        if noise == "batch":
            k_prior, k_bm = jr.split(key)
            x0 = jr.normal(k_prior, (p, d))

            def normal(cell):
                return jr.normal(jr.fold_in(k_bm, cell), (p, d))

        elif noise == "particle":
            # guidediff's scheme: particle i has key fold_in(key, i), split into the
            # prior key and the Brownian key; cell k's increment is
            # cell_normal(bm, k) (Threefry in counter mode on the Brownian key).
            keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(p))
            k_both = jax.vmap(jr.split)(keys)
            k_prior, k_bm = k_both[:, 0], k_both[:, 1]
            x0 = jax.vmap(lambda k: jr.normal(k, (d,)))(k_prior)

            def normal(cell):
                return jax.vmap(lambda k: cell_normal(k, cell, (d,), jnp.float32))(k_bm)

        elif noise == "none":
            x0 = jr.normal(key, (p, d))

            def normal(cell):
                return jnp.zeros((p, d))

        else:
            raise ValueError(noise)

        def step(x, inp):
            t0, t1, cell = inp
            if network:
                s = problem.batch_score(params, t0, x, args)
            else:
                s = jnp.zeros_like(x)
            return _em_increment(t0, t1, x, s, normal(cell)), None

        if checkpoint:
            step = jax.checkpoint(step)
        # The grid decreases; the grid path numbers cells along the sorted grid.
        cells = jnp.arange(n - 1, -1, -1)
        x, _ = lax.scan(step, x0, (ts[:-1], ts[1:], cells), unroll=unroll)
        return x

    return run


def network_alone(problem: Problem, *, args=None):
    """The score network alone, chained in its compute dtype for `len(ts) - 1`
    evaluations (`x <- mlp(t, x) / 2`): no sampler state, no noise, no update. Its
    FLOP/s is the ceiling that the network can reach at this size inside any loop."""
    p, d = problem.particles, problem.dim

    def run(params, key, ts):
        cdt = params.layers[0][0].dtype
        x0 = jr.normal(key, (p, d)).astype(cdt)

        def step(x, t):
            return (params(t, x, args) * 0.5).astype(cdt), None

        return lax.scan(step, x0, ts[:-1])[0]

    return run


class _Drift(eqx.Module):
    score: gd.AbstractScore

    def __call__(self, t, y, args):
        return SDE.drift(t, y) - SDE.diffusion(t) ** 2 * self.score(t, y, args)


def _diag_diffusion(t, y, args):
    return lx.DiagonalLinearOperator(SDE.diffusion(t) * jnp.ones_like(y))


class _BatchedDrift(eqx.Module):
    """`_Drift` of a flat `(P * d,)` state holding P particles of dimension d."""

    score: gd.AbstractScore
    dim: int = eqx.field(static=True)

    def __call__(self, t, y, args):
        drift = jax.vmap(_Drift(self.score), in_axes=(None, 0, None))
        return drift(t, y.reshape(-1, self.dim), args).reshape(-1)


def diffrax_sampler(
    problem: Problem,
    *,
    path="vbt",
    tol=1e-3,
    adjoint=None,
    max_steps=None,
    batched=False,
):
    """Plain `diffrax.diffeqsolve` (Euler, `StepTo(ts)`) of the reverse SDE written
    with `ControlTerm` + a diagonal `lineax` operator, with an `UnsafeBrownianPath`
    (`path="unsafe"`) or a `VirtualBrownianTree` of tolerance `tol` (`path="vbt"`).

    `batched=False`: one solve per particle, vmapped (the usual way to write it;
    reverse mode then keeps one cotangent of the parameters per particle).
    `batched=True`: one solve of all P particles as a flat `(P * d,)` state with one
    `(P * d,)` Brownian path, so the adjoint keeps one parameter cotangent: the
    strongest diffrax baseline for parameter gradients."""
    d = problem.dim
    if adjoint is None:
        # diffrax refuses RecursiveCheckpointAdjoint with UnsafeBrownianPath.
        unsafe = path == "unsafe"
        adjoint = dfx.ForwardMode() if unsafe else dfx.RecursiveCheckpointAdjoint()

    def one(params, key, ts, size=d, drift=None):
        n = ts.shape[0] - 1
        k_prior, k_bm = jr.split(key)
        y0 = jr.normal(k_prior, (size,))
        if path == "vbt":
            bm = dfx.VirtualBrownianTree(ts[-1], ts[0], tol, (size,), k_bm)
        elif path == "unsafe":
            bm = dfx.UnsafeBrownianPath((size,), k_bm)
        else:
            raise ValueError(path)
        if drift is None:
            drift = _Drift(problem.score_of(params))
        terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(_diag_diffusion, bm))
        sol = dfx.diffeqsolve(
            terms,
            dfx.Euler(),
            ts[0],
            ts[-1],
            None,
            y0,
            stepsize_controller=dfx.StepTo(ts),
            saveat=dfx.SaveAt(t1=True),
            adjoint=adjoint,
            max_steps=n if max_steps is None else max_steps,
        )
        return sol.ys[0]

    def run(params, key, ts):
        keys = jax.vmap(lambda i: jr.fold_in(key, i))(jnp.arange(problem.particles))
        return jax.vmap(one, in_axes=(None, 0, None))(params, keys, ts)

    def run_batched(params, key, ts):
        drift = _BatchedDrift(problem.score_of(params), d)
        y = one(params, key, ts, size=problem.particles * d, drift=drift)
        return y.reshape(problem.particles, d)

    return run_batched if batched else run


def grad_of(sampler: Callable, loss: Callable = loss_mean_square) -> Callable:
    """`jax.jit(jax.grad(params -> loss(sampler(params, key, ts))))`."""
    return jax.jit(jax.grad(lambda params, key, ts: loss(sampler(params, key, ts))))


def max_abs_diff(a, b) -> float | None:
    """On the host (the arrays may live on different devices); None if either
    run failed."""
    if a is None or b is None:
        return None
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def frac_rows_differing(a, b, tol: float) -> float | None:
    """The fraction of particles (rows) whose largest |a - b| exceeds `tol`."""
    if a is None or b is None:
        return None
    diff = np.abs(np.asarray(a) - np.asarray(b)).reshape(np.shape(a)[0], -1)
    return float(np.mean(diff.max(axis=1) > tol))


def tree_max_abs_diff(a, b) -> float | None:
    if a is None or b is None:
        return None
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    return float(max(leaves)) if leaves else 0.0
