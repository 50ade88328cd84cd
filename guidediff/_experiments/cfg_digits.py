r"""`cfg-digits` ([P]'s ImageNet experiment, PAPER.md 6.1, on scikit-learn's 8x8
digits).

A class-conditional U-Net is trained by denoising score matching with label dropout
(the null label 10 gives the unconditional score), and a separate CNN classifier is
trained on clean digits. Corollary 1 is a statement about the posterior of the law
being sampled: with learned scores that is the model's own
$p_\theta(c \mid x) \propto p(c)\,p_\theta(x \mid c)$. The classifier approximates
it after temperature calibration on a separate set of the model's *unguided*
samples labelled by their conditioning class (fitting the temperature on real
held-out digits instead makes the classifier sharper, and its probabilities of
imperfect generated digits then become tiny, so $1/p$ is dominated by a few
samples). For each guidance weight $w$ and each class
$c = 0..9$ the CFG sampler draws the same number of particles with the same noise for
every $w$ (as the paper's "20 trials for each of the 1000 categories"), and the run
reports, averaged over classes and particles:

- $E[1/p(c \mid Y^w)]$ and its standard error, against the ideal unguided value
  $\frac1{10}\sum_c 1/p(c)$ ($p(c)$ = the class frequencies);
- the fraction of samples whose classifier probability improved over the paired
  unguided sample (on the log-odds, so saturated probabilities do not tie).

Quick mode trains tiny networks for a few hundred steps (it only has to run);
full mode trains for real.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from .._data import digits
from .._flax import flax_score
from .._guidance.base import guide
from .._guidance.cfg import cfg
from .._losses import conditional_dsm_loss, noisy_classifier_loss
from .._metrics import frac_improved
from .._nn import CNNClassifier, UNet
from .._sde import VPSDE
from ._common import (
    Stopwatch,
    below_reference,
    environment,
    monotone_within,
    paired_steps,
    pyplot,
    sample_over_weights,
    save_figure,
    stats,
    write_results,
)
from ._loop import train


NUM_CLASSES = 10

QUICK = dict(
    unet_features=(16, 32),
    unet_steps=800,
    unet_batch=64,
    clf_features=(16, 32),
    clf_steps=200,
    per_class=24,
    num_steps=40,
    weights=[0.0, 0.5, 1.0, 2.0, 4.0],
)
FULL = dict(
    unet_features=(64, 128),
    unet_steps=12_000,
    unet_batch=256,
    clf_features=(32, 64),
    clf_steps=3000,
    per_class=200,
    num_steps=250,
    weights=[0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
)


def _split(n: int, key, frac: float = 0.8):
    perm = np.asarray(jr.permutation(key, n))
    cut = int(frac * n)
    return perm[:cut], perm[cut:]


def train_models(cfgd: dict, key, sde):
    """The conditional U-Net, the classifier, its temperature and diagnostics."""
    images, labels = digits()
    k_split, k_unet, k_clf, k_init1, k_init2 = jr.split(key, 5)
    train_idx, held_idx = _split(images.shape[0], k_split)

    unet = UNet(features=cfgd["unet_features"], num_classes=NUM_CLASSES)
    p_unet = unet.init(k_init1, 0.5, jnp.zeros((8, 8)), 0)

    def unet_loss(params, k, batch):
        x0, y = batch
        return conditional_dsm_loss(
            unet.apply, params, k, x0, y, sde, num_classes=NUM_CLASSES, p_uncond=0.2
        )

    p_unet, unet_losses = train(
        unet_loss,
        p_unet,
        (images, labels),
        optimizer=optax.adam(2e-3 if cfgd["unet_steps"] < 1000 else 1e-3),
        num_steps=cfgd["unet_steps"],
        batch_size=cfgd["unet_batch"],
        key=k_unet,
    )

    clf = CNNClassifier(num_classes=NUM_CLASSES, features=cfgd["clf_features"])
    p_clf = clf.init(k_init2, 0.0, jnp.zeros((8, 8)))

    def clf_loss(params, k, batch):
        x0, y = batch
        return noisy_classifier_loss(
            clf.apply, params, k, x0, y, None, num_classes=NUM_CLASSES
        )

    p_clf, clf_losses = train(
        clf_loss,
        p_clf,
        (images[train_idx], labels[train_idx]),
        optimizer=optax.adam(3e-3),
        num_steps=cfgd["clf_steps"],
        batch_size=128,
        key=k_clf,
        ema_decay=None,
    )
    logits_fn = jax.jit(jax.vmap(lambda x: clf.apply(p_clf, 0.0, x)))
    held_logits = logits_fn(images[held_idx])
    held_labels = labels[held_idx]
    accuracy = float(jnp.mean(jnp.argmax(held_logits, -1) == held_labels))
    freqs = np.bincount(np.asarray(labels), minlength=NUM_CLASSES) / labels.shape[0]
    diag = {
        "unet_final_loss": unet_losses[-1],
        "classifier_heldout_accuracy": accuracy,
        "classifier_temperature_on_real_heldout": _calibrate(held_logits, held_labels),
        "classifier_final_loss": clf_losses[-1],
        "class_frequencies": freqs.tolist(),
        "num_train_images": int(images.shape[0]),
    }
    return unet, p_unet, logits_fn, freqs, diag


def _calibrate_on_model(score, sde, logits_fn, key, cfgd) -> tuple[float, float]:
    """Temperature fitted on unguided samples labelled by their conditioning class
    (separate noise from the evaluation runs), and the accuracy there."""
    logits, labels = [], []
    for c in range(NUM_CLASSES):
        ys = sample_over_weights(
            jr.fold_in(key, c),
            sde,
            lambda w: guide(score, cfg(w, null_args=NUM_CLASSES)),
            [0.0],
            (8, 8),
            num_particles=cfgd["per_class"],
            num_steps=cfgd["num_steps"],
            args=jnp.asarray(c, jnp.int32),
        )[0.0]
        logits.append(logits_fn(jnp.asarray(ys)))
        labels.append(jnp.full((ys.shape[0],), c, jnp.int32))
    logits, labels = jnp.concatenate(logits), jnp.concatenate(labels)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    return _calibrate(logits, labels), accuracy


def _calibrate(logits, labels) -> float:
    """The temperature minimising the held-out negative log-likelihood (grid)."""
    temps = np.exp(np.linspace(np.log(0.25), np.log(32.0), 71))
    nll = [
        float(
            -jnp.mean(
                jnp.take_along_axis(
                    jax.nn.log_softmax(logits / t, -1), labels[:, None], 1
                )
            )
        )
        for t in temps
    ]
    return float(temps[int(np.argmin(nll))])


def _class_log_probs(logits, temperature, label):
    """$\\log p(c\\mid y)$ and $\\log(1 - p(c\\mid y))$ from calibrated logits."""
    logp = jax.nn.log_softmax(logits / temperature, -1)
    lp = logp[:, label]
    others = jnp.concatenate([logp[:, :label], logp[:, label + 1 :]], axis=1)
    return lp, jax.nn.logsumexp(others, axis=1)


def run(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the experiment, write `results.json` and figures into `out`."""
    clock = Stopwatch()
    cfgd = QUICK if quick else FULL
    sde = VPSDE()
    key = jr.key(seed)
    k_train, k_sample = jr.split(key)
    unet, p_unet, logits_fn, freqs, diag = train_models(cfgd, k_train, sde)
    train_seconds = clock.elapsed()
    score = flax_score(unet, p_unet, sde)
    weights = [float(w) for w in cfgd["weights"]]
    temperature, cal_accuracy = _calibrate_on_model(
        score, sde, logits_fn, jr.fold_in(k_sample, NUM_CLASSES), cfgd
    )
    diag["classifier_temperature"] = temperature
    diag["classifier_accuracy_on_unguided_samples"] = cal_accuracy
    recip = {w: [] for w in weights}
    logodds = {w: [] for w in weights}
    grid = {w: [] for w in weights}
    for c in range(NUM_CLASSES):
        samples = sample_over_weights(
            jr.fold_in(k_sample, c),
            sde,
            lambda w: guide(score, cfg(w, null_args=NUM_CLASSES)),
            weights,
            (8, 8),
            num_particles=cfgd["per_class"],
            num_steps=cfgd["num_steps"],
            args=jnp.asarray(c, jnp.int32),
        )
        for w in weights:
            lp, lq = _class_log_probs(
                logits_fn(jnp.asarray(samples[w])), temperature, c
            )
            recip[w].append(np.asarray(jnp.exp(-lp)))
            logodds[w].append(np.asarray(lp - lq))
            grid[w].append(samples[w][:2])
    summary = _summarise(weights, recip, logodds)
    theory = float(np.mean(1.0 / freqs))
    results = {
        "experiment": "cfg-digits",
        "quick": quick,
        "seed": seed,
        **summary,
        "theory_unguided": theory,
        "config": {
            "data": "sklearn load_digits, 1797 8x8 images scaled to [-1, 1]",
            "score_net": f"UNet(features={cfgd['unet_features']}), eps-prediction, "
            "conditional DSM with label dropout p_uncond = 0.2 (null label 10)",
            "classifier": f"CNNClassifier(features={cfgd['clf_features']}) on clean "
            "images (80% split); temperature fitted on the model's own unguided "
            "samples labelled by their conditioning class",
            "sde": "VPSDE (linear beta 0.1..20), T = 1",
            "solver": "exponential integrator, uniform grid from 1 to 1e-3",
            "particles": f"{cfgd['per_class']} per class x 10 classes, shared noise "
            "across w",
            **{k: v for k, v in cfgd.items() if k != "weights"},
        },
        "training": {**diag, "seconds": train_seconds},
        "claims": {
            # Corollary 1: R(w) <= R(0) for every w (paired on the shared noise)
            "reciprocal_prob_below_unguided_for_w_gt_0": below_reference(
                summary["reciprocal_prob_change_mean"],
                summary["reciprocal_prob_change_stderr"],
            ),
            "reciprocal_prob_decreasing": monotone_within(
                summary["reciprocal_prob_mean"],
                summary["reciprocal_prob_step_stderr"],
                summary["reciprocal_prob_total_stderr"],
                increasing=False,
            ),
            "reciprocal_prob_below_theory_for_w_gt_0": bool(
                all(
                    m + 3 * se < theory
                    for w, m, se in zip(
                        weights,
                        summary["reciprocal_prob_mean"],
                        summary["reciprocal_prob_stderr"],
                        strict=True,
                    )
                    if w > 0
                )
            ),
            "frac_improved_strictly_between_0_and_1": bool(
                all(
                    0 < f - 4 * se and f + 4 * se < 1
                    for f, se in zip(
                        summary["frac_improved"],
                        summary["frac_improved_stderr"],
                        strict=True,
                    )
                    if f is not None
                )
            ),
        },
        **environment(),
    }
    _plot_curves(out / "cfg_digits.png", summary, theory)
    _plot_grid(out / "cfg_digits_samples.png", grid)
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results


