"""Time and memory of differentiating through the sampler, as the number of steps grows.

The objective is E[r(samples)] with r(x) = mean_j x_j^2, differentiated with respect
to the score network's parameters (the 64-D MLP by default). For each number of
steps N:

- `forward`: `gd.sample` (scan driver) inside `jax.jit`;
- `guidediff_grad`: `jax.grad` through `gd.sample(..., checkpoint=True)` (the scan
  driver's default: O(sqrt N) stored states, two recomputed forward passes);
- `guidediff_grad_chunk_ckpt`: `checkpoint="chunk"` (the same chunks with no
  checkpoint per step: one chunk's step internals kept, one recomputed forward);
- `guidediff_grad_step_ckpt`: `checkpoint="step"` (N states, one recomputation);
- `diffrax_vbt_grad`: `diffrax.diffeqsolve` with a `VirtualBrownianTree` and
  `RecursiveCheckpointAdjoint` (max_steps = N), one solve per particle, vmapped (its
  adjoint keeps one parameter cotangent per particle: 9 GB at 64-D);
- `diffrax_vbt_batched_grad`: the same as one solve of the whole population (a flat
  `(P * d,)` state and Brownian tree): one parameter cotangent, the fair baseline;
- `guidediff_diffeqsolve_grad`: `gd.sample(..., driver="diffeqsolve", max_steps=N)`.

The diffeqsolve-based gradients are timed only up to `--peer-max-steps` (200)
steps; above, only their memory is reported.

Work: the matmul FLOPs each scan-driver variant asks for, counted from its jaxpr
(`_flops.matmul_flops`: exact, device-independent; recomputation included), and
their ratio to the forward pass's: the floor under the time ratios.

Memory: XLA's compiled memory analysis (temporary bytes) of every variant's own
program, on every backend (the allocator's peak is a process-lifetime maximum, not a
program's, so it is not reported). `memory_growth` fits, per checkpointing mode,
(gradient temp - forward temp) ~ c + b N^a over every N (c: the backward pass's
scratch, independent of N), and calls it sublinear if a < 0.75; it also reports the
bytes per extra step between the two largest N. Memory-only row (compiled, never run) above
`--nockpt-max-steps` (200): `gd.sample(..., checkpoint=False)`, which stores every
step's activations (memory linear in N) and recomputes nothing.

    PYTHONPATH=. python -m benchmarks.grad_cost [--quick] [--steps-list 50 100 200]
"""

import math

import jax
import jax.random as jr
import numpy as np

from . import _common as C, _flops as F, _problems as P


NAME = "grad_cost"
DEFAULT_STEPS = (50, 100, 200, 400, 1000)
FLOP_COUNTED = (
    "forward",
    "guidediff_grad",
    "guidediff_grad_chunk_ckpt",
    "guidediff_grad_step_ckpt",
    "guidediff_grad_no_checkpoint",
)


def _particles(args) -> int:
    if args.particles is not None:
        return args.particles
    if args.quick:
        return 16
    return 4096 if C.on_accelerator() else 256


