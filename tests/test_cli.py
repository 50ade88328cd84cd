"""The command line: `guidediff demo` runs and writes its outputs; bad input fails."""

import json
import os
import subprocess
import sys

from helpers import guided_reciprocal_prob_se

from guidediff._cli import main
from guidediff._demo import demo_mixture


def test_demo_small(tmp_path):
    n = 2000
    assert (
        main(["demo", "--out", str(tmp_path), "--particles", str(n), "--steps", "50"])
        == 0
    )

    def no_nan(name):
        raise AssertionError(f"results.json is not strict JSON: {name}")

    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=no_nan)
    assert (tmp_path / "demo_cfg.png").stat().st_size > 10000
    theory = res["theory_unguided"]
    rows = {r["w"]: r for r in res["rows"]}
    assert rows[0.0]["frac_improved"] is None  # nothing improves on itself
    # 1/p is heavy-tailed: its sample standard error is not trusted (see
    # guided_reciprocal_prob_se, which bounds it by the unguided second moment).
    se_w = guided_reciprocal_prob_se(demo_mixture(), res["label"], n)
    for w in [1.0, 2.0, 4.0]:
        r = rows[w]
        se = max(r["reciprocal_prob_stderr"], se_w)
        assert r["reciprocal_prob_mean"] + 4 * se < theory
        # most samples improve, but not every one: both beyond 4 standard errors
        f, f_se = r["frac_improved"], r["frac_improved_stderr"]
        assert 0.5 < f - 4 * f_se and f + 4 * f_se < 1.0
        # the change from w = 0 is judged by no less than the unguided mean's exact
        # standard error (its heavy tail makes the paired sample's understate)
        assert r["reciprocal_prob_change_stderr"] >= res["theory_unguided_stderr"]
    # the printed findings are decided from these numbers (at 2,000 particles the
    # change at w = 0.5 is under 4 standard errors: the finding says so)
    lowered = all(
        -r["reciprocal_prob_change_mean"] > 4 * r["reciprocal_prob_change_stderr"]
        for r in res["rows"][1:]
    )
    assert res["findings"] == {
        "unguided_matches_theory": True,
        "lowered_at_every_w": lowered,
        "not_every_sample_improves": True,
        "most_samples_improve": True,
    }


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidediff",
            "demo",
            "--out",
            str(blocker / "sub"),
            "--particles",
            "10",
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0
    assert "cannot write" in proc.stderr


def test_bench_passes_flags_to_run_all(capsys):
    # --help of run_all proves the subcommand finds and runs the benchmarks
    assert main(["bench", "--help"]) == 0


def test_bad_numbers_are_argparse_errors(capsys):
    """Bad counts and seeds exit with status 2 and a one-line message, no traceback."""
    import pytest

    for argv in (
        ["demo", "--particles", "0"],
        ["demo", "--particles", "1"],  # the standard errors need two
        ["demo", "--steps", "-3"],
        ["demo", "--steps", "x"],
        ["reproduce", "cfg-gmm", "--seed", "-1"],
        ["reproduce", "cfg-gmm", "--seed", str(2**32)],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "must be an integer" in err or "not an integer" in err, err


def test_reproduce_checks_results_json_is_writable_first(tmp_path, capsys):
    """A folder named results.json made reproduce fail with a traceback after the
    whole computation."""
    (tmp_path / "results.json").mkdir()
    assert main(["reproduce", "cfg-gmm", "--quick", "--out", str(tmp_path)]) == 2
    assert "cannot write" in capsys.readouterr().err
