r"""`reward-gmm` ([U]'s GMM, PAPER.md 6.3): reward guidance on a 2-D Gaussian
mixture.

The base law $p$ is a four-component mixture and the reward a Gaussian bump
$r(x) = \exp(-\|x - a\|^2 / (2 s^2))$, so the reweighted law $p^r \propto p\,r$ is
again a mixture (`GaussianMixture.tilt`) and every score is exact. The guided score
$s + w(s^r - s)$ (PAPER.md 2.3) is sampled for several $w$ with shared noise, with

- the exact scores of $p$ and $p^r$, and
- learned scores: a base MLP trained by denoising score matching on draws from $p$,
  and a reweighted MLP trained by reward-weighted DSM on the same kind of draws,
  warm-started from the base (PAPER.md 4.1: only $(x_0, r(x_0))$ pairs, no
  trajectories).

It reports $E[r(Y^w)]$ against $w$ (PAPER.md 2.4: it is at least $E_p[r]$ for
$w \ge 0$, rises with $w$ on this mixture, and equals
$E_{p^r}[r] = E_p[r^2]/E_p[r]$ at $w = 1$), and at $w = 1$ the energy distance of
each sampler's output to exact draws from $p^r$ (with the distance between two
independent exact sample sets as the Monte-Carlo noise floor) and a permutation
two-sample test.
"""

import math
from pathlib import Path

from .._oracle import GaussianBumpReward, GaussianMixture
from ._reward import run_reward_experiment


QUICK = dict(
    num_particles=2000,
    num_steps=200,
    hidden=(64, 64, 64),
    steps=2000,
    reward_steps=1500,
    batch_size=256,
    distance_points=1000,
    weights=[0.0, 0.5, 1.0, 2.0, 4.0],
)
FULL = dict(
    num_particles=20_000,
    num_steps=1000,
    hidden=(256, 256, 256),
    steps=20_000,
    reward_steps=10_000,
    batch_size=1024,
    distance_points=4000,
    weights=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
)
LIMS = ((-5.0, 5.0), (-5.0, 5.0))


def base_mixture() -> GaussianMixture:
    """Four modes on a square; the rewarded corner holds the lightest one."""
    return GaussianMixture(
        weights=[0.4, 0.25, 0.25, 0.1],
        means=[[-2.5, -2.5], [-2.5, 2.5], [2.5, -2.5], [2.5, 2.5]],
        covs=[
            [[0.6, 0.2], [0.2, 0.4]],
            [[0.5, 0.0], [0.0, 0.5]],
            [[0.4, -0.1], [-0.1, 0.6]],
            [[0.5, 0.0], [0.0, 0.5]],
        ],
    )


def bump_reward() -> GaussianBumpReward:
    return GaussianBumpReward(center=[2.0, 2.0], width=1.5)


def exact_reward_values(gmm: GaussianMixture, reward: GaussianBumpReward):
    """$E_p[r]$ and $E_{p^r}[r] = E_p[r^2]/E_p[r]$ ($r^2$ is a bump of width
    $s/\\sqrt2$)."""
    er = float(reward.expectation(gmm))
    er2 = float(
        GaussianBumpReward(reward.center, reward.width / math.sqrt(2)).expectation(gmm)
    )
    return er, er2 / er


def run(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the experiment, write `results.json` and figures into `out`."""
    cfgd = QUICK if quick else FULL
    gmm = base_mixture()
    reward = bump_reward()
    return run_reward_experiment(
        out,
        name="reward-gmm",
        quick=quick,
        seed=seed,
        cfg=cfgd,
        base=gmm,
        tilted=gmm.tilt(reward),
        reward=reward,
        train_data=gmm.sample,
        exact_values=exact_reward_values(gmm, reward),
        describe={
            "base": "2-D mixture of 4 Gaussians at (+-2.5, +-2.5), weights "
            "0.4/0.25/0.25/0.1 (the lightest at (2.5, 2.5))",
            "reward": "Gaussian bump r(x) = exp(-|x - a|^2 / (2 s^2)), a = (2, 2), s = 1.5",
        },
        lims=LIMS,
        show=(0.0, 1.0, float(cfgd["weights"][-1])),
        curve_title="reward guidance on a Gaussian mixture",
        cloud_title="samples (blue) over the reward (orange)",
    )
