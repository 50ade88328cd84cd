r"""A small, deterministic, resumable training loop on optax.

`fit` runs `num_steps` optimiser steps of a loss `loss_fn(params, key, batch)`,
several steps per jitted call (`lax.scan`), with an exponential moving average
(EMA) of the parameters, periodic evaluation, a tqdm progress bar and orbax
checkpoints.

Everything random is a pure function of the step index: step $k$ uses the key
`fold_in(key, k)`, split into a data key (which minibatch) and a loss key (which $t$
and noise). Hence a run is deterministic given `key`, and a run interrupted after $k$
steps and resumed from its checkpoint to $n$ steps gives bit-for-bit the same
parameters, EMA, optimiser state and loss history as an uninterrupted $n$-step run.
"""

import base64
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, PyTree

from ._brownian import check_key, threefry_key
from ._custom_types import Key


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for is missing, corrupt or does not match."""


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What `fit` returns.

    **Attributes:**

    - `params`: the final parameters.
    - `ema_params`: the EMA of the parameters (`None` if `ema_decay=None`).
    - `opt_state`: the final optimiser state.
    - `losses`: `(num_steps,)` numpy array, the loss of every step (on resume, the
      steps before the checkpoint come from the checkpoint).
    - `evals`: list of `(step, eval_fn(...))` pairs. Evals restored from a
      checkpoint (the ones before a resume, or all of them for `load_checkpoint`)
      have the type they were recorded with: see `fit`'s `checkpoint_dir`.
    - `step`: the number of steps done.
    """

    params: PyTree[Any]
    ema_params: PyTree[Any] | None
    opt_state: PyTree[Any]
    losses: np.ndarray
    evals: list
    step: int


def warm_start(pretrained: PyTree[Any], like: PyTree[Any] | None = None) -> PyTree[Any]:
    r"""Initialise a network from pretrained parameters: a fresh copy of them.

    PAPER.md 4.1: the reweighted score $\hat s^r_\phi$ is naturally initialised from
    the pretrained score $s_\theta$, i.e. $\phi_0 = \theta$, and fine-tuned with
    `reward_weighted_dsm_loss`. This is only a copy (new buffers, so donating or
    updating the copy never touches the pretrained weights); the two networks must
    have the same architecture. If `like` (e.g. `net.init(...)` of the new network) is
    given, its structure, shapes and dtypes are checked against `pretrained` and a
    mismatch is a `ValueError`.

    !!! example

        ```python
        sde, net = gd.VPSDE(), gd.MLPScoreNet()
        data = gd.swiss_roll(0, 10_000)
        reward = gd.GaussianBumpReward([1.0, 0.0], 0.5)
        dsm = lambda p, k, x0: gd.dsm_loss(net.apply, p, k, x0, sde)
        reward_loss = lambda p, k, x0: gd.reward_weighted_dsm_loss(
            net.apply, p, k, x0, reward, sde
        )
        params = net.init(jr.key(0), 0.5, jnp.zeros(2))
        kw = dict(optimizer=optax.adam(1e-3), batch_size=512, key=jr.key(1))
        base = gd.fit(dsm, params, data, num_steps=300, **kw).ema_params
        phi0 = gd.warm_start(base, like=params)
        tuned = gd.fit(reward_loss, phi0, data, num_steps=100, **kw).ema_params
        ```
    """
    if isinstance(pretrained, FitResult):
        raise TypeError(
            "warm_start takes parameters, got a FitResult: pass its .params or "
            ".ema_params"
        )
    if not any(eqx.is_array(x) for x in jax.tree.leaves(pretrained)):
        raise ValueError(
            f"pretrained holds no arrays (got {type(pretrained).__name__}); a run "
            "with ema_decay=None has ema_params=None: use its .params"
        )
    if like is not None:
        s1, s2 = jax.tree.structure(pretrained), jax.tree.structure(like)
        if s1 != s2:
            raise ValueError(
                "pretrained parameters do not match the new network's structure:\n"
                f"{s1}\nvs\n{s2}"
            )
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(pretrained),
            jax.tree.leaves(like),
            strict=True,
        ):
            if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)}: pretrained "
                    f"{jnp.shape(a)} {jnp.result_type(a)} vs new {jnp.shape(b)} "
                    f"{jnp.result_type(b)}"
                )
    return jax.tree.map(lambda a: jnp.array(a, copy=True), pretrained)


