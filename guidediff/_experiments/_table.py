"""The README's results table, generated from `results/*/results.json` (full runs).

`python -m guidediff._experiments._table [results]` prints it; a test checks that the
README holds exactly this table, so no number in it is typed by hand.
"""

import json
import sys
from pathlib import Path


START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"


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
    for path in sorted(Path(results_dir).glob("*/results.json")):
        res = json.loads(path.read_text())
        claims = "; ".join(
            f"{k.replace('_', ' ')}: {_fmt(v)}"
            for k, v in res.get("claims", {}).items()
            if not isinstance(v, str)
        )
        device = str(res.get("device", "?")).replace("gpu:", "")
        rows.append(
            f"| `{path.parent.name}` | {device} | {res.get('jax_version', '?')} | "
            f"{res.get('seconds', float('nan')):.0f} s | {claims} |"
        )
    return "\n".join(rows)


def readme_block(results_dir: str | Path) -> str:
    return f"{START}\n{results_table(results_dir)}\n{END}"


if __name__ == "__main__":
    print(readme_block(sys.argv[1] if len(sys.argv) > 1 else "results"))
