"""Smoke tests: every benchmark script runs at a tiny size and writes its JSON.

Each script runs as `benchmarks.NAME.main(["--quick", "--out", TMP, ...])` (plus
flags that keep it to a few seconds), in three processes (see `GROUPS`), on the CPU,
two at a time, with XLA's backend optimisations off (compiling dominates these
runs; no timing is checked). The tests check that each script finished and the
JSON's keys, never the timings.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent

# Extra flags per script: the smallest run that still exercises every code path.
RUNS = {
    "peers": ["--sizes", "64d", "--repeats", "1"],
    "grad_cost": ["--steps", "4", "--repeats", "1"],  # --steps N: the list [N]
    "against_scan": ["--sizes", "64d", "--repeats", "1"],
    "scaling": "--particles-list 16 --steps 4 --repeats 1 --kinds strong".split(),
    "mfu": ["--steps", "4", "--repeats", "1"],
    "cfg_cost": ["--repeats", "1"],
    "work_precision": ["--repeats", "1", "--steps", "4"],
    "smc_cost": ["--steps", "4", "--repeats", "1"],
}

COMMON_KEYS = {
    "benchmark",
    "device",
    "versions",
    "quick",
    "timing_method",
    "timestamp_utc",
}
TIMING_KEYS = {
    "run_s",
    "run_min_s",
    "run_max_s",
    "repeats",
    "first_call_s",
    "compile_s",
}


# The scripts run in three processes (importing jax and guidediff costs each
# process about 2 s of CPU): `scaling` alone (it forces host devices before jax
# starts), the others in two groups of about equal length, each script through
# its `main(argv)` (what `python -m benchmarks.NAME` calls), one failure not
# stopping the rest of its group.
GROUPS = (
    ("peers", "against_scan", "cfg_cost", "smc_cost"),
    ("grad_cost", "mfu", "work_precision"),
    ("scaling",),
)

RUNNER = """
import json, sys, traceback
from importlib import import_module

out, names, flags = json.loads(sys.argv[1])
status = {}
for name in names:
    print(f"### {name}", flush=True)
    try:
        import_module(f"benchmarks.{name}").main(["--quick", "--out", out, *flags[name]])
        status[name] = None
    except BaseException:  # SystemExit from argparse included
        status[name] = traceback.format_exc()