# ---------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------


def _check_count(name: str, value, minimum: int, *, optional: bool = False):
    """A true integer (a Python `int` or a NumPy integer, not a `bool` or a float)
    `>= minimum`, returned as a Python `int`; `None` passes if `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{name} must be an integer{' or None' if optional else ''}, got "
            f"{value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------


def _data_mode(data) -> str:
    if isinstance(data, Iterator):
        return "iterator"
    if callable(data) and not isinstance(data, jax.Array):
        return "sampler"
    leaves = jax.tree.leaves(data)
    if not leaves or not all(hasattr(x, "shape") and x.ndim >= 1 for x in leaves):
        raise TypeError(
            "data must be a pytree of arrays with a leading example axis, a jittable "
            "function key -> batch, or an iterator of batches"
        )
    n = {x.shape[0] for x in leaves}
    if len(n) != 1:
        raise ValueError(f"every data array needs the same leading size, got {n}")
    if n == {0}:
        raise ValueError("data holds no examples: its leading axis has size 0")
    return "arrays"


def _check_finite_data(arrays) -> None:
    """A NaN example gave "the loss is not finite at step k" whenever a batch drew
    it: named before the first step (one reduction per array on the device, read
    once). Data with NaN on purpose (padding handled by the loss) can come from a
    sampler or an iterator, which are not checked."""
    for path, x in jax.tree_util.tree_leaves_with_path(arrays):
        if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all()):
            where = jax.tree_util.keystr(path) or "data"
            raise ValueError(
                f"the training data hold non-finite values (NaN or inf) in {where}: "
                "drop or repair those examples (or, if the loss handles them, pass "
                "the data through a sampler function or an iterator)"
            )


def _minibatch(arrays, key, batch_size):
    n = jax.tree.leaves(arrays)[0].shape[0]
    idx = jr.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda a: a[idx], arrays)


# ---------------------------------------------------------------------------------
# The jitted chunk of steps
# ---------------------------------------------------------------------------------


def _ema_init(params):
    """The EMA accumulator: the parameters, 16-bit floating leaves in float32 (as
    `optax.ema`'s `accumulator_dtype`). A bfloat16 average drifts: d and 1 - d
    rounded apart do not sum to one, and increments below half its resolution
    (2^-9 relative) are lost, so it cannot follow slowly moving parameters."""
    return jax.tree.map(lambda p: jnp.asarray(p, _accumulator_dtype(p)), params)


def _accumulator_dtype(p):
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.promote_types(p.dtype, jnp.float32)
    return p.dtype


def _ema_out(ema, params):
    """The EMA in the parameters' dtypes (what a network is applied with)."""
    if ema is None:
        return None
    return jax.tree.map(lambda e, p: e.astype(jnp.asarray(p).dtype), ema, params)


def _ema_update(ema, params, decay, step):
    r"""$\bar\theta \leftarrow d_k\bar\theta + (1 - d_k)\theta$, computed as
    $\bar\theta + (1 - d_k)(\theta - \bar\theta)$ in the accumulator's dtype (so a
    constant $\theta$ is a fixed point exactly)."""
    # Warm-up: decay_k = min(decay, (1 + k) / (10 + k)), so early averages do not
    # remember the random initialisation for thousands of steps.
    k = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + k) / (10.0 + k))

    def update(e, p):
        w = (1 - d).astype(e.dtype)
        return (e + w * (p.astype(e.dtype) - e)).astype(e.dtype)

    return jax.tree.map(update, ema, params)