def run_steps(problem: P.Problem, steps: int, args) -> dict:
    ts = P.time_grid(steps)
    key = jr.key(0)
    print(f"-- N = {steps} steps", flush=True)
    fns = {
        "forward": jax.jit(P.gd_sampler(problem)),
        "guidediff_grad": P.grad_of(P.gd_sampler(problem, checkpoint=True)),
        "guidediff_grad_chunk_ckpt": P.grad_of(
            P.gd_sampler(problem, checkpoint="chunk")
        ),
        "guidediff_grad_step_ckpt": P.grad_of(P.gd_sampler(problem, checkpoint="step")),
        "diffrax_vbt_grad": P.grad_of(
            P.diffrax_sampler(problem, path="vbt", tol=args.vbt_tol)
        ),
        # one diffeqsolve of the whole population: no per-particle parameter
        # cotangents (the vmapped form above keeps P of them), the fair baseline
        "diffrax_vbt_batched_grad": P.grad_of(
            P.diffrax_sampler(problem, path="vbt", tol=args.vbt_tol, batched=True)
        ),
        "guidediff_diffeqsolve_grad": P.grad_of(
            P.gd_sampler(problem, driver="diffeqsolve", max_steps=steps)
        ),
        "guidediff_grad_no_checkpoint": P.grad_of(
            P.gd_sampler(problem, checkpoint=False)
        ),
    }
    memory_only = {}
    row = {"steps": steps, "timings": {}, "compiled_memory": {}}
    row["matmul_flops"] = {
        name: F.matmul_flops(fns[name], problem.params, key, ts)
        for name in FLOP_COUNTED
    }
    fwd_flops = row["matmul_flops"]["forward"]["flops"]
    row["matmul_flops_over_forward"] = {
        name: (c["flops"] / fwd_flops if fwd_flops else None)
        for name, c in row["matmul_flops"].items()
    }
    if steps > args.nockpt_max_steps:
        # No checkpointing stores every step's activations (linear in N): time it
        # only up to --nockpt-max-steps, report its compiled memory above.
        memory_only["guidediff_grad_no_checkpoint"] = fns.pop(
            "guidediff_grad_no_checkpoint"
        )
        row["timings"]["guidediff_grad_no_checkpoint"] = {
            "skipped": "steps > --nockpt-max-steps"
        }
    if steps > args.peer_max_steps:
        # The diffeqsolve-based gradients are 10-20x slower: time them only up to
        # --peer-max-steps (their memory is still reported).
        for name in (
            "diffrax_vbt_grad",
            "diffrax_vbt_batched_grad",
            "guidediff_diffeqsolve_grad",
        ):
            memory_only[name] = fns.pop(name)
            row["timings"][name] = {"skipped": "steps > --peer-max-steps"}
    for name, fn in fns.items():
        timing, _ = C.try_timeit(fn, problem.params, key, ts, repeats=args.repeats)
        row["timings"][name] = timing
        row["compiled_memory"][name] = C.compiled_memory(fn, problem.params, key, ts)
        print(
            f"  {name:<28} {C.describe(timing)}   temp "
            f"{_mib(row['compiled_memory'][name])}",
            flush=True,
        )
    for name, fn in memory_only.items():
        row["compiled_memory"][name] = C.compiled_memory(fn, problem.params, key, ts)
        print(f"  {name:<28} (not run)  temp {_mib(row['compiled_memory'][name])}")
    t = row["timings"]
    row["grad_over_forward"] = C.ratio(t["guidediff_grad"], t["forward"])
    row["chunk_ckpt_grad_over_forward"] = C.ratio(
        t["guidediff_grad_chunk_ckpt"], t["forward"]
    )
    row["step_ckpt_grad_over_forward"] = C.ratio(
        t["guidediff_grad_step_ckpt"], t["forward"]
    )
    row["no_ckpt_grad_over_forward"] = C.ratio(
        t["guidediff_grad_no_checkpoint"], t["forward"]
    )
    row["diffrax_vbt_grad_over_guidediff_grad"] = C.ratio(
        t["diffrax_vbt_grad"], t["guidediff_grad"]
    )
    row["diffrax_vbt_batched_grad_over_guidediff_grad"] = C.ratio(
        t["diffrax_vbt_batched_grad"], t["guidediff_grad"]
    )
    row["diffeqsolve_grad_over_guidediff_grad"] = C.ratio(
        t["guidediff_diffeqsolve_grad"], t["guidediff_grad"]
    )
    return row


# Gradient modes whose memory growth in N is fitted (name in `timings`).
MEMORY_MODES = {
    "sqrt": "guidediff_grad",
    "chunk": "guidediff_grad_chunk_ckpt",
    "step": "guidediff_grad_step_ckpt",
    "none": "guidediff_grad_no_checkpoint",
}
SUBLINEAR_BELOW = 0.75  # a fitted exponent below this counts as sublinear


