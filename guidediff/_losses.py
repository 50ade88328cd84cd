r"""Denoising score matching losses: plain, conditional (label dropout) and
reward-weighted (PAPER.md section 4).

With $x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$, $\varepsilon \sim \mathcal N(0, I)$,
the conditional score is $\nabla_{x_t}\log p(x_t \mid x_0) = -\varepsilon/\sigma(t)$
and denoising score matching minimises

$$\mathcal L(\theta) = \mathbb E_{t \sim U(t_{\min}, T]}\,\mathbb E_{x_0, \varepsilon}
\Big[\lambda(t)\,\tfrac1d\big\|s_\theta(t, x_t) + \varepsilon/\sigma(t)\big\|^2\Big],$$

whose minimiser is the true score $\nabla\log p_t$ for any weighting $\lambda > 0$
($d$ is the number of elements of one particle). The network may predict
$\varepsilon$, $x_0$, the velocity $v = \alpha\varepsilon - \sigma x_0$ or the score (see
`guidediff._score`); the residual is computed in
the prediction's own space and rescaled, so the standard choices are exact:

| `weighting` | $\lambda(t)$ | the loss equals |
|---|---|---|
| `"eps"` (default) | $\sigma^2$ | $\tfrac1d\|\hat\varepsilon - \varepsilon\|^2$ (DDPM)|
| `"x0"` | $\sigma^4/\alpha^2$ | $\tfrac1d\|\hat x_0 - x_0\|^2$ |
| `"v"` | $\sigma^2(\alpha^2 + \sigma^2)^2/\alpha^2$ | $\tfrac1d\|\hat v - v\|^2$ (Salimans & Ho) |
| `"score"` | $1$ | $\tfrac1d\|\hat s + \varepsilon/\sigma\|^2$ |
| `"likelihood"` | $g(t)^2$ | Song et al. (2021)'s likelihood weighting |
| a callable | `weighting(t)`, finite and $\ge 0$ (checked) | |

Every loss is built the same way: a per-example loss (`dsm_example_loss`), vmapped
over the minibatch, then a (weighted) mean. A custom loss is a few lines:

```python
sde, net = gd.VPSDE(), gd.MLPScoreNet()

def my_loss(params, key, batch):
    x0, r = batch
    keys = jax.random.split(key, x0.shape[0])
    per_example = jax.vmap(
        lambda k, x: gd.dsm_example_loss(net.apply, params, k, x, sde)
    )(keys, x0)
    return jnp.mean(gd.reward_weights(r) * per_example)

params = net.init(jr.key(0), 0.5, jnp.zeros(2))
x0 = gd.swiss_roll(0, 256)
loss = my_loss(params, jr.key(1), (x0, jnp.exp(x0[:, 0])))  # a scalar
```

The model function is `model_fn(params, t, x, label) -> prediction` for ONE particle,
such as a Flax module's `apply` (`label` is `None` for unconditional networks); a
Flax module itself may be passed, and its `apply` is used.
"""

import math
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._brownian import threefry_key
from ._custom_types import Key, Scalar, Time
from ._jit import is_real_scalar
from ._score import _is_flax_module, _is_nnx_module, check_flax_variables
from ._sde import AbstractSDE


ModelFn: TypeAlias = Callable[[PyTree[Any], Time, Array, Any], Array]
"""`model_fn(params, t, x, label) -> prediction`, for one particle."""

Prediction: TypeAlias = Literal["eps", "x0", "v", "score"]
Weighting: TypeAlias = (
    Literal["eps", "x0", "v", "score", "likelihood"] | Callable[[Time], Scalar]
)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------


def check_labels(
    labels: Int[ArrayLike, "..."], num_classes: int, *, allow_null: bool = True
) -> Int[Array, "..."]:
    """Check integer class labels: `0..num_classes-1`, plus the null label
    `num_classes` if `allow_null`.

    A concrete bad label raises `ValueError` now, checked on its own (e.g. int64)
    value before the conversion to JAX's default integer type, so that a label past
    the int32 range (`2**32 + 1`) is not wrapped into a valid one. Under `jit` the
    check is an `equinox.error_if`, which raises when the computation runs.
    Returns the labels as a JAX integer array.

    !!! example

        ```python
        gd.check_labels([0, 2, 3], num_classes=3)  # 3: the null label, allowed
        try:
            gd.check_labels([0, 3], num_classes=3, allow_null=False)
        except ValueError as e:
            print(e)  # names the bad label
        else:
            raise AssertionError("3 is not a class of 3")
        ```
    """
    concrete = _is_concrete(labels)
    labels = np.asarray(labels) if concrete else jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"class labels must be integers, got dtype {labels.dtype}")
    hi = num_classes if allow_null else num_classes - 1
    valid = f"0..{num_classes - 1}" + (
        f" or the null label {num_classes}" if allow_null else ""
    )
    if concrete:
        bad = (labels < 0) | (labels > hi)
        if np.any(bad):
            raise ValueError(
                f"class labels out of range: got {np.unique(labels[bad]).tolist()}, "
                f"valid labels are {valid}"
            )
        return jnp.asarray(labels)  # in range, so the conversion cannot wrap
    # compared in a wide integer: `labels > hi` in int8 wraps hi = 200 to -56
    wide = labels.astype(jnp.promote_types(labels.dtype, jnp.int32))
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger):
        wide = labels.astype(jnp.promote_types(labels.dtype, jnp.uint32))
    return eqx.error_if(
        labels, (wide < 0) | (wide > hi), f"class label out of range: valid {valid}"
    )


