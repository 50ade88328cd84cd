r"""Classifier (likelihood) guidance."""

import inspect
from collections.abc import Callable

import equinox as eqx
import jax

from .._score import check_not_linen
from .._weights import Weight, as_callable_leaf, as_weight
from .base import AbstractGuidance


class ClassifierGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\nabla_x \log p_t(y\mid x)$. See `classifier_guidance`,
    which builds it and has an example.

    **Arguments:**

    - `log_likelihood`: `(t, x, args) -> log p_t(y | x)`, a scalar for one particle.
    - `weight`: $w$, a weight module $t \mapsto w(t)$ (see `gd.as_weight`).
    """

    log_likelihood: Callable
    weight: eqx.Module

    def apply(self, score, t, x, args):
        s = score(t, x, args)
        out = jax.eval_shape(self.log_likelihood, t, x, args)  # no computation
        if out.shape != ():
            raise ValueError(
                "classifier_guidance's log_likelihood must return one number "
                f"log p_t(y | x) for one particle, got shape {out.shape}; a "
                "classifier returning logits is read by gd.flax_classifier"
            )
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
    classifier this samples exactly $p(x \mid y)$: by Bayes,
    $\nabla_x\log p_t(x) + \nabla_x\log p_t(y\mid x) = \nabla_x \log p_t(x\mid y)$.

    **Arguments:**

    - `log_likelihood`: `log_likelihood(t, x, args) -> scalar`, differentiable in
      `x`; it gets the guided score's `args` (e.g. the label $y$). Pass an
      `eqx.Module` (or a `jax.tree_util.Partial`) to keep its parameters visible to
      `jax.grad`; a plain function is held as a static field. A trained Flax
      classifier returning logits (Linen or NNX, e.g. `gd.CNNClassifier` trained
      with `gd.noisy_classifier_loss`) is read by `gd.flax_classifier`. Passing the builder
      method `gmm.log_classifier` itself, uncalled, is a `TypeError`.
    - `weight`: $w$, a number, an array or a schedule $t \mapsto w(t)$; stored as
      an array leaf (see `gd.as_weight`). Default 1.

    **Returns:** a `ClassifierGuidance`, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        s = gmm.score(sde)  # unconditional: ignores args
        s_c = gmm.conditional_score(sde)  # args: the class label
        g = gd.classifier_guidance(gmm.log_classifier(sde), 1.0)
        guided = gd.guide(s, g)
        t, x = 0.3, jnp.array([0.5, -0.2])
        assert not jnp.allclose(s(t, x), s_c(t, x, 1))
        # w = 1 with the exact noisy classifier: the conditional score
        assert jnp.allclose(guided(t, x, 1), s_c(t, x, 1), atol=1e-5)
        ```
    """
    if not callable(log_likelihood):
        raise TypeError(
            "classifier_guidance needs a callable log_likelihood(t, x, args) -> "
            f"scalar, got {type(log_likelihood).__name__}"
        )
    check_not_linen(
        log_likelihood,
        "classifier_guidance",
        "a classifier returning logits is read as log p_t(c | x) by "
        "gd.flax_classifier(net, variables)",
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