def _summarise(weights, recip, logodds) -> dict:
    base = np.concatenate(logodds[0.0])
    rows = {k: [] for k in ("mean", "se", "frac", "frac_se")}
    for w in weights:
        m, se = stats(np.concatenate(recip[w]))
        rows["mean"].append(m)
        rows["se"].append(se)
        if w > 0:
            f, fse = frac_improved(jnp.asarray(np.concatenate(logodds[w])), base)
            rows["frac"].append(float(f))
            rows["frac_se"].append(float(fse))
        else:
            rows["frac"].append(None)
            rows["frac_se"].append(None)
    # the same samples' noise at every w (per class): paired changes along w
    steps = paired_steps([np.concatenate(recip[w]) for w in weights])
    base_recip = np.concatenate(recip[weights[0]])
    changes = [stats(np.concatenate(recip[w]) - base_recip) for w in weights]
    return {
        "w": list(weights),
        "reciprocal_prob_mean": rows["mean"],
        "reciprocal_prob_stderr": rows["se"],
        "reciprocal_prob_step_stderr": steps["step_stderr"],
        "reciprocal_prob_total_stderr": steps["total_stderr"],
        "reciprocal_prob_change_mean": [float(m) for m, _ in changes],
        "reciprocal_prob_change_stderr": [float(se) for _, se in changes],
        "frac_improved": rows["frac"],
        "frac_improved_stderr": rows["frac_se"],
    }


