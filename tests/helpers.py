"""Shared test helpers: Monte-Carlo tolerances and standard oracles."""

import jax.numpy as jnp
import numpy as np

import guidediff as gd


def three_class_gmm() -> gd.GaussianMixture:
    """A 2-D, 3-class mixture; class 0 is bimodal (guidance is not uniform there)."""
    return gd.GaussianMixture(
        weights=[0.2, 0.15, 0.3, 0.35],
        means=[[-3.0, 0.0], [1.5, 2.0], [3.0, -0.5], [0.0, -3.0]],
        covs=[
            [[0.6, 0.2], [0.2, 0.4]],
            [[0.3, 0.0], [0.0, 0.3]],
            [[0.5, -0.1], [-0.1, 0.5]],
            [[0.4, 0.0], [0.0, 0.7]],
        ],
        labels=[0, 0, 1, 2],
    )


def paper_1d_gmm() -> gd.GaussianMixture:
    """PAPER.md 6.4's non-uniform-improvement case: class 0 is a mixture at -3 and 1,
    class 1 sits at 2.5, all variances 0.5. Equal variances keep Var[1/p(c|X)]
    finite, so Monte-Carlo standard errors of E[1/p] are meaningful."""
    return gd.GaussianMixture(
        weights=[0.25, 0.25, 0.5],
        means=[[-3.0], [1.0], [2.5]],
        covs=[0.5, 0.5, 0.5],
        labels=[0, 0, 1],
    )


def reciprocal_prob_moment2(
    gmm: gd.GaussianMixture, label: int, half_width=12.0, n=801
) -> float:
    """The exact second moment E[1/p(c|X)^2] for X ~ p(x|c), by quadrature on a grid
    (1-D or 2-D mixtures): int p(x|c) / p(c|x)^2 dx = int p(x)^2 / (p(c)^2 p(x|c)) dx.
    """
    import jax

    d = gmm.dim
    axis = np.linspace(-half_width, half_width, n)
    grid = np.stack(np.meshgrid(*([axis] * d), indexing="ij"), -1).reshape(-1, d)
    log_p = jax.vmap(gmm.log_prob)(jnp.asarray(grid))
    log_pc = jnp.log(gmm.class_prob(label))
    log_cond = jax.vmap(lambda x: gmm.log_prob(x, label))(jnp.asarray(grid))
    cell = (axis[1] - axis[0]) ** d
    return float(jnp.sum(jnp.exp(2 * log_p - 2 * log_pc - log_cond)) * cell)


def reciprocal_prob_sd(gmm: gd.GaussianMixture, label: int, **quadrature) -> float:
    """The exact standard deviation of 1/p(c|X) for X ~ p(x|c) (unguided), by
    quadrature.

    E[1/p(c|X)] = 1/p(c) exactly, but the statistic is heavy-tailed: rare samples
    far from class c have huge 1/p, so the *sample* standard error of its mean
    underestimates the true one badly at a few thousand samples. Tests of the
    unguided value use this exact one instead.
    """
    first = 1.0 / float(gmm.class_prob(label))
    return float(np.sqrt(reciprocal_prob_moment2(gmm, label, **quadrature) - first**2))


def guided_reciprocal_prob_se(gmm: gd.GaussianMixture, label: int, n: int) -> float:
    """A standard error for the mean of 1/p(c|Y) over n guided samples Y, w > 0,
    that does not trust the sample's own spread (the heavy right tail makes the
    sample standard error unreliable: the rare samples that set it are the ones
    a finite sample misses).

    It is sqrt(E_0[1/p^2] / n), the unguided second moment, exact by quadrature.
    For the exactly tilted law q_w(x) ~ p(x|c) p(c|x)^w, which guidance aims at,
    it bounds the variance: with P = p(c|X), X ~ p(x|c),
    E_{q_w}[P^-2] = E_0[P^(w-2)] / E_0[P^w] <= E_0[P^-2], because P^-2 falls and
    P^w rises in P, so they are negatively correlated (Chebyshev's association
    inequality). CFG's sampled law is not exactly q_w, but pulls samples towards
    the class alike, so its tail is no heavier than the unguided one.
    """
    return float(np.sqrt(reciprocal_prob_moment2(gmm, label) / n))


def two_sample_z(a, b) -> float:
    """z-score of mean(a) - mean(b) for independent samples."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    return float((a.mean() - b.mean()) / se)


def component_stats(gmm: gd.GaussianMixture, x) -> dict:
    """Per component k (assigned by the clean posterior's argmax): indicator of
    membership, and coordinates of the members (for mean and variance)."""
    import jax

    logn, _ = jax.vmap(
        lambda xi: gmm._component_terms(xi, jnp.ones(()), jnp.zeros(()))
    )(x)
    assign = np.asarray(jnp.argmax(gmm.log_weights[None] + logn, axis=-1))
    x = np.asarray(x)
    return {k: (assign == k, x[assign == k]) for k in range(gmm.means.shape[0])}


def assert_matches_mixture(gmm, samples, key, *, alpha=1e-3, ref_factor=100):
    """Per-component mass, mean and variance of `samples` agree with exact draws.

    The exact reference has `ref_factor` times as many draws (at most 2e6), so its
    own error barely widens the bands (by sqrt(1 + 1/ref_factor)), and every check
    is a two-sample z-test at the Bonferroni level for the family: |z| below the
    normal quantile of 1 - alpha / (2 * number of checks) (about 4.1 for 4
    components in 2-D at alpha = 1e-3). At N = 4000 a 10 % error in the score's scale
    fails it (|z| 4.1-6.4 over three seeds; 5 % passes), which a 4-SE band against
    an equally small reference missed."""
    from scipy.stats import norm

    n_ref = min(ref_factor * samples.shape[0], 2_000_000)
    exact = gmm.sample(key, n_ref)
    s_stats, e_stats = component_stats(gmm, samples), component_stats(gmm, exact)
    num_checks = len(s_stats) * (1 + 2 * samples.shape[1])
    z_max = float(norm.ppf(1 - alpha / (2 * num_checks)))
    for k in s_stats:
        (s_in, s_x), (e_in, e_x) = s_stats[k], e_stats[k]
        z = two_sample_z(s_in.astype(float), e_in.astype(float))
        assert abs(z) < z_max, f"component {k} mass: z={z:.2f}"
        for j in range(samples.shape[1]):
            z = two_sample_z(s_x[:, j], e_x[:, j])
            assert abs(z) < z_max, f"component {k} mean[{j}]: z={z:.2f}"
            # variance: compare squared deviations about each set's own mean
            sd = (s_x[:, j] - s_x[:, j].mean()) ** 2
            ed = (e_x[:, j] - e_x[:, j].mean()) ** 2
            z = two_sample_z(sd, ed)
            assert abs(z) < z_max, f"component {k} var[{j}]: z={z:.2f}"
