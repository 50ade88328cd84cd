r"""The Flax adapter: the only module of guidediff's core that imports flax.

A Flax Linen network is a pure function `apply(variables, t, x, args)`. Here it is
carried into the rest of guidediff as a pytree (DESIGN.md, decision 2): a
`LinenModel` holds the `variables` as leaves and the apply function as a static
field, so `jax.grad` reaches the weights, `jit` does not bake them in as constants,
and swapping in new weights (an EMA copy, a checkpoint) does not recompile.
`flax_score` then reads the network's output as a score through `EpsScore`,
`X0Score`, `VScore` or directly:

$$s = -\hat\varepsilon/\sigma, \qquad s = (\alpha\hat x_0 - x)/\sigma^2, \qquad
s = -\frac{\sigma x + \alpha\hat v}{\sigma(\alpha^2 + \sigma^2)}, \qquad s = \hat s.$$
"""

from collections.abc import Callable, Mapping
from typing import Any, Literal

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._custom_types import Args, Scalar, Time
from ._jit import is_real_scalar
from ._sample_checks import register_shape_keyed
from ._score import (
    _NNX_HINT,
    AbstractScore,
    EpsScore,
    VScore,
    X0Score,
    _is_nnx_module,
    check_flax_variables,
    check_nnx_pytree,
)
from ._sde import AbstractSDE


class _Apply:
    """`module.apply`, compared and hashed by the module's value: a bound method
    compares by its instance's identity, so an equal module built anew (a network
    defined inside a loop) compiled `gd.sample` again. `__self__` is the module, as
    for the bound method. A module whose fields cannot be compared or hashed (an
    array field) falls back to identity, as the bound method did."""

    __slots__ = ("__self__", "__weakref__")  # jax.jit keeps weak references
    __name__ = "apply"

    def __init__(self, module: nn.Module):
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return self.__self__.apply(*args, **kwargs)

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Apply):
            return False
        a, b = self.__self__, other.__self__
        if a is b:
            return True
        try:  # by value only where both hash (so that equal means equal hashes)
            hash(a), hash(b)
            return type(a) is type(b) and bool(a == b)
        except Exception:  # an array or list field: by identity, as a bound method
            return False

    def __hash__(self) -> int:
        try:
            return hash((_Apply, self.__self__))
        except Exception:  # unhashable fields: equal only to itself (see __eq__)
            return hash((_Apply, type(self.__self__)))

    def __repr__(self) -> str:
        return f"{self.__self__!r}.apply"


def _apply_fn(module_or_apply_fn: nn.Module | Callable) -> Callable:
    if _is_nnx_module(module_or_apply_fn):
        raise TypeError(f"LinenModel is for Flax Linen networks; {_NNX_HINT}")
    if isinstance(module_or_apply_fn, nn.Module):
        return _Apply(module_or_apply_fn)
    owner = getattr(module_or_apply_fn, "__self__", None)
    if isinstance(owner, nn.Module) and module_or_apply_fn == owner.apply:
        return _Apply(owner)  # net.apply given: the same, compared by value
    if callable(module_or_apply_fn):
        return module_or_apply_fn
    raise TypeError(
        "expected a flax.linen.Module or an apply function "
        f"`apply(variables, t, x, args)`, got {type(module_or_apply_fn).__name__}"
    )