def _raise_checked(error: Exception, first: int, last: int) -> None:
    """An `equinox.error_if` check that failed inside the compiled steps (a class
    label out of range, a NaN reward) as a `ValueError` with its own message;
    JAX's runtime error buries it in a callback traceback. Other errors as they
    are."""
    tag = "EquinoxRuntimeError: "
    footer = "An error occurred during the runtime of your JAX program"
    text = str(error)
    if tag not in text or footer not in text:  # not a failed runtime check
        raise error
    message = text.split(tag, 1)[1].split("\n\n", 1)[0].strip()
    raise ValueError(
        f"a check inside the loss failed in the steps {first}..{last}: {message}"
    ) from None


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_static",
        "optimizer",
        "sampler_static",
        "batch_size",
        "length",
        "unrolled",
    ),
)
def _run_chunk(
    state,
    start,
    key,
    arrays,
    batches,
    ema_decay,
    loss_dynamic,
    sampler_dynamic,
    *,
    loss_static,
    optimizer,
    sampler_static,
    batch_size,
    length,
    unrolled,
):
    # Callables may be pytrees holding arrays (e.g. an eqx.Module): their arrays are
    # traced arguments, the rest is static (hashed) and keys the compilation cache.
    loss_fn = eqx.combine(loss_dynamic, loss_static)
    sampler = eqx.combine(sampler_dynamic, sampler_static)

    def body(state, inp):
        step, i, valid = inp
        params, opt_state, ema = state
        # the chunk's i-th host batch (iterator data; None otherwise)
        batch = jax.tree.map(
            lambda b: lax.dynamic_index_in_dim(b, i, keepdims=False), batches
        )
        kdata, kloss = jr.split(jr.fold_in(key, step))
        if sampler is not None:
            batch = sampler(kdata)
        elif arrays is not None:
            batch = _minibatch(arrays, kdata, batch_size)
        loss, grads = jax.value_and_grad(loss_fn)(params, kloss, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = _ema_update(ema, params, ema_decay, step)
        # a finite loss can still have a non-finite gradient (e.g. sqrt at 0): report
        # the step whose update made the parameters non-finite
        finite = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        )
        new = (params, opt_state, ema)
        if valid is not None:  # a padding step leaves the state as it was
            new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, state)
        return new, (loss, finite)

    if unrolled:
        # steps_per_dispatch=1: no while loop around the step (XLA:CPU runs
        # convolution gradients inside a loop many times slower than on their own).
        # Decided by steps_per_dispatch, not by this chunk's length: a 1-step chunk
        # of a scanned run (before a checkpoint, an eval or a resume point) must
        # compile to the same arithmetic as the scan, or resuming is not bit-exact.
        state, out = body(state, (start, 0, None))
        return state, jax.tree.map(lambda a: a[None], out)
    # A 1-step chunk is a 2-step scan whose second step is padding: XLA compiles a
    # scan it knows runs once without its loop, and fused that step differently (an
    # ulp in the loss with host batches), so a run cut by an eval or a resume point
    # was not bit-exact. Every scanned chunk selects its new state by `valid`, so
    # all compile the same loop body.
    n = max(length, 2)
    steps = start + jnp.arange(n, dtype=jnp.uint32)
    index = jnp.minimum(jnp.arange(n, dtype=jnp.int32), length - 1)
    state, out = jax.lax.scan(body, state, (steps, index, jnp.arange(n) < length))
    return state, jax.tree.map(lambda a: a[:length], out)


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------


def _manager(directory, *, create: bool, max_to_keep: int | None = None):
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        item_names=("state", "meta"),
    )


def _key_data(key) -> list[int]:
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    return np.asarray(key).ravel().tolist()


_EVAL_TYPES = (
    "None, bool, int, float, str, NumPy and JAX arrays and NumPy scalars of a "
    "boolean or numeric dtype, and lists, tuples and dicts (with str keys) of these"
)