def reward_weights(
    rewards: Float[ArrayLike, " n"],
    *,
    temperature: float | None = None,
    reward_mean: float | None = None,
) -> Float[Array, " n"]:
    r"""Per-example weights with mean one, from rewards (PAPER.md 4.1).

    - `temperature=None`: plain rewards $r_i \ge 0$, $w_i = r_i / \bar r$ with
      $\bar r = \frac1n\sum_j r_j$. Minimising $\frac1n\sum_i w_i\ell_i$ is
      denoising score matching for the tilted law $p^r \propto p\,r$ as
      $n \to \infty$; for a finite batch see `reward_mean` below. It is
      computed as $v_i / \bar v$ with $v_i = r_i\,2^{-e}$ (the same $w_i$), $2^e$
      the power of two just above $\max_j r_j$, so the mean cannot overflow, even
      for rewards near the dtype's largest value. Subnormal rewards (below
      `finfo(dtype).tiny`) count as zero, as XLA on CPU flushes them.
    - `temperature=alpha`: an exponential tilt $r_i = \exp(R_i/\alpha)$ of signed
      rewards $R_i$, normalised in log space,
      $w_i = n\exp(R_i/\alpha - \operatorname{logsumexp}_j R_j/\alpha)$, which never
      overflows.
    - `reward_mean=m`: the data law's mean reward $m = E_p[r(X_0)]$ (of
      $\exp(R/\alpha)$ with a temperature), known or estimated once over the
      whole dataset: $w_i = r_i / m$ (computed as $\exp(R_i/\alpha - \log m)$
      with a temperature), whose batch mean is one only on average. The batch
      mean's normalisation is not a constant: it weights each example by
      $r\,E[n / (r + S_{n-1})]$ ($S_{n-1}$ the other rewards' sum), which is not
      proportional to $r$, so its minimiser tilts $p$ by slightly less than $r$
      (a bias of order $\operatorname{Var}[r] / (n\,E[r]^2)$: with two examples
      and rewards 1 or 3 equally likely, the law the loss learns puts 0.625 on
      the examples of reward 3, where $p^r$ puts 0.75). With a fixed $m$ the
      minimiser is the score of $p^r$ at any batch size. An all-zero minibatch is
      then allowed (its loss is zero).

    Negative, NaN or infinite rewards, or plain rewards that are all zero, raise a
    `ValueError` when concrete and an `equinox.error_if` error at run time under `jit`.
    Empty rewards (`n = 0`) are a `ValueError`, traced or not. The weights have
    the rewards' dtype, or float32 for 16-bit rewards (whose mean and softmax
    would keep 8 or 11 bits: weights not of mean one).

    !!! example

        ```python
        gd.reward_weights(jnp.array([0.0, 1.0, 3.0]))  # [0.0, 0.75, 2.25]
        gd.reward_weights(jnp.array([-1.0, 1.0]), temperature=0.5)
        ```
    """
    rewards = jnp.asarray(rewards)
    if jnp.issubdtype(rewards.dtype, jnp.complexfloating):
        raise TypeError(f"rewards must be real, got dtype {rewards.dtype}")
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.result_type(float))
    # 16-bit rewards are weighted in float32: a bfloat16 mean (and softmax) keeps
    # 8 bits, and the weights would not have mean one
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (n,), got {rewards.shape}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards is empty: need at least one reward")
    if reward_mean is not None:
        return _weights_over_mean(rewards, temperature, reward_mean)
    if temperature is not None:
        rewards = _check_temperature(rewards, temperature)
        if _is_concrete(rewards):
            rv = np.asarray(rewards)
            if not np.all(np.isfinite(rv)):
                raise ValueError("rewards contain NaN or inf")
        else:
            rewards = eqx.error_if(
                rewards, ~jnp.all(jnp.isfinite(rewards)), "rewards contain NaN or inf"
            )
        # shifted by the largest reward first: R / alpha alone overflows for large
        # R or small alpha (inf - inf = NaN weights)
        logw = (rewards - jnp.max(rewards)) / temperature
        return n * jnp.exp(logw - jax.nn.logsumexp(logw))
    tiny = jnp.finfo(rewards.dtype).tiny
    if _is_concrete(rewards):
        rv = np.asarray(rewards)
        if np.any(np.isnan(rv)):
            raise ValueError("rewards contain NaN")
        if np.any(rv < 0):
            raise ValueError(
                "rewards must be non-negative (a weight p*r needs r >= 0); got minimum "
                f"{rv.min()}. For a signed reward R use an exponential tilt, "
                "temperature=alpha, i.e. r = exp(R/alpha)."
            )
        if np.any(np.isinf(rv)):
            raise ValueError("rewards contain inf")
        if not np.any(rv >= tiny):
            raise ValueError(
                "rewards are all zero (or subnormal, below the smallest normal float "
                f"{tiny}): the weighted loss is undefined"
            )
    else:
        rewards = eqx.error_if(
            rewards,
            jnp.any(jnp.isnan(rewards))
            | jnp.any(rewards < 0)
            | jnp.any(jnp.isinf(rewards))
            | ~jnp.any(rewards >= tiny),
            "rewards must be finite and non-negative, and not all zero "
            "(in this minibatch)",
        )
    # Rescaled first by the power of two that brings max(r) into [1/2, 1) (exact):
    # the mean of rewards near the dtype's largest value would overflow, and
    # dividing by max(r) can become a multiplication by a subnormal reciprocal,
    # which XLA flushes to zero. The exponent is max(r)'s (>= tiny, checked above),
    # not the largest of the rewards' exponents: frexp(0) has exponent 0, which
    # outranked rewards below 1/2 and left a batch of zeros and tiny rewards
    # unscaled (a subnormal mean, flushed to zero: NaN weights).
    mant, expo = jnp.frexp(rewards)
    _, emax = jnp.frexp(jnp.max(rewards))
    scaled = jnp.ldexp(mant, expo - emax)
    return scaled / jnp.mean(scaled)