print("STATUS" + json.dumps(status))
"""


def _run(names: tuple, out: Path) -> dict:
    """`{name: (error or None, the group's output)}` for one group of scripts."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
        "--xla_cpu_use_fusion_emitters=false"
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    arg = json.dumps([str(out), names, {n: RUNS[n] for n in names}])
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, arg],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout[-3000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATUS")]
    if proc.returncode != 0 or not lines:  # the process itself failed
        return {name: (f"exit status {proc.returncode}", log) for name in names}
    status = json.loads(lines[-1][len("STATUS") :])
    return {name: (status[name], log) for name in names}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {}
        for group in pool.map(lambda g: _run(g, out), GROUPS):
            results.update(group)
    return {"out": out, "results": results}


def test_every_script_is_run():
    from benchmarks.run_all import SCRIPTS

    assert sorted(n for g in GROUPS for n in g) == sorted(SCRIPTS) == sorted(RUNS)


def _load(runs, name: str) -> dict:
    error, log = runs["results"][name]
    assert error is None, f"{name} failed:\n{error}\n--- output:\n{log}"
    path = runs["out"] / f"{name}_cpu.json"
    assert path.exists(), f"{path} not written; output: {log}"
    result = json.loads(path.read_text())
    assert COMMON_KEYS <= set(result), COMMON_KEYS - set(result)
    assert result["benchmark"] == name
    assert result["quick"] is True
    assert result["device"]["backend"] == "cpu"
    assert {"jax", "diffrax", "guidediff", "guidediff_commit"} <= set(
        result["versions"]
    )
    return result


def _timing(t: dict) -> None:
    assert TIMING_KEYS <= set(t), TIMING_KEYS - set(t)
    assert t["run_s"] > 0


def test_against_scan(runs):
    r = _load(runs, "against_scan")
    assert [x["size"] for x in r["results"]] == ["64d"]
    for x in r["results"]:
        # nested loops or one: the same samples (up to XLA's fusion choices)
        assert x["max_abs_diff_one_loop"] <= 1e-6 * max(1.0, x["sample_scale"])
        for v in ("guidediff", "guidediff_jit", "hand", "hand_same_noise"):
            _timing(x["forward"][v])
        for v in ("guidediff_jit_unroll", "hand_unroll"):
            _timing(x["forward"][v])
        assert x["max_abs_diff_unroll"] <= 1e-5 * max(1.0, x["sample_scale"])
        for v in ("guidediff", "guidediff_step_ckpt", "hand", "hand_same_noise"):
            _timing(x["backward"][v])
        assert {"forward", "forward_jit", "backward"} <= set(x["ratios"])
        for v in ("guidediff", "guidediff_jit"):
            assert 0 < x["forward"][v]["dispatch_s"] <= x["forward"][v]["run_s"]
            assert x["forward_pipelined"][v]["per_call_s"] > 0
        # The same-noise baseline reproduces guidediff's samples.
        assert x["max_abs_diff_same_noise"] <= 1e-4 * max(1.0, x["sample_scale"])


def test_peers(runs):
    r = _load(runs, "peers")
    (x,) = r["results"]
    for v in ("guidediff", "guidediff_diffeqsolve", "diffrax_unsafe", "diffrax_vbt"):
        _timing(x["forward"][v])
    _timing(x["backward"]["diffrax_vbt"])
    _timing(x["backward"]["diffrax_vbt_batched"])  # one solve of all particles
    assert "forward_diffrax_vbt" in x["speedup_of_guidediff"]
    assert "backward_diffrax_vbt_batched" in x["speedup_of_guidediff"]
    if not r["torch_available"]:
        assert any("torch" in n for n in x["notes"])


def test_cfg_cost(runs):
    r = _load(runs, "cfg_cost")
    variants = ("plain", "plain_2n", "cfg_batched", "cfg_two_calls", "cfg_interval")
    without_network = [v + "_no_network" for v in variants[2:3] + variants[4:]]
    for v in (*variants, "cfg_interval_quarter", "network_2n", *without_network):
        _timing(r["forward"][v])
        assert r["forward"][v]["interleaved"]
    assert "cfg_batched_over_plain_2n" in r["ratios"]
    # the target's denominator: one network call on 2N inputs, N particles
    assert r["meets_target"] == (r["ratios"]["cfg_batched_over_network_2n"] <= 1.15)
    for v in r["interval_savings"].values():
        f = v["fraction_of_steps"]
        assert 0 < f < 1 and v["network_evals_saved_bound"] == pytest.approx(
            (1 - f) / 2
        )
    # a share of the network's time: each run time less its no-network twin's,
    # recomputed here (None where a difference is within the timings' spread:
    # noise, at a smoke size)
    from benchmarks.cfg_cost import _network_time_saved

    fwd = r["forward"]
    for name, v in r["interval_savings"].items():
        assert v["measured_network_time_saved"] == _network_time_saved(fwd, name)
    timing = dict(run_s=1.0, run_min_s=0.99, run_max_s=1.01)
    fake = {
        "cfg_batched": dict(timing, run_s=3.0),
        "cfg_batched_no_network": timing,  # network time 2
        "cfg_interval": dict(timing, run_s=2.5),
        "cfg_interval_no_network": dict(timing, run_s=1.1),  # network time 1.4
    }
    assert _network_time_saved(fake, "cfg_interval") == pytest.approx(1 - 1.4 / 2)
    fake["cfg_interval_no_network"] = dict(timing, run_s=2.46)  # within the spread
    assert _network_time_saved(fake, "cfg_interval") is None
    del fake["cfg_batched_no_network"]  # a failed variant
    assert _network_time_saved(fake, "cfg_interval") is None
    assert r["max_abs_diff_cfg_batched_vs_two_calls"] < 1e-3


def test_grad_cost(runs):
    r = _load(runs, "grad_cost")
    (row,) = r["results"]
    assert row["steps"] == 4
    for v in (
        "forward",
        "guidediff_grad",
        "guidediff_grad_chunk_ckpt",
        "guidediff_grad_step_ckpt",
        "guidediff_grad_no_checkpoint",
    ):
        _timing(row["timings"][v])
        assert row["compiled_memory"][v]["temp_size_in_bytes"] >= 0
        assert row["matmul_flops"][v]["exact"]
    assert "guidediff_grad_no_checkpoint" in row["compiled_memory"]
    _timing(row["timings"]["diffrax_vbt_batched_grad"])
    assert "device_peak" not in row  # a process-lifetime peak, not the program's
    # store-all gradient = forward + a backward of two matmuls per forward matmul
    assert row["matmul_flops_over_forward"]["guidediff_grad_no_checkpoint"] == 3.0


def test_mfu(runs):
    r = _load(runs, "mfu")
    assert {x["dtype"] for x in r["results"]} == {"float32", "bfloat16"}
    assert {"hand_no_noise", "hand_no_network"} <= {x["variant"] for x in r["results"]}
    bf16 = {x["variant"] for x in r["results"] if x["dtype"] == "bfloat16"}
    assert "guidediff_bf16_particles" in bf16
    for x in r["results"]:
        _timing(x["timing"])
        # the analytic count (the MFU numerator) is the traced program's
        assert x["flops_counted"] == {
            "flops": x["flops_effective"],
            "exact": True,
            "notes": [],
        }
        assert (x["achieved_flops_per_s"] > 0) == (x["network_evals_per_step"] > 0)
    assert r["peaks_flops_per_s"] is None  # no peak is claimed for a CPU
    assert r["mfu_basis"] == "flops_effective"  # the work done (CFG's shared layer)


def test_mfu_peaks_are_claimed_for_sxm_cards_only():
    from benchmarks.mfu import device_peaks

    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H100"):
        assert device_peaks(kind)["bf16"] == 989.4e12, kind
    for kind in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "cpu"):
        assert device_peaks(kind) is None, kind


