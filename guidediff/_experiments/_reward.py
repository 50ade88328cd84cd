r"""Shared parts of the reward-guidance experiments (PAPER.md sections 2.3 and 4).

- `train_scores`: a base score network by denoising score matching and a reweighted
  one by reward-weighted DSM (warm-started from the base, or from scratch), with
  `guidediff.fit` on small MLPs.
- `reward_sweep`: samples of $s + w(s^r - s)$ over a grid of $w$ with shared noise,
  and $E[r(Y^w)]$ with standard errors.
- figures of $E[r]$ against $w$ and of the sample clouds.
"""

import math
from collections.abc import Callable, Sequence
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
from .._train import fit, warm_start
from ._common import pyplot, sample_over_weights, save_figure, stats


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
):
    """Samples of the reward-guided score for each `w` (shared noise), and the
    mean reward with its standard error. Returns `(samples, means, stderrs)`."""
    samples = sample_over_weights(
        key,
        sde,
        lambda w: guide(base, reward_guidance(rew, w)),
        weights,
        shape,
        num_particles=num_particles,
        num_steps=num_steps,
    )
    means, ses = [], []
    reward_v = jax.jit(jax.vmap(reward))
    for w in weights:
        m, se = stats(reward_v(jnp.asarray(samples[w])))
        means.append(m)
        ses.append(se)
    return samples, means, ses


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
