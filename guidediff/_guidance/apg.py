r"""Adaptive projected guidance (APG): classifier-free guidance with its update split
along the conditional denoiser's prediction."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._custom_types import Args
from .._jit import is_real_scalar
from .._sample_checks import register_shape_keyed
from .._score import AbstractScore
from .._sde import AbstractSDE
from .._weights import Weight, _host_values, as_weight
from .base import AbstractGuidance
from .cfg import check_pair, cond_and_uncond


def _safe_norm(v: Array) -> tuple[Array, Array]:
    """`(|v|, |v| with 0 replaced by 1)`, differentiable at `v = 0` (the double
    `where`: the replaced branch's derivative is finite)."""
    sq = jnp.sum(v * v)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0), jnp.sqrt(safe)


class _Scalar(eqx.Module):
    """A real scalar parameter of a guidance, an array leaf in a module of its
    own: `gd.sample`'s check keys it by shape (registered below), as it keys
    weights, so a sweep over it does not trace the score again."""

    value: Float[Array, ""] = eqx.field(
        converter=lambda v: jnp.asarray(v, jnp.result_type(float))
    )


register_shape_keyed(_Scalar)


def _as_scalar(v) -> _Scalar:
    return v if isinstance(v, _Scalar) else _Scalar(v)


class AdaptiveProjected(AbstractGuidance):
    r"""APG's guided score. See `apg`, which builds it (with checks), states the
    equation and has an example.

    **Arguments:**

    - `weight`: $w$, a weight module $t \mapsto w(t)$ (see `gd.as_weight`).
    - `sde`: the forward SDE (for the denoiser $D = (x + \sigma^2 s)/\alpha$).
    - `eta`: $\eta$, the weight of the update's component parallel to $D_c$.
    - `norm_threshold`: $r$, the largest norm of the update in $D$ units (`inf`:
      none; a negative value, e.g. a traced one, turns the update off).
    - `null_args`, `unconditional`, `batched`: as in `gd.ClassifierFree`.

    `eta` and `norm_threshold` are numbers or scalar arrays (held as array leaves).
    """

    weight: eqx.Module
    sde: AbstractSDE
    eta: _Scalar = eqx.field(converter=_as_scalar)
    norm_threshold: _Scalar = eqx.field(converter=_as_scalar)
    null_args: Args
    unconditional: AbstractScore | None
    batched: bool = eqx.field(static=True)

    def apply(self, score, t, x, args):
        cond, uncond = cond_and_uncond(
            score,
            t,
            x,
            args,
            self.null_args,
            self.unconditional,
            self.batched,
            "gd.apg",
        )
        # in float32 at least: the squared norms of a 16-bit state overflow
        out_dtype = cond.dtype
        dtype = jnp.promote_types(out_dtype, jnp.float32)
        cond, uncond = cond.astype(dtype), uncond.astype(dtype)
        alpha, sigma = self.sde.marginal(t)
        c = (sigma**2 / alpha).astype(dtype)  # D - x / alpha = c s
        d_cond = x.astype(dtype) / alpha.astype(dtype) + c * cond
        diff = cond - uncond  # (D_c - D_u) / c
        # the update's norm in D units, |c diff|, capped at r
        norm, safe = _safe_norm(diff)
        r = self.norm_threshold.value.astype(dtype)
        over = c * norm > r
        cap = jnp.clip(r / jnp.where(over, c * safe, 1.0), 0.0, 1.0)
        shrink = jnp.where(over, cap, 1.0)
        # split along D_c (a zero D_c has no direction: all of it is orthogonal)
        d_norm, d_safe = _safe_norm(d_cond)
        unit = jnp.where(d_norm > 0, d_cond / d_safe, 0.0)
        parallel = jnp.sum(diff * unit) * unit
        eta = self.eta.value.astype(dtype)
        update = shrink * (diff - parallel + eta * parallel)
        return (cond + self.weight(t).astype(dtype) * update).astype(out_dtype)


def _real_scalar(name: str, value, lo: float, hi_ok: bool) -> Array:
    """A real scalar argument as a float array, checked on the host where
    concrete: at least `lo`, finite unless `hi_ok` (inf allowed)."""
    if not is_real_scalar(value):
        raise TypeError(f"gd.apg's {name} must be a real scalar, got {value!r}")
    with np.errstate(over="ignore"):  # 1e39 in float32: inf, rejected below
        arr = jnp.asarray(value, jnp.result_type(float))
    host = _host_values(value, arr)  # as stored: 1e39 is inf in float32
    if host is not None:
        v = float(host)
        if np.isnan(v) or v < lo or (np.isinf(v) and not hi_ok):
            bound = "> 0" if lo > 0 else "finite"
            given = float(np.asarray(value, np.float64))
            same = v == given or (np.isnan(v) and np.isnan(given))
            stored = "" if same else f" ({v:g} in {arr.dtype})"
            raise ValueError(f"gd.apg's {name} must be {bound}, got {value!r}{stored}")
    return arr


