"""guidediff against its peers on the same sampler and network.

- `torch_eager`: an eager PyTorch loop of the same Euler-Maruyama sampler and MLP
  (weights copied from the JAX model; float32 matmuls at torch's "high" precision,
  i.e. TF32 on a GPU, like JAX's default there). MLP sizes only; skipped with a note
  when torch is not installed.
- `diffrax_unsafe` / `diffrax_vbt`: `diffrax.diffeqsolve` (Euler, `StepTo(ts)`,
  `ControlTerm` with a diagonal lineax operator) with `UnsafeBrownianPath` /
  `VirtualBrownianTree`, vmapped over particles; forward, and the VBT gradient
  (`UnsafeBrownianPath` cannot be reverse-differentiated).
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
    """The eager PyTorch loop: returns (run(seed) -> tensor, block(out) -> out)."""
    mlp = problem.params

    def to(a):
        return torch.from_numpy(np.array(a, np.float32)).to(device)

    layers = [(to(w), to(b)) for w, b in mlp.layers]
    time_w = to(mlp.time_w)
    ts = np.asarray(ts, np.float64)
    # Per-step scalars on the host, as an eager loop would hold them.
    coefs = []
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        dt = float(t1 - t0)
        f = float(P.SDE.drift_coeff(t0))
        g = float(P.SDE.diffusion(t0))
        coefs.append((float(t0), dt, f, g, math.copysign(math.sqrt(abs(dt)), dt)))
    n, d = problem.particles, problem.dim
    silu = torch.nn.functional.silu

    def run(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            x = torch.randn(n, d, device=device, generator=gen)
            for t0, dt, f, g, sq in coefs:
                w0, b0 = layers[0]
                h = torch.addmm(b0 + t0 * time_w, x, w0)
                for w, b in layers[1:]:
                    h = torch.addmm(b, silu(h), w)
                score = h - x
                noise = torch.randn(n, d, device=device, generator=gen)
                x = x + (f * x - (g * g) * score) * dt + (g * sq) * noise
        return x

    def block(out):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run, block


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
    if problem.width is None:
        notes.append("torch_eager: MLP sizes only (no GMM score written in torch)")
    elif torch is None:
        notes.append("torch_eager: skipped, torch is not installed")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run, block = torch_sampler(problem, ts, torch, device)
        fwd["torch_eager"], _ = C.try_timeit(run, 0, repeats=args.repeats, block=block)
        fwd["torch_eager"]["device"] = str(device)
        print(f"  forward  torch_eager ({device}) {C.describe(fwd['torch_eager'])}")
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
    bwd, _ = time_all(grads, "backward ")
    bwd.setdefault("diffrax_vbt", {"skipped": "out of device memory (see notes)"})
    speedups = {f"forward_{k}": C.ratio(v, fwd["guidediff"]) for k, v in fwd.items()}
    speedups["backward_diffrax_vbt"] = C.ratio(bwd["diffrax_vbt"], bwd["guidediff"])
    del speedups["forward_guidediff"]
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
    args = C.parse(p, argv)
    C.header(NAME)
    torch = _torch()
    if torch is not None:
        torch.set_float32_matmul_precision("high")
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
            "torch_f32_matmul_precision": "high" if torch is not None else None,
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