def test_scaling(runs):
    r = _load(runs, "scaling")
    assert r["device"]["num_devices"] == 4  # forced host devices
    assert [x["particles"] for x in r["vs_particles"]] == [16]
    four = [x for x in r["vs_devices"] if x["devices"] == 4 and x["call"] == "eager"]
    assert four and all(x["output_devices"] == 4 for x in four)
    strong = [x for x in r["vs_devices"] if x["scaling"] == "strong"]
    assert all(x["max_abs_diff_vs_1_device"] < 1e-4 for x in strong)


def test_work_precision(runs):
    r = _load(runs, "work_precision")
    solvers = {(x["process"], x["solver"], x["grid"]) for x in r["results"]}
    for grid in ("logsnr", "uniform"):
        assert ("ode", "dpm_solver_pp_2m", grid) in solvers
        assert ("sde", "sde_dpm_solver_pp_2m", grid) in solvers
    for x in r["results"]:
        _timing(x["timing"])
        assert x["error"] >= 0 and x["nfe"] >= x["steps"] == 4
    assert all(v["error"] <= r["tol"] for v in r["at_tolerance"].values())


def test_smc_cost(runs):
    r = _load(runs, "smc_cost")
    for v in ("sample", "smc", "smc_every_step", "smc_proposal"):
        _timing(r["forward"][v])
    assert set(r["ratios"]) == {
        "smc_over_sample",
        "smc_every_step_over_sample",
        "smc_proposal_over_sample",
    }
    # the twist reuses the step's score; a proposal adds one evaluation
    flops = {k: v["flops"] for k, v in r["matmul_flops"].items()}
    assert r["smc_flops_equal_sample"] and flops["smc"] == flops["sample"] > 0
    assert flops["smc_proposal"] == 2 * flops["sample"]


def test_time_all_records_failures_at_any_call():
    """A variant failing after its first call (warm-up or a timed round) is recorded
    as failed and the others are still timed; a failure in a round aborted the
    script, one in the warm-up was overwritten by timings."""
    import jax.numpy as jnp

    from benchmarks._common import time_all

    calls = {"warm": 0, "round": 0}

    def fails_at(n, counter):
        def fn(x):
            calls[counter] += 1
            if calls[counter] > n:
                raise RuntimeError("boom")
            return x + 1

        return fn

    fns = {"warm": fails_at(1, "warm"), "round": fails_at(3, "round"),
           "ok": lambda x: x * 2}  # fmt: skip
    timings, outputs = time_all(fns, jnp.ones(2), repeats=4)
    assert timings["warm"] == {"error": "RuntimeError: boom"}
    assert timings["round"] == {"error": "RuntimeError: boom"}
    assert outputs["warm"] is None and outputs["round"] is None
    assert timings["ok"]["repeats"] == 4 and timings["ok"]["interleaved"]


