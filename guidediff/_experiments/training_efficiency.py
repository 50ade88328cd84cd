r"""`training-efficiency`: reward reached against training cost.

The setting of `reward-gmm`. A base score network is first trained by DSM (its cost
is shared by every method and reported apart). Then three ways of raising the
reward are compared by the reward $E[r(Y)]$ of their samples against wall-clock
seconds and against network evaluations:

- **reweighted DSM, warm start** (PAPER.md 4.1): reward-weighted denoising score
  matching of $\hat s^r$, initialised from the base network; sampled with the
  guided score at $w = 1$, i.e. $\hat s + (\hat s^r - \hat s) = \hat s^r$. One
  training step costs `batch_size` network evaluations (each with its backward
  pass) and needs no trajectory;
- **reweighted DSM, from scratch**: the same from a fresh initialisation;
- **DRaFT** (`guidediff._tune.finetune_through_sampler`): the base network fine-tuned
  by backpropagating $r$ through the whole sampler; one step simulates
  `particles x sampler steps` network evaluations, all differentiated.

The reweighted networks are evaluated every few steps by sampling `eval_particles`
particles (evaluation time is not counted); DRaFT's curve is its own minibatch
reward (an unbiased estimate of $E[r]$ at each step), and every method's final
network is evaluated with the same sampler and particles. The exact $E_p[r]$ and
$E_{p^r}[r]$ give the scale: the reweighted methods aim at $E_{p^r}[r]$, while
DRaFT maximises $E[r]$ without a KL term and may overshoot it.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from .._flax import flax_score
from .._grid import uniform_grid
from .._losses import dsm_loss, reward_weighted_dsm_loss
from .._sample import sample
from .._sde import VPSDE
from .._train import fit, warm_start
from .._tune import finetune_through_sampler
from ._common import (
    Stopwatch,
    distance_to,
    environment,
    pyplot,
    save_figure,
    stats,
    write_results,
)
from ._reward import make_net
from .reward_gmm import base_mixture, bump_reward, exact_reward_values


QUICK = dict(
    hidden=(64, 64, 64),
    base_steps=2000,
    reward_steps=1000,
    eval_every=25,
    batch_size=256,
    eval_particles=1000,
    num_steps=100,
    draft_iters=60,
    draft_particles=64,
    draft_lr=1e-3,
)
FULL = dict(
    hidden=(256, 256, 256),
    base_steps=20_000,
    reward_steps=10_000,
    eval_every=100,
    batch_size=1024,
    eval_particles=10_000,
    num_steps=200,
    draft_iters=400,
    draft_particles=256,
    draft_lr=3e-4,
)


def run(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the experiment, write `results.json` and figures into `out`."""
    clock = Stopwatch()
    cfgd = QUICK if quick else FULL
    sde = VPSDE()
    gmm = base_mixture()
    reward = bump_reward()
    exact_unguided, exact_tilted = exact_reward_values(gmm, reward)
    key = jr.key(seed)
    k_init, k_base, k_rew, k_eval, k_draft, k_scratch = jr.split(key, 6)
    net = make_net(cfgd["hidden"])
    params0 = net.init(k_init, 0.5, jnp.zeros(2))
    optimizer = optax.adam(2e-3)
    bs = cfgd["batch_size"]
    data = lambda k: gmm.sample(k, bs)
    ts = uniform_grid(sde.T, 1e-3, cfgd["num_steps"])
    reward_v = jax.jit(jax.vmap(reward))

    failed_per_eval = []  # failed particles of every evaluation, in order

    def evaluate(params, with_samples=False):
        """The mean reward of the particles that did not fail (their number is
        recorded: one diverged particle made a NaN mean before)."""
        out = sample(
            k_eval,
            sde,
            flax_score(net, params, sde),
            (2,),
            num_particles=cfgd["eval_particles"],
            ts=ts,
        )
        ok = ~np.asarray(out.failed)
        failed_per_eval.append(int((~ok).sum()))
        ys = np.asarray(out.ys)[ok]
        m, se = stats(np.asarray(reward_v(out.ys))[ok])
        return (m, se, ys) if with_samples else (m, se)

    def base_loss(params, k, x0):
        return dsm_loss(net.apply, params, k, x0, sde)

    t0 = time.perf_counter()
    base = fit(
        base_loss,
        params0,
        data,
        optimizer=optimizer,
        num_steps=cfgd["base_steps"],
        key=k_base,
        steps_per_dispatch=500,
        progress=False,
    ).ema_params
    base_seconds = time.perf_counter() - t0
    base_reward = evaluate(base)

    def rew_loss(params, k, x0):
        return reward_weighted_dsm_loss(net.apply, params, k, x0, reward, sde)

    # Compile the reweighted-DSM chunk once, so neither timed run pays for it.
    fit(
        rew_loss,
        params0,
        data,
        optimizer=optimizer,
        num_steps=cfgd["eval_every"],
        key=k_rew,
        steps_per_dispatch=cfgd["eval_every"],
        ema_decay=None,
        progress=False,
    )
    methods, finals = {}, {}
    for name, init, k in (
        ("reweighted DSM, warm start", warm_start(base), k_rew),
        ("reweighted DSM, from scratch", params0, k_scratch),
    ):
        methods[name], finals[name] = _dsm_curve(
            rew_loss, init, data, optimizer, cfgd, k, evaluate, evaluate(init)
        )
    methods["DRaFT"], finals["DRaFT"] = _draft_curve(
        k_draft, sde, net, base, reward, cfgd, ts, evaluate, base_reward
    )
    # an index no evaluation particle uses (particle i samples with fold_in(k_eval, i))
    k_ref = jr.fold_in(k_eval, jnp.uint32(0xFFFFFFFF))
    ref = gmm.tilt(reward).sample(k_ref, cfgd["eval_particles"])
    for name, ys in finals.items():
        methods[name]["final_energy_distance_to_tilted"] = distance_to(ys, ref)
    # the noise floor: the same estimate between two independent exact sample sets
    k_floor = jr.fold_in(k_eval, jnp.uint32(0xFFFFFFFE))
    floor = distance_to(gmm.tilt(reward).sample(k_floor, cfgd["eval_particles"]), ref)
    gain = exact_tilted - exact_unguided
    target = exact_unguided + 0.9 * gain
    for m in methods.values():
        for axis, name in (("network_evals", "network_evals"), ("time_s", "seconds")):
            bracket = _reach_bracket(m, axis, target)
            m[f"{name}_to_90pct"] = None if bracket is None else bracket[1]
            m[f"{name}_to_90pct_bracket"] = bracket
    results = {
        "experiment": "training-efficiency",
        "quick": quick,
        "seed": seed,
        "exact_reward_unguided": exact_unguided,
        "exact_reward_tilted": exact_tilted,
        "target_90pct": target,
        "energy_distance_floor": floor,
        "base": {
            "steps": cfgd["base_steps"],
            "seconds": base_seconds,
            "network_evals": cfgd["base_steps"] * bs,
            "reward_mean": base_reward[0],
            "reward_stderr": base_reward[1],
        },
        "methods": methods,
        "eval_failed_particles": {
            "evaluations": len(failed_per_eval),
            "total": int(sum(failed_per_eval)),
            "max_per_evaluation": int(max(failed_per_eval, default=0)),
            "of_particles": cfgd["eval_particles"],
        },
        "config": {
            "setting": "reward-gmm's mixture and Gaussian-bump reward",
            "sampler": f"exponential integrator, {cfgd['num_steps']} uniform steps "
            "(evaluation and DRaFT training)",
            "network_evals": "DSM: batch_size per step (forward + backward); DRaFT: "
            "particles x sampler steps per step (all differentiated)",
            "time": "wall-clock of the training steps (compilation and evaluation "
            "excluded)",
            **cfgd,
        },
        "claims": _claims(methods, exact_unguided, target),
        **environment(),
    }
    _plot(out / "training_efficiency.png", methods, exact_unguided, exact_tilted)
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results


