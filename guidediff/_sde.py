r"""Forward SDEs with Gaussian marginals.

Every SDE here is linear with scalar coefficients,

$$dX_t = f(t) X_t\,dt + g(t)\,dW_t,\qquad X_t \overset{d}{=} \alpha(t) X_0 + \sigma(t) Z,$$

so the time-$t$ marginal of any data law is known in closed form through the mean
coefficient $\alpha(t)$ and the standard deviation $\sigma(t)$. Time runs forward from
data ($t=0$) to noise ($t=T$); sampling integrates back from $T$ to a small $\varepsilon$.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Key, Scalar, Time
from ._jit import is_real_scalar


def _as_float(x: ArrayLike) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _float_state(x: ArrayLike) -> Array:
    """A state as an inexact array: integer points are read as floats (an SDE
    coefficient cast to an integer dtype would be truncated)."""
    x = jnp.asarray(x)
    return (
        x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.result_type(float))
    )


def _concrete(*values) -> tuple[np.ndarray, ...] | None:
    """The values as NumPy arrays, or None if any is traced.

    Parameters are validated only when concrete: under `jit`, `vmap` or `grad` (e.g.
    differentiating through `LinearBeta.beta_max`) the fields are tracers and are
    left alone.
    """
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return None
    out = tuple(np.asarray(v) for v in values)
    if any(v.ndim != 0 for v in out):
        raise ValueError(
            "SDE and schedule parameters must be scalars (one schedule for every "
            f"coordinate), got shapes {[v.shape for v in out]}; for a sweep over "
            "parameters, vmap over scalar ones"
        )
    return out


# ---------------------------------------------------------------------------------
# Noise schedules of the VP SDE, in terms of alpha_bar(t) = alpha(t)^2.
# ---------------------------------------------------------------------------------


def _sqrt_variance(var: Scalar) -> Scalar:
    r"""$\sigma = \sqrt{\sigma^2}$ with a zero derivative where $\sigma^2 = 0$
    (t = 0): $\sigma(0) = 0$ for every parameter value, but the square root's
    infinite slope times a zero tangent would make every gradient through it NaN
    (a grid ending at t = 0 with Heun, `denoise`, an oracle's score). The
    double-`where` keeps the other branch's derivative finite."""
    positive = var > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)


class AbstractVPSchedule(eqx.Module):
    r"""A variance-preserving noise schedule.

    Defines $\log\bar\alpha(t)$ and $\beta(t) = -\frac{d}{dt}\log\bar\alpha(t)$ in
    closed form, and the default time horizon `T`.
    """

    @abc.abstractmethod
    def log_alpha_bar(self, t: Time) -> Scalar:
        """$\\log\\bar\\alpha(t)$."""

    @abc.abstractmethod
    def beta(self, t: Time) -> Scalar:
        """$\\beta(t) = -\\frac{d}{dt}\\log\\bar\\alpha(t)$."""

    def one_minus_alpha_bar(self, t: Time) -> Scalar:
        """$1 - \\bar\\alpha(t) = \\sigma(t)^2$, accurate at small `t`.

        Defaults to `-expm1(log_alpha_bar(t))`; schedules whose `log_alpha_bar`
        cancels at small `t` override it.
        """
        return -jnp.expm1(self.log_alpha_bar(t))

    @property
    @abc.abstractmethod
    def default_T(self) -> float:
        """The default start time of the reverse process."""

    @property
    def singular_at_one(self) -> bool:
        """Whether $\\bar\\alpha(1) = 0$ and $\\beta(1) = \\infty$, so that `T` must
        be below 1."""
        return False


