"""The `guidediff` command line."""

import argparse
import sys


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an int in [lo, hi)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value >= hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi})"
            raise argparse.ArgumentTypeError(f"must be an integer {rng}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guidediff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="CFG on a 2-D, 3-class Gaussian mixture")
    p_demo.add_argument("--out", default="out/demo", help="output folder")
    p_demo.add_argument("--particles", type=_int_in(2), default=4000)
    p_demo.add_argument("--steps", type=_int_in(1), default=500)
    p_rep = sub.add_parser(
        "reproduce",
        help="reproduce one of the paper's experiments (results.json + PNG figures)",
    )
    p_rep.add_argument("name", help="experiment name (see `guidediff reproduce list`)")
    p_rep.add_argument(
        "--quick", action="store_true", help="small sizes (< 2 min on a CPU)"
    )
    p_rep.add_argument("--out", default=None, help="output folder (out/NAME)")
    p_rep.add_argument("--seed", type=_int_in(0, 2**32), default=0)
    sub.add_parser(
        "bench", help="run the benchmarks (from a source checkout; flags go to run_all)"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to run_all
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        return _reproduce(args.name, args.out, quick=args.quick, seed=args.seed)
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(args.out, num_particles=args.particles, num_steps=args.steps)
        except OSError as e:
            print(f"guidediff demo: cannot write to {args.out!r}: {e}", file=sys.stderr)
            return 2
    return 0


def _reproduce(name: str, out: str | None, *, quick: bool, seed: int) -> int:
    from ._experiments import EXPERIMENTS
    from ._experiments._common import prepare_out_dir

    names = ", ".join(EXPERIMENTS)
    if name == "list":
        print(names)
        return 0
    if name not in EXPERIMENTS:
        print(
            f"guidediff reproduce: unknown experiment {name!r}; choose one of: {names}",
            file=sys.stderr,
        )
        return 2
    out = f"out/{name}" if out is None else out
    try:
        out_dir = prepare_out_dir(out)
    except OSError as e:
        print(f"guidediff reproduce: cannot write to {out!r}: {e}", file=sys.stderr)
        return 2
    mode = "quick" if quick else "full"
    print(f"guidediff reproduce {name} ({mode} mode) -> {out_dir}", flush=True)
    results = EXPERIMENTS[name](out_dir, quick=quick, seed=seed)
    print(f"wrote {out_dir / 'results.json'} ({results['seconds']:.1f} s)")
    claims = results.get("claims", {})
    for claim, value in claims.items():
        shown = "not judged at this size" if value is None else value
        print(f"  {claim}: {shown}")
    return 0


def _bench(rest: list[str]) -> int:
    """`python -m benchmarks.run_all REST` in the source checkout this package is in."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run_all.py").is_file():
        print(
            "guidediff bench: the benchmarks live in the source checkout "
            "(benchmarks/), which is not next to this installed package; clone the "
            "repository and run `make bench` there",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(root), env.get("PYTHONPATH")])
    )
    # from the checkout (a `benchmarks` folder in the caller's folder must not be
    # imported instead), with a relative --out resolved in the caller's folder
    rest = list(rest)
    for i, arg in enumerate(rest):
        if arg == "--out" and i + 1 < len(rest):
            rest[i + 1] = str(Path(rest[i + 1]).resolve())
        elif arg.startswith("--out="):
            rest[i] = "--out=" + str(Path(arg[len("--out=") :]).resolve())
    cmd = [sys.executable, "-m", "benchmarks.run_all", *rest]
    return subprocess.run(cmd, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
