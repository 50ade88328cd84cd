r"""`reward-pointset` (paper figures 4-5): reward guidance on a Swiss roll.

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
import jax.random as jr
import numpy as np

from .._data import swiss_roll
from .._oracle import GaussianBumpReward, PointCloud
from .._sde import VPSDE
from ._common import (
    Stopwatch,
    distance_to,
    environment,
    monotone_within,
    two_sample_pvalue,
    write_results,
)
from ._reward import (
    learned_scores,
    plot_clouds,
    plot_reward_curves,
    reward_heatmap,
    reward_sweep,
    train_scores,
)


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
    sde = VPSDE()
    points = swiss_roll(seed, cfgd["num_points"])
    cloud = PointCloud(points)
    reward = bump_reward()
    tilted = cloud.tilt(reward)
    r_pts = np.asarray(jax.vmap(reward)(points), np.float64)
    exact_unguided = float(np.mean(r_pts))
    exact_tilted = float(np.sum(r_pts**2) / np.sum(r_pts))
    key = jr.key(seed)
    k_train, k_sample, k_ref, k_test = jr.split(key, 4)
    net, base_p, rew_p, info, _ = train_scores(
        k_train,
        sde,
        points,
        reward,
        hidden=cfgd["hidden"],
        steps=cfgd["steps"],
        reward_steps=cfgd["reward_steps"],
        batch_size=cfgd["batch_size"],
    )
    info["seconds"] = clock.elapsed()
    weights = [float(w) for w in cfgd["weights"]]
    kw = dict(num_particles=cfgd["num_particles"], num_steps=cfgd["num_steps"])
    scores = {
        "exact": (cloud.score(sde), tilted.score(sde)),
        "learned": learned_scores(net, base_p, rew_p, sde),
    }
    samples, means, ses = {}, {}, {}
    for name, (s, s_r) in scores.items():
        samples[name], means[name], ses[name] = reward_sweep(
            k_sample, sde, s, s_r, reward, weights, (2,), **kw
        )
    n = cfgd["distance_points"]
    ref_a, ref_b = (tilted.sample(k, n) for k in jr.split(k_ref))
    dist = {name: distance_to(samples[name][1.0], ref_a, n) for name in samples}
    dist["noise_floor"] = distance_to(ref_b, ref_a, n)
    dist["learned_w0_to_p"] = distance_to(
        samples["learned"][0.0], cloud.sample(k_ref, n)
    )
    pvals = {
        name: two_sample_pvalue(samples[name][1.0], ref_a, k_test, n)
        for name in samples
    }
    i1 = weights.index(1.0)
    results = {
        "experiment": "reward-pointset",
        "quick": quick,
        "seed": seed,
        "w": weights,
        "reward_mean": means,
        "reward_stderr": ses,
        "exact_reward_unguided": exact_unguided,
        "exact_reward_tilted": exact_tilted,
        "energy_distance_w1": dist,
        "two_sample_pvalue_w1": pvals,
        "config": {
            "target": f"uniform over {cfgd['num_points']} Swiss-roll points "
            "(sklearn make_swiss_roll (x, z) / 7, noise 0)",
            "reward": "Gaussian bump, a = (1.6, 0.8), s = 0.5",
            "sde": "VPSDE (linear beta 0.1..20), T = 1",
            "solver": "exponential integrator, uniform grid from 1 to 1e-3",
            **{k: v for k, v in cfgd.items() if k != "weights"},
        },
        "training": info,
        "claims": {
            "exact_reward_increasing": monotone_within(
                means["exact"], ses["exact"], increasing=True
            ),
            "learned_reward_increasing": monotone_within(
                means["learned"], ses["learned"], increasing=True
            ),
            "exact_w1_matches_tilted": bool(
                abs(means["exact"][i1] - exact_tilted) < 3 * ses["exact"][i1]
            ),
        },
        **environment(),
    }
    plot_reward_curves(
        out / "reward_pointset.png",
        weights,
        {name: (means[name], ses[name]) for name in means},
        exact_unguided,
        exact_tilted,
        "reward guidance on a Swiss-roll point set",
    )
    show = [w for w in (0.0, 0.5, 1.0, 2.0, weights[-1]) if w in weights]
    panels = {"the point set (p)": np.asarray(points)}
    panels["exact draws of p^r"] = np.asarray(ref_a)
    for name in ("exact", "learned"):
        for w in show:
            label = "DDPM, w = 0" if w == 0 else f"w = {w:g}"
            panels[f"{name} scores, {label}"] = samples[name][w]
    plot_clouds(
        out / "reward_pointset_samples.png",
        panels,
        reward_heatmap(reward, LIMS),
        LIMS,
        "Swiss roll: samples (blue) over the reward (orange)",
    )
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results