class LinearBeta(AbstractVPSchedule):
    r"""$\beta(t) = \beta_{\min} + t(\beta_{\max} - \beta_{\min})$ on $[0, 1]$ (score_sde).

    $\log\bar\alpha(t) = -\beta_{\min} t - \tfrac12 t^2 (\beta_{\max} - \beta_{\min})$.
    Needs finite $0 \le \beta_{\min} \le \beta_{\max}$ with $\beta_{\max} > 0$.

    **Arguments:** `beta_min` (default 0.1) and `beta_max` (default 20), array
    leaves: `jax.grad` reaches them, and changing them does not recompile.

    !!! example

        ```python
        sched = gd.LinearBeta(beta_min=0.1, beta_max=20.0)
        # log alpha_bar(1) = -beta_min - (beta_max - beta_min) / 2
        assert jnp.allclose(sched.log_alpha_bar(1.0), -0.1 - 19.9 / 2)
        sde = gd.VPSDE(sched)
        ```
    """

    beta_min: Float[Array, ""] = eqx.field(converter=_as_float, default=0.1)
    beta_max: Float[Array, ""] = eqx.field(converter=_as_float, default=20.0)

    def __check_init__(self):
        values = _concrete(self.beta_min, self.beta_max)
        if values is None:
            return
        lo, hi = values
        ok = np.isfinite(lo) & np.isfinite(hi) & (lo >= 0) & (hi >= lo) & (hi > 0)
        if not np.all(ok):
            raise ValueError(
                "LinearBeta needs finite 0 <= beta_min <= beta_max with beta_max > 0 "
                f"(beta(t) must be non-negative and not all zero), got "
                f"beta_min={lo.tolist()}, beta_max={hi.tolist()}"
            )

    def log_alpha_bar(self, t: Time) -> Scalar:
        return -self.beta_min * t - 0.5 * t**2 * (self.beta_max - self.beta_min)

    def beta(self, t: Time) -> Scalar:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    @property
    def default_T(self) -> float:
        return 1.0


class CosineSchedule(AbstractVPSchedule):
    r"""Nichol & Dhariwal's cosine schedule on $[0, 1]$.

    $\bar\alpha(t) = \cos^2\!\big(\tfrac{\pi}{2}\tfrac{t+s}{1+s}\big) /
    \cos^2\!\big(\tfrac{\pi}{2}\tfrac{s}{1+s}\big)$, which reaches 0 at $t = 1$ where
    $\beta$ diverges; the default start is $T = 1 - 10^{-3}$ and `T` must be below 1.
    The offset $s > 0$ keeps $\beta(0) > 0$.

    $1 - \bar\alpha(t) = \sin(a - a_0)\sin(a + a_0)/\cos^2 a_0$ with
    $a = \tfrac{\pi}{2}\tfrac{t+s}{1+s}$, $a_0 = a|_{t=0}$, is evaluated without
    cancellation, so $\sigma(t)$ keeps its relative precision at small $t$ (also in
    float32).

    **Arguments:** `s`, the offset (default 0.008), an array leaf.

    !!! example

        ```python
        sde = gd.VPSDE(gd.CosineSchedule())  # T = 1 - 1e-3 by default
        alpha, sigma = sde.marginal(0.5)  # alpha_bar(1/2) = 1/2 up to the offset
        assert jnp.allclose(alpha**2, 0.5, atol=0.01)
        assert jnp.allclose(alpha**2 + sigma**2, 1.0)  # variance preserving
        ```
    """

    s: Float[Array, ""] = eqx.field(converter=_as_float, default=0.008)

    def __check_init__(self):
        values = _concrete(self.s)
        if values is None:
            return
        (s,) = values
        if not np.all(np.isfinite(s) & (s > 0)):
            raise ValueError(
                f"CosineSchedule needs a finite offset s > 0 (default 0.008), got "
                f"s={s.tolist()}"
            )

    def _angle(self, t: Time) -> Scalar:
        return 0.5 * jnp.pi * (t + self.s) / (1.0 + self.s)

    def _co_angle(self, t: Time) -> Scalar:
        """pi/2 - angle = (pi/2)(1 - t)/(1 + s), formed directly: cos(angle) =
        sin(co-angle) and tan(angle) = 1/tan(co-angle) for t >= 1/2, where the
        angle nears pi/2 and its rounding (~1e-7 in float32) is a large part of
        cos(angle) (375 ulp of alpha and beta at the default T, 3 % at 1 - 1e-6).
        Below 1/2 the angle itself is the well-conditioned one (the co-angle nears
        pi/2 as t -> 0: 97 ulp of beta there)."""
        return 0.5 * jnp.pi * (1.0 - t) / (1.0 + self.s)

    def _cos_angle(self, t: Time) -> Scalar:
        return jnp.where(t < 0.5, jnp.cos(self._angle(t)), jnp.sin(self._co_angle(t)))

    def log_alpha_bar(self, t: Time) -> Scalar:
        return 2.0 * (jnp.log(self._cos_angle(t)) - jnp.log(jnp.cos(self._angle(0.0))))

    def one_minus_alpha_bar(self, t: Time) -> Scalar:
        # cos^2 a0 - cos^2 a = sin(a - a0) sin(a + a0), and a - a0 = (pi/2) t/(1+s)
        # is formed directly, so nothing cancels as t -> 0.
        a0 = self._angle(0.0)
        diff = 0.5 * jnp.pi * t / (1.0 + self.s)
        return jnp.sin(diff) * jnp.sin(self._angle(t) + a0) / jnp.cos(a0) ** 2

    def beta(self, t: Time) -> Scalar:
        tan = jnp.where(
            t < 0.5, jnp.tan(self._angle(t)), 1.0 / jnp.tan(self._co_angle(t))
        )
        return jnp.pi / (1.0 + self.s) * tan

    @property
    def default_T(self) -> float:
        return 1.0 - 1e-3

    @property
    def singular_at_one(self) -> bool:
        return True


