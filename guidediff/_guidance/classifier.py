r"""Classifier (likelihood) guidance."""

from collections.abc import Callable

import equinox as eqx
import jax

from .._weights import Weight, as_weight
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
    return ClassifierGuidance(log_likelihood, as_weight(weight))
