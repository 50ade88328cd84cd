"""The README example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(capsys):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(2000, 2) 0" in out
    grad = float(out.strip().splitlines()[-1].split("Array(")[-1].split(",")[0])
    assert grad > 0.0  # the reward rises with the guidance weight
