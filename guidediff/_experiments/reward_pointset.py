r"""`reward-pointset` ([U]'s Swiss roll, PAPER.md 6.3): reward guidance on a Swiss
roll.

The target $p$ is the uniform law over a Swiss-roll-shaped point set (the $(x, z)$
coordinates of `sklearn.datasets.make_swiss_roll`, rescaled to unit scale,
`guidediff._data.swiss_roll`), a `PointCloud` whose time-$t$ scores are exact; the
reward is a Gaussian bump on the outer arm, and the reweighted law $p^r$ is the
point cloud with weights $\propto r(p_i)$ (`PointCloud.tilt`), so its scores are
exact too. As in `reward-gmm`, the guided score $s + w(s^r - s)$ is sampled for
several $w$ with shared noise, with exact scores and with MLPs trained on the
points by DSM and reward-weighted DSM (warm-started), and the run reports $E[r]$
against $w$, the exact $E_p[r]$ and $E_{p^r}[r] = \sum_i r_i^2/\sum_i r_i$, and the
energy distance at $w = 1$ to exact draws from $p^r$.
"""

from pathlib import Path

import jax
import numpy as np

from .._data import swiss_roll
from .._oracle import GaussianBumpReward, PointCloud
from ._common import Stopwatch
from ._reward import run_reward_experiment


QUICK = dict(
    num_points=1000,
    num_particles=2000,
    num_steps=200,
    hidden=(128, 128, 128),
    steps=3000,
    reward_steps=1500,
    batch_size=256,
    distance_points=1000,
    weights=[0.0, 0.5, 1.0, 2.0, 4.0],
)
FULL = dict(
    num_points=4000,
    num_particles=20_000,
    num_steps=1000,
    hidden=(256, 256, 256),
    steps=30_000,
    reward_steps=10_000,
    batch_size=1024,
    distance_points=4000,
    weights=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
)
LIMS = ((-2.0, 2.4), (-2.0, 2.4))


def bump_reward() -> GaussianBumpReward:
    """A bump on the right of the outer arm."""
    return GaussianBumpReward(center=[1.6, 0.8], width=0.5)


def run(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the experiment, write `results.json` and figures into `out`."""
    clock = Stopwatch()
    cfgd = QUICK if quick else FULL
    points = swiss_roll(seed, cfgd["num_points"])
    cloud = PointCloud(points)
    reward = bump_reward()
    r_pts = np.asarray(jax.vmap(reward)(points), np.float64)
    return run_reward_experiment(
        out,
        name="reward-pointset",
        quick=quick,
        seed=seed,
        cfg=cfgd,
        base=cloud,
        tilted=cloud.tilt(reward),
        reward=reward,
        train_data=points,
        exact_values=(
            float(np.mean(r_pts)),
            float(np.sum(r_pts**2) / np.sum(r_pts)),
        ),
        describe={
            "target": f"uniform over {cfgd['num_points']} Swiss-roll points "
            "(sklearn make_swiss_roll (x, z) / 7, noise 0)",
            "reward": "Gaussian bump, a = (1.6, 0.8), s = 0.5",
        },
        lims=LIMS,
        show=(0.0, 0.5, 1.0, 2.0, float(cfgd["weights"][-1])),
        base_panel=("the point set (p)", points),
        curve_title="reward guidance on a Swiss-roll point set",
        cloud_title="Swiss roll: samples (blue) over the reward (orange)",
        clock=clock,
    )
