r"""Argument checks of `gd.sample`: clear errors before anything is compiled."""

import collections
import dataclasses
import functools
import sys
import typing
import warnings
import weakref

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._brownian import levy_area_for, unwrap_solver
from ._guidance.base import Guided
from ._jit import _user_stacklevel, check_real_scalar, is_real_scalar, reject_traced
from ._oracle import GaussianMixture
from ._weights import Constant, PerStep, PiecewiseLinear


# The memos of checked scores and log-potentials (`_CheckMemo`), in two levels, each
# least recently used first: structure (the tree structures, which hold the static
# fields: closures and what they capture; the shape and dtype) -> values (the
# leaves' values or identities) -> weakrefs of the identity-keyed leaves. A sweep
# that builds a new closure per call keeps at most `_MAX_STRUCTURES` alive; a sweep
# over many labels of one score keeps up to `_MAX_VALUES` of them.
_MAX_STRUCTURES = 32
_MAX_VALUES = 256
_SMALL = 64  # float arrays up to this size are keyed by value

# Pytree node types whose array leaves are keyed by shape and dtype alone: network
# parameters and guidance weights, which no score inspects in Python (the Flax
# adapter registers `LinenModel`; weights check their values when made). New
# parameters of the same shapes (an EMA snapshot, a checkpoint, each evaluation in a
# training loop) and new weights (a sweep over w) then reuse the check instead of
# re-tracing the score, and reading them costs no device-to-host copy (which waits
# for the work queued before it: a sweep's previous samples).
_SHAPE_KEYED: list[type] = [Constant, PiecewiseLinear, PerStep]
# Pytree node types whose calls check their float values (a mixture rejects a class
# whose components all weigh zero): their arrays are keyed as `_signature` keys a
# score's, by value or identity, also inside a log-potential.
_VALUE_KEYED: list[type] = [GaussianMixture]


def register_shape_keyed(cls: type) -> None:
    if cls not in _SHAPE_KEYED:
        _SHAPE_KEYED.append(cls)


def _is_shape_keyed(node) -> bool:
    return isinstance(node, tuple(_SHAPE_KEYED))


def _tree_key(node, values: bool = False):
    """`(treedef, leaves)`: `node`'s structure with its arrays as (shape, dtype,
    weak type), plus their values with `values` (arrays of at most `_SMALL`
    elements: reading one that is ready waits for nothing), other leaves as
    themselves (a `TypeError` if unhashable). None if a leaf is traced, or too
    large to key by value."""
    leaves, treedef = jtu.tree_flatten(node)
    out = []
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array | np.ndarray | np.generic):
            # (leaf.dtype as it is: np.dtype rejects a typed key's key<fry>)
            weak = bool(getattr(leaf, "weak_type", False))
            key = (leaf.shape, leaf.dtype, weak)
            if values:
                if leaf.size > _SMALL:
                    return None
                key += (tuple(np.asarray(leaf).ravel().tolist()),)
            out.append(key)
        else:
            hash(leaf)
            out.append((type(leaf), leaf))
    return treedef, tuple(out)


def _shape_key(node):
    """`node`'s structure with its arrays as (shape, dtype, weak type); None if any
    leaf is traced."""
    key = _tree_key(node)
    return None if key is None else ("shape-keyed", *key)


def _signature(score, shape, dtype, args, floats_by_value: bool = True):
    """A hashable summary that determines the shape check's outcome, and the leaves
    it keys by identity. `(None, ())` (do not cache) if anything is traced or
    unhashable. (Computed on every eager `gd.sample` call: kept cheap.)

    The check runs the score on its concrete leaves, and a score may check their
    values (a mixture rejects a class whose components all weigh zero), so values
    are part of the key: integer arrays (labels) and small float arrays by value
    (a jax array converts to numpy once and caches it); larger jax arrays
    (network parameters) by identity, held by weak reference; larger numpy arrays
    (mutable in place) are not cached. Python scalars are keyed with their type
    (1, 1.0 and True hash alike). Network parameters and guidance weights
    (`_SHAPE_KEYED` nodes) and typed PRNG keys are keyed by shape and dtype, and
    so are all float arrays without `floats_by_value` (log-potentials: `args=None`;
    what they hold is rarely checked in Python, and often still being computed, a
    classifier's parameters in a training loop, whose reading would wait), except
    inside the `_VALUE_KEYED` nodes, whose calls check their float values."""
    score_leaves, score_def = jtu.tree_flatten(score, is_leaf=_is_keyed_node)
    args_leaves, args_def = jtu.tree_flatten(args)
    sig = []
    by_identity = []
    if not _leaf_keys(score_leaves + args_leaves, floats_by_value, sig, by_identity):
        return None, ()
    return (score_def, args_def, tuple(sig), shape, np.dtype(dtype)), by_identity


@functools.cache
def _interval_type() -> type:
    from ._guidance.interval import Interval  # imported late (import order)

    return Interval


def _is_keyed_node(node) -> bool:
    return (
        _is_shape_keyed(node)
        or isinstance(node, tuple(_VALUE_KEYED))
        or type(node) is _interval_type()  # a subclass is keyed as any module
    )


def _leaf_keys(leaves, floats_by_value: bool, sig: list, by_identity: list) -> bool:
    """Appends each leaf's key (`_signature`) to `sig`, and the identity-keyed
    leaves to `by_identity`; False if one cannot be keyed (do not cache)."""
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return False
        if _is_shape_keyed(leaf):
            key = _shape_key(leaf)
            if key is None:
                return False
            sig.append(key)
            continue
        if type(leaf) is _interval_type():  # not a subclass: it may read its bounds
            # Its bounds by shape and dtype: they never change the check's outcome
            # (`lax.cond` traces both branches) and `_check_intervals` reads them on
            # every call; a sweep of intervals does not trace the score again. The
            # guidance inside is keyed as any other.
            bounds = _tree_key((leaf.t_lo, leaf.t_hi))
            if bounds is None:
                return False
            inner, treedef = jtu.tree_flatten(leaf.guidance, is_leaf=_is_keyed_node)
            sig.extend([("interval", *bounds), treedef])
            if not _leaf_keys(inner, floats_by_value, sig, by_identity):
                return False
            continue
        if isinstance(leaf, tuple(_VALUE_KEYED)):  # its floats by value, always
            inner, treedef = jtu.tree_flatten(leaf)
            sig.append(treedef)
            if not _leaf_keys(inner, True, sig, by_identity):
                return False
            continue
        if isinstance(leaf, jax.Array) and jnp.issubdtype(
            leaf.dtype, jax.dtypes.prng_key
        ):  # a typed PRNG key: its draws are values no check reads (NumPy has no
            # key dtype to read it into); keyed by shape
            sig.append((leaf.shape, leaf.dtype, "key"))
            continue
        if isinstance(leaf, jax.Array | np.ndarray):
            value = None
            integer = getattr(leaf.dtype, "kind", None) in ("i", "u", "b")
            if integer and leaf.size > 4096:
                return False
            if not (integer or floats_by_value):
                pass  # keyed by shape and dtype
            elif integer or leaf.size <= _SMALL:
                value = tuple(np.asarray(leaf).ravel().tolist())
            elif isinstance(leaf, jax.Array):
                value = ("id", id(leaf))
                by_identity.append(leaf)
            else:
                return False
            weak = bool(getattr(leaf, "weak_type", False))  # promotes differently
            sig.append((leaf.shape, leaf.dtype, weak, value))
        else:
            try:
                hash(leaf)
            except TypeError:
                return False
            sig.append((type(leaf), leaf))
    return True


