r"""Gradient (DPS-style) reward guidance through Tweedie's denoiser."""

from collections.abc import Callable

import equinox as eqx
import jax

from .._jit import check_real_scalar
from .._score import check_not_linen, score_to_x0
from .._sde import AbstractSDE
from .._weights import Weight, as_callable_leaf, as_weight
from .base import AbstractGuidance


class GradientGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\nabla_x R(\hat x_0(t, x))$. See `gradient_guidance`,
    which builds it and has an example.

    **Arguments:**

    - `reward`: $R$, `reward(x0) -> scalar` for one particle.
    - `weight`: $w$, a weight module $t \mapsto w(t)$ (see `gd.as_weight`).
    - `sde`: the SDE whose $\alpha(t), \sigma(t)$ define Tweedie's $\hat x_0$.
    """

    reward: Callable
    weight: eqx.Module
    sde: AbstractSDE

    def apply(self, score, t, x, args):
        check_real_scalar(
            jax.eval_shape(self.reward, x),  # no computation
            "gradient_guidance's reward R(x0)",
            " (reduce it, e.g. with jnp.sum, and return a float)",
        )

        def objective(x_):
            s_ = score(t, x_, args)
            return self.reward(score_to_x0(self.sde, t, x_, s_)), s_

        grad, s = jax.grad(objective, has_aux=True)(x)
        return s + self.weight(t).astype(s.dtype) * grad.astype(s.dtype)


def gradient_guidance(
    reward: Callable, weight: Weight, sde: AbstractSDE | None = None
) -> GradientGuidance:
    r"""Gradient guidance of a differentiable reward through the denoiser (DPS-style):

    $$\tilde s_t(x) = s_t(x) + w(t)\,\nabla_x R\big(\hat x_0(t, x)\big),\qquad
    \hat x_0 = \frac{x + \sigma(t)^2 s_t(x)}{\alpha(t)},$$

    differentiating through the score. `reward(x0)` is a scalar for one particle (use
    $\log r$ to approximate the tilt $p\cdot r$). This is an approximation: unlike
    `reward_guidance` it does not sample an exact tilted law. `sde` must be the SDE
    that is sampled (`gd.sample` checks).

    Near $t = T$ the term can be huge with a trained network: the Jacobian of
    $\hat x_0$ is $(I + \sigma^2 \nabla_x s)/\alpha$, where $\alpha(T)$ is
    small (0.0066 for `gd.VPSDE()`). For the exact score the two terms cancel; a
    network's score cancels them only approximately, and the remainder is divided
    by $\alpha$. With a briefly trained 2-D network and $w = 1$ on the whole time
    range, the guidance terms near $t = 1$ were so large that most particles
    overflowed to NaN (flagged as failed) and others ended finite but far off
    (not flagged: check the samples). Switch the
    guidance off at high noise, e.g. `gd.interval(gd.gradient_guidance(R, w, sde),
    0.0, 0.7)`, or use a weight schedule that vanishes as $\alpha \to 0$, as DPS
    implementations do.

    **Arguments:**

    - `reward`: $R$, `reward(x0) -> scalar`, differentiable, for one particle (it
      does not see `args`). Pass an `eqx.Module` (or a `jax.tree_util.Partial`) to
      keep its parameters visible to `jax.grad`; a plain function is held as a
      static field.
    - `weight`: $w$, a number, an array or a schedule $t \mapsto w(t)$; stored as
      an array leaf (see `gd.as_weight`).
    - `sde`: the `gd.AbstractSDE` that is sampled, for $\alpha(t)$ and
      $\sigma(t)$ in $\hat x_0$.

    **Returns:** a `GradientGuidance`, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        s = gd.Gaussian(jnp.zeros(2), 1.0).score(sde)  # p_t = N(0, I): s = -x
        c = jnp.array([1.0, -1.0])

        def R(x0):
            return -0.5 * jnp.sum((x0 - c) ** 2)

        guided = gd.guide(s, gd.gradient_guidance(R, 2.0, sde))
        t, x = 0.3, jnp.array([0.5, -0.2])
        alpha, sigma = sde.marginal(t)
        # x0_hat = (x - sigma^2 x) / alpha = alpha x, so grad_x R = alpha (c - alpha x)
        expected = -x + 2.0 * alpha * (c - alpha * x)
        assert jnp.allclose(guided(t, x), expected, atol=1e-5)
        ```
    """
    if not callable(reward):
        raise TypeError("gradient_guidance needs a callable reward(x0) -> scalar")
    check_not_linen(
        reward,
        "gradient_guidance",
        "write the reward as a function of one particle, reward(x0) -> scalar, "
        "e.g. jax.tree_util.Partial(lambda v, x0: net.apply(v, x0)[0], variables)",
    )
    if isinstance(weight, AbstractSDE):  # (reward, sde) or (reward, sde, weight)
        raise TypeError(
            "gradient_guidance(reward, weight, sde) takes the weight second and the "
            f"SDE third; got the {type(weight).__name__} as the weight"
        )
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            "gradient_guidance needs the sampled SDE, a gd.AbstractSDE, as its third "
            f"argument (its Tweedie denoiser), got {type(sde).__name__}"
        )
    return GradientGuidance(as_callable_leaf(reward), as_weight(weight), sde)