def _label_array(labels, model_fn) -> Array:
    """Per-example labels of the unconditional-or-labelled losses: one array (a
    list or tuple of numbers converts; a dict is structured conditioning). For a
    model with a `num_classes` field, concrete labels are checked against it (the
    null label allowed: labels dropped beforehand); under `vmap` the network's own
    check cannot see them, and a label past its embedding rows made the loss NaN
    (traced labels too, inside `gd.fit`: an `equinox.error_if`)."""
    num_classes = _check_conditional_model(model_fn)  # else labels are ignored
    if isinstance(labels, dict):
        raise TypeError(
            f"labels must be one (n,) array (a label or value per example), got a "
            f"{type(labels).__name__}; for structured conditioning, vmap "
            "gd.dsm_example_loss(..., label=...) over the examples yourself"
        )
    if isinstance(num_classes, int):  # traced ones: checked when the loss runs
        return check_labels(labels, num_classes)
    return jnp.asarray(labels)


def _check_batch(x0: Array, what: str, values: Array | None) -> None:
    if values is not None and (values.ndim != 1 or values.shape[0] != x0.shape[0]):
        raise ValueError(
            f"{what} must have shape ({x0.shape[0]},) to match x0 of shape "
            f"{x0.shape}, got {values.shape}"
        )


# ---------------------------------------------------------------------------------
# The per-example loss
# ---------------------------------------------------------------------------------


def _check_slot_order(name: str, slot: str, value) -> None:
    """An SDE in the `labels` / `rewards` slot: the arguments are in `dsm_loss`'s
    order, not this loss's."""
    if isinstance(value, AbstractSDE):
        raise TypeError(
            f"{name} got an SDE as `{slot}`: {slot} come before the SDE, "
            f"{name}(model_fn, params, key, x0, {slot}, sde, ...)"
        )


def _as_model_fn(model_fn, params=None):
    """`model_fn`, or a Flax module's `apply` (calling the unbound module itself
    fails with Flax's CallCompactUnboundModuleError); with `params`, also checks
    that a Flax network gets its whole variables dict."""
    if _is_nnx_module(model_fn):
        raise TypeError(
            f"{type(model_fn).__name__} is a Flax NNX network; the losses take a "
            "pure model_fn(params, t, x, label) and its params: split it, "
            "graphdef, params = nnx.split(model), and pass "
            "lambda p, t, x, c: nnx.merge(graphdef, p)(t, x, c) with params"
        )
    if params is not None:
        check_flax_variables(model_fn, params)
    return model_fn.apply if _is_flax_module(model_fn) else model_fn


def _check_conditional_model(model_fn, num_classes: int | None = None):
    """Checks of a bound `apply` whose module has a `num_classes` field (guidediff's
    networks; a user's module without one is not checked). One built without `num_classes` ignores
    the labels: the conditional scores would all be the unconditional one, and CFG
    would do nothing. One built with another `num_classes` than the loss's has its
    null label elsewhere: a smaller loss value trains a real class as the null
    one (CFG's unconditional score is never trained), a larger one feeds labels the
    network has no row for (NaN). Returns the module's `num_classes` (None when
    there is none to read)."""
    module = getattr(_as_model_fn(model_fn), "__self__", None)
    if module is None or not hasattr(module, "num_classes"):
        return None  # not a module, or one without a `num_classes` field
    built = module.num_classes
    if built is None:
        raise ValueError(
            f"the model ({type(module).__name__}.apply) was built without "
            "num_classes, so it ignores the labels: build it with num_classes=K "
            "for a class-conditional loss"
        )
    if num_classes is not None and isinstance(built, int) and built != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the model ({type(module).__name__}) was "
            f"built with num_classes={built} (its null label is {built}): pass "
            f"num_classes={built}"
        )
    return built


