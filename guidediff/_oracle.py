r"""Exact oracles: distributions whose time-$t$ scores are known in closed form.

Under any SDE of `guidediff._sde` the time-$t$ marginal of a Gaussian mixture
$\sum_k \pi_k\mathcal N(\mu_k, \Sigma_k)$ is again a Gaussian mixture,

$$p_t = \sum_k \pi_k\,\mathcal N\big(\alpha(t)\mu_k,\ \alpha(t)^2\Sigma_k + \sigma(t)^2 I\big),$$

so its score, its class posterior $p_t(c \mid x)$ and its reward tilts are exact.
Tests, experiments and benchmarks lean on these oracles.
"""

import math
import operator

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._brownian import threefry_key
from ._custom_types import Args, Key, Scalar, Time
from ._score import AbstractScore
from ._sde import AbstractSDE


def _num_draws(n) -> int:
    """The number of draws of an oracle's `sample`: a static int >= 0."""
    try:
        if isinstance(n, bool) or isinstance(n, jax.core.Tracer):
            raise TypeError
        n = operator.index(n)  # ints, NumPy and concrete JAX integers
    except TypeError:
        raise TypeError(
            f"n, the number of draws, must be an int (static under jax.jit), got {n!r}"
        ) from None
    if n < 0:
        raise ValueError(f"n, the number of draws, must be >= 0, got {n}")
    return int(n)


