r"""Classifier-free guidance."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import ArrayLike

from .._custom_types import Args
from .._grid import check_grid
from .._score import AbstractScore
from .._sde import AbstractSDE
from .._weights import PerStep, Weight, _check_real, as_weight
from .base import AbstractGuidance


class ClassifierFree(AbstractGuidance):
    r"""$\tilde s = s(x \mid c) + w(t)\,\big(s(x\mid c) - s(x)\big)
    = (1 + w)s(x\mid c) - w\,s(x)$. See `cfg`, which builds it (with checks) and
    has an example.

    **Arguments:**

    - `weight`: $w$, a weight module $t \mapsto w(t)$ (see `gd.as_weight`).
    - `null_args`: the `args` that make the score unconditional, or `None`.
    - `unconditional`: a separate unconditional score, or `None`.
    - `batched`: whether the two calls of one score are stacked into one (static).
    """

    weight: eqx.Module
    null_args: Args
    unconditional: AbstractScore | None
    batched: bool = eqx.field(static=True)

    def apply(self, score, t, x, args):
        cond, uncond = cond_and_uncond(
            score, t, x, args, self.null_args, self.unconditional, self.batched,
            pair_guidance_name(self),
        )  # fmt: skip
        w = self.weight(t).astype(cond.dtype)
        return cond + w * (cond - uncond)


def cond_and_uncond(
    score, t, x, args, null_args, unconditional, batched: bool, name: str = "gd.cfg"
):
    """The conditional and the unconditional score at `(t, x)`: `unconditional`
    called with `args`, or `score` with `null_args`, the two calls stacked into one
    with `batched` (shared by the guidances built on the pair, `name` in their
    errors)."""
    if unconditional is not None:
        cond = score(t, x, args)
        return cond, unconditional(t, x, args).astype(cond.dtype)
    if args is None:
        # (a class-conditional network reads None as its null label: guidance
        # would silently be off, cond == uncond)
        raise TypeError(
            f"{name}(null_args=...) needs the conditional args (e.g. the class "
            "label) in the score's call: got args=None"
        )
    if batched and not _eager(t, x, args):
        # One call of the score on the stacked (cond, null) args: under the outer
        # particle vmap this is a single network call on 2N inputs. (An eager
        # call with concrete values takes the two-call path below, where the
        # score's own checks, e.g. of an unknown label, see the values.)
        try:  # (null_args may hold args' leaves whole: a list for an array)
            null = jtu.tree_map(lambda a, n: _null_like(a, n, name), args, null_args)
        except ValueError as e:
            if "pytree" not in str(e).lower() and "structure" not in str(e):
                raise
            raise ValueError(
                f"batched {name} stacks args and null_args into one call, so they "
                f"need the same structure; got args {jtu.tree_structure(args)} "
                f"and null_args {jtu.tree_structure(null_args)}. Give "
                f"null_args every entry of args, or use {name}(..., batched=False)"
            ) from None
        both = jtu.tree_map(lambda a, n: jnp.stack([a, n]), args, null)
        out = jax.vmap(score, in_axes=(None, None, 0))(t, x, both)
        return out[0], out[1]
    return score(t, x, args), score(t, x, null_args)


def pair_guidance_name(g) -> str | None:
    """The public name of a guidance built on `cond_and_uncond` (`"gd.cfg"`,
    `"gd.cfgpp"`, `"gd.apg"`), for the samplers' checks and messages; `None` for
    any other object."""
    from .apg import AdaptiveProjected

    if isinstance(g, AdaptiveProjected):
        return "gd.apg"
    if isinstance(g, ClassifierFree):
        return "gd.cfgpp" if isinstance(g.weight, CFGppSteps) else "gd.cfg"
    return None


def check_pair(null_args, unconditional, batched, name: str = "gd.cfg") -> None:
    """Exactly one of `null_args` / `unconditional` (an `AbstractScore`), and a
    boolean `batched`: the arguments of a guidance built on `cond_and_uncond`."""
    if (null_args is None) == (unconditional is None):
        raise ValueError(f"{name} needs exactly one of `null_args` or `unconditional`")
    if not isinstance(batched, bool | np.bool_):
        raise TypeError(f"{name}: batched must be True or False, got {batched!r}")
    if unconditional is not None and not isinstance(unconditional, AbstractScore):
        raise TypeError(f"{name}: `unconditional` must be an AbstractScore")


def _eager(*trees) -> bool:
    """Every leaf concrete: a direct call outside `jit` / `vmap`."""
    return not any(isinstance(v, jax.core.Tracer) for v in jtu.tree_leaves(trees))


def _numeric(leaf) -> bool:
    """A number, or an array of numbers or bools (read from its dtype, no copy)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(leaf).dtype
        except Exception:  # noqa: BLE001 - anything numpy cannot read is not numeric
            return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, bool))
    except TypeError:
        return False