class LinenModel(eqx.Module):
    """A Flax Linen network as a pytree: `model(t, x, args) = apply_fn(variables, t, x,
    args)` for ONE particle.

    **Arguments:**

    - `variables`: the network's variables (`module.init(...)`), pytree leaves.
    - `apply_fn`: `module.apply`, or any pure `apply_fn(variables, t, x, args)`; a
      static field (hashed, not traced). A module's `apply` is compared by the
      module's value, so an equal module built anew reuses the compiled programs
      (a module with an array field only by identity: keep one instance).

    A `flax.linen.Module` may be passed in place of `apply_fn`; its `apply` is used.

    !!! example

        ```python
        net = gd.MLPScoreNet()
        variables = net.init(jax.random.key(0), 0.5, jnp.zeros(2))
        model = gd.LinenModel(variables, net)
        eps = model(0.5, jnp.ones(2), None)
        ```
    """

    variables: PyTree[Any]
    apply_fn: Callable = eqx.field(static=True)

    def __init__(self, variables: PyTree[Any], apply_fn: nn.Module | Callable):
        check_flax_variables(apply_fn, variables)
        self.variables = variables
        self.apply_fn = _apply_fn(apply_fn)

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        _check_label(getattr(self.apply_fn, "__self__", None), args)
        try:
            return self.apply_fn(self.variables, t, x, args)
        except flax.errors.ScopeCollectionNotFound as e:
            _missing_params(self.variables, e)
            raise
        except _MISFIT as e:
            _misfit(e, x)


_MISFIT = (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError)


def _misfit(error: Exception, x) -> None:
    """Flax's "expected to generate shape ..." / "could not find parameter" from a
    network applied to variables that do not fit it, with the usual causes."""
    raise ValueError(
        "the variables do not fit this network applied to a particle of shape "
        f"{jnp.shape(x)}: they were made by another network (other sizes) or for "
        "another particle shape, or the network was called on a batch (a score "
        f"takes ONE particle; jax.vmap it over a batch). Flax: {error}"
    ) from error


def _not_a_fit_result(variables) -> None:
    if hasattr(variables, "ema_params") and hasattr(variables, "opt_state"):
        raise TypeError(
            "variables is a gd.FitResult: pass its trained variables, e.g. "
            "result.ema_params (or result.params)"
        )


def _check_kind(module, wanted: str) -> None:
    """guidediff's own networks given to the other adapter: a score network's
    eps read as logits, or a classifier called with a label it does not take."""
    from ._nn import CNNClassifier, MLPScoreNet, UNet

    def stock(*classes) -> bool:  # a subclass with its own __call__ is the user's
        return any(
            isinstance(module, c) and type(module).__call__ is c.__call__
            for c in classes
        )

    if wanted == "classifier" and stock(MLPScoreNet, UNet):
        raise TypeError(
            f"{type(module).__name__} is a score network (its output is a "
            "prediction, not logits): wrap it with gd.flax_score"
        )
    if wanted == "score" and stock(CNNClassifier):
        raise TypeError(
            "CNNClassifier is a classifier (its output is logits): wrap it with "
            "gd.flax_classifier for gd.classifier_guidance"
        )


def _missing_params(variables, error) -> None:
    """A clear `TypeError` for Flax's "collection 'params' is empty" when the
    variables hold no `params` collection: `variables['params']` given in place of
    the whole dict (the check at construction sees it only for Flax's automatic
    submodule names, `Dense_0`; named submodules, `time_embed`, reach here)."""
    if isinstance(variables, Mapping) and "params" not in variables:
        keys = list(variables)[:4]
        raise TypeError(
            f"the Flax network's variables have no 'params' collection (top-level "
            f"keys: {keys}): pass the whole dict from net.init(...), "
            "{'params': ...}, not variables['params']"
        ) from error


def _check_label(module, args) -> None:
    """A concrete integer label that no row of a label embedding with
    `num_classes + 1` rows can take (for a network with an integer `num_classes`
    field): a clear error, not a lookup out of range (NaN, every particle failed).
    Negative labels down to `-(num_classes + 1)` index from the end (as
    `jnp.take` does) and pass. Traced labels pass: `gd.sample` checks the score with
    its concrete `args` first. A wrapper around the network's apply (a lambda) is
    not checked: the module is then unknown."""
    num_classes = getattr(module, "num_classes", None)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool):
        return
    if isinstance(args, jax.core.Tracer) or np.ndim(args) != 0:
        return
    if not isinstance(args, int | np.integer | np.ndarray | jax.Array):
        return
    if not np.issubdtype(np.asarray(args).dtype, np.integer):
        return
    label = int(args)
    if not -(num_classes + 1) <= label <= num_classes:
        raise ValueError(
            f"unknown class label {label}: the network {type(module).__name__} has "
            f"num_classes={num_classes}, so its labels are 0..{num_classes - 1} and "
            f"the null (unconditional) label {num_classes}"
        )


