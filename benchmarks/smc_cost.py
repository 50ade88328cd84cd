"""The cost of sequential Monte Carlo (`gd.smc_sample`) next to plain sampling.

At the 64-D size with the benchmarks' MLP score, all inside `jax.jit`, Euler steps on
the same grid, a Gaussian-bump log-potential (no matmuls):

- `sample`: `gd.sample` (the baseline);
- `smc`: `gd.smc_sample` with the default twist and resampling below ESS = P/2;
- `smc_every_step`: resampling at every step (`ess_threshold=1`): the cost of the
  population operations (ESS, cumulative sums, gathers);
- `smc_proposal`: particles moved by a guided score (the MLP plus a constant drift
  towards the bump), weights corrected by the transition-density ratio: one more
  score evaluation per step.

The twist reuses the score value the step needs, so `smc` asks for exactly the
matmul FLOPs of `sample` (counted from the jaxprs and reported, `matmul_flops`);
the time ratios show what the reweighting and resampling add on this device.

    PYTHONPATH=. python -m benchmarks.smc_cost [--quick]
"""

import jax
import jax.numpy as jnp
import jax.random as jr

import guidediff as gd

from . import _common as C, _flops as F, _problems as P


NAME = "smc_cost"


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="64d", choices=list(P.SIZES))
    args = C.parse(p, argv)
    C.header(NAME)
    size = P.SIZES[args.size]
    n = P.particles_for(size, args)
    problem = P.make_problem(size, n, quick=args.quick)
    steps = P.steps_for(args)
    ts = P.time_grid(steps)
    center = jnp.full((problem.dim,), 0.5)

    def log_potential(x):
        return -0.5 * jnp.sum((x - center) ** 2)

    def towards_bump(value, t, x, args):
        return value + (center - x)  # a guided proposal: a drift to the bump

    def smc(**kw):
        def run(params, key, ts):
            score = problem.score_of(params)
            if kw.get("proposal"):
                kw_ = {**kw, "proposal": gd.guide(score, gd.stateless(towards_bump))}
            else:
                kw_ = kw
            out = gd.smc_sample(
                key,
                P.SDE,
                score,
                (problem.dim,),
                log_potential,
                num_particles=n,
                ts=ts,
                solver=P.dfx.Euler(),  # the solver of gd_sampler
                **kw_,
            )
            return out.ys, out.log_weights

        return run

    variants = {
        "sample": P.gd_sampler(problem),
        "smc": smc(),
        "smc_every_step": smc(ess_threshold=1.0),
        "smc_proposal": smc(proposal=True),
    }
    print(f"-- {size.name}: {n} particles, {steps} steps, width {problem.width}")
    with jax.numpy_rank_promotion("allow"):
        fwd, _ = C.time_all(
            {k: jax.jit(v) for k, v in variants.items()},
            problem.params,
            jr.key(0),
            ts,
            repeats=args.repeats,
        )
        flops = {
            k: F.matmul_flops(variants[k], problem.params, jr.key(0), ts)
            for k in ("sample", "smc", "smc_proposal")
        }
    ratios = {
        f"{k}_over_sample": C.ratio(fwd[k], fwd["sample"])
        for k in ("smc", "smc_every_step", "smc_proposal")
    }
    C.print_table(
        [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"]
    )
    C.write_result(
        NAME,
        args,
        {
            **P.run_fields(size, n, steps, problem.width),
            "network": f"MLP {size.depth}x{problem.width}",
            "solver": "diffrax.Euler (one score evaluation per step)",
            "forward": fwd,
            "ratios": ratios,
            "matmul_flops": flops,
            "smc_flops_equal_sample": flops["smc"]["flops"] == flops["sample"]["flops"],
        },
    )
    return {"ratios": ratios}


if __name__ == "__main__":
    main()