class _CheckMemo:
    """The signatures (`_signature`) whose check passed, in two levels (see above);
    a signature of None is never remembered."""

    def __init__(self):
        self.table: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def _split(sig):
        first_def, second_def, values, shape, dtype = sig
        return (first_def, second_def, shape, dtype), values

    def hit(self, sig, by_identity) -> bool:
        if sig is None:
            return False
        structure, values = self._split(sig)
        known = self.table.get(structure)
        refs = None if known is None else known.get(values)
        if refs is None or not all(
            r() is a for r, a in zip(refs, by_identity, strict=True)
        ):
            return False
        self.table.move_to_end(structure)
        known.move_to_end(values)
        return True

    def add(self, sig, by_identity) -> None:
        if sig is None:
            return
        structure, values = self._split(sig)
        known = self.table.setdefault(structure, collections.OrderedDict())
        self.table.move_to_end(structure)
        known[values] = tuple(weakref.ref(a) for a in by_identity)
        known.move_to_end(values)
        while len(known) > _MAX_VALUES:
            known.popitem(last=False)
        while len(self.table) > _MAX_STRUCTURES:
            self.table.popitem(last=False)


def _hashable_signature(tree, shape, dtype, args, floats_by_value: bool = True):
    """`_signature`, with `(None, ())` where it is not hashable."""
    try:
        sig, by_identity = _signature(tree, shape, dtype, args, floats_by_value)
        hash(sig)
    except TypeError:
        return None, ()
    return sig, by_identity


_CHECKED_SCORES = _CheckMemo()
# Log-potentials (`smc_sample`): integer arrays by value, as for scores (a
# mixture's log-density rejects an unknown label), float arrays by shape.
_CHECKED_POTENTIALS = _CheckMemo()


def _check_log_potential(log_potential, shape, dtype) -> None:
    """`log_potential` of one particle is a real scalar: traced once (eval_shape)
    per signature (`_signature`, float arrays by shape), so a potential rebuilt per
    call (`reward.log`, a new bound method each time, or one holding parameters
    updated in a training loop) is not traced again, nor waited for."""
    sig, by_identity = _hashable_signature(
        log_potential, shape, dtype, None, floats_by_value=False
    )
    if _CHECKED_POTENTIALS.hit(sig, by_identity):
        return
    try:
        probe = jax.eval_shape(log_potential, jax.ShapeDtypeStruct(shape, dtype))
    except Exception as e:  # re-raised with context: which call failed
        raise ValueError(
            f"calling log_potential on one particle of shape {shape} failed: {e}"
        ) from e
    check_real_scalar(probe, "log_potential")
    _CHECKED_POTENTIALS.add(sig, by_identity)


# the hint's code for a label per particle, for gd.sample
_SAMPLE_PER_LABEL = "jax.vmap(lambda c: gd.sample(..., args=c))(labels)"


def _check_score_shape(
    score, ts, shape, dtype, args, entry: str = _SAMPLE_PER_LABEL
) -> None:
    """Trace one score call (eval_shape) and check it returns `shape`; remembered per
    signature, so repeated eager calls of `gd.sample` do not re-trace the score.
    `entry` is the hint's code for a label per particle."""
    sig, by_identity = _hashable_signature(score, shape, dtype, args)
    if _CHECKED_SCORES.hit(sig, by_identity):
        return
    _check_score_shape_uncached(score, ts, shape, dtype, args, entry)
    _CHECKED_SCORES.add(sig, by_identity)


def _concrete(a):
    """A concrete jax array as a value the score sees concretely under eval_shape,
    with the same dtype promotion as the array: numpy, or a Python scalar for a
    weakly typed scalar (`jnp.asarray(1.0)`: numpy would make it a strong float64
    under x64, or a strong float32 next to bfloat16 particles, and promote x)."""
    if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer):
        return a
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        return a  # NumPy has no key dtype
    if getattr(a, "weak_type", False):
        return a.item() if a.ndim == 0 else a
    return np.asarray(a)


def _check_score_shape_uncached(
    score, ts, shape, dtype, args, entry: str = _SAMPLE_PER_LABEL
) -> None:
    x = jax.ShapeDtypeStruct(shape, dtype)
    # Concrete arrays in args are passed as numpy here, so that value checks inside
    # the score (e.g. an unknown class label) run now, with a clear Python error.
    args = jtu.tree_map(_concrete, args)
    # The innermost (unguided) score is also called directly: guidance such as
    # batched CFG vmaps over args, which would hide their concrete values.
    base = score
    while isinstance(base, Guided):
        base = base.score
    # Classifier-free guidance's null args reach the base score inside the batched
    # (vmapped) call, where their values are hidden too: call it with them here.
    from ._guidance.cfg import pair_guidance_name

    # (only those applied to the base score: one inside another score, e.g. a
    # reward guidance's s_r, has its own labels)
    null_args = [
        (pair_guidance_name(g), g.null_args)
        for g in _pair_guidances_on(score)
        if g.null_args is not None
    ]
    for name, null in null_args if base is not score else ():
        try:
            concrete = jtu.tree_map(_concrete, null)
            eqx.filter_eval_shape(lambda t, x_, n=concrete: base(t, x_, n), ts[0], x)
        except Exception as e:
            raise ValueError(
                f"calling the score with {name}'s null_args={null!r} (the "
                f"unconditional call) failed: {e}"
            ) from e
    first = _first_cfg(score)
    if first is not None and _ignores_args(base, ts[0], x, args, first.null_args):
        raise ValueError(
            f"{pair_guidance_name(first)}(null_args=...) guides a score that ignores "
            "its args "
            f"({type(base).__name__}): its conditional and unconditional calls are "
            "equal, so the guidance would be a silent no-op. Guide a class-"
            "conditional score (e.g. gmm.conditional_score(sde), not gmm.score(sde), "
            "or a network that takes the label)"
        )
    try:
        if base is not score:
            eqx.filter_eval_shape(lambda t, x_: base(t, x_, args), ts[0], x)
        out = eqx.filter_eval_shape(lambda t, x_: score(t, x_, args), ts[0], x)
    except Exception as e:  # re-raised with context: which call failed and why
        raise ValueError(
            f"calling the score on one particle of shape {shape} with args={args!r} "
            f"failed: {e}"
            + _per_particle_args_hint(args, entry)
            + _training_mode_hint(e)
        ) from e
    if not hasattr(out, "shape") or tuple(out.shape) != shape:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"the score returned shape {got} for a particle of shape {shape}; a score "
            "must return an array shaped like x (scores are per particle: vmap is "
            "applied by gd.sample)"
        )
    _warn_null_label(base, args)
    if jnp.issubdtype(dtype, jnp.inexact) and out.dtype != dtype:
        alt = (
            f" or sample with dtype={out.dtype}"
            if jnp.issubdtype(out.dtype, jnp.floating)
            else ""
        )
        raise ValueError(
            f"the score returned dtype {out.dtype} for a particle of dtype {dtype}: a "
            "score must return x's dtype (the sampler's state would change type "
            f"between steps); cast its output (e.g. `.astype(x.dtype)`){alt}"
        )


def _warn_null_label(base, args) -> None:
    """A class-conditional stock network (`gd.MLPScoreNet` / `gd.UNet` with
    `num_classes`) reads `args=None` as its null label: unconditional samples,
    where the exact oracle's conditional score refuses `None`. A user who swapped
    the oracle for a trained network and kept no `args` would not see it."""
    if args is not None:
        return
    nn = sys.modules.get("guidediff._nn")  # loaded if such a network exists
    if nn is None:
        return
    for node in jtu.tree_leaves(base, is_leaf=lambda n: hasattr(n, "apply_fn")):
        module = getattr(getattr(node, "apply_fn", None), "__self__", None)
        num = getattr(module, "num_classes", None)
        stock = any(
            isinstance(module, c) and type(module).__call__ is c.__call__
            for c in (nn.MLPScoreNet, nn.UNet)
        )
        if stock and isinstance(num, int) and not isinstance(num, bool):
            warnings.warn(
                f"the score's network {type(module).__name__} is class-conditional "
                f"(num_classes={num}) and got args=None, which it reads as its null "
                f"label {num}: these are the unconditional score's samples. Pass "
                f"args=c for class c, or args={num} to ask for the unconditional "
                "score (no warning)",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )
            return