def _state_dtype(x) -> jnp.dtype:
    """`x`'s floating dtype (float32 stays float32 under x64), else the default."""
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.inexact) else jnp.result_type(float)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _particle(x) -> Array:
    """One particle as an array; integer points are read as floats (the mixture's
    variances and means must not be cast to an integer dtype)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _check_point(x: Array, shape: tuple[int, ...], what: str) -> None:
    """One particle of the law's dimension (static shapes: free under `jit`). A
    batch, or a point of another dimension, would broadcast into a wrong value."""
    if x.shape != tuple(shape):
        size = int(np.prod(shape))
        if x.ndim > 1 and x.size == size:  # e.g. an (8, 8, 1) image of a (64,) law
            hint = (
                f"its {x.size} entries match the law's dimension: flatten the "
                "particle (sample with shape "
                f"{tuple(shape)} and reshape the samples afterwards)"
            )
        else:
            hint = "for a batch of particles use jax.vmap"
        raise ValueError(
            f"{what} takes one particle of shape {tuple(shape)}, got shape "
            f"{x.shape}; {hint}"
        )


def _check_label(label: Array, num_classes: int, *, allow_null: bool) -> Array:
    """Clear error for a label outside [0, num_classes) (or == num_classes if null)
    or that is not one integer (a vector of labels would broadcast against the
    components)."""
    if label is None:
        null = (
            f", or the null label {num_classes} for unconditional" if allow_null else ""
        )
        raise TypeError(
            f"this score is class-conditional: pass the class label as args= "
            f"(0..{num_classes - 1}{null})"
        )
    concrete = _is_concrete(label)
    if concrete:
        label = np.asarray(label)  # checked before any tracing can stage it
    else:
        label = jnp.asarray(label)
    hi = num_classes if allow_null else num_classes - 1
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise TypeError(f"class labels must be integers, got dtype {label.dtype}")
    if label.ndim != 0:
        raise ValueError(
            f"a class label must be one integer (shared by all particles of a "
            f"sample), got shape {label.shape}; for per-particle labels vmap over them"
        )
    if concrete:
        lv = label
        if np.any((lv < 0) | (lv > hi)):
            raise ValueError(
                f"unknown class label {lv.tolist()}: this mixture has classes "
                f"0..{num_classes - 1}"
                + (
                    f" and the null (unconditional) label {num_classes}"
                    if allow_null
                    else ""
                )
            )
        return label
    return label


def _poison_unknown(value: Array, label: Array, num_classes: int, allow_null: bool):
    """NaN where a traced label is unknown. Concrete labels were already rejected with
    a ValueError; inside a compiled solve a raising check would cost a device-to-host
    sync per step on GPUs, so bad labels make the particles fail (flagged by
    `gd.sample`) instead."""
    if _is_concrete(label):
        return value
    hi = num_classes if allow_null else num_classes - 1
    return jnp.where((label < 0) | (label > hi), jnp.nan, value)


class GaussianMixture(eqx.Module):
    r"""A Gaussian mixture $\sum_k \pi_k \mathcal N(\mu_k, \Sigma_k)$ with class labels.

    Component $k$ belongs to class `labels[k]`; the class-conditional law $p(x\mid c)$
    is the mixture restricted to the components of class $c$.

    **Arguments:**

    - `weights`: $(K,)$ finite non-negative mixture weights (normalised here).
    - `means`: $(K, d)$, finite.
    - `covs`: $(K, d, d)$ finite, symmetric (up to rounding) positive definite, or
      $(K,)$ / $(K, d)$ for isotropic / diagonal covariances (a $(K, d)$ array is
      always per-component variances, also when $K = d$: a matrix shared by all
      components must be repeated to $(K, d, d)$). Full matrices are
      diagonalised with `eigh`, whose gradient is NaN where eigenvalues repeat
      (e.g. `jnp.eye(d)`): to differentiate with respect to a diagonal or
      isotropic covariance, pass it as $(K, d)$ or $(K,)$. Covariances given that
      way are kept diagonal (`gmm.diagonal` is True): the scores then need no
      rotation into an eigenbasis, the cheapest exact score.
    - `labels`: $(K,)$ integer class of each component (default: component index).
      A class in `0..num_classes-1` may have no component, or only components of
      weight 0 (as in `conditional`'s result); its $p(c)$ and $p_t(c \mid x)$ are
      0 and its conditional law is undefined, so asking for it raises a
      `ValueError`.

    !!! example

        ```python
        gmm = gd.GaussianMixture(
            weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]], covs=[1.0, 1.0]
        )
        score = gmm.score(gd.VPSDE())          # exact score of p_t
        s = score(0.5, jnp.zeros(2))
        ```
    """

    log_weights: Float[Array, " K"]
    means: Float[Array, "K d"]
    evals: Float[Array, "K d"]
    evecs: Float[Array, "K d d"]
    labels: Int[Array, " K"]
    num_classes: int = eqx.field(static=True)
    # Diagonal covariances: `evecs` is the identity and the scores skip the rotation.
    diagonal: bool = eqx.field(static=True)

    def __init__(
        self, weights, means, covs, labels=None, num_classes: int | None = None
    ):
        dtype = jnp.result_type(float)
        _check_representable("weights", weights, dtype, positive=False)
        if np.ndim(covs) == 3:
            # full matrices: the variances must fit; an off-diagonal entry below
            # the smallest normal number is a harmless (near-)zero covariance
            _check_representable("covs", covs, dtype, positive=True, diagonal=True)
            _check_representable("covs", covs, dtype, positive=False, underflow=False)
        else:
            _check_representable("covs", covs, dtype, positive=True)
        given_covs = None  # full matrices as given, in float64, for the rank check
        if _is_concrete(covs) and np.ndim(covs) == 3:
            given_covs = np.asarray(covs, np.float64)
        means = jnp.asarray(means, dtype)
        if means.ndim != 2 or 0 in means.shape:
            raise ValueError(
                f"means must have shape (K, d) with K, d >= 1, got {means.shape}"
            )
        K, d = means.shape
        if _is_concrete(means) and not np.all(np.isfinite(np.asarray(means))):
            raise ValueError("mixture means must be finite")
        weights = jnp.asarray(weights, dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},), got {weights.shape}")
        if _is_concrete(weights):
            w = np.asarray(weights)
            if np.any(~np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
                raise ValueError(
                    "mixture weights must be finite, non-negative and not all zero"
                )
        covs = jnp.asarray(covs, dtype)
        # Diagonal covariances are their own eigendecomposition: no eigh, whose
        # gradient is NaN at repeated eigenvalues (every isotropic covariance).
        diag = None
        if covs.shape == (K,):
            diag = jnp.broadcast_to(covs[:, None], (K, d))
        elif covs.shape == (K, d):
            diag = covs
        if diag is not None:
            covs = jax.vmap(jnp.diag)(diag)
        elif covs.shape != (K, d, d):
            raise ValueError(
                f"covs must be (K,), (K, d) or (K, d, d); got {covs.shape}"
            )
        if _is_concrete(covs):
            c = np.asarray(covs)
            if not np.all(np.isfinite(c)):
                raise ValueError("mixture covariances must be finite")
            # entry by entry against sqrt(C_ii C_jj): a large variance elsewhere
            # must not hide an asymmetric block of small ones
            v = np.abs(np.diagonal(c, axis1=-2, axis2=-1))
            scale = np.sqrt(v[:, :, None] * v[:, None, :])
            excess = np.abs(c - c.swapaxes(-1, -2)) - 1e-5 * scale
            asym = np.max(np.abs(c - c.swapaxes(-1, -2)), axis=(-2, -1))
            bad = np.flatnonzero(np.max(excess, axis=(-2, -1)) > 0)
            if bad.size:
                raise ValueError(
                    f"covariance {int(bad[0])} is not symmetric (max |C - C^T| = "
                    f"{asym[bad[0]]:.3g}); pass a symmetric matrix, e.g. (C + C.T) / 2"
                )
        if diag is None:
            evals, evecs = jnp.linalg.eigh(covs)
        else:
            evals = diag
            evecs = jnp.broadcast_to(jnp.eye(d, dtype=dtype), (K, d, d))
        if _is_concrete(evals) and np.any(np.asarray(evals) <= 0):
            hint = ""
            if diag is not None and K == d:
                hint = (
                    f" (covs of shape ({K}, {d}) are read as one diagonal per "
                    f"component; for a full covariance matrix pass ({K}, {d}, {d}))"
                )
            raise ValueError(
                "every covariance must be positive definite (variances > 0)" + hint
            )
        if diag is None and given_covs is not None:
            # A singular matrix's zero eigenvalues come out of a float32 eigh as
            # rounding noise of either sign, accepted or not by chance: judged on
            # the matrices as given, in float64.
            ev = np.linalg.eigvalsh(0.5 * (given_covs + given_covs.swapaxes(-1, -2)))
            floor = d * np.finfo(np.float64).eps * np.abs(ev).max(axis=-1)
            bad = np.flatnonzero(ev.min(axis=-1) <= floor)
            if bad.size:
                raise ValueError(
                    f"covariance {int(bad[0])} is singular (eigenvalues "
                    f"{ev[bad[0]].min():.3g} to {ev[bad[0]].max():.3g}): every "
                    "covariance must be positive definite"
                )
        if labels is None:
            labels = np.arange(K)
        # Concrete labels stay numpy while checked: any jnp op on them would be
        # traced inside jax.jit.
        if _is_concrete(labels):
            labels = np.asarray(labels)
        else:
            labels = jnp.asarray(labels)
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(
                f"component labels must be integers, got dtype {labels.dtype}"
            )
        if labels.shape != (K,):
            raise ValueError(f"labels must have shape ({K},), got {labels.shape}")
        if num_classes is not None and (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int | np.integer)
            or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not _is_concrete(labels):
            if num_classes is None:
                raise ValueError(
                    "traced component labels (e.g. under jax.jit) need num_classes="
                )
        else:
            # Checked on the values given (e.g. int64), before the cast to int32
            # would wrap a label like 2**32 + 1 into a valid one.
            lv = np.asarray(labels)
            inferred = num_classes is None
            if inferred:
                num_classes = int(np.max(lv)) + 1
            if np.any(lv < 0) or np.any(lv >= num_classes):
                raise ValueError(
                    f"labels must lie in 0..{num_classes - 1}, got {lv.tolist()}"
                )
            imax = int(np.iinfo(np.int32).max)
            if num_classes > imax:
                raise ValueError(
                    f"num_classes={num_classes}"
                    + (" (1 + the largest label)" if inferred else "")
                    + f" is too large: class labels and the null label num_classes "
                    f"are int32, so num_classes must be at most {imax}; got labels "
                    f"{lv.tolist()}"
                )
        labels = jnp.asarray(labels.astype(np.int32))  # in range: no wrap-around
        log_w = jnp.log(weights)  # normalised in logs: a sum of huge weights overflows
        self.log_weights = log_w - jax.nn.logsumexp(log_w)
        self.means = means
        self.evals = evals
        self.evecs = evecs
        self.labels = labels
        self.num_classes = int(num_classes)
        self.diagonal = diag is not None

    # -- basic properties ---------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> Float[Array, " K"]:
        return jnp.exp(self.log_weights)

    @property
    def covs(self) -> Float[Array, "K d d"]:
        return jnp.einsum("kij,kj,klj->kil", self.evecs, self.evals, self.evecs)

    @property
    def null_label(self) -> int:
        """The label meaning "no class" (the unconditional law): `num_classes`."""
        return self.num_classes

    def _check_class(self, label, *, allow_null: bool) -> Array:
        """`_check_label`, and for a concrete label also that its class has a
        component: the conditional law of an empty class is undefined."""
        label = _check_label(label, self.num_classes, allow_null=allow_null)
        if _is_concrete(label) and _is_concrete(self.labels):
            present = np.asarray(self.labels)
            if _is_concrete(self.log_weights):  # a class of zero-weight components
                present = present[np.asarray(self.log_weights) > -np.inf]
            lv = np.asarray(label)
            missing = ~np.isin(lv, present)
            if allow_null:
                missing &= lv != self.num_classes
            if np.any(missing):
                gone = np.unique(lv[missing]).tolist()
                which = (
                    f"class {gone[0]} has" if len(gone) == 1 else f"classes {gone} have"
                )
                raise ValueError(
                    f"{which} no component in this mixture (labels of the "
                    f"components with weight > 0: {np.unique(present).tolist()}): "
                    "the conditional law p(x | c) is undefined"
                )
        return label

    def class_prob(self, c) -> Scalar:
        """$p(c) = \\sum_{k: \\text{label}_k = c}\\pi_k$."""
        c = _check_label(c, self.num_classes, allow_null=False)
        return jnp.sum(jnp.where(self.labels == c, self.weights, 0.0))

    def mean(self) -> Float[Array, " d"]:
        return self.weights @ self.means

    def cov(self) -> Float[Array, "d d"]:
        # centred: E[x x^T] - m m^T cancels (to a negative variance, with means
        # far from 0 and small covariances)
        dev = self.means - self.mean()[None, :]
        return jnp.einsum("k,kij->ij", self.weights, self.covs) + jnp.einsum(
            "k,ki,kj->ij", self.weights, dev, dev
        )

    # -- time-t densities and scores -------------------------------------------------

    def _component_terms(self, x: Array, alpha, sigma):
        """Per-component log N_t(x) and score, for one particle x of shape (d,), in
        at least float32: for 16-bit particles a squared distance overflows float16
        (a coordinate of 256 at a VE SDE's large times) and bfloat16 keeps 8 bits
        of a log-density."""
        _check_point(x, (self.dim,), "the mixture")
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        x = x.astype(dtype)
        v = (alpha**2 * self.evals + sigma**2).astype(dtype)  # (K, d)
        diff = x[None, :] - alpha.astype(dtype) * self.means.astype(dtype)  # (K, d)
        proj = self._rotate(diff, transpose=True)  # U^T diff
        logn = -0.5 * jnp.sum(
            proj**2 / v + jnp.log(v), axis=-1
        ) - 0.5 * self.dim * math.log(2 * math.pi)
        scores = -self._rotate(proj / v, transpose=False)
        return logn, scores

    def _rotate(self, vecs: Array, *, transpose: bool) -> Array:
        """`U_k^T v_k` (`transpose`) or `U_k v_k` for each component's eigenbasis
        `U_k`. Diagonal covariances need no rotation (and no matmul: a batched
        matmul of tiny blocks is a kernel of its own on a GPU, launched at every
        step of a sampler)."""
        if self.diagonal:
            return vecs
        evecs = self.evecs.astype(vecs.dtype)
        if transpose:
            return jnp.einsum("kij,ki->kj", evecs, vecs)
        return jnp.einsum("kij,kj->ki", evecs, vecs)

    def _log_resp(self, logn: Array, label=None) -> Array:
        logits = self.log_weights.astype(logn.dtype) + logn
        if label is not None:
            keep = (self.labels == label) | (label == self.num_classes)
            logits = jnp.where(keep, logits, -jnp.inf)
        return logits

    def log_prob_t(
        self, sde: AbstractSDE | None, t: Time, x: Array, label=None
    ) -> Scalar:
        """$\\log p_t(x)$ (or $\\log p_t(x\\mid c)$ given `label`); `sde=None` means t=0.

        `label == null_label` gives the unconditional density.
        """
        x = _particle(x)
        if sde is not None:
            sde.check_time(t)
        if label is not None:
            label = self._check_class(label, allow_null=True)
        alpha, sigma = _coeffs(sde, t, x.dtype)
        logn, _ = self._component_terms(x, alpha, sigma)
        logits = self._log_resp(logn, label)
        out = jax.nn.logsumexp(logits)
        if label is not None:
            # log p(c) from the log-weights: a class's weight can round to 0 (a
            # tilt's log-weight of -100 in float32) while its log-weight is finite
            null = label == self.num_classes
            in_class = jnp.where(null, True, self.labels == label)  # finite if null
            log_mass = jax.nn.logsumexp(jnp.where(in_class, self.log_weights, -jnp.inf))
            out = out - jnp.where(null, 0.0, log_mass).astype(out.dtype)
        return out

    def log_prob(self, x: Array, label=None) -> Scalar:
        """The clean log-density $\\log p(x)$ (or $\\log p(x \\mid c)$)."""
        return self.log_prob_t(None, 0.0, x, label)

    def score_t(self, sde: AbstractSDE, t: Time, x: Array, label=None) -> Array:
        r"""$\nabla_x\log p_t(x)$, or $\nabla_x \log p_t(x \mid c)$ given `label`."""
        x = _particle(x)
        sde.check_time(t)
        if label is not None:
            label = self._check_class(label, allow_null=True)
        alpha, sigma = sde.marginal(t)
        logn, scores = self._component_terms(x, alpha, sigma)
        resp = jax.nn.softmax(self._log_resp(logn, label))
        return (resp @ scores).astype(x.dtype)

    def log_classifier_t(
        self, sde: AbstractSDE | None, t: Time, x: Array, label
    ) -> Scalar:
        r"""The exact noisy classifier $\log p_t(c \mid x)$ ($t = 0$ if `sde` is None)."""
        n = self.num_classes
        label = _check_label(label, n, allow_null=False)
        x = _particle(x)
        alpha, sigma = _coeffs(sde, t, x.dtype)
        logn, _ = self._component_terms(x, alpha, sigma)
        logits = self._log_resp(logn)
        out = jax.nn.logsumexp(jnp.where(self.labels == label, logits, -jnp.inf)) - (
            jax.nn.logsumexp(logits)
        )
        return _poison_unknown(out, label, n, False)

    def log_classifier_complement_t(
        self, sde: AbstractSDE | None, t: Time, x: Array, label
    ) -> Scalar:
        r"""$\log(1 - p_t(c \mid x))$, computed without cancellation (so it still
        resolves changes where $p_t(c\mid x)$ rounds to 1)."""
        n = self.num_classes
        label = _check_label(label, n, allow_null=False)
        x = _particle(x)
        alpha, sigma = _coeffs(sde, t, x.dtype)
        logn, _ = self._component_terms(x, alpha, sigma)
        logits = self._log_resp(logn)
        out = jax.nn.logsumexp(jnp.where(self.labels != label, logits, -jnp.inf)) - (
            jax.nn.logsumexp(logits)
        )
        return _poison_unknown(out, label, n, False)

    def classifier_prob(self, x: Array, label) -> Scalar:
        r"""The clean Bayes posterior $p(c \mid x)$ for one particle `x`."""
        label = _check_label(label, self.num_classes, allow_null=False)
        return jnp.exp(self.log_classifier_t(None, 0.0, x, label))

    # -- scores as pytrees ----------------------------------------------------------

    def score(self, sde: AbstractSDE) -> "MixtureScore":
        """The exact unconditional score of $p_t$ (ignores `args`)."""
        return MixtureScore(self, sde, conditional=False)

    def conditional_score(self, sde: AbstractSDE) -> "MixtureScore":
        """The exact class-conditional score; `args` is the integer label.

        `args == num_classes` (the `null_label`) gives the unconditional score, so
        `gd.cfg(w, null_args=gmm.null_label)` is classifier-free guidance.
        """
        return MixtureScore(self, sde, conditional=True)

    def log_classifier(self, sde: AbstractSDE) -> "MixtureClassifier":
        r"""$(t, x, c) \mapsto \log p_t(c \mid x)$, for `gd.classifier_guidance`."""
        return MixtureClassifier(self, sde)

    # -- sampling --------------------------------------------------------------------

    def sample_with_labels(self, key: Key, n: int) -> tuple[Array, Array]:
        """`n` exact draws and their class labels."""
        n = _num_draws(n)
        kc, kz = jr.split(threefry_key(key))  # others hashed: vmap == a loop
        comp = jr.categorical(kc, self.log_weights, shape=(n,))
        z = jr.normal(kz, (n, self.dim), self.means.dtype)
        scale = self.evecs[comp] * jnp.sqrt(self.evals[comp])[:, None, :]
        x = self.means[comp] + jnp.einsum("nij,nj->ni", scale, z)
        return x, self.labels[comp]

    def sample(self, key: Key, n: int) -> Float[Array, "n d"]:
        """`n` exact draws."""
        return self.sample_with_labels(key, n)[0]

    def conditional(self, label: int) -> "GaussianMixture":
        """The class-conditional law $p(\\cdot \\mid c)$ as a mixture of its components."""
        label = int(self._check_class(label, allow_null=False))
        keep = np.asarray(self.labels) == label
        # normalised within the class from the log-weights (the class's weights
        # can all round to 0 while their log-weights are finite)
        log_w = self.log_weights[keep]
        # a diagonal mixture's variances (its evecs are the identity): kept diagonal
        covs = self.evals[keep] if self.diagonal else self.covs[keep]
        return GaussianMixture(
            jnp.exp(log_w - jax.nn.logsumexp(log_w)),
            self.means[keep],
            covs,
            self.labels[keep],
            num_classes=self.num_classes,
        )

    # -- reward tilts -------------------------------------------------------------------

    def tilt(self, reward) -> "GaussianMixture":
        r"""The reweighted law $p^r \propto p\cdot r$ for a reward with a closed-form
        tilt (`GaussianBumpReward`, `ExpLinearReward`)."""
        if not hasattr(reward, "tilt_mixture"):
            raise TypeError(
                "GaussianMixture.tilt needs a reward whose tilt of a Gaussian mixture "
                "is closed form (gd.GaussianBumpReward, gd.ExpLinearReward), got "
                f"{type(reward).__name__}; for any reward, reweight samples instead "
                "(gd.smc_sample, or PointCloud(samples).tilt(reward))"
            )
        return reward.tilt_mixture(self)


def _coeffs(sde, t, dtype):
    if sde is None:
        return jnp.ones((), dtype), jnp.zeros((), dtype)
    sde.check_time(t)
    return sde.marginal(t)


class MixtureScore(AbstractScore):
    r"""The exact score of a `GaussianMixture` under an SDE: $s_t(x) = \nabla_x\log
    \sum_k \pi_k\mathcal N(x; \alpha\mu_k, \alpha^2\Sigma_k + \sigma^2 I)$.

    Built by `gmm.score(sde)` (unconditional; `args` ignored) or
    `gmm.conditional_score(sde)` (`args` is the class label, and `num_classes` the
    null label that gives the unconditional score, as `gd.cfg` expects). See
    `GaussianMixture` for an example.
    """

    mixture: GaussianMixture
    sde: AbstractSDE
    conditional: bool = eqx.field(static=True)

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        if not self.conditional:
            return self.mixture.score_t(self.sde, t, x)
        n = self.mixture.num_classes
        label = self.mixture._check_class(args, allow_null=True)
        return _poison_unknown(
            self.mixture.score_t(self.sde, t, x, label), label, n, True
        )


class MixtureClassifier(eqx.Module):
    r"""$(t, x, c) \mapsto \log p_t(c \mid x)$ of a `GaussianMixture`."""

    mixture: GaussianMixture
    sde: AbstractSDE

    def __call__(self, t: Time, x: Array, args: Args) -> Scalar:
        n = self.mixture.num_classes
        label = _check_label(args, n, allow_null=False)
        out = self.mixture.log_classifier_t(self.sde, t, x, label)
        return _poison_unknown(out, label, n, False)


class Gaussian(eqx.Module):
    r"""A Gaussian $\mathcal N(\mu, \Sigma)$: a one-component `GaussianMixture` with
    the marginal moments in closed form.

    $X_t \sim \mathcal N(\alpha(t)\mu,\ \alpha(t)^2\Sigma + \sigma(t)^2 I)$.

    **Arguments:**

    - `mean`: $\mu$, a vector of shape $(d,)$.
    - `cov`: $\Sigma$, a $(d, d)$ matrix, a $(d,)$ diagonal or a scalar (isotropic).

    !!! example

        ```python
        sde = gd.VPSDE()
        g = gd.Gaussian(jnp.array([1.0, -1.0]), 0.5)
        alpha, sigma = sde.marginal(0.3)
        x = jnp.array([0.2, 0.4])
        # the score of N(alpha mu, alpha^2 Sigma + sigma^2 I) at x
        exact = -(x - alpha * g.mean) / (alpha**2 * 0.5 + sigma**2)
        assert jnp.allclose(g.score(sde)(0.3, x), exact, rtol=1e-5)
        ```
    """

    mixture: GaussianMixture

    def __init__(self, mean, cov):
        mean = jnp.asarray(mean, jnp.result_type(float))
        if mean.ndim != 1:
            raise ValueError(
                f"mean must be a vector of shape (d,), got shape {mean.shape}"
            )
        d = mean.shape[0]
        cov = jnp.asarray(cov, mean.dtype)
        if cov.shape not in [(), (d,), (d, d)]:
            raise ValueError(
                f"cov must be a scalar, a ({d},) diagonal or a ({d}, {d}) matrix for "
                f"a mean of shape ({d},), got shape {cov.shape}"
            )
        if cov.ndim == 0:
            # a diagonal, not cov * I: the mixture's eigh of a matrix with equal
            # eigenvalues has a NaN gradient, its diagonal path has none
            cov = jnp.full((d,), cov, mean.dtype)
        self.mixture = GaussianMixture(jnp.ones(1), mean[None], cov[None])

    @property
    def mean(self) -> Array:
        return self.mixture.means[0]

    @property
    def cov(self) -> Array:
        return self.mixture.covs[0]

    def marginal_moments(self, sde: AbstractSDE, t: Time) -> tuple[Array, Array]:
        """The exact mean and covariance of $X_t$."""
        sde.check_time(t)
        alpha, sigma = sde.marginal(t)
        d = self.mean.shape[0]
        return alpha * self.mean, alpha**2 * self.cov + sigma**2 * jnp.eye(d)

    def score(self, sde: AbstractSDE) -> MixtureScore:
        return self.mixture.score(sde)

    def log_prob(self, x: Array) -> Scalar:
        return self.mixture.log_prob(x)

    def sample(self, key: Key, n: int) -> Array:
        return self.mixture.sample(key, n)


class PointCloud(eqx.Module):
    r"""The (weighted) uniform law over a point set $\{p_i\}$: $\sum_i w_i\delta_{p_i}$.

    Its time-$t$ marginal is $\sum_i w_i \mathcal N(\alpha p_i, \sigma^2 I)$, with score
    $s_t(x) = (\alpha\sum_i\gamma_i(x) p_i - x)/\sigma^2$, $\gamma_i \propto
    w_i\mathcal N(x; \alpha p_i, \sigma^2 I)$. Defined for $t > 0$ only (a concrete
    $t$ with $\sigma(t) = 0$ is a `ValueError`).

    **Arguments:**

    - `points`: $(n, d)$ finite points $p_i$ (e.g. samples, or a data set).
    - `weights`: $(n,)$ non-negative weights $w_i$, normalised here (default:
      uniform). `tilt(rewards)` reweights them, $w_i' \propto w_i r_i$: the exact
      reward tilt of the point set.

    !!! example

        ```python
        sde = gd.VPSDE()
        pc = gd.PointCloud(jnp.array([[0.0, 0.0], [2.0, 0.0]]))
        alpha, sigma = sde.marginal(0.5)
        # halfway between the two (scaled) points, gamma = (1/2, 1/2): the score
        # points to their mean, alpha (1, 0), which is where x is
        x = alpha * jnp.array([1.0, 0.0])
        assert jnp.allclose(pc.score(sde)(0.5, x), 0.0, atol=1e-5)
        tilted = pc.tilt(jnp.array([1.0, 3.0]))  # w' = (1/4, 3/4)
        assert jnp.allclose(jnp.exp(tilted.log_weights), jnp.array([0.25, 0.75]))
        ```
    """

    points: Float[Array, "n d"]
    log_weights: Float[Array, " n"]

    def __init__(self, points, weights=None):
        points = jnp.asarray(points, jnp.result_type(float))
        if points.ndim != 2 or points.shape[0] == 0:
            raise ValueError(
                f"points must have shape (n, d) with n >= 1, got {points.shape}"
            )
        if _is_concrete(points) and not np.all(np.isfinite(np.asarray(points))):
            raise ValueError("points must be finite (drop failed samples first)")
        n = points.shape[0]
        if weights is None:
            weights = jnp.ones(n, points.dtype)
        weights = _check_nonnegative(weights, "point weights")
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {weights.shape}")
        self.points = points
        log_w = jnp.log(weights)  # normalised in logs: a sum of huge weights overflows
        self.log_weights = log_w - jax.nn.logsumexp(log_w)

    def score_t(self, sde: AbstractSDE, t: Time, x: Array) -> Array:
        x = _particle(x)
        _check_point(x, self.points.shape[1:], "the point cloud")
        sde.check_time(t)
        # in at least float32, as the mixture's scores (16-bit squared distances
        # overflow or lose the logits' digits)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        y = x.astype(dtype)
        alpha, sigma = sde.marginal(t)
        if _is_concrete(sigma) and float(sigma) == 0.0:
            raise ValueError(
                f"the point cloud's score is undefined at t = {float(t)} (sigma = 0: "
                "a sum of point masses); evaluate it at t > 0"
            )
        alpha, sigma = alpha.astype(dtype), sigma.astype(dtype)
        mu = alpha * self.points.astype(dtype)
        logits = (
            self.log_weights.astype(dtype)
            - 0.5 * jnp.sum((y[None, :] - mu) ** 2, axis=-1) / sigma**2
        )
        resp = jax.nn.softmax(logits)
        return ((resp @ mu - y) / sigma**2).astype(x.dtype)

    def score(self, sde: AbstractSDE) -> "PointCloudScore":
        return PointCloudScore(self, sde)

    def sample(self, key: Key, n: int) -> Array:
        n = _num_draws(n)
        key = threefry_key(key)  # others hashed: vmap over keys == a loop
        idx = jr.categorical(key, self.log_weights, shape=(n,))
        return self.points[idx]

    def tilt(self, rewards: ArrayLike) -> "PointCloud":
        r"""The reweighted law with weights $\propto w_i r(p_i)$; `rewards` are the
        non-negative values $r(p_i)$ (or a callable reward; one with a `log`
        method, as guidediff's rewards, is evaluated in logs, so rewards that
        underflow or overflow as numbers still give the right weights)."""
        log_reward = getattr(rewards, "log", None)
        if callable(rewards) and callable(log_reward):
            log_r = jax.vmap(log_reward)(self.points)
            if _is_concrete(log_r) and np.any(np.isnan(np.asarray(log_r))):
                raise ValueError("the reward's log is NaN at some points")
            log_w = self.log_weights + log_r.astype(self.log_weights.dtype)
            top = jnp.max(log_w)
            if _is_concrete(top) and not np.isfinite(float(top)):
                raise ValueError(
                    "rewards are all zero (or infinite): the tilted law is undefined"
                )
            return PointCloud(self.points, jnp.exp(log_w - top))
        if callable(rewards):
            rewards = jax.vmap(rewards)(self.points)
        n = self.points.shape[0]
        if jnp.shape(rewards) != (n,):
            raise ValueError(
                f"rewards must have shape ({n},), one per point, got "
                f"{jnp.shape(rewards)}"
            )
        rewards = _check_nonnegative(rewards, "rewards")
        return PointCloud(self.points, jnp.exp(self.log_weights) * rewards)


class PointCloudScore(AbstractScore):
    cloud: PointCloud
    sde: AbstractSDE

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return self.cloud.score_t(self.sde, t, x)


def _check_representable(
    what: str,
    values,
    dtype,
    positive: bool,
    *,
    diagonal: bool = False,
    underflow: bool = True,
) -> None:
    """Concrete values that are finite (and positive where asked) but overflow or
    underflow `dtype` would otherwise be reported as infinite or zero. `diagonal`:
    check only the diagonals of a stack of matrices; `underflow=False`: check only
    for overflow."""
    if not _is_concrete(values):
        return
    try:
        v = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        return  # not numbers: the later conversion names the problem
    if diagonal:
        v = np.diagonal(v, axis1=-2, axis2=-1)
    big = np.finfo(dtype).max
    finite = np.isfinite(v)
    over = finite & (np.abs(v) > big)
    under = finite & (v != 0) & (np.abs(v) < np.finfo(dtype).tiny) & underflow
    if (
        np.any(over)
        or (positive and np.any(under & (v > 0)))
        or (not positive and np.any(v > 0) and np.all(under | (v <= 0)))
    ):
        raise ValueError(
            f"mixture {what} do not fit {np.dtype(dtype).name}: "
            f"{v[over | under].ravel()[:3].tolist()} over- or underflow (rescale: "
            "weights matter only through their ratios; use float64 with "
            "jax_enable_x64 for extreme covariances)"
        )


def _check_nonnegative(values: ArrayLike, what: str) -> Array:
    values = jnp.asarray(values, jnp.result_type(float))
    if _is_concrete(values):
        v = np.asarray(values)
        if np.any(np.isnan(v)):
            raise ValueError(f"{what} contain NaN")
        if np.any(v < 0):
            raise ValueError(
                f"{what} must be non-negative (a tilt p*r needs r >= 0); got minimum "
                f"{v.min()}. For a signed reward R use an exponential tilt exp(R/alpha)."
            )
        if not np.any(v > 0):
            raise ValueError(f"{what} are all zero: the tilted law is undefined")
        if np.any(np.isinf(v)):
            raise ValueError(f"{what} contain inf")
    return values


def _retilted(gmm: "GaussianMixture", log_weights, means, evals) -> "GaussianMixture":
    """`gmm` with new (unnormalised) log-weights, means and eigenvalues in the same
    eigenbasis: no constructor (its checks need concrete values) and no `eigh`."""
    log_weights = log_weights - jax.nn.logsumexp(log_weights)
    return eqx.tree_at(
        lambda g: (g.log_weights, g.means, g.evals), gmm, (log_weights, means, evals)
    )


def _check_dim(vector: Array, gmm: GaussianMixture, what: str) -> None:
    if vector.shape != (gmm.dim,):
        raise ValueError(
            f"the {what} has shape {vector.shape} but the mixture is {gmm.dim}-D: "
            f"expected shape ({gmm.dim},)"
        )


# ---------------------------------------------------------------------------------
# Rewards with closed-form tilts of a Gaussian mixture (PAPER.md 6.3).
# ---------------------------------------------------------------------------------


class GaussianBumpReward(eqx.Module):
    r"""$r(x) = \exp(-\|x - a\|^2 / (2 s^2))$.

    Tilting component $\mathcal N(\mu_k, \Sigma_k)$ gives
    $\Sigma_k' = (\Sigma_k^{-1} + s^{-2}I)^{-1}$,
    $\mu_k' = \Sigma_k'(\Sigma_k^{-1}\mu_k + a/s^2)$ and
    $\pi_k' \propto \pi_k\,\mathcal N(a; \mu_k, \Sigma_k + s^2 I)$.

    **Arguments:**

    - `center`: $a$, a finite vector of shape $(d,)$.
    - `width`: $s$, a finite positive scalar.

    `reward.log(x)` is $\log r(x)$ (the potential `gd.smc_sample` takes);
    `reward.expectation(gmm)` is $E_p[r]$ and `gmm.tilt(reward)` the tilted mixture
    $p^r \propto p\,r$, both in closed form.

    !!! example

        ```python
        # p = N(0, 1) in 1-D, a = 2, s = 1: p^r = N(a/(1+s^2), s^2/(1+s^2)) = N(1, 1/2)
        p = gd.GaussianMixture([1.0], [[0.0]], [1.0])
        reward = gd.GaussianBumpReward(jnp.array([2.0]), 1.0)
        tilted = p.tilt(reward)
        assert jnp.allclose(tilted.mean(), 1.0) and jnp.allclose(tilted.cov(), 0.5)
        # E_p[r] = sqrt(s^2/(1+s^2)) exp(-a^2/(2(1+s^2))) = exp(-1)/sqrt(2)
        assert jnp.allclose(reward.expectation(p), jnp.exp(-1.0) / jnp.sqrt(2.0))
        ```
    """

    center: Float[Array, " d"]
    width: Float[Array, ""]

    def __init__(self, center, width):
        self.center = jnp.asarray(center, jnp.result_type(float))
        self.width = jnp.asarray(width, jnp.result_type(float))
        if self.center.ndim != 1:
            raise ValueError(
                f"the bump centre must be a vector of shape (d,), got shape "
                f"{self.center.shape}"
            )
        if self.width.ndim != 0:
            raise ValueError(
                f"the bump width must be a scalar, got shape {self.width.shape}"
            )
        if _is_concrete(self.center) and not np.all(
            np.isfinite(np.asarray(self.center))
        ):
            raise ValueError(
                f"the bump centre must be finite, got {np.asarray(self.center)}"
            )
        if _is_concrete(self.width):
            w = float(self.width)
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"the bump width must be finite and positive, got {w}")

    def log(self, x: Array) -> Scalar:
        # 16-bit particles in float32 (the result too): a squared distance
        # overflows float16 at 256, a log-reward at 65504
        dt = jnp.promote_types(_state_dtype(x), jnp.float32)
        _check_point(jnp.asarray(x), self.center.shape, "the bump reward")
        x = jnp.asarray(x, dt)
        return (
            -0.5
            * jnp.sum((x - self.center.astype(dt)) ** 2)
            / (jnp.asarray(self.width, dt) ** 2)
        )

    def __call__(self, x: Array) -> Scalar:
        return jnp.exp(self.log(x))

    def _per_component(self, gmm: GaussianMixture):
        _check_dim(self.center, gmm, "bump centre")
        d = gmm.dim
        s2 = self.width**2
        v = gmm.evals + s2  # eigenvalues of Sigma_k + s^2 I
        diff = jnp.einsum("kij,ki->kj", gmm.evecs, self.center[None] - gmm.means)
        log_n = -0.5 * jnp.sum(diff**2 / v + jnp.log(v), -1) - 0.5 * d * math.log(
            2 * math.pi
        )
        # E_k[r] = (2 pi s^2)^{d/2} N(a; mu_k, Sigma_k + s^2 I)
        log_er = log_n + 0.5 * d * jnp.log(2 * math.pi * s2)
        return log_er

    def expectation(self, gmm: GaussianMixture) -> Scalar:
        r"""$E_{X\sim p}[r(X)]$ in closed form."""
        return jnp.exp(self.log_expectation(gmm))

    def log_expectation(self, gmm: GaussianMixture) -> Scalar:
        r"""$\log E_{X\sim p}[r(X)]$ in closed form, without overflow (compare
        with `smc_sample`'s `log_normalizer`)."""
        return jax.nn.logsumexp(gmm.log_weights + self._per_component(gmm))

    def tilt_mixture(self, gmm: GaussianMixture) -> GaussianMixture:
        _check_dim(self.center, gmm, "bump centre")
        s2 = self.width**2
        new_evals = gmm.evals * s2 / (gmm.evals + s2)
        # mu' = Sigma'(Sigma^{-1} mu + a/s^2), in each component's eigenbasis.
        rhs = (
            jnp.einsum("kij,ki->kj", gmm.evecs, gmm.means) / gmm.evals
            + jnp.einsum("kij,i->kj", gmm.evecs, self.center) / s2
        )
        new_means = jnp.einsum("kij,kj->ki", gmm.evecs, new_evals * rhs)
        # Sigma' = V diag(new_evals) V^T: the eigenbasis is kept (re-decomposing
        # would give NaN gradients at repeated eigenvalues).
        return _retilted(
            gmm, gmm.log_weights + self._per_component(gmm), new_means, new_evals
        )


class ExpLinearReward(eqx.Module):
    r"""$r(x) = \exp(\lambda^\top x)$.

    Tilting component $k$ gives $\mathcal N(\mu_k + \Sigma_k\lambda, \Sigma_k)$ with
    $\pi_k' \propto \pi_k\exp(\lambda^\top\mu_k + \tfrac12\lambda^\top\Sigma_k\lambda)$.

    **Arguments:**

    - `direction`: $\lambda$, a finite vector of shape $(d,)$.

    !!! example

        ```python
        # tilting N(mu, Sigma) by exp(lambda . x) shifts its mean by Sigma lambda
        p = gd.GaussianMixture([1.0], [[1.0, 0.0]], [[2.0, 0.5]])  # diagonal cov
        reward = gd.ExpLinearReward(jnp.array([1.0, -2.0]))
        assert jnp.allclose(p.tilt(reward).mean(), jnp.array([3.0, -1.0]))
        # E_p[r] = exp(lambda . mu + lambda Sigma lambda / 2) = exp(1 + 2)
        assert jnp.allclose(reward.expectation(p), jnp.exp(3.0), rtol=1e-5)
        ```
    """

    direction: Float[Array, " d"]

    def __init__(self, direction):
        self.direction = jnp.asarray(direction, jnp.result_type(float))
        if self.direction.ndim != 1:
            raise ValueError(
                "the reward direction must be a vector (d,), got shape "
                f"{self.direction.shape}"
            )
        if _is_concrete(self.direction) and not np.all(
            np.isfinite(np.asarray(self.direction))
        ):
            raise ValueError(f"the reward direction must be finite, got {direction}")

    def log(self, x: Array) -> Scalar:
        _check_point(jnp.asarray(x), self.direction.shape, "the exp-linear reward")
        dt = jnp.promote_types(_state_dtype(x), jnp.float32)  # as the bump's
        return jnp.dot(self.direction.astype(dt), jnp.asarray(x, dt))

    def __call__(self, x: Array) -> Scalar:
        return jnp.exp(self.log(x))

    def _per_component(self, gmm: GaussianMixture):
        _check_dim(self.direction, gmm, "reward direction")
        quad = jnp.einsum("i,kij,j->k", self.direction, gmm.covs, self.direction)
        return gmm.means @ self.direction + 0.5 * quad

    def expectation(self, gmm: GaussianMixture) -> Scalar:
        r"""$E_{X\sim p}[r(X)]$ in closed form."""
        return jnp.exp(self.log_expectation(gmm))

    def log_expectation(self, gmm: GaussianMixture) -> Scalar:
        r"""$\log E_{X\sim p}[r(X)]$ in closed form, without overflow (compare
        with `smc_sample`'s `log_normalizer`)."""
        return jax.nn.logsumexp(gmm.log_weights + self._per_component(gmm))

    def tilt_mixture(self, gmm: GaussianMixture) -> GaussianMixture:
        _check_dim(self.direction, gmm, "reward direction")
        covs = gmm.covs
        new_means = gmm.means + jnp.einsum("kij,j->ki", covs, self.direction)
        logw = gmm.log_weights + self._per_component(gmm)
        return _retilted(gmm, logw, new_means, gmm.evals)
