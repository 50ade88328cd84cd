"""Every ```python example in the library's docstrings runs as written.

The examples are found with `ast`: every module, class and function docstring of
every module in `guidediff/` (cleaned as `inspect.cleandoc` does), each fenced
```python block in it, dedented. An example is named `module:qualname:index`.

The examples run in ONE clean subprocess (importing jax and compiling costs seconds,
and `conftest.py`'s float64 and strict rank promotion are not what a reader has),
on the CPU, in a temporary working directory (examples may write files such as
`out/tune.json`). Each runs in a fresh namespace holding only the imports every
example may assume:

    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    import optax
    import guidediff as gd

everything else an example uses, it defines itself. A failure in one example does
not stop the others; the test reports every failing example with its traceback.
"""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "guidediff"

# An opening ```python fence and the closing ``` at the same indentation.
FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.S | re.M)

PREAMBLE = """\
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import guidediff as gd
"""

# Examples deliberately not run: name -> reason. Keep it empty unless an example
# cannot be made to run cheaply.
SKIP: dict[str, str] = {}

RUNNER = """\
import json, sys, time, traceback

examples, preamble, report = json.loads(sys.stdin.read())
base = {"__name__": "__docstring_example__"}
exec(compile(preamble, "<preamble>", "exec"), base)
results = []
for name, code in examples:
    namespace = dict(base)
    start = time.perf_counter()
    try:
        exec(compile(code, name, "exec"), namespace)
    except BaseException:
        error = traceback.format_exc()
    else:
        error = None
    results.append({"name": name, "error": error,
                    "seconds": time.perf_counter() - start})
with open(report, "w") as f:
    json.dump(results, f)
"""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


DEFINITIONS = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _docstrings(node: ast.AST, qualname: str = "<module>"):
    """`(qualname, docstring)` of the module `node` and of every class and function
    anywhere inside it (nested in classes, functions, `if` blocks, ...)."""
    if isinstance(node, ast.Module | DEFINITIONS):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, DEFINITIONS):
            inner = child.name if qualname == "<module>" else f"{qualname}.{child.name}"
            yield from _docstrings(child, inner)
        else:
            yield from _docstrings(child, qualname)


def _all_docstrings():
    """`(module, qualname, docstring)` over every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for qualname, doc in _docstrings(tree):
            yield _module_name(path), qualname, doc


def docstring_examples() -> list[tuple[str, str]]:
    """`(module:qualname:index, code)` for every ```python block in a docstring."""
    examples = []
    for module, qualname, doc in _all_docstrings():
        for i, (_, code) in enumerate(FENCE.findall(doc)):
            examples.append((f"{module}:{qualname}:{i}", textwrap.dedent(code)))
    return examples


def test_extraction_finds_the_examples():
    examples = docstring_examples()
    names = [name for name, _ in examples]
    assert len(names) == len(set(names))
    assert len(examples) >= 20, names
    assert "guidediff._sample:sample:0" in names  # an indented `!!! example` block
    assert "guidediff._losses:<module>:0" in names  # a module docstring's block
    assert set(SKIP) <= set(names), set(SKIP) - set(names)  # no stale skips
    # every opening fence was matched (none unclosed or closed at another indent)
    for module, qualname, doc in _all_docstrings():
        opened = sum(line.strip() == "```python" for line in doc.splitlines())
        assert len(FENCE.findall(doc)) == opened, f"{module}:{qualname}"


def test_docstring_examples_run(tmp_path):
    examples = [(n, c) for n, c in docstring_examples() if n not in SKIP]
    assert len(examples) >= 20
    report = tmp_path / "report.json"
    work = tmp_path / "work"
    work.mkdir()
    # no JAX_* settings leak in from the caller (e.g. JAX_ENABLE_X64)
    env = dict(
        {k: v for k, v in os.environ.items() if not k.startswith("JAX_")},
        JAX_PLATFORMS="cpu",
        MPLBACKEND="Agg",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    )
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps([examples, PREAMBLE, str(report)]),
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0 and report.exists(), proc.stdout + proc.stderr
    results = json.loads(report.read_text())
    assert [r["name"] for r in results] == [n for n, _ in examples]
    failed = [r for r in results if r["error"] is not None]
    assert not failed, "\n".join(
        f"--- {r['name']} failed:\n{r['error']}" for r in failed
    )