def _pair_guidances_on(score) -> list:
    """The guidances built on `cond_and_uncond` (gd.cfg, gd.cfgpp, gd.apg) applied
    to the innermost score of `score`: anywhere inside each `Guided` layer's
    guidance (a chain, an interval, a user's wrapper), but not inside a score it
    holds (a reward guidance's s_r, an unconditional score: their own labels)."""
    from ._guidance.cfg import pair_guidance_name
    from ._score import AbstractScore

    def stop(node):
        return pair_guidance_name(node) is not None or isinstance(node, AbstractScore)

    out = []
    while isinstance(score, Guided):
        leaves = jtu.tree_leaves(score.guidance, is_leaf=stop)
        out += [g for g in leaves if pair_guidance_name(g) is not None]
        score = score.score
    return out


def _first_cfg(score):
    """The guidance applied first to the innermost (unguided) score if it is
    `gd.cfg` (or `gd.cfgpp`, `gd.apg`) with `null_args` (inside a `chain` or an
    `interval`), else `None`: it calls that score with the args and with the null
    args."""
    from ._guidance.base import Chain
    from ._guidance.cfg import pair_guidance_name
    from ._guidance.interval import Interval

    while isinstance(score, Guided) and isinstance(score.score, Guided):
        score = score.score
    if not isinstance(score, Guided):
        return None
    g = score.guidance
    while True:
        if isinstance(g, Chain) and g.guidances:
            g = g.guidances[0]
        elif isinstance(g, Interval):
            g = g.guidance
        else:
            pair = pair_guidance_name(g) is not None and g.null_args is not None
            return g if pair else None


def _split_args_arrays(args):
    """`args` with numbers and NumPy arrays as jax arrays."""
    return jtu.tree_map(
        lambda a: jnp.asarray(a) if isinstance(a, int | float | np.ndarray) else a,
        args,
    )


def _split_args(args):
    """`args` as (arrays, the rest): numbers count as arrays."""
    return eqx.partition(_split_args_arrays(args), eqx.is_array)


def _skeleton(args):
    """`args` with each array (or number) replaced by its shape and dtype: what
    Python code can read of it without its values."""
    return jtu.tree_map(
        lambda a: ("<array>", a.shape, a.dtype) if eqx.is_array(a) else a,
        _split_args_arrays(args),
    )


def _same_static(a, b) -> bool:
    """Whether two `args` agree in everything but their arrays' values: tree
    structure (static fields included), other leaves, arrays' shapes and dtypes
    (an array and a `None` differ)."""
    try:
        la, ta = jtu.tree_flatten(_skeleton(a))
        lb, tb = jtu.tree_flatten(_skeleton(b))
        same = zip(la, lb, strict=True)
        return ta == tb and all(x is y or bool(x == y) for x, y in same)
    except Exception:
        return False


def _ignores_args(score, t, x, args, null_args=None) -> bool:
    """Whether `score(t, x, args)` and `score(t, x, null_args)` are provably equal:
    their non-array parts (static fields, strings) are equal, and traced with the
    arrays (and numbers) of `args` as inputs, no operation uses them. Inconclusive
    cases (non-array parts that differ, or any without `null_args`; no array; a
    score that needs concrete args) count as reading them."""
    dynamic, static = _split_args(args)
    n = len(jtu.tree_leaves(dynamic))
    if null_args is None:
        # a score may read a non-array part (a prompt string) in Python, which
        # leaves no trace in the program
        plain = not jtu.tree_leaves(static)
    else:
        plain = _same_static(args, null_args)
    if n == 0 or not plain:
        return False
    try:
        closed = jax.make_jaxpr(lambda d, x_: score(t, x_, eqx.combine(d, static)))(
            dynamic, x
        )
    except Exception:
        return False
    jaxpr = closed.jaxpr
    inputs = {id(v) for v in jaxpr.invars[:n]}
    used = [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars)
    return not any(id(v) in inputs for v in used)


def _per_particle_args_hint(args, entry: str = _SAMPLE_PER_LABEL) -> str:
    """For integer arrays in `args` (one label per particle, a common mistake): how
    to sample several classes (`entry`: the code that does it)."""
    if any(
        np.ndim(a) >= 1 and jnp.issubdtype(getattr(a, "dtype", np.float64), jnp.integer)
        for a in jtu.tree_leaves(args)
    ):
        return (
            "; `args` is shared by all particles (e.g. one class label): for a label "
            "per particle, vmap over the labels, " + entry
        )
    return ""


def _check_half_steps(solver, process, brownian) -> None:
    """A wrapped solver (`diffrax.HalfSolver`) steps each grid cell in two halves,
    whose noise a grid Brownian path does not have (one draw per cell: NaN, every
    particle failed)."""
    if (
        process == "sde"
        and brownian == "grid"
        and isinstance(solver, dfx.AbstractWrappedSolver)
    ):
        raise ValueError(
            f"{type(solver).__name__} takes half steps, and a grid Brownian path "
            "has one increment per grid cell: use it for adaptive steps (a "
            "stepsize_controller, brownian='tree'), or pass brownian='tree', or the "
            "solver it wraps"
        )


def _check_adaptive_solver(
    solver, adaptive: bool, adjoint, saves: bool, driver: str
) -> None:
    """Adaptive steps with guidediff's probability-flow solvers (inside
    `diffrax.HalfSolver`): `BacksolveAdjoint` steps its tuple-valued adjoint ODE
    with the same solver, which reads a score back from an array state; and a
    HalfSolver's dense output is its full step's, not the two half steps it keeps
    (diffrax), so states saved by interpolation are off."""
    from ._solver import DDIM

    name = type(solver).__name__
    if (
        saves
        and driver == "diffeqsolve"
        and isinstance(solver, dfx.AbstractWrappedSolver)
    ):
        # diffeqsolve saves by interpolation also on a fixed grid
        raise ValueError(
            f"{name}'s dense output is its full step's, not the two half steps it "
            "keeps (diffrax), so states that diffeqsolve saves would be off (the "
            "last one too): sample without save_trajectory / save_every / saveat, "
            "or with driver='scan' on a fixed grid"
        )
    if not adaptive:
        return
    if isinstance(adjoint, dfx.BacksolveAdjoint) and isinstance(
        unwrap_solver(solver), DDIM
    ):
        raise ValueError(
            f"adjoint=BacksolveAdjoint() steps the adjoint ODE with the solver, and "
            f"{type(unwrap_solver(solver)).__name__} steps probability-flow terms "
            "only: use RecursiveCheckpointAdjoint (the default) or ForwardMode()"
        )


