r"""`cfg-gmm` ([P]'s GMM experiment, PAPER.md 6.1): classifier-free guidance on a Gaussian mixture with
exact scores.

For each guidance weight $w$ (0, then a log grid from 0.01 to 10) the CFG reverse
SDE is sampled with the same noise (shared particle keys), and for the target class
$c$ it reports

- $E[1/p(c \mid Y^w)]$ with its standard error: Corollary 1 (PAPER.md 3.3) says it is
  $1/p(c)$ at $w = 0$ and only decreases below it for $w > 0$;
- the fraction of samples whose classifier probability strictly improved over the
  paired unguided sample, $p(c \mid Y^w_i) > p(c \mid Y^0_i)$. It is decided on the
  log-odds $\log p - \log(1 - p)$ (a strictly increasing function of $p$, computed
  with `log_classifier_complement_t`), because $p$ itself rounds to 1.0 in floating
  point and would produce spurious ties.

**Which mixture.** With exact scores and shared noise, *every* sample improves when
$p_t(c \mid x)$ is monotone along the direction guidance moves samples: in 1-D the
guided drift differs from the unguided one by $w\,g^2\,\partial_x\log p_t(c\mid x)$,
which then has one sign everywhere, and the comparison theorem for SDEs driven by the
same noise orders the two paths, $Y^w \le Y^0$ (or $\ge$) pathwise. This is why the
1-D configuration of PAPER.md 6.4 (class 0 = modes at -3 and 1, class 1 at 2.5, all
variances 0.5) gives a fraction of exactly 1; it is run here as `reference_paper_1d`.
The primary mixture therefore puts the target class *between* two other classes
(three unit-variance isotropic classes at $(-2, 0)$, $(0, 0)$, $(2, 0)$, equal weights,
$c$ = the middle one): $p_t(c\mid x)$ peaks near the class and the guidance drift
changes sign there, so coupled samples that the unguided sampler leaves near the
peak can be pushed across it to a lower $p(c\mid x)$. About a fifth of the samples
get worse at every $w$ while $E[1/p]$ falls, which is the paper's point.
PAPER.md 6.4's isotropic two-class case (Wu et al.'s setting, $\mu = (\pm 2, 0)$,
where every sample improves) is not run: it is the same monotone situation as the
1-D reference, which already shows it.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .._guidance.base import guide
from .._guidance.cfg import cfg
from .._metrics import frac_improved
from .._oracle import GaussianMixture
from .._sde import VPSDE, OneMinusT
from ._common import (
    Stopwatch,
    below_reference,
    environment,
    log_grid,
    monotone_within,
    paired_steps,
    pyplot,
    sample_over_weights,
    save_figure,
    stats,
    write_results,
)


LABEL = 0

QUICK = dict(num_particles=2000, num_steps=200, num_weights=7)
FULL = dict(num_particles=10_000, num_steps=4000, num_weights=13)


def middle_class_mixture() -> GaussianMixture:
    """Three isotropic unit-variance classes in a row; class 0 is the middle one."""
    return GaussianMixture(
        weights=[1 / 3, 1 / 3, 1 / 3],
        means=[[0.0, 0.0], [-2.0, 0.0], [2.0, 0.0]],
        covs=[1.0, 1.0, 1.0],
        labels=[0, 1, 2],
    )


def paper_1d_mixture() -> GaussianMixture:
    """PAPER.md 6.4: class 0 = modes at -3 and 1, class 1 at 2.5, variances 0.5."""
    return GaussianMixture(
        weights=[0.25, 0.25, 0.5],
        means=[[-3.0], [1.0], [2.5]],
        covs=[0.5, 0.5, 0.5],
        labels=[0, 0, 1],
    )


def _log_probs(gmm: GaussianMixture, ys: np.ndarray, label: int):
    """$\\log p(c\\mid y)$ and $\\log(1 - p(c\\mid y))$ for each sample."""
    ys = jnp.asarray(ys)
    lp = jax.vmap(lambda x: gmm.log_classifier_t(None, 0.0, x, label))(ys)
    lq = jax.vmap(lambda x: gmm.log_classifier_complement_t(None, 0.0, x, label))(ys)
    return lp, lq


def _class_quadrature(gmm: GaussianMixture, label: int):
    r"""$p(x\mid c)$, $\log p(c\mid x)$ and the cell volume on a grid covering the
    mixture (1-D or 2-D; 12 standard deviations beyond the extreme means)."""
    if gmm.dim > 2:
        raise ValueError("the quadratures here integrate 1-D and 2-D mixtures")
    means, sd = np.asarray(gmm.means), np.sqrt(np.asarray(gmm.covs).max())
    n = 4001 if gmm.dim == 1 else 401
    axes = [
        np.linspace(means[:, i].min() - 12 * sd, means[:, i].max() + 12 * sd, n)
        for i in range(gmm.dim)
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, gmm.dim)
    cell = np.prod([a[1] - a[0] for a in axes])
    xs = jnp.asarray(grid)
    logp = jax.vmap(lambda x: gmm.log_prob_t(None, 0.0, x, label))(xs)
    logc = jax.vmap(lambda x: gmm.log_classifier_t(None, 0.0, x, label))(xs)
    dens = np.exp(np.asarray(logp, np.float64))
    return dens, np.asarray(logc, np.float64), cell


def reciprocal_prob_sd(gmm: GaussianMixture, label: int) -> float:
    r"""The exact standard deviation of $1/p(c\mid X)$ for $X \sim p(\cdot\mid c)$,
    by quadrature on a grid (1-D or 2-D): $E[1/p] = 1/p(c)$ and
    $E[1/p^2] = \int p(x\mid c)/p(c\mid x)^2\,dx$. $1/p$ is heavy-tailed, so the
    sample standard deviation of a run underestimates it (by a large factor at a few
    thousand particles here); the unguided mean is compared with $1/p(c)$ on this one."""
    dens, logc, cell = _class_quadrature(gmm, label)
    inv = np.exp(-logc)
    m1, m2 = np.sum(dens * inv) * cell, np.sum(dens * inv**2) * cell
    return float(np.sqrt(max(m2 - m1**2, 0.0)))


def exact_confidence(gmm: GaussianMixture, label: int) -> float:
    r"""$E[p(c\mid X)]$ for $X \sim p(\cdot\mid c)$, by quadrature: what the
    unguided sampler's mean classifier probability estimates. $p \in [0, 1]$ is
    light-tailed, so a sample's own standard error judges it, and a bias of the
    sampler (e.g. a coarse grid's) that $1/p$'s wide error hides shows here."""
    dens, logc, cell = _class_quadrature(gmm, label)
    return float(np.sum(dens * np.exp(logc)) * cell)


def cfg_sweep(gmm, sde, weights, *, key, num_particles, num_steps, label=LABEL):
    """Sample every weight with shared noise; return the metrics and the samples."""
    score = gmm.conditional_score(sde)
    samples = sample_over_weights(
        key,
        sde,
        lambda w: guide(score, cfg(w, null_args=gmm.null_label)),
        weights,
        (gmm.dim,),
        num_particles=num_particles,
        num_steps=num_steps,
        args=label,
    )
    lp0, lq0 = _log_probs(gmm, samples[0.0], label)
    conf0, conf0_se = stats(jnp.exp(lp0))
    logodds0 = lp0 - lq0
    recip0 = jnp.exp(-lp0)
    rows = {k: [] for k in ("mean", "se", "frac", "frac_se", "dmean", "dse")}
    improved, recips = {}, []
    for w in weights:
        lp, lq = _log_probs(gmm, samples[w], label)
        recip = jnp.exp(-lp)
        recips.append(recip)
        m, se = stats(recip)
        dm, dse = stats(recip - recip0)
        rows["mean"].append(m)
        rows["se"].append(se)
        rows["dmean"].append(dm)
        rows["dse"].append(dse)
        if w > 0:
            f, fse = frac_improved(lp - lq, logodds0)
            rows["frac"].append(float(f))
            rows["frac_se"].append(float(fse))
            improved[w] = np.asarray(lp - lq > logodds0)
        else:  # a sample is not strictly better than itself
            rows["frac"].append(None)
            rows["frac_se"].append(None)
    theory = 1.0 / float(gmm.class_prob(label))
    steps = paired_steps(recips)
    summary = {
        "w": list(weights),
        "reciprocal_prob_mean": rows["mean"],
        "reciprocal_prob_stderr": rows["se"],
        "reciprocal_prob_step_stderr": steps["step_stderr"],
        "reciprocal_prob_total_stderr": steps["total_stderr"],
        "reciprocal_prob_change_mean": rows["dmean"],
        "reciprocal_prob_change_stderr": rows["dse"],
        "frac_improved": rows["frac"],
        "frac_improved_stderr": rows["frac_se"],
        "theory_unguided": theory,
        "theory_unguided_stderr": reciprocal_prob_sd(gmm, label)
        / np.sqrt(len(np.asarray(recips[0]))),
        "unguided_confidence_mean": conf0,
        "unguided_confidence_stderr": conf0_se,
        "theory_unguided_confidence": exact_confidence(gmm, label),
    }
    return summary, samples, improved


def run(out: Path, *, quick: bool = False, seed: int = 0) -> dict:
    """Run the experiment, write `results.json` and figures into `out`."""
    clock = Stopwatch()
    cfgd = QUICK if quick else FULL
    sde = VPSDE(OneMinusT())
    weights = log_grid(0.01, 10.0, cfgd["num_weights"])
    kw = dict(num_particles=cfgd["num_particles"], num_steps=cfgd["num_steps"])
    gmm = middle_class_mixture()
    primary, samples, improved = cfg_sweep(gmm, sde, weights, key=jr.key(seed), **kw)
    ref_gmm = paper_1d_mixture()
    reference, _, _ = cfg_sweep(ref_gmm, sde, weights, key=jr.key(seed + 1), **kw)
    fracs = [f for f in primary["frac_improved"] if f is not None]
    ses = [s for s in primary["frac_improved_stderr"] if s is not None]
    results = {
        "experiment": "cfg-gmm",
        "quick": quick,
        "seed": seed,
        **primary,
        "label": LABEL,
        "config": {
            "mixture": "2-D, three isotropic classes, class 0 between classes 1 and 2",
            "weights": [1 / 3, 1 / 3, 1 / 3],
            "means": [[0.0, 0.0], [-2.0, 0.0], [2.0, 0.0]],
            "covs": "identity (all three)",
            "sde": "VPSDE(OneMinusT()): alpha_bar(t) = 1 - t, T = 1 - 1e-3",
            "solver": "exponential integrator (DDPM ancestral), uniform grid to 1e-3",
            "frac_improved_on": "log-odds log p(c|y) - log(1 - p(c|y))",
            **cfgd,
        },
        "reference_paper_1d": {
            **reference,
            "config": "PAPER.md 6.4: class 0 = N(-3, 0.5) + N(1, 0.5) (weights "
            "1/4 each), class 1 = N(2.5, 0.5) (weight 1/2); target class 0",
        },
        "claims": {
            # Corollary 1: R(w) <= R(0) for every w (paired on the shared noise)
            "reciprocal_prob_below_unguided_for_w_gt_0": below_reference(
                primary["reciprocal_prob_change_mean"],
                primary["reciprocal_prob_change_stderr"],
            ),
            "reciprocal_prob_decreasing": monotone_within(
                primary["reciprocal_prob_mean"],
                primary["reciprocal_prob_step_stderr"],
                primary["reciprocal_prob_total_stderr"],
                increasing=False,
            ),
            "frac_improved_strictly_between_0_and_1": bool(
                all(
                    0 < f - 4 * s and f + 4 * s < 1
                    for f, s in zip(fracs, ses, strict=True)
                )
            ),
            # the unguided sampler's E[1/p] is 1/p(c), within 4 exact standard
            # errors (the sample's own SE is too small for this heavy tail)
            "unguided_reciprocal_prob_matches_theory": bool(
                abs(primary["reciprocal_prob_mean"][0] - primary["theory_unguided"])
                < 4 * primary["theory_unguided_stderr"]
            ),
            # ... and its mean p(c|Y^0), light-tailed, is the exact E[p(c|X)]
            # within 4 of its own standard errors: a sampler bias too small for
            # the check above shows here. Judged at the full size only (None at
            # --quick): the quick 200-step grid's bias is itself about one
            # standard error at 2,000 particles, so the claim would fail there
            # for a few percent of seeds, by the grid and not by guidance
            "unguided_confidence_matches_exact": None
            if quick
            else bool(
                abs(
                    primary["unguided_confidence_mean"]
                    - primary["theory_unguided_confidence"]
                )
                < 4 * primary["unguided_confidence_stderr"]
            ),
            "reference_paper_1d_frac_improved_is_1": bool(
                all(f == 1.0 for f in reference["frac_improved"] if f is not None)
            ),
        },
        **environment(),
    }
    _plot_curves(out / "cfg_gmm.png", primary, reference)
    _plot_samples(out / "cfg_gmm_samples.png", gmm, samples, improved)
    results["seconds"] = clock.elapsed()
    write_results(out, results)
    return results


def _plot_curves(path, primary, reference):
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for res, name, style in (
        (primary, "middle class (2-D)", "o-"),
        (reference, "PAPER.md 1-D config", "s--"),
    ):
        ws = np.array(res["w"][1:])
        f = np.array(res["frac_improved"][1:], float)
        fse = np.array(res["frac_improved_stderr"][1:], float)
        ax1.errorbar(ws, f, yerr=2 * fse, fmt=style, ms=4, label=name, capsize=2)
    ax1.set_xscale("log")
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("guidance weight w")
    ax1.set_ylabel("fraction of samples improved")
    ax1.set_title("p(c|Y^w) > p(c|Y^0), shared noise")
    ax1.legend(fontsize=8)
    ws = np.array(primary["w"])
    m = -np.array(primary["reciprocal_prob_mean"])
    se = np.array(primary["reciprocal_prob_stderr"])
    ax2.errorbar(ws, m, yerr=2 * se, fmt="o-", ms=4, capsize=2, label="-E[1/p(c|Y^w)]")
    ax2.axhline(-primary["theory_unguided"], color="k", ls=":", label="-1/p(c)")
    ax2.set_xscale("symlog", linthresh=0.01)
    ax2.set_xlim(0, 1.3 * ws[-1])
    ax2.set_xlabel("guidance weight w (0, then log scale)")
    ax2.set_title("minus the average reciprocal probability")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def _plot_samples(path, gmm, samples, improved):
    plt = pyplot()
    ws = [w for w in samples if w > 0]
    show = [ws[0], ws[len(ws) // 2], ws[-1]]
    fig, axes = plt.subplots(1, 1 + len(show), figsize=(3.3 * (1 + len(show)), 3.4))
    n = min(1500, len(samples[0.0]))
    axes[0].scatter(*samples[0.0][:n].T, s=2, alpha=0.5, c="0.3")
    axes[0].set_title("w = 0 (unguided)")
    for ax, w in zip(axes[1:], show, strict=True):
        ys, better = samples[w][:n], improved[w][:n]
        ax.scatter(*ys[better].T, s=2, alpha=0.5, c="tab:blue", label="improved")
        ax.scatter(*ys[~better].T, s=3, alpha=0.8, c="tab:red", label="worse")
        ax.set_title(f"w = {w:.3g}: {np.mean(improved[w]):.2f} improved")
    for ax in axes:
        ax.scatter(*np.asarray(gmm.means).T, marker="x", c="k")
        ax.set_xlim(-5, 5)
        ax.set_ylim(-4, 4)
        ax.set_aspect("equal")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("CFG towards the middle class: red samples got worse than unguided")
    save_figure(fig, path)
