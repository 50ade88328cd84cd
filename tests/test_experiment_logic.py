"""The experiments' claims, reference values and command-line flags, on made-up
inputs with known answers (sampling and training replaced by stubs). The end-to-end
runs (test_reproduce.py) only see all claims hold on one run: a claim loosened to
always hold, a reference computed under the wrong law, or a flag that is ignored
passes them. Each test here failed on such a planted defect."""

import pathlib

import jax
import jax.random as jr
import numpy as np
import pytest

import guidediff._experiments.cfg_gmm as cfg_gmm
import guidediff._experiments.reward_gmm as reward_gmm
import guidediff._experiments.reward_pointset as reward_pointset
import guidediff._experiments.robustness as robustness
import guidediff._experiments.training_efficiency as training_efficiency
from guidediff._experiments._common import below_reference
from guidediff._sde import VPSDE


def test_below_reference():
    # every change at or below zero, the last one significantly so
    assert below_reference([0.0, -0.1, -0.5], [0.0, 0.01, 0.01])
    assert not below_reference([0.0, 0.0, 0.0], [0.0, 0.1, 0.1])  # no change
    assert not below_reference([0.0, 0.5, -0.5], [0.0, 0.01, 0.01])  # one rose
    assert not below_reference(
        [0.0, -0.1, -0.01], [0.0, 0.01, 0.01]
    )  # last within 3 SE


def _cfg_summary(m0_off=0.0, frac=0.8, changes=(0.0, -0.1, -0.3, -0.5)):
    """A cfg_sweep summary: theory 3.0 with SE 0.02; the paired changes have SE 0.01
    (the unpaired SEs, 0.2, would not resolve them)."""
    return {
        "w": [0.0, 0.1, 1.0, 10.0],
        "reciprocal_prob_mean": [3.0 + m0_off, 2.9, 2.7, 2.5],
        "reciprocal_prob_stderr": [0.2] * 4,
        "reciprocal_prob_step_stderr": [0.01] * 3,
        "reciprocal_prob_total_stderr": 0.01,
        "reciprocal_prob_change_mean": list(changes),
        "reciprocal_prob_change_stderr": [0.0, 0.01, 0.01, 0.01],
        "frac_improved": [None, frac, frac, frac],
        "frac_improved_stderr": [None, 0.01, 0.01, 0.01],
        "theory_unguided": 3.0,
        "theory_unguided_stderr": 0.02,
    }


def _cfg_claims(monkeypatch, tmp_path, summary):
    reference = dict(summary, frac_improved=[None, 1.0, 1.0, 1.0])
    calls = iter([(summary, {}, {}), (reference, {}, {})])
    monkeypatch.setattr(cfg_gmm, "cfg_sweep", lambda *a, **k: next(calls))
    monkeypatch.setattr(cfg_gmm, "_plot_curves", lambda *a, **k: None)
    monkeypatch.setattr(cfg_gmm, "_plot_samples", lambda *a, **k: None)
    return cfg_gmm.run(tmp_path, quick=True)["claims"]


def test_cfg_gmm_claims(monkeypatch, tmp_path):
    """All hold on the made-up sweep (the changes are significant only with their
    paired SEs); each altered sweep breaks exactly its own claim."""
    good = _cfg_claims(monkeypatch, tmp_path, _cfg_summary())
    assert all(good.values()), good
    for summary, broken in (
        (_cfg_summary(m0_off=0.2), "unguided_reciprocal_prob_matches_theory"),  # 10 SE
        (_cfg_summary(frac=0.99), "frac_improved_strictly_between_0_and_1"),  # 1 SE
        (_cfg_summary(changes=(0.0,) * 4), "reciprocal_prob_below_unguided_for_w_gt_0"),
    ):
        claims = _cfg_claims(monkeypatch, tmp_path, summary)
        assert [k for k, v in claims.items() if not v] == [broken], claims


@pytest.fixture(scope="module")
def gmm_and_reward():
    return reward_gmm.base_mixture(), reward_gmm.bump_reward()