def _check_brownian(brownian, process, driver, controller, adjoint) -> str:
    if brownian is None:
        return "grid" if controller is None else "tree"
    if brownian not in ("grid", "tree", "unsafe"):
        raise ValueError(
            f"brownian must be 'grid', 'tree' or 'unsafe', got {brownian!r}"
        )
    if process != "sde":
        return brownian  # the probability-flow ODE has no noise
    if brownian == "grid" and controller is not None:
        raise ValueError(
            "brownian='grid' gives increments over the fixed grid only; adaptive "
            "steps (a stepsize_controller) need brownian='tree' (VirtualBrownianTree)"
        )
    if brownian == "unsafe":
        if driver != "diffeqsolve" or controller is not None:
            raise ValueError(
                "brownian='unsafe' (diffrax.UnsafeBrownianPath) is a forward-only "
                "fast path for driver='diffeqsolve' on a fixed grid (no "
                "stepsize_controller); on the 'scan' driver the default "
                "brownian='grid' is as fast and differentiable"
            )
        if isinstance(adjoint, dfx.RecursiveCheckpointAdjoint | dfx.BacksolveAdjoint):
            raise ValueError(
                f"adjoint={type(adjoint).__name__}() is for reverse-mode gradients, "
                "which brownian='unsafe' (diffrax.UnsafeBrownianPath) cannot give. "
                "Use brownian='grid' (default) or 'tree' (VirtualBrownianTree) to "
                "differentiate, or leave adjoint=None (diffrax.ForwardMode()) for "
                "forward-only sampling"
            )
    return brownian


def _checkpoint_mode(checkpoint, driver: str = "scan") -> str:
    """The scan driver's reverse-mode memory mode. Anything but the default (`True`)
    with `driver="diffeqsolve"` is an error, as `adjoint=` with the scan driver is:
    it would be ignored."""
    if checkpoint is True or checkpoint == "sqrt":
        mode = "sqrt"
    elif checkpoint is False:
        mode = "none"
    elif checkpoint in ("chunk", "step"):
        mode = checkpoint
    else:
        raise ValueError(
            "checkpoint must be True, False, 'sqrt', 'chunk' or 'step', got "
            f"{checkpoint!r}"
        )
    if driver != "scan" and checkpoint is not True:
        raise ValueError(
            f"checkpoint={checkpoint!r} applies to the 'scan' driver; "
            "driver='diffeqsolve' sets its reverse mode with adjoint= (e.g. "
            "diffrax.RecursiveCheckpointAdjoint(checkpoints=...))"
        )
    return mode


def _same_sde(a, b) -> bool:
    """False only when both are concrete and differ (traced leaves are not compared).

    Compared on the host: `eqx.tree_equal` would enqueue device ops and wait for
    their result, i.e. for every computation already queued (a loop of `gd.sample`
    calls could not overlap). The same object is the same SDE at no cost."""
    if a is b:
        return True
    leaves_a, tree_a = jtu.tree_flatten(a)
    leaves_b, tree_b = jtu.tree_flatten(b)
    if tree_a != tree_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
            continue
        if eqx.is_array(x) or eqx.is_array(y):
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _check_guidance_sde(score, sde) -> None:
    """Every SDE the score holds must be the one sampled: an oracle's exact score
    (`gmm.score(sde)`), a network read through an SDE (`EpsScore`, `X0Score`,
    `VScore`, `flax_score`), a classifier (`gmm.log_classifier(sde)`) or gradient
    guidance's denoiser. One built for another SDE gives a wrong score at every
    step (NaN samples or, worse, plausible wrong ones)."""
    from ._sde import AbstractSDE

    found = jtu.tree_leaves(score, is_leaf=lambda n: isinstance(n, AbstractSDE))
    for held in found:
        if isinstance(held, AbstractSDE) and not _same_sde(held, sde):
            raise ValueError(
                f"the score holds a {type(held).__name__} that differs (type or "
                f"parameters) from the {type(sde).__name__} sampled: build every "
                "score, classifier and guidance with the SDE that is sampled "
                "(e.g. gmm.score(sde), gd.gradient_guidance(..., sde=sde), "
                "gd.cfgpp(lam, sde, ts), gd.apg(w, sde))"
            )


def _score_times(solver, grid, adaptive: bool, denoise: bool):
    """The grid times at which `solver` evaluates the score on a fixed grid (in
    sampling order), or `None` where that is not known: adaptive steps, wrapped or
    unknown solvers, Runge-Kutta stages inside a step (Tsit5's, ShARK's). Step-start
    solvers (guidediff's, Euler, EulerHeun) never evaluate at the last time, unless
    `denoise` evaluates there."""
    from ._solver import DDIM, ExponentialIntegrator, SDEDPMSolverPP

    if adaptive or isinstance(solver, dfx.AbstractWrappedSolver):
        # (a HalfSolver also passes isinstance checks for the solver it wraps)
        return None
    step_start = (ExponentialIntegrator, SDEDPMSolverPP, DDIM, dfx.Euler, dfx.EulerHeun)
    if isinstance(solver, step_start):
        return grid if denoise else grid[:-1]
    c = getattr(getattr(solver, "tableau", None), "c", None)
    if isinstance(solver, dfx.ReversibleHeun) or (
        isinstance(solver, dfx.AbstractERK)
        and c is not None
        and bool(np.all((np.asarray(c) == 0) | (np.asarray(c) == 1)))
    ):
        return grid  # Heun: stages at the step's ends
    return None


def _check_intervals(
    score,
    ts,
    solver,
    adaptive: bool = False,
    denoise: bool = False,
    sde=None,
    stacklevel: int = 3,
    entry: str = "gd.sample",
) -> None:
    """A `gd.interval` whose (concrete) bounds miss the sampled times altogether,
    or hold none of the times at which the solver evaluates the score, never
    switches its guidance on: a warning, not a silent no-op (the usual cause of
    the first is bounds given as integer timesteps, 200..800, or as fractions of
    the steps;
    not an error, since a guided score reused for a segment of the time range, e.g.
    the first part of a split run, may legitimately miss an interval).

    Likewise a `gd.PiecewiseLinear` weight whose knots all lie on one side of the
    sampled times (knots given as step indices): it holds its end value there, a
    constant, though its values vary; and a `gd.PerStep` weight (`gd.cfgpp`'s) made
    for another grid than the sampler's (nor a run of its consecutive times): its
    steps are not the sampler's. (Judged from the copy its constructor checked:
    the arrays of a schedule made otherwise, e.g. by `jax.tree.map`, are not read
    back for it.)"""
    from ._guidance.interval import Interval
    from ._weights import PiecewiseLinear, knots_on_host

    kinds = (Interval, PiecewiseLinear, PerStep)
    found, schedules = [], []

    seen = set()  # (one object met twice, e.g. in a score and a proposal: once)

    def collect(tree):  # intervals and schedules, also inside an interval's guidance
        for node in jtu.tree_leaves(tree, is_leaf=lambda n: isinstance(n, kinds)):
            if not isinstance(node, kinds) or id(node) in seen:
                continue
            seen.add(id(node))  # (kept alive by found / schedules)
            if isinstance(node, Interval):
                found.append(node)
                # all its fields (a subclass may hold more than its guidance)
                collect([getattr(node, f.name) for f in dataclasses.fields(node)])
            elif isinstance(node, PiecewiseLinear | PerStep):
                schedules.append(node)

    collect(score)
    if not (found or schedules) or isinstance(ts, jax.core.Tracer):
        return
    from ._grid import grid_values

    grid = grid_values(ts)  # a NumPy grid's copy, or read once
    lo_t, hi_t = float(grid.min()), float(grid.max())
    for w in schedules:
        host = knots_on_host(w)  # not read back: that would wait for queued work
        if host is None:
            continue
        knots, values = host
        if isinstance(w, PerStep):
            _check_per_step_grid(
                w, knots, grid, solver, adaptive, entry, stacklevel + 1
            )
            continue
        if np.all(values == values[0]):
            continue  # a constant schedule: nothing is lost
        side = "after" if knots[0] > hi_t else "before" if knots[-1] < lo_t else None
        if side is not None:
            held = values[0] if side == "after" else values[-1]
            warnings.warn(
                f"a gd.PiecewiseLinear weight's knots [{knots[0]:g}, .., "
                f"{knots[-1]:g}] all lie {side} the sampled times "
                f"[{lo_t:g}, {hi_t:g}]: it is the constant {held:g} there, not the "
                "schedule its values describe. The knots are times of the SDE "
                "(from 0, data, to T, noise), not step indices",
                UserWarning,
                stacklevel=stacklevel,
            )
    if denoise and sde is not None:
        # the final Tweedie step is skipped where sigma = 0 (the identity there)
        # (not judged for an SDE with traced parameters: taken as evaluated)
        denoise = _sigma_vanishes(sde, grid[-1], grid.dtype) is not True
    times = _score_times(solver, grid, adaptive, denoise)
    for g in found:
        if isinstance(g.t_lo, jax.core.Tracer) or isinstance(g.t_hi, jax.core.Tracer):
            continue
        # in the grid's dtype, as `Interval.apply` compares them (a float64 bound
        # 1e-3 is below the float32 grid end it meets there)
        lo = float(np.asarray(g.t_lo).astype(grid.dtype))
        hi = float(np.asarray(g.t_hi).astype(grid.dtype))
        if type(g) is Interval and not lo <= hi:  # NaN, or reversed, as
            # gd.interval refuses them (a subclass may give its bounds other meanings)
            raise ValueError(
                f"gd.Interval's bounds must be t_lo <= t_hi and not NaN, got "
                f"[{lo:g}, {hi:g}] (an Interval built directly, or by gd.interval "
                "from traced bounds, is checked here)"
            )
        if hi < lo_t or lo > hi_t:
            warnings.warn(
                f"gd.interval's bounds [{lo:g}, {hi:g}] miss the sampled times "
                f"[{lo_t:g}, {hi_t:g}] altogether: its guidance never applies. The "
                "bounds are times of the SDE (from 0, data, to T, noise), not step "
                "indices or fractions of the steps",
                UserWarning,
                stacklevel=stacklevel,
            )
        elif times is not None and not np.any((times >= lo) & (times <= hi)):
            which = "grid times" if times.size == grid.size else "step starts"
            warnings.warn(
                f"gd.interval's bounds [{lo:g}, {hi:g}] hold none of the times at "
                f"which {type(solver).__name__} evaluates the score (the {which}, "
                f"from {float(times.min()):g} to {float(times.max()):g}; the grid "
                "is "
                f"{np.array2string(grid, precision=4, threshold=8)}), so its "
                "guidance never applies. Widen the interval or refine the grid",
                UserWarning,
                stacklevel=stacklevel,
            )


