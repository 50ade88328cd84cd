r"""Small Flax Linen networks for scores and noisy classifiers.

Every network here works on ONE particle, like every score in guidediff (DESIGN.md,
decision 3): `apply(variables, t, x, label)` takes an unbatched `x`, a scalar time `t`
and an optional scalar integer `label`, and returns one output. Batches are a
`jax.vmap` over the apply function with the variables unbatched (the losses in
`guidediff._losses` do this), which XLA turns into ordinary batched matrix products
and convolutions.

Class conditioning follows the classifier-free guidance convention: with
`num_classes = C` the labels `0..C-1` are classes and the extra index `C` is the
"null" label (no class), so one network learns the conditional scores
$s(t, x \mid c)$ and the unconditional score $s(t, x) = s(t, x \mid C)$. A `label`
of `None` means the null label. A network built without `num_classes` is
unconditional and ignores its label argument, so that guidance which passes the
same `args` to every score (classifier guidance: an unconditional score beside a
classifier of the label) works with it.

Parameters are float32. Inputs are cast to the network's computation `dtype` inside
(float32 by default; `dtype=jnp.bfloat16` for mixed precision, Flax's convention:
bfloat16 matmuls and convolutions on float32 parameters, normalisation statistics in
float32) and the output is cast back to the dtype of `x`, so networks stay fast when
`jax_enable_x64` is on and the sampler's state keeps its own precision. A concrete
label outside `0..C` is a `ValueError`; a traced one (under `jit`/`vmap`) gives NaN
outputs, negative labels included (they do not wrap around). The class-conditional
losses (`conditional_dsm_loss`, `noisy_classifier_loss`, which take `num_classes`)
check their labels, also traced ones (`guidediff._losses.check_labels`);
`dsm_loss` and `reward_weighted_dsm_loss` check concrete ones against the network's
`num_classes` and pass traced ones on as they are.

On CPU, initialise conv nets under `jax.jit` (`jax.jit(net.init)(key, t, x, label)`):
eager, op-by-op initialisation is much slower.

Networks are modules of this file only; the rest of guidediff sees them through
`guidediff._flax` (DESIGN.md, decision 2).
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int


def sinusoidal_embedding(
    t: Float[ArrayLike, ""], dim: int, max_period: float = 10_000.0, scale: float = 1e3
) -> Float[Array, " dim"]:
    r"""The transformer / DDPM sinusoidal embedding of a scalar time.

    With $u = \text{scale}\cdot t$ and frequencies
    $\omega_k = \text{max\_period}^{-k/h}$, $k = 0..h-1$, $h = \text{dim}/2$:

    $$e(t) = [\cos(\omega_0 u), \dots, \cos(\omega_{h-1} u),
    \sin(\omega_0 u), \dots, \sin(\omega_{h-1} u)].$$

    `scale = 1000` maps continuous times $t \in [0, 1]$ onto DDPM's step range.
    Computed in float32.

    !!! example

        ```python
        e = gd.sinusoidal_embedding(0.5, 8)  # u = 500, frequencies 1, 0.1, 0.01, ...
        assert e.shape == (8,) and jnp.allclose(e[0], jnp.cos(500.0))
        assert jnp.allclose(e[:4] ** 2 + e[4:] ** 2, 1.0)
        ```
    """
    if dim % 2 != 0:
        raise ValueError(f"the embedding dimension must be even, got {dim}")
    half = dim // 2
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 0:
        raise ValueError(f"expected a scalar time, got shape {t.shape}")
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    arg = scale * t * freqs
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)])


def _check_x(x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")


class _Conditioning(nn.Module):
    """Time embedding (+ class embedding) -> a conditioning vector of size `dim`."""

    dim: int
    num_classes: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: Float[ArrayLike, ""], label: Int[ArrayLike, ""] | None):
        emb = sinusoidal_embedding(t, self.dim)
        emb = nn.Dense(self.dim, dtype=self.dtype)(emb)
        emb = nn.silu(emb)
        emb = nn.Dense(self.dim, dtype=self.dtype)(emb)
        if self.num_classes is not None:
            if label is None:
                label = self.num_classes
            if not isinstance(label, jax.core.Tracer):
                # check the value before a cast to 32-bit ints can wrap it
                host = np.asarray(label)
                if (
                    host.ndim == 0
                    and np.issubdtype(host.dtype, np.integer)
                    and not 0 <= int(host) <= self.num_classes
                ):
                    raise ValueError(
                        f"class label {int(host)} out of range: valid labels are "
                        f"0..{self.num_classes - 1} or the null label "
                        f"{self.num_classes}"
                    )
            label = jnp.asarray(label)
            if label.ndim != 0:
                raise ValueError(
                    "one particle takes one scalar label; vmap over a batch of labels "
                    f"(got shape {label.shape})"
                )
            if not jnp.issubdtype(label.dtype, jnp.integer):
                raise TypeError(f"class labels must be integers, got {label.dtype}")
            # num_classes + 1 rows: index num_classes is the null (unconditional) label.
            embed = nn.Embed(
                self.num_classes + 1, self.dim, dtype=self.dtype, name="class_embed"
            )
            # jnp.take wraps negative indices around (-1 would be the null label):
            # look up a valid row, then put NaN wherever the label is out of range.
            valid = (label >= 0) & (label <= self.num_classes)
            class_emb = embed(jnp.clip(label, 0, self.num_classes))
            emb = emb + jnp.where(valid, class_emb, jnp.nan)
        return emb


def _check_config(net: nn.Module, widths: str) -> None:
    """Clear errors for a network built with sizes it cannot have (they failed at
    `init` with a ZeroDivisionError or an IndexError)."""
    name = type(net).__name__

    def positive(field, value):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name}: {field} must be a positive int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: {field} must be >= 1, got {value}")

    sizes = getattr(net, widths)
    if isinstance(sizes, list):  # a tuple: a list makes the module unhashable, and
        # every network built anew compiled gd.sample again (compared by identity)
        sizes = tuple(sizes)
        object.__setattr__(net, widths, sizes)
    if widths == "features" and len(sizes) == 0:
        raise ValueError(f"{name}: features must name at least one level")
    for w in sizes:
        positive(widths, w)
    embed = getattr(net, "time_embed_dim", 2)
    positive("time_embed_dim", embed)
    if embed % 2:
        raise ValueError(f"{name}: time_embed_dim must be even, got {embed}")
    if net.num_classes is not None or isinstance(net, CNNClassifier):
        positive("num_classes", net.num_classes)
    if hasattr(net, "blocks_per_level"):
        positive("blocks_per_level", net.blocks_per_level)


class MLPScoreNet(nn.Module):
    r"""An MLP for low-dimensional data (e.g. 2-D mixtures, Swiss rolls).

    `apply(variables, t, x, label=None)` flattens one particle `x` (any shape), embeds
    `t` (sinusoidal embedding, then a 2-layer MLP) and, when `num_classes` is set, adds
    a learned class embedding; it runs `len(hidden)` SiLU layers and returns an
    output shaped like `x` (an $\varepsilon$-, $x_0$-, $v$- or score prediction, as
    the loss decides). Each hidden layer is
    $h \leftarrow \mathrm{SiLU}(W h + b + V c)$ with $c$ the conditioning vector.

    **Arguments:**

    - `hidden`: widths of the hidden layers.
    - `time_embed_dim`: size of the time (and class) embedding.
    - `num_classes`: if set, the network is class-conditional; label `num_classes`
      (or `None`) is the null label used for classifier-free guidance. A concrete
      label outside `0..num_classes` raises `ValueError`, a traced one gives NaN
      outputs. If `None` (the default), the network is unconditional and ignores
      the label (classifier guidance passes one to the score and the classifier).
    - `dtype`: the computation dtype (`jnp.bfloat16` for mixed precision; the
      parameters stay float32). Every layer casts its weights to `dtype` at every
      call, and XLA does not hoist that out of a sampler's loop: for sampling
      without gradients, pass the variables already cast
      (`jax.tree.map(lambda a: a.astype(jnp.bfloat16), variables)`) to
      `gd.flax_score`. The samples are the same (every weight is rounded to
      `dtype` either way) and each step skips reading and converting every
      weight. Keep float32 variables to differentiate with respect to them.

    !!! example

        ```python
        net = gd.MLPScoreNet(hidden=(128, 128, 128))
        variables = net.init(jax.random.key(0), 0.5, jnp.zeros(2))
        eps = net.apply(variables, 0.5, jnp.ones(2))  # shape (2,)
        ```
    """

    hidden: Sequence[int] = (128, 128, 128)
    time_embed_dim: int = 64
    num_classes: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_config(self, "hidden")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        t: Float[ArrayLike, ""],
        x: Float[Array, "*x"],
        label: Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, "*x"]:
        x = jnp.asarray(x)
        _check_x(x)
        out_dtype = x.dtype
        h = x.astype(self.dtype).reshape(-1)
        conditioning = _Conditioning(self.time_embed_dim, self.num_classes, self.dtype)
        cond = nn.silu(conditioning(t, label))
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        for width in self.hidden:
            h = nn.silu(dense(width)(h) + dense(width, use_bias=False)(cond))
        out = dense(x.size, kernel_init=nn.initializers.zeros)(h)
        return out.reshape(x.shape).astype(out_dtype)


class _ResBlock(nn.Module):
    features: int
    groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, cond: Array) -> Array:
        conv = functools.partial(nn.Conv, dtype=self.dtype)
        norm = functools.partial(nn.GroupNorm, dtype=self.dtype)
        g = math.gcd(self.groups, h.shape[-1])
        z = nn.silu(norm(num_groups=g)(h))
        z = conv(self.features, (3, 3))(z)
        dense = nn.Dense(self.features, dtype=self.dtype)
        z = z + dense(nn.silu(cond))[None, None, None, :]
        z = nn.silu(norm(num_groups=math.gcd(self.groups, self.features))(z))
        z = conv(self.features, (3, 3))(z)
        if h.shape[-1] != self.features:
            h = conv(self.features, (1, 1))(h)
        return h + z


def _as_image(x: Array, dtype=jnp.float32) -> tuple[Array, tuple[int, ...]]:
    """(H, W) or (H, W, C) -> (1, H, W, C) in `dtype`, remembering the input shape."""
    x = jnp.asarray(x)
    _check_x(x)
    if x.ndim == 2:
        img = x[:, :, None]
    elif x.ndim == 3:
        img = x
    else:
        raise ValueError(
            "expected one image of shape (H, W) or (H, W, C); vmap over a batch "
            f"(got shape {x.shape})"
        )
    # GroupNorm treats the leading axis as the batch: give one particle a batch of 1.
    return img.astype(dtype)[None], x.shape


class UNet(nn.Module):
    r"""A small U-Net for single-channel images such as 8x8 digits or 28x28 MNIST.

    `apply(variables, t, x, label=None)` takes ONE image `x` of shape `(H, W)` or
    `(H, W, C)` (channels last) and returns an array of the same shape. Each level
    holds `blocks_per_level` residual blocks (GroupNorm, SiLU, 3x3 convs, plus the
    time/class conditioning); the image is halved between levels with a strided conv
    and doubled back with nearest-neighbour upsampling, with skip connections. `H` and
    `W` must be divisible by `2 ** (len(features) - 1)`: with the default two levels
    8x8 runs at 8x8 / 4x4 and 28x28 at 28x28 / 14x14.

    **Arguments:**

    - `features`: channels per level.
    - `time_embed_dim`: size of the time (and class) embedding.
    - `num_classes`: class conditioning with the null label `num_classes`, as in
      `MLPScoreNet` (out-of-range labels are handled as there; an unconditional
      network ignores the label).
    - `blocks_per_level`: residual blocks per level on the way down and up.
    - `dtype`: the computation dtype (`jnp.bfloat16` for mixed precision; the
      parameters stay float32, GroupNorm statistics are float32).

    !!! example

        ```python
        net = gd.UNet(features=(32, 64), num_classes=10)
        variables = jax.jit(net.init)(jax.random.key(0), 0.5, jnp.zeros((8, 8)), 3)
        eps = jax.jit(net.apply)(variables, 0.5, jnp.zeros((8, 8)), 3)  # shape (8, 8)
        ```
    """

    features: Sequence[int] = (32, 64)
    time_embed_dim: int = 64
    num_classes: int | None = None
    blocks_per_level: int = 1
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_config(self, "features")
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        t: Float[ArrayLike, ""],
        x: Float[Array, "H W *C"],
        label: Int[ArrayLike, ""] | None = None,
    ) -> Float[Array, "H W *C"]:
        out_dtype = jnp.asarray(x).dtype
        h, shape = _as_image(x, self.dtype)
        conv = functools.partial(nn.Conv, dtype=self.dtype)
        block = functools.partial(_ResBlock, dtype=self.dtype)
        factor = 2 ** (len(self.features) - 1)
        if h.shape[1] % factor or h.shape[2] % factor:
            raise ValueError(
                f"image size {h.shape[1:3]} must be divisible by {factor} for "
                f"{len(self.features)} levels"
            )
        cond = _Conditioning(self.time_embed_dim, self.num_classes, self.dtype)(
            t, label
        )
        h = conv(self.features[0], (3, 3))(h)
        skips = []
        for level, feat in enumerate(self.features):
            for _ in range(self.blocks_per_level):
                h = block(feat)(h, cond)
            skips.append(h)
            if level < len(self.features) - 1:
                h = conv(feat, (3, 3), strides=(2, 2))(h)
        h = block(self.features[-1])(h, cond)
        for level in reversed(range(len(self.features))):
            feat = self.features[level]
            if level < len(self.features) - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = jnp.concatenate([h, skips[level]], axis=-1)
            for _ in range(self.blocks_per_level):
                h = block(feat)(h, cond)
        norm = nn.GroupNorm(num_groups=math.gcd(8, h.shape[-1]), dtype=self.dtype)
        h = nn.silu(norm(h))
        channels = shape[-1] if len(shape) == 3 else 1
        out = conv(channels, (3, 3), kernel_init=nn.initializers.zeros)(h)
        return out[0].reshape(shape).astype(out_dtype)


class CNNClassifier(nn.Module):
    r"""A small convolutional classifier returning logits, optionally noise-aware.

    `apply(variables, t, x)` takes ONE image of shape `(H, W)` or `(H, W, C)` and
    returns `(num_classes,)` logits, so `jax.nn.log_softmax(logits)[c]` is
    $\log p(c \mid x)$. With `time_conditioned=True` the time embedding is added to
    every block and the network models the noisy classifier $\log p_t(c \mid x_t)$
    used by classifier guidance; otherwise `t` is ignored (pass anything, e.g. `0.0`).
    The `(t, x)` argument order matches the scores'.

    **Arguments:**

    - `num_classes`: the number of classes.
    - `features`: channels of the conv blocks; each block but the last is followed by
      2x2 average pooling.
    - `time_conditioned`: whether the classifier sees `t`.
    - `time_embed_dim`: size of the time embedding.
    - `dtype`: the computation dtype (`jnp.bfloat16` for mixed precision; the
      parameters stay float32).

    !!! example

        ```python
        clf = gd.CNNClassifier(num_classes=10, time_conditioned=True)
        variables = clf.init(jax.random.key(0), 0.5, jnp.zeros((8, 8)))
        logits = clf.apply(variables, 0.5, jnp.zeros((8, 8)))  # shape (10,)
        ```
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    time_conditioned: bool = False
    time_embed_dim: int = 64
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_config(self, "features")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, t: Float[ArrayLike, ""] | None, x: Float[Array, "H W *C"]
    ) -> Float[Array, " num_classes"]:
        out_dtype = jnp.asarray(x).dtype
        h, _ = _as_image(x, self.dtype)
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        cond = None
        if self.time_conditioned:
            if t is None:
                raise ValueError("a time-conditioned classifier needs a time t")
            cond = nn.silu(
                _Conditioning(self.time_embed_dim, None, self.dtype)(t, None)
            )
        for i, feat in enumerate(self.features):
            h = nn.Conv(feat, (3, 3), dtype=self.dtype)(h)
            if cond is not None:
                h = h + dense(feat)(cond)[None, None, None, :]
            norm = nn.GroupNorm(num_groups=math.gcd(8, feat), dtype=self.dtype)
            h = nn.silu(norm(h))
            if i < len(self.features) - 1:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        h = jnp.mean(h, axis=(1, 2))[0]
        h = nn.silu(dense(self.features[-1])(h))
        logits = dense(self.num_classes)(h)
        return logits.astype(out_dtype)


def count_params(variables) -> int:
    """The number of scalars in a variables pytree.

    !!! example

        ```python
        net = gd.MLPScoreNet(hidden=(16,))
        variables = net.init(jr.key(0), 0.5, jnp.zeros(2))
        n = gd.count_params(variables)  # every weight and bias, time embedding included
        assert n == sum(x.size for x in jax.tree_util.tree_leaves(variables))
        ```
    """
    if isinstance(variables, nn.Module):
        raise TypeError(
            f"count_params takes the variables, not the network: "
            f"gd.count_params(net.init(...)), got a {type(variables).__name__}"
        )
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables))
