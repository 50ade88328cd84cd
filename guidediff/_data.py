"""Small data sets shipped with scikit-learn (nothing is downloaded).

- `swiss_roll`: the 2-D Swiss roll (the $(x, z)$ coordinates of
  `sklearn.datasets.make_swiss_roll`), rescaled to unit scale.
- `digits`: the 1797 8x8 handwritten digit images of `sklearn.datasets.load_digits`,
  scaled to $[-1, 1]$, with their labels.
"""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int

from ._brownian import threefry_key
from ._custom_types import Key


# The std of the (x, z) coordinates of the noiseless sklearn Swiss roll is about 6.6
# and 6.9 (means 2.0 and 0.2); dividing by 7 puts them at unit scale.
_SWISS_ROLL_SCALE = 7.0


def _seed(key_or_seed: Key | int) -> int:
    """A seed for NumPy/scikit-learn: an int in [0, 2**32) as given, or one drawn
    from a JAX key."""
    if isinstance(key_or_seed, bool):
        raise TypeError(
            "expected a JAX PRNG key (jax.random.key(seed)) or an int seed, got a bool"
        )
    if isinstance(key_or_seed, int | np.integer):
        if not 0 <= key_or_seed < 2**32:
            raise ValueError(f"an int seed must be in [0, 2**32), got {key_or_seed}")
        return int(key_or_seed)
    if isinstance(key_or_seed, jax.core.Tracer):
        raise TypeError(
            "the data are drawn by scikit-learn on the host: give a concrete key or "
            "seed, not a traced one (inside jax.jit, or as gd.fit's data sampler: "
            "draw the data once and pass the array to fit)"
        )
    try:
        key = threefry_key(key_or_seed)  # other generators' keys hashed
    except TypeError:
        dtype = getattr(key_or_seed, "dtype", None)
        raise TypeError(
            "expected a JAX PRNG key (jax.random.key(seed)) or an int seed, got "
            f"{type(key_or_seed).__name__} of dtype {dtype}"
        ) from None
    return int(jr.randint(key, (), 0, 2**31 - 1))


def swiss_roll(
    key_or_seed: Key | int, n: int, noise: float = 0.0, scale: float = 1.0
) -> Float[Array, "n 2"]:
    r"""`n` points of the 2-D Swiss roll.

    The $(x, z)$ coordinates of `sklearn.datasets.make_swiss_roll(n, noise=noise)`
    (the spiral; the $y$ axis is the roll's length), divided by 7 so the coordinates
    have standard deviations near 1 (about 0.95 and 0.99), then multiplied by
    `scale`. `noise` is the
    standard deviation of sklearn's Gaussian noise, in sklearn's units (before
    rescaling). Deterministic given `key_or_seed`, a JAX key or an integer seed.

    !!! example

        ```python
        x = gd.swiss_roll(0, 10_000, noise=0.5)  # shape (10000, 2)
        ```
    """
    from sklearn.datasets import make_swiss_roll

    if isinstance(scale, bool) or not isinstance(scale, int | float | np.number):
        raise TypeError(f"scale must be a number, got {scale!r}")
    if not (math.isfinite(float(scale)) and scale > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n, the number of points, must be an int >= 1, got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, int | float | np.number):
        raise TypeError(f"noise must be a number, got {noise!r}")
    if not (math.isfinite(float(noise)) and noise >= 0):
        raise ValueError(f"noise must be finite and >= 0, got {noise}")
    pts, _ = make_swiss_roll(n, noise=noise, random_state=_seed(key_or_seed))
    pts = pts[:, [0, 2]] / _SWISS_ROLL_SCALE * scale
    return jnp.asarray(pts, jnp.result_type(float))


def digits(
    *, classes: tuple[int, ...] | None = None, channel_axis: bool = False
) -> tuple[Float[Array, "n 8 8"], Int[Array, " n"]]:
    """The 8x8 handwritten digits of scikit-learn, as `(images, labels)`.

    Pixel values $0..16$ are mapped to $[-1, 1]$ by $v/8 - 1$. `images` has shape
    `(n, 8, 8)` (or `(n, 8, 8, 1)` with `channel_axis=True`), `labels` is int32 in
    `0..9`. `classes` keeps only some digits (labels are kept as they are).

    !!! example

        ```python
        images, labels = gd.digits()  # (1797, 8, 8), (1797,)
        ```
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, np.float64) / 8.0 - 1.0
    labels = np.asarray(bunch.target, np.int32)
    if classes is not None:
        if isinstance(classes, int | np.integer | str):
            raise TypeError(
                f"classes must be a sequence of digits, e.g. ({classes},), got "
                f"{classes!r}"
            )
        bad = [
            c
            for c in classes
            if isinstance(c, bool | np.bool_) or not 0 <= int(c) <= 9 or int(c) != c
        ]
        if bad:
            raise ValueError(f"digits are classes 0..9, got {bad} in classes")
        keep = np.isin(labels, np.asarray(classes))
        if not np.any(keep):
            raise ValueError(f"no digits of classes {classes}; digits are 0..9")
        images, labels = images[keep], labels[keep]
    if channel_axis:
        images = images[..., None]
    return jnp.asarray(images, jnp.result_type(float)), jnp.asarray(labels)