register_shape_keyed(LinenModel)  # its variables: keyed by shape in sample's check


class _DirectScore(AbstractScore):
    """A model that predicts the score itself."""

    model: Callable

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return self.model(t, x, args)


def flax_score(
    module_or_apply_fn: nn.Module | Callable,
    variables: PyTree[Any],
    sde: AbstractSDE,
    prediction: Literal["eps", "x0", "v", "score"] = "eps",
) -> AbstractScore:
    r"""Read a Flax network as a score $s(t, x, \text{args})$ of one particle.

    **Arguments:**

    - `module_or_apply_fn`: a `flax.linen.Module` whose `__call__(t, x, args)` takes
      one particle (such as `gd.MLPScoreNet` or `gd.UNet`, whose `args` is the class
      label), or an apply function `apply(variables, t, x, args)`; or a
      `flax.nnx.Module` with `__call__(t, x, args)` (in evaluation mode,
      `model.eval()`), which holds its parameters: a pytree whose arrays are
      leaves, so `jit` does not bake them in and `jax.grad` reaches them.
    - `variables`: for a Linen network the trained variables, the whole dict from
      `net.init(...)` (`{'params': ...}`, not `variables['params']`; e.g.
      `fit(...).ema_params`); `None` for an NNX module.
    - `sde`: the forward SDE the network was trained for (gives $\alpha, \sigma$).
      The network gets the SDE's continuous time $t \in (0, T]$. A network
      trained on DDPM's integer steps $n = 0, \dots, N - 1$ (linear betas from
      0.1/N to 20/N: `gd.VPSDE()`) takes about $n = N t - 1$, the step whose noise
      level is $\sigma(t)$ (within 5.5 % on $t \in [10^{-3}, 1]$ for
      $N = 1000$; score_sde's $(N - 1)\,t$ is 40 % off at $t = 10^{-3}$): pass
      `lambda v, t, x, a: net.apply(v, N * t - 1, x, a)`. Through such a
      wrapper the labels are not checked against the network's `num_classes`.
      A VE network from score_sde was trained with the noise level
      $\bar\sigma(t)$, not `gd.VESDE`'s exact $\sigma(t)$ (see `gd.VESDE`).
    - `prediction`: what the network predicts: `"eps"` the noise $\varepsilon$
      ($s = -\hat\varepsilon/\sigma$), `"x0"` the clean data
      ($s = (\alpha\hat x_0 - x)/\sigma^2$), `"v"` the velocity
      $v = \alpha\varepsilon - \sigma x_0$ ($s = -(\sigma x + \alpha\hat v) /
      (\sigma(\alpha^2 + \sigma^2))$) or `"score"` the score itself.

    The network sees ONE particle, without a batch axis (`gd.sample` vmaps it). Most
    networks trained elsewhere are written for a batch (`x` of shape `(B, ...)`,
    `t` of shape `(B,)`): give them a batch of one,
    `lambda v, t, x, a: net.apply(v, jnp.reshape(t, (1,)), x[None], a)[0]` (the
    label `jnp.reshape(a, (1,))` too if it is per example). Called without the batch axis such a network may
    still return the right shape and a wrong value (a `GroupNorm` then normalises
    over an image axis), which no check can detect.

    **Returns:** an `AbstractScore` (an `EpsScore`, `X0Score`, `VScore` or a direct
    score) whose `model` is a `LinenModel` (or the NNX module); `jax.grad` with
    respect to the variables works through it, e.g. `eqx.filter_grad` of any
    function of the score.

    !!! example

        ```python
        sde = gd.VPSDE()
        net = gd.MLPScoreNet()
        variables = net.init(jr.key(0), 0.5, jnp.zeros(2))  # or gd.fit(...).ema_params
        score = gd.flax_score(net, variables, sde)
        s = score(0.5, jnp.zeros(2), None)
        ```
    """
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got {type(sde).__name__}"
            "; the prediction kind is the fourth argument, prediction="
        )
    _not_a_fit_result(variables)
    _check_kind(module_or_apply_fn, "score")
    if _is_nnx_module(module_or_apply_fn):
        if variables is not None:
            raise TypeError(
                f"{type(module_or_apply_fn).__name__} is a Flax NNX network, which "
                "holds its own parameters: pass variables=None, "
                "gd.flax_score(model, None, sde, prediction=...)"
            )
        check_nnx_pytree(
            module_or_apply_fn,
            "gd.flax_score",
            "gd.flax_score(lambda s, t, x, a: nnx.merge(graphdef, s)(t, x, a), "
            "state, sde, prediction=...)",
        )
        model = module_or_apply_fn  # a pytree: its arrays are leaves
    elif variables is None:
        raise TypeError(
            "variables is None: a Flax Linen network needs its variables, the "
            "whole dict from net.init(...) (or gd.fit(...).ema_params)"
        )
    else:
        model = LinenModel(variables, module_or_apply_fn)
    if prediction == "eps":
        return EpsScore(model, sde)
    if prediction == "x0":
        return X0Score(model, sde)
    if prediction == "v":
        return VScore(model, sde)
    if prediction == "score":
        return _DirectScore(model)
    raise ValueError(
        f"prediction must be 'eps', 'x0', 'v' or 'score', got {prediction!r}"
    )


