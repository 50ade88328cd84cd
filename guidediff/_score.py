r"""The score abstraction: a pure function of `(t, x, args)` for ONE particle.

A score $s(t, x, \text{args}) \approx \nabla_x \log p_t(x \mid \text{args})$ is an
`eqx.Module`, so that everything it depends on (network weights, oracle parameters,
guidance weights) is a pytree leaf: `jax.grad` reaches it, `jit` does not bake it in
as a constant, and changing it does not recompile.

Networks often predict the noise $\varepsilon$, the clean data $x_0$ or the velocity
$v = \alpha\varepsilon - \sigma x_0$ (Salimans & Ho, 2022) instead. With
$x_t = \alpha x_0 + \sigma\varepsilon$ (see `AbstractSDE.marginal`) the four are
related by Tweedie's formula

$$s = -\varepsilon/\sigma = (\alpha\hat x_0 - x)/\sigma^2
= -\frac{\sigma x + \alpha v}{\sigma(\alpha^2 + \sigma^2)}.$$
"""

import abc
import re
import sys
from collections.abc import Callable, Mapping

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from ._custom_types import Args, Time
from ._sde import AbstractSDE


class AbstractScore(eqx.Module):
    """A score function $s(t, x, \\text{args})$ of one particle.

    Subclasses implement `__call__(t, x, args) -> array shaped like x`. Particles are a
    `jax.vmap` over calls, never a batch axis inside.

    A score is an `eqx.Module`, a pytree whose arrays (weights, network
    parameters) are leaves: pass it as an argument to a jitted function, or jit
    it with `eqx.filter_jit`. `jax.jit(score)` fails (JAX hashes the function it
    jits, and arrays are not hashable).

    !!! example

        ```python
        import equinox as eqx

        sde = gd.VPSDE()
        score = gd.Gaussian(jnp.zeros(2), 1.0).score(sde)
        fast = eqx.filter_jit(score)  # or jax.jit(lambda t, x: score(t, x))
        assert fast(0.5, jnp.ones(2)).shape == (2,)
        ```
    """

    @abc.abstractmethod
    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        """The score at time `t` and state `x`."""


def _flax_kind(obj) -> str | None:
    """`"nnx"` for a `flax.nnx.Module`, `"linen"` for a `flax.linen.Module` (or
    another Flax `Module`), None otherwise; recognised without importing flax (the
    core does not: a network can only exist once its user has imported flax)."""
    for c in type(obj).__mro__:
        if c.__name__ == "Module" and c.__module__.startswith("flax."):
            return "nnx" if c.__module__.startswith("flax.nnx") else "linen"
    return None


def _is_flax_module(obj) -> bool:
    """A Flax Linen network: a pure description whose `apply` needs its variables."""
    return _flax_kind(obj) == "linen"


def _is_nnx_module(obj) -> bool:
    """A Flax NNX network: it holds its parameters and is a pytree (flax >= 0.12),
    so it is read directly (`gd.EpsScore(model, sde)`), its arrays leaves."""
    return _flax_kind(obj) == "nnx"


def check_nnx_pytree(model, what: str, recipe: str | None = None) -> None:
    """A `TypeError` for an NNX network declared `pytree=False`: JAX sees it as one
    leaf, so `jax.grad` would not reach its parameters, `jit` would bake them in as
    constants and compile again for each new instance."""
    if _is_nnx_module(model) and jtu.treedef_is_leaf(jtu.tree_structure(model)):
        raise TypeError(
            f"{what}: the Flax NNX network {type(model).__name__} is not a pytree "
            "(declared with pytree=False), so its parameters would be constants of "
            "the compiled sampler; split it, graphdef, state = nnx.split(model), "
            "and read "
            + (
                recipe
                or "gd.flax_score(lambda s, t, x, a: nnx.merge(graphdef, s)(t, x, a), "
                "state, sde, prediction=...)"
            )
        )


_NNX_HINT = (
    "a Flax NNX network holds its parameters: read its prediction with "
    "gd.flax_score(model, None, sde, prediction=...) or gd.EpsScore(model, sde) "
    "(X0Score, VScore), passing the module itself"
)


