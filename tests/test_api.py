"""The public surface: names resolve, and the sampling core never imports flax."""

import subprocess
import sys

import guidediff as gd


DESIGN_NAMES = [
    "VPSDE",
    "VESDE",
    "Gaussian",
    "GaussianMixture",
    "PointCloud",
    "cfg",
    "classifier_guidance",
    "reward_guidance",
    "gradient_guidance",
    "interval",
    "chain",
    "guide",
    "sample",
    "fit",
    "dsm_loss",
    "reward_weighted_dsm_loss",
    "flax_score",
    "MLPScoreNet",
    "UNet",
    "CNNClassifier",
    "reciprocal_prob",
    "frac_improved",
    "reward_stats",
    "mmd2",
    "energy_distance",
    "sliced_wasserstein",
]


def test_public_names_resolve():
    for name in DESIGN_NAMES + sorted(gd._LAZY):
        assert getattr(gd, name) is not None, name
    assert set(gd._LAZY) <= set(dir(gd))
    # __all__ lists them all, the lazily loaded ones too (`from guidediff import *`
    # gave no Flax network, `fit` or `tune_guidance`), and nothing private
    assert set(DESIGN_NAMES) | set(gd._LAZY) <= set(gd.__all__)
    assert not [name for name in gd.__all__ if name.startswith("_")]
    namespace = {}
    exec("from guidediff import *", namespace)
    assert set(gd.__all__) <= set(namespace)


def test_core_import_does_not_load_flax():
    """Neither importing guidediff nor using its core (scores, their argument checks,
    which recognise Flax networks by name) loads flax or orbax."""
    code = """if True:
        import sys, guidediff as gd
        sde = gd.VPSDE()
        gd.ScoreFn(lambda t, x, a: -x)
        gd.X0Score(lambda t, x, a: x, sde)
        gd.EpsScore(lambda t, x, a: x, sde)
        try:
            gd.guide(lambda t, x, a: -x)
        except TypeError:
            pass
        print('flax' in sys.modules, 'orbax' in sys.modules)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_version_matches_pyproject():
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "([^"]+)"', text, re.M)
    assert gd.__version__ == version
    changelog = (Path(__file__).parent.parent / "CHANGELOG.md").read_text()
    assert f"## {version}" in changelog