def _encode_eval(value, where: str, path: str = ""):
    """An eval value as JSON that `_decode_eval` turns back into the same value and
    type; anything else is a `TypeError` naming `where` (and, within it, `path`)
    the offending part is."""
    t = type(value)
    what = f"{where}, part {path}," if path else where
    if value is None or t in (bool, int, float, str):
        return value
    if t is list:
        return [_encode_eval(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if t is tuple:
        return {
            "__tuple__": [
                _encode_eval(v, where, f"{path}[{i}]") for i, v in enumerate(value)
            ]
        }
    if t is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(
                    f"cannot save {what} in a checkpoint: it is a dict with the "
                    f"non-str key {k!r}; a checkpoint stores {_EVAL_TYPES}"
                )
            out[k] = _encode_eval(v, where, f"{path}[{k!r}]")
        return {"__dict__": out}
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        if jnp.issubdtype(value.dtype, jnp.bool_) or jnp.issubdtype(
            value.dtype, jnp.number
        ):
            arr = np.asarray(value)
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            kind = (
                "jax"
                if isinstance(value, jax.Array)
                else "numpy"
                if isinstance(value, np.ndarray)
                else "scalar"
            )
            data = base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()
            return {
                "__array__": {
                    "kind": kind,
                    "dtype": arr.dtype.name,
                    "shape": list(arr.shape),
                    "data": data,
                }
            }
    raise TypeError(
        f"cannot save {what} in a checkpoint: it is a {t.__module__}.{t.__qualname__}"
        f" ({value!r:.80}); a checkpoint stores {_EVAL_TYPES}. Return one of these "
        "from eval_fn (e.g. a dict of floats), or run without checkpoint_dir"
    )


def _decode_eval(obj):
    """The inverse of `_encode_eval` (plain JSON, as older checkpoints hold, passes
    through)."""
    if isinstance(obj, list):
        return [_decode_eval(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, v),) = obj.items()
            if tag == "__tuple__":
                return tuple(_decode_eval(x) for x in v)
            if tag == "__dict__":
                return {k: _decode_eval(x) for k, x in v.items()}
            if tag == "__array__":
                arr = np.frombuffer(base64.b64decode(v["data"]), np.dtype(v["dtype"]))
                arr = arr.reshape(v["shape"]).copy()
                if v["kind"] == "jax":
                    return jnp.asarray(arr)
                return arr[()] if v["kind"] == "scalar" else arr
        return {k: _decode_eval(x) for k, x in obj.items()}
    return obj


def _restored_evals(meta) -> tuple[list, list]:
    """`(evals, stored)`: the checkpoint's evals decoded, and as stored."""
    stored = [list(e) for e in meta.get("evals") or []]
    return [(int(s), _decode_eval(v)) for s, v in stored], stored


def _as_tree(state, losses) -> dict:
    return {
        "params": state[0],
        "opt_state": state[1],
        "ema": state[2],
        "losses": losses,
    }


def _save(mngr, step: int, state, losses: np.ndarray, meta: dict) -> None:
    """One checkpoint: the arrays (parameters, optimiser state, EMA and the loss
    history) through orbax's standard handler, the rest as JSON."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_tree(state, losses)),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def _like_placed(restored, like):
    """`restored` placed as `like` was. Orbax returns arrays committed to a device,
    and jit keys its cache on that: restoring the state of uncommitted arrays (what
    a user builds) as committed ones recompiled programs already compiled for them
    (a resume in the same process, sampling with loaded parameters). Those come
    back uncommitted; arrays that were committed or sharded keep orbax's placement
    (the sharding of `like`)."""
    if not isinstance(restored, jax.Array) or getattr(like, "committed", False):
        return restored
    if len(restored.sharding.device_set) > 1:
        return restored
    if jax.dtypes.issubdtype(restored.dtype, jax.dtypes.prng_key):  # typed keys
        data = _like_placed(jax.random.key_data(restored), None)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(restored))
    return jnp.asarray(np.asarray(restored))


def _restore(directory, like_state, step: int | None = None, resuming: bool = True):
    """Restore `(state, meta, step)`; a missing or corrupt checkpoint raises.
    (`resuming`: called by `fit(resume=True)`, else by `load_checkpoint`.)"""
    path = os.path.abspath(os.fspath(directory))
    fresh = (
        "; refusing to start from scratch (pass resume=False for a fresh run)"
        if resuming
        else ""
    )
    if not os.path.isdir(path):
        raise CheckpointError(f"the checkpoint directory {path} does not exist{fresh}")
    mngr = _manager(path, create=False)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"{path} holds no checkpoint{fresh}")
        step_dirs = [int(f) for f in os.listdir(path) if f.isdigit()]
        if step is None and max(step_dirs, default=-1) > max(steps):
            raise CheckpointError(
                f"the latest checkpoint in {path}, step {max(step_dirs)}, is "
                f"incomplete or corrupt (the last valid one is step {max(steps)}); "
                "refusing to fall back silently: remove it to resume from the "
                "previous one"
            )
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {path}: {steps}")
        try:
            meta = mngr.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
            if meta is None or int(meta["step"]) != step:
                raise ValueError("its metadata is missing or inconsistent")
            kept = meta.get("ema_decay") is not None
            if "ema_decay" in meta and kept != (like_state[2] is not None):
                arg = "ema_decay" if resuming else "ema"
                raise CheckpointError(
                    f"the run in {path} {'kept' if kept else 'did not keep'} an EMA "
                    f"of the parameters (ema_decay={meta['ema_decay']}): pass "
                    + (
                        f"{arg}={'True' if kept else 'False'}"
                        if not resuming
                        else f"the run's {arg} to resume it"
                    )
                )
            like = _as_tree(like_state, np.zeros((step,), meta["loss_dtype"]))
            tree = mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like))
            )["state"]
            for (p, a), b in zip(
                jax.tree_util.tree_leaves_with_path(tree),
                jax.tree.leaves(like),
                strict=True,
            ):
                if a.shape != b.shape or a.dtype != b.dtype:
                    raise ValueError(
                        f"{jax.tree_util.keystr(p)} has {a.shape} {a.dtype}, "
                        f"expected {b.shape} {b.dtype}"
                    )
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - anything orbax raises means "corrupt"
            raise CheckpointError(
                f"could not restore the checkpoint of step {step} in {path}: it is "
                f"corrupt or does not match these parameters/optimiser "
                f"({type(e).__name__}: {e})"
            ) from e
    finally:
        mngr.close()
    tree = jax.tree.map(_like_placed, tree, like)
    state = (tree["params"], tree["opt_state"], tree["ema"])
    return state, np.asarray(tree["losses"]), meta, step


def load_checkpoint(
    checkpoint_dir: str | os.PathLike,
    params: PyTree[Any],
    optimizer: optax.GradientTransformation,
    *,
    ema: bool = True,
    step: int | None = None,
) -> FitResult:
    """Load a checkpoint written by `fit` (the latest one unless `step` is given).

    `params` (e.g. `net.init(...)`) and `optimizer` give the structure to restore
    into; `ema` says whether the run kept an EMA. Returns a `FitResult` (its `losses`
    and `evals` cover the steps up to the checkpoint; the evals have the types they
    were recorded with, see `fit`'s `checkpoint_dir`). A missing or corrupt
    checkpoint raises `CheckpointError`; a `step` that is not an integer, a
    `TypeError`.

    **Arguments:**

    - `checkpoint_dir`: the `checkpoint_dir` that `fit` wrote.
    - `params`, `optimizer`: the structure to restore into (the values are not
      used), as passed to `fit`.
    - `ema`: whether the run kept an EMA (`fit`'s `ema_decay` was not `None`).
    - `step`: the step to load (it must have been kept: `max_to_keep`), or `None`
      for the latest.

    !!! example

        ```python
        import os

        loss_fn = lambda p, key, x: jnp.mean((x - p) ** 2)  # minimised at mean(x)
        data, ckpt = jnp.arange(8.0), os.path.abspath("out/ckpt_example")
        opt, p0 = optax.sgd(0.1), jnp.asarray(0.0)
        run = gd.fit(loss_fn, p0, data, optimizer=opt, num_steps=20, batch_size=8,
                     key=jr.key(0), checkpoint_dir=ckpt, progress=False)
        loaded = gd.load_checkpoint(ckpt, p0, opt)
        assert loaded.step == 20 and jnp.array_equal(loaded.params, run.params)
        ```
    """
    step = _check_count("step", step, 0, optional=True)
    like = (params, optimizer.init(params), _ema_init(params) if ema else None)
    state, losses, meta, step = _restore(checkpoint_dir, like, step, resuming=False)
    return FitResult(
        params=state[0],
        ema_params=_ema_out(state[2], state[0]),
        opt_state=state[1],
        losses=losses,
        evals=_restored_evals(meta)[0],
        step=step,
    )


# ---------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------


def fit(
    loss_fn: Callable[[PyTree[Any], Key, Any], Array],
    params: PyTree[Any],
    data: PyTree[Array] | Callable[[Key], Any] | Iterator,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key: Key,
    batch_size: int | None = None,
    steps_per_dispatch: int = 100,
    ema_decay: float | None = 0.999,
    eval_every: int | None = None,
    eval_fn: Callable[[int, PyTree[Any], PyTree[Any] | None], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    max_to_keep: int | None = 3,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    r"""Minimise `loss_fn` with an optax optimiser, deterministically and resumably.

    Step $k$ ($k = 0, \dots, n-1$) computes `loss_fn(params, loss_key, batch)` with
    `kdata, loss_key = split(fold_in(key, k))` and the batch chosen by `kdata`, then
    applies `optimizer`, and updates the EMA
    $\bar\theta \leftarrow d_k\bar\theta + (1 - d_k)\theta$ with
    $d_k = \min(\text{ema\_decay}, (1 + k)/(10 + k))$.

    **Arguments:**

    - `loss_fn`: `loss_fn(params, key, batch) -> scalar`, e.g. a closure over
      `gd.dsm_loss`. Use the same function object across calls to reuse compilation.
    - `params`: the initial parameters (a pytree).
    - `data`: one of
        - a pytree of arrays with a leading example axis (e.g. `x0` or
          `(x0, labels)`): minibatches of `batch_size` are drawn with replacement,
          inside the jitted step, as a function of `kdata`;
        - a jittable function `kdata -> batch` (e.g. sampling an oracle afresh);
        - a Python iterator of batches (stacked on the host, `steps_per_dispatch`
          at a time, so with `steps_per_dispatch > 1` every batch must have the
          same shape: drop an epoch's last partial batch). On `resume=True` a
          restarted iterator is fast-forwarded past the batches already used, so
          resuming is exact if the iterator is deterministic.
    - `optimizer`: an `optax.GradientTransformation` (reuse the object to reuse
      compilation).
    - `num_steps`: the total number of steps (including any done before a resume).
    - `key`: the PRNG key of the run.
    - `batch_size`: minibatch size (at least 1), for array data (which must hold at
      least one example).
    - `steps_per_dispatch`: steps per jitted call (a `lax.scan`); amortises dispatch
      and the host round trip. Chunks are aligned to multiples of it and cut at
      `eval_every`, `checkpoint_every` and `num_steps` (choose those as multiples of
      it to avoid compiling more than one chunk length). `1` runs each step as its
      own jitted call, with no loop around it: use it for convolutional networks on
      a CPU, where XLA runs convolution gradients inside a loop many times slower.
      The chunking never changes the result: with `steps_per_dispatch > 1` every
      chunk, also one of a single step, is the same loop (a 1-step chunk runs
      a padding step whose result is discarded, so XLA keeps its loop).
    - `ema_decay`: EMA decay, or `None` for no EMA. The average accumulates in
      float32 for 16-bit parameters (returned in their dtype; checkpoints keep it
      in float32).
    - `eval_every`, `eval_fn`: every `eval_every` steps, call
      `eval_fn(step, params, ema_params)` on the host and record its value.
    - `checkpoint_dir`: where orbax checkpoints go (`None`: none). A fresh run
      refuses a directory that already holds checkpoints. Checkpoints also hold
      the evals, which come back (on resume, or from `load_checkpoint`) as the
      same values of the same types: `None`, `bool`, `int`, `float`, `str`,
      NumPy arrays and NumPy scalars, JAX arrays (of the same dtype and shape),
      and `list`s, `tuple`s and `dict`s with `str` keys of these. With a
      `checkpoint_dir`, an eval value of any other type (e.g. a custom class or a
      namedtuple) raises a `TypeError` as soon as `eval_fn` returns it.
    - `checkpoint_every`: save every so many steps; the last step is always saved.
    - `max_to_keep`: the number of checkpoints kept.
    - `resume`: continue from the latest checkpoint in `checkpoint_dir`. A missing
      or corrupt checkpoint raises `CheckpointError`; it never silently starts
      afresh.
    - `progress`: show a tqdm bar with the loss.

    The step counts (`num_steps`, `batch_size`, `steps_per_dispatch`,
    `eval_every`, `checkpoint_every`, `max_to_keep`) must be Python or NumPy
    integers (not floats or bools): anything else is a `TypeError`, and a value
    below its minimum (0 for `num_steps`, else 1) is a `ValueError`.

    **Returns:** a `FitResult` (final `params`, `ema_params`, `opt_state`, `losses`
    per step, `evals`, `step`). A non-finite loss, or parameters made non-finite
    by an update (a NaN gradient of a finite loss), raise `FloatingPointError`.

    !!! example

        ```python
        sde = gd.VPSDE()
        net = gd.MLPScoreNet()
        params = net.init(jax.random.key(0), 0.5, jnp.zeros(2))
        loss_fn = lambda p, k, x0: gd.dsm_loss(net.apply, p, k, x0, sde)
        result = gd.fit(loss_fn, params, gd.swiss_roll(0, 10_000),
                        optimizer=optax.adam(1e-3), num_steps=500, batch_size=512,
                        key=jax.random.key(1), steps_per_dispatch=500)
        score = gd.flax_score(net, result.ema_params, sde)
        ```
    """
    check_key(key)
    from tqdm.auto import tqdm

    num_steps = _check_count("num_steps", num_steps, 0)
    steps_per_dispatch = _check_count("steps_per_dispatch", steps_per_dispatch, 1)
    batch_size = _check_count("batch_size", batch_size, 1, optional=True)
    eval_every = _check_count("eval_every", eval_every, 1, optional=True)
    checkpoint_every = _check_count(
        "checkpoint_every", checkpoint_every, 1, optional=True
    )
    max_to_keep = _check_count("max_to_keep", max_to_keep, 1, optional=True)
    if (eval_every is None) != (eval_fn is None):
        raise ValueError("eval_every and eval_fn go together")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if isinstance(ema_decay, bool | np.bool_):  # False would be an EMA of decay 0
        raise TypeError(
            f"ema_decay must be a number in [0, 1) or None, got {ema_decay}"
        )
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    if checkpoint_dir is not None:
        # before any step: an unusable folder failed at the first save, after
        # `checkpoint_every` steps of work, which were lost
        folder = Path(checkpoint_dir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                f"checkpoint_dir {str(folder)!r} exists and is not a folder"
            )
        if not resume:  # (resuming needs the folder: `_restore` says so)
            folder.mkdir(parents=True, exist_ok=True)
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise PermissionError(f"checkpoint_dir {str(folder)!r} is not writable")

    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.adam(1e-3)), got {type(optimizer).__name__} {optimizer!r}"
        )
    mode = _data_mode(data)
    if mode == "arrays" and batch_size is None:
        raise ValueError("array data needs a batch_size")
    arrays = jax.tree.map(jnp.asarray, data) if mode == "arrays" else None
    if arrays is not None:
        _check_finite_data(arrays)
    sampler = data if mode == "sampler" else None
    loss_dynamic, loss_static = eqx.partition(loss_fn, eqx.is_array)
    sampler_dynamic, sampler_static = eqx.partition(sampler, eqx.is_array)

    # Weakly typed parameters (e.g. `jnp.asarray(0.0)`) come out of the first chunk
    # strongly typed: the next chunk would compile again, and compute with other
    # promotion rules. They are made strong from the start.
    params = jax.tree.map(
        lambda a: (
            lax.convert_element_type(a, a.dtype)
            if getattr(a, "weak_type", False)
            else a
        ),
        params,
    )
    ema = _ema_init(params) if ema_decay is not None else None
    state = (params, optimizer.init(params), ema)
    step = 0
    losses: list[np.ndarray] = []
    evals: list = []
    stored_evals: list = []  # the evals as the checkpoints store them
    key_data = _key_data(key)

    mngr = None
    if checkpoint_dir is not None:
        if resume:
            state, past_losses, meta, step = _restore(checkpoint_dir, state)
            if meta["key"] != key_data:
                raise CheckpointError(
                    f"the checkpoint in {checkpoint_dir} was written by a run with a "
                    "different key; resuming it with this key would not reproduce it"
                )
            for name, value in (("batch_size", batch_size), ("ema_decay", ema_decay)):
                # (checkpoints written before these were recorded lack them)
                if name in meta and meta[name] != value:
                    raise CheckpointError(
                        f"the checkpoint in {checkpoint_dir} was written with "
                        f"{name}={meta[name]}; resuming it with {name}={value} would "
                        "not reproduce that run"
                    )
            if step > num_steps:
                raise ValueError(
                    f"the checkpoint is at step {step}, beyond num_steps={num_steps}"
                )
            losses.append(past_losses)
            evals, stored_evals = _restored_evals(meta)
        mngr = _manager(checkpoint_dir, create=True, max_to_keep=max_to_keep)
        existing = mngr.all_steps()
        if not resume and existing:
            mngr.close()
            raise FileExistsError(
                f"{checkpoint_dir} already holds checkpoints {list(existing)}; pass "
                "resume=True to continue that run, or use a fresh directory"
            )

    if mode == "iterator" and step > 0:
        for _ in range(step):  # fast-forward past the batches already used
            if next(data, None) is None:
                raise ValueError("the data iterator ran out while fast-forwarding")

    def boundary(s: int) -> int:
        nxt = [num_steps, (s // steps_per_dispatch + 1) * steps_per_dispatch]
        for every in (eval_every, checkpoint_every):
            if every is not None:
                nxt.append((s // every + 1) * every)
        return min(nxt)

    def checkpoint(s):
        hist = np.concatenate(losses)
        meta = {
            "step": s,
            "key": key_data,
            "batch_size": batch_size,
            "ema_decay": ema_decay,
            "loss_dtype": str(hist.dtype),
            # a copy: orbax writes the JSON in the background, while later evals
            # are appended to the live list
            "evals": [list(e) for e in stored_evals],
        }
        _save(mngr, s, state, hist, meta)

    # raw key data (jr.PRNGKey) as the typed Threefry key it stands for (the
    # same draws, one compiled chunk for both kinds of key); other generators'
    # keys hashed to one, as gd.sample does
    key_arr = threefry_key(key)
    decay = jnp.asarray(0.0 if ema_decay is None else ema_decay, jnp.float32)
    bar = tqdm(total=num_steps, initial=step, disable=not progress, desc="fit")
    try:
        while step < num_steps:
            length = boundary(step) - step
            batches = None
            if mode == "iterator":
                try:
                    chunk = [next(data) for _ in range(length)]
                except StopIteration:
                    raise ValueError(
                        f"the data iterator ran out of batches before step {num_steps}"
                    ) from None
                shapes = {
                    tuple(np.shape(leaf) for leaf in jax.tree.leaves(b)) for b in chunk
                }
                if len(shapes) > 1:
                    raise ValueError(
                        "the data iterator's batches differ in shape "
                        f"({sorted(shapes)}): with steps_per_dispatch > 1 they are "
                        "stacked into one array, so drop the last partial batch of "
                        "an epoch or use steps_per_dispatch=1"
                    )
                batches = jax.tree.map(lambda *b: np.stack(b), *chunk)
            try:
                state, chunk_losses = _run_chunk(
                    state,
                    np.uint32(step),  # no eager device op per chunk
                    key_arr,
                    arrays,
                    batches,
                    decay,
                    loss_dynamic,
                    sampler_dynamic,
                    loss_static=loss_static,
                    optimizer=optimizer,
                    sampler_static=sampler_static,
                    batch_size=batch_size,
                    length=length,
                    unrolled=steps_per_dispatch == 1,
                )
                # copies: on a CPU np.asarray is a view that keeps the chunk's
                # device array alive, one per chunk, for the whole run
                chunk_losses, chunk_finite = map(np.array, chunk_losses)
            except (jax.errors.JaxRuntimeError, ValueError) as e:
                # (JAX raises a failed check as a JaxRuntimeError on a program's
                # first run, as a ValueError once it is cached)
                _raise_checked(e, step, step + length - 1)
            losses.append(chunk_losses)
            # the first failure of the chunk: a loss at step k, or the parameters
            # after step k's update (whose NaN gives step k + 1 a NaN loss)
            loss_ok = np.isfinite(chunk_losses)
            bad_loss = int(np.argmin(loss_ok)) if not np.all(loss_ok) else length
            bad_params = (
                int(np.argmin(chunk_finite)) if not np.all(chunk_finite) else length
            )
            if bad_loss <= bad_params and bad_loss < length:
                bad = step + bad_loss
                raise FloatingPointError(f"the loss is not finite at step {bad}")
            if bad_params < length:
                bad = step + bad_params
                raise FloatingPointError(
                    f"the parameters are not finite after step {bad}'s update (a "
                    "non-finite gradient of a finite loss)"
                )
            step += length
            postfix = {"loss": f"{float(np.mean(chunk_losses)):.4g}"}
            if eval_every is not None and step % eval_every == 0:
                value = eval_fn(step, state[0], _ema_out(state[2], state[0]))
                if mngr is not None:  # fail now, not at the next checkpoint
                    where = f"the eval at step {step}"
                    stored_evals.append([step, _encode_eval(value, where)])
                evals.append((step, value))
                try:
                    postfix["eval"] = f"{float(value):.4g}"
                except (TypeError, ValueError):
                    pass
            bar.set_postfix(postfix, refresh=False)
            bar.update(length)
            if mngr is not None and (
                step == num_steps
                or (checkpoint_every is not None and step % checkpoint_every == 0)
            ):
                checkpoint(step)
    finally:
        bar.close()
        if mngr is not None:
            mngr.wait_until_finished()
            mngr.close()

    hist = np.concatenate(losses) if losses else np.zeros((0,), np.float32)
    return FitResult(
        params=state[0],
        ema_params=_ema_out(state[2], state[0]),
        opt_state=state[1],
        losses=hist,
        evals=evals,
        step=step,
    )
