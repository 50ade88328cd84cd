"""Run every benchmark, each in its own Python process, and print a summary.

Each script writes its JSON to `--out` (default benchmarks/results), named after
the script and the device kind (e.g. `against_scan_gpu.json`). A separate process
per script keeps device memory and compilation caches apart, and lets `scaling`
force host devices before jax starts.

    PYTHONPATH=. python -m benchmarks.run_all [--quick] [--only NAME ...]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import positive_int


SCRIPTS = (
    "against_scan",
    "peers",
    "cfg_cost",
    "grad_cost",
    "mfu",
    "scaling",
    "work_precision",
    "smc_cost",
)
ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    p.add_argument(
        "--out", type=Path, default=None,
        help="folder for the JSON files (relative to the current folder)",
    )  # fmt: skip
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=None)
    p.add_argument("--skip", nargs="+", choices=SCRIPTS, default=())
    p.add_argument(
        "--steps", type=positive_int, default=None, help="passed to every script"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="passed to every script"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds per script (no limit)"
    )
    args = p.parse_args(argv)
    names = [s for s in (args.only or SCRIPTS) if s not in args.skip]
    if not names:
        p.error("--only and --skip leave no benchmark to run")
    flags = ["--quick"] if args.quick else []
    if args.out is not None:
        # the scripts run from the repository root: a relative folder is the
        # caller's, resolved here
        flags += ["--out", str(args.out.resolve())]
    if args.steps is not None:
        flags += ["--steps", str(args.steps)]
    if args.repeats is not None:
        flags += ["--repeats", str(args.repeats)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    summary = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *flags]
        print(f"\n### {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        summary.append((name, rc, time.perf_counter() - t0))
    print("\n### summary")
    for name, rc, wall in summary:
        status = "ok" if rc == 0 else f"FAILED ({rc})"
        print(f"{name:<14} {status:<14} {wall:8.1f} s")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