def _dsm_curve(loss, init, data, optimizer, cfgd, key, evaluate, start):
    """Reward-weighted DSM with an evaluation every `eval_every` steps."""
    every = cfgd["eval_every"]
    curve = {"step": [0], "time_s": [0.0], "network_evals": [0]}
    curve["reward"], curve["reward_stderr"] = [start[0]], [start[1]]
    clock = {"start": time.perf_counter(), "paused": 0.0}

    def eval_fn(step, params, ema):
        t = time.perf_counter()
        m, se = evaluate(params)
        curve["step"].append(step)
        curve["time_s"].append(t - clock["start"] - clock["paused"])
        curve["network_evals"].append(step * cfgd["batch_size"])
        curve["reward"].append(m)
        curve["reward_stderr"].append(se)
        clock["paused"] += time.perf_counter() - t
        return m

    res = fit(
        loss,
        init,
        data,
        optimizer=optimizer,
        num_steps=cfgd["reward_steps"],
        key=key,
        steps_per_dispatch=every,
        ema_decay=None,
        eval_every=every,
        eval_fn=eval_fn,
        progress=False,
    )
    m, se, ys = evaluate(res.params, with_samples=True)
    curve["final_reward"], curve["final_reward_stderr"] = m, se
    return curve, ys


def _draft_curve(key, sde, net, base, reward, cfgd, ts, evaluate, start):
    """DRaFT from the base network; the curve is its minibatch reward per step."""
    n, steps = cfgd["draft_particles"], cfgd["num_steps"]
    res = finetune_through_sampler(
        key,
        sde,
        lambda p: flax_score(net, p, sde),
        base,
        reward,
        (2,),
        num_iters=cfgd["draft_iters"],
        num_particles=n,
        learning_rate=cfgd["draft_lr"],
        ts=ts,
    )
    rows = res.curve
    # Row k is the minibatch reward *before* step k's update, i.e. after k steps,
    # reached at the end of step k - 1 (`time_s` excludes compilation).
    done = np.array([r["time_s"] for r in rows])
    curve = {
        "step": [r["step"] for r in rows],
        "time_s": [0.0] + done[:-1].tolist(),
        "network_evals": [r["step"] * n * steps for r in rows],
        "reward": [r["reward"] for r in rows],
        "reward_stderr": [float("nan")] * len(rows),
        "learning_rate": cfgd["draft_lr"],
    }
    curve["reward"][0], curve["reward_stderr"][0] = start
    m, se, ys = evaluate(res.params, with_samples=True)
    curve["step"].append(len(rows))
    curve["time_s"].append(float(done[-1]))
    curve["network_evals"].append(len(rows) * n * steps)
    curve["reward"].append(m)
    curve["reward_stderr"].append(se)
    curve["final_reward"], curve["final_reward_stderr"] = m, se
    curve["compile_seconds_excluded"] = res.compile_s
    return curve, ys