def test_memory_growth_fits_the_exponent():
    from benchmarks.grad_cost import memory_growth

    def row(steps, sqrt_excess, step_excess, fwd=1000):
        mem = {
            "forward": {"temp_size_in_bytes": fwd},
            "guidediff_grad": {"temp_size_in_bytes": fwd + sqrt_excess},
            "guidediff_grad_step_ckpt": {"temp_size_in_bytes": fwd + step_excess},
        }
        return {"steps": steps, "compiled_memory": mem}

    # 16x the steps: sqrt's excess over the forward grows 4x, per-step's 16x
    rows = [row(50, 64 * 50, 64 * 50), row(800, 64 * 200, 64 * 800)]
    g = memory_growth(rows)
    assert g["sqrt"]["exponent"] == pytest.approx(0.5) and g["sqrt"]["sublinear"]
    assert g["step"]["exponent"] == pytest.approx(1.0) and not g["step"]["sublinear"]
    assert "none" not in g  # not measured: not fitted
    assert memory_growth(rows[:1]) == {}
    # over five N the fit c + b N^a separates the backward pass's constant scratch
    # (90 MiB) from the growth: one 1 MiB state per step is linear (the two-point
    # log-log slope of the totals read it as 0.69, "sublinear")
    mib, ns = 2**20, (50, 100, 200, 400, 1000)
    rows = [row(n, 90 * mib + 4 * mib * round(n**0.5), 90 * mib + mib * n) for n in ns]
    g = memory_growth(rows, state_bytes=mib)
    assert g["step"]["states_per_extra_step"] == pytest.approx(1.0)
    assert g["step"]["exponent"] == pytest.approx(1.0, abs=0.02)
    assert not g["step"]["sublinear"]
    assert g["step"]["bytes_per_extra_step"] == pytest.approx(mib)
    assert (
        g["sqrt"]["exponent"] == pytest.approx(0.5, abs=0.05) and g["sqrt"]["sublinear"]
    )
    # a leading N above a later one (XLA's layouts: the H100 file's sqrt mode at
    # N = 50) is left out of the fit, which read the rest as convex (a = 1.35)
    rows[0] = row(50, 90 * mib + 50 * mib, mib * 50)
    g = memory_growth(rows, state_bytes=mib)
    assert g["sqrt"]["steps_fitted"] == [100, 200, 400, 1000]
    assert g["sqrt"]["exponent"] == pytest.approx(0.5, abs=0.05)
    assert g["sqrt"]["sublinear"]
    # no growth at all is a = 0 (a random exponent of a fit with b ~ 0 before)
    flat = [row(n, 10**8, 10**8) for n in ns]
    assert memory_growth(flat)["sqrt"]["exponent"] == 0.0


def test_gpu_table_refuses_files_from_different_devices(tmp_path):
    from benchmarks._table import gpu_table

    for name in ("mfu_gpu.json", "cfg_cost_gpu.json"):
        res = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
        if name == "cfg_cost_gpu.json":
            res["device"]["device_kind"] = "NVIDIA H200"
        (tmp_path / name).write_text(json.dumps(res))
    with pytest.raises(ValueError, match="different devices"):
        gpu_table(tmp_path)