def _mc_mean(law, reward, n=100_000):
    v = np.asarray(jax.vmap(reward)(law.sample(jr.key(5), n)), np.float64)
    return v.mean(), v.std() / np.sqrt(n)


def test_exact_reward_values_against_monte_carlo(gmm_and_reward, monkeypatch):
    """E_p[r] and E_{p^r}[r], the references of the reward experiments, against
    draws of p and of the exact tilt (4 standard errors)."""
    gmm, r = gmm_and_reward
    exact = reward_gmm.exact_reward_values(gmm, r)
    for value, law in zip(exact, (gmm, gmm.tilt(r)), strict=True):
        m, se = _mc_mean(law, r)
        assert abs(value - m) < 4 * se, (value, m, se)
    seen = {}
    monkeypatch.setattr(reward_pointset, "run_reward_experiment",
                        lambda out, **kw: seen.update(kw))  # fmt: skip
    monkeypatch.setattr(reward_pointset, "QUICK",
                        dict(reward_pointset.QUICK, num_points=500))  # fmt: skip
    reward_pointset.run(None, quick=True)
    # a point cloud's are sums over its points: sum w r and sum w r^2 / sum w r
    cloud = seen["base"]
    w = np.exp(np.asarray(cloud.log_weights, np.float64))
    r = np.asarray(jax.vmap(seen["reward"])(cloud.points), np.float64)
    want = (np.sum(w * r) / np.sum(w), np.sum(w * r**2) / np.sum(w * r))
    np.testing.assert_allclose(seen["exact_values"], want, rtol=1e-9)


def test_relative_error_is_relative_to_the_exact_score(gmm_and_reward):
    gmm, _ = gmm_and_reward
    sde = VPSDE()
    s = gmm.score(sde)
    err = robustness.relative_error(jr.key(0), sde, gmm, lambda t, x, a: 2 * s(t, x, a),
                                    s, num=500)  # fmt: skip
    np.testing.assert_allclose(err, 1.0, rtol=1e-12)


def test_robust_up_to_stops_at_the_first_failure():
    rows = [
        dict(relative_error_base=e, relative_error_reward=e, gain_significant=[g])
        for e, g in ((0.0, True), (0.1, True), (0.2, False), (0.4, True))
    ]
    assert robustness._robust_up_to(rows) == 0.1


def test_training_efficiency_claims():
    ep, _ = training_efficiency.exact_reward_values(
        training_efficiency.base_mixture(), training_efficiency.bump_reward()
    )

    def method(final, se, evals):
        return {"final_reward": final, "final_reward_stderr": se,
                "network_evals_to_90pct": evals}  # fmt: skip

    claims = training_efficiency._claims(
        {"reweighted DSM, warm start": method(ep + 0.01, 0.01, 100),  # 1 SE: no
         "DRaFT": method(ep + 0.1, 0.01, 200)},  # 10 SE: yes
        ep, 0.0,
    )  # fmt: skip
    assert claims == {
        "reweighted_DSM_warm_start_improves_reward": False,
        "DRaFT_improves_reward": True,
        "warm_start_reaches_90pct_with_fewer_network_evals_than_draft": True,
    }


def test_cli_passes_its_flags_on(monkeypatch, tmp_path):
    import guidediff._cli as cli
    import guidediff._demo as demo
    import guidediff._experiments as experiments

    seen = {}

    def fake(out, *, quick, seed):
        seen.update(quick=quick, seed=seed)
        return {"seconds": 0.0, "claims": {}}

    monkeypatch.setitem(experiments.EXPERIMENTS, "fake", fake)
    cli.main(["reproduce", "fake", "--seed", "7", "--out", str(tmp_path / "a")])
    assert seen == {"quick": False, "seed": 7}
    cli.main(["reproduce", "fake", "--quick", "--out", str(tmp_path / "b")])
    assert seen["quick"] is True
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.update(demo=kw))
    cli.main(["demo", "--out", str(pathlib.Path(tmp_path) / "c"), "--particles", "10",
              "--steps", "5"])  # fmt: skip
    assert seen["demo"]["num_particles"] == 10 and seen["demo"]["num_steps"] == 5