def _null_like(a, n, name: str = "gd.cfg"):
    """The null args `n` in the dtype of the conditional `a` they are stacked with.
    Into an integer (label) dtype, a concrete value that the cast would change (a
    float label 1.9 -> 1) is an error, not a silent other class; into a float
    dtype the cast rounds, as the two-call path's arithmetic would. Shapes must
    match (stacking cannot pair a scalar null with a vector of args)."""
    for leaf in (a, n):
        if not isinstance(leaf, jax.core.Tracer) and not _numeric(leaf):
            raise TypeError(
                f"batched {name} stacks the conditional args and null_args into one "
                f"call, so their leaves must be numbers or arrays; got {leaf!r} "
                f"({type(leaf).__name__}). Use {name}(..., batched=False) for args "
                "with other leaves (e.g. strings)"
            )
    dtype = jnp.asarray(a).dtype
    shape = jnp.shape(a)
    # (np.shape: a list or tuple held whole as one leaf, which jnp.shape deprecates)
    n_shape = jnp.shape(n) if isinstance(n, jax.Array) else np.shape(n)
    if n_shape != shape:
        raise ValueError(
            f"{name}'s null_args has shape {n_shape} but the conditional args "
            f"have shape {shape}: batched {name} stacks them into one call. Give "
            f"null_args of the same shape, or use {name}(..., batched=False)"
        )
    exact = jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
    if exact and not isinstance(n, jax.core.Tracer):
        v = np.asarray(n)
        if not np.array_equal(v.astype(dtype), v):
            raise ValueError(
                f"{name}'s null_args={n!r} is not representable as the conditional "
                f"args' dtype {dtype} (they are stacked into one call)"
            )
    return jnp.asarray(n, dtype)


def cfg(
    weight: Weight,
    *,
    null_args: Args = None,
    unconditional: AbstractScore | None = None,
    batched: bool = True,
) -> ClassifierFree:
    r"""Classifier-free guidance (Ho & Salimans), PAPER.md §3.2:

    $$\tilde s_t(x\mid c) = s_t(x\mid c) + w(t)\big(s_t(x\mid c) - s_t(x)\big).$$

    $w = 0$ is plain conditional sampling; diffusers' scale is $1 + w$.

    **Arguments:**

    - `weight`: $w$, a number or a schedule $t\mapsto w(t)$.
    - `null_args`: the `args` that make the *same* score unconditional (e.g. the null
      class label). The conditional and unconditional calls are then batched into one
      call (`batched=True`), which is one network evaluation on twice the inputs.
    - `unconditional`: alternatively, a separate unconditional score (called with the
      same `args`). Give exactly one of `null_args` / `unconditional`. A weaker
      model of the *same* conditional law here is autoguidance (Karras et al.
      2024): $s + w\,(s - s_{\rm weak})$.
    - `batched`: with `null_args`, stack the conditional and null `args` into one
      vmapped call of the score (default `True`); they must then have the same
      shape. `False` calls the score twice.

    **Returns:** a `ClassifierFree` guidance, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        score = gmm.conditional_score(sde)  # args: the class label
        guided = gd.guide(score, gd.cfg(2.0, null_args=gmm.null_label))
        x = jnp.array([0.5, -0.2])
        expected = 3.0 * score(0.3, x, 1) - 2.0 * score(0.3, x, gmm.null_label)
        assert jnp.allclose(guided(0.3, x, 1), expected, atol=1e-5)
        out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=1000, args=1)
        ```
    """
    check_pair(null_args, unconditional, batched)
    return ClassifierFree(as_weight(weight), null_args, unconditional, bool(batched))


class CFGppSteps(PerStep):
    """`gd.cfgpp`'s per-step weights: a `gd.PerStep` the samplers know to be CFG++'s
    (they warn when it meets another solver than `gd.DDIM`), holding the SDE they
    were computed for (the samplers refuse another SDE, as for any guidance that
    holds one)."""

    sde: AbstractSDE

    def __init__(self, ts: ArrayLike, values: ArrayLike, sde: AbstractSDE):
        super().__init__(ts, values)
        self.sde = sde