def check_flax_variables(fn, variables) -> None:
    """A clear `TypeError` when a Flax network (or its bound `apply`) is given its
    parameters alone (`variables["params"]`): Flax's apply needs the whole variables
    dict and fails deep inside with ScopeCollectionNotFound."""
    owner = fn if _is_flax_module(fn) else getattr(fn, "__self__", None)
    if not _is_flax_module(owner) or (
        fn is not owner and getattr(fn, "__name__", "") != "apply"
    ):
        return  # not a network's own apply (a method may take the params alone)
    if not isinstance(variables, Mapping) or "params" in variables:
        return
    # Only keys named like Flax's automatic submodule names (Dense_0, _Block_1):
    # a variables dict of other collections alone (constants, batch_stats) is fine.
    if any(re.fullmatch(r"_?[A-Z]\w*_\d+", str(k)) for k in variables):
        keys = list(variables)[:4]
        raise TypeError(
            f"the variables given to the Flax network {type(owner).__name__} have no "
            f"'params' collection (top-level keys: {keys}): pass the whole dict from "
            "net.init(...), {'params': ...}, not variables['params']"
        )


def _is_linen_model(obj) -> bool:
    """A `gd.LinenModel` (one exists only once the Flax adapter has been imported)."""
    adapter = sys.modules.get(__name__.rpartition(".")[0] + "._flax")
    return adapter is not None and isinstance(obj, adapter.LinenModel)


def _network_hint(obj) -> str | None:
    """How to read `obj` as a score if it is (or is a method of) a Flax network or a
    `LinenModel`, whose output is a network's prediction (eps by default), not a
    score; None otherwise."""
    owner = getattr(obj, "__self__", None)
    if _is_nnx_module(obj) or _is_nnx_module(owner):
        return f"{_NNX_HINT}, not a score"
    if _is_flax_module(obj) or _is_linen_model(obj) or _is_flax_module(owner):
        return (
            "a Flax network (or LinenModel) predicts eps (or x0, v), it is not a "
            "score: read it with gd.flax_score(net, variables, sde, prediction=...)"
        )
    return None


def check_not_linen(fn, what: str, fix: str) -> None:
    """A `TypeError` naming `fix` when `fn` is an unbound Flax Linen network (calling
    it fails) or a network's `apply` (it takes the variables first), where a plain
    function of another signature is expected (a classifier's log-likelihood, a
    reward). A bound network (`net.bind(variables)`), its methods and a
    `gd.LinenModel` hold their variables and pass."""
    owner = getattr(fn, "__self__", None)
    if _is_flax_module(fn):
        net, unbound = fn, getattr(fn, "scope", None) is None
    elif _is_flax_module(owner):
        net = owner
        unbound = getattr(owner, "scope", None) is None or (
            getattr(fn, "__name__", "") == "apply"
        )
    else:
        return
    if unbound:
        raise TypeError(
            f"{what} got the Flax Linen network {type(net).__name__} (unbound, or "
            f"its apply), which needs its variables; {fix}"
        )


def check_score(score, what: str = "score") -> None:
    """A `TypeError` with the fix when `score` is not an `AbstractScore`: an oracle's
    uncalled `.score` method, a Flax network, or a plain function."""
    if isinstance(score, AbstractScore):
        return
    owner = getattr(score, "__self__", None)
    hint = _network_hint(score)
    if hint is None:
        hint = (
            f"call it: {type(owner).__name__}.{score.__name__}(sde) builds the score"
            if owner is not None and getattr(score, "__name__", "").endswith("score")
            else "wrap a plain function (t, x, args) -> score with gd.ScoreFn"
        )
    raise TypeError(
        f"{what} must be an AbstractScore (got {type(score).__name__}); {hint}"
    )


def _check_score_fn(fn):
    """`ScoreFn`'s function, checked before equinox stores it as a static field (an
    NNX network, a pytree of arrays, would also draw equinox's warning there)."""
    hint = _network_hint(fn)
    if hint is not None:
        raise TypeError(f"gd.ScoreFn got {type(fn).__name__}: {hint}")
    if not callable(fn):
        raise TypeError(f"gd.ScoreFn needs a callable, got {type(fn).__name__}")
    return fn


class ScoreFn(AbstractScore):
    """Wrap a plain function `fn(t, x, args) -> score` as a score.

    The function is a static field: arrays it closes over are compile-time constants
    and invisible to `jax.grad`. Prefer an `eqx.Module` for anything with parameters.
    A Flax network is refused (its output is a prediction, not a score: use
    `gd.flax_score`).

    **Arguments:**

    - `fn`: `fn(t, x, args) -> score` for ONE particle `x` (an array of the
      sample's shape), returning an array of the same shape.

    !!! example

        ```python
        # the exact score of N(0, I) under the VP SDE: its marginals stay N(0, I)
        sde = gd.VPSDE()
        score = gd.ScoreFn(lambda t, x, args: -x)
        out = gd.sample(jr.key(0), sde, score, (2,), num_particles=4,
                        ts=gd.uniform_grid(sde.T, 1e-3, 10))
        assert out.ys.shape == (4, 2) and int(out.num_failed) == 0
        ```
    """

    fn: Callable = eqx.field(static=True, converter=lambda fn: _check_score_fn(fn))

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return self.fn(t, x, args)


