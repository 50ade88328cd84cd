r"""The guidance abstraction: a pure map from a score to a score.

A guidance $G$ turns a score $s(t, x, \text{args})$ into a guided score $G[s]$. It is
stateless (diffrax evaluates a vector field several times per step) and it transforms
the score *function*, not its value, because classifier-free guidance evaluates the
score twice and gradient guidance differentiates through it. `chain(g1, g2)` applies
`g1` first and `g2` to the result (optax order): `guide(s, chain(g1, g2)) ==
guide(guide(s, g1), g2)`. A guided score is itself a score, so it works with every
SDE and solver.
"""

import abc
from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array

from .._custom_types import Args, Time
from .._score import AbstractScore, check_score


class AbstractGuidance(eqx.Module):
    """A score -> score transform. Implement `apply(score, t, x, args)`."""

    @abc.abstractmethod
    def apply(self, score: AbstractScore, t: Time, x: Array, args: Args) -> Array:
        """The guided score's value at `(t, x, args)`, given the input `score`."""


class Guided(AbstractScore):
    """A score with a guidance applied: `Guided(score, g)(t, x, args)`."""

    score: AbstractScore
    guidance: AbstractGuidance

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return self.guidance.apply(self.score, t, x, args)


def guide(score: AbstractScore, guidance: AbstractGuidance) -> Guided:
    """Apply `guidance` to `score`; the result is a score.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.5, 0.5, 0.5]
        )  # classes 0, 1, 2; the null label is 3
        score = gmm.conditional_score(sde)
        late = gd.interval(gd.classifier_guidance(gmm.log_classifier(sde)), 0.0, 0.5)
        guided = gd.guide(score, gd.chain(gd.cfg(2.0, null_args=3), late))
        s = guided(0.3, jnp.zeros(2), 1)  # the guided score of class 1
        ```
    """
    if isinstance(score, AbstractGuidance) and isinstance(guidance, AbstractScore):
        raise TypeError(
            "gd.guide(score, guidance): the arguments are swapped (got a "
            f"{type(score).__name__} first and a {type(guidance).__name__} second)"
        )
    check_score(score, "the score to guide")
    if not isinstance(guidance, AbstractGuidance):
        raise TypeError(f"expected an AbstractGuidance, got {type(guidance).__name__}")
    return Guided(score, guidance)


class Identity(AbstractGuidance):
    """The identity guidance (what an empty `chain()` is)."""

    def apply(self, score, t, x, args):
        return score(t, x, args)


class Chain(AbstractGuidance):
    """Guidances applied in order; see `chain`."""

    guidances: tuple[AbstractGuidance, ...]

    def apply(self, score, t, x, args):
        for g in self.guidances:
            score = Guided(score, g)
        return score(t, x, args)


def chain(*guidances: AbstractGuidance) -> Chain:
    """Compose guidances: `chain(g1, g2)` applies `g1` first, then `g2`.

    `chain()` is the identity, and `chain(g1, chain(g2, g3)) == chain(g1, g2, g3)`.
    Each guidance transforms the score guided so far (optax order), so one that
    moves the score towards another, `reward_guidance(s_r, w)`, also scales what
    came before by 1 - w: `chain(cfg(...), reward_guidance(s_r, 1.0))` is `s_r`
    alone. `chain(reward_guidance(...), cfg(...))` applies CFG to the
    reward-guided score instead (its weight always counts).
    """
    for g in guidances:
        if not isinstance(g, AbstractGuidance):
            raise TypeError(f"chain takes guidances, got {type(g).__name__}")
    return Chain(tuple(guidances))


class Stateless(AbstractGuidance):
    """Post-process the score value: `fn(value, t, x, args) -> value` (see `stateless`)."""

    fn: Callable = eqx.field(static=True)

    def apply(self, score, t, x, args):
        return self.fn(score(t, x, args), t, x, args)


def stateless(fn: Callable) -> Stateless:
    """Lift `fn(score_value, t, x, args) -> score_value` to a guidance (optax's
    `stateless`). `fn` is static: put array parameters in a Module instead."""
    if not callable(fn):
        raise TypeError(f"stateless takes a callable, got {type(fn).__name__}")
    return Stateless(fn)
