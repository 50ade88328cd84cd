"""The cost of classifier-free guidance inside the sampler.

At the 64-D size with a class-conditional MLP (a label embedding with a null class,
added to the first hidden layer), all inside `jax.jit`, `gd.sample` scan driver:

- `plain`: conditional sampling, one network call per step on N particles;
- `plain_2n`: the same on 2N particles (one batched network call on 2N inputs, but
  also twice the noise and state updates);
- `network_2n`: N particles whose score is one batched network call on 2N distinct
  inputs (x and -x per particle): exactly "one batched network call" per step with
  the N-particle sampler's other costs, the denominator of the target;
- `cfg_batched`: `gd.cfg(w, null_args=null, batched=True)`: the conditional and the
  unconditional call batched into one network call;
- `cfg_two_calls`: `batched=False`: two network calls per step;
- `cfg_interval`: `gd.interval(cfg_batched, t_lo, t_hi)` on the middle half of the
  time interval (unguided, one call, elsewhere); `cfg_interval_quarter` on the
  middle quarter.

Target: cfg_batched <= 1.15 x network_2n (cfg_batched / plain_2n is reported too; it
flatters CFG, whose sampler moves N particles, not 2N). Batched CFG vmaps the network
over the label only, so the first layer's x W is computed once for both calls (5.6 %
of the 64-D network's FLOPs): part of its advantage, and counted as such.

What an interval can save: CFG costs 2 network evaluations per step, an unguided
step 1. Guidance on a fraction f of the steps therefore costs (1 + f) / 2 of full
CFG's network evaluations: it saves (1 - f) / 2, at most 25 % for f = 1/2 and 37.5 %
for f = 1/4. A 35 % saving needs f <= 0.3. The JSON reports the measured saving next
to this bound (`interval_savings`).

That saving is measured twice: as a share of the whole sampler's time
(`measured_time_saved`), and as a share of the network's time
(`measured_network_time_saved`, the criterion's words). A variant's network time is
its time minus the time of the same sampler and guidance with the network replaced by
a score without matmuls (`_no_network`: the same label lookup, an elementwise
output; the noise, the updates, the `vmap` over labels and the interval's `lax.cond`
stay), timed in the same interleaved rounds.

    PYTHONPATH=. python -m benchmarks.cfg_cost [--quick]
"""

import dataclasses

import jax
import jax.numpy as jnp
import jax.random as jr

import guidediff as gd

from . import _common as C, _problems as P


NAME = "cfg_cost"
TARGET_BATCHED_VS_2N = 1.15


class _TwoInputs(gd.AbstractGuidance):
    """The score of N particles through ONE network call on 2N distinct inputs
    (x and -x, vmapped together, so XLA cannot merge them): the cost of a batched
    call on 2N inputs inside an N-particle sampler."""

    def apply(self, score, t, x, args):
        both = jax.vmap(lambda y: score(t, y, args))(jnp.stack([x, -x]))
        return 0.5 * (both[0] - both[1])


class _NoNetworkScore(gd.AbstractScore):
    """The class-conditional MLP score's plumbing without its matmuls: the label's
    embedding row is read (the null class for `None`) and reduced to one number, so the
    score still depends on the label, and `-x` plus that number is returned."""

    mlp: P.MLP

    def __call__(self, t, x, args=None):
        emb = self.mlp.label_emb
        row = emb[emb.shape[0] - 1 if args is None else args]
        return -x + 0.01 * t * jnp.mean(row).astype(x.dtype)


NO_NETWORK = "_no_network"
TIMED_WITHOUT_NETWORK = ("cfg_batched", "cfg_interval", "cfg_interval_quarter")


def _network_time_saved(fwd: dict, name: str) -> float | None:
    """1 - (network time of `name`) / (network time of full batched CFG), where a
    variant's network time is its run time minus that of its `_no_network` twin.

    None where a variant failed, or where either network time is not above the
    spread (max - min over the repeats) of its two timings: noise that large makes
    the difference meaningless (e.g. at a smoke size)."""
    net = {}
    for v in (name, "cfg_batched"):
        a, b = fwd.get(v, {}), fwd.get(v + NO_NETWORK, {})
        if "run_s" not in a or "run_s" not in b:  # failed: the rest is still written
            return None
        spread = (a["run_max_s"] - a["run_min_s"]) + (b["run_max_s"] - b["run_min_s"])
        net[v] = a["run_s"] - b["run_s"]
        if net[v] <= spread:
            return None
    return 1 - net[name] / net["cfg_batched"]