def _float_dtype(x) -> jnp.dtype:
    """`x`'s dtype if floating, else the default float (integer states would turn
    alpha and sigma into 0). Not promoted: a float32 `x` stays float32 under x64."""
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.inexact) else jnp.result_type(float)


def _check_like_x(fn: str, x, pred) -> None:
    """The prediction must have the state's shape: broadcasting a `(1,)` network
    output over a `(d,)` state would give a plausible, wrong score."""
    if isinstance(pred, tuple | list | dict):  # e.g. a network's (out, aux)
        raise TypeError(
            f"gd.{fn}: the prediction is a {type(pred).__name__}, not an array: a "
            "network must return one array shaped like the particle (drop auxiliary "
            "outputs, e.g. with a wrapper returning out[0])"
        )
    if jnp.shape(pred) != jnp.shape(x):
        raise ValueError(
            f"gd.{fn}: the prediction has shape {jnp.shape(pred)}, the state "
            f"{jnp.shape(x)}; they must be equal (one particle each)"
        )


def _wide(dt) -> jnp.dtype:
    """The conversions' arithmetic dtype: at least float32. For 16-bit states
    sigma^2 alone overflows float16 beyond sigma = 256 (a VE SDE near T) and 1/sigma
    beyond sigma < 2^-24; the result is rounded to the state's dtype once."""
    return jnp.promote_types(dt, jnp.float32)


def eps_to_score(sde: AbstractSDE, t: Time, x: Array, eps: Array) -> Array:
    r"""$s = -\varepsilon / \sigma(t)$: a noise prediction read as a score.

    Arguments: the SDE, the time `t`, the state `x` and the prediction (`eps`,
    `score` or `x0`), each of one particle, of equal shapes (no broadcasting: a
    `ValueError`); the result has `x`'s shape and dtype (as for every prediction:
    a float32 network on float64 particles gives a float64 score). It is computed
    in at least float32 and rounded once. The four
    conversions invert each other:

    !!! example

        ```python
        sde, t = gd.VPSDE(), 0.4
        x, eps = jnp.array([0.3, -1.0]), jnp.array([0.5, 0.2])
        s = gd.eps_to_score(sde, t, x, eps)
        assert jnp.allclose(gd.score_to_eps(sde, t, x, s), eps, atol=1e-6)
        x0 = gd.score_to_x0(sde, t, x, s)  # Tweedie: x = alpha x0 + sigma eps
        alpha, sigma = sde.marginal(t)
        assert jnp.allclose(alpha * x0 + sigma * eps, x, atol=1e-5)
        assert jnp.allclose(gd.x0_to_score(sde, t, x, x0), s, atol=1e-5)
        ```
    """
    _check_like_x("eps_to_score", x, eps)
    _, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(jnp.promote_types(dt, _float_dtype(eps)))
    return (-jnp.asarray(eps, wd) / sigma.astype(wd)).astype(dt)


def score_to_eps(sde: AbstractSDE, t: Time, x: Array, score: Array) -> Array:
    r"""$\varepsilon = -\sigma(t)\, s$ (see `eps_to_score` for the arguments)."""
    _check_like_x("score_to_eps", x, score)
    _, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(jnp.promote_types(dt, _float_dtype(score)))
    return (-sigma.astype(wd) * jnp.asarray(score, wd)).astype(dt)


def x0_to_score(sde: AbstractSDE, t: Time, x: Array, x0: Array) -> Array:
    r"""$s = (\alpha(t)\hat x_0 - x) / \sigma(t)^2$ (see `eps_to_score`)."""
    _check_like_x("x0_to_score", x, x0)
    alpha, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(dt)
    x, x0 = jnp.asarray(x, wd), jnp.asarray(x0, wd)
    return ((alpha.astype(wd) * x0 - x) / sigma.astype(wd) ** 2).astype(dt)