def _reach_bracket(curve, axis, target) -> tuple[float, float] | None:
    """Where the reward first reaches `target`, as the bracket `(before, at)`: the
    cost of the last evaluation before the first one at or above `target`, and of
    that one (the curve is sampled, so the crossing lies between them; the step-0
    evaluation is the first). None if no evaluation reaches it. A point whose reward
    is not finite (every particle of that evaluation failed) neither reaches nor
    bounds the crossing: it is stepped over, and the bracket widens."""
    r = np.asarray(curve["reward"], float)
    finite = np.isfinite(r)
    hit = np.flatnonzero(finite & (r >= target))
    if not hit.size:
        return None
    below = np.flatnonzero(finite[: hit[0]])
    before = float(curve[axis][below[-1]]) if below.size else float(curve[axis][0])
    return before, float(curve[axis][hit[0]])


def _claims(methods, exact_unguided, target):
    out = {}
    for name, m in methods.items():
        key = name.replace(" ", "_").replace(",", "")
        out[f"{key}_improves_reward"] = bool(
            m["final_reward"] - 3 * m["final_reward_stderr"] > exact_unguided
        )
    # judged on the brackets: the warm start's crossing is surely earlier only if
    # its upper end is below DRaFT's lower end (DRaFT's curve is a minibatch reward,
    # so its crossing may come early by noise: this errs towards False)
    warm = methods["reweighted DSM, warm start"]["network_evals_to_90pct_bracket"]
    draft = methods["DRaFT"]["network_evals_to_90pct_bracket"]
    out["warm_start_reaches_90pct_with_fewer_network_evals_than_draft"] = bool(
        warm is not None and (draft is None or warm[1] < draft[0])
    )
    return out


def _plot(path, methods, exact_unguided, exact_tilted):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    for ax, axis, label in (
        (axes[0], "time_s", "wall-clock seconds of training"),
        (axes[1], "network_evals", "network evaluations"),
    ):
        for (name, m), style in zip(methods.items(), ("o-", "s--", "^-"), strict=True):
            x = np.maximum(np.asarray(m[axis], float), 1e-3 if axis == "time_s" else 1)
            ax.plot(x, m["reward"], style, ms=3, lw=1.2, label=name)
        ax.axhline(exact_unguided, color="0.4", ls=":", label="E_p[r] (exact)")
        ax.axhline(exact_tilted, color="k", ls="--", lw=0.8, label="E_{p^r}[r] (exact)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("E[r(Y)]")
    axes[0].legend(fontsize=7)
    fig.suptitle("reward reached against training cost (base network pretrained)")
    save_figure(fig, path)