def main(argv=None) -> dict:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="64d", choices=list(P.SIZES))
    p.add_argument("--weight", type=float, default=2.0)
    args = C.parse(p, argv)
    C.header(NAME)
    size = P.SIZES[args.size]
    n = P.particles_for(size, args)
    problem = P.make_problem(size, n, quick=args.quick, num_classes=P.NUM_CLASSES)
    steps = P.steps_for(args)
    ts = P.time_grid(steps)
    label = jnp.asarray(3, jnp.int32)
    null = P.NUM_CLASSES
    # Half of [T_END, T]: the middle half of the time range.
    span = P.SDE.T - P.T_END
    t_lo, t_hi = P.T_END + 0.25 * span, P.T_END + 0.75 * span
    q_lo, q_hi = P.T_END + 0.375 * span, P.T_END + 0.625 * span
    cfg = gd.cfg(args.weight, null_args=null, batched=True)
    guidances = {
        "cfg_batched": cfg,
        "cfg_interval": gd.interval(cfg, t_lo, t_hi),
        "cfg_interval_quarter": gd.interval(cfg, q_lo, q_hi),
    }
    no_net = dataclasses.replace(problem, score_of=_NoNetworkScore)
    variants = {
        "plain": P.gd_sampler(problem, args=label),
        "plain_2n": P.gd_sampler(problem, args=label, particles=2 * n),
        "network_2n": P.gd_sampler(problem, args=label, guidance=_TwoInputs()),
        "cfg_batched": P.gd_sampler(
            problem, args=label, guidance=guidances["cfg_batched"]
        ),
        "cfg_two_calls": P.gd_sampler(
            problem,
            args=label,
            guidance=gd.cfg(args.weight, null_args=null, batched=False),
        ),
        "cfg_interval": P.gd_sampler(
            problem, args=label, guidance=guidances["cfg_interval"]
        ),
        "cfg_interval_quarter": P.gd_sampler(
            problem, args=label, guidance=guidances["cfg_interval_quarter"]
        ),
        **{
            v + NO_NETWORK: P.gd_sampler(no_net, args=label, guidance=guidances[v])
            for v in TIMED_WITHOUT_NETWORK
        },
    }
    print(f"-- {size.name}: {n} particles, {steps} steps, width {problem.width}")
    fwd, out = C.time_all(
        {k: jax.jit(v) for k, v in variants.items()},
        problem.params,
        jr.key(0),
        ts,
        repeats=args.repeats,
    )

    def frac_in(lo, hi):
        return float(jnp.mean((ts[:-1] >= lo) & (ts[:-1] <= hi)))

    frac_active = frac_in(t_lo, t_hi)
    savings = {}
    for name, (lo, hi) in {
        "cfg_interval": (t_lo, t_hi),
        "cfg_interval_quarter": (q_lo, q_hi),
    }.items():
        f = frac_in(lo, hi)
        r = C.ratio(fwd[name], fwd["cfg_batched"])
        savings[name] = {
            "interval": [lo, hi],
            "fraction_of_steps": f,
            "network_evals_saved_bound": (1 - f) / 2,
            "measured_time_saved": None if r is None else 1 - r,
            "measured_network_time_saved": _network_time_saved(fwd, name),
        }
    ratios = {
        "cfg_batched_over_network_2n": C.ratio(fwd["cfg_batched"], fwd["network_2n"]),
        "cfg_batched_over_plain_2n": C.ratio(fwd["cfg_batched"], fwd["plain_2n"]),
        "cfg_batched_over_plain": C.ratio(fwd["cfg_batched"], fwd["plain"]),
        "cfg_two_calls_over_plain": C.ratio(fwd["cfg_two_calls"], fwd["plain"]),
        "cfg_two_calls_over_cfg_batched": C.ratio(
            fwd["cfg_two_calls"], fwd["cfg_batched"]
        ),
        "cfg_interval_over_cfg_batched": C.ratio(
            fwd["cfg_interval"], fwd["cfg_batched"]
        ),
        "cfg_interval_over_plain": C.ratio(fwd["cfg_interval"], fwd["plain"]),
        "cfg_interval_quarter_over_cfg_batched": C.ratio(
            fwd["cfg_interval_quarter"], fwd["cfg_batched"]
        ),
        "plain_2n_over_plain": C.ratio(fwd["plain_2n"], fwd["plain"]),
    }
    # If the interval's lax.cond really skips the unconditional call outside the
    # interval, its cost is about this fraction of cfg_batched's.
    # (None when a variant failed: the other figures are still written)
    over_plain = ratios["cfg_batched_over_plain"]
    expected_interval = (
        None if over_plain is None else frac_active + (1 - frac_active) * over_plain**-1
    )
    C.print_table(
        [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"]
    )
    C.write_result(
        NAME,
        args,
        {
            **P.run_fields(size, n, steps, problem.width),
            "network": (
                f"class-conditional MLP {size.depth}x{problem.width} SiLU, "
                f"{P.NUM_CLASSES} classes + null; label embedding added to the "
                "first hidden layer"
            ),
            "flops_per_eval": problem.flops_per_eval,
            "guidance_weight": args.weight,
            "interval": [t_lo, t_hi],
            "fraction_of_steps_in_interval": frac_active,
            "forward": fwd,
            "ratios": ratios,
            "target_cfg_batched_over_network_2n": TARGET_BATCHED_VS_2N,
            "meets_target": ratios["cfg_batched_over_network_2n"] is not None
            and ratios["cfg_batched_over_network_2n"] <= TARGET_BATCHED_VS_2N,
            "cfg_interval_over_cfg_batched_if_skipped": expected_interval,
            "interval_savings": savings,
            "max_abs_diff_cfg_batched_vs_two_calls": P.max_abs_diff(
                out["cfg_batched"], out["cfg_two_calls"]
            ),
        },
    )
    return {"ratios": ratios}


if __name__ == "__main__":
    main()