def _check_per_step_grid(
    w, knots, grid, solver, adaptive, entry: str, stacklevel: int
) -> None:
    """Warn where a `gd.PerStep` weight's steps are not the sampler's: another grid
    (not a run of its consecutive times, a split run's segment; compared in
    float32, as `PerStep` finds its steps), or adaptive steps; and where
    `gd.cfgpp`'s weights meet another solver than `gd.DDIM`, with which they are
    CFG at per-step weights, not CFG++. Also for equal values: gd.cfgpp's are on a
    log-SNR-uniform grid, and they depend on its number of steps."""
    from ._guidance.cfg import CFGppSteps
    from ._solver import DDIM

    def show(a):
        return f"{a.size - 1} steps from {float(a[0]):g} to {float(a[-1]):g}"

    if isinstance(w, CFGppSteps):
        what = "gd.cfgpp's weights were"
    else:
        what = "a gd.PerStep weight was"
    if adaptive:
        problem = "the sampler steps adaptively, not on that grid"
    elif _on_grid(knots, grid):
        problem = None
    else:
        problem = f"the sampler steps on another grid ({show(grid)}"
        if grid.size == knots.size:
            far = np.abs(grid.astype(np.float64) - knots)
            k = int(np.argmax(far))
            problem += f"; its time {k} differs by {far[k]:.3g}"
        problem += ")"
    if problem is not None:
        cfgpp = " (gd.cfgpp is CFG++ only on its own grid)" if "cfgpp" in what else ""
        warnings.warn(
            f"{what} made for a grid of {show(knots)}, but {problem}: each of "
            f"its steps takes the weight of the PerStep step its time falls in"
            f"{cfgpp}. Pass the same ts to both",
            UserWarning,
            stacklevel=stacklevel,
        )
    elif isinstance(w, CFGppSteps) and type(solver) is not DDIM:
        # (a wrapped DDIM, e.g. in a HalfSolver, evaluates between the grid times)
        if entry == "gd.smc_sample":
            fix = (
                "gd.smc_sample steps the reverse SDE; CFG++ needs gd.sample(..., "
                "process='ode', solver=gd.DDIM(sde))"
            )
        else:
            fix = "Sample with process='ode', solver=gd.DDIM(sde)"
        warnings.warn(
            f"gd.cfgpp's weights make gd.DDIM's step the CFG++ step; with "
            f"{type(solver).__name__} they are classifier-free guidance at per-step "
            f"weights, not CFG++. {fix}",
            UserWarning,
            stacklevel=stacklevel,
        )


def _on_grid(knots: np.ndarray, grid: np.ndarray) -> bool:
    """Whether the sampler's `grid` is a `PerStep`'s grid `knots`, or a run of its
    consecutive times, each time within the tolerance `PerStep` finds its steps
    with (16 float32 ulps of the largest time, at most 1/64 of the neighbouring
    gaps)."""
    knots = knots.astype(np.float64)
    grid = grid.astype(np.float64)
    gaps = np.abs(np.diff(knots))
    near = np.minimum(np.append(gaps, np.inf), np.insert(gaps, 0, np.inf))
    scale = max(abs(knots[0]), abs(knots[-1]))
    # (the ends only hold their weights: a quarter of their gap, as 16-bit times)
    share = np.full(knots.size, 1 / 64)
    share[[0, -1]] = 0.25
    tol = np.minimum(16 * np.finfo(np.float32).eps * scale, share * near)
    for s in np.flatnonzero(np.abs(knots - grid[0]) <= tol)[:1]:
        run, t = knots[s : s + grid.size], tol[s : s + grid.size]
        return run.size == grid.size and bool(np.all(np.abs(run - grid) <= t))
    return False


def _evaluates_at_step_end(solver) -> bool:
    """Whether `solver` evaluates the vector field at its step's end time: an
    explicit Runge-Kutta tableau with a stage at c = 1 (Heun, the default ODE
    solver; Bosh3, Tsit5, Dopri5). Euler-type and guidediff's solvers evaluate at
    the step's start only; ReversibleHeun at both ends."""
    solver = unwrap_solver(solver)
    if isinstance(solver, dfx.ReversibleHeun):
        return True
    c = getattr(getattr(solver, "tableau", None), "c", None)
    return c is not None and bool(np.any(np.asarray(c) == 1.0))


# sigma(t) = 0 or not, per (SDE, time, dtype), least recently used first: computed
# on the device once (a read waits for the work queued before it).
_SIGMA_VANISHES: collections.OrderedDict = collections.OrderedDict()


def _sigma_vanishes(sde, t, dtype) -> bool | None:
    """Whether the marginal's std sigma(t) is 0 in `dtype`: at t = 0, and where it
    underflows (e.g. `LinearBeta(beta_min=0)` at t = 1e-20 in float32). None for
    an SDE with traced parameters. Remembered by the SDE's structure and parameter
    values, so a repeated call does no device work."""
    try:  # by the SDE's structure and parameter values
        sde_key = _tree_key(sde, values=True)
    except TypeError:
        sde_key = None
    key = None if sde_key is None else (sde_key, float(t), np.dtype(dtype))
    if key is not None and key in _SIGMA_VANISHES:
        _SIGMA_VANISHES.move_to_end(key)
        return _SIGMA_VANISHES[key]
    try:
        sigma = float(np.asarray(sde.marginal(jnp.asarray(t, dtype))[1]))
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None  # a traced SDE parameter
    if key is not None:
        _SIGMA_VANISHES[key] = sigma == 0.0
        while len(_SIGMA_VANISHES) > _MAX_VALUES:
            _SIGMA_VANISHES.popitem(last=False)
    return sigma == 0.0