def memory_growth(rows: list[dict], state_bytes: int | None = None) -> dict:
    """Per gradient mode, how the gradient's temp bytes less the forward pass's
    (the forward's own scratch is a floor independent of the gradient's storage)
    grow with the number of steps N.

    With three or more N: the exponent a of the least-squares fit c + b N^a (c,
    b >= 0; a on a grid of 0.01) over the monotone tail (`steps_fitted`: leading N
    whose excess exceeds a later N's are left out; no growth: a = 0): the constant c takes the backward pass's scratch,
    which is independent of N and would pull a two-point log-log slope towards 0
    (a per-step mode, linear by design, read as a = 0.69 with a 90 MiB offset).
    With two N: the log-log slope between them. Sublinear if a < SUBLINEAR_BELOW.
    `bytes_per_extra_step`: the growth between the two largest N, per step, and
    `states_per_extra_step` that over the bytes of one state of all particles
    (`state_bytes`): storage linear in N keeps at least one state per step. XLA's
    temporaries of a small program can be non-monotone in N (layouts), which a fit
    of a small growth can read as a > 1: read the two together."""
    if len(rows) < 2:
        return {}
    out = {}
    for mode, name in MEMORY_MODES.items():
        pts = []
        for r in rows:
            g = _temp(r["compiled_memory"].get(name))
            f = _temp(r["compiled_memory"].get("forward"))
            if g is not None and f is not None:
                pts.append((r["steps"], max(g - f, 1)))
        if len(pts) < 2:
            continue
        n_all = np.array([p[0] for p in pts], float)
        y_all = np.array([p[1] for p in pts], float)
        n, y = n_all, y_all
        # the monotone tail: a leading N whose excess exceeds a later N's (XLA's
        # layouts of a small program) would make the fit read a convex curve
        keep = next(i for i in range(len(y)) if y[i] <= y[i:].min())
        n, y = n[keep:], y[keep:]
        if len(n) == 1 or np.ptp(y) <= 1e-6 * y.max():  # no growth
            a, fit = 0.0, None
        elif len(n) == 2:
            a, fit = math.log(y[1] / y[0]) / math.log(n[1] / n[0]), None
        else:
            a, fit = _fit_power(n, y)
        out[mode] = {
            "exponent": a,
            "sublinear": a < SUBLINEAR_BELOW,
            "steps": [int(n_all[0]), int(n_all[-1])],
            "excess_temp_bytes": [int(v) for v in y_all],
            "fit": fit,
            "steps_fitted": [int(v) for v in n],
            "bytes_per_extra_step": (
                float((y[-1] - y[-2]) / (n[-1] - n[-2])) if len(n) > 1 else 0.0
            ),
        }
        if state_bytes:
            out[mode]["states_per_extra_step"] = (
                out[mode]["bytes_per_extra_step"] / state_bytes
            )
    return out


