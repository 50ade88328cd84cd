"""Achieved FLOP/s of the score network inside the sampler, against the device peak.

The 3072-D size (MLP 3 x 1024), float32 and bfloat16 weights and activations (the
sampler state stays float32), `gd.sample` (scan driver, Euler) inside `jax.jit`,
plain and with batched classifier-free guidance, and the hand-fused loop as the
reference, and `gd.sample(..., unroll=4)`. Three more rows split a step's time:
`hand_no_noise` (network and update, no noise drawn), `hand_no_network` (noise and
update, score 0) and `network_alone` (the network chained on its own output in its
compute dtype: no sampler state, noise or update; its MFU is the ceiling for any
sampler at this size).
`guidediff_flax` is the library's own `gd.MLPScoreNet(dtype=...)` (float32
parameters, bfloat16 computation in the bfloat16 rows; its time-embedding MLP
included), whose FLOPs are the traced count; `guidediff_flax_cast_variables` is the
same network given its variables already cast to bfloat16 (the same samples; each
step no longer converts every weight); `guidediff_bf16_particles` also keeps the
particles in bfloat16 (`gd.sample(..., dtype=jnp.bfloat16)`). FLOPs are counted
analytically: 2 * in * out per layer per particle per step, twice that for CFG (the conditional and unconditional evaluations; the first
layer's x W0 is shared by both, so the CFG count is an upper bound on the work
done: `flops_effective` counts it once).

Peaks (dense, no sparsity) for NVIDIA H100 SXM5 (also used for H200, which has the
same compute): bf16 989.4 TFLOP/s, TF32 494.7 TFLOP/s, fp32 (non-tensor) 66.9
TFLOP/s, from NVIDIA's H100 Tensor Core GPU datasheet. Other devices: no peak, MFU
not reported. Whether JAX runs float32 matmuls as TF32 here is probed and reported.
`flops_counted` is the matmul FLOP count of the traced program (`_flops.py`), a
check on the analytic count.

    PYTHONPATH=. python -m benchmarks.mfu [--quick]
"""

import jax
import jax.numpy as jnp
import jax.random as jr

import guidediff as gd

from . import _common as C, _flops as F, _problems as P


NAME = "mfu"
H100_PEAKS = {
    "bf16": 989.4e12,
    "tf32": 494.7e12,
    "fp32": 66.9e12,
}
PEAK_SOURCE = (
    "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 column, dense (without "
    "sparsity): FP32 67 TFLOPS, TF32 Tensor Core 989 TFLOPS with sparsity = 494.7 "
    "dense, BF16 Tensor Core 1979 with sparsity = 989.4 dense. H200 SXM lists the "
    "same compute."
)


