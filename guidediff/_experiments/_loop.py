"""A plain training loop (one jitted optax step per Python iteration) for the
convolutional networks of `cfg-digits`.

`guidediff._train.fit` runs many steps per dispatch inside a `lax.scan`; on XLA:CPU
convolution gradients inside a while loop run far slower (more than an order of
magnitude, measured when this loop was written) than the same step jitted on its
own. This loop keeps
each step a separate jitted call (a few microseconds of dispatch on a GPU). Small
MLPs train with `fit`, which is not affected; `fit(..., steps_per_dispatch=1)` now
also runs each step with no loop around it; cfg-digits keeps this loop, so its
training stays that of the committed full-mode run.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import optax


def train(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    params: Any,
    arrays: tuple,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: int,
    key,
    ema_decay: float | None = 0.999,
) -> tuple[Any, list[float]]:
    """Minimise `loss_fn(params, key, batch)` on minibatches of `arrays` (drawn with
    replacement). Returns the EMA parameters (or the last ones if `ema_decay` is
    None) and the loss of every 50th step."""
    n = arrays[0].shape[0]

    @jax.jit
    def step(state, k):
        params, opt_state, ema, i = state
        kdata, kloss = jr.split(jr.fold_in(key, k))
        idx = jr.randint(kdata, (batch_size,), 0, n)
        batch = tuple(a[idx] for a in arrays)
        loss, grads = jax.value_and_grad(loss_fn)(params, kloss, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            d = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return (params, opt_state, ema, i + 1), loss

    state = (
        params,
        optimizer.init(params),
        params if ema_decay is not None else None,
        jnp.zeros((), jnp.float32),
    )
    losses = []
    for k in range(num_steps):
        state, loss = step(state, jnp.asarray(k, jnp.uint32))
        if k % 50 == 0 or k == num_steps - 1:
            losses.append(float(loss))
    params, _, ema, _ = state
    return (ema if ema is not None else params), losses
