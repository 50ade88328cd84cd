"""The generated tables of benchmarks/README.md, from benchmarks/results/: the GPU
results table and the work-precision table.

    PYTHONPATH=. python -m benchmarks._table [benchmarks/results]

prints each table between its README markers; a test checks that the README holds
exactly these tables, so no number in them is typed by hand. Every row names the
JSON file it comes from. Files that are missing are skipped.
"""

import json
import sys
from pathlib import Path


START = "<!-- gpu-table:start -->"
END = "<!-- gpu-table:end -->"
WP_START = "<!-- work-precision-table:start -->"
WP_END = "<!-- work-precision-table:end -->"


def _f(x, digits=2) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _ms(timing: dict | None) -> str:
    if not timing or "run_s" not in timing:
        return "-"
    return f"{1e3 * timing['run_s']:.1f} ms"


def _row(bench: str, size: str, metric: str, value: str, file: str) -> str:
    return f"| {bench} | {size} | {metric} | {value} | {file} |"


def _over(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "run_s" not in a or "run_s" not in b:
        return None
    return a["run_s"] / b["run_s"]


def _against_scan(res: dict, file: str) -> list[str]:
    rows = []
    for r in res["results"]:
        q, fwd, size = r["ratios"], r["forward"], r["size"]
        rows.append(
            _row(
                "against_scan",
                size,
                "forward t_hand / t_guidediff, direct call / jit (target >= 0.95)",
                f"{_f(q['forward'])} / {_f(q['forward_jit'])} "
                f"({_ms(fwd['guidediff'])} / {_ms(fwd['guidediff_jit'])} vs "
                f"{_ms(fwd['hand'])})",
                file,
            )
        )
        piped = r.get("forward_pipelined", {})
        if "guidediff" in piped and "guidediff_jit" in piped:
            host = [1e3 * fwd[k].get("dispatch_s", float("nan")) for k in piped]
            per_call = [1e3 * piped[k]["per_call_s"] for k in piped]
            rows.append(
                _row(
                    "against_scan",
                    size,
                    "forward, direct call / jit: host time until the call returns; "
                    "per call, 10 calls back to back",
                    f"{host[0]:.2f} ms / {host[1]:.2f} ms; "
                    f"{per_call[0]:.1f} ms / {per_call[1]:.1f} ms",
                    file,
                )
            )
        rows.append(
            _row(
                "against_scan",
                size,
                "forward, jit, vs the hand loop with guidediff's per-particle noise",
                _f(q["forward_same_noise_jit"]),
                file,
            )
        )
        if "forward_one_loop_jit" in q:  # files from before it lack it
            rows.append(
                _row(
                    "against_scan",
                    size,
                    "forward, jit, checkpoint=False (one loop, no sqrt-N chunks): "
                    "t_hand / t_guidediff",
                    _f(q["forward_one_loop_jit"]),
                    file,
                )
            )
        if "forward_unroll_jit" in q:  # files from before `unroll` lack it
            rows.append(
                _row(
                    "against_scan",
                    size,
                    f"forward, jit, unroll={r['unroll']}: t_hand / t_guidediff, "
                    "hand loop plain / unrolled too",
                    f"{_f(q['forward_unroll_jit'])} / "
                    f"{_f(q['forward_unroll_both_jit'])}",
                    file,
                )
            )
        if "backward" not in q:
            continue
        bwd = r["backward"]
        rows.append(
            _row(
                "against_scan",
                size,
                "backward ratio: sqrt checkpointing (default) / per-step "
                "(like the hand loop's)",
                f"{_f(q['backward'])} / {_f(q.get('backward_step_ckpt'))}",
                file,
            )
        )
        grad_over_fwd = [
            _over(bwd.get("guidediff"), fwd["guidediff_jit"]),
            _over(bwd.get("guidediff_step_ckpt"), fwd["guidediff_jit"]),
            _over(bwd.get("hand"), fwd["hand"]),
        ]
        rows.append(
            _row(
                "against_scan",
                size,
                "gradient / forward time: sqrt / per-step / hand loop (target <= 3)",
                " / ".join(_f(x) for x in grad_over_fwd),
                file,
            )
        )
    return rows


def _peers(res: dict, file: str) -> list[str]:
    rows = []
    for r in res["results"]:
        s = r["speedup_of_guidediff"]
        torch = [
            s.get("forward_torch_eager"),
            s.get("forward_torch_eager_fp32_vs_guidediff_fp32"),
        ]
        rows.append(
            _row(
                "peers",
                r["size"],
                "speed-up of guidediff vs torch eager (TF32 both) / torch eager fp32 "
                "vs guidediff fp32 (target >= 3)",
                " / ".join(_f(x) for x in torch),
                file,
            )
        )
        diffrax = [
            s.get("forward_diffrax_unsafe"),
            s.get("forward_diffrax_vbt"),
            s.get("backward_diffrax_vbt"),
        ]
        metric = (
            "speed-up vs diffrax Unsafe / diffrax VBT forward / VBT gradient "
            "(target >= 5 for the gradient)"
        )
        if "backward_diffrax_vbt_batched" in s:  # files from before it lack it
            diffrax.append(s["backward_diffrax_vbt_batched"])
            metric += " / VBT gradient of one batched solve"
        rows.append(
            _row("peers", r["size"], metric, " / ".join(map(_f, diffrax)), file)
        )
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _cfg_cost(res: dict, file: str) -> list[str]:
    q, size = res["ratios"], res["size"]
    if "cfg_batched_over_network_2n" in q:
        metric = (
            "cfg_batched / one network call on 2N inputs (target <= 1.15); "
            "/ plain sampler of 2N particles; two calls / batched"
        )
        value = (
            f"{_f(q['cfg_batched_over_network_2n'])}; "
            f"{_f(q['cfg_batched_over_plain_2n'])}; "
        )
    else:  # files from before the network_2n denominator
        metric = "cfg_batched / plain_2n (target <= 1.15); two calls / batched"
        value = f"{_f(q['cfg_batched_over_plain_2n'])}; "
    rows = [
        _row(
            "cfg_cost",
            size,
            metric,
            value + _f(q["cfg_two_calls_over_cfg_batched"]),
            file,
        )
    ]
    for name, v in res.get("interval_savings", {}).items():
        saved = "time saved vs full CFG"
        value = _pct(v.get("measured_time_saved"))
        if "measured_network_time_saved" in v:  # files from before had no twin
            saved = "saved vs full CFG: sampler time / network time"
            value += " / " + _pct(v["measured_network_time_saved"])
        rows.append(
            _row(
                "cfg_cost",
                size,
                f"{name}: guidance on {100 * v['fraction_of_steps']:.0f} % of the "
                f"steps, {saved} (bound (1 - f) / 2)",
                value + f" ({100 * v['network_evals_saved_bound']:.1f} %)",
                file,
            )
        )
    return rows


def _grad_cost(res: dict, file: str) -> list[str]:
    rows = []
    for r in res["results"]:
        mem = r["compiled_memory"]

        def mib(name, mem=mem):
            b = (mem.get(name) or {}).get("temp_size_in_bytes")
            return "-" if b is None else f"{b / 2**20:.0f}"

        modes = [("sqrt", "guidediff_grad", "grad_over_forward")]
        if "chunk_ckpt_grad_over_forward" in r:  # files from before "chunk" lack it
            modes.append(
                ("chunk", "guidediff_grad_chunk_ckpt", "chunk_ckpt_grad_over_forward")
            )
        modes += [
            ("step", "guidediff_grad_step_ckpt", "step_ckpt_grad_over_forward"),
            ("none", "guidediff_grad_no_checkpoint", "no_ckpt_grad_over_forward"),
        ]
        labels = " / ".join(m[0] for m in modes)
        rows.append(
            _row(
                "grad_cost",
                f"{res['size']}, {res['particles']} particles, N = {r['steps']}",
                f"gradient / forward time: {labels} (target <= 3); "
                f"XLA temp MiB: {labels}",
                " / ".join(_f(r.get(m[2])) for m in modes)
                + "; "
                + " / ".join(mib(m[1]) for m in modes),
                file,
            )
        )
        flops = r.get("matmul_flops_over_forward")
        if flops is not None:
            rows.append(
                _row(
                    "grad_cost",
                    f"{res['size']}, N = {r['steps']}",
                    f"gradient / forward matmul FLOPs (counted): {labels}",
                    " / ".join(_f(flops.get(m[1])) for m in modes),
                    file,
                )
            )
        vbt = r.get("diffrax_vbt_grad_over_guidediff_grad")
        batched = r.get("diffrax_vbt_batched_grad_over_guidediff_grad")
        if vbt is not None or batched is not None:
            # either may be missing (the vmapped one out of memory): the batched
            # solve, the fair baseline, is shown without it
            rows.append(
                _row(
                    "grad_cost",
                    f"{res['size']}, N = {r['steps']}",
                    "diffrax VBT gradient / guidediff gradient (target >= 5): "
                    "one batched solve / vmapped per particle",
                    f"{_f(batched)} / {_f(vbt)}",
                    file,
                )
            )
    for mode, g in (res.get("memory_growth") or {}).items():
        rows.append(
            _row(
                "grad_cost",
                f"{res['size']}, N = {g['steps'][0]}..{g['steps'][1]}",
                f"gradient memory ~ c + b N^a ({mode} checkpointing; sublinear: "
                "a < 0.75); growth per extra step in states of all particles",
                f"a = {g['exponent']:.2f}"
                + (" (sublinear)" if g["sublinear"] else "")
                + (
                    f"; {g['states_per_extra_step']:.3f} states/step"
                    if "states_per_extra_step" in g
                    else ""
                ),
                file,
            )
        )
    return rows


def _mfu(res: dict, file: str) -> list[str]:
    by_dtype: dict[str, dict[str, float]] = {}
    times: dict[str, dict[str, dict]] = {}
    peak_of: dict[str, str] = {}  # dtype -> the peak its MFU is of (bf16/tf32/fp32)
    for r in res["results"]:
        times.setdefault(r["dtype"], {})[r["variant"]] = r["timing"]
        if "mfu" in r:
            peak_of[r["dtype"]] = next(iter(r["mfu"]))
            mfu = next(iter(r["mfu"].values()))
            if "mfu_basis" not in res and "flops_effective" in r:
                # files from before the fix took the MFU of CFG's nominal FLOPs
                # (the shared first layer twice): rescale to the work done
                mfu *= r["flops_effective"] / r["flops"]
            by_dtype.setdefault(r["dtype"], {})[r["variant"]] = mfu
    flags = res["device"].get("xla_flags")
    rows = []
    for dtype, v in by_dtype.items():
        unit = peak_of[dtype]
        peak = "bf16 peak, target >= 40 %" if unit == "bf16" else f"{unit.upper()} peak"
        keys = ["guidediff", "hand", "guidediff_cfg"]
        labels = "guidediff / hand / guidediff CFG"
        if "guidediff_flax" in v:  # files from before the Flax row lack it
            keys.append("guidediff_flax")
            labels += " / gd.MLPScoreNet"
        if "guidediff_flax_cast_variables" in v:
            keys.append("guidediff_flax_cast_variables")
            labels += " / gd.MLPScoreNet, variables cast to bfloat16"
        if "guidediff_bf16_particles" in v:
            keys.append("guidediff_bf16_particles")
            labels += " / bfloat16 particles"
        if "guidediff_unroll4" in v:  # files from before these rows lack them
            keys += ["guidediff_unroll4", "network_alone"]
            labels += " / guidediff unroll=4 / the network alone (ceiling)"
        value = " / ".join(f"{100 * v.get(k, float('nan')):.0f} %" for k in keys)
        if flags:
            value += f" (XLA_FLAGS={flags})"
        where = f"{res['size']}, {res['particles']} particles"
        rows.append(_row("mfu", where, f"{dtype} MFU ({peak}): {labels}", value, file))
        t = times[dtype]
        if "hand_no_noise" in t:  # files from before the split lack it
            rows.append(
                _row(
                    "mfu",
                    where,
                    f"{dtype} hand loop time: full / no noise / no network",
                    " / ".join(
                        _ms(t.get(k))
                        for k in ("hand", "hand_no_noise", "hand_no_network")
                    ),
                    file,
                )
            )
    return rows


def _smc_cost(res: dict, file: str) -> list[str]:
    q = res["ratios"]
    where = f"{res['size']}, {res['particles']} particles"
    return [
        _row(
            "smc_cost",
            where,
            "time over gd.sample: SMC (default) / resampling every step / guided "
            "proposal; SMC matmul FLOPs equal gd.sample's",
            f"{_f(q['smc_over_sample'])} / {_f(q['smc_every_step_over_sample'])} / "
            f"{_f(q['smc_proposal_over_sample'])}; {res['smc_flops_equal_sample']}",
            file,
        )
    ]


def _scaling(res: dict, file: str) -> list[str]:
    pts = res["vs_particles"]
    counts = " / ".join(f"{p['particles']}" for p in pts)
    return [
        _row(
            "scaling",
            f"{res['size']}, {res['steps']} steps",
            f"particle-steps/s at {counts} particles",
            " / ".join(_g(p["particle_steps_per_s"]) for p in pts),
            file,
        )
    ]


BUILDERS = {
    "against_scan": _against_scan,
    "peers": _peers,
    "cfg_cost": _cfg_cost,
    "grad_cost": _grad_cost,
    "mfu": _mfu,
    "scaling": _scaling,
    "smc_cost": _smc_cost,
}


def gpu_table(results_dir: str | Path) -> str:
    """One Markdown table of the headline numbers of every `*_gpu*.json` file, under
    the device they name, and a line naming the commits that ran them. Files from
    different devices are an error (their ratios are not comparable, and a later
    run on another device would otherwise be labelled as the first)."""
    files = []
    for path in sorted(Path(results_dir).glob("*_gpu*.json")):
        res = json.loads(path.read_text())
        # a smoke-size run (NAME_gpu_quick.json) or one at other sizes than the
        # defaults (NAME_gpu_custom.json)
        if res.get("quick") or res.get("custom_flags"):
            continue
        if res.get("benchmark") in BUILDERS:
            files.append((path.name, res))
    kinds: dict[str, list[str]] = {}
    commits: dict[str, list[str]] = {}
    for name, res in files:
        kinds.setdefault(res["device"].get("device_kind", "?"), []).append(name)
        commit = (res.get("versions") or {}).get("guidediff_commit") or "unknown"
        commits.setdefault(commit, []).append(name)
    if len(kinds) > 1:
        raise ValueError(
            f"the GPU result files come from different devices {kinds}: re-run them "
            "on one device before tabulating them together"
        )
    device = next(iter(kinds), "GPU")
    rows = [
        f"| benchmark | size | metric | {device} | file |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, res in files:
        rows.extend(BUILDERS[res["benchmark"]](res, name))
    ran = "; ".join(f"{c} ({', '.join(names)})" for c, names in commits.items())
    rows += ["", f"Device: {device}. guidediff commit: {ran}."]
    stack = {}
    for _, res in files:
        for pkg in ("jax", "diffrax", "equinox", "flax"):
            version = (res.get("versions") or {}).get(pkg) or "?"
            stack.setdefault(pkg, set()).add(str(version))
    days = sorted({str(res.get("timestamp_utc") or "?")[:10] for _, res in files})
    if files:
        versions = ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in stack.items())
        rows += [f"Versions: {versions}. Run on {', '.join(days)} (UTC)."]
    return "\n".join(rows)


def work_precision_table(results_dir: str | Path) -> str:
    """Per solver, the fewest steps reaching the tolerance, from every full (not
    `--quick`) `work_precision_*.json` file: accuracy does not depend on the
    device, run times do (each row names its file and device)."""
    rows = [
        "| process | solver | grid | steps (score evals) to reach the tolerance "
        "| run time | error at the largest step count | device | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(Path(results_dir).glob("work_precision_*.json")):
        res = json.loads(path.read_text())
        if res.get("quick") or res.get("custom_flags"):
            continue
        last: dict[str, dict] = {}
        for r in res["results"]:
            key = f"{r['process']}/{r['solver']}/{r.get('grid', 'logsnr')}"
            last[key] = r  # rows go by increasing steps
        device = res["device"]["device_kind"]
        for key, r in last.items():
            hit = res["at_tolerance"].get(key)
            reach = "not reached" if hit is None else f"{hit['steps']} ({hit['nfe']})"
            when = "-" if hit is None else _ms({"run_s": hit["run_s"]})
            rows.append(
                f"| {r['process']} | {r['solver']} | {r.get('grid', 'logsnr')} | "
                f"{reach} (tol {res['tol']:g}) | "
                f"{when} | {_g(r.get('error'))} at {r['steps']} | {device} | "
                f"{path.name} |"
            )
    return "\n".join(rows)


def readme_blocks(results_dir: str | Path) -> list[str]:
    """The README's generated blocks: the GPU table and the work-precision table."""
    return [
        f"{START}\n{gpu_table(results_dir)}\n{END}",
        f"{WP_START}\n{work_precision_table(results_dir)}\n{WP_END}",
    ]


def write_readme(results_dir: str | Path, readme: str | Path) -> None:
    """Replace the generated blocks of `readme` (between their markers) in place."""
    path = Path(readme)
    text = path.read_text()
    for block in readme_blocks(results_dir):
        start, end = block.splitlines()[0], block.splitlines()[-1]
        i, j = text.index(start), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    path.write_text(text)


def main(argv=None) -> int:
    """`python -m benchmarks._table [RESULTS_DIR] [--write]`: print the README's
    generated blocks, or write them into benchmarks/README.md."""
    import argparse

    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument(
        "results", nargs="?", type=Path, default=here / "results",
        help="folder of result JSON files (default: benchmarks/results)",
    )  # fmt: skip
    p.add_argument(
        "--write", action="store_true", help="replace the blocks in the README"
    )
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"no such folder: {args.results}")
    if not any(args.results.glob("*.json")):
        p.error(f"no result files (*.json) in {args.results}")
    if args.write:
        # never replace the committed tables by empty ones
        if not any(args.results.glob("*_gpu*.json")):
            p.error(f"no GPU result files (*_gpu*.json) in {args.results}")
        if not any(args.results.glob("work_precision_*.json")):
            p.error(
                f"no work_precision_*.json in {args.results}: --write would empty "
                "the work-precision table (copy fetched GPU files into "
                "benchmarks/results and write from there)"
            )
        write_readme(args.results, here / "README.md")
        print(f"wrote the tables into {here / 'README.md'}")
    else:
        for block in readme_blocks(args.results):
            print(block, end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