def score_to_x0(sde: AbstractSDE, t: Time, x: Array, score: Array) -> Array:
    r"""Tweedie's denoiser $\hat x_0 = (x + \sigma(t)^2 s) / \alpha(t)$ (see
    `eps_to_score`)."""
    _check_like_x("score_to_x0", x, score)
    alpha, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(dt)
    x, score = jnp.asarray(x, wd), jnp.asarray(score, wd)
    return ((x + sigma.astype(wd) ** 2 * score) / alpha.astype(wd)).astype(dt)


def v_to_score(sde: AbstractSDE, t: Time, x: Array, v: Array) -> Array:
    r"""$s = -(\sigma x + \alpha\hat v) / (\sigma(\alpha^2 + \sigma^2))$: a velocity
    prediction $\hat v = \alpha\hat\varepsilon - \sigma\hat x_0$ read as a score.

    From $x = \alpha x_0 + \sigma\varepsilon$:
    $\varepsilon = (\sigma x + \alpha v)/(\alpha^2 + \sigma^2)$ and
    $x_0 = (\alpha x - \sigma v)/(\alpha^2 + \sigma^2)$, for any SDE (on a VP SDE
    $\alpha^2 + \sigma^2 = 1$). See `eps_to_score` for the arguments.

    !!! example

        ```python
        sde, t = gd.VPSDE(), 0.4
        x, eps = jnp.array([0.3, -1.0]), jnp.array([0.5, 0.2])
        alpha, sigma = sde.marginal(t)
        x0 = (x - sigma * eps) / alpha
        v = alpha * eps - sigma * x0
        s = gd.v_to_score(sde, t, x, v)
        assert jnp.allclose(s, gd.eps_to_score(sde, t, x, eps), atol=1e-5)
        assert jnp.allclose(gd.score_to_v(sde, t, x, s), v, atol=1e-5)
        ```
    """
    _check_like_x("v_to_score", x, v)
    alpha, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(dt)
    alpha, sigma = alpha.astype(wd), sigma.astype(wd)
    x, v = jnp.asarray(x, wd), jnp.asarray(v, wd)
    return (-(sigma * x + alpha * v) / (sigma * (alpha**2 + sigma**2))).astype(dt)


def score_to_v(sde: AbstractSDE, t: Time, x: Array, score: Array) -> Array:
    r"""$v = \alpha\varepsilon - \sigma x_0 = -\sigma((\alpha^2 + \sigma^2)s + x)
    / \alpha$ (see `v_to_score`)."""
    _check_like_x("score_to_v", x, score)
    alpha, sigma = sde.marginal(t)
    dt = _float_dtype(x)
    wd = _wide(dt)
    alpha, sigma = alpha.astype(wd), sigma.astype(wd)
    x, score = jnp.asarray(x, wd), jnp.asarray(score, wd)
    return (-sigma * ((alpha**2 + sigma**2) * score + x) / alpha).astype(dt)


def denoise(
    sde: AbstractSDE, score: AbstractScore, t: Time, x: Array, args: Args = None
):
    r"""Tweedie's posterior mean $E[X_0 \mid X_t = x] = (x + \sigma^2 s(t,x))/\alpha$.

    Arguments: the SDE, a score, a time `t` in $(0, T]$, one particle `x` and the
    score's `args`. Exact for an exact score:

    !!! example

        ```python
        # X0 ~ N(m, I) under the VP SDE: E[X0 | x] = m + alpha (x - alpha m)
        sde, t, m = gd.VPSDE(), 0.5, jnp.array([1.0, 2.0])
        score = gd.Gaussian(m, 1.0).score(sde)
        x = jnp.array([0.3, -0.2])
        alpha, _ = sde.marginal(t)
        exact = m + alpha * (x - alpha * m)
        assert jnp.allclose(gd.denoise(sde, score, t, x), exact, atol=1e-5)
        ```
    """
    sde.check_time(t)
    return score_to_x0(sde, t, x, score(t, x, args))