def _check_data(x0, *, batch: bool) -> Array:
    """Clean data: a floating-point array (integer data, e.g. uint8 images, would
    give the model x_t rounded back to integers), with at least one example."""
    if isinstance(x0, tuple | list | dict):
        raise TypeError(
            f"x0 must be one array of clean examples, got a {type(x0).__name__}: "
            "unpack a batch like (x0, labels) in your loss_fn first"
        )
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise TypeError(
            f"x0 must be a floating-point array, got dtype {x0.dtype}: scale integer "
            "data to floats first (e.g. images to [-1, 1], as gd.digits() does)"
        )
    if batch and (x0.ndim == 0 or x0.shape[0] == 0):
        raise ValueError(
            f"x0 must be a minibatch (n, *x_shape) with n >= 1, got shape {x0.shape}"
        )
    return x0


def _loss_dtype(x) -> jnp.dtype:
    """The dtype of a loss's draws and arithmetic: the data's, or float32 for 16-bit
    data (the model still sees 16-bit inputs). In float16, `sigma**4` underflows
    at small t (an infinite `x0` weighting) and a score residual's square
    overflows; in bfloat16 a mean over a minibatch keeps 8 bits."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _lambda(weighting, sde: AbstractSDE, t: Time, alpha, sigma):
    if callable(weighting):
        lam = jnp.asarray(weighting(t))
        if lam.shape != ():
            raise ValueError(
                "a callable weighting must return one number lambda(t) >= 0 for "
                f"a scalar t, got shape {lam.shape}"
            )
        # lambda < 0 would maximise the residual at those t (a silently wrong
        # score), so it is an error: now when concrete, else when the loss runs.
        # lambda = 0 is allowed: those times are not trained (e.g. a t-window).
        msg = "a callable weighting must return a finite lambda(t) >= 0"
        if _is_concrete(lam):
            if not (np.isfinite(float(lam)) and float(lam) >= 0):
                raise ValueError(f"{msg}, got {float(lam)}")
            return lam
        return eqx.error_if(lam, ~(jnp.isfinite(lam) & (lam >= 0)), msg)
    if weighting == "eps":
        return sigma**2
    if weighting == "x0":
        return sigma**4 / alpha**2
    if weighting == "v":
        return sigma**2 * (alpha**2 + sigma**2) ** 2 / alpha**2
    if weighting == "score":
        return jnp.ones_like(sigma)
    if weighting == "likelihood":
        return sde.diffusion(t) ** 2
    raise ValueError(
        "weighting must be 'eps', 'x0', 'v', 'score', 'likelihood' or a callable "
        f"t -> lambda(t), got {weighting!r}"
    )


def dsm_example_loss(
    model_fn: ModelFn,
    params: PyTree[Any],
    key: Key,
    x0: Float[Array, "*x"],
    sde: AbstractSDE,
    *,
    label: Int[ArrayLike, ""] | None = None,
    weighting: Weighting = "eps",
    t_min: float = 1e-3,
    prediction: Prediction = "eps",
) -> Scalar:
    r"""The denoising score matching loss of ONE example at a random $(t, \varepsilon)$.

    Draws $t \sim U(t_{\min}, T]$ and $\varepsilon \sim \mathcal N(0, I)$ from `key`,
    forms $x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$ and returns
    $\lambda(t)\frac1d\|\hat s(t, x_t) + \varepsilon/\sigma(t)\|^2$, with $\hat s$ the
    score read from `model_fn(params, t, x_t, label)` (see the module docstring for
    `weighting` and `prediction`). Vmap it over a minibatch for a custom loss.

    !!! example

        ```python
        sde, net = gd.VPSDE(), gd.MLPScoreNet()
        params = net.init(jr.key(0), 0.5, jnp.zeros(2))
        x0 = gd.swiss_roll(0, 256)
        keys = jax.random.split(jr.key(1), x0.shape[0])
        losses = jax.vmap(
            lambda k, x: gd.dsm_example_loss(net.apply, params, k, x, sde)
        )(keys, x0)  # shape (256,)
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    if prediction not in ("eps", "x0", "v", "score"):
        raise ValueError(
            f"prediction must be 'eps', 'x0', 'v' or 'score', got {prediction!r}"
        )
    if not isinstance(sde, AbstractSDE):
        raise TypeError(
            f"sde must be a gd.AbstractSDE (e.g. gd.VPSDE()), got {type(sde).__name__}"
        )
    if _is_concrete(t_min) and _is_concrete(sde.T) and not 0.0 <= t_min < sde.T:
        raise ValueError(f"need 0 <= t_min < T = {sde.T}, got t_min={t_min}")
    x0 = _check_data(x0, batch=False)
    data_dtype = x0.dtype
    dtype = _loss_dtype(x0)
    x0 = jnp.asarray(x0, dtype)
    kt, kz = jr.split(key)
    # t in (t_min, T], never t_min itself: with t_min = 0, sigma(0) = 0 makes eps / sigma
    # and the weight ratios infinite, and a float32 draw of U[0, T) is exactly 0 with
    # probability 2^-23 (about once in ten million examples: a NaN gradient in a long
    # run). The same uniform law, reflected.
    t = (sde.T - jr.uniform(kt, (), dtype, 0.0, sde.T - t_min)).astype(dtype)
    eps = jr.normal(kz, x0.shape, dtype)
    alpha, sigma = sde.marginal(t)
    alpha, sigma = alpha.astype(dtype), sigma.astype(dtype)
    x_t = (alpha * x0 + sigma * eps).astype(data_dtype)  # what the model sees
    out = _as_model_fn(model_fn, params)(params, t, x_t, label)
    if out.shape != x0.shape:
        raise ValueError(
            f"the model returned shape {out.shape} for an input of shape {x0.shape}"
        )
    out = out.astype(dtype)
    if prediction == "eps":
        residual = out - eps
    elif prediction == "x0":
        residual = out - x0
    elif prediction == "v":
        residual = out - (alpha * eps - sigma * x0)
    else:
        residual = out + eps / sigma
    loss = jnp.mean(residual**2)
    if weighting == prediction:
        return loss
    natural = _lambda(prediction, sde, t, alpha, sigma)
    return (_lambda(weighting, sde, t, alpha, sigma) / natural).astype(dtype) * loss


def _per_example(
    model_fn, params, key, x0, sde, labels, weighting, t_min, prediction
) -> Float[Array, " n"]:
    keys = jr.split(key, x0.shape[0])

    def one(k, x, label):
        return dsm_example_loss(
            model_fn,
            params,
            k,
            x,
            sde,
            label=label,
            weighting=weighting,
            t_min=t_min,
            prediction=prediction,
        )

    try:
        return jax.vmap(one)(keys, x0, labels)
    except Exception as e:
        if x0.ndim == 1:  # a likely cause: ONE example passed without its batch axis
            e.add_note(
                f"(the loss read x0 of shape {x0.shape} as a minibatch of "
                f"{x0.shape[0]} examples of shape (); if x0 is ONE example of shape "
                f"{x0.shape}, pass x0[None]: a minibatch is (n, *x_shape))"
            )
        raise


# ---------------------------------------------------------------------------------
# Minibatch losses
# ---------------------------------------------------------------------------------


def dsm_loss(
    model_fn: ModelFn,
    params: PyTree[Any],
    key: Key,
    x0: Float[Array, " n *x"],
    sde: AbstractSDE,
    *,
    weighting: Weighting = "eps",
    t_min: float = 1e-3,
    labels: Int[ArrayLike, " n"] | None = None,
    prediction: Prediction = "eps",
) -> Scalar:
    r"""Denoising score matching on a minibatch `x0` (examples stacked on axis 0).

    The mean over the batch of `dsm_example_loss`: each example gets its own
    $t \sim U(t_{\min}, T]$ and noise. With the defaults (`prediction="eps"`,
    `weighting="eps"`) this is
    $\frac1n\sum_i \frac1d\|\hat\varepsilon(t_i, x_{t_i}) - \varepsilon_i\|^2$, i.e.
    $\lambda(t) = \sigma(t)^2$ on the score loss.

    **Arguments:**

    - `model_fn`: `model_fn(params, t, x, label)` for one particle, e.g. `net.apply`.
    - `params`: the network variables.
    - `key`: a PRNG key (times and noises).
    - `x0`: the clean minibatch, shape `(n, *x_shape)`. For 16-bit data the times,
      the noise and the loss are float32 (the model sees 16-bit $x_t$), so the loss
      is float32.
    - `sde`: the forward SDE.
    - `weighting`, `prediction`: see the module docstring.
    - `t_min`: the smallest training time.
    - `labels`: optional `(n,)` labels passed to the model (see
      `conditional_dsm_loss` for label dropout); for a network with a
      `num_classes` field $K$, concrete labels must lie in `0..K` ($K$ the null
      label), as `gd.check_labels` checks.

    !!! example

        ```python
        sde = gd.VPSDE()
        net = gd.MLPScoreNet()
        params = net.init(jr.key(0), 0.5, jnp.zeros(2))
        loss_fn = lambda params, key, x0: gd.dsm_loss(net.apply, params, key, x0, sde)
        loss = loss_fn(params, jr.key(1), gd.swiss_roll(0, 256))  # a scalar
        # to train: gd.fit(loss_fn, params, data, optimizer=optax.adam(1e-3), ...)
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    x0 = _check_data(x0, batch=True)
    if labels is not None:
        labels = _label_array(labels, model_fn)
        _check_batch(x0, "labels", labels)
    per = _per_example(
        model_fn, params, key, x0, sde, labels, weighting, t_min, prediction
    )
    return jnp.mean(per)


