r"""Gradient (DPS-style) reward guidance through Tweedie's denoiser."""

from collections.abc import Callable

import equinox as eqx
import jax

from .._score import score_to_x0
from .._sde import AbstractSDE
from .._weights import Weight, as_callable_leaf, as_weight
from .base import AbstractGuidance


class GradientGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\nabla_x R(\hat x_0(t, x))$. See `gradient_guidance`."""

    reward: Callable
    weight: eqx.Module
    sde: AbstractSDE

    def apply(self, score, t, x, args):
        def objective(x_):
            s_ = score(t, x_, args)
            return self.reward(score_to_x0(self.sde, t, x_, s_)), s_

        grad, s = jax.grad(objective, has_aux=True)(x)
        return s + self.weight(t).astype(s.dtype) * grad.astype(s.dtype)


def gradient_guidance(
    reward: Callable, weight: Weight, sde: AbstractSDE
) -> GradientGuidance:
    r"""Gradient guidance of a differentiable reward through the denoiser (DPS-style):

    $$\tilde s_t(x) = s_t(x) + w(t)\,\nabla_x R\big(\hat x_0(t, x)\big),\qquad
    \hat x_0 = \frac{x + \sigma(t)^2 s_t(x)}{\alpha(t)},$$

    differentiating through the score. `reward(x0)` is a scalar for one particle (use
    $\log r$ to approximate the tilt $p\cdot r$). This is an approximation: unlike
    `reward_guidance` it does not sample an exact tilted law. `sde` must be the SDE
    that is sampled (`gd.sample` checks).
    """
    if not callable(reward):
        raise TypeError("gradient_guidance needs a callable reward(x0) -> scalar")
    if not isinstance(sde, AbstractSDE):
        raise TypeError(f"sde must be a gd.AbstractSDE, got {type(sde).__name__}")
    return GradientGuidance(as_callable_leaf(reward), as_weight(weight), sde)
