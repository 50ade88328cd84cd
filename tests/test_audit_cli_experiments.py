"""Regressions from an audit of the command line, the demo and the experiments'
claims: each test failed before its fix."""

import math

import pytest

import guidediff as gd
from guidediff._experiments._common import monotone_within
from guidediff._experiments.training_efficiency import _reach_bracket


def test_monotone_claims_fail_on_non_finite_values():
    # an overflowed 1/p makes the mean inf and its steps' errors NaN: x < -k * nan
    # is False, so no step could ever be rejected
    means, steps = [2.95, math.inf, 1.95], [math.nan, math.nan]
    assert not monotone_within(means, steps, 0.1, increasing=False)
    assert not monotone_within([-m for m in means], steps, 0.1, increasing=True)
    assert monotone_within([2.95, 2.5, 1.95], [0.1, 0.1], 0.1, increasing=False)


def test_reach_bracket_never_steps_over_a_failed_evaluation():
    """The crossing is bracketed by the evaluations around it, read from the raw
    curve (a centred running mean looked one evaluation ahead before); a failed
    (NaN) evaluation neither reaches the target nor bounds the crossing."""
    curve = {"step": [0, 1, 2, 3, 4], "reward": [0.0, math.nan, 0.7, 0.7, 0.7]}
    assert _reach_bracket(curve, "step", 0.6) == (0.0, 2.0)  # widened over the NaN
    curve["reward"] = [0.0, 0.2, 0.4, 0.7, 0.5]
    assert _reach_bracket(curve, "step", 0.6) == (2.0, 3.0)
    curve["reward"] = [0.0, 0.2, 0.65, 0.5, 0.5]  # one point above: it counts
    assert _reach_bracket(curve, "step", 0.6) == (1.0, 2.0)
    curve["reward"] = [0.7, 0.2, 0.65, 0.5, 0.5]  # at the start already
    assert _reach_bracket(curve, "step", 0.6) == (0.0, 0.0)
    curve["reward"] = [0.0, math.nan, 0.5, 0.5, 0.5]
    assert _reach_bracket(curve, "step", 0.6) is None


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_swiss_roll_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match="scale must be finite and positive"):
        gd.swiss_roll(0, 10, scale=scale)


def test_demo_checks_its_output_folder_before_computing(monkeypatch):
    """An existing folder that cannot be written (/proc, also for root) failed only
    at the end, after the whole sweep."""
    import os

    import guidediff._demo as demo

    if not os.path.isdir("/proc"):
        pytest.skip("needs an existing unwritable folder")

    def computed(*a, **k):
        raise AssertionError("the demo computed before checking --out")

    monkeypatch.setattr(demo, "sample", computed)
    with pytest.raises(OSError):
        demo.run_demo("/proc", num_particles=8, num_steps=4)