def _check_model(kind: str, model, sde) -> None:
    """`EpsScore` / `X0Score` / `VScore` arguments: a callable `model(t, x, args)` (not a
    Linen network, which needs its variables: `gd.flax_score` wraps those; an NNX
    network itself, not its bound method, whose parameters would be constants) and a
    guidediff SDE."""
    if not isinstance(sde, AbstractSDE):
        swapped = " (arguments swapped? the model comes first)"
        raise TypeError(
            f"gd.{kind}(model, sde): sde must be a gd.AbstractSDE, got "
            f"{type(sde).__name__}"
            + (swapped if isinstance(model, AbstractSDE) else "")
        )
    owner = getattr(model, "__self__", None)
    if _is_nnx_module(owner):
        raise TypeError(
            f"gd.{kind} got a method of the Flax NNX network {type(owner).__name__}: "
            f"pass the module itself, gd.{kind}(model, sde) (a pytree: jax.grad and "
            "jit see its parameters; a bound method would hold them as constants)"
        )
    if _is_flax_module(model) or _is_flax_module(owner):
        raise TypeError(
            f"gd.{kind} got a Flax network "
            f"({type(model if owner is None else owner).__name__}), which needs its "
            "variables: use gd.flax_score(net, variables, sde, prediction=...)"
        )
    if not callable(model):
        raise TypeError(
            f"gd.{kind} needs a callable model(t, x, args), got {type(model).__name__}"
        )
    check_nnx_pytree(model, f"gd.{kind}")


class EpsScore(AbstractScore):
    r"""A noise-prediction model $\hat\varepsilon(t, x, \text{args})$ read as a score.

    $s(t, x) = -\hat\varepsilon(t, x)/\sigma(t)$.

    **Arguments:**

    - `model`: `model(t, x, args) -> eps_hat` for one particle (a pure function, or
      an `eqx.Module` or a Flax NNX module, whose arrays `jax.grad` reaches; for a
      Flax Linen network use `gd.flax_score(net, variables, sde, prediction="eps")`).
    - `sde`: the SDE whose $\sigma(t)$ the model was trained with.

    !!! example

        ```python
        # for X0 ~ N(0, I) under the VP SDE the optimal predictions are eps = sigma x
        # and x0 = alpha x; both read as the exact score, -x
        sde = gd.VPSDE()
        eps = gd.EpsScore(lambda t, x, args: sde.marginal(t)[1] * x, sde)
        x0 = gd.X0Score(lambda t, x, args: sde.marginal(t)[0] * x, sde)
        x = jnp.array([0.5, -1.0])
        assert jnp.allclose(eps(0.3, x, None), -x, atol=1e-6)
        assert jnp.allclose(x0(0.3, x, None), -x, atol=1e-5)
        ```
    """

    model: Callable
    sde: AbstractSDE

    def __check_init__(self):
        _check_model("EpsScore", self.model, self.sde)

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return eps_to_score(self.sde, t, x, self.model(t, x, args))


class X0Score(AbstractScore):
    r"""A data-prediction model $\hat x_0(t, x, \text{args})$ read as a score.

    $s(t, x) = (\alpha(t)\hat x_0(t, x) - x)/\sigma(t)^2$.

    **Arguments:**

    - `model`: `model(t, x, args) -> x0_hat` for one particle (for a Flax network
      use `gd.flax_score(net, variables, sde, prediction="x0")`).
    - `sde`: the SDE whose $\alpha(t), \sigma(t)$ the model was trained with.

    See `EpsScore` for an example with both.
    """

    model: Callable
    sde: AbstractSDE

    def __check_init__(self):
        _check_model("X0Score", self.model, self.sde)

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return x0_to_score(self.sde, t, x, self.model(t, x, args))


class VScore(AbstractScore):
    r"""A velocity-prediction model $\hat v(t, x, \text{args})$ read as a score.

    $v = \alpha\varepsilon - \sigma x_0$ (Salimans & Ho, 2022; Stable Diffusion 2's
    `v_prediction`) and
    $s(t, x) = -(\sigma(t) x + \alpha(t)\hat v(t, x))/(\sigma(t)(\alpha^2 + \sigma^2))$.

    **Arguments:**

    - `model`: `model(t, x, args) -> v_hat` for one particle (for a Flax network
      use `gd.flax_score(net, variables, sde, prediction="v")`).
    - `sde`: the SDE whose $\alpha(t), \sigma(t)$ the model was trained with.

    !!! example

        ```python
        # for X0 ~ N(0, I) under the VP SDE (alpha^2 + sigma^2 = 1), eps = sigma x and
        # x0 = alpha x are optimal, so v = alpha sigma x - sigma alpha x = 0
        sde = gd.VPSDE()
        score = gd.VScore(lambda t, x, args: jnp.zeros_like(x), sde)
        x = jnp.array([0.5, -1.0])
        assert jnp.allclose(score(0.3, x, None), -x, atol=1e-5)
        ```
    """

    model: Callable
    sde: AbstractSDE

    def __check_init__(self):
        _check_model("VScore", self.model, self.sde)

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return v_to_score(self.sde, t, x, self.model(t, x, args))