def device_peaks(kind: str | None = None) -> dict | None:
    """The SXM peaks for an H100 / H200 SXM (`device_kind` e.g. "NVIDIA H100 80GB
    HBM3", "NVIDIA H200"); `None` for other devices, the PCIe and NVL cards
    included (their peaks are lower: an H100 PCIe's bf16 is about 756 TFLOP/s)."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    if ("H100" in kind or "H200" in kind) and not ("PCIe" in kind or "NVL" in kind):
        return dict(H100_PEAKS)
    return None


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="3072d", choices=list(P.SIZES))
    args = C.parse(p, argv)
    C.header(NAME)
    size = P.SIZES[args.size]
    n = P.particles_for(size, args)
    steps = P.steps_for(args)
    ts = P.time_grid(steps)
    key = jr.key(0)
    label = jnp.asarray(3, jnp.int32)
    cfg = gd.cfg(2.0, null_args=P.NUM_CLASSES)
    peaks = device_peaks()
    probe = C.f32_matmul_probe()
    rows = []
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        problem = P.make_problem(
            size, n, quick=args.quick, num_classes=P.NUM_CLASSES, dtype=dtype
        )
        first_layer = 2 * size.dim * problem.width
        variants = {
            "guidediff": (P.gd_sampler(problem, args=label), 1),
            "hand": (P.hand_sampler(problem, args=label), 1),
            "guidediff_cfg": (
                P.gd_sampler(problem, args=label, guidance=cfg),
                2,
            ),
            "guidediff_unroll4": (P.gd_sampler(problem, args=label, unroll=4), 1),
            "hand_no_noise": (P.hand_sampler(problem, args=label, noise="none"), 1),
            "hand_no_network": (
                P.hand_sampler(problem, args=label, network=False),
                0,
            ),
            "network_alone": (P.network_alone(problem, args=label), 1),
        }
        print(f"-- {dtype_name}: {n} particles, {steps} steps, width {problem.width}")
        flax_run, flax_vars = P.flax_mlp_sampler(problem, dtype, args=label)
        variants["guidediff_flax"] = (flax_run, None)
        if dtype != jnp.float32:  # the same net and samples, variables cast once
            variants["guidediff_flax_cast_variables"] = (flax_run, None)
            # the particles themselves in bfloat16 (noise drawn in float32, state
            # rounded each step): half the state's memory traffic per step
            variants["guidediff_bf16_particles"] = (
                P.gd_sampler(problem, args=label, dtype=dtype),
                1,
            )
        for name, (fn, evals) in variants.items():
            params = problem.params
            if name == "guidediff_flax":
                params = flax_vars
            elif name == "guidediff_flax_cast_variables":
                params = jax.tree.map(lambda a, d=dtype: a.astype(d), flax_vars)
            timing, _ = C.try_timeit(jax.jit(fn), params, key, ts, repeats=args.repeats)
            if "run_s" not in timing:
                rows.append({"variant": name, "dtype": dtype_name, "timing": timing})
                continue
            with jax.numpy_rank_promotion("allow"):
                counted = F.matmul_flops(fn, params, key, ts)
            if evals is None:  # the Flax net: its own architecture, counted FLOPs
                flops = effective = counted["flops"]
                evals = 1
            else:
                flops = evals * problem.flops_per_eval * n * steps
                effective = flops - max(evals - 1, 0) * first_layer * n * steps
            row = {
                "variant": name,
                "dtype": dtype_name,
                "network_evals_per_step": evals,
                "flops": flops,
                "flops_effective": effective,
                "flops_counted": counted,
                "timing": timing,
                "achieved_flops_per_s": flops / timing["run_s"],
                "achieved_effective_flops_per_s": effective / timing["run_s"],
            }
            if peaks is not None and evals:
                if dtype_name == "bfloat16":
                    keys = ("bf16",)
                else:  # the peak of the unit JAX's float32 matmuls actually use
                    keys = ("tf32",) if probe["looks_like_tf32"] else ("fp32",)
                # the work actually done: batched CFG computes the shared first
                # layer once (flops_effective equals the traced count)
                row["mfu"] = {
                    k: row["achieved_effective_flops_per_s"] / peaks[k] for k in keys
                }
            rows.append(row)
            print(
                f"  {name:<16} run {C.fmt_s(timing['run_s']):>11}  "
                f"{row['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s"
                + (f"  MFU {row['mfu']}" if "mfu" in row else ""),
                flush=True,
            )
    C.write_result(
        NAME,
        args,
        {
            **P.run_fields(size, n, steps, problem.width),
            "network": f"class-conditional MLP {size.depth}x{problem.width}",
            "flops_per_eval": problem.flops_per_eval,
            "flop_count": (
                "2 * in * out per layer per particle per step (matmuls only); x2 for "
                "CFG; flops_effective counts the shared first layer once (the "
                "work done, = flops_counted); mfu uses flops_effective"
            ),
            "mfu_basis": "flops_effective",
            "peaks_flops_per_s": peaks,
            "peak_source": PEAK_SOURCE if peaks is not None else "no peak known",
            "jax_f32_matmul": probe,
            "results": rows,
        },
    )
    return {"results": rows}


if __name__ == "__main__":
    main()
