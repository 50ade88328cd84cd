"""Shared plumbing of the `guidediff reproduce` experiments.

Output folders, `results.json`, figures, Monte-Carlo summaries with standard errors,
and sampling over a grid of guidance weights with shared noise (particle `i` uses
the same key for every weight, so samples are paired across weights and the score
pytree keeps one structure, so the sampler compiles once per score type).
"""

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._grid import uniform_grid
from .._metrics import _mean_stderr, energy_distance, two_sample_test
from .._sample import sample


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and check that a file can be written in it.

    Raises `OSError` (with the path in the message) if it cannot be created or
    written, before any computation starts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.json").is_dir():
        raise IsADirectoryError(f"{out / 'results.json'} is a folder")
    probe = out / ".guidediff-write-test"
    probe.write_text("ok")
    probe.unlink()
    return out


def source_commit() -> str | None:
    """The git commit of the code that ran: `$GUIDEDIFF_COMMIT` if set (for a copy
    of the tree without `.git`, e.g. on a remote machine), else `git rev-parse`
    of this checkout, with "-dirty" if tracked files differ from it; None when
    neither is available (an installed package)."""
    env = os.environ.get("GUIDEDIFF_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """The device, JAX version, float width and source commit a run used."""
    dev = jax.devices()[0]
    return {
        "commit": source_commit(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', str(dev))}",
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "x64": bool(jax.config.jax_enable_x64),
        "python": platform.python_version(),
    }


def to_jsonable(value: Any) -> Any:
    """Arrays and numpy scalars to lists and floats; NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, jax.Array | np.ndarray):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Write `results.json` in `out` and return its path."""
    path = out / "results.json"
    path.write_text(json.dumps(to_jsonable(results), indent=2))
    return path


class Stopwatch:
    """Wall-clock seconds since creation (`elapsed()`)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def log_grid(lo: float, hi: float, num: int, *, with_zero: bool = True) -> list[float]:
    """`num` log-spaced weights from `lo` to `hi`, preceded by 0."""
    ws = [float(w) for w in np.logspace(math.log10(lo), math.log10(hi), num)]
    return ([0.0] if with_zero else []) + ws


def stats(values) -> tuple[float, float]:
    """Mean and standard error (over the leading axis) as floats.

    Unchecked (the public `mean_stderr` rejects non-finite values): a reciprocal
    probability exp(-log p) of a valid tiny p can overflow to inf in float32, and
    the experiment reports that (as null in the JSON) rather than failing."""
    m, se = _mean_stderr(jnp.asarray(values))
    return float(m), float(se)


def sample_over_weights(
    key,
    sde,
    make_score: Callable[[Any], Any],
    weights: Sequence[float],
    shape: tuple[int, ...],
    *,
    num_particles: int,
    num_steps: int,
    t_end: float = 1e-3,
    args=None,
    max_failed: int = 0,
    failures: dict | None = None,
) -> dict[float, np.ndarray]:
    """Samples of `make_score(w)` for each `w`, with the same noise for every `w`
    (uniform grid of `num_steps` steps from `sde.T` to `t_end`).

    `w` enters the score as an array leaf, so the sampler compiles once.

    Failed particles (`Samples.failed`: a diverged, non-finite path) are dropped
    from every `w`, so the samples stay paired: row `i` is the same noise at every
    weight. More than `max_failed` of them (over all weights, default none) raise
    `FloatingPointError`. If `failures` is a dict it receives `num_failed` (per
    `w`) and `num_dropped` (particles dropped from every weight), for the record.
    """
    ts = uniform_grid(sde.T, t_end, num_steps)
    # every weight's run is enqueued before any result is read back, so the device
    # runs them back to back instead of waiting for the host between weights
    runs = [
        sample(
            key, sde, make_score(jnp.asarray(w, jnp.result_type(float))), shape,
            num_particles=num_particles, ts=ts, args=args,
        )
        for w in weights
    ]  # fmt: skip
    failed = {
        float(w): np.asarray(r.failed) for w, r in zip(weights, runs, strict=True)
    }
    out = {float(w): np.asarray(r.ys) for w, r in zip(weights, runs, strict=True)}
    bad = np.any(np.stack(list(failed.values())), axis=0)
    if int(bad.sum()) > max_failed:
        counts = {w: int(f.sum()) for w, f in failed.items() if f.any()}
        raise FloatingPointError(
            f"{int(bad.sum())} of {num_particles} particles failed (at w: {counts}); "
            f"at most {max_failed} allowed"
        )
    if failures is not None:
        failures["num_failed"] = [int(f.sum()) for f in failed.values()]
        failures["num_dropped"] = int(bad.sum())
    return {w: ys[~bad] for w, ys in out.items()}


def distance_to(samples, reference, max_points: int = 2000) -> float:
    """Unbiased energy distance between two sample sets (first `max_points` each)."""
    a = jnp.asarray(samples[:max_points])
    b = jnp.asarray(reference[:max_points]).astype(a.dtype)
    return float(energy_distance(a, b))


def two_sample_pvalue(samples, reference, key, max_points: int = 2000) -> float:
    """Energy-distance permutation test p-value of `samples` against `reference`."""
    a = jnp.asarray(samples[:max_points])
    b = jnp.asarray(reference[:max_points]).astype(a.dtype)
    return float(two_sample_test(a, b, key=key)[1])


def paired_steps(values: Sequence) -> dict[str, Any]:
    """Standard errors of the changes along a sweep whose points share their noise.

    `values[i]` holds one number per sample at sweep point `i` (the same samples'
    noise at every point), so neighbouring means are strongly correlated: the
    standard error of a difference is that of the per-sample differences, far below
    the two means' errors combined as if independent. Returns `step_stderr` (between
    consecutive points) and `total_stderr` (last minus first)."""
    v = [np.asarray(x, np.float64).ravel() for x in values]
    step = [stats(b - a)[1] for a, b in zip(v[:-1], v[1:], strict=True)]
    return {"step_stderr": step, "total_stderr": stats(v[-1] - v[0])[1]}


def below_reference(
    change_means: Sequence[float],
    change_ses: Sequence[float],
    *,
    k: float = 3.0,
) -> bool:
    """Corollary 1's form, R(w) <= R(0) for every w, on paired changes
    R(w) - R(0) of a shared-noise sweep whose first entry is w = 0: no change is
    above zero by more than `k` standard errors, and the last (the largest w) is
    below zero by more than `k`. (Non-finite values fail.)"""
    means, ses = list(change_means[1:]), list(change_ses[1:])
    if not means or not np.all(np.isfinite(np.asarray([*means, *ses], float))):
        return False
    if any(m > k * se for m, se in zip(means, ses, strict=True)):
        return False
    return bool(means[-1] < -k * ses[-1])


def monotone_within(
    means: Sequence[float],
    step_ses: Sequence[float],
    total_se: float,
    *,
    increasing: bool,
    k: float = 3.0,
) -> bool:
    """Whether the means of a shared-noise sweep move in the stated direction: the
    last differs from the first by more than `k` standard errors of that paired
    difference, and no consecutive pair moves the other way by more than `k`
    standard errors of its paired difference (`paired_steps`). (A flat curve is not
    increasing; nor is a curve with a non-finite mean or standard error, which no
    comparison below could reject.)"""
    values = [*means, *step_ses, total_se]
    if not np.all(np.isfinite(np.asarray(values, float))):
        return False
    sign = 1.0 if increasing else -1.0
    for a, b, se in zip(means[:-1], means[1:], step_ses, strict=True):
        if sign * (b - a) < -k * se:
            return False
    return bool(sign * (means[-1] - means[0]) > k * total_se)