def _fit_power(n: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """`(a, {"c", "b", "a", "rms"})` of the least-squares fit y ~ c + b n^a with
    c, b >= 0, over a grid of exponents a in [0.01, 2]."""
    best = None
    for a in np.round(np.arange(0.01, 2.0001, 0.01), 2):
        x = n**a
        design = np.stack([np.ones_like(x), x], axis=1)
        (c, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        if c < 0:  # the best fit through the origin
            c, b = 0.0, float(x @ y / (x @ x))
        if b < 0:
            continue
        rms = float(np.sqrt(np.mean((c + b * x - y) ** 2)))
        if best is None or rms < best[1]["rms"] - 1e-9 * float(np.abs(y).max()):
            best = (float(a), {"c": float(c), "b": float(b), "a": float(a), "rms": rms})
    if best is None:  # shrinking with N: no growth
        return 0.0, None
    return best


def _temp(mem: dict | None) -> int | None:
    if not mem or "temp_size_in_bytes" not in mem:
        return None
    return mem["temp_size_in_bytes"]


def _ms(timing: dict) -> float | None:
    return 1e3 * timing["run_s"] if "run_s" in timing else None


def _mib(mem: dict | None) -> str:
    b = _temp(mem)
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--size", default="64d", choices=list(P.SIZES))
    p.add_argument(
        "--steps-list", type=C.positive_int, nargs="+", default=None,
        help="numbers of steps N (default 50 ... 1000; --steps N: just N)",
    )  # fmt: skip
    p.add_argument("--vbt-tol", type=float, default=1e-3)
    p.add_argument(
        "--peer-max-steps",
        type=C.positive_int,
        default=200,
        help="time the diffeqsolve-based gradients only up to this many steps",
    )
    p.add_argument(
        "--nockpt-max-steps",
        type=C.positive_int,
        default=200,
        help="time the gradient without checkpointing only up to this many steps",
    )
    args = C.parse(p, argv)
    C.header(NAME)
    if args.steps is not None and args.steps_list is not None:
        p.error("give --steps or --steps-list, not both")
    steps_list = (
        args.steps_list
        or ([args.steps] if args.steps is not None else None)
        or ([4, 8] if args.quick else list(DEFAULT_STEPS))
    )
    size = P.SIZES[args.size]
    problem = P.make_problem(size, _particles(args), quick=args.quick)
    print(f"{size.name}: {problem.particles} particles, width {problem.width}")
    rows = [run_steps(problem, n, args) for n in sorted(set(steps_list))]
    table = []
    for r in rows:
        t, m = r["timings"], r["compiled_memory"]
        table.append(
            {
                "steps": r["steps"],
                "fwd_ms": _ms(t["forward"]),
                "grad_ms": _ms(t["guidediff_grad"]),
                "vbt_grad_ms": _ms(t["diffrax_vbt_grad"]),
                "vbt_batched_grad_ms": _ms(t["diffrax_vbt_batched_grad"]),
                "grad/fwd": r["grad_over_forward"],
                "chunk/fwd": r["chunk_ckpt_grad_over_forward"],
                "step/fwd": r["step_ckpt_grad_over_forward"],
                "nockpt/fwd": r["no_ckpt_grad_over_forward"],
                "flops sqrt/chunk/step/none": "/".join(
                    f"{r['matmul_flops_over_forward'][k]:.2f}"
                    for k in FLOP_COUNTED[1:]
                    if r["matmul_flops_over_forward"][k] is not None
                ),
                "grad_MiB": (_temp(m["guidediff_grad"]) or 0) / 2**20,
                "chunk_MiB": (_temp(m["guidediff_grad_chunk_ckpt"]) or 0) / 2**20,
                "step_MiB": (_temp(m["guidediff_grad_step_ckpt"]) or 0) / 2**20,
                "vbt_MiB": (_temp(m["diffrax_vbt_grad"]) or 0) / 2**20,
                "nockpt_MiB": (_temp(m["guidediff_grad_no_checkpoint"]) or 0) / 2**20,
            }
        )
    C.print_table(table, list(table[0]))
    state_bytes = problem.particles * size.dim * 4  # float32 particles
    growth = memory_growth(rows, state_bytes)
    for mode, g in growth.items():
        print(
            f"  memory ~ c + b N^{g['exponent']:.2f} ({mode}), sublinear: "
            f"{g['sublinear']}; {g['states_per_extra_step']:.3f} states per extra step"
        )
    C.write_result(
        NAME,
        args,
        {
            "size": size.name,
            "dim": size.dim,
            "particles": problem.particles,
            "network_width": problem.width,
            "objective": "mean over particles of mean_j x_j^2 (r(x) = |x|^2 / d)",
            "wrt": "all MLP parameters",
            "vbt_tol": args.vbt_tol,
            "flop_note": (
                "matmul_flops: dot_general FLOPs of the traced program (scan bodies "
                "times their length, checkpoint recomputation included), counted "
                "by benchmarks/_flops.py; exact and device-independent"
            ),
            "memory_note": (
                "compiled_memory = XLA memory_analysis of each jitted function "
                "(temp_size_in_bytes: scratch, residuals included), per program; "
                "memory_growth: (gradient temp - forward temp) ~ c + b N^a fitted "
                f"over every N (two N: their log-log slope), sublinear if a < "
                f"{SUBLINEAR_BELOW}; bytes_per_extra_step between the two largest N"
            ),
            "memory_growth": growth,
            "results": rows,
        },
    )
    return {"results": rows}


if __name__ == "__main__":
    main()