def cfgpp(
    lam: ArrayLike,
    sde: AbstractSDE,
    ts: ArrayLike,
    *,
    null_args: Args = None,
    unconditional: AbstractScore | None = None,
    batched: bool = True,
) -> ClassifierFree:
    r"""CFG++ (Chung et al. 2024) as classifier-free guidance at per-step weights.

    CFG++ changes DDIM's step from $t_k$ to $t_{k+1}$: the data prediction takes
    the guided noise, the re-noising the *unconditional* noise,

    $$x_{k+1} = \alpha_{k+1}\,\hat x_0(\varepsilon^\lambda_k)
    + \sigma_{k+1}\,\varepsilon^\varnothing_k,\qquad
    \varepsilon^\lambda = \varepsilon^\varnothing
    + \lambda\,(\varepsilon^c - \varepsilon^\varnothing),\quad
    \hat x_0(\varepsilon) = \frac{x_k - \sigma_k\varepsilon}{\alpha_k},$$

    with $\lambda \in [0, 1]$. The step is linear in the noise, so it is exactly
    DDIM's own step with classifier-free guidance at the scale

    $$1 + w_k = \frac{\lambda}{1 - e^{-h_k}},\qquad
    h_k = \ell(t_{k+1}) - \ell(t_k),\quad \ell = \log\frac{\alpha}{\sigma},$$

    (match the coefficients of $\varepsilon^c - \varepsilon^\varnothing$): a
    guidance term of the reverse process like any other, no change to the sampler.
    This builds `gd.cfg(gd.PerStep(ts, w), ...)` with those $w_k$: sampled with
    `gd.sample(..., ts=ts, process="ode", solver=gd.DDIM(sde))` on the *same*
    grid, it is CFG++ (its DDIM algorithm) to rounding. With another solver that
    evaluates the score once per step at the step's start (`gd.DPMSolverPP`,
    Euler), it is CFG at the same per-step weights (the samplers warn: not CFG++).

    On a log-SNR-uniform grid (`gd.logsnr_grid`) every $h_k$ is the same, and
    CFG++ is CFG at one constant weight. The scale grows as $\lambda / h_k$ when
    the grid is refined: CFG++ is a
    method of its grid, and one $\lambda$ guides more strongly on a finer grid
    (the last step to $\sigma = 0$ has $h = \infty$ and scale $\lambda$). Compare
    values of $\lambda$ at a fixed number of steps. A step whose scale is below 1,
    $\lambda < 1 - e^{-h_k}$ ($w_k < 0$), guides *less* than the conditional score
    alone: on a 20-step log-SNR grid from 1 to 0.001 of the default VP SDE that is
    every $\lambda$ below about 0.4.

    **Arguments:**

    - `lam`: $\lambda$, a finite real scalar (CFG++ uses $[0, 1]$; $0$ is
      unconditional sampling). An array leaf: `jax.grad` and `jax.vmap` over it
      work, and a new value does not recompile.
    - `sde`: the forward SDE, for $\alpha$ and $\sigma$.
    - `ts`: the decreasing sampling grid, as passed to `gd.sample(ts=...)`.
    - `null_args`, `unconditional`, `batched`: as in `gd.cfg`.

    **Returns:** a `ClassifierFree` guidance whose weight is a `gd.PerStep`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        ts = gd.logsnr_grid(sde, sde.T, 1e-3, 20)
        guidance = gd.cfgpp(0.6, sde, ts, null_args=gmm.null_label)
        guided = gd.guide(gmm.conditional_score(sde), guidance)
        out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=500, ts=ts,
                        args=1, process="ode", solver=gd.DDIM(sde))
        ```
    """
    check_pair(null_args, unconditional, batched, "gd.cfgpp")
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"gd.cfgpp: sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got "
            f"{type(sde).__name__}"
        )
    if callable(lam):
        raise TypeError(
            "gd.cfgpp's lam is one number (CFG++'s scale is fixed per step by the "
            f"grid), got the callable {lam!r}; for a schedule of t use gd.cfg"
        )
    _check_real(lam, "gd.cfgpp's lam")
    lam = jnp.asarray(lam, jnp.result_type(float))
    if lam.ndim != 0:
        raise ValueError(
            f"gd.cfgpp's lam must be a scalar, got shape {lam.shape}: jax.vmap over "
            "a scalar to sweep it"
        )
    if not isinstance(lam, jax.core.Tracer) and not np.isfinite(np.asarray(lam)):
        raise ValueError(f"gd.cfgpp's lam must be finite, got {lam}")
    _check_real(ts, "gd.cfgpp's ts")
    try:  # decreasing, within [0, T]: sde.log_snr is defined there
        check_grid(sde, ts)
    except ValueError as e:
        raise ValueError(f"gd.cfgpp's ts, for its sde: {e}") from None
    times = jnp.asarray(ts, jnp.result_type(float))
    ell = 0.5 * jax.vmap(sde.log_snr)(times)  # log(alpha / sigma); inf at sigma = 0
    scale = lam / -jnp.expm1(-(ell[1:] - ell[:-1]))
    weights = CFGppSteps(times, (scale - 1.0).astype(times.dtype), sde)
    return cfg(
        weights, null_args=null_args, unconditional=unconditional, batched=batched
    )