def _check_network_end(score, solver, sde, ts) -> None:
    """A network read as a score (`EpsScore`, `X0Score`, `VScore`, `flax_score`)
    divides by
    sigma(t), zero at t = 0 for VP SDEs: a grid ending there, with a solver that
    evaluates the score at the step's end, makes every particle infinite (all
    failed, no reason given). Checked only for that combination, so other calls
    pay nothing."""
    from ._grid import check_grid
    from ._score import EpsScore, VScore, X0Score

    if not _evaluates_at_step_end(solver):
        return
    network = (EpsScore, X0Score, VScore)
    found = jtu.tree_leaves(score, is_leaf=lambda n: isinstance(n, network))
    if not any(isinstance(n, network) for n in found):
        return
    t_end = check_grid(sde, ts)  # remembered: no device-to-host copy
    if t_end is not None and _sigma_vanishes(sde, t_end, ts.dtype):
        raise ValueError(
            f"the time grid ends at t = {t_end}, where sigma(t) = 0 and a network's "
            f"score (a prediction divided by sigma) is infinite; "
            f"{type(solver).__name__} evaluates the score at each step's end, so "
            "every particle would fail. End the grid at a small t > 0 (e.g. "
            "gd.uniform_grid(sde.T, 1e-3, n)), or use a solver that evaluates at "
            "step starts only (diffrax.Euler, gd.DDIM, gd.DPMSolverPP, gd.UniPC, "
            "gd.ExponentialIntegrator, gd.SDEDPMSolverPP)"
        )


def _check_solver(solver, process, controller, sde=None, driver="scan") -> None:
    """guidediff's diffusion solvers each solve one kind of terms, for the SDE they
    were built with; the multistep ones run on fixed grids only; adaptive steps need
    an error estimate."""
    from ._solver import DDIM, ExponentialIntegrator, SDEDPMSolverPP

    if isinstance(solver, type) and issubclass(solver, dfx.AbstractSolver):
        ours = solver.__module__.split(".")[0] == "guidediff"
        hint = "(sde)" if ours else "(...)"
        raise TypeError(
            f"solver must be a diffrax.AbstractSolver instance, got the class "
            f"{solver.__name__}: pass an instance, {solver.__name__}{hint}"
        )
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(
            f"solver must be a diffrax.AbstractSolver, got {type(solver).__name__}"
        )
    name = type(solver).__name__
    solver_sde = getattr(unwrap_solver(solver), "sde", None)
    if sde is not None and solver_sde is not None and not _same_sde(solver_sde, sde):
        raise ValueError(
            f"{name} was built for a different SDE (type or parameters) than the "
            f"one sampled; build it with the same SDE: {name}(sde)"
        )
    if isinstance(solver, ExponentialIntegrator | SDEDPMSolverPP) and process != "sde":
        raise ValueError(
            f"{name} steps the reverse SDE (process='sde'); for the probability-flow "
            "ODE use gd.DDIM, gd.DPMSolverPP, gd.UniPC or a diffrax ODE solver"
        )
    if isinstance(solver, DDIM) and process != "ode":
        raise ValueError(
            f"{name} steps the probability-flow ODE (process='ode'); for the "
            "reverse SDE use gd.ExponentialIntegrator, gd.SDEDPMSolverPP or a "
            "diffrax SDE solver"
        )
    structure = getattr(solver, "term_structure", None)
    if typing.get_origin(structure) is dfx.MultiTerm:
        # diffrax's SDE-only solvers (EulerHeun, Milstein, SRK, Langevin) step a
        # (drift, diffusion) pair; the probability-flow ODE is one drift term
        if process != "sde":
            raise ValueError(
                f"{name} steps a pair of terms (an SDE's drift and diffusion, or an "
                "IMEX split); the probability-flow ODE (process='ode') is one drift "
                "term and needs an ODE solver, e.g. diffrax.Heun(), diffrax.Tsit5(), "
                "gd.DDIM or gd.DPMSolverPP"
            )
        parts = typing.get_args(typing.get_args(structure)[0])
        langevin = (
            dfx.UnderdampedLangevinDriftTerm,
            dfx.UnderdampedLangevinDiffusionTerm,
        )
        if any(isinstance(p, type) and issubclass(p, langevin) for p in parts):
            raise ValueError(
                f"{name} integrates underdamped Langevin dynamics "
                "(diffrax.UnderdampedLangevinDriftTerm), not a reverse diffusion SDE; "
                "use e.g. gd.ExponentialIntegrator(sde), diffrax.Euler() or "
                "diffrax.ShARK()"
            )
    if process == "sde" and levy_area_for(solver) is not dfx.BrownianIncrement:
        # a clear error for Levy areas no path gives, above; and diffrax's own
        # reverse-time stepping of SRK solvers diverges (diffrax issue #598, still
        # in 0.7.2: variance 6e5 for a target of 0.25), so only the scan driver,
        # which steps them from t0 > t1 directly, runs them
        if driver != "scan":
            raise ValueError(
                f"{name} (a stochastic Runge-Kutta solver) is wrong backwards in time "
                "inside diffrax.diffeqsolve (diffrax issue #598), which "
                "driver='diffeqsolve' and adaptive steps use: sample with it on a "
                "fixed grid with driver='scan' (the default), or use diffrax.Heun() "
                "for adaptive steps"
            )
    fixed_grid_only = DDIM | SDEDPMSolverPP  # DPMSolverPP is a DDIM
    inner = unwrap_solver(solver)
    if isinstance(inner, fixed_grid_only) and not (
        controller is None or isinstance(controller, dfx.StepTo)
    ):
        # diffrax.HalfSolver gives the probability-flow solvers an error estimate
        # (a rejected step keeps the previous state, so the multistep ones work:
        # their error follows the tolerance); SDEDPMSolverPP failed particles so
        if isinstance(solver, dfx.HalfSolver) and isinstance(inner, DDIM):
            pass
        elif isinstance(inner, DDIM):
            raise ValueError(
                f"{name} has no error estimate and runs on fixed grids only: pass "
                f"ts (and no adaptive stepsize_controller), or wrap it, "
                f"diffrax.HalfSolver(gd.{type(inner).__name__}(sde)), for adaptive "
                "steps"
            )
        else:
            raise ValueError(
                f"{name} runs on fixed grids only: pass ts (and no adaptive "
                "stepsize_controller)"
            )
    if isinstance(controller, dfx.ConstantStepSize):
        raise ValueError(
            "stepsize_controller=diffrax.ConstantStepSize() needs a dt0, which "
            "gd.sample does not take: pass the fixed grid as ts= (e.g. "
            "gd.uniform_grid(sde.T, 1e-3, n)), which every solver steps on"
        )
    adaptive = controller is not None and not isinstance(controller, dfx.StepTo)
    root_finder = getattr(solver, "root_finder", None)
    if isinstance(solver, dfx.AbstractImplicitSolver) and not (
        adaptive and hasattr(controller, "rtol")
    ):
        tols = [getattr(root_finder, k, None) for k in ("rtol", "atol")]
        # diffrax's default is a placeholder, "taken from the controller"
        numbers = int | float | np.number | np.ndarray | jax.Array
        if any(not isinstance(tol, numbers) for tol in tols):
            raise ValueError(
                f"{name} is implicit and its root finder has no tolerances; "
                "diffrax takes them from an adaptive controller's rtol/atol, and a "
                f"fixed grid has none: pass them, e.g. {name}(root_finder="
                "optimistix.Chord(rtol=1e-6, atol=1e-6))"
            )
    if adaptive and not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(
            f"{name} gives no error estimate, so it cannot take adaptive steps "
            f"(stepsize_controller={type(controller).__name__}); use a diffrax "
            "solver that does (diffrax.Heun(), the default with a controller, or "
            "diffrax.Tsit5() for the ODE) or a fixed grid"
        )


