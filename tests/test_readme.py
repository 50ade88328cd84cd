"""The README example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    namespace = {}  # blocks run in order in one namespace, as a reader would
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "(2000, 2) 0" in out
    grad_line = [line for line in out.splitlines() if "Array(" in line][-1]
    grad = float(grad_line.split("Array(")[-1].split(",")[0])
    assert grad > 0.0  # the reward rises with the guidance weight
    rows = {
        line[:10].strip(): [float(v) for v in line[10:].split()]
        for line in out.splitlines()
        if line.startswith(("tuned", "w = "))
    }
    tuned = rows.pop("tuned w(t)")
    cheaper = [r for r in rows.values() if r[1] <= tuned[1]]
    assert cheaper, "no constant w with a penalty below the tuned schedule's"
    # at no larger penalty, the tuned schedule reaches a higher reward
    assert all(tuned[0] > r[0] for r in cheaper), (tuned, rows)
