r"""Classifier (likelihood) guidance."""

import inspect
from collections.abc import Callable

import equinox as eqx
import jax

from .._weights import Weight, as_callable_leaf, as_weight
from .base import AbstractGuidance


class ClassifierGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\nabla_x \log p_t(y\mid x)$. See `classifier_guidance`."""

    log_likelihood: Callable
    weight: eqx.Module

    def apply(self, score, t, x, args):
        s = score(t, x, args)
        grad = jax.grad(lambda x_: self.log_likelihood(t, x_, args))(x)
        return s + self.weight(t).astype(s.dtype) * grad.astype(s.dtype)


def classifier_guidance(
    log_likelihood: Callable, weight: Weight = 1.0
) -> ClassifierGuidance:
    r"""Classifier guidance (Dhariwal & Nichol):

    $$\tilde s_t(x) = s_t(x) + w(t)\,\nabla_x\log p_t(y \mid x),$$

    with `log_likelihood(t, x, args)` a differentiable scalar for one particle (e.g. a
    noisy classifier's log-probability of the label in `args`, or
    `GaussianMixture.log_classifier(sde)`). With $w = 1$ and the exact noisy
    classifier this samples exactly $p(x \mid y)$. Pass an `eqx.Module` to keep its
    parameters visible to `jax.grad`.
    """
    if not callable(log_likelihood):
        raise TypeError(
            "classifier_guidance needs a callable log_likelihood(t, x, args) -> "
            f"scalar, got {type(log_likelihood).__name__}"
        )
    owner = getattr(log_likelihood, "__self__", None)
    if owner is not None and _takes_only_sde(log_likelihood):
        name = f"{type(owner).__name__}.{log_likelihood.__name__}"
        raise TypeError(
            f"classifier_guidance got the method {name} itself; call it: "
            f"{name}(sde) builds the classifier log p_t(c | x)"
        )
    return ClassifierGuidance(as_callable_leaf(log_likelihood), as_weight(weight))


def _takes_only_sde(method) -> bool:
    """A builder method such as `GaussianMixture.log_classifier(sde)`."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return list(params) == ["sde"]