def apg(
    weight: Weight,
    sde: AbstractSDE,
    *,
    eta: ArrayLike = 0.0,
    norm_threshold: ArrayLike | None = None,
    null_args: Args = None,
    unconditional: AbstractScore | None = None,
    batched: bool = True,
) -> AdaptiveProjected:
    r"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation
    and artifacts of high guidance scales in diffusion models"), without momentum.

    In the units of the denoiser $D = E[X_0 \mid x_t] = (x + \sigma^2 s)/\alpha$,
    CFG adds $w\,\Delta$ to the conditional prediction, $\Delta = D_c - D_u$. APG
    caps the update's norm at $r$, splits it into its components parallel and
    orthogonal to $D_c$, and down-weights the parallel one (which the paper finds
    oversaturates at high $w$):

    $$\Delta' = \Delta\,\min\Big(1, \frac{r}{\|\Delta\|}\Big),\qquad
    \Delta'_\parallel = \frac{\langle\Delta', D_c\rangle}{\|D_c\|^2}\,D_c,\qquad
    \tilde D = D_c + w\,\big(\Delta' - \Delta'_\parallel + \eta\,\Delta'_\parallel\big),$$

    returned as the score of $\tilde D$, $\tilde s = (\alpha\tilde D - x)/\sigma^2$.
    With $\eta = 1$ and no threshold it is `gd.cfg(w)`; $w$ is gd.cfg's (the
    paper's scale is $1 + w$; diffusers' `AdaptiveProjectedGuidance` takes $w$
    with `use_original_formulation=True`, while its default adds the update to
    the unconditional prediction instead, a different update, and it projects
    the model's raw output, usually the noise, not $D$). The norms are per
    particle (over its state), computed in float32 at least. APG's momentum (a running average of $\Delta$ over the steps)
    needs state across steps, which a guidance, a stateless score transform, does
    not have: it is left out ($\beta = 0$).

    **Arguments:**

    - `weight`: $w$, a number or a schedule $t \mapsto w(t)$.
    - `sde`: the forward SDE the score belongs to.
    - `eta`: $\eta$, a finite real scalar (default 0, the paper's choice).
    - `norm_threshold`: $r > 0$, in the units of $x_0$ (default: no cap).
    - `null_args`, `unconditional`, `batched`: as in `gd.cfg` (exactly one of the
      first two).

    `eta` and `norm_threshold` are array leaves, like the weight: a new value does
    not recompile and `jax.grad` reaches them.

    **Returns:** an `AdaptiveProjected` guidance, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        score = gmm.conditional_score(sde)
        guided = gd.guide(score, gd.apg(4.0, sde, null_args=gmm.null_label))
        t, x = 0.3, jnp.array([0.5, -0.2])
        # the change to the denoised prediction is orthogonal to D_c (eta = 0)
        d_c = gd.denoise(sde, score, t, x, 1)
        d_apg = gd.denoise(sde, guided, t, x, 1)
        assert jnp.abs(jnp.dot(d_apg - d_c, d_c)) < 1e-5
        # eta = 1, no threshold: classifier-free guidance
        same = gd.guide(score, gd.apg(4.0, sde, eta=1.0, null_args=gmm.null_label))
        plain = gd.guide(score, gd.cfg(4.0, null_args=gmm.null_label))
        assert jnp.allclose(same(t, x, 1), plain(t, x, 1), atol=1e-5)
        out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=100, args=1)
        ```
    """
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"gd.apg: sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got "
            f"{type(sde).__name__}"
        )
    check_pair(null_args, unconditional, batched, "gd.apg")
    eta = _real_scalar("eta", eta, -np.inf, hi_ok=False)
    r = np.inf if norm_threshold is None else norm_threshold
    r = _real_scalar("norm_threshold", r, np.nextafter(0.0, 1.0), hi_ok=True)
    return AdaptiveProjected(
        as_weight(weight), sde, eta, r, null_args, unconditional, bool(batched)
    )
