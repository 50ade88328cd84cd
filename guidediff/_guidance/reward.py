r"""The reward-guidance term of Jiao, Chen & Li (PAPER.md §2.3)."""

import equinox as eqx

from .._score import AbstractScore
from .._weights import Weight, as_weight
from .base import AbstractGuidance


class RewardGuidance(AbstractGuidance):
    r"""$\tilde s = s + w(t)\,(s^r - s)$. See `reward_guidance`."""

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
    and $E[r(Y^w)]$ rises with $w \ge 0$ (PAPER.md §2.4); $w < 0$ lowers it (the
    cost-reduction view).

    In a `gd.chain`, $s_t$ is the score guided so far: after `gd.cfg` the term moves
    the CFG-guided score a fraction $w$ towards $s^r$ (at $w = 1$ the CFG is gone).
    Put `reward_guidance` first for CFG on the reward-guided score.
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
