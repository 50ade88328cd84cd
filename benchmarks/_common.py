"""Helpers shared by the benchmark scripts: flags, timing, memory, device and version
information, and JSON results.

Timing follows `timeit`: the first call (trace + compile + one run) is timed on its
own; after `warmup` untimed calls, `repeats` calls are timed one by one, each ended
by `jax.block_until_ready`, and the median is reported (the minimum and maximum
too). Compile time is the first call minus the steady-state median. `time_all`
(the variants a script compares) interleaves the variants' timed calls, round by
round in rotating order, so that a slow spell of a shared machine hits every
variant alike and the ratios compare like with like.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from guidediff._experiments._common import source_commit


RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMING_METHOD = (
    "first call timed alone (trace + compile + run); then 1 untimed warm-up call; "
    "then `repeats` calls timed one by one with time.perf_counter around "
    "fn(...) + jax.block_until_ready; run_s is their median; compile_s = "
    "first_call_s - run_s; dispatch_s is the median time until fn(...) returned "
    "(before blocking): the host's share of an asynchronous call. Variants compared "
    "in one script (time_all) have their timed calls interleaved: `repeats` rounds, "
    "one call of each variant per round, in an order rotated every round"
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or a negative count crashed a script
    deep inside, after compiling)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parser(description: str, *, default_repeats: int = 5) -> argparse.ArgumentParser:
    """The flags every script takes (scripts add their own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, for a CPU smoke run"
    )
    p.add_argument(
        "--particles", type=positive_int, default=None,
        help="particle count for every size",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=positive_int, default=None, help="number of solver steps"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed repeats, median reported (default {default_repeats}, 2 if --quick)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="folder for the JSON result (default benchmarks/results)",
    )
    p.set_defaults(default_repeats=default_repeats)
    return p