def _saveat_flags(
    saveat, ts, save_trajectory, save_every, adaptive: bool = False
) -> tuple[bool, int]:
    """`(save_trajectory, save_every)` for a `diffrax.SaveAt`: the times it saves
    must be the grid's `ts[::k]` (k dividing the number of steps), in order, or
    the final time alone. Everything else is a clear error."""
    if not isinstance(saveat, dfx.SaveAt):
        raise TypeError(f"saveat must be a diffrax.SaveAt, got {saveat!r}")
    one = isinstance(save_every, int | np.integer) and not isinstance(save_every, bool)
    if save_trajectory or not (one and save_every == 1):
        raise ValueError(
            "pass either saveat= or save_trajectory= / save_every=, not both"
        )
    extras = [
        name
        for name in ("dense", "solver_state", "controller_state", "made_jump")
        if getattr(saveat, name)
    ]
    if extras:
        raise ValueError(
            f"gd.sample's saveat saves particle states only; {extras} are not "
            "supported (diffrax.diffeqsolve with gd.reverse_sde / "
            "gd.probability_flow gives them)"
        )
    sub = saveat.subs
    if not isinstance(sub, dfx.SubSaveAt):
        raise ValueError(
            "gd.sample's saveat takes one set of times (no nested SubSaveAt)"
        )
    from diffrax._saveat import save_y

    if sub.fn is not save_y:
        raise ValueError(
            "gd.sample's saveat saves the states themselves (no fn=): apply the "
            "function to Samples.ys afterwards"
        )
    n = ts.shape[0] - 1
    if sub.t1 and not sub.t0 and sub.ts is None and not sub.steps:
        return False, 1  # the final state only: ys without a time axis
    if sub.steps and adaptive:
        raise ValueError(
            "SaveAt(steps=...) saves diffrax's accepted steps, which an adaptive "
            "stepsize_controller chooses; gd.sample saves at times of ts only: use "
            "SaveAt(ts=ts[::k]) (or save_trajectory=True)"
        )
    idx = [0] if sub.t0 else []
    if sub.ts is not None:
        if isinstance(sub.ts, jax.core.Tracer):
            raise TypeError(
                "saveat's ts is traced (a SaveAt built inside jax.jit from the grid, "
                "e.g. SaveAt(ts=ts[::k])): gd.sample needs the saved times before "
                "compiling. Build the SaveAt outside the jitted function, or use "
                "SaveAt(t0=True, steps=k), which needs no times"
            )
        if isinstance(ts, jax.core.Tracer):
            raise ValueError(
                "saveat=SaveAt(ts=...) needs a concrete grid (ts= is traced here) "
                "to find its times in; use save_trajectory=True, save_every=k"
            )
        grid = np.asarray(ts)
        want = np.asarray(sub.ts).reshape(-1)
        if not np.issubdtype(want.dtype, np.floating):
            want = want.astype(grid.dtype)
        # compared in the narrower of the two dtypes: ts[::k] cast to float32 are
        # the float64 grid's times
        common = min(grid.dtype, want.dtype, key=lambda d: np.dtype(d).itemsize)
        grid, want = grid.astype(common), want.astype(common)
        pos = [np.flatnonzero(grid == t) for t in want]
        if any(p.size == 0 for p in pos):
            raise ValueError(
                "saveat ts must be times of the sampling grid (ts[::k]); "
                f"{want[[p.size == 0 for p in pos]].tolist()} are not grid times"
            )
        idx += [int(p[0]) for p in pos]
    if sub.steps:
        idx += list(range(int(sub.steps), n + 1, int(sub.steps)))
    if sub.t1:
        idx.append(n)
    for k in range(1, n + 1):
        if n % k == 0 and idx == list(range(0, n + 1, k)):
            return True, k
    raise ValueError(
        "gd.sample's saveat must save the grid's ts[::k] for a k dividing the "
        f"number of steps ({n}), starting at ts[0] and ending at ts[-1] (e.g. "
        "SaveAt(t0=True, steps=True), SaveAt(ts=ts[::k])), or the final time alone "
        f"(SaveAt(t1=True)); got grid indices {idx}"
    )