def drop_labels(
    key: Key, labels: Int[ArrayLike, " n"], num_classes: int, p_uncond: float
) -> Int[Array, " n"]:
    """Replace each label by the null label `num_classes` with probability
    `p_uncond` (classifier-free guidance's label dropout). Checks the labels.

    **Arguments:** `key`; `labels`, integers in `0..num_classes` (`num_classes`
    itself is already the null label); `num_classes`, $K$; `p_uncond` in $[0, 1]$.
    Returns the labels (at least int32, so the null label fits).

    !!! example

        ```python
        labels = jnp.arange(10_000) % 3
        dropped = gd.drop_labels(jr.key(0), labels, num_classes=3, p_uncond=0.2)
        null = dropped == 3
        assert jnp.all((dropped == labels) | null)  # kept, or the null label
        assert abs(float(null.mean()) - 0.2) < 4 * (0.2 * 0.8 / 10_000) ** 0.5
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    labels = check_labels(labels, num_classes, allow_null=True)
    if _is_concrete(p_uncond) and not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    drop = jr.bernoulli(key, p_uncond, labels.shape)
    # at least int32: the null label num_classes may not fit the labels' dtype
    # (uint8 labels of 256 classes)
    labels = labels.astype(jnp.promote_types(labels.dtype, jnp.int32))
    return jnp.where(drop, jnp.asarray(num_classes, labels.dtype), labels)


def conditional_dsm_loss(
    model_fn: ModelFn,
    params: PyTree[Any],
    key: Key,
    x0: Float[Array, " n *x"],
    labels: Int[ArrayLike, " n"],
    sde: AbstractSDE,
    *,
    num_classes: int,
    p_uncond: float = 0.1,
    weighting: Weighting = "eps",
    t_min: float = 1e-3,
    prediction: Prediction = "eps",
) -> Scalar:
    r"""Conditional denoising score matching with label dropout, training the
    conditional scores $s(t, x \mid c)$ and the unconditional score
    $s(t, x) = s(t, x \mid \varnothing)$ in one network.

    Each label is replaced by the null label $\varnothing$ = `num_classes` with
    probability `p_uncond`, then the loss is `dsm_loss` with the (dropped) labels
    passed to the model. Labels must lie in `0..num_classes` (a label already equal
    to `num_classes` is an unlabelled example); anything else is an error.

    **Arguments:**

    - `model_fn`, `params`, `key`, `x0`, `sde`, `weighting`, `t_min`, `prediction`:
      as in `dsm_loss` (`model_fn(params, t, x, label)` for one particle). A
      network of guidediff's must be built with `num_classes` (else it ignores the
      labels); a module of your own with a field named `num_classes` is checked
      against the `num_classes` given here, one without such a field is not.
    - `labels`: `(n,)` integer class of each example, in `0..num_classes`.
    - `num_classes`: $K$; the null label is $K$ (so the network's label embedding
      needs $K + 1$ entries, as `gd.MLPScoreNet(num_classes=K)` has).
    - `p_uncond`: the probability of dropping a label to the null label, in
      $[0, 1]$ (0.1-0.2 is usual for CFG).

    !!! example

        ```python
        sde = gd.VPSDE()
        net = gd.MLPScoreNet(num_classes=3)
        params = net.init(jr.key(0), 0.5, jnp.zeros(2))

        def loss_fn(params, key, batch):
            x0, labels = batch
            return gd.conditional_dsm_loss(
                net.apply, params, key, x0, labels, sde, num_classes=3, p_uncond=0.2
            )

        labels = jnp.arange(256) % 3
        x0 = jnp.stack([labels - 1.0, jnp.zeros(256)], axis=1)  # class c near (c-1, 0)
        loss = loss_fn(params, jr.key(1), (x0, labels))  # a scalar
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    _check_slot_order("conditional_dsm_loss", "labels", labels)
    _check_conditional_model(model_fn, num_classes)
    x0 = _check_data(x0, batch=True)
    # Concrete labels stay numpy until checked (in `drop_labels`): a conversion to
    # JAX's int32 first would wrap a label like 2**32 + 1 into a valid one.
    labels = np.asarray(labels) if _is_concrete(labels) else jnp.asarray(labels)
    _check_batch(x0, "labels", labels)
    kdrop, kloss = jr.split(key)
    labels = drop_labels(kdrop, labels, num_classes, p_uncond)
    per = _per_example(
        model_fn, params, kloss, x0, sde, labels, weighting, t_min, prediction
    )
    return jnp.mean(per)


def _check_temperature(rewards, temperature):
    """A positive real temperature (checked on the host when concrete; at run time,
    on `rewards`, when traced)."""
    if not is_real_scalar(temperature):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    if _is_concrete(temperature):
        tiny = float(jnp.finfo(rewards.dtype).tiny)
        if not float(temperature) >= tiny:  # a subnormal one is flushed to 0
            raise ValueError(
                f"temperature must be positive (at least {tiny:.3g} in "
                f"{rewards.dtype}), got {temperature}"
            )
        return rewards
    # a traced one (e.g. swept under jit): negative would flip the tilt
    return eqx.error_if(rewards, ~(temperature > 0), "temperature must be positive")


def _check_rewards(rewards, temperature):
    """With a given mean reward: finite rewards, non-negative without a
    temperature, a positive temperature."""
    if temperature is not None:
        rewards = _check_temperature(rewards, temperature)
    if _is_concrete(rewards):  # NumPy: jnp ops on constants are staged under jit
        rv = np.asarray(rewards)
        bad = ~np.isfinite(rv) | ((rv < 0) if temperature is None else False)
        if np.any(bad):
            raise ValueError(
                "rewards must be finite"
                + ("" if temperature is not None else " and non-negative")
            )
        return rewards
    bad = ~jnp.isfinite(rewards)
    if temperature is None:
        bad = bad | (rewards < 0)
    return eqx.error_if(rewards, jnp.any(bad), "rewards must be finite (and >= 0)")


def _weights_over_mean(rewards, temperature, reward_mean):
    r"""$w_i = r_i / m$ for a given mean reward $m$ (see `reward_weights`). A
    concrete $m$ is split on the host (its logarithm, or its mantissa and binary
    exponent), never rounded to the rewards' dtype first: the mean of
    $\exp(R/\alpha)$ is often beyond float32's range while the weights are not."""
    if not is_real_scalar(reward_mean):
        raise TypeError(f"reward_mean must be a real number, got {reward_mean!r}")
    if _is_concrete(reward_mean):
        m = float(reward_mean)
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"reward_mean must be finite and positive, got {m}")
        log_m = math.log(m)
        mant, expo = math.frexp(m)
    else:
        m = jnp.asarray(reward_mean)
        m = eqx.error_if(
            m, ~(jnp.isfinite(m) & (m > 0)), "reward_mean must be finite and positive"
        )
        # the log in at least the rewards' precision (a 16-bit one kept 11 bits)
        log_m = jnp.log(m.astype(jnp.promote_types(m.dtype, rewards.dtype)))
        log_m = log_m.astype(rewards.dtype)
        mant, expo = jnp.frexp(m)
    rewards = _check_rewards(rewards, temperature)
    if temperature is not None:
        return jnp.exp(rewards / temperature - log_m)
    # r / m = (r / mant) 2^-expo, with m's mantissa and exponent: no overflow or
    # flush of m itself. A positive exponent is applied first (r / mant alone
    # doubles r near the dtype's largest value), a negative one last.
    mant, expo = jnp.asarray(mant, rewards.dtype), jnp.asarray(expo)
    first = jnp.ldexp(rewards, -jnp.maximum(expo, 0)) / mant
    return jnp.ldexp(first, -jnp.minimum(expo, 0))


def reward_weighted_dsm_loss(
    model_fn: ModelFn,
    params: PyTree[Any],
    key: Key,
    x0: Float[Array, " n *x"],
    rewards: Float[ArrayLike, " n"] | Callable[[Array], Scalar],
    sde: AbstractSDE,
    *,
    temperature: float | None = None,
    reward_mean: float | None = None,
    weighting: Weighting = "eps",
    t_min: float = 1e-3,
    labels: Int[ArrayLike, " n"] | None = None,
    prediction: Prediction = "eps",
) -> Scalar:
    r"""Reward-weighted denoising score matching (PAPER.md 4.1).

    $$\mathcal L(\phi) = \frac1n\sum_i w_i\,\ell_i(\phi), \qquad
    w_i = \frac{r(x_0^{(i)})}{\frac1n\sum_j r(x_0^{(j)})},$$

    with $\ell_i$ the per-example DSM loss (`dsm_example_loss`). Because
    $E_p[r(X_0)f(X_0)] = E_p[r]\,E_{p^r}[f]$, its minimiser is the score of the tilted
    law $p^r \propto p\,r$: the network learns $\hat s^r$ from $(x_0, r(x_0))$ pairs
    alone, with no trajectories and no reward gradients. Normalising by the batch
    mean is a self-normalised estimate: its minimiser is the score of $p^r$ as
    $n \to \infty$, and slightly less tilted for a finite batch (a bias of order
    $\operatorname{Var}[r] / (n\,E[r]^2)$, see `reward_weights`); pass
    `reward_mean` $= E_p[r]$ for the exact tilt at any batch size.

    **Arguments:**

    - `rewards`: `(n,)` reward values $r(x_0^{(i)}) \ge 0$, or a function of one
      example (vmapped here). With `temperature=alpha` they are signed rewards $R$
      and the tilt is $\exp(R/\alpha)$, normalised in log space (see
      `reward_weights`).
    - `reward_mean`: the data law's mean reward $E_p[r(X_0)]$ (of
      $\exp(R/\alpha)$ with a temperature): weights $r_i / E_p[r]$ instead of
      $r_i / \bar r$ (see `reward_weights`).
    - the other arguments as in `dsm_loss`.

    Negative, NaN or all-zero rewards raise a `ValueError` (under `jit`, an
    `equinox.error_if` error when the computation runs, where an all-zero minibatch
    is also an error: make sure minibatches carry reward).

    !!! example

        ```python
        sde, net = gd.VPSDE(), gd.MLPScoreNet()
        params = net.init(jr.key(0), 0.5, jnp.zeros(2))
        reward = lambda x: jnp.exp(-0.5 * jnp.sum((x - 1.0) ** 2) / 0.5**2)

        def loss_fn(params, key, x0):
            return gd.reward_weighted_dsm_loss(net.apply, params, key, x0, reward, sde)

        loss = loss_fn(params, jr.key(1), gd.swiss_roll(0, 256))  # a scalar
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    _check_slot_order("reward_weighted_dsm_loss", "rewards", rewards)
    x0 = _check_data(x0, batch=True)
    if callable(rewards):
        rewards = jax.vmap(rewards)(x0)
    rewards = jnp.asarray(rewards)
    _check_batch(x0, "rewards", rewards)
    if labels is not None:
        labels = _label_array(labels, model_fn)
        _check_batch(x0, "labels", labels)
    w = reward_weights(rewards, temperature=temperature, reward_mean=reward_mean)
    per = _per_example(
        model_fn, params, key, x0, sde, labels, weighting, t_min, prediction
    )
    return jnp.mean(w.astype(per.dtype) * per)


