"""guidediff against its peers on the same sampler and network.

- `torch_eager`: an eager PyTorch loop of the same Euler-Maruyama sampler and score
  (the MLP with weights copied from the JAX model, or the same Gaussian mixture's
  exact score written in torch), float32 matmuls at torch's "high" precision (TF32
  on a GPU, like JAX's default there); `torch_eager_fp32` at torch's default
  "highest" (true float32), compared with `guidediff_fp32` (gd.sample traced under
  `jax.default_matmul_precision("highest")`). Skipped with a note when torch is not
  installed (`--require-torch` makes that an error).
- `diffrax_unsafe` / `diffrax_vbt`: `diffrax.diffeqsolve` (Euler, `StepTo(ts)`,
  `ControlTerm` with a diagonal lineax operator) with `UnsafeBrownianPath` /
  `VirtualBrownianTree`, vmapped over particles; forward, and the VBT gradient
  (`UnsafeBrownianPath` cannot be reverse-differentiated). `diffrax_vbt_batched`:
  the VBT gradient of one solve of the whole population (a flat `(P * d,)` state),
  whose adjoint keeps one parameter cotangent instead of one per particle.
- `guidediff_diffeqsolve`: `gd.sample(..., driver="diffeqsolve")` (diffrax's loop
  with guidediff's grid path), to show what the `"scan"` driver saves.

All inside `jax.jit`; reference: `guidediff` = `gd.sample(..., driver="scan")`.
speedup = t_peer / t_guidediff.

    PYTHONPATH=. python -m benchmarks.peers [--quick] [--sizes 2d 64d 3072d]
"""

import math

import jax
import jax.random as jr
import numpy as np

from . import _common as C, _problems as P