def test_readme_gpu_table_is_generated_from_the_json():
    """benchmarks/README.md holds exactly the tables built from results/*.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bench_table", ROOT / "benchmarks" / "_table.py"
    )
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    for block in table.readme_blocks(ROOT / "benchmarks" / "results"):
        assert block in readme


def test_gpu_table_skips_quick_runs(tmp_path):
    """A smoke-size GPU run (NAME_gpu_quick.json) must not reach the README table."""
    from benchmarks._table import gpu_table

    src = ROOT / "benchmarks" / "results" / "mfu_gpu.json"
    full = json.loads(src.read_text())
    (tmp_path / "mfu_gpu.json").write_text(json.dumps(full))
    before = gpu_table(tmp_path)
    quick = dict(full, quick=True, particles=8)
    (tmp_path / "mfu_gpu_quick.json").write_text(json.dumps(quick))
    assert gpu_table(tmp_path) == before and "8 particles" not in before


def test_mfu_table_counts_cfg_work_done():
    """Files written before `mfu_basis` took CFG's MFU from its nominal FLOPs (the
    shared first layer twice); the table rescales them to the work done."""
    from benchmarks._table import _mfu

    res = json.loads((ROOT / "benchmarks" / "results" / "mfu_gpu.json").read_text())
    cfg = [r for r in res["results"] if r["variant"] == "guidediff_cfg"]
    assert cfg and all(r["flops_effective"] < r["flops"] for r in cfg)
    f32 = [r for r in cfg if r["dtype"] == "float32"][0]
    expected = f32["flops_effective"] / f32["timing"]["run_s"]
    expected /= res["peaks_flops_per_s"]["tf32"]
    row = [x for x in _mfu(res, "mfu_gpu.json") if "float32 MFU" in x][0]
    # guidediff / hand / guidediff CFG / ...: the third value is CFG's
    assert row.split("|")[4].split("/")[2].strip() == f"{100 * expected:.0f} %"


def test_quick_run_does_not_replace_a_full_result(tmp_path):
    """`bench --quick` must not overwrite a committed full run (the README tables
    are generated from those): it writes NAME_DEVICE_quick.json beside it."""
    import argparse

    from benchmarks._common import device_tag, write_result

    full = tmp_path / f"demo_{device_tag()}.json"
    full.write_text(json.dumps({"quick": False, "value": 1}))
    args = argparse.Namespace(quick=True, out=tmp_path)
    path = write_result("demo", args, {"value": 2})
    assert path.name == f"demo_{device_tag()}_quick.json"
    assert json.loads(full.read_text())["value"] == 1
    # a quick file is replaced by the next quick run
    full.write_text(json.dumps({"quick": True, "value": 1}))
    assert write_result("demo", args, {"value": 3}) == full


def test_time_all_under_a_fake_clock(monkeypatch):
    """Exact timings under a scripted clock: the median of the timed calls (1 s, not
    the mean 4 s), compile time = first call - median, the dispatch time taken before
    blocking, and the round order rotated by one per round."""
    import types

    import benchmarks._common as common

    clock, order = [0.0], []
    monkeypatch.setattr(
        common, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )

    class Out:  # blocking on it advances the clock by `block`
        def __init__(self, block):
            self.block = block

    def block(out):
        clock[0] += out.block
        return out

    monkeypatch.setattr(common, "_block_jax", block)

    def variant(name, durations):  # (dispatch, blocking) per call
        it = iter(durations)

        def fn(x):
            dispatch, blocking = next(it)
            order.append(name)
            clock[0] += dispatch
            return Out(blocking)

        return fn

    a = variant("a", [(100, 0), (1, 0), (0.5, 0.5), (0.5, 0.5), (0.5, 9.5)])
    b = variant("b", [(50, 0), (1, 0), (0.25, 1.75), (0.25, 1.75), (0.25, 1.75)])
    timings, _ = common.time_all({"a": a, "b": b}, None, repeats=3)
    ta = timings["a"]
    assert (ta["run_s"], ta["compile_s"], ta["dispatch_s"]) == (1.0, 99.0, 0.5)
    assert (ta["run_min_s"], ta["run_max_s"], ta["first_call_s"]) == (1.0, 10.0, 100.0)
    assert timings["b"]["run_s"] == 2.0 and timings["b"]["dispatch_s"] == 0.25
    assert order[4:] == list("abbaab")  # first calls and warm-ups, then rotated rounds


def test_gpu_table_shows_a_failed_variant_as_a_dash():
    """time_all records a failed variant as {"error": ...}: the README table shows
    "-" for it (no committed JSON has one, so this path ran nowhere else)."""
    from benchmarks._table import _against_scan

    res = json.loads((ROOT / "benchmarks/results/against_scan_gpu.json").read_text())
    res["results"][0]["forward"]["hand"] = {"error": "RuntimeError: out of memory"}
    rows = _against_scan(res, "against_scan_gpu.json")
    assert rows[0].endswith("ms vs -) | against_scan_gpu.json |"), rows[0]


def test_a_custom_size_run_does_not_replace_a_default_result(tmp_path):
    """A full run with non-default sizes (here --particles) replaced the committed
    default run the README tables come from; it goes to NAME_DEVICE_custom.json."""
    from benchmarks._common import device_tag, parse, parser, write_result

    default = tmp_path / f"demo_{device_tag()}.json"
    default.write_text(json.dumps({"quick": False, "value": 1}))
    args = parse(parser("demo"), ["--particles", "16", "--out", str(tmp_path)])
    assert args.custom == ["particles"]
    path = write_result("demo", args, {"value": 2})
    assert path.name == f"demo_{device_tag()}_custom.json"
    assert json.loads(default.read_text())["value"] == 1
    # a default run replaces the default file; repeats change no size
    args = parse(parser("demo"), ["--repeats", "2", "--out", str(tmp_path)])
    assert args.custom == [] and write_result("demo", args, {"value": 3}) == default


def test_benchmark_flags_are_checked_before_any_work(tmp_path, capsys):
    """Zero or negative counts crashed deep inside a script; an --out that is a file
    failed after the whole run; --steps with --steps-list was ambiguous; run_all with
    nothing selected exited 0."""
    from benchmarks import grad_cost, run_all
    from benchmarks._common import parse, parser

    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["--repeats", "0"], ["--particles", "-4"], ["--steps", "x"],
                 ["--out", str(afile)]):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            parse(parser("demo"), argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        grad_cost.main(["--steps", "4", "--steps-list", "8", "--out", str(tmp_path)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "mfu", "--skip", "mfu"])
    assert exc.value.code == 2
    assert "no benchmark to run" in capsys.readouterr().err


def test_run_all_resolves_a_relative_out_in_the_callers_folder(tmp_path, monkeypatch):
    """The scripts run from the repository root: a relative --out landed there."""
    from benchmarks import run_all

    seen = []
    monkeypatch.setattr(
        run_all.subprocess, "run",
        lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0),
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--only", "mfu", "--out", "rel"]) == 0
    (cmd,) = seen
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "rel")


def test_table_cli_never_writes_empty_tables(tmp_path, monkeypatch, capsys):
    """From another folder, `_table --write` read a relative results folder that
    did not exist there and wrote empty tables over the README's (exit 0)."""
    from benchmarks import _table

    readme = Path(_table.__file__).with_name("README.md")
    before = readme.read_text()
    monkeypatch.chdir(tmp_path)
    for argv in (["nosuch"], [str(tmp_path)], ["--write", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            _table.main(argv)
        assert exc.value.code == 2
    (tmp_path / "work_precision_cpu.json").write_text("{}")
    with pytest.raises(SystemExit):  # no GPU files: nothing to write
        _table.main(["--write", str(tmp_path)])
    # GPU files without a work-precision file emptied the work-precision table
    gpu_only = tmp_path / "fetched"
    gpu_only.mkdir()
    (gpu_only / "mfu_gpu.json").write_text("{}")
    with pytest.raises(SystemExit, match="2"):
        _table.main(["--write", str(gpu_only)])
    assert "work_precision" in capsys.readouterr().err
    assert readme.read_text() == before
    assert _table.main([]) == 0  # the default folder is found from any directory
    assert "| against_scan |" in capsys.readouterr().out


def test_tables_leave_out_custom_size_runs(tmp_path):
    """A `_custom.json` run (other sizes than the defaults) added rows beside the
    default run's."""
    import shutil

    from benchmarks import _table

    results = Path(_table.__file__).with_name("results")
    for name in ("against_scan_gpu.json", "work_precision_cpu.json"):
        shutil.copy(results / name, tmp_path / name)
    before = "\n".join(_table.readme_blocks(tmp_path))
    for name in ("against_scan_gpu", "work_precision_cpu"):
        res = json.loads((tmp_path / f"{name}.json").read_text())
        res["custom_flags"] = ["steps"]
        (tmp_path / f"{name}_custom.json").write_text(json.dumps(res))
    assert "\n".join(_table.readme_blocks(tmp_path)) == before


def test_bench_runs_from_the_checkout_with_an_absolute_out(tmp_path, monkeypatch):
    """Run from the caller's folder, `-m benchmarks.run_all` could import a
    `benchmarks` package there; a relative --out is the caller's."""
    from guidediff import _cli

    seen = {}
    monkeypatch.setattr(
        subprocess, "run",
        lambda cmd, **kw: seen.update(cmd=cmd, **kw) or subprocess.CompletedProcess(cmd, 0),
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert _cli._bench(["--only", "mfu", "--out", "rel"]) == 0
    assert Path(seen["cwd"]) == ROOT
    assert seen["cmd"][-1] == str(tmp_path / "rel")


def test_prose_claims_hold_in_the_committed_result_files():
    """Claims the READMEs make in words about the committed results, checked
    against the files (a re-run that changes them fails here, not silently):
    README "K = 4 put guidediff ahead of the plain hand-written loop at every
    benchmark size"; benchmarks/README "the exponential integrator shows the largest
    variance bias of the four SDE solvers here, on both grids" and ShARK's fewest
    score evaluations to the tolerance."""
    results = ROOT / "benchmarks" / "results"
    scan = json.loads((results / "against_scan_gpu.json").read_text())
    assert {r["unroll"] for r in scan["results"]} == {4}
    ahead = {r["size"]: r["ratios"]["forward_unroll_jit"] for r in scan["results"]}
    assert set(ahead) == {"2d", "64d", "3072d"} and min(ahead.values()) > 1.0, ahead
    # README: the gradient is "an order of magnitude faster than diffrax's
    # VirtualBrownianTree gradient written per particle and vmapped"
    peers = json.loads((results / "peers_gpu.json").read_text())
    vbt = [
        r["speedup_of_guidediff"].get("backward_diffrax_vbt") for r in peers["results"]
    ]
    grads = json.loads((results / "grad_cost_gpu.json").read_text())["results"]
    vbt += [r.get("diffrax_vbt_grad_over_guidediff_grad") for r in grads]
    vbt = [v for v in vbt if v is not None]
    assert vbt and min(vbt) >= 10.0, vbt
    wp = json.loads((results / "work_precision_cpu.json").read_text())
    for grid in ("logsnr", "uniform"):
        largest = {}
        for x in wp["results"]:
            if x["process"] == "sde" and x["grid"] == grid:
                if x["steps"] == max(wp["steps_list"]):
                    largest[x["solver"]] = x["error"]
        assert len(largest) == 4
        assert max(largest, key=largest.get) == "exponential_integrator", largest
        # "ShARK reaches the tolerance with the fewest score evaluations of the SDE
        # solvers on both grids, level with SDEDPMSolverPP on the log-SNR grid"
        nfe = {
            key.split("/")[1]: row["nfe"]
            for key, row in wp["at_tolerance"].items()
            if key.startswith("sde/") and key.endswith("/" + grid)
        }
        assert nfe["shark"] == min(nfe.values()), (grid, nfe)
        tied = {k for k, v in nfe.items() if v == nfe["shark"]}
        want = {"shark", "sde_dpm_solver_pp_2m"} if grid == "logsnr" else {"shark"}
        assert tied == want, (grid, nfe)
        # "UniPC reaches the tolerance in no more steps than DPMSolverPP on either
        # grid, and has the smallest error of the ODE solvers with one score
        # evaluation a step at the largest step count"
        ode = {
            key.split("/")[1]: row["nfe"]
            for key, row in wp["at_tolerance"].items()
            if key.startswith("ode/") and key.endswith("/" + grid)
        }
        assert ode["unipc"] <= ode["dpm_solver_pp_2m"], (grid, ode)
        last = {
            x["solver"]: x["error"]
            for x in wp["results"]
            if x["process"] == "ode"
            and x["grid"] == grid
            and x["steps"] == max(wp["steps_list"])
            and x["solver"] != "heun"
        }
        assert len(last) == 4 and min(last, key=last.get) == "unipc", (grid, last)
