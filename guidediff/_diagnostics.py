r"""Diagnostics of a guided sampler along its trajectory.

`guidance_norms` measures where in time a guidance acts and how strongly: for a
guided score $\tilde s_t = s_t + \Delta_t$ (`gd.guide(s, guidance)`) and a saved
trajectory $Y_{t_k}$ (`gd.sample(..., save_trajectory=True)`), the mean over the
particles of $\|\Delta_{t_k}(Y_{t_k})\|$ at every saved time, with its standard
error. It is a pure function of arrays, so it can run inside `jax.jit`.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Args
from ._guidance.base import Guided
from ._metrics import _check_finite, _safe_sqrt


def guidance_norms(
    guided: Guided,
    ts: Float[ArrayLike, " T"],
    ys: Float[ArrayLike, "n T *x"],
    args: Args = None,
) -> tuple[Float[Array, " T"], Float[Array, " T"]]:
    r"""Mean norm of the guidance term at each saved time, and its standard error.

    $$\bar\Delta_k = \frac1n\sum_{i=1}^n \big\|\tilde s_{t_k}(Y^i_{t_k})
    - s_{t_k}(Y^i_{t_k})\big\|_2,\qquad
    \mathrm{se}_k = \frac{\mathrm{sd}_i\,\|\cdot\|}{\sqrt n},$$

    where $\tilde s$ is `guided` and $s$ = `guided.score`, the score it guides.

    **Arguments:**

    - `guided`: a guided score, `gd.guide(score, guidance)`.
    - `ts`: the saved times, shape `(T,)` (`Samples.ts` of a trajectory).
    - `ys`: the particles' trajectories, shape `(n, T, *x)` with `n >= 2`
      (`Samples.ys` with `save_trajectory=True`), finite (concrete ones are
      checked: drop failed particles first, `out.ys[~out.failed]`).
    - `args`: the score's extra arguments (e.g. the class label), as in `sample`.

    **Returns:**

    A tuple `(mean, stderr)`, each of shape `(T,)`, in at least float32 (the norms
    of 16-bit particles are computed in float32).

    !!! example

        ```python
        sde = gd.VPSDE()
        gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
        tilted = gmm.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0))
        late = gd.interval(gd.reward_guidance(tilted.score(sde), 2.0), 0.0, 0.3)
        guided = gd.guide(gmm.score(sde), late)
        out = gd.sample(jr.key(0), sde, guided, (2,), num_particles=64,
                        ts=gd.uniform_grid(sde.T, 1e-3, 50), save_trajectory=True)
        mean, se = gd.guidance_norms(guided, out.ts, out.ys)  # zero above t = 0.3
        ```
    """
    if not isinstance(guided, Guided):
        raise TypeError(
            "guidance_norms needs a guided score, gd.guide(score, guidance); got "
            f"{type(guided).__name__}"
        )
    try:
        ts = jnp.asarray(ts)
    except TypeError as e:  # strings, objects: JAX's own message names no ts
        raise TypeError(f"ts must hold real times, got {ts!r}") from e
    if not (
        jnp.issubdtype(ts.dtype, jnp.floating) or jnp.issubdtype(ts.dtype, jnp.integer)
    ):
        raise TypeError(f"ts must hold real times, got dtype {ts.dtype}")
    ys = jnp.asarray(ys)
    if ts.ndim != 1:
        raise ValueError(f"ts must be 1-D (the saved times), got shape {ts.shape}")
    if ys.ndim < 2 or ys.shape[1] != ts.shape[0]:
        raise ValueError(
            "ys must be trajectories of shape (particles, len(ts), ...) as "
            "gd.sample(..., save_trajectory=True) returns; got ys.shape="
            f"{ys.shape} for {ts.shape[0]} times"
        )
    if ys.shape[0] < 2:
        raise ValueError(
            f"guidance_norms needs at least 2 particles, got {ys.shape[0]}"
        )
    if not jnp.issubdtype(ys.dtype, jnp.floating):
        raise TypeError(f"ys must be floating point, got {ys.dtype}")
    _check_finite("guidance_norms", ys=ys)  # a failed particle: every mean NaN
    particle = jax.ShapeDtypeStruct(ys.shape[2:], ys.dtype)
    out = jax.eval_shape(lambda t, y: guided(t, y, args), ts[0], particle)
    if getattr(out, "shape", None) != particle.shape:
        raise ValueError(
            f"the guided score returned shape {getattr(out, 'shape', None)} for a "
            f"particle of shape {particle.shape} (ys.shape[2:]): ys does not hold "
            "this score's particles"
        )

    def norm(t, y):
        delta = guided(t, y, args) - guided.score(t, y, args)
        # in >= float32: a 16-bit norm above ~256 overflows float16 when squared
        delta = delta.astype(jnp.promote_types(delta.dtype, jnp.float32))
        return _safe_sqrt(jnp.sum(delta**2))  # gradient 0, not NaN, at delta = 0

    per_time = jax.vmap(norm, in_axes=(0, 0))  # one particle, every saved time
    norms = jax.vmap(per_time, in_axes=(None, 0))(ts, ys)  # (n, T)
    n = ys.shape[0]
    mean = jnp.mean(norms, axis=0)
    return mean, jnp.std(norms, axis=0, ddof=1) / jnp.sqrt(n)