def _plot_curves(path, summary, theory):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ws = np.array(summary["w"])
    f = np.array(summary["frac_improved"][1:], float)
    fse = np.array(summary["frac_improved_stderr"][1:], float)
    ax1.errorbar(ws[1:], f, yerr=2 * fse, fmt="o-", ms=4, capsize=2)
    ax1.set_xscale("log")
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("guidance weight w")
    ax1.set_ylabel("fraction of samples improved")
    ax1.set_title("p(c|Y^w) > p(c|Y^0), shared noise")
    m = -np.array(summary["reciprocal_prob_mean"])
    se = np.array(summary["reciprocal_prob_stderr"])
    ax2.errorbar(ws, m, yerr=2 * se, fmt="o-", ms=4, capsize=2, label="-E[1/p(c|Y^w)]")
    ax2.axhline(-theory, color="k", ls=":", label="-mean_c 1/p(c)")
    ax2.set_xscale("symlog", linthresh=max(ws[1], 1e-3))
    ax2.set_xlim(0, 1.3 * ws[-1])
    ax2.set_xlabel("guidance weight w")
    ax2.set_title("minus the average reciprocal classifier probability")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def _plot_grid(path, grid):
    plt = pyplot()
    ws = list(grid)
    fig, axes = plt.subplots(
        len(ws), 2 * NUM_CLASSES, figsize=(0.62 * 2 * NUM_CLASSES, 0.7 * len(ws) + 0.4)
    )
    axes = np.atleast_2d(axes)
    for i, w in enumerate(ws):
        for c in range(NUM_CLASSES):
            for j in range(2):
                ax = axes[i, 2 * c + j]
                img = np.clip(grid[w][c][j], -1, 1)
                ax.imshow(img, cmap="gray_r", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
        axes[i, 0].set_ylabel(f"w={w:g}", rotation=0, ha="right", va="center")
    fig.suptitle("CFG samples per class (columns: two per digit 0-9), same noise per w")
    save_figure(fig, path)
