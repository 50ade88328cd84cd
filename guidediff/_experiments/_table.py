"""The results tables, generated from `results/*/results.json` (full runs).

`python -m guidediff._experiments._table [results]` prints the README's table (the
claims each run checked) and `results/README.md`'s table (a headline per
experiment); tests check that both files hold exactly these tables, so no number in
them is typed by hand.
"""

import json
import sys
from pathlib import Path


START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"
HEADLINE_START = "<!-- headline-table:start -->"
HEADLINE_END = "<!-- headline-table:end -->"
# What each experiment stands for (PAPER.md section 6; which figures the papers
# drew is not known, PAPER.md 8.4)
PAPER = {
    "cfg-gmm": "[P]'s GMM experiment (6.1)",
    "cfg-digits": "[P]'s ImageNet experiment (6.1; 8x8 digits here)",
    "reward-gmm": "[U]'s GMM (6.3)",
    "reward-pointset": "[U]'s Swiss roll (6.3)",
    "robustness": "[U]'s robustness to score errors (6.3)",
    "training-efficiency": "[U]'s training efficiency (6.3)",
}


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def results_table(results_dir: str | Path) -> str:
    """A Markdown table: one row per experiment, with its device, run time and the
    claims its run checked (`claims` in each results.json)."""
    rows = [
        "| experiment | device | jax | run time | claims checked by the run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, res in _runs(results_dir):
        claims = "; ".join(
            f"{k.replace('_', ' ')}: {_fmt(v)}"
            for k, v in res.get("claims", {}).items()
            if not isinstance(v, str)
        )
        device = str(res.get("device", "?")).replace("gpu:", "")
        rows.append(
            f"| `{name}` | {device} | {res.get('jax_version', '?')} | "
            f"{_seconds(res)} | {claims} |"
        )
    return "\n".join(rows)


def _runs(results_dir: str | Path):
    """`(name, results.json contents)` of each experiment folder, sorted by name."""
    for path in sorted(Path(results_dir).glob("*/results.json")):
        yield path.parent.name, json.loads(path.read_text())


def _seconds(res: dict) -> str:
    return f"{res.get('seconds', float('nan')):.0f} s"


def readme_block(results_dir: str | Path) -> str:
    return f"{START}\n{results_table(results_dir)}\n{END}"


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4g} ± {se:.2g}"


def _cfg_headline(res: dict) -> str:
    w, m, se = res["w"], res["reciprocal_prob_mean"], res["reciprocal_prob_stderr"]
    best = min(range(1, len(w)), key=lambda i: m[i])
    frac = [f for f in res["frac_improved"][1:] if f is not None]
    return (
        f"E[1/p(c\\|Y^w)] is {_pm(m[0], se[0])} at w = 0 (1/p(c) = "
        f"{res['theory_unguided']:.4g}), {_pm(m[best], se[best])} at its lowest "
        f"(w = {w[best]:.3g}) and {_pm(m[-1], se[-1])} at w = {w[-1]:.3g}; "
        f"{100 * min(frac):.0f}-{100 * max(frac):.0f} % of samples improve for w > 0"
    )


def _reward_headline(res: dict) -> str:
    w, mean, se = res["w"], res["reward_mean"], res["reward_stderr"]
    i1 = w.index(1.0)
    return (
        f"E[r] from {mean['exact'][0]:.3f} (w = 0; E_p[r] = "
        f"{res['exact_reward_unguided']:.3f}) to {mean['exact'][-1]:.3f} "
        f"(w = {w[-1]:g}) with exact scores, {mean['learned'][0]:.3f} to "
        f"{mean['learned'][-1]:.3f} learned; at w = 1 exact "
        f"{_pm(mean['exact'][i1], se['exact'][i1])}, learned "
        f"{_pm(mean['learned'][i1], se['learned'][i1])}, vs E_{{p^r}}[r] = "
        f"{res['exact_reward_tilted']:.4f}"
    )


def _robustness_headline(res: dict) -> str:
    c = res["claims"]

    def up_to(name: str) -> str:
        value = f"{c[f'{name}_gain_significant_up_to_relative_error']:.2f}"
        lost = c.get(f"{name}_gain_lost_within_tested_errors")
        # no tested size lost the gain: the value is the largest tested
        return f"at least {value} (the largest tested)" if lost is False else value

    return (
        "the paired gain E[r(Y^w) - r(Y^0)] stays significantly > 0 up to relative "
        f"score errors of {up_to('noise')} (random fields), {up_to('bias')} "
        f"(constant biases) and {up_to('undertrained')} (under-trained networks)"
    )


def _efficiency_headline(res: dict) -> str:
    parts = []
    floor = res.get("energy_distance_floor")  # files from before lack it
    for name, m in res["methods"].items():
        evals, secs = m.get("network_evals_to_90pct"), m.get("seconds_to_90pct")
        bracket = m.get("network_evals_to_90pct_bracket")
        if evals is None:
            reach = "never reaches 90 % of the gain"
        elif bracket is not None:  # the crossing lies between two evaluations
            lo, hi = bracket
            slo, shi = m["seconds_to_90pct_bracket"]
            reach = (
                f"90 % of the gain between {lo:.2g} and {hi:.2g} network evaluations "
                f"({slo:.2g}-{shi:.2g} s)"
            )
        else:
            reach = (
                f"90 % of the gain after {evals:.2g} network evaluations ({secs:.2g} s)"
            )
        d = m["final_energy_distance_to_tilted"]
        # the unbiased estimate of a distance near 0 can come out negative
        dist = f"{d:.2g}" if d >= 0 else f"estimate {d:.2g}, below 0 by noise"
        if floor is not None:
            dist += f"; two exact sample sets: {floor:.2g}"
        parts.append(
            f"{name}: {reach}, final E[r] = {m['final_reward']:.3f} (energy distance "
            f"to p^r {dist})"
        )
    return "; ".join(parts) + f"; E_{{p^r}}[r] = {res['exact_reward_tilted']:.3f}"


HEADLINES = {
    "cfg-gmm": _cfg_headline,
    "cfg-digits": _cfg_headline,
    "reward-gmm": _reward_headline,
    "reward-pointset": _reward_headline,
    "robustness": _robustness_headline,
    "training-efficiency": _efficiency_headline,
}


def headline_table(results_dir: str | Path) -> str:
    """A Markdown table: one row per experiment, with the paper's figure, the run
    time and a headline computed from its results.json."""
    rows = [
        "| NAME | paper | run time | headline |",
        "| --- | --- | --- | --- |",
    ]
    for name, res in _runs(results_dir):
        text = HEADLINES[name](res) if name in HEADLINES else ""
        rows.append(f"| `{name}` | {PAPER.get(name, '')} | {_seconds(res)} | {text} |")
    return "\n".join(rows)


def headline_block(results_dir: str | Path) -> str:
    return f"{HEADLINE_START}\n{headline_table(results_dir)}\n{HEADLINE_END}"


def main(argv=None) -> int:
    """`python -m guidediff._experiments._table [RESULTS_DIR]`: print the README's
    generated blocks from the experiments' results.json files."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument(
        "results", nargs="?", type=Path, default=Path("results"),
        help="folder with one subfolder per experiment (default: results)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"no such folder: {args.results}")
    if not any(args.results.glob("*/results.json")):
        p.error(f"no experiment results (*/results.json) in {args.results}")
    print(readme_block(args.results))
    print()
    print(headline_block(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