class OneMinusT(AbstractVPSchedule):
    r"""$\bar\alpha(t) = 1 - t$ on $[0, 1]$, i.e. $\beta(t) = 1/(1-t)$ (PAPER.md §1).

    $X_t = \sqrt{1-t}\,X_0 + \sqrt{t}\,Z$. $X_1$ is exactly $\mathcal N(0, I)$ but the
    coefficients are singular at $t = 1$, so `T` must be below 1; the default start is
    $T = 1 - 10^{-3}$.

    !!! example

        ```python
        sde = gd.VPSDE(gd.OneMinusT())
        alpha, sigma = sde.marginal(0.36)
        assert jnp.allclose(alpha, 0.8) and jnp.allclose(sigma, 0.6)  # sqrt(1 - t)
        assert sde.T == 1.0 - 1e-3
        ```
    """

    def log_alpha_bar(self, t: Time) -> Scalar:
        return jnp.log1p(-t)

    def beta(self, t: Time) -> Scalar:
        return 1.0 / (1.0 - t)

    @property
    def default_T(self) -> float:
        return 1.0 - 1e-3

    @property
    def singular_at_one(self) -> bool:
        return True


# ---------------------------------------------------------------------------------
# SDEs
# ---------------------------------------------------------------------------------


class AbstractSDE(eqx.Module):
    r"""A forward SDE $dX = f(t)X\,dt + g(t)\,dW$ with Gaussian marginals.

    Subclasses give `drift_coeff` $f(t)$, `diffusion` $g(t)$, `marginal`
    $(\alpha(t), \sigma(t))$ and `prior_std`; everything else follows. Each returns
    JAX arrays (`jnp.zeros_like(t)` for a zero drift, not `0.0`). Declare `T` static,
    `T: float = eqx.field(static=True, default=1.0)` (grids and time checks read it
    on the host, also when the SDE passes through `jax.jit`), and numeric
    parameters as array fields, e.g. `b: jax.Array = eqx.field(converter=jnp.asarray)`:
    a Python float field is a static part of the compiled sampler (each new value
    compiles it again; guidediff warns when this repeats) and `eqx.filter_grad`
    skips it. For a VP SDE with its own
    noise schedule, subclass `gd.AbstractVPSchedule` and pass it to `gd.VPSDE`.
    """

    T: AbstractVar[float]

    @abc.abstractmethod
    def drift_coeff(self, t: Time) -> Scalar:
        """$f(t)$, with drift $f(t) x$."""

    @abc.abstractmethod
    def diffusion(self, t: Time) -> Scalar:
        """$g(t)$."""

    @abc.abstractmethod
    def marginal(self, t: Time) -> tuple[Scalar, Scalar]:
        r"""$(\alpha(t), \sigma(t))$ with $X_t \overset{d}{=} \alpha(t)X_0 + \sigma(t)Z$."""

    @abc.abstractmethod
    def prior_std(self) -> Scalar:
        """The standard deviation of the (zero-mean, isotropic) prior at time `T`."""

    def drift(self, t: Time, x: Array) -> Array:
        """$f(t)\\,x$."""
        x = _float_state(x)
        return self.drift_coeff(t).astype(x.dtype) * x

    def log_snr(self, t: Time) -> Scalar:
        r"""$\lambda(t) = \log(\alpha(t)^2/\sigma(t)^2)$, decreasing in $t$."""
        alpha, sigma = self.marginal(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def perturb(self, t: Time, x0: Array, noise: Array) -> Array:
        r"""$x_t = \alpha(t) x_0 + \sigma(t)\varepsilon$."""
        alpha, sigma = self.marginal(t)
        x0 = _float_state(x0)
        return alpha.astype(x0.dtype) * x0 + sigma.astype(x0.dtype) * noise

    def prior_sample(self, key: Key, shape: tuple[int, ...], dtype=None) -> Array:
        """A draw from the prior $\\mathcal N(0, \\sigma_T^2 I)$."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        return self.prior_std().astype(dtype) * jr.normal(key, shape, dtype)

    def prior_logp(self, x: Array) -> Scalar:
        """The prior log-density at one particle `x`."""
        dt = jnp.result_type(x)
        dt = dt if jnp.issubdtype(dt, jnp.inexact) else jnp.result_type(float)
        std = jnp.asarray(self.prior_std(), dt)  # float32 x stays float32 under x64
        d = x.size
        return -0.5 * jnp.sum((x / std) ** 2) - d * (
            jnp.log(std) + 0.5 * math.log(2 * math.pi)
        )

    def check_time(self, t: Time) -> None:
        """Raise a `ValueError` if a concrete time lies outside `[0, T]`, and a
        `TypeError` unless `t` is a real scalar (one time: a vector of times
        would broadcast into a wrong value; `jax.vmap` over times instead)."""
        if not is_real_scalar(t):
            shape = f" of shape {np.shape(t)}" if hasattr(t, "shape") else ""
            raise TypeError(
                f"a time must be a real scalar, got {type(t).__name__}{shape}; for "
                "several times use jax.vmap"
            )
        try:
            tv = float(t)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return
        T = float(self.T)
        dt = getattr(t, "dtype", None)
        if dt is not None and jnp.issubdtype(dt, jnp.floating):
            # T rounded to t's precision: float32(0.999) is above 0.999, and a
            # float32 grid from sde.T starts there
            T = max(T, float(np.asarray(T, dt)))
        if not (0.0 <= tv <= T):
            raise ValueError(
                f"time {tv} is outside this SDE's range [0, {float(self.T)}]"
            )


class VPSDE(AbstractSDE):
    r"""The variance-preserving SDE $dX = -\tfrac12\beta(t)X\,dt + \sqrt{\beta(t)}\,dW$.

    $\alpha(t) = \sqrt{\bar\alpha(t)}$ and $\sigma(t) = \sqrt{1 - \bar\alpha(t)}$; the
    prior is $\mathcal N(0, I)$.

    **Arguments:**

    - `schedule`: a `LinearBeta` (default, score_sde), `CosineSchedule` or `OneMinusT`
      (PAPER.md: $\bar\alpha(t) = 1 - t$).
    - `T`: where the reverse process starts, in $(0, 1]$; below 1 for the schedules
      singular at $t = 1$ (`CosineSchedule`, `OneMinusT`). Defaults to the schedule's
      `default_T`.

    !!! example

        ```python
        sde = gd.VPSDE(gd.OneMinusT())
        alpha, sigma = sde.marginal(0.5)  # (sqrt(0.5), sqrt(0.5))
        ```
    """

    schedule: AbstractVPSchedule
    T: float = eqx.field(static=True)

    def __init__(
        self, schedule: AbstractVPSchedule | None = None, T: float | None = None
    ):
        if schedule is not None and not isinstance(schedule, AbstractVPSchedule):
            raise TypeError(
                "schedule must be a VP schedule instance, e.g. gd.LinearBeta(), "
                f"gd.CosineSchedule() or gd.OneMinusT(), got {schedule!r}"
            )
        self.schedule = LinearBeta() if schedule is None else schedule
        self.T = float(self.schedule.default_T if T is None else T)
        if not 0.0 < self.T <= 1.0:
            raise ValueError(f"VPSDE needs 0 < T <= 1, got T={self.T}")
        if self.T >= 1.0 and self.schedule.singular_at_one:
            raise ValueError(
                f"VPSDE with {type(self.schedule).__name__} needs T < 1: the schedule "
                "is singular at t = 1 (alpha_bar(1) = 0, beta(1) = inf); use e.g. the "
                f"default T={self.schedule.default_T}"
            )

    def drift_coeff(self, t: Time) -> Scalar:
        return -0.5 * self.schedule.beta(t)

    def diffusion(self, t: Time) -> Scalar:
        return jnp.sqrt(self.schedule.beta(t))

    def marginal(self, t: Time) -> tuple[Scalar, Scalar]:
        alpha = jnp.exp(0.5 * self.schedule.log_alpha_bar(t))
        return alpha, _sqrt_variance(self.schedule.one_minus_alpha_bar(t))

    def prior_std(self) -> Scalar:
        return jnp.ones((), jnp.result_type(float))


class VESDE(AbstractSDE):
    r"""The variance-exploding SDE $dX = \sqrt{\tfrac{d}{dt}\sigma^2(t)}\,dW$.

    With $\bar\sigma(t) = \sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t$, the exact
    marginal is $X_t = X_0 + \sigma(t)Z$ with
    $\sigma(t)^2 = \bar\sigma(t)^2 - \sigma_{\min}^2$ (so $\sigma(0) = 0$), and
    $g(t)^2 = 2\log(\sigma_{\max}/\sigma_{\min})\,\bar\sigma(t)^2$. The prior is
    $\mathcal N(0, \sigma(T)^2 I)$.

    score_sde (Song et al.) trains and samples VE networks with the noise level
    $\bar\sigma(t)$ in place of $\sigma(t)$ (7.7x larger at $t = 10^{-3}$ with the
    defaults; the two agree where $\bar\sigma \gg \sigma_{\min}$). Such a
    network's output at its time $t'$ belongs to the noise level
    $\bar\sigma(t')$: here, at time $t$, query it at the $t'$ with
    $\bar\sigma(t') = \sigma(t)$, i.e.
    $t' = \log(\sigma(t)/\sigma_{\min}) / \log(\sigma_{\max}/\sigma_{\min})$
    (below 0 near $t = 0$, where $\sigma(t) < \sigma_{\min}$).

    **Arguments:**

    - `sigma_min`, `sigma_max`: finite, with $0 < \sigma_{\min} < \sigma_{\max}$.
    - `T`: where the reverse process starts; finite and positive (default 1).

    !!! example

        ```python
        sde = gd.VESDE(sigma_min=0.01, sigma_max=50.0)
        alpha, sigma = sde.marginal(1.0)
        assert alpha == 1.0 and jnp.allclose(sigma**2, 50.0**2 - 0.01**2)
        assert jnp.allclose(sde.marginal(0.0)[1], 0.0)  # sigma(0) = 0
        ```
    """

    sigma_min: Float[Array, ""] = eqx.field(converter=_as_float, default=0.01)
    sigma_max: Float[Array, ""] = eqx.field(converter=_as_float, default=50.0)
    T: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        T = float(self.T)
        if not (math.isfinite(T) and T > 0.0):
            raise ValueError(f"VESDE needs a finite T > 0 (default 1), got T={T}")
        values = _concrete(self.sigma_min, self.sigma_max)
        if values is None:
            return
        lo, hi = values
        if not np.all(np.isfinite(lo) & np.isfinite(hi) & (lo > 0) & (lo < hi)):
            raise ValueError(
                "VESDE needs finite 0 < sigma_min < sigma_max, got "
                f"sigma_min={lo.tolist()}, sigma_max={hi.tolist()}"
            )

    def _sigma_bar(self, t: Time) -> Scalar:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coeff(self, t: Time) -> Scalar:
        return jnp.zeros_like(self._sigma_bar(t))

    def diffusion(self, t: Time) -> Scalar:
        log_ratio = jnp.log(self.sigma_max / self.sigma_min)
        return self._sigma_bar(t) * jnp.sqrt(2.0 * log_ratio)

    def marginal(self, t: Time) -> tuple[Scalar, Scalar]:
        sb = self._sigma_bar(t)
        # sigma^2 = sigma_min^2 (r^(2t) - 1) = sigma_bar^2 (1 - r^(-2t)): the second
        # form never squares sigma_min (0 in float32 below 1e-19) nor raises r to
        # 2t (inf for r above 1.8e19), and is as exact for small t (expm1)
        log_ratio = jnp.log(self.sigma_max / self.sigma_min)
        frac = -jnp.expm1(-2.0 * t * log_ratio)
        return jnp.ones_like(sb), sb * _sqrt_variance(frac)

    def prior_std(self) -> Scalar:
        return self.marginal(self.T)[1]
