"""The `guidediff` command line."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guidediff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="CFG on a 2-D, 3-class Gaussian mixture")
    p_demo.add_argument("--out", default="out/demo", help="output folder")
    p_demo.add_argument("--particles", type=int, default=4000)
    p_demo.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(args.out, num_particles=args.particles, num_steps=args.steps)
        except OSError as e:
            print(f"guidediff demo: cannot write to {args.out!r}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
