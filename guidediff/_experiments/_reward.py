r"""Shared parts of the reward-guidance experiments (PAPER.md sections 2.3 and 4).

- `train_scores`: a base score network by denoising score matching and a reweighted
  one by reward-weighted DSM (warm-started from the base, or from scratch), with
  `guidediff.fit` on small MLPs.
- `reward_sweep`: samples of $s + w(s^r - s)$ over a grid of $w$ with shared noise,
  and $E[r(Y^w)]$ with standard errors.
- figures of $E[r]$ against $w$ and of the sample clouds.
- `run_reward_experiment`: the whole run of `reward-gmm` and `reward-pointset`
  given the laws, the reward and the configuration.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from .._flax import flax_score
from .._guidance.base import guide
from .._guidance.reward import reward_guidance
from .._losses import dsm_loss, reward_weighted_dsm_loss
from .._nn import MLPScoreNet
from .._sde import VPSDE
from .._train import fit, warm_start
from ._common import (
    Stopwatch,
    distance_to,
    environment,
    monotone_within,
    paired_steps,
    pyplot,
    sample_over_weights,
    save_figure,
    stats,
    two_sample_pvalue,
    write_results,
)


# The model error allowed to the learned sampler at w = 1: its mean reward may miss
# the exact tilt's E_{p^r}[r] by this share of the exact gain E_{p^r}[r] - E_p[r]
# (plus AGREE_SE standard errors).
LEARNED_GAIN_TOL = 0.1
# Two-sided agreement claims (a value equals its exact counterpart) allow this many
# standard errors: 4 (a spurious False once in 16000 per claim; 3 would be 1 in 370)
AGREE_SE = 4.0


def make_net(hidden: Sequence[int]) -> MLPScoreNet:
    return MLPScoreNet(hidden=tuple(hidden), time_embed_dim=64)


def train_scores(
    key,
    sde,
    data: Any,
    reward: Callable,
    *,
    hidden: Sequence[int],
    steps: int,
    reward_steps: int,
    batch_size: int,
    learning_rate: float = 2e-3,
    from_scratch: bool = False,
    snapshots: Sequence[int] = (),
):
    """Train the base and the reweighted score networks with `fit`.

    `data` is an array of examples or a function `(key, n) -> n examples` (fresh
    draws every step). The reweighted network starts from the base network's EMA
    parameters (PAPER.md 4.1) unless `from_scratch`.

    Returns `(net, base_params, reward_params, info, snaps)`: EMA parameters, a dict
    of training facts, and `snaps[k] = (base_k, reward_k)`, the raw parameters of both
    networks after `k` steps for each `k` in `snapshots` (under-trained networks).
    """
    net = make_net(hidden)
    k_init, k_base, k_rew = jr.split(key, 3)
    params0 = net.init(k_init, 0.5, jnp.zeros(_dim(data)))
    optimizer = optax.adam(learning_rate)

    def base_loss(params, k, x0):
        return dsm_loss(net.apply, params, k, x0, sde)

    def rew_loss(params, k, x0):
        return reward_weighted_dsm_loss(net.apply, params, k, x0, reward, sde)

    if callable(data):
        draw = data
        data, batch = (lambda k: draw(k, batch_size)), None
    else:
        batch = batch_size
    runs = {}
    snaps: dict[str, dict[int, Any]] = {"base": {}, "reward": {}}
    for name, loss, init, num in (
        ("base", base_loss, params0, steps),
        ("reward", rew_loss, None, reward_steps),
    ):
        if init is None:
            init = params0 if from_scratch else warm_start(runs["base"].ema_params)
        every = _dispatch(num, snapshots)
        store = snaps[name]

        def eval_fn(step, params, ema, store=store):
            if step in snapshots:
                store[step] = params
            return 0.0

        runs[name] = fit(
            loss,
            init,
            data,
            optimizer=optimizer,
            num_steps=num,
            batch_size=batch,
            key=k_base if name == "base" else k_rew,
            steps_per_dispatch=every,
            eval_every=every if snapshots else None,
            eval_fn=eval_fn if snapshots else None,
            progress=False,
        )
    info = {
        "hidden": list(hidden),
        "base_steps": steps,
        "reward_steps": reward_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "reweighted_init": "scratch" if from_scratch else "warm start from base",
        "base_final_loss": float(np.mean(runs["base"].losses[-100:])),
        "reward_final_loss": float(np.mean(runs["reward"].losses[-100:])),
    }
    pairs = {k: (snaps["base"][k], snaps["reward"][k]) for k in snapshots}
    return net, runs["base"].ema_params, runs["reward"].ema_params, info, pairs


def _dim(data) -> int:
    if callable(data):
        return int(jax.eval_shape(lambda k: data(k, 2), jr.key(0)).shape[-1])
    return int(data.shape[-1])


def _dispatch(steps: int, snapshots: Sequence[int]) -> int:
    """Steps per jitted chunk: a divisor of every snapshot and of `steps`."""
    g = 0
    for s in (*snapshots, steps):
        g = math.gcd(g, int(s))
    while g > 500 and g % 2 == 0:
        g //= 2
    return max(g, 1)


# time bands of the learned scores' relative errors (`relative_score_error`)
ERROR_BANDS = ((0.05, 0.2), (0.2, 0.5), (0.5, 1.0))


def relative_score_error(
    key, sde, law, approx, exact, num: int = 4000, t_range=(0.05, 1.0)
) -> float:
    r"""$\sqrt{E\|\hat s - s\|^2 / E\|s\|^2}$ over $t \sim U$`(t_range)` and
    $x_t \sim$ `law`$_t$ (`law.sample` draws $x_0$, `sde.perturb` noises it)."""
    k0, kt, kz = jr.split(key, 3)
    x0 = law.sample(k0, num)
    t = jr.uniform(kt, (num,), minval=t_range[0], maxval=t_range[1])
    xt = jax.vmap(sde.perturb)(t, x0, jr.normal(kz, x0.shape))
    a = jax.vmap(lambda ti, xi: approx(ti, xi, None))(t, xt)
    e = jax.vmap(lambda ti, xi: exact(ti, xi, None))(t, xt)
    return float(jnp.sqrt(jnp.sum((a - e) ** 2) / jnp.sum(e**2)))


def learned_scores(net, base_params, rew_params, sde):
    return flax_score(net, base_params, sde), flax_score(net, rew_params, sde)


def reward_sweep(
    key,
    sde,
    base,
    rew,
    reward: Callable,
    weights: Sequence[float],
    shape: tuple[int, ...],
    *,
    num_particles: int,
    num_steps: int,
    max_failed: int = 0,
    failures: dict | None = None,
):
    """Samples of the reward-guided score for each `w` (shared noise), the mean
    reward with its standard error, and the paired standard errors of its changes
    along `w` (`paired_steps`). Returns `(samples, means, stderrs, steps)`.
    `max_failed` and `failures` as in `sample_over_weights` (failed particles are
    dropped from every `w`)."""
    samples = sample_over_weights(
        key,
        sde,
        lambda w: guide(base, reward_guidance(rew, w)),
        weights,
        shape,
        num_particles=num_particles,
        num_steps=num_steps,
        max_failed=max_failed,
        failures=failures,
    )
    means, ses, values = [], [], []
    reward_v = jax.jit(jax.vmap(reward))
    for w in weights:
        r = reward_v(jnp.asarray(samples[w]))
        m, se = stats(r)
        means.append(m)
        ses.append(se)
        values.append(r)
    return samples, means, ses, paired_steps(values)


def plot_reward_curves(
    path, weights, curves: dict[str, tuple], exact_unguided, exact_tilted, title
):
    """E[r] against w for each named curve `(means, stderrs)`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for (name, (m, se)), style in zip(
        curves.items(), ("o-", "s--", "^-."), strict=False
    ):
        ax.errorbar(
            weights, m, yerr=2 * np.asarray(se), fmt=style, ms=4, capsize=2, label=name
        )
    ax.axhline(exact_unguided, color="0.4", ls=":", label="E_p[r] (unguided, exact)")
    ax.axhline(
        exact_tilted, color="k", ls="--", lw=0.8, label="E_{p^r}[r] (w = 1, exact)"
    )
    ax.axvline(1.0, color="0.8", lw=0.8)
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("E[r(Y^w)]")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_clouds(path, panels: dict[str, np.ndarray], reward_grid, lims, title):
    """Scatter panels of sample sets over a reward heat map."""
    plt = pyplot()
    n = len(panels)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False
    )
    xx, yy, rr = reward_grid
    for ax, (name, ys) in zip(axes.ravel(), panels.items(), strict=False):
        ax.contourf(xx, yy, rr, levels=8, cmap="Oranges", alpha=0.5)
        ax.scatter(ys[:2000, 0], ys[:2000, 1], s=1.5, alpha=0.5, c="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(*lims[0])
        ax.set_ylim(*lims[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path)


def reward_heatmap(reward: Callable, lims, num: int = 100):
    xs = np.linspace(*lims[0], num)
    ys = np.linspace(*lims[1], num)
    xx, yy = np.meshgrid(xs, ys)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1))
    rr = np.asarray(jax.vmap(reward)(pts)).reshape(xx.shape)
    return xx, yy, rr


