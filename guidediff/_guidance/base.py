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
    r"""A score -> score transform $s \mapsto G[s]$. Implement `apply`.

    A guidance is an `eqx.Module`: its array fields (weights, parameters) are pytree
    leaves, so a new value does not recompile a jitted sampler and `jax.grad`
    reaches them. Declare numeric parameters as arrays (`factor: jax.Array`, or
    `eqx.field(converter=jnp.asarray)`): a Python float field is not an array
    leaf but a static part of the compiled sampler, so each new value compiles it
    again (guidediff warns when this repeats), and `eqx.filter_grad` skips it. It
    must be stateless (a solver may evaluate the guided score several times per
    step). Apply it with `gd.guide(score, guidance)`; compose guidances with
    `gd.chain`.

    **Methods:**

    - `apply(score, t, x, args)`: the guided score's value for ONE particle, given
      the input `score` (an `AbstractScore`, which `apply` may call several times,
      with other `args`, or differentiate through), the time `t`, the state `x` of
      shape $(d,)$ and the score's `args`. Return an array of `x`'s shape and the
      score's dtype.

    !!! example

        ```python
        class Scale(gd.AbstractGuidance):
            factor: jax.Array  # an array leaf: jax.grad reaches it

            def apply(self, score, t, x, args):
                return self.factor * score(t, x, args)

        s = gd.Gaussian(jnp.zeros(2), 1.0).score(gd.VPSDE())
        x = jnp.array([0.5, -0.2])
        guided = gd.guide(s, Scale(jnp.asarray(2.0)))
        assert isinstance(guided, gd.Guided)
        assert jnp.allclose(guided(0.3, x), 2.0 * s(0.3, x))
        # d/dk of sum(k s) is sum(s)
        dk = jax.grad(lambda k: gd.guide(s, Scale(k))(0.3, x).sum())(2.0)
        assert jnp.allclose(dk, s(0.3, x).sum())
        ```
    """

    @abc.abstractmethod
    def apply(self, score: AbstractScore, t: Time, x: Array, args: Args) -> Array:
        """The guided score's value at `(t, x, args)`, given the input `score`."""


class Guided(AbstractScore):
    r"""A score with a guidance applied, $G[s]$: what `gd.guide(score, guidance)`
    returns. It is itself a score, so it works with every SDE and solver and can be
    guided again.

    **Arguments:**

    - `score`: the input score $s$, an `AbstractScore`.
    - `guidance`: the `AbstractGuidance` $G$ applied to it.

    Calling it, `Guided(score, g)(t, x, args)`, returns
    `g.apply(score, t, x, args)`. Prefer `gd.guide`, which checks its arguments;
    see its example.
    """

    score: AbstractScore
    guidance: AbstractGuidance

    def __call__(self, t: Time, x: Array, args: Args = None) -> Array:
        return self.guidance.apply(self.score, t, x, args)


