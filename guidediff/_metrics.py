r"""Metrics on populations of samples, with Monte-Carlo standard errors.

Every function here takes samples stacked on a leading particle axis (the output of
`gd.sample`) and reduces over that axis. They fall in two groups:

- **Per-sample averages** (`mean_stderr`, `reciprocal_prob`, `frac_improved`,
  `reward_stats`): a point estimate with its standard error, so that every reported
  number carries its Monte-Carlo uncertainty (PAPER.md 3.3 and 6).
- **Distances between sample sets** (`mmd2`, `energy_distance`, `sliced_wasserstein`)
  and a permutation `two_sample_test` built on the first two.

All of them are pure JAX and jit-compiled; input validation that depends only on
shapes happens at trace time, and checks of values run only when the input is
concrete: `reciprocal_prob` rejects probabilities outside $(0, 1]$, `frac_improved`
rejects NaN, and `mean_stderr`, `reward_stats`, the distances and `two_sample_test`
reject NaN or infinite samples (e.g. the failed particles of `gd.sample`), all with
a `ValueError`. Under `jit`/`vmap` these checks are skipped, and a NaN input gives a
NaN result (the distances and the p-value of `two_sample_test` included), never a
finite, wrong one.
"""

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Real

from ._brownian import threefry_key
from ._custom_types import Key, Scalar


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_inexact(x: ArrayLike) -> Array:
    """A real floating array (integers become the default float); complex values
    are a `TypeError` (the metrics' formulas are for real samples)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"the values must be real, got dtype {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _check_finite(fn: str, **arrays: Array) -> None:
    """`ValueError` if a concrete array holds NaN or inf; tracers are not checked."""
    for name, x in arrays.items():
        if not _is_concrete(x):
            continue
        v = np.asarray(x)
        bad = ~np.isfinite(v)
        if np.any(bad):
            raise ValueError(
                f"{fn} needs finite samples; `{name}` holds {int(np.sum(bad))} "
                f"non-finite value(s) (NaN or inf), e.g. {v[bad].ravel()[0]}. Drop "
                "failed particles first (e.g. `out.ys[~out.failed]` for `gd.sample`)."
            )


def _num_samples(x: Array, name: str, minimum: int) -> int:
    if x.ndim == 0:
        raise ValueError(
            f"`{name}` must have a leading sample axis, got a scalar (shape ())."
        )
    n = x.shape[0]
    if n < minimum:
        raise ValueError(
            f"`{name}` needs at least {minimum} samples on its leading axis, got "
            f"shape {x.shape}."
        )
    return n


# ---------------------------------------------------------------------------------
# Per-sample averages with standard errors.
# ---------------------------------------------------------------------------------


@jax.jit
def _mean_stderr(values: Array) -> tuple[Array, Array]:
    # Unchecked core: NaN or inf in gives NaN or inf out. 16-bit values are reduced
    # in float32 (a float16 sum of squares overflows at modest values).
    if jnp.issubdtype(values.dtype, jnp.floating) and values.dtype.itemsize < 4:
        values = values.astype(jnp.float32)
    n = values.shape[0]
    # Scaled by a power of two when the largest |value| exceeds 2^60 (per element):
    # squared deviations beyond ~1.8e19 overflow float32, and the sum of values
    # near its maximum. A power of two keeps the arithmetic exact (XLA divides by
    # multiplying with the reciprocal, which for a large non-power-of-two scale is
    # rounded or flushed to zero); below 2^60 the values are used as they are. The
    # scale is a constant for differentiation: mean and std are homogeneous.
    big = jnp.max(jnp.abs(values), axis=0, keepdims=True)
    over = (big > 2.0**60) & jnp.isfinite(big)
    exponent = jnp.where(over, jnp.ceil(jnp.log2(jnp.where(over, big, 1.0))) - 60, 0)
    scale = lax.stop_gradient(jnp.ldexp(jnp.ones_like(big), exponent.astype(jnp.int32)))
    scaled = values / scale
    mean = scale[0] * jnp.mean(scaled, axis=0)
    # divided by sqrt(n) before scaling back: the std itself may exceed the
    # dtype's maximum where the standard error does not
    se = scale[0] * (jnp.std(scaled, axis=0, ddof=1) / math.sqrt(n))
    return mean, se  # (a weak Python float: keeps the dtype)


def mean_stderr(values: Real[ArrayLike, "n ..."]) -> tuple[Array, Array]:
    r"""Sample mean and its standard error over the leading axis.

    $$\bar v = \frac1n \sum_{i=1}^n v_i,\qquad
    \mathrm{se}(\bar v) = \frac{s}{\sqrt n},\quad
    s^2 = \frac{1}{n-1}\sum_{i=1}^n (v_i - \bar v)^2 .$$

    **Arguments:**

    - `values`: an array of shape `(n, ...)` with `n >= 2`; the leading axis indexes
      independent samples. Trailing axes are reduced element-wise. The values must
      be finite: a concrete NaN or inf raises `ValueError` (naming how many entries
      are non-finite). Under `jit`/`vmap` no check is possible, and a NaN or inf
      input gives a NaN or inf result.

    **Returns:**

    A tuple `(mean, stderr)`, each of shape `values.shape[1:]`.

    !!! example

        ```python
        mean, se = gd.mean_stderr(jnp.array([1.0, 2.0, 3.0, 4.0]))
        # mean = 2.5, se = sqrt(5/3) / 2
        ```
    """
    values = _as_inexact(values)
    _num_samples(values, "values", 2)
    _check_finite("mean_stderr", values=values)
    return _mean_stderr(values)


@jax.jit
def _reciprocal_prob(probs: Array) -> tuple[Array, Array]:
    # The probabilities were checked; 1/p of a tiny p may overflow to inf, an
    # honest (infinite) average rather than an error. 16-bit probabilities are
    # inverted in float32 (float16's 1/p overflows already at p < 1.5e-5).
    probs = probs.astype(jnp.promote_types(probs.dtype, jnp.float32))
    return _mean_stderr(1.0 / probs)


def reciprocal_prob(probs: Float[ArrayLike, "n ..."]) -> tuple[Array, Array]:
    r"""Average reciprocal classifier probability, the CFG metric of PAPER.md 3.3.

    For samples $Y_1, \dots, Y_n$ of a sampler guided towards class $c$,

    $$R = \frac1n \sum_{i=1}^n \frac{1}{p(c \mid Y_i)},$$

    with the standard error of `mean_stderr`. For an unguided, exact sampler
    $\mathbb E[R] = 1/p(c)$, and Corollary 1 says guidance can only lower it.
    $1/p$ is heavy-tailed: its variance is dominated by rare samples far from class
    $c$, so the *sample* standard error returned here can underestimate the true
    one by a large factor at a few thousand samples (`tests/helpers.py` computes the
    exact one for the tests' mixtures). Where the law is known, compute
    the exact variance, $\mathbb E[1/p^2] = \int p(x)^2 / (p(c)^2 p(x\mid c))\,dx$
    for unguided samples, and use many samples.

    **Arguments:**

    - `probs`: the classifier probabilities $p(c \mid Y_i)$, shape `(n, ...)` with
      `n >= 2`. Each must lie in $(0, 1]$; this is checked (raising `ValueError`)
      when `probs` is concrete, and not under `jit`/`vmap`.

    **Returns:**

    A tuple `(mean, stderr)` of $1/p$.

    !!! example

        ```python
        mean, se = gd.reciprocal_prob(jnp.array([0.5, 0.25, 1.0, 0.5]))
        # mean = (2 + 4 + 1 + 2) / 4 = 2.25
        ```
    """
    probs = _as_inexact(probs)
    _num_samples(probs, "probs", 2)
    if _is_concrete(probs):
        p = np.asarray(probs)
        bad = ~((p > 0) & (p <= 1))  # also catches NaN
        if np.any(bad):
            first = p[bad].ravel()[0]
            raise ValueError(
                "reciprocal_prob needs probabilities in (0, 1]; got "
                f"{int(np.sum(bad))} value(s) outside it (NaN, <= 0 or > 1), "
                f"e.g. {first}."
            )
    return _reciprocal_prob(probs)


@jax.jit
def _frac_improved(p_guided: Array, p_base: Array) -> tuple[Array, Array]:
    n = p_guided.shape[0]
    improved = (p_guided > p_base).astype(jnp.result_type(p_guided, p_base))
    frac = jnp.mean(improved, axis=0)
    # A NaN compares False; never count it as "not improved".
    nan = jnp.any(jnp.isnan(p_guided) | jnp.isnan(p_base), axis=0)
    frac = jnp.where(nan, jnp.nan, frac)
    return frac, jnp.sqrt(frac * (1 - frac) / n)


def frac_improved(
    p_guided: Float[ArrayLike, "n ..."], p_base: Float[ArrayLike, "n ..."]
) -> tuple[Array, Array]:
    r"""Fraction of paired samples whose classifier probability strictly improved.

    With guided and unguided samples drawn from the same noise (shared keys), so that
    sample $i$ of each run forms a pair,

    $$\hat f = \frac1n \sum_{i=1}^n \mathbf 1\{p(c \mid Y^w_i) > p(c \mid Y^0_i)\},
    \qquad \mathrm{se}(\hat f) = \sqrt{\frac{\hat f (1 - \hat f)}{n}}$$

    (binomial standard error). PAPER.md 3.3: guidance lowers the average of
    $1/p$, yet $\hat f$ can be well below one.

    **Arguments:**

    - `p_guided`: probabilities of the guided samples, shape `(n, ...)`.
    - `p_base`: probabilities of the paired baseline samples, the same shape
      (`ValueError` otherwise).

    Only the order of each pair matters, so any strictly increasing function of the
    probabilities gives the same answer and may be passed instead: the experiments
    pass log-odds $\log p - \log(1 - p)$, which do not round to equal values when
    $p$ rounds to 1. The values are therefore not range-checked, but NaN is: a
    concrete NaN in either input raises `ValueError`; under `jit`/`vmap` the check is
    skipped and the `frac` and `stderr` of an element with a NaN in any of its
    pairs are NaN.

    **Returns:**

    A tuple `(frac, stderr)`, each of shape `p_guided.shape[1:]`.

    !!! example

        ```python
        frac, se = gd.frac_improved(jnp.array([0.9, 0.2, 0.6, 0.5]),
                                    jnp.array([0.5, 0.3, 0.6, 0.1]))
        # frac = 0.5 (ties do not count), se = sqrt(0.25 / 4) = 0.25
        ```
    """
    p_guided = _as_inexact(p_guided)
    p_base = _as_inexact(p_base)
    if p_guided.shape != p_base.shape:
        raise ValueError(
            "frac_improved needs paired samples of the same shape, got "
            f"p_guided.shape={p_guided.shape} and p_base.shape={p_base.shape}."
        )
    _num_samples(p_guided, "p_guided", 1)
    for name, v in (("p_guided", p_guided), ("p_base", p_base)):
        if _is_concrete(v) and np.any(np.isnan(np.asarray(v))):
            raise ValueError(
                f"frac_improved got NaN in `{name}` "
                f"({int(np.sum(np.isnan(np.asarray(v))))} value(s)); a NaN pair is "
                "neither improved nor not improved."
            )
    return _frac_improved(p_guided, p_base)


def reward_stats(rewards: Real[ArrayLike, "n ..."]) -> tuple[Array, Array]:
    r"""Average reward of a population of samples, with its standard error.

    $$\bar r = \frac1n \sum_{i=1}^n r(Y_i),\qquad \mathrm{se} = s_r / \sqrt n$$

    with $s_r$ the sample standard deviation (ddof 1). PAPER.md 2.4: $\bar r$ rises
    with the guidance weight $w$.

    **Arguments:**

    - `rewards`: the rewards $r(Y_i)$, shape `(n, ...)` with `n >= 2`. They must be
      finite: a concrete NaN or inf (e.g. the reward of a failed particle) raises
      `ValueError`; under `jit`/`vmap` no check is possible, and the result is then
      NaN or inf.

    **Returns:**

    A tuple `(mean, stderr)`.

    !!! example

        ```python
        samples = jr.normal(jr.key(0), (1000, 2))
        rewards = jnp.exp(samples[:, 0])  # r(x) = exp(x_1), E[r] = exp(1/2)
        mean, se = gd.reward_stats(rewards)
        ```
    """
    rewards = _as_inexact(rewards)
    _num_samples(rewards, "rewards", 2)
    _check_finite("reward_stats", rewards=rewards)
    return _mean_stderr(rewards)


# ---------------------------------------------------------------------------------
# Distances between two sample sets.
#
# Both MMD and the energy distance are computed from one matrix M over the pooled
# sample z = (x, y) and the indicator a of the x-part (b = 1 - a):
#
#   U-statistic = (a'Ma - a'diag(M))/(n(n-1)) + (b'Mb - b'diag(M))/(m(m-1))
#                 - 2 a'Mb/(nm)
#
# with M the kernel matrix (MMD) or minus the distance matrix (energy). The
# permutation test reuses M and only permutes a, so that each permutation costs one
# matrix-vector product, and a batch of them one matrix product.
# ---------------------------------------------------------------------------------


def _pooled(x: ArrayLike, y: ArrayLike) -> tuple[Array, int, int]:
    x = _as_inexact(x)
    y = _as_inexact(y)
    n = _num_samples(x, "x", 2)
    m = _num_samples(y, "y", 2)
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            "x and y must have the same per-sample shape, got "
            f"x.shape={x.shape} and y.shape={y.shape}."
        )
    # At least float32: the U-statistics sum n^2 terms, which overflow (float16)
    # or lose most digits (bfloat16) in a 16-bit accumulator.
    dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    z = jnp.concatenate([x.reshape(n, -1), y.reshape(m, -1)]).astype(dtype)
    return z, n, m


def _sqdist(z: Float[Array, "N d"]) -> Float[Array, "N N"]:
    # Differences, not |a|^2 + |b|^2 - 2ab: no cancellation for close points.
    return jnp.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)


def _safe_sqrt(sq: Array) -> Array:
    # sqrt with a zero (not NaN) gradient at 0, for the zero diagonal. NaN (from a
    # NaN sample) stays NaN: `NaN > 0` is False, so it must not fall to the 0 branch.
    positive = sq > 0
    root = jnp.sqrt(jnp.where(positive, sq, 1))
    return jnp.where(positive, root, jnp.where(jnp.isnan(sq), sq, 0))


def _median_bandwidth(sq: Float[Array, "N N"]) -> Scalar:
    # The median of the N(N-1)/2 distances above the diagonal. The pairs are chosen
    # by an iota mask, not by `np.triu_indices` (constants of O(N^2) indices made
    # the program 128 MB at N = 4000): the other entries are set to +inf, so after
    # sorting the pairs come first, and the median is read off them.
    n = sq.shape[0]
    i = jnp.arange(n)
    upper = i[:, None] < i[None, :]
    d = _safe_sqrt(sq)
    m = n * (n - 1) // 2
    flat = jnp.sort(jnp.where(upper, d, jnp.inf).ravel())
    h = 0.5 * (flat[(m - 1) // 2] + flat[m // 2])
    h = jnp.where(jnp.any(upper & jnp.isnan(d)), jnp.nan, h)  # NaN stays NaN
    # All points equal: any bandwidth gives MMD = 0; avoid 0/0. NaN stays NaN.
    return jnp.where(h == 0, jnp.ones_like(h), h)


def _gaussian_kernel(sq: Array, bandwidth: Array) -> Array:
    return jnp.exp(-sq / (2 * bandwidth**2))


def _u_statistic(M: Float[Array, "N N"], a: Float[Array, " N"], n: int, m: int):
    b = 1 - a
    diag = jnp.diagonal(M)
    Ma = M @ a
    Mb = M @ b
    within_a = (a @ Ma - a @ diag) / (n * (n - 1))
    within_b = (b @ Mb - b @ diag) / (m * (m - 1))
    cross = (a @ Mb) / (n * m)
    return within_a + within_b - 2 * cross


def _indicator(n: int, m: int, dtype) -> Array:
    return jnp.concatenate([jnp.ones(n, dtype), jnp.zeros(m, dtype)])


def _check_bandwidth(bandwidth) -> None:
    if bandwidth is not None and _is_concrete(bandwidth):
        h = np.asarray(bandwidth)
        if h.shape != () or not (h > 0 and np.isfinite(h)):
            raise ValueError(
                f"bandwidth must be a finite positive scalar, got {bandwidth}."
            )


def _mmd_matrix(z: Array, bandwidth) -> Array:
    sq = _sqdist(z)
    if bandwidth is None:
        h = _median_bandwidth(sq)
    else:
        h = jnp.asarray(bandwidth, dtype=z.dtype)
    return _gaussian_kernel(sq, h)


def _energy_matrix(z: Array) -> Array:
    return -_safe_sqrt(_sqdist(z))


@jax.jit
def _mmd2(x, y, bandwidth):
    z, n, m = _pooled(x, y)
    return _u_statistic(_mmd_matrix(z, bandwidth), _indicator(n, m, z.dtype), n, m)


def mmd2(
    x: Float[ArrayLike, "n ..."],
    y: Float[ArrayLike, "m ..."],
    bandwidth: Float[ArrayLike, ""] | None = None,
) -> Scalar:
    r"""Unbiased estimate of the squared maximum mean discrepancy (Gaussian kernel).

    With $k(a, b) = \exp\!\big(-\|a - b\|^2 / (2h^2)\big)$ and samples
    $x_1..x_n \sim P$, $y_1..y_m \sim Q$ (each flattened to a vector), the
    U-statistic

    $$\widehat{\mathrm{MMD}}^2_u = \frac{1}{n(n-1)}\sum_{i \ne j} k(x_i, x_j)
    + \frac{1}{m(m-1)}\sum_{i \ne j} k(y_i, y_j)
    - \frac{2}{nm}\sum_{i, j} k(x_i, y_j)$$

    is an unbiased estimate of $\mathrm{MMD}^2(P, Q)$; it is zero in expectation
    when $P = Q$ and can then be slightly negative.

    **Arguments:**

    - `x`: samples of shape `(n, ...)`, `n >= 2`.
    - `y`: samples of shape `(m, ...)`, `m >= 2`, with the same trailing shape.
      `x` and `y` must be finite: a concrete NaN or inf raises `ValueError`; under
      `jit`/`vmap` a NaN gives a NaN estimate.
    - `bandwidth`: the kernel bandwidth $h > 0$. Defaults to the **median
      heuristic**: $h$ = the median of the Euclidean distances
      $\|z_i - z_j\|$, $i < j$, over the pooled sample $z = (x, y)$ (or 1 if
      they are all zero). This data-dependent $h$ is a symmetric function of the
      pooled sample, so the estimate stays unbiased (zero-mean) under $P = Q$.

    **Returns:**

    The scalar estimate.

    !!! example

        ```python
        kx, ky = jr.split(jr.key(0))
        x = jr.normal(kx, (200, 2))
        y = jr.normal(ky, (200, 2)) + jnp.array([[1.0, 0.0]])
        gd.mmd2(x, y)  # clearly positive; ~0 without the shift
        ```
    """
    _check_bandwidth(bandwidth)
    _check_finite("mmd2", x=x, y=y)
    return _mmd2(x, y, bandwidth)


@jax.jit
def _energy_distance(x, y):
    z, n, m = _pooled(x, y)
    return _u_statistic(_energy_matrix(z), _indicator(n, m, z.dtype), n, m)


def energy_distance(
    x: Float[ArrayLike, "n ..."], y: Float[ArrayLike, "m ..."]
) -> Scalar:
    r"""Unbiased estimate of the energy distance between two sample sets.

    $$\mathcal E(P, Q) = 2\,\mathbb E\|X - Y\| - \mathbb E\|X - X'\|
    - \mathbb E\|Y - Y'\|,$$

    estimated with the cross term averaged over all $nm$ pairs and the within terms
    as U-statistics (over pairs $i \ne j$, normalised by $n(n-1)$ and $m(m-1)$), so
    the estimate is unbiased, zero in expectation when $P = Q$, and can then be
    slightly negative. Samples are flattened to vectors; $\|\cdot\|$ is Euclidean.
    Note that this is the *squared* form: `scipy.stats.energy_distance` returns the
    square root of the biased (V-statistic) version.

    **Arguments:**

    - `x`: samples of shape `(n, ...)`, `n >= 2`.
    - `y`: samples of shape `(m, ...)`, `m >= 2`, with the same trailing shape.
      `x` and `y` must be finite: a concrete NaN or inf raises `ValueError`; under
      `jit`/`vmap` a NaN gives a NaN estimate.

    **Returns:**

    The scalar estimate.

    !!! example

        ```python
        kx, ky = jr.split(jr.key(0))
        x = jr.normal(kx, (200, 2))
        y = jr.normal(ky, (200, 2)) + jnp.array([[1.0, 0.0]])
        gd.energy_distance(x, y)  # clearly positive; ~0 without the shift
        ```
    """
    _check_finite("energy_distance", x=x, y=y)
    return _energy_distance(x, y)


def _quantile_coupling(n: int, m: int):
    """Exact monotone coupling of two empirical measures of sizes n and m.

    Quantile levels u in (0, 1] are cut at every k/n and l/m; on each piece the
    quantile functions are constant, equal to the i-th and j-th order statistics.
    Integer arithmetic on the scale n*m keeps the cuts exact.
    """
    cuts = np.union1d(np.arange(1, n + 1) * m, np.arange(1, m + 1) * n)
    weights = np.diff(cuts, prepend=0) / (n * m)
    i = (cuts - 1) // m
    j = (cuts - 1) // n
    return weights, i, j


@functools.partial(jax.jit, static_argnames=("num_projections",))
def _sliced_wasserstein(x, y, key, num_projections):
    z, n, m = _pooled(x, y)
    d = z.shape[1]
    directions = jr.normal(key, (num_projections, d), dtype=z.dtype)
    directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
    proj = z @ directions.T  # (n + m, L)
    px = jnp.sort(proj[:n], axis=0)
    py = jnp.sort(proj[n:], axis=0)
    if n == m:
        w2 = jnp.mean((px - py) ** 2, axis=0)
    else:
        weights, i, j = _quantile_coupling(n, m)
        weights = jnp.asarray(weights, dtype=z.dtype)
        w2 = weights @ ((px[i] - py[j]) ** 2)
    return jnp.mean(w2)


def sliced_wasserstein(
    x: Float[ArrayLike, "n ..."],
    y: Float[ArrayLike, "m ..."],
    *,
    key: Key,
    num_projections: int = 128,
) -> Scalar:
    r"""Sliced squared 2-Wasserstein distance, by Monte Carlo over directions.

    $$\mathrm{SW}_2^2(P, Q) = \mathbb E_{\theta \sim \mathrm{Unif}(S^{d-1})}
    \Big[ W_2^2\big(\theta_\# P, \theta_\# Q\big) \Big]
    \approx \frac1L \sum_{l=1}^L \int_0^1
    \big(F^{-1}_{\theta_l \cdot x}(u) - F^{-1}_{\theta_l \cdot y}(u)\big)^2\,du,$$

    the **squared** $W_2$ (not $W_1$, not $W_2$) between the empirical laws of the
    projections $\theta_l \cdot x_i$ and $\theta_l \cdot y_j$, averaged over $L$
    directions drawn uniformly on the unit sphere. Each 1-D term is exact for the
    two empirical measures: with equal sizes it is the mean squared difference of
    the sorted projections, and unequal sizes $n \ne m$ are handled exactly by
    integrating the two empirical quantile functions (step functions) over the
    union of their breakpoints $k/n$, $l/m$. In 1-D the directions are $\pm 1$ and
    the result is the exact $W_2^2$ of the two samples.

    **Arguments:**

    - `x`: samples of shape `(n, ...)`, `n >= 2`, flattened to vectors.
    - `y`: samples of shape `(m, ...)`, `m >= 2`, with the same trailing shape.
      `x` and `y` must be finite: a concrete NaN or inf raises `ValueError`; under
      `jit`/`vmap` a NaN gives a NaN estimate.
    - `key`: PRNG key for the directions.
    - `num_projections`: the number $L$ of directions.

    **Returns:**

    The scalar estimate of $\mathrm{SW}_2^2$.

    !!! example

        ```python
        kx, ky, kp = jr.split(jr.key(0), 3)
        x = jr.normal(kx, (500, 2))
        y = jr.normal(ky, (500, 2)) + jnp.array([[2.0, 0.0]])
        gd.sliced_wasserstein(x, y, key=kp)  # ~ 2.0**2 / 2 = 2
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    num_projections = _static_count("num_projections", num_projections)
    _check_finite("sliced_wasserstein", x=x, y=y)
    return _sliced_wasserstein(x, y, key, num_projections)


def _static_count(name: str, value) -> int:
    """A count that shapes the compiled program, as a Python int: NumPy's `200` and
    Python's `200` hash alike but not as static arguments of `jax.jit` (their
    types differ), which compiled the program again."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


# ---------------------------------------------------------------------------------
# Permutation two-sample test.
# ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("statistic", "num_permutations"))
def _two_sample_test(x, y, key, bandwidth, statistic, num_permutations):
    z, n, m = _pooled(x, y)
    if statistic == "energy":
        M = _energy_matrix(z)
    else:
        M = _mmd_matrix(z, bandwidth)
    a = _indicator(n, m, z.dtype)
    keys = jr.split(key, num_permutations)
    perms = jax.vmap(lambda k: jr.permutation(k, a))(keys)  # (P, N)
    # The observed split goes through the same batched product as the permutations,
    # and ties count within rounding: a permutation that reproduces the observed
    # split (or, for n = m, its mirror) gives the same statistic summed in another
    # order, a few ulps off; dropping such ties made p fall below its level.
    every = jax.vmap(lambda s: _u_statistic(M, s, n, m))(
        jnp.concatenate([a[None], perms])
    )
    observed, stats = every[0], every[1:]
    # A permutation that gives the observed split, or for n = m its mirror, is a
    # tie exactly (found by comparing the splits, not the statistics). Other ties
    # (equal statistics of other splits, e.g. of duplicated points) count within
    # the statistic's rounding: a few ulps of its terms, each a weighted mean of M's
    # entries, about 4 mean|M| (not the largest entry: one far-off sample made
    # max|M| exceed the statistic itself, and every permutation tied, p = 1). A
    # window of 100 ulps, measured rounding being under one, counted permutations
    # well below the observed value as ties in float32 (their spread shrinks like
    # 1/n): p was 0.47 for an exact 0.40 at n = m = 3000.
    same = jnp.all(perms == a[None], axis=1)
    if n == m:
        same = same | jnp.all(perms == 1 - a[None], axis=1)
    scale = 4 * jnp.mean(jnp.abs(M))
    tol = 8 * jnp.finfo(z.dtype).eps * jnp.maximum(jnp.abs(observed), scale)
    exceed = jnp.sum(same | (stats >= observed - tol))
    p_value = ((1 + exceed) / (1 + num_permutations)).astype(z.dtype)
    # `stats >= NaN` is False: a NaN statistic would give the smallest p-value.
    nan = jnp.isnan(observed) | jnp.any(jnp.isnan(stats))
    return observed, jnp.where(nan, jnp.nan, p_value)


def two_sample_test(
    x: Float[ArrayLike, "n ..."],
    y: Float[ArrayLike, "m ..."],
    *,
    key: Key,
    statistic: Literal["energy", "mmd"] = "energy",
    num_permutations: int = 200,
    bandwidth: Float[ArrayLike, ""] | None = None,
) -> tuple[Scalar, Scalar]:
    r"""Permutation test of $H_0: P = Q$ from samples $x \sim P$, $y \sim Q$.

    The statistic $T$ (`energy_distance` or `mmd2`) is computed on the observed
    split and on `num_permutations` random re-splits of the pooled sample into
    groups of sizes $n$ and $m$, and

    $$p = \frac{1 + \#\{b : T_b \ge T_{\mathrm{obs}}\}}{1 + B},$$

    which is a valid p-value ($\Pr_{H_0}(p \le \alpha) \le \alpha$) for any $B$
    (ties count as exceeding: a permutation giving the observed split, or for
    $n = m$ its mirror, exactly; other $T_b$ within a few ulps of $T_{\mathrm{obs}}$).
    In float32 the statistics resolve differences down to about $10^{-7}$ of their
    terms' size, while their permutation spread shrinks like $1/n$: for samples in
    the tens of thousands enable `jax_enable_x64` and pass float64 samples.
    The smallest attainable value is $1/(1 + B)$. Permutations are vmapped: the
    pairwise matrix is built once and each permutation costs one matrix-vector
    product.

    **Arguments:**

    - `x`: samples of shape `(n, ...)`, `n >= 2`.
    - `y`: samples of shape `(m, ...)`, `m >= 2`, with the same trailing shape.
      `x` and `y` must be finite: a concrete NaN or inf raises `ValueError`; under
      `jit`/`vmap` a NaN gives a NaN statistic and a NaN p-value.
    - `key`: PRNG key for the permutations.
    - `statistic`: `"energy"` (default) or `"mmd"`.
    - `num_permutations`: the number $B$ of random permutations.
    - `bandwidth`: kernel bandwidth for `"mmd"` (default: the median heuristic of
      `mmd2`, which is permutation-invariant). Not used by `"energy"`, but checked
      (a finite positive scalar) whatever the statistic.

    **Returns:**

    A tuple `(stat, p_value)`.

    !!! example

        ```python
        kx, ky, kt = jr.split(jr.key(0), 3)
        x = jr.normal(kx, (50, 2))
        y = jr.normal(ky, (50, 2)) + 1.5
        stat, p = gd.two_sample_test(x, y, key=kt)  # p = 1/201
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    if statistic not in ("energy", "mmd"):
        raise ValueError(f"statistic must be 'energy' or 'mmd', got {statistic!r}.")
    num_permutations = _static_count("num_permutations", num_permutations)
    _check_bandwidth(bandwidth)
    _check_finite("two_sample_test", x=x, y=y)
    return _two_sample_test(x, y, key, bandwidth, statistic, num_permutations)
