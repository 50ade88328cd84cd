r"""The reward-guidance term of Jiao, Chen & Li (PAPER.md §2.3)."""

import equinox as eqx

from .._score import AbstractScore
from .._weights import Weight, as_weight
from .base import AbstractGuidance


class RewardGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\,(s^r - s)$. See `reward_guidance`, which builds it
    and has an example.

    **Arguments:**

    - `reward_score`: $s^r$, the score of the reward-reweighted law $p^r$.
    - `weight`: $w$, a weight module $t \mapsto w(t)$ (see `gd.as_weight`).
    """

    reward_score: AbstractScore
    weight: eqx.Module

    def apply(self, score, t, x, args):
        s = score(t, x, args)
        s_r = self.reward_score(t, x, args)
        return s + self.weight(t).astype(s.dtype) * (s_r.astype(s.dtype) - s)


def reward_guidance(
    reward_score: AbstractScore, weight: Weight = 1.0
) -> RewardGuidance:
    r"""Reward guidance: inject $w(s^r - s)$ into the backward SDE (PAPER.md §2.3),

    $$\tilde s_t = s_t + w(t)\big(s^r_t - s_t\big),$$

    where $s^r_t$ is the score of the reward-reweighted law $p^r \propto p\,r$
    (exact, e.g. `gmm.tilt(reward).score(sde)`, or trained by reward-weighted
    denoising score matching). $w = 0$ samples $p$, $w = 1$ samples $p^r$ exactly,
    and $E[r(Y^w)] \ge E_p[r]$ for every $w \ge 0$ (PAPER.md §2.4: the gain is $w$
    times a nonnegative integral along the guided paths, so it is not proven to
    rise with $w$, though it does in the mixtures tested); $w < 0$ lowers it below
    $E_p[r]$ (the cost-reduction view).

    In a `gd.chain`, $s_t$ is the score guided so far: after `gd.cfg` the term moves
    the CFG-guided score a fraction $w$ towards $s^r$ (at $w = 1$ the CFG is gone).
    Put `reward_guidance` first for CFG on the reward-guided score.

    **Arguments:**

    - `reward_score`: $s^r$, an `AbstractScore` of the tilted law, called with the
      same `(t, x, args)` as the guided score. A reward itself is a `TypeError`:
      pass the score of its tilt (or use `gd.gradient_guidance`).
    - `weight`: $w$, a number, an array or a schedule $t \mapsto w(t)$ (e.g.
      `gd.PiecewiseLinear`); stored as an array leaf (see `gd.as_weight`).
      Default 1.

    **Returns:** a `RewardGuidance`, for `gd.guide` or `gd.chain`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        reward = gd.GaussianBumpReward(center=[1.0, 1.0], width=1.0)
        s, s_r = gmm.score(sde), gmm.tilt(reward).score(sde)  # p and p^r
        t, x = 0.3, jnp.array([0.5, -0.2])
        assert not jnp.allclose(s(t, x), s_r(t, x))  # the tilt moves the score

        full = gd.guide(s, gd.reward_guidance(s_r, 1.0))
        assert jnp.allclose(full(t, x), s_r(t, x), atol=1e-5)  # w = 1: s^r
        half = gd.guide(s, gd.reward_guidance(s_r, 0.5))
        assert jnp.allclose(half(t, x), 0.5 * (s(t, x) + s_r(t, x)), atol=1e-5)

        # here E[r(Y^w)] rises with w, from E_p[r] at w = 0 to E_{p^r}[r] at w = 1
        e_p, e_pr = reward.expectation(gmm), reward.expectation(gmm.tilt(reward))
        assert jnp.allclose(jnp.array([e_p, e_pr]), jnp.array([0.18, 0.51]), atol=0.01)
        ts = gd.uniform_grid(sde.T, 1e-3, 20)

        def mean_reward(w):  # 64 particles, shared noise
            guided = gd.guide(s, gd.reward_guidance(s_r, w))
            ys = gd.sample(jr.key(0), sde, guided, (2,), num_particles=64, ts=ts).ys
            return jax.vmap(reward)(ys).mean()

        assert mean_reward(1.0) > mean_reward(0.0) + 0.2
        ```
    """
    if not isinstance(reward_score, AbstractScore):
        hint = ""
        if hasattr(reward_score, "tilt_mixture"):
            hint = (
                ": this is a reward; pass the score of the tilted law, e.g. "
                "gmm.tilt(reward).score(sde) (or gd.gradient_guidance for a "
                "differentiable reward)"
            )
        raise TypeError(
            "`reward_score` must be an AbstractScore (the score of the "
            f"reward-reweighted law), got {type(reward_score).__name__}{hint}"
        )
    return RewardGuidance(reward_score, as_weight(weight))