class _LinenLogits(eqx.Module):
    """A Linen classifier as a pytree: `logits(t, x) = apply_fn(variables, t, x)`."""

    variables: PyTree[Any]
    apply_fn: Callable = eqx.field(static=True)

    def __call__(self, t: Time, x: Array) -> Array:
        try:
            return self.apply_fn(self.variables, t, x)
        except _MISFIT as e:
            _misfit(e, x)
        except flax.errors.ScopeCollectionNotFound as e:
            _missing_params(self.variables, e)
            raise


register_shape_keyed(_LinenLogits)


class FlaxClassifier(eqx.Module):
    r"""A classifier's logits $f(t, x)$ read as
    $\log p_t(c \mid x) = \operatorname{log\,softmax}(f(t, x)/\tau)_c$ for ONE
    particle, with the class $c$ in `args`: the `log_likelihood` of
    `gd.classifier_guidance`. Built by `gd.flax_classifier`."""

    logits: Callable  # (t, x) -> (num_classes,) logits: a pytree
    temperature: Float[Array, ""]

    def __call__(self, t: Time, x: Array, args: Args = None) -> Scalar:
        logits = self.logits(t, x)
        if jnp.ndim(logits) != 1:
            raise ValueError(
                f"the classifier returned shape {jnp.shape(logits)} for one particle "
                f"of shape {jnp.shape(x)}; expected (num_classes,) logits (for a "
                "network written for a batch: lambda v, t, x: net.apply(v, "
                "jnp.reshape(t, (1,)), x[None])[0])"
            )
        label = _class_label(args, logits.shape[0])
        logp = jax.nn.log_softmax(logits / self.temperature.astype(logits.dtype))
        # A traced label out of range gives NaN, never a clamped index, in the value
        # and in its gradient (classifier guidance uses the gradient alone; a
        # jnp.where would pass it a zero gradient: unguided particles, not failed).
        ok = (label >= 0) & (label < logits.shape[0])
        nan_unless_ok = jnp.where(ok, 1.0, jnp.nan).astype(logp.dtype)
        return logp[jnp.clip(label, 0, logits.shape[0] - 1)] * nan_unless_ok


