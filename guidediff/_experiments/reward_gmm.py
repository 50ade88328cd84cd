r"""`reward-gmm` (paper figure 3): reward guidance on a 2-D Gaussian mixture.

The base law $p$ is a four-component mixture and the reward a Gaussian bump
$r(x) = \exp(-\|x - a\|^2 / (2 s^2))$, so the reweighted law $p^r \propto p\,r$ is
again a mixture (`GaussianMixture.tilt`) and every score is exact. The guided score
$s + w(s^r - s)$ (PAPER.md 2.3) is sampled for several $w$ with shared noise, with

- the exact scores of $p$ and $p^r$, and
- learned scores: a base MLP trained by denoising score matching on draws from $p$,
  and a reweighted MLP trained by reward-weighted DSM on the same kind of draws,
  warm-started from the base (PAPER.md 4.1: only $(x_0, r(x_0))$ pairs, no
  trajectories).

It reports $E[r(Y^w)]$ against $w$ (PAPER.md 2.4: it rises with $w$ and equals
$E_{p^r}[r] = E_p[r^2]/E_p[r]$ at $w = 1$), and at $w = 1$ the energy distance of
each sampler's output to exact draws from $p^r$ (with the distance between two
independent exact sample sets as the Monte-Carlo noise floor) and a permutation
two-sample test.
"""

import math
from pathlib import Path

import jax.random as jr
import numpy as np

from .._oracle import GaussianBumpReward, GaussianMixture
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
    clock = Stopwatch()
    cfgd = QUICK if quick else FULL
    sde = VPSDE()
    gmm = base_mixture()
    reward = bump_reward()
    tilted = gmm.tilt(reward)
    key = jr.key(seed)
    k_train, k_sample, k_ref, k_test = jr.split(key, 4)
    net, base_p, rew_p, info, _ = train_scores(
        k_train,
        sde,
        gmm.sample,
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
        "exact": (gmm.score(sde), tilted.score(sde)),
        "learned": learned_scores(net, base_p, rew_p, sde),
    }
    samples, means, ses = {}, {}, {}
    for name, (s, s_r) in scores.items():
        samples[name], means[name], ses[name] = reward_sweep(
            k_sample, sde, s, s_r, reward, weights, (2,), **kw
        )
    exact_unguided, exact_tilted = exact_reward_values(gmm, reward)
    n = cfgd["distance_points"]
    ref_a, ref_b = (tilted.sample(k, n) for k in jr.split(k_ref))
    dist = {name: distance_to(samples[name][1.0], ref_a, n) for name in samples}
    dist["noise_floor"] = distance_to(ref_b, ref_a, n)
    dist["learned_w0_to_p"] = distance_to(samples["learned"][0.0], gmm.sample(k_ref, n))
    pvals = {
        name: two_sample_pvalue(samples[name][1.0], ref_a, k_test, n)
        for name in samples
    }
    i1 = weights.index(1.0)
    results = {
        "experiment": "reward-gmm",
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
            "base": "2-D mixture of 4 Gaussians at (+-2.5, +-2.5), weights "
            "0.4/0.25/0.25/0.1 (the lightest at (2.5, 2.5))",
            "reward": "Gaussian bump r(x) = exp(-|x - a|^2 / (2 s^2)), a = (2, 2), s = 1.5",
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
        out / "reward_gmm.png",
        weights,
        {name: (means[name], ses[name]) for name in means},
        exact_unguided,
        exact_tilted,
        "reward guidance on a Gaussian mixture",
    )
    show = [w for w in (0.0, 1.0, weights[-1]) if w in weights]
    panels = {"exact draws of p": np.asarray(gmm.sample(k_ref, 2000))}
    panels["exact draws of p^r"] = np.asarray(ref_a)
    for name in ("exact", "learned"):
        for w in show:
            label = "DDPM, w = 0" if w == 0 else f"w = {w:g}"
            panels[f"{name} scores, {label}"] = samples[name][w]
    plot_clouds(
        out / "reward_gmm_samples.png",
        panels,
        reward_heatmap(reward, LIMS),
        LIMS,
        "samples (blue) over the reward (orange)",
    )
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results
