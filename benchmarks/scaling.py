"""Throughput of `gd.sample` against the number of particles and of devices.

1. Particles: the 64-D MLP problem, `gd.sample` (scan driver) inside `jax.jit`, for a
   range of particle counts; throughput = particles x steps / second.
2. Devices: the particles sharded over a 1-D `jax.sharding.Mesh` of 1, 2, 4, ...
   devices with `gd.sample(..., sharding=NamedSharding(mesh, P("p")))`; strong
   scaling (fixed particle count) and weak scaling (particles per device fixed).
   On a CPU this script forces 4 host devices (`XLA_FLAGS=
   --xla_force_host_platform_device_count=4`, set before jax is imported; change the
   count with the environment variable GUIDEDIFF_BENCH_HOST_DEVICES). Forced host
   devices share the machine's cores, so they show that sharding works, not a
   speed-up.

    PYTHONPATH=. python -m benchmarks.scaling [--quick]
"""

import os


def _force_host_devices() -> None:
    n = os.environ.get("GUIDEDIFF_BENCH_HOST_DEVICES", "4")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ["XLA_FLAGS"] = flags


# Before jax is imported (a no-op if this process imported it already).
_force_host_devices()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from . import _common as C, _problems as P  # noqa: E402


NAME = "scaling"


def _devices():
    """The devices to shard over: the accelerators if any, else the (forced) CPUs."""
    return jax.devices()


def particle_counts(args) -> list[int]:
    if args.particles_list:
        return args.particles_list
    if args.quick:
        return [16, 64]
    if C.on_accelerator():
        return [1024, 4096, 16384, 65536, 262144]
    return [64, 256, 1024, 4096]


def _throughput(timing: dict, particles: int, steps: int) -> float | None:
    if "run_s" not in timing:
        return None
    return particles * steps / timing["run_s"]


def _n_devices(ys) -> int | None:
    return None if ys is None else len(ys.sharding.device_set)


def _spec(ys) -> str | None:
    return None if ys is None else str(getattr(ys.sharding, "spec", None))


def vs_particles(problem: P.Problem, ts, steps, args) -> list[dict]:
    rows = []
    for n in particle_counts(args):
        fn = jax.jit(P.gd_sampler(problem, particles=n))
        timing, _ = C.try_timeit(
            fn, problem.params, jr.key(0), ts, repeats=args.repeats
        )
        rows.append(
            {
                "particles": n,
                "timing": timing,
                "particle_steps_per_s": _throughput(timing, n, steps),
            }
        )
        print(f"  {n:>8} particles: {C.describe(timing)}", flush=True)
    return rows


def vs_devices(problem: P.Problem, ts, steps, args, per_device: int) -> list[dict]:
    """Strong and weak scaling over 1, 2, 4, ... devices, calling `gd.sample`
    directly (`eager`) and inside `jax.jit` (`jit`)."""
    devices = _devices()
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= len(devices)]
    rows, reference = [], None
    for kind in args.kinds:
        for n_dev in counts:
            mesh = Mesh(devices[:n_dev], ("p",))
            sharding = NamedSharding(mesh, PartitionSpec("p"))
            n = per_device * (counts[-1] if kind == "strong" else n_dev)
            sampler = P.gd_sampler(problem, particles=n, sharding=sharding)
            for call, fn in (("eager", sampler), ("jit", jax.jit(sampler))):
                timing, ys = C.try_timeit(
                    fn, problem.params, jr.key(0), ts, repeats=args.repeats
                )
                row = {
                    "scaling": kind,
                    "call": call,
                    "devices": n_dev,
                    "particles": n,
                    "timing": timing,
                    "particle_steps_per_s": _throughput(timing, n, steps),
                    "output_devices": _n_devices(ys),
                    "output_spec": _spec(ys),
                }
                if reference is None and ys is not None:
                    reference = ys
                if kind == "strong":
                    row["max_abs_diff_vs_1_device"] = P.max_abs_diff(ys, reference)
                rows.append(row)
                print(
                    f"  {kind} {call:<5} {n_dev} device(s), {n} particles: "
                    f"{C.describe(timing)}, output sharding {row['output_spec']}",
                    flush=True,
                )
    return rows


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--size", default="64d", choices=list(P.SIZES))
    p.add_argument("--particles-list", type=C.positive_int, nargs="+", default=None)
    for action in p._actions:  # the shared flag means something narrower here
        if action.dest == "particles":
            action.help = (
                "particles per device in the device sweep (the particle sweep "
                "uses --particles-list)"
            )
    p.add_argument(
        "--kinds", nargs="+", default=["strong", "weak"], choices=["strong", "weak"]
    )
    args = C.parse(p, argv)
    C.header(NAME)
    size = P.SIZES[args.size]
    steps = P.steps_for(args, default=100)
    ts = P.time_grid(steps)
    problem = P.make_problem(size, 1, quick=args.quick)
    print(f"-- particles ({size.name}, {steps} steps, width {problem.width})")
    by_particles = vs_particles(problem, ts, steps, args)
    if args.particles is not None:
        per_device = args.particles
    else:
        per_device = 16 if args.quick else (16384 if C.on_accelerator() else 256)
    print(f"-- devices ({per_device} particles per device at the largest count)")
    by_devices = vs_devices(problem, ts, steps, args, per_device)
    C.write_result(
        NAME,
        args,
        {
            "size": size.name,
            "dim": size.dim,
            "steps": steps,
            "network_width": problem.width,
            "throughput_unit": "particle-steps per second",
            "vs_particles": by_particles,
            "vs_devices": by_devices,
            "sharding": "NamedSharding(Mesh(devices[:n], ('p',)), P('p'))",
            "note": (
                "forced host devices share the CPU's cores: device scaling on a CPU "
                "shows that sharding works, not a speed-up"
                if not C.on_accelerator()
                else ""
            ),
        },
    )
    return {"vs_particles": by_particles, "vs_devices": by_devices}


if __name__ == "__main__":
    main()