def _class_label(args, num_classes: int) -> Array:
    """`args` as one integer class label in `0..num_classes - 1` (checked when
    concrete)."""
    if args is None:
        raise TypeError(
            "the classifier's log p_t(c | x) needs the class c: give it as the "
            "sampler's args (e.g. gd.sample(..., args=3))"
        )
    label = jnp.asarray(args)
    if label.ndim != 0 or not jnp.issubdtype(label.dtype, jnp.integer):
        raise TypeError(
            "the classifier's args must be one integer class label, got "
            f"{label.dtype}{list(label.shape)}"
        )
    if not isinstance(label, jax.core.Tracer) and not 0 <= int(label) < num_classes:
        raise ValueError(
            f"unknown class label {int(label)}: the classifier has {num_classes} "
            f"classes, 0..{num_classes - 1}"
        )
    return label


def flax_classifier(
    module_or_apply_fn: nn.Module | Callable,
    variables: PyTree[Any],
    *,
    temperature: float | Array = 1.0,
) -> FlaxClassifier:
    r"""Read a Flax classifier as the log-likelihood of classifier guidance,

    $$\log p_t(c \mid x) = \operatorname{log\,softmax}\big(f(t, x)/\tau\big)_c,$$

    where $f(t, x)$ are the network's logits for ONE particle and the class $c$ is
    the sampler's `args` (an integer, checked against the number of logits).

    **Arguments:**

    - `module_or_apply_fn`: a `flax.linen.Module` with `__call__(t, x)` returning
      `(num_classes,)` logits (such as `gd.CNNClassifier(time_conditioned=True)`,
      trained with `gd.noisy_classifier_loss`), or `apply(variables, t, x)`; or a
      `flax.nnx.Module` with `__call__(t, x)` (in evaluation mode).
    - `variables`: the Linen network's whole variables dict; `None` for NNX.
    - `temperature`: $\tau > 0$ (an array leaf; default 1). Guidance with weight
      $w$ and temperature $\tau$ adds $(w/\tau)\nabla_x f_c$ minus the softmax mean.

    **Returns:** a `FlaxClassifier`, for `gd.classifier_guidance`; `jax.grad`
    reaches the variables through it.

    !!! example

        ```python
        import flax.linen as nn

        class Logits(nn.Module):  # a noisy classifier: (t, x) -> (2,) logits
            @nn.compact
            def __call__(self, t, x):
                return nn.Dense(2)(jnp.append(x, t))

        sde, clf = gd.VPSDE(), Logits()
        variables = clf.init(jr.key(0), 0.5, jnp.zeros(2))
        log_p = gd.flax_classifier(clf, variables)
        x = jnp.array([0.5, -0.2])
        p = jnp.exp(jnp.stack([log_p(0.3, x, c) for c in (0, 1)]))
        assert jnp.allclose(p.sum(), 1.0, atol=1e-5)
        s = gd.Gaussian(jnp.zeros(2), 1.0).score(sde)
        guided = gd.guide(s, gd.classifier_guidance(log_p, 2.0))
        out = gd.sample(jr.key(1), sde, guided, (2,), num_particles=4, args=1,
                        ts=gd.uniform_grid(1.0, 1e-3, 10))
        ```
    """
    _not_a_fit_result(variables)
    _check_kind(module_or_apply_fn, "classifier")
    if _is_nnx_module(module_or_apply_fn):
        if variables is not None:
            raise TypeError(
                f"{type(module_or_apply_fn).__name__} is a Flax NNX network, which "
                "holds its own parameters: pass variables=None"
            )
        check_nnx_pytree(
            module_or_apply_fn,
            "gd.flax_classifier",
            "gd.flax_classifier(lambda s, t, x: nnx.merge(graphdef, s)(t, x), state)",
        )
        logits = module_or_apply_fn
    elif variables is None:
        raise TypeError(
            "variables is None: a Flax Linen classifier needs its variables, the "
            "whole dict from net.init(...)"
        )
    else:
        check_flax_variables(module_or_apply_fn, variables)
        logits = _LinenLogits(variables, _apply_fn(module_or_apply_fn))
    if not is_real_scalar(temperature):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    if not isinstance(temperature, jax.core.Tracer):
        tau = float(temperature)
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be finite and > 0, got {tau}")
    return FlaxClassifier(logits, jnp.asarray(temperature, float))