def _check_save_every(save_every, save_trajectory, ts, truncate) -> int:
    reject_traced("save_every", save_every)
    if isinstance(save_every, bool) or not isinstance(save_every, int | np.integer):
        raise TypeError(f"save_every must be a positive int, got {save_every!r}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if save_every == 1:
        return 1
    if not save_trajectory:
        raise ValueError(
            "save_every applies to trajectories: pass save_trajectory=True"
        )
    num_steps = ts.shape[0] - 1
    if num_steps % save_every:
        raise ValueError(
            f"save_every={save_every} must divide the number of steps ({num_steps}), "
            f"so that ts[::{save_every}] ends at ts[-1]"
        )
    if truncate is not None:
        raise ValueError(
            "save_every > 1 (or a saveat= of ts[::k], k > 1) and truncate_backprop "
            "cannot be combined"
        )
    return int(save_every)


def _check_unroll(unroll, driver) -> int:
    reject_traced("unroll", unroll)
    if isinstance(unroll, bool) or not isinstance(unroll, int | np.integer):
        raise TypeError(f"unroll must be a positive int, got {unroll!r}")
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")
    if unroll != 1 and driver != "scan":
        raise ValueError(
            f"unroll={unroll} applies to the 'scan' driver only, not driver={driver!r}"
        )
    return int(unroll)


def _check_truncate(truncate, controller) -> int | None:
    if truncate is None:
        return None
    reject_traced("truncate_backprop", truncate)
    if isinstance(truncate, bool) or not isinstance(truncate, int | np.integer):
        raise TypeError(
            f"truncate_backprop must be a positive int (steps), got {truncate!r}"
        )
    if truncate < 1:
        raise ValueError(
            f"truncate_backprop must be a positive number of steps, got {truncate!r}"
        )
    if controller is not None:
        raise ValueError(
            "truncate_backprop counts steps of a fixed grid; it cannot be combined "
            "with an adaptive stepsize_controller"
        )
    return int(truncate)


def _check_y0(y0, shape, dtype, num_particles):
    y0 = jnp.asarray(y0)
    if not jnp.issubdtype(y0.dtype, jnp.floating):
        raise TypeError(f"y0 must be floating point, got dtype {y0.dtype}")
    if y0.ndim == len(shape) + 1 and y0.shape[0] == 0:
        raise ValueError(
            f"y0 holds no particles (shape {y0.shape}): num_particles must be at "
            "least 1"
        )
    y0 = y0.astype(dtype)
    if y0.shape == shape and num_particles is None:
        return y0, None
    if y0.shape == shape:
        raise ValueError(
            f"y0 has one particle's shape {shape} but num_particles={num_particles}: "
            f"pass y0 of shape {(num_particles, *shape)} or num_particles=None"
        )
    if y0.shape[1:] == shape and y0.ndim == len(shape) + 1:
        if num_particles is not None and int(num_particles) != y0.shape[0]:
            raise ValueError(
                f"y0 holds {y0.shape[0]} particles but num_particles={num_particles}"
            )
        return y0, y0.shape[0]
    raise ValueError(
        f"y0 must have shape (num_particles, *shape) = (n, {', '.join(map(str, shape))}"
        f"{',' if len(shape) == 1 else ''}) or, for one particle, {shape}; "
        f"got {y0.shape}"
    )


def _check_dtype(dtype):
    """The particles' dtype, canonicalised (float64 becomes float32 unless
    `jax_enable_x64` is on, with a warning, as JAX's own arrays do); floating
    point only. (Called by the public entry points: the warning names their
    caller.)"""
    default = dtype is None or dtype is float  # Python's float: JAX's default
    dtype = jnp.result_type(float) if default else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    canonical = jax.dtypes.canonicalize_dtype(dtype)
    if not default and canonical != dtype:
        warnings.warn(
            f"dtype={dtype} was requested, but 64-bit types need jax_enable_x64: "
            f"the particles are {canonical}. To sample in {dtype}, run "
            "jax.config.update('jax_enable_x64', True) at startup",
            UserWarning,
            stacklevel=3,
        )
    return canonical


def _check_count(name: str, value, *, allow_none: bool = False) -> int | None:
    """A positive Python/NumPy integer (not a bool or a float)."""
    if value is None and allow_none:
        return None
    reject_traced(name, value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _check_static_float(name: str, value) -> float:
    """A real Python/NumPy number (or 0-d array) for a static float argument."""
    reject_traced(name, value, "a Python float")
    if not is_real_scalar(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(
            f"shape must be a tuple of ints (one particle's shape), got {shape!r}"
        ) from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise TypeError(
                f"shape must be a tuple of non-negative ints, got {shape!r}"
            )
    return tuple(int(d) for d in dims)


def _check_flag(name: str, value) -> bool:
    reject_traced(name, value, "True or False")
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _spec_axis_names(sharding) -> list:
    """The mesh axis names a NamedSharding's PartitionSpec uses, in order."""
    names = []
    for entry in sharding.spec:
        for name in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def _training_mode_hint(error: Exception) -> str:
    """Flax NNX's "Cannot mutate ... from a different trace level": a module in
    training mode (dropout draws from its RNG state, batch norm updates its
    statistics) mutates itself inside the sampler's traced program. (By name: the
    core does not import flax.)"""
    if type(error).__name__ != "TraceContextError":
        return ""
    return (
        ". An NNX module in training mode (dropout, batch norm) mutates its state "
        "when called: call model.eval() before sampling with it"
    )


def _check_sharding(sharding, num: int, shape, single: bool = False) -> None:
    """The particle axis must split evenly over the sharding's devices, over mesh
    axes that jax.lax.with_sharding_constraint accepts (Auto), outside shard_map."""
    if sharding is None:
        return
    if not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(
            "sharding must be a jax.sharding.Sharding (e.g. NamedSharding(mesh, "
            f"PartitionSpec('p'))), got {sharding!r}"
        )
    context = jax.sharding.get_abstract_mesh()  # jax.set_mesh's, shard_map's
    manual = tuple(context.manual_axes)
    if manual:
        raise ValueError(
            f"sharding= is not supported inside jax.shard_map (mesh axes {manual} "
            "are Manual here): the body already runs once per shard, on its own "
            "particles; drop sharding= there, or call the sampler outside shard_map "
            "with sharding="
        )
    if isinstance(sharding, jax.sharding.NamedSharding):
        if not context.empty and context != sharding.mesh.abstract_mesh:
            raise ValueError(
                f"the sharding's mesh ({sharding.mesh.abstract_mesh}) is not the "
                f"mesh set by jax.set_mesh ({context}), and JAX lays out the "
                "particles over the context's mesh: make the sharding over that "
                "mesh, or call the sampler outside the jax.set_mesh block"
            )
        kinds = dict(
            zip(sharding.mesh.axis_names, sharding.mesh.axis_types, strict=True)
        )
        other = [
            name
            for name in _spec_axis_names(sharding)
            if kinds.get(name, jax.sharding.AxisType.Auto) != jax.sharding.AxisType.Auto
        ]
        if other:
            raise ValueError(
                f"the sharding's PartitionSpec names mesh axes {other} of a type "
                "other than Auto; the particles are laid out with "
                "jax.lax.with_sharding_constraint, whose spec may name Auto axes "
                "only: make those axes with axis_types=jax.sharding.AxisType.Auto "
                "(jax.make_mesh(..., axis_types=...)), or leave them out of the spec"
            )
    try:
        sharding.check_compatible_aval((num, *shape))
    except ValueError:
        raise ValueError(
            f"the sharding {sharding} names more axes than the particles have: "
            f"they are a (num_particles, *shape) = {(num, *shape)} array of rank "
            f"{1 + len(shape)}; give at most one PartitionSpec entry per axis "
            "(PartitionSpec('p') shards the particle axis)"
        ) from None
    try:
        _leading_axis_sharding(sharding).shard_shape((num,))
    except ValueError as e:
        if single:
            raise ValueError(
                "a single particle (num_particles=None) cannot be split over the "
                "devices: pass num_particles (a number the mesh axis divides), or "
                f"a sharding that does not split the particle axis ({e})"
            ) from None
        raise ValueError(
            f"{num} particles cannot be split evenly over the devices: use a number "
            f"of particles that the mesh axis divides ({e})"
        ) from None
    try:
        sharding.shard_shape((num, *shape))
    except ValueError as e:
        raise ValueError(
            f"the sharding {sharding} splits an axis of each particle's shape "
            f"{tuple(shape)} unevenly over the devices (axes 1.. of the "
            f"(num_particles, *shape) = {(num, *shape)} particles): give that axis "
            f"no mesh axis, or one whose size divides it ({e})"
        ) from None


def _check_committed_arrays(error: ValueError, sharding) -> None:
    """JAX's error for an argument committed to one device, inside a program laid
    out over the sharding's devices, named for what the user controls."""
    if sharding is not None and "incompatible devices" in str(error):
        raise ValueError(
            "with sharding=, every array argument (the key, y0, args, and the "
            "arrays inside the score or potential: guidance weights, labels, "
            "parameters) must be uncommitted or placed on the sharding's devices "
            "as a whole; one is committed elsewhere (jax.device_put(x, device) "
            "commits x to that device alone). Create it without a device, or move "
            "it with "
            "jax.device_put(x, NamedSharding(mesh, PartitionSpec())) (replicated). "
            f"JAX's message: {error}"
        ) from error


def _call_laid_out(program, sharding, *args):
    """`program(*args)`, JAX's error for a committed argument named
    (`_check_committed_arrays`)."""
    try:
        return program(*args)
    except ValueError as e:
        _check_committed_arrays(e, sharding)
        raise


def _output_sharding(sharding, trajectory: bool):
    """The layout of `gd.sample`'s `ys`: `sharding` itself for `(P, *shape)`
    particles; for a `(P, num_saves, *shape)` trajectory, its spec with the save
    axis replicated (None for a sharding other than `NamedSharding`, which names no
    axes: the particle axis then follows the keys' layout)."""
    if not trajectory:
        return sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec)
    if len(spec) <= 1:
        return sharding  # the particle axis only: valid at any rank
    new = jax.sharding.PartitionSpec(spec[0], None, *spec[1:])
    return jax.sharding.NamedSharding(sharding.mesh, new)


def _leading_axis_sharding(sharding):
    """A sharding for any particle-indexed array (keys, log-weights, solver state):
    the particle axis laid out as `sharding` lays out the particles' first axis, the
    other axes replicated. (`sharding` describes `(P, *shape)` particles: a spec such
    as `PartitionSpec('p', None)` cannot constrain the `(P,)` keys.)"""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        lead = jax.sharding.PartitionSpec(spec[0] if spec else None)
        return jax.sharding.NamedSharding(sharding.mesh, lead)
    return sharding
