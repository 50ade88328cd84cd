"""jaxtyping aliases shared across guidediff (the diffrax convention)."""

from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real


Time: TypeAlias = Real[ArrayLike, ""]
"""A scalar time."""

Scalar: TypeAlias = Float[Array, ""]
"""A scalar array."""

X: TypeAlias = Float[Array, "*x"]
"""One particle's state (any shape). Particles are a `vmap`, never a batch axis."""

Particles: TypeAlias = Float[Array, "particles *x"]  # noqa: F821
"""A population of particles, stacked on a leading axis."""

Args: TypeAlias = PyTree[Any]
"""Extra arguments of a score (a class label, a condition...)."""

Key: TypeAlias = PRNGKeyArray