# Flags that change no measured size: a run that sets only these is a default run.
_SETTINGS = {"quick", "out", "repeats", "default_repeats", "require_torch"}


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse the flags; check the output folder before anything is measured; note
    whether a size flag differs from its default (`write_result` then keeps a
    default run's file)."""
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else args.default_repeats
    args.custom = sorted(
        k for k, v in vars(args).items() if k not in _SETTINGS and v != p.get_default(k)
    )
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".benchmark-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        p.error(f"--out {str(out)!r} is not a writable folder: {e}")
    return args


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def _block_jax(out):
    return jax.block_until_ready(out)


def timeit(
    fn: Callable,
    *args,
    repeats: int = 5,
    warmup: int = 1,
    block: Callable = _block_jax,
) -> tuple[dict, Any]:
    """Time `fn(*args)` as described in the module docstring.

    Returns `(timing, output_of_first_call)`; `block` waits for an output (the
    default is `jax.block_until_ready`; a PyTorch peer passes its own).
    """
    t0 = time.perf_counter()
    out = block(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        block(fn(*args))
    times, dispatch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_i = fn(*args)
        dispatch.append(time.perf_counter() - t0)
        block(out_i)
        times.append(time.perf_counter() - t0)
    run = statistics.median(times)
    timing = {
        "run_s": run,
        "dispatch_s": statistics.median(dispatch),
        "run_min_s": min(times),
        "run_max_s": max(times),
        "repeats": repeats,
        "first_call_s": first,
        "compile_s": max(first - run, 0.0),
    }
    return timing, out


def pipelined(fn: Callable, *args, calls: int = 10, repeats: int = 3) -> dict:
    """Time `calls` calls of `fn(*args)` issued back to back, blocking once at the
    end (after one blocked warm-up call): the per-call time when the host's work
    overlaps the device's, as in a loop that does not wait for each result. Median
    over `repeats` such bursts."""
    _block_jax(fn(*args))
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        _block_jax(outs)
        per_call.append((time.perf_counter() - t0) / calls)
    return {"per_call_s": statistics.median(per_call), "calls": calls}


def try_timeit(fn: Callable, *args, **kwargs) -> tuple[dict, Any]:
    """`timeit`, but a failure (e.g. out of memory) is recorded, not raised:
    returns `({"error": message}, None)`."""
    try:
        return timeit(fn, *args, **kwargs)
    except Exception as e:  # recorded in the JSON; the other variants still run
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        print(f"  FAILED: {msg}", flush=True)
        return {"error": msg}, None


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    """`numerator["run_s"] / denominator["run_s"]` (None if either is missing)."""
    if not numerator or not denominator:
        return None
    if "run_s" not in numerator or "run_s" not in denominator:
        return None
    return numerator["run_s"] / denominator["run_s"]


def compiled_memory(jitted: Callable, *args) -> dict | None:
    """XLA's memory analysis of `jitted` (a `jax.jit` function) compiled for `args`:
    temporary, argument and output bytes. Compiles once more (not timed)."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
    except Exception as e:  # not every backend implements it
        return {"error": f"{type(e).__name__}: {e}"}
    if analysis is None:
        return None
    keys = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    return {k: int(getattr(analysis, k)) for k in keys if hasattr(analysis, k)}


def device_memory_stats() -> dict | None:
    """The default device's allocator statistics (None where unavailable, e.g. CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats}


def device_info() -> dict:
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "host_cpu_count": os.cpu_count(),
        "host_machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "eqx_on_error": os.environ.get("EQX_ON_ERROR", "raise (default)"),
        "default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def device_tag() -> str:
    """`gpu`, `cpu` or `tpu`: the suffix of the result file."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def versions() -> dict:
    import diffrax
    import equinox
    import flax
    import jaxlib
    import numpy

    import guidediff

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        "guidediff": guidediff.__version__,
        "guidediff_commit": source_commit(),
    }
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def write_result(name: str, args, payload: dict) -> Path:
    """Write `payload` (plus device, versions and run settings) to
    `args.out/{name}_{device tag}.json` and return the path. A quick run never
    replaces a full run's file (README tables are generated from those): it goes
    to `{name}_{device tag}_quick.json` beside it instead; a full run with sizes
    other than the defaults (`--particles`, `--steps`, a script's own size flags)
    never replaces a default full run's file: it goes to `..._custom.json`."""
    result = {
        "benchmark": name,
        "device": device_info(),
        "versions": versions(),
        "quick": bool(args.quick),
        "custom_flags": list(getattr(args, "custom", [])),
        "argv": list(sys.argv[1:]),
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(),
        "timing_method": TIMING_METHOD,
        **payload,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_tag()}.json"
    if args.quick and _is_full_run(path):
        path = path.with_name(f"{path.stem}_quick.json")
    elif getattr(args, "custom", None) and _is_default_run(path):
        path = path.with_name(f"{path.stem}_custom.json")
    path.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"wrote {path}")
    return path


def _is_full_run(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("quick") is False
    except (OSError, ValueError, AttributeError):
        return False


def _is_default_run(path: Path) -> bool:
    """A full run with default sizes (files written before `custom_flags` was
    recorded count as default)."""
    try:
        res = json.loads(path.read_text())
        return res.get("quick") is False and not res.get("custom_flags")
    except (OSError, ValueError, AttributeError):
        return False


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def header(name: str) -> None:
    """Print the benchmark name and the device it runs on."""
    dev = jax.devices()[0]
    print(
        f"== {name} on {dev.platform}:{dev.device_kind} "
        f"({jax.device_count()} device(s)), jax {jax.__version__}"
    )


def describe(t: dict) -> str:
    """`run ... compile ...` of a timing, or `FAILED`."""
    if "run_s" not in t:
        return "FAILED"
    return f"run {fmt_s(t['run_s']):>11}   compile {fmt_s(t['compile_s']):>11}"


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1.0:
        return f"{x:.3f} s"
    return f"{x * 1e3:.2f} ms"


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print `rows` (dicts) as an aligned text table of `columns`."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def time_all(
    fns: dict[str, Callable], *args, repeats: int, label: str = "", warmup: int = 1
) -> tuple[dict, dict]:
    """Time each of `fns` on the same `args` as `timeit` does, but with the timed
    calls interleaved: each variant's first call (compile) and warm-up first, then
    `repeats` rounds, each timing one call of every variant, in an order rotated by
    one per round. Prints one line per variant at the end.

    Returns `({name: timing}, {name: output of the first call})`; a variant that
    fails gets `{"error": message}` and output None (and drops out of the rounds).
    """
    timings, outputs, first = {}, {}, {}

    def failed(name, e):  # recorded in the JSON; the other variants still run
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        print(f"  {label}{name:<28} FAILED: {msg}", flush=True)
        timings[name], outputs[name] = {"error": msg}, None
        first.pop(name, None)

    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            out = _block_jax(fn(*args))
            took = time.perf_counter() - t0
            for _ in range(warmup):
                _block_jax(fn(*args))
        except Exception as e:
            failed(name, e)
        else:
            outputs[name], first[name] = out, took
    names = list(first)
    times: dict[str, list[float]] = {n: [] for n in names}
    dispatch: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name not in first:  # failed in an earlier round
                continue
            try:
                t0 = time.perf_counter()
                out = fns[name](*args)
                dispatch[name].append(time.perf_counter() - t0)
                _block_jax(out)
                times[name].append(time.perf_counter() - t0)
            except Exception as e:
                failed(name, e)
    for name in first:
        run = statistics.median(times[name])
        timings[name] = {
            "run_s": run,
            "dispatch_s": statistics.median(dispatch[name]),
            "run_min_s": min(times[name]),
            "run_max_s": max(times[name]),
            "repeats": repeats,
            "interleaved": True,
            "first_call_s": first[name],
            "compile_s": max(first[name] - run, 0.0),
        }
        print(
            f"  {label}{name:<28} run {fmt_s(run):>11}   "
            f"compile {fmt_s(timings[name]['compile_s']):>11}",
            flush=True,
        )
    return {n: timings[n] for n in fns}, outputs


def f32_matmul_probe() -> dict:
    """How float32 matmuls run under the default precision: the relative error of a
    512x512 product against float64 (TF32 gives ~1e-3, true float32 ~1e-6)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512))
    b = rng.standard_normal((512, 512))
    got = np.asarray(jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
    ref = a @ b
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"rel_err_vs_float64": err, "looks_like_tf32": err > 1e-4}