def run_reward_experiment(
    out: Path,
    *,
    name: str,
    quick: bool,
    seed: int,
    cfg: dict,
    base,
    tilted,
    reward: Callable,
    train_data: Any,
    exact_values: tuple[float, float],
    describe: dict,
    lims,
    show: Sequence[float],
    base_panel: tuple[str, Any] | None = None,
    curve_title: str,
    cloud_title: str,
    clock: Stopwatch | None = None,
) -> dict:
    r"""The run shared by `reward-gmm` and `reward-pointset`.

    `base` and `tilted` are the exact laws $p$ and $p^r$ (`.score(sde)`,
    `.sample(key, n)`), `train_data` the training data of `train_scores`,
    `exact_values` $(E_p[r], E_{p^r}[r])$, `describe` the leading entries of the
    `config` record, `show` the weights drawn in the sample figure and `base_panel`
    its first panel `(label, points)` (default: exact draws of $p$).

    Trains the base and reweighted networks, samples $s + w(s^r - s)$ over `cfg`'s
    weights with exact and learned scores (shared noise), measures the energy
    distance and a two-sample test at $w = 1$ against exact draws of $p^r$, writes
    `results.json`, `<name>.png` and `<name>_samples.png` into `out`, and returns the
    results.
    """
    clock = Stopwatch() if clock is None else clock
    sde = VPSDE()
    key = jr.key(seed)
    k_train, k_sample, k_ref, k_test = jr.split(key, 4)
    net, base_p, rew_p, info, _ = train_scores(
        k_train,
        sde,
        train_data,
        reward,
        hidden=cfg["hidden"],
        steps=cfg["steps"],
        reward_steps=cfg["reward_steps"],
        batch_size=cfg["batch_size"],
    )
    info["seconds"] = clock.elapsed()
    weights = [float(w) for w in cfg["weights"]]
    kw = dict(num_particles=cfg["num_particles"], num_steps=cfg["num_steps"])
    scores = {
        "exact": (base.score(sde), tilted.score(sde)),
        "learned": learned_scores(net, base_p, rew_p, sde),
    }
    # Strong guidance (w > 1 amplifies s^r - s) can make a rare path diverge: the
    # sampler flags it, and up to 0.1 % of the particles are dropped (from every
    # w, keeping the pairing) and counted in `failures` rather than ending the run.
    samples, means, ses, steps, failures = {}, {}, {}, {}, {}
    for label, (s, s_r) in scores.items():
        failures[label] = {}
        samples[label], means[label], ses[label], steps[label] = reward_sweep(
            k_sample,
            sde,
            s,
            s_r,
            reward,
            weights,
            (2,),
            **kw,
            max_failed=cfg["num_particles"] // 1000,
            failures=failures[label],
        )
    exact_unguided, exact_tilted = exact_values
    n = cfg["distance_points"]
    ref_a, ref_b = (tilted.sample(k, n) for k in jr.split(k_ref))
    dist = {label: distance_to(samples[label][1.0], ref_a, n) for label in samples}
    dist["noise_floor"] = distance_to(ref_b, ref_a, n)
    dist["learned_w0_to_p"] = distance_to(
        samples["learned"][0.0], base.sample(k_ref, n), n
    )
    pvals = {
        label: two_sample_pvalue(samples[label][1.0], ref_a, k_test, n)
        for label in samples
    }
    # how close the learned scores are to the exact ones (relative L2 error under
    # each law's own noised marginals, by time band): reported, not claimed
    k_err = jr.fold_in(key, 7)  # a stream of its own: the other draws are unchanged
    learned = scores["learned"]
    score_error = {
        name: {
            f"{lo:g}-{hi:g}": relative_score_error(
                jr.fold_in(k_err, 2 * b + j),
                sde,
                law,
                approx,
                exact_s,
                num=min(4000, cfg["num_particles"]),
                t_range=(lo, hi),
            )  # fmt: skip
            for b, (lo, hi) in enumerate(ERROR_BANDS)
        }
        for j, (name, law, approx, exact_s) in enumerate(
            (
                ("base", base, learned[0], base.score(sde)),
                ("reweighted", tilted, learned[1], tilted.score(sde)),
            )
        )
    }
    i0, i1 = weights.index(0.0), weights.index(1.0)
    # the learned sampler at w = 1 against the exact tilt: the share of the exact
    # reward gain E_{p^r}[r] - E_p[r] that it reaches (1 for a perfect model)
    gain = exact_tilted - exact_unguided
    learned_w1 = means["learned"][i1]
    results = {
        "experiment": name,
        "quick": quick,
        "seed": seed,
        "w": weights,
        "reward_mean": means,
        "reward_stderr": ses,
        "reward_step_stderr": {k: v["step_stderr"] for k, v in steps.items()},
        "reward_total_stderr": {k: v["total_stderr"] for k, v in steps.items()},
        "exact_reward_unguided": exact_unguided,
        "exact_reward_tilted": exact_tilted,
        # per score kind: failed particles per w, and how many were dropped
        "failures": failures,
        "learned_w1_gain_fraction": (learned_w1 - exact_unguided) / gain,
        "energy_distance_w1": dist,
        "learned_score_relative_error": score_error,
        "two_sample_pvalue_w1": pvals,
        "config": {
            **describe,
            "sde": "VPSDE (linear beta 0.1..20), T = 1",
            "solver": "exponential integrator, uniform grid from 1 to 1e-3",
            **{k: v for k, v in cfg.items() if k != "weights"},
        },
        "training": info,
        "claims": {
            **{
                f"{label}_reward_increasing": monotone_within(
                    means[label],
                    steps[label]["step_stderr"],
                    steps[label]["total_stderr"],
                    increasing=True,
                )
                for label in ("exact", "learned")
            },
            "exact_w1_matches_tilted": bool(
                abs(means["exact"][i1] - exact_tilted) < AGREE_SE * ses["exact"][i1]
            ),
            # the gains above are against the sampler's own w = 0: it samples p
            "exact_w0_matches_unguided": bool(
                abs(means["exact"][i0] - exact_unguided) < AGREE_SE * ses["exact"][i0]
            ),
            # the learned s^r at w = 1 reaches the exact tilt's reward: within 10 %
            # of the exact gain (the model's error, stated) plus 4 standard errors
            "learned_w1_within_10pct_of_exact_gain": bool(
                abs(learned_w1 - exact_tilted)
                <= LEARNED_GAIN_TOL * abs(gain) + AGREE_SE * ses["learned"][i1]
            ),
        },
        **environment(),
    }
    stem = name.replace("-", "_")
    plot_reward_curves(
        out / f"{stem}.png",
        weights,
        {label: (means[label], ses[label]) for label in means},
        exact_unguided,
        exact_tilted,
        curve_title,
    )
    if base_panel is None:
        base_panel = ("exact draws of p", base.sample(k_ref, 2000))
    panels = {base_panel[0]: np.asarray(base_panel[1])}
    panels["exact draws of p^r"] = np.asarray(ref_a)
    for label in ("exact", "learned"):
        for w in (w for w in show if w in weights):
            tag = "DDPM, w = 0" if w == 0 else f"w = {w:g}"
            panels[f"{label} scores, {tag}"] = samples[label][w]
    plot_clouds(
        out / f"{stem}_samples.png",
        panels,
        reward_heatmap(reward, lims),
        lims,
        cloud_title,
    )
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results
