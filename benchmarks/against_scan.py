"""guidediff's fixed-grid sampler against a hand-fused `lax.scan` Euler-Maruyama loop.

guidediff: `gd.sample(..., solver=diffrax.Euler(), driver="scan")` with its grid
Brownian path, called as a user would (`guidediff`, which includes gd.sample's
Python-side checks on every call) and inside `jax.jit` (`guidediff_jit`).
Baselines (benchmarks/_problems.py): `hand`, one `(P, d)` normal draw per step,
and `hand_same_noise`, guidediff's own per-particle noise (same samples: the JSON
reports the largest difference).

`forward_pipelined` times 10 calls issued back to back (one block at the end) for
the direct and the jitted call, and each timing's `dispatch_s` is the host's time
until the call returned: together they tell a direct call's host cost from work
on the device.

Forward, and forward + backward: the gradient of mean(samples**2) with respect to
the MLP weights (the GMM means at 2-D), `gd.sample(..., checkpoint=True)` under
`jax.grad` against the hand loop with `jax.checkpoint` on each step. guidediff's
default checkpointing (`True` = "sqrt") stores O(sqrt N) states and recomputes two
forward passes; `guidediff_step_ckpt` (`checkpoint="step"`) is the like-for-like
scheme (N states, one recomputed forward pass). Without a gradient the default
still runs nested loops (chunks of about sqrt N steps); `guidediff_jit_one_loop`
(`checkpoint=False`: one loop) shows what that costs a forward-only run.

`--unroll K` (default 4) adds `guidediff_jit_unroll` (`gd.sample(..., unroll=K)`)
and `hand_unroll` (the hand loop's `lax.scan(..., unroll=K)`): K steps per loop
iteration, fewer per-iteration launches on an accelerator (0 skips both).

ratio = t_baseline / t_guidediff; the target is >= 0.95.

    PYTHONPATH=. python -m benchmarks.against_scan [--quick] [--sizes 2d 64d 3072d]
"""

import jax
import jax.numpy as jnp
import jax.random as jr

from . import _common as C, _problems as P


NAME = "against_scan"
TARGET = 0.95