def guide(score: AbstractScore, guidance: AbstractGuidance) -> Guided:
    r"""Apply `guidance` to `score`: $s \mapsto G[s]$; the result is a score.

    **Arguments:**

    - `score`: the score to guide, an `AbstractScore` (an exact oracle's score, a
      network's, `gd.ScoreFn(fn)` for a plain function, or a guided score).
    - `guidance`: an `AbstractGuidance`, e.g. `gd.cfg(...)`, or several composed
      with `gd.chain(...)`.

    **Returns:** a `gd.Guided` score, called as `guided(t, x, args)` for one
    particle and passed to `gd.sample` like any score. Swapped arguments, or a
    `score` that is not an `AbstractScore`, raise a `TypeError`.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [0.5, 0.5, 0.5]
        )  # classes 0, 1, 2; the null label is 3
        score = gmm.conditional_score(sde)
        log_p = gmm.log_classifier(sde)  # (t, x, c) -> log p_t(c | x)
        late = gd.interval(gd.classifier_guidance(log_p), 0.0, 0.5)
        guided = gd.guide(score, gd.chain(gd.cfg(2.0, null_args=3), late))
        x = jnp.array([0.5, -0.2])

        def s_cfg(t):  # CFG with w = 2 for class 1: 3 s(x | 1) - 2 s(x)
            return 3.0 * score(t, x, 1) - 2.0 * score(t, x, 3)

        # t = 0.7 is outside [0, 0.5]: CFG only
        assert jnp.allclose(guided(0.7, x, 1), s_cfg(0.7), atol=1e-5)
        # t = 0.3 is inside: CFG, then + grad_x log p_t(1 | x)
        grad = jax.grad(log_p, argnums=1)(0.3, x, 1)
        assert jnp.allclose(guided(0.3, x, 1), s_cfg(0.3) + grad, atol=1e-5)
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
    """The identity guidance, $G[s] = s$ (what an empty `chain()` does).

    Takes no arguments: `gd.guide(score, gd.Identity())(t, x, args)` equals
    `score(t, x, args)`.
    """

    def apply(self, score, t, x, args):
        return score(t, x, args)


class Chain(AbstractGuidance):
    r"""Guidances applied in order, $G_n[\cdots G_2[G_1[s]]]$; see `chain`, which
    builds it and has an example.

    **Arguments:**

    - `guidances`: a tuple of `AbstractGuidance`, the first applied first. The
      empty tuple is the identity.
    """

    guidances: tuple[AbstractGuidance, ...]

    def apply(self, score, t, x, args):
        for g in self.guidances:
            score = Guided(score, g)
        return score(t, x, args)


def chain(*guidances: AbstractGuidance) -> Chain:
    r"""Compose guidances: `chain(g1, g2)` applies `g1` first, then `g2`,

    $$\operatorname{chain}(G_1, G_2)[s] = G_2\big[G_1[s]\big],$$

    so `guide(s, chain(g1, g2)) == guide(guide(s, g1), g2)` (optax order).

    `chain()` is the identity, and `chain(g1, chain(g2, g3)) == chain(g1, g2, g3)`.
    Each guidance transforms the score guided so far, so one that
    moves the score towards another, `reward_guidance(s_r, w)`, also scales what
    came before by 1 - w: `chain(cfg(...), reward_guidance(s_r, 1.0))` is `s_r`
    alone. `chain(reward_guidance(...), cfg(...))` applies CFG to the
    reward-guided score instead (its weight always counts).

    **Arguments:**

    - `*guidances`: any number of `AbstractGuidance`, in the order they apply
      (anything else is a `TypeError`).

    **Returns:** a `gd.Chain`, itself a guidance.

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture(
            [0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5], labels=[0, 1]
        )
        reward = gd.GaussianBumpReward(center=[1.0, 1.0], width=1.0)
        s = gmm.conditional_score(sde)
        s_r = gmm.tilt(reward).conditional_score(sde)
        g1 = gd.cfg(2.0, null_args=gmm.null_label)
        g2 = gd.reward_guidance(s_r, 0.5)
        t, x = 0.3, jnp.array([0.5, -0.2])

        both = gd.guide(s, gd.chain(g1, g2))
        assert jnp.allclose(both(t, x, 1), gd.guide(gd.guide(s, g1), g2)(t, x, 1))
        assert jnp.allclose(gd.guide(s, gd.chain())(t, x, 1), s(t, x, 1))
        # a reward term at w = 1 replaces what came before: the CFG is gone
        last = gd.guide(s, gd.chain(g1, gd.reward_guidance(s_r, 1.0)))
        assert jnp.allclose(last(t, x, 1), s_r(t, x, 1), atol=1e-5)
        # the order matters: CFG applied after the reward term
        other = gd.guide(s, gd.chain(g2, g1))
        assert not jnp.allclose(other(t, x, 1), both(t, x, 1))
        ```
    """
    for g in guidances:
        if not isinstance(g, AbstractGuidance):
            raise TypeError(f"chain takes guidances, got {type(g).__name__}")
    return Chain(tuple(guidances))


class Stateless(AbstractGuidance):
    """Post-process the score value: `fn(value, t, x, args) -> value`.

    **Arguments:**

    - `fn`: the post-processing function, a static field. Build it with
      `stateless`, which checks it and has an example.
    """

    fn: Callable = eqx.field(static=True)

    def apply(self, score, t, x, args):
        return self.fn(score(t, x, args), t, x, args)


def stateless(fn: Callable) -> Stateless:
    r"""Lift a function of the score's value to a guidance (optax's `stateless`):

    $$G[s](t, x) = f\big(s(t, x), t, x, \text{args}\big).$$

    **Arguments:**

    - `fn`: `fn(score_value, t, x, args) -> score_value`, for one particle; it
      must return an array of the score value's shape. `fn` is a static field:
      arrays it closes over are compile-time constants, invisible to `jax.grad`.
      For array parameters subclass `gd.AbstractGuidance` instead.

    **Returns:** a `Stateless` guidance.

    !!! example

        ```python
        sde = gd.VPSDE()
        s = gd.Gaussian(jnp.zeros(2), 0.1).score(sde)

        def clip(v, t, x, args):  # the score's norm clipped at 1
            return v / jnp.maximum(1.0, jnp.linalg.norm(v))

        clipped = gd.guide(s, gd.stateless(clip))
        t, x = 0.3, jnp.array([3.0, -2.0])
        v, c = s(t, x), clipped(t, x)
        assert jnp.linalg.norm(v) > 1.0  # so the clip is active
        assert jnp.allclose(c, v / jnp.linalg.norm(v))
        ```
    """
    if not callable(fn):
        raise TypeError(f"stateless takes a callable, got {type(fn).__name__}")
    return Stateless(fn)
