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


def assert_matches_mixture(gmm, samples, exact, *, z_max=4.0):
    """Per-component mass, mean and variance of `samples` agree with `exact` draws
    within `z_max` two-sample standard errors."""
    s_stats, e_stats = component_stats(gmm, samples), component_stats(gmm, exact)
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