NAME = "peers"


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_sampler(problem: P.Problem, ts, torch, device):
    """The eager PyTorch loop: returns (run(seed) -> tensor, block(out) -> out).

    The MLP sizes run the same MLP (weights copied from the JAX model); the 2-D size
    runs the exact score of the same isotropic Gaussian mixture, written in torch."""
    ts = np.asarray(ts, np.float64)
    # Per-step scalars on the host, as an eager loop would hold them.
    coefs = []
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        dt = float(t1 - t0)
        f = float(P.SDE.drift_coeff(t0))
        g = float(P.SDE.diffusion(t0))
        alpha, sigma = (float(v) for v in P.SDE.marginal(t0))
        coefs.append(
            (float(t0), dt, f, g, math.copysign(math.sqrt(abs(dt)), dt), alpha, sigma)
        )
    n, d = problem.particles, problem.dim

    def to(a):
        return torch.from_numpy(np.array(a, np.float32)).to(device)

    if problem.width is None:
        score = _torch_gmm_score(problem, torch, to)
    else:
        score = _torch_mlp_score(problem, torch, to)

    def run(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            x = torch.randn(n, d, device=device, generator=gen)
            for t0, dt, f, g, sq, alpha, sigma in coefs:
                s = score(t0, alpha, sigma, x)
                noise = torch.randn(n, d, device=device, generator=gen)
                x = x + (f * x - (g * g) * s) * dt + (g * sq) * noise
        return x

    def block(out):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run, block


def _torch_mlp_score(problem: P.Problem, torch, to):
    mlp = problem.params
    layers = [(to(w), to(b)) for w, b in mlp.layers]
    time_w = to(mlp.time_w)
    silu = torch.nn.functional.silu

    def score(t0, alpha, sigma, x):
        w0, b0 = layers[0]
        h = torch.addmm(b0 + t0 * time_w, x, w0)
        for w, b in layers[1:]:
            h = torch.addmm(b, silu(h), w)
        return h - x

    return score


def _torch_gmm_score(problem: P.Problem, torch, to):
    """The exact score of `P.ring_gmm()` (isotropic components) at time t:
    sum_k resp_k(x) (alpha mu_k - x) / v_t, v_t = alpha^2 var_k + sigma^2."""
    gmm = P.ring_gmm()
    means = to(gmm.means)  # (K, d)
    var = to(np.diagonal(np.asarray(gmm.covs), axis1=-2, axis2=-1)[:, 0])  # (K,)
    log_w = to(np.log(np.asarray(gmm.weights)))
    d = problem.dim

    def score(t0, alpha, sigma, x):
        v = alpha * alpha * var + sigma * sigma  # (K,)
        diff = alpha * means[None] - x[:, None]  # (n, K, d)
        logits = log_w - 0.5 * (diff * diff).sum(-1) / v - 0.5 * d * torch.log(v)
        resp = torch.softmax(logits, dim=-1)  # (n, K)
        return ((resp / v)[..., None] * diff).sum(1)

    return score


def _highest(sampler):
    """The sampler traced with true float32 matmuls (JAX's default on GPUs is TF32)."""

    def run(*a):
        with jax.default_matmul_precision("highest"):
            return sampler(*a)

    return run


def run_size(size: P.Size, args, torch) -> dict:
    problem = P.make_problem(size, P.particles_for(size, args), quick=args.quick)
    steps = P.steps_for(args)
    ts = P.time_grid(steps)
    key = jr.key(0)
    print(f"-- {size.name}: {problem.particles} particles, {steps} steps", flush=True)

    def time_all(fns, label):
        return C.time_all(
            fns, problem.params, key, ts, repeats=args.repeats, label=label
        )

    fwd, _ = time_all(
        {
            "guidediff": jax.jit(P.gd_sampler(problem)),
            "guidediff_fp32": jax.jit(_highest(P.gd_sampler(problem))),
            "guidediff_diffeqsolve": jax.jit(
                P.gd_sampler(problem, driver="diffeqsolve", max_steps=steps)
            ),
            "diffrax_unsafe": jax.jit(P.diffrax_sampler(problem, path="unsafe")),
            "diffrax_vbt": jax.jit(
                P.diffrax_sampler(problem, path="vbt", tol=args.vbt_tol)
            ),
        },
        "forward  ",
    )
    notes = []
    if torch is None:
        notes.append("torch_eager: skipped, torch is not installed")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run, block = torch_sampler(problem, ts, torch, device)
        # "high" (TF32 on a GPU, like JAX's default there) and "highest" (true
        # float32: torch's own default), against guidediff at the same precision.
        for name, precision in (
            ("torch_eager", "high"),
            ("torch_eager_fp32", "highest"),
        ):
            torch.set_float32_matmul_precision(precision)
            fwd[name], _ = C.try_timeit(run, 0, repeats=args.repeats, block=block)
            fwd[name]["device"] = str(device)
            fwd[name]["float32_matmul_precision"] = precision
            print(f"  forward  {name} ({device}) {C.describe(fwd[name])}")
    grads = {"guidediff": P.grad_of(P.gd_sampler(problem, checkpoint=True))}
    # diffrax's adjoint under vmap keeps one parameter cotangent per particle.
    need = P.per_particle_cotangent_bytes(problem)
    limit = (C.device_memory_stats() or {}).get("bytes_limit")
    if limit is not None and need > 0.8 * limit:
        notes.append(
            f"diffrax_vbt backward: skipped, its per-particle parameter cotangents "
            f"need {need / 2**30:.1f} GiB (device limit {limit / 2**30:.1f} GiB)"
        )
    else:
        grads["diffrax_vbt"] = P.grad_of(
            P.diffrax_sampler(problem, path="vbt", tol=args.vbt_tol)
        )
    # one solve of the whole population: one parameter cotangent (the fair baseline)
    grads["diffrax_vbt_batched"] = P.grad_of(
        P.diffrax_sampler(problem, path="vbt", tol=args.vbt_tol, batched=True)
    )
    bwd, _ = time_all(grads, "backward ")
    bwd.setdefault("diffrax_vbt", {"skipped": "out of device memory (see notes)"})
    speedups = {
        f"forward_{k}": C.ratio(v, fwd["guidediff"])
        for k, v in fwd.items()
        if k not in ("guidediff", "guidediff_fp32", "torch_eager_fp32")
    }
    if "torch_eager_fp32" in fwd:
        # like for like: true float32 matmuls on both sides
        speedups["forward_torch_eager_fp32_vs_guidediff_fp32"] = C.ratio(
            fwd["torch_eager_fp32"], fwd["guidediff_fp32"]
        )
    speedups["backward_diffrax_vbt"] = C.ratio(bwd["diffrax_vbt"], bwd["guidediff"])
    speedups["backward_diffrax_vbt_batched"] = C.ratio(
        bwd["diffrax_vbt_batched"], bwd["guidediff"]
    )
    return {
        **P.run_fields(size, problem.particles, steps, problem.width),
        "forward": fwd,
        "backward": bwd,
        "speedup_of_guidediff": speedups,
        "notes": notes,
    }


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(P.SIZES), choices=list(P.SIZES))
    p.add_argument("--vbt-tol", type=float, default=1e-3)
    p.add_argument(
        "--require-torch",
        action="store_true",
        help="fail when torch is missing (the eager-PyTorch comparison is required)",
    )
    args = C.parse(p, argv)
    C.header(NAME)
    torch = _torch()
    if torch is None and args.require_torch:
        raise SystemExit("peers: --require-torch, but torch is not installed")
    results = [run_size(P.SIZES[s], args, torch) for s in args.sizes]
    rows = [{"size": r["size"], **r["speedup_of_guidediff"]} for r in results]
    print("speedup of guidediff = t_peer / t_guidediff")
    C.print_table(rows, sorted({k for r in rows for k in r}, key=_col_order))
    C.write_result(
        NAME,
        args,
        {
            "solver": "Euler-Maruyama, reverse VP SDE, uniform grid (StepTo)",
            "vbt_tol": args.vbt_tol,
            "torch_available": torch is not None,
            "torch_f32_matmul_precision": {
                "torch_eager": "high (TF32 on GPUs)",
                "torch_eager_fp32": "highest (torch's default)",
            },
            "guidediff_fp32": "gd.sample traced under jax.default_matmul_precision('highest')",
            "jax_f32_matmul": C.f32_matmul_probe(),
            "speedup_definition": "t_peer / t_guidediff (run_s medians)",
            "results": results,
        },
    )
    return {"results": results}


def _col_order(col: str):
    return (col != "size", col)


if __name__ == "__main__":
    main()