def run_size(size: P.Size, args) -> dict:
    problem = P.make_problem(size, P.particles_for(size, args), quick=args.quick)
    steps = P.steps_for(args)
    ts = P.time_grid(steps)
    key = jr.key(0)
    print(
        f"-- {size.name}: {problem.particles} particles, {steps} steps, "
        f"network width {problem.width}",
        flush=True,
    )
    gd_eager = P.gd_sampler(problem)
    variants = {
        "guidediff": gd_eager,
        "guidediff_jit": jax.jit(gd_eager),
        "hand": jax.jit(P.hand_sampler(problem)),
        "hand_same_noise": jax.jit(P.hand_sampler(problem, noise="particle")),
        # forward-only sampling with one loop (no sqrt-N chunks): the same samples
        "guidediff_jit_one_loop": jax.jit(P.gd_sampler(problem, checkpoint=False)),
    }
    if args.unroll:
        variants["guidediff_jit_unroll"] = jax.jit(
            P.gd_sampler(problem, unroll=args.unroll)
        )
        variants["hand_unroll"] = jax.jit(P.hand_sampler(problem, unroll=args.unroll))
    fwd, out = C.time_all(
        variants,
        problem.params,
        key,
        ts,
        repeats=args.repeats,
        label="forward  ",
    )
    # A direct call's fixed cost outside the compiled program: host time per call
    # (dispatch_s in `forward`) and the per-call time of back-to-back calls, where
    # the host's work overlaps the device's.
    piped = {
        name: C.pipelined(variants[name], problem.params, key, ts)
        for name in ("guidediff", "guidediff_jit")
        if "error" not in fwd[name]
    }
    result = {
        **P.run_fields(size, problem.particles, steps, problem.width),
        "network": _network(problem),
        "forward": fwd,
        "forward_pipelined": piped,
        "max_abs_diff_same_noise": P.max_abs_diff(
            out["guidediff"], out["hand_same_noise"]
        ),
        "sample_scale": P.max_abs_diff(out["guidediff"], 0.0),
        "max_abs_diff_one_loop": P.max_abs_diff(
            out["guidediff_jit_one_loop"], out["guidediff_jit"]
        ),
        # Rounding differences grow for the few particles near a saddle between
        # mixture modes: the fraction of particles that differ tells them apart.
        "frac_particles_diff_gt_1e-3_same_noise": P.frac_rows_differing(
            out["guidediff"], out["hand_same_noise"], 1e-3
        ),
    }
    ratios = {
        "forward": C.ratio(fwd["hand"], fwd["guidediff"]),
        "forward_jit": C.ratio(fwd["hand"], fwd["guidediff_jit"]),
        "forward_same_noise": C.ratio(fwd["hand_same_noise"], fwd["guidediff"]),
        "forward_same_noise_jit": C.ratio(fwd["hand_same_noise"], fwd["guidediff_jit"]),
        "forward_one_loop_jit": C.ratio(fwd["hand"], fwd["guidediff_jit_one_loop"]),
    }
    if args.unroll:
        result["unroll"] = args.unroll
        result["max_abs_diff_unroll"] = P.max_abs_diff(
            out["guidediff_jit_unroll"], out["guidediff_jit"]
        )
        # unrolled against the plain hand loop, and like for like
        ratios["forward_unroll_jit"] = C.ratio(fwd["hand"], fwd["guidediff_jit_unroll"])
        ratios["forward_unroll_both_jit"] = C.ratio(
            fwd["hand_unroll"], fwd["guidediff_jit_unroll"]
        )
    if not args.no_backward:
        bwd, grads = C.time_all(
            {
                "guidediff": P.grad_of(P.gd_sampler(problem, checkpoint=True)),
                "guidediff_step_ckpt": P.grad_of(
                    P.gd_sampler(problem, checkpoint="step")
                ),
                "hand": P.grad_of(P.hand_sampler(problem, checkpoint=True)),
                "hand_same_noise": P.grad_of(
                    P.hand_sampler(problem, noise="particle", checkpoint=True)
                ),
            },
            problem.params,
            key,
            ts,
            repeats=args.repeats,
            label="backward ",
        )
        result["backward"] = bwd
        diff = P.tree_max_abs_diff(grads["guidediff"], grads["hand_same_noise"])
        if diff is not None:
            scale = max(
                float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["guidediff"])
            )
            diff = diff / scale
        result["grad_max_rel_diff_same_noise"] = diff
        ratios["backward"] = C.ratio(bwd["hand"], bwd["guidediff"])
        ratios["backward_step_ckpt"] = C.ratio(bwd["hand"], bwd["guidediff_step_ckpt"])
        ratios["backward_same_noise"] = C.ratio(
            bwd["hand_same_noise"], bwd["guidediff"]
        )
    result["ratios"] = ratios
    result["meets_target"] = {
        k: (v is not None and v >= TARGET) for k, v in ratios.items()
    }
    return result


def _network(problem: P.Problem) -> str:
    if problem.width is None:
        return "exact GMM score (8 components)"
    return (
        f"MLP {problem.size.depth}x{problem.width} SiLU, score -x + mlp, float32 "
        f"({problem.flops_per_eval} matmul FLOPs per evaluation)"
    )


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(P.SIZES), choices=list(P.SIZES))
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument(
        "--unroll",
        type=int,
        default=4,
        help="also time the forward with K steps per loop iteration (0: skip)",
    )
    args = C.parse(p, argv)
    C.header(NAME)
    results = [run_size(P.SIZES[s], args) for s in args.sizes]
    rows = [
        {"size": r["size"], "particles": r["particles"], **r["ratios"]} for r in results
    ]
    print("ratio = t_hand / t_guidediff (target >= 0.95)")
    C.print_table(rows, ["size", "particles", *results[0]["ratios"]])
    C.write_result(
        NAME,
        args,
        {
            "solver": "diffrax.Euler (Euler-Maruyama), reverse VP SDE, uniform grid",
            "target_ratio": TARGET,
            "ratio_definition": "t_baseline / t_guidediff (run_s medians)",
            "results": results,
        },
    )
    return {"results": results}


if __name__ == "__main__":
    main()
