"""Work-precision: accuracy against score evaluations and run time, per solver.

Speed that matters to a user is time at a given accuracy, and few-step solvers buy
more of it than any kernel. The problem has closed forms: Gaussian data
N(mu, diag(c)) in d dimensions (random mu and c from a fixed key), reverse VP
SDE / probability-flow ODE from T = 1 to 1e-3 on grids uniform in log-SNR
(`gd.logsnr_grid`) and uniform in time (`gd.uniform_grid`, `gd.sample`'s default),
every particle started from the exact time-T marginal.

- ODE solvers (`diffrax.Euler`, `diffrax.Heun`, `gd.DDIM`, `gd.DPMSolverPP`,
  `gd.UniPC`): the error is the RMS distance of the particles to the exact flow map
  (which keeps each standardised coordinate fixed), over the RMS data scale.
  Deterministic.
- SDE solvers (`diffrax.Euler` i.e. Euler-Maruyama, `gd.ExponentialIntegrator`,
  `gd.SDEDPMSolverPP`, `diffrax.ShARK`): the error is the relative error of the sample variance
  against the exact time-1e-3 marginal's, averaged over the coordinates (a
  solver's variance bias has the same sign in every coordinate), with its
  Monte-Carlo standard error `mc_se` = sqrt(2 / (particles * d)): below a few
  `mc_se` the number is noise.

`nfe` counts score evaluations per particle (Heun and ShARK: 2 per step). Each row is timed
(`gd.sample` inside `jax.jit`); `at_tolerance` gives, per solver and grid, the
fewest steps on the list whose error is under `--tol`, and its run time.

    PYTHONPATH=. python -m benchmarks.work_precision [--quick] [--dim 64]
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr

import guidediff as gd

from . import _common as C


NAME = "work_precision"
SDE = gd.VPSDE()
T_END = 1e-3
STEPS = (5, 10, 20, 40, 80, 160, 320)
QUICK_STEPS = (4, 8)


def _solvers(process: str) -> dict:
    if process == "ode":
        return {
            "euler": (dfx.Euler(), 1),
            "heun": (dfx.Heun(), 2),
            "ddim": (gd.DDIM(SDE), 1),
            "dpm_solver_pp_2m": (gd.DPMSolverPP(SDE), 1),
            "unipc": (gd.UniPC(SDE), 1),
        }
    return {
        "euler_maruyama": (dfx.Euler(), 1),
        "exponential_integrator": (gd.ExponentialIntegrator(SDE), 1),
        "sde_dpm_solver_pp_2m": (gd.SDEDPMSolverPP(SDE), 1),
        # diffrax's stochastic Runge-Kutta for additive noise: two evaluations a
        # step, space-time Levy areas from the grid path
        "shark": (dfx.ShARK(), 2),
    }


def _exact_std(c, t):
    a, s = SDE.marginal(t)
    return jnp.sqrt(a**2 * c + s**2)


GRIDS = {
    "logsnr": lambda n: gd.logsnr_grid(SDE, SDE.T, T_END, n),
    "uniform": lambda n: gd.uniform_grid(SDE.T, T_END, n),
}


def run(
    process: str, grid: str, dim: int, particles: int, steps_list, args
) -> list[dict]:
    k_mu, k_c, k_y = jr.split(jr.key(7), 3)
    mu = jr.normal(k_mu, (dim,))
    c = jnp.exp(jr.uniform(k_c, (dim,), minval=-2.0, maxval=1.0))
    data = gd.Gaussian(mu, jnp.diag(c))
    a_T, _ = SDE.marginal(SDE.T)
    std_T = _exact_std(c, SDE.T)
    y0 = a_T * mu[None] + std_T[None] * jr.normal(k_y, (particles, dim))
    a_e, _ = SDE.marginal(T_END)
    std_e = _exact_std(c, T_END)
    target = a_e * mu[None] + (std_e / std_T)[None] * (y0 - a_T * mu[None])
    scale = jnp.sqrt(jnp.mean(a_e**2 * (mu**2 + c)))
    rows = []
    for name, (solver, evals) in _solvers(process).items():
        for n in steps_list:

            def sample(y0, ts, solver=solver):
                return gd.sample(
                    jr.key(0),
                    SDE,
                    data.score(SDE),
                    (dim,),
                    y0=y0,
                    ts=ts,
                    process=process,
                    solver=solver,
                ).ys

            ts = GRIDS[grid](n)
            timing, ys = C.try_timeit(jax.jit(sample), y0, ts, repeats=args.repeats)
            row = {"process": process, "solver": name, "grid": grid, "steps": n}
            row["nfe"] = n * evals
            row["timing"] = timing
            if ys is not None:
                if process == "ode":
                    rms = jnp.sqrt(jnp.mean((ys - target) ** 2))
                    row["error"] = float(rms / scale)
                else:
                    var = jnp.var(ys, axis=0)
                    row["error"] = float(jnp.abs(jnp.mean(var / std_e**2) - 1))
                    row["mc_se"] = float(jnp.sqrt(2.0 / (particles * dim)))
            rows.append(row)
            print(
                f"  {process} {name:<24} {grid:<8} N={n:<4} nfe={n * evals:<4} "
                f"error {row.get('error', float('nan')):.3e}  {C.describe(timing)}",
                flush=True,
            )
    return rows


def _key(row: dict) -> str:
    return f"{row['process']}/{row['solver']}/{row['grid']}"


def at_tolerance(rows: list[dict], tol: float) -> dict:
    """Per (process, solver, grid): the first row (fewest steps) with error <= tol."""
    best: dict = {}
    for r in sorted(rows, key=lambda r: r["steps"]):
        key = _key(r)
        if key in best or r.get("error") is None or r["error"] > tol:
            continue
        best[key] = {
            "steps": r["steps"],
            "nfe": r["nfe"],
            "run_s": r["timing"].get("run_s"),
            "error": r["error"],
        }
    return best


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--dim", type=C.positive_int, default=None, help="data dimension (64)"
    )
    p.add_argument(
        "--steps-list", type=C.positive_int, nargs="+", default=None,
        help="numbers of steps (--steps N: just N)",
    )  # fmt: skip
    p.add_argument("--tol", type=float, default=1e-2, help="for at_tolerance")
    p.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = C.parse(p, argv)
    C.header(NAME)
    if args.steps is not None and args.steps_list is not None:
        p.error("give --steps or --steps-list, not both")
    dim = args.dim if args.dim is not None else (4 if args.quick else 64)
    if args.particles is not None:
        particles = args.particles
    else:
        particles = 16 if args.quick else (65536 if C.on_accelerator() else 8192)
    steps_list = (
        args.steps_list
        or ([args.steps] if args.steps is not None else None)
        or (QUICK_STEPS if args.quick else STEPS)
    )
    print(f"Gaussian data, d = {dim}, {particles} particles, steps {steps_list}")
    rows = []
    for grid in args.grids:
        for process in ("ode", "sde"):
            rows += run(process, grid, dim, particles, steps_list, args)
    best = at_tolerance(rows, args.tol)
    names = dict.fromkeys(_key(r) for r in rows)
    print(f"fewest steps on the list with error <= {args.tol}:")
    C.print_table(
        [{"solver": k, **best.get(k, {})} for k in names],
        ["solver", "steps", "nfe", "run_s", "error"],
    )
    C.write_result(
        NAME,
        args,
        {
            "problem": (
                "Gaussian data N(mu, diag(c)), reverse VP SDE / PF-ODE from T = 1 to "
                "1e-3, log-SNR and uniform grids, particles started from the exact "
                "time-T marginal"
            ),
            "error_definition": {
                "ode": "RMS distance to the exact flow map / RMS data scale",
                "sde": "|mean over coordinates of sample variance / exact - 1|",
            },
            "dim": dim,
            "particles": particles,
            "steps_list": list(steps_list),
            "grids": list(args.grids),
            "tol": args.tol,
            "at_tolerance": best,
            "results": rows,
        },
    )
    return {"results": rows, "at_tolerance": best}


if __name__ == "__main__":
    main()