def noisy_classifier_loss(
    model_fn: Callable[[PyTree[Any], Time, Array], Array],
    params: PyTree[Any],
    key: Key,
    x0: Float[Array, " n *x"],
    labels: Int[ArrayLike, " n"],
    sde: AbstractSDE | None,
    *,
    num_classes: int,
    t_min: float = 1e-3,
) -> Scalar:
    r"""Cross-entropy of a (noisy) classifier, for classifier guidance.

    With an `sde`, each example is noised to
    $x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$, $t \sim U[t_{\min}, T]$, and the loss
    is $-\frac1n\sum_i\log\operatorname{softmax}(f_\theta(t_i, x_{t_i}))_{c_i}$,
    whose minimiser is the noisy posterior $p_t(c \mid x_t)$. With
    `sde=None` the classifier is trained on clean data ($t = 0$).
    `model_fn(params, t, x) -> logits` takes one particle, e.g. `CNNClassifier.apply`.

    The logits must have shape `(num_classes,)`, and `0 <= t_min < T` (with an
    `sde`); anything else is a `ValueError` (the logits' shape is checked when
    the loss is traced).

    **Arguments:**

    - `model_fn`, `params`: the classifier, `model_fn(params, t, x) -> logits`.
    - `key`: draws the times and the noise.
    - `x0`: `(n, *shape)` clean examples; `labels`: their `(n,)` classes.
    - `sde`: the SDE the sampler uses (the classifier must know its noise), or
      `None` for a clean-data classifier.
    - `num_classes`: $K$; `t_min`: the smallest training time.

    !!! example

        ```python
        # a linear classifier: separating the classes lowers the loss below chance
        sde = gd.VPSDE()
        labels = jnp.arange(512) % 2
        x0 = jnp.stack([4.0 * labels - 2.0, jnp.zeros(512)], axis=1)  # at (+-2, 0)

        def logits(params, t, x):
            return params * jnp.stack([-x[0], x[0]])

        loss = lambda p: gd.noisy_classifier_loss(
            logits, p, jr.key(0), x0, labels, sde, num_classes=2
        )
        assert loss(jnp.asarray(0.5)) < loss(jnp.asarray(0.0))  # 0: chance, log 2
        assert jnp.allclose(loss(jnp.asarray(0.0)), jnp.log(2.0))
        ```
    """
    key = threefry_key(key)  # others hashed: vmap over keys == a loop
    if sde is not None and not isinstance(sde, AbstractSDE):
        raise TypeError(
            "sde must be a gd.AbstractSDE (e.g. gd.VPSDE()) or None (a clean-data "
            f"classifier), got {type(sde).__name__}"
        )
    if (
        sde is not None
        and _is_concrete(t_min)
        and _is_concrete(sde.T)
        and not 0.0 <= t_min < sde.T
    ):
        raise ValueError(f"need 0 <= t_min < T = {sde.T}, got t_min={t_min}")
    x0 = _check_data(x0, batch=True)
    labels = check_labels(labels, num_classes, allow_null=False)
    _check_batch(x0, "labels", labels)
    keys = jr.split(key, x0.shape[0])

    dtype = _loss_dtype(x0)  # float32 draws and loss for 16-bit data

    def one(k, x, c):
        if sde is None:
            t = jnp.zeros((), dtype)
            x_t = x
        else:
            kt, kz = jr.split(k)
            t = jr.uniform(kt, (), dtype, minval=t_min, maxval=sde.T)
            noise = jr.normal(kz, x.shape, dtype)
            x_t = sde.perturb(t, x.astype(dtype), noise).astype(x.dtype)
        logits = _as_model_fn(model_fn, params)(params, t, x_t)
        if jnp.shape(logits) != (num_classes,):
            raise ValueError(
                f"the classifier returned logits of shape {jnp.shape(logits)} for "
                f"one particle, expected ({num_classes},) for num_classes="
                f"{num_classes}"
            )
        logits = jnp.asarray(logits).astype(dtype)
        return optax.softmax_cross_entropy_with_integer_labels(logits, c)

    return jnp.mean(jax.vmap(one)(keys, x0, labels))
