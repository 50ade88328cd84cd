r"""Training (guidediff._train, guidediff._data), and the acceptance checks of the
learned scores against exact Gaussian-mixture oracles.

Relative L2 error of a score $\hat s$ against the exact score $s$:

$$\mathrm{err} = \sqrt{\frac{E\|\hat s(t, x_t) - s(t, x_t)\|^2}{E\|s(t, x_t)\|^2}},$$

a Monte Carlo average over $M = 4000$ pairs with $t \sim U[0.05, 1]$ and
$x_t = \alpha(t)x_0 + \sigma(t)\varepsilon$, $x_0$ drawn from the law whose score is
being learned (the data, the tilted law, or the class-conditional law). The
acceptance threshold is 0.15.
"""

import os
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import guidediff as gd
from guidediff._data import digits, swiss_roll
from guidediff._flax import flax_score
from guidediff._losses import conditional_dsm_loss, dsm_loss, reward_weighted_dsm_loss
from guidediff._nn import MLPScoreNet, UNet
from guidediff._oracle import GaussianBumpReward, GaussianMixture
from guidediff._sde import VPSDE
from guidediff._train import (
    CheckpointError,
    _run_chunk,
    fit,
    load_checkpoint,
    warm_start,
)


SDE = VPSDE()
TOL = 0.15
BATCH = 512


def _tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)
    )


def rel_err(score, exact, law, args=None, m=4000):
    """The relative L2 error defined in the module docstring (fixed evaluation key)."""
    kt, kx, kz = jr.split(jr.key(1234), 3)
    t = jr.uniform(kt, (m,), minval=0.05, maxval=1.0)
    x0 = law.sample(kx, m)
    xt = jax.vmap(SDE.perturb)(t, x0, jr.normal(kz, x0.shape))
    a = jax.vmap(score, (0, 0, None))(t, xt, args)
    b = jax.vmap(exact, (0, 0, None))(t, xt, args)
    return float(
        jnp.sqrt(jnp.mean(jnp.sum((a - b) ** 2, -1)) / jnp.mean(jnp.sum(b**2, -1)))
    )


# ---------------------------------------------------------------------------------
# Acceptance: learned scores against the exact oracle scores
# ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture(
        weights=[0.3, 0.3, 0.4],
        means=[[-1.5, 0.0], [1.5, 0.0], [0.0, 1.5]],
        covs=[[0.09, 0.09], [0.16, 0.16], [0.09, 0.09]],
        labels=[0, 1, 2],
    )


def _schedule(num_steps, lr=2e-3):
    return optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, lr, 100, num_steps, lr / 20)
    )


@pytest.fixture(scope="module")
def unconditional(gmm):
    """3x128 MLP, eps-prediction, 1500 steps of fresh GMM samples (~10 s on CPU)."""
    net = MLPScoreNet(hidden=(128, 128, 128), time_embed_dim=32)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2))
    result = fit(
        lambda p, k, x0: dsm_loss(net.apply, p, k, x0, SDE),
        params,
        lambda k: gmm.sample(k, BATCH).astype(jnp.float32),  # as users train
        optimizer=_schedule(1500),
        num_steps=1500,
        key=jr.key(1),
        steps_per_dispatch=500,
        ema_decay=0.99,
        progress=False,
    )
    return net, result


def test_learned_score_matches_oracle(gmm, unconditional):
    net, result = unconditional
    assert result.losses.shape == (1500,)
    assert np.mean(result.losses[-500:]) < np.mean(result.losses[:100])
    err = rel_err(flax_score(net, result.ema_params, SDE), gmm.score(SDE), gmm)
    err_raw = rel_err(flax_score(net, result.params, SDE), gmm.score(SDE), gmm)
    print(f"unconditional: relative L2 error {err:.4f} (EMA), {err_raw:.4f} (raw)")
    assert err < TOL, err
    assert err_raw < TOL, err_raw


REWARD = GaussianBumpReward(jnp.array([1.5, 0.5]), 1.0)


@pytest.fixture(scope="module")
def reweighted(gmm, unconditional):
    """Fine-tune the pretrained net (warm start) with the reward-weighted loss for a
    Gaussian bump reward."""
    net, base = unconditional
    phi0 = warm_start(base.ema_params, like=base.params)
    result = fit(
        lambda p, k, x0: reward_weighted_dsm_loss(net.apply, p, k, x0, REWARD, SDE),
        phi0,
        lambda k: gmm.sample(k, BATCH).astype(jnp.float32),  # as users train
        optimizer=_schedule(1000),
        num_steps=1000,
        key=jr.key(2),
        steps_per_dispatch=500,
        ema_decay=0.99,
        progress=False,
    )
    return phi0, result


def test_reward_weighted_learns_tilted_score(gmm, unconditional, reweighted):
    """The reward-weighted net learns the exactly tilted mixture's score."""
    net, _ = unconditional
    phi0, result = reweighted
    tilted = gmm.tilt(REWARD)
    # The task is not trivial: the untilted score is far from the tilted one.
    assert rel_err(gmm.score(SDE), tilted.score(SDE), tilted) > 0.2
    assert rel_err(flax_score(net, phi0, SDE), tilted.score(SDE), tilted) > 0.2
    err = rel_err(flax_score(net, result.ema_params, SDE), tilted.score(SDE), tilted)
    print(f"reward-weighted: relative L2 error to the tilted score {err:.4f}")
    assert err < TOL, err


def test_learned_reward_guidance_raises_reward(gmm, unconditional, reweighted):
    """Sampling with s + w (s_r - s) from the two trained networks raises E[r] with w
    as the exact oracles do (w in {0, 1, 2}); shared noise, paired standard errors."""
    net, base = unconditional
    _, rw = reweighted
    learned = (
        flax_score(net, base.ema_params, SDE),
        flax_score(net, rw.ema_params, SDE),
    )
    exact = (gmm.score(SDE), gmm.tilt(REWARD).score(SDE))
    ts = gd.uniform_grid(SDE.T, 1e-3, 100)
    rewards = {}
    for name, (s, s_r) in {"learned": learned, "exact": exact}.items():
        for w in [0.0, 1.0, 2.0]:
            guided = gd.guide(s, gd.reward_guidance(s_r, w))
            out = gd.sample(jr.key(5), SDE, guided, (2,), num_particles=1000, ts=ts)
            assert int(out.num_failed) == 0
            rewards[name, w] = jax.vmap(REWARD)(out.ys)
    for name in ["learned", "exact"]:
        for lo, hi in [(0.0, 1.0), (1.0, 2.0)]:
            d, se = gd.mean_stderr(rewards[name, hi] - rewards[name, lo])
            print(f"{name}: E[r] w={lo}->{hi}: +{float(d):.4f} (se {float(se):.4f})")
            assert float(d) > 3 * float(se), (name, lo, hi)
    # The learned sampler's rewards track the exact ones (paired by the shared noise).
    for w in [0.0, 1.0, 2.0]:
        d, se = gd.mean_stderr(rewards["learned", w] - rewards["exact", w])
        m = float(jnp.mean(rewards["exact", w]))
        print(
            f"w={w}: learned - exact E[r] = {float(d):.4f} (se {float(se):.4f}), {m:.4f}"
        )
        assert abs(float(d)) < 0.03 * m + 4 * float(se)


def test_conditional_net_with_label_dropout(gmm):
    """One net, trained with label dropout (p_uncond = 0.3), gives every class's
    conditional score and (with the null label) the unconditional score."""
    net = MLPScoreNet(hidden=(128, 128, 128), time_embed_dim=32, num_classes=3)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)

    def loss_fn(p, k, batch):
        x0, labels = batch
        return conditional_dsm_loss(
            net.apply, p, k, x0, labels, SDE, num_classes=3, p_uncond=0.3
        )

    result = fit(
        loss_fn,
        params,
        lambda k: gmm.sample_with_labels(k, BATCH),
        optimizer=_schedule(2500),
        num_steps=2500,
        key=jr.key(3),
        steps_per_dispatch=500,
        ema_decay=0.99,
        progress=False,
    )
    score = flax_score(net, result.ema_params, SDE)
    exact = gmm.conditional_score(SDE)
    errs = [rel_err(score, exact, gmm.conditional(c), args=c) for c in range(3)]
    errs.append(rel_err(score, gmm.score(SDE), gmm, args=3))
    print(f"conditional: relative L2 errors (classes 0, 1, 2, null) {errs}")
    assert max(errs) < TOL, errs
    # The null label is what an unconditional call (args=None) uses.
    x = jnp.array([0.3, 0.2])
    np.testing.assert_array_equal(score(0.5, x, None), score(0.5, x, 3))


# ---------------------------------------------------------------------------------
# fit: determinism, EMA, checkpoints, resumption
# ---------------------------------------------------------------------------------

SMALL = MLPScoreNet(hidden=(32, 32), time_embed_dim=16)
SMALL_PARAMS = SMALL.init(jr.key(0), 0.5, jnp.zeros(2))
OPT = optax.adam(1e-3)
DATA = swiss_roll(0, 1000, noise=0.3)


def small_loss(params, key, x0):
    return dsm_loss(SMALL.apply, params, key, x0, SDE)


def _fit_small(num_steps, **kw):
    kw.setdefault("key", jr.key(1))
    kw.setdefault("progress", False)
    return fit(
        small_loss,
        SMALL_PARAMS,
        DATA,
        optimizer=OPT,
        num_steps=num_steps,
        batch_size=64,
        steps_per_dispatch=50,
        **kw,
    )


def _record(step, params, ema):
    return float(small_loss(params, jr.key(99), DATA[:256]))


@pytest.fixture(scope="module")
def uninterrupted():
    return _fit_small(200, eval_every=50, eval_fn=_record)


def test_deterministic(uninterrupted):
    again = _fit_small(200, eval_every=50, eval_fn=_record)
    assert _tree_equal(again.params, uninterrupted.params)
    assert np.array_equal(again.losses, uninterrupted.losses)
    other = _fit_small(200, key=jr.key(2))
    assert not np.array_equal(other.losses, uninterrupted.losses)
    assert [s for s, _ in uninterrupted.evals] == [50, 100, 150, 200]


def test_resume_is_bit_exact(tmp_path, uninterrupted):
    """k = 120 steps (checkpoints at 100 and 120), then resume to n = 200: the same
    parameters, optimiser state, EMA, loss history and evals as one 200-step run."""
    ckpt = tmp_path / "run"
    first = _fit_small(
        120, checkpoint_dir=ckpt, checkpoint_every=100, eval_every=50, eval_fn=_record
    )
    assert first.step == 120
    assert sorted(int(f) for f in os.listdir(ckpt) if f.isdigit()) == [100, 120]
    resumed = _fit_small(
        200,
        checkpoint_dir=ckpt,
        checkpoint_every=100,
        resume=True,
        eval_every=50,
        eval_fn=_record,
        progress=True,
    )
    assert resumed.step == 200
    assert _tree_equal(resumed.params, uninterrupted.params)
    assert _tree_equal(resumed.opt_state, uninterrupted.opt_state)
    assert _tree_equal(resumed.ema_params, uninterrupted.ema_params)
    assert resumed.losses.dtype == uninterrupted.losses.dtype
    assert np.array_equal(resumed.losses, uninterrupted.losses)
    assert resumed.evals == uninterrupted.evals


def test_checkpoint_round_trip(tmp_path, uninterrupted):
    ckpt = tmp_path / "run"
    result = _fit_small(200, checkpoint_dir=ckpt, checkpoint_every=100)
    loaded = load_checkpoint(ckpt, SMALL_PARAMS, OPT)
    assert loaded.step == 200
    assert _tree_equal(loaded.params, result.params)
    assert _tree_equal(loaded.opt_state, result.opt_state)
    assert _tree_equal(loaded.ema_params, result.ema_params)
    assert np.array_equal(loaded.losses, result.losses)
    # An earlier step is the state of a run that stopped there.
    at_100 = load_checkpoint(ckpt, SMALL_PARAMS, OPT, step=100)
    short = _fit_small(100)
    assert _tree_equal(at_100.params, short.params)
    assert np.array_equal(at_100.losses, short.losses)
    # Resuming a finished run returns it as it is.
    again = _fit_small(200, checkpoint_dir=ckpt, resume=True)
    assert _tree_equal(again.params, result.params)
    # Restored arrays are not committed to a device, like fresh ones: jit's cache
    # would otherwise compile again programs that fresh parameters already have.
    for tree in (loaded.params, loaded.opt_state, loaded.ema_params, again.params):
        assert not any(a.committed for a in jax.tree.leaves(tree))


def test_resume_errors(tmp_path):
    # Missing directory, or a directory without checkpoints: never a fresh start.
    with pytest.raises(CheckpointError, match="does not exist"):
        _fit_small(100, checkpoint_dir=tmp_path / "nope", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _fit_small(100, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        _fit_small(100, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty", SMALL_PARAMS, OPT)

    ckpt = tmp_path / "run"
    _fit_small(100, checkpoint_dir=ckpt)
    # A fresh run refuses to overwrite an existing run.
    with pytest.raises(FileExistsError, match="resume=True"):
        _fit_small(100, checkpoint_dir=ckpt)
    # Resuming with another key would not reproduce the run.
    with pytest.raises(CheckpointError, match="different key"):
        _fit_small(200, checkpoint_dir=ckpt, resume=True, key=jr.key(7))
    with pytest.raises(ValueError, match="beyond num_steps"):
        _fit_small(50, checkpoint_dir=ckpt, resume=True)
    # A network that does not match the checkpoint.
    other = MLPScoreNet(hidden=(16,), time_embed_dim=16)
    with pytest.raises(CheckpointError, match="corrupt or does not match"):
        load_checkpoint(ckpt, other.init(jr.key(0), 0.5, jnp.zeros(2)), OPT)

    # Corrupt files in the latest checkpoint.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    for root, _, files in os.walk(corrupt / "100" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        _fit_small(200, checkpoint_dir=corrupt, resume=True)


def test_iterator_data_and_resume(tmp_path):
    def batches():
        rng = np.random.default_rng(0)
        while True:
            yield np.asarray(DATA)[rng.integers(0, DATA.shape[0], 64)]

    def run(num_steps, **kw):
        return fit(
            small_loss,
            SMALL_PARAMS,
            batches(),
            optimizer=OPT,
            num_steps=num_steps,
            key=jr.key(1),
            steps_per_dispatch=50,
            progress=False,
            **kw,
        )

    full = run(150)
    run(100, checkpoint_dir=tmp_path / "it")
    resumed = run(150, checkpoint_dir=tmp_path / "it", resume=True)
    assert _tree_equal(resumed.params, full.params)
    assert np.array_equal(resumed.losses, full.losses)


def test_minibatches_draw_every_row_uniformly():
    """Rows are drawn uniformly with replacement, the last one included (an
    off-by-one upper bound would never draw it). The loss is the drawn row's index,
    so `losses` records the draws; 4 standard errors per row (family-wise ~3e-4)."""
    n, steps = 4, 800
    data = jnp.arange(n, dtype=float)[:, None]
    out = fit(lambda p, k, batch: p * jnp.mean(batch), jnp.asarray(1.0), data,
              optimizer=optax.sgd(0.0), num_steps=steps, batch_size=1, key=jr.key(0),
              progress=False)  # fmt: skip
    draws = np.asarray(out.losses).astype(int)
    freq = np.bincount(draws, minlength=n) / steps
    # with replacement: epochs (each row once per n draws) would never repeat a row
    # within an aligned window of n; here P(no repeat in 200 windows) = (3/32)^200
    assert any(len(set(draws[i : i + n])) < n for i in range(0, steps, n))
    se = np.sqrt((1 / n) * (1 - 1 / n) / steps)
    np.testing.assert_array_less(np.abs(freq - 1 / n), 4 * se)


def test_step_keys_follow_the_documented_rule():
    """Step k draws its batch from kdata and calls the loss with kloss, where
    kdata, kloss = split(fold_in(key, k)) (the documented rule, across chunk
    boundaries). With sgd(0) the losses record both draws. One key for both would
    correlate the batch with the loss's noise."""
    key, n = jr.key(7), 12
    loss = lambda p, k, batch: p * (batch + 10.0 * jr.uniform(k, (), batch.dtype))
    out = fit(loss, jnp.asarray(1.0), lambda k: jr.uniform(k, (), float),
              optimizer=optax.sgd(0.0), num_steps=n, key=key, steps_per_dispatch=5,
              progress=False)  # fmt: skip
    want = []
    for k in range(n):
        kdata, kloss = jr.split(jr.fold_in(key, k))
        want.append(jr.uniform(kdata, (), float) + 10.0 * jr.uniform(kloss, (), float))
    np.testing.assert_allclose(out.losses, want, rtol=1e-12)


def test_a_16_bit_models_ema_follows_moving_parameters():
    """bfloat16 parameters climbing one ulp (2^-7 on [1, 2)) per step: the EMA is
    the documented recursion e <- e + (1 - d_k)(p_k - e), d_k = min(decay,
    (1 + k)/(10 + k)), computed in float32 and rounded to bfloat16 once (half an
    ulp). A bfloat16 accumulator loses the increments below half its resolution
    (8 ulps behind here); parameters held still cannot show it."""
    steps, decay, lr = 100, 0.99, 2.0**-7
    p0 = {"w": jnp.ones((4,), jnp.bfloat16)}
    out = fit(lambda p, k, b: -jnp.sum(p["w"].astype(jnp.float32)), p0,
              lambda k: jnp.zeros(()), optimizer=optax.sgd(lr), num_steps=steps,
              key=jr.key(0), ema_decay=decay, steps_per_dispatch=50, progress=False)  # fmt: skip
    e = p = np.float32(1.0)
    for k in range(steps):
        p = np.float32(p + lr)
        d = np.float32(min(decay, (1 + k) / (10 + k)))
        e = np.float32(e + (np.float32(1) - d) * (p - e))
    np.testing.assert_array_equal(np.asarray(out.params["w"], np.float32), p)
    assert out.ema_params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_less(
        np.abs(np.asarray(out.ema_params["w"], np.float32) - e), 2.0**-8 + 1e-7
    )


def test_ema():
    """A constant gradient with SGD: params_k = p0 - lr (k + 1); the EMA follows
    ema_k = d_k ema_{k-1} + (1 - d_k) params_k with d_k = min(d, (1 + k)/(10 + k))."""
    p0 = {"w": jnp.zeros(3, jnp.float32)}
    loss = lambda p, k, batch: jnp.sum(p["w"])
    kw = dict(
        optimizer=optax.sgd(0.1),
        num_steps=40,
        key=jr.key(0),
        steps_per_dispatch=16,
        progress=False,
    )
    result = fit(loss, p0, lambda k: jnp.zeros(()), ema_decay=0.9, **kw)
    ema, p = np.zeros(3, np.float32), np.zeros(3, np.float32)
    for k in range(40):
        p = p - np.float32(0.1)
        d = np.float32(min(0.9, (1 + k) / (10 + k)))
        ema = d * ema + (1 - d) * p
    np.testing.assert_allclose(result.params["w"], p, rtol=1e-6)
    np.testing.assert_allclose(result.ema_params["w"], ema, rtol=1e-5)
    no_decay = fit(loss, p0, lambda k: jnp.zeros(()), ema_decay=0.0, **kw)
    np.testing.assert_array_equal(no_decay.ema_params["w"], no_decay.params["w"])
    assert (
        fit(loss, p0, lambda k: jnp.zeros(()), ema_decay=None, **kw).ema_params is None
    )


def test_one_step_per_dispatch_matches_the_scan():
    """steps_per_dispatch=1 (no loop around the step) takes the same steps as a
    scanned chunk: same keys, batches and updates (float tolerance: XLA may fuse
    the step differently inside a loop)."""
    p0 = {"w": jnp.zeros(2, jnp.float32)}
    loss = _ShiftLoss(jnp.asarray(0.5))
    kw = dict(optimizer=optax.adam(0.05), num_steps=12, key=jr.key(3), progress=False)
    data = jr.normal(jr.key(4), (64, 2))
    one = fit(loss, p0, data, batch_size=8, steps_per_dispatch=1, **kw)
    scan = fit(loss, p0, data, batch_size=8, steps_per_dispatch=4, **kw)
    np.testing.assert_allclose(one.params["w"], scan.params["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one.losses, scan.losses, rtol=1e-5, atol=1e-6)
    assert len(one.losses) == 12


class _ShiftLoss(eqx.Module):
    shift: jax.Array

    def __call__(self, params, key, batch):
        return jnp.sum((params["w"] - jnp.mean(batch, axis=0) - self.shift) ** 2)


class _Sampler(eqx.Module):
    center: jax.Array

    def __call__(self, key):
        return self.center[None] + 0.01 * jr.normal(key, (8, 2))


def test_pytree_callables():
    """A loss and a sampler may be eqx.Modules holding arrays (their arrays are
    traced, so new values do not recompile)."""
    kw = dict(optimizer=optax.adam(0.1), num_steps=200, key=jr.key(0), progress=False)
    a = fit(_ShiftLoss(jnp.ones(2)), {"w": jnp.zeros(2)}, _Sampler(jnp.zeros(2)), **kw)
    np.testing.assert_allclose(a.params["w"], [1.0, 1.0], atol=0.05)
    compiled = _run_chunk._cache_size()
    b = fit(_ShiftLoss(-jnp.ones(2)), {"w": jnp.zeros(2)}, _Sampler(jnp.ones(2)), **kw)
    np.testing.assert_allclose(b.params["w"], [0.0, 0.0], atol=0.05)
    assert _run_chunk._cache_size() == compiled


def test_long_fits_keep_no_device_arrays_and_take_raw_keys():
    """Each chunk's losses were kept as numpy views of its device array (on a CPU),
    one live jax array per chunk for the whole run; raw key data (jr.PRNGKey)
    compiled a second chunk program next to a typed key's."""
    loss = lambda p, key, x: jnp.mean((x - p) ** 2)
    kw = dict(optimizer=optax.sgd(0.1), batch_size=4, progress=False, num_steps=60,
              steps_per_dispatch=1)  # fmt: skip
    data = jnp.arange(4.0) - 3.0
    live = []

    def probe(step, params, ema):
        live.append(len(jax.live_arrays()))
        return 0.0

    typed = fit(loss, jnp.zeros(()), data, key=jr.key(5), eval_every=10,
                eval_fn=probe, **kw)  # fmt: skip
    assert max(live[1:]) <= live[1] + 1, live  # flat, not one more per step
    compiled = _run_chunk._cache_size()
    raw = fit(loss, jnp.zeros(()), data, key=jr.PRNGKey(5), **kw)
    assert _run_chunk._cache_size() == compiled
    np.testing.assert_array_equal(raw.losses, typed.losses)  # the same draws
    np.testing.assert_array_equal(raw.params, typed.params)


def test_weakly_typed_params_compile_one_chunk():
    """A weakly typed scalar parameter (`jnp.asarray(0.0)`) lost its weak type in
    the first chunk, and the second chunk compiled again."""
    loss = lambda p, key, x: jnp.mean((x - p) ** 2)
    kw = dict(optimizer=optax.sgd(0.1), batch_size=4, key=jr.key(0), progress=False)
    data = jnp.arange(4.0) + 7.0  # a new loss function: a fresh program
    before = _run_chunk._cache_size()
    out = fit(loss, jnp.asarray(0.0), data, num_steps=30, steps_per_dispatch=10, **kw)
    assert _run_chunk._cache_size() == before + 1
    assert not out.params.weak_type and out.params.dtype == jnp.result_type(float)
    assert 7.0 <= float(out.params) <= 10.0  # near the data (minibatch noise)


def test_fit_errors():
    with pytest.raises(ValueError, match="ran out"):
        fit(
            small_loss,
            SMALL_PARAMS,
            iter([DATA[:8]] * 5),
            optimizer=OPT,
            num_steps=10,
            key=jr.key(0),
            progress=False,
        )
    with pytest.raises(FloatingPointError, match="step"):
        fit(
            lambda p, k, b: jnp.sum(p["w"]) * jnp.nan,
            {"w": jnp.ones(2)},
            lambda k: jnp.zeros(()),
            optimizer=optax.sgd(0.1),
            num_steps=10,
            key=jr.key(0),
            progress=False,
        )
    with pytest.raises(ValueError, match="batch_size"):
        fit(small_loss, SMALL_PARAMS, DATA, optimizer=OPT, num_steps=1, key=jr.key(0))
    with pytest.raises(ValueError, match="go together"):
        _fit_small(10, eval_every=5)
    with pytest.raises(TypeError, match="pytree of arrays"):
        fit(small_loss, SMALL_PARAMS, 3.0, optimizer=OPT, num_steps=1, key=jr.key(0))


def test_warm_start():
    copy = warm_start(SMALL_PARAMS, like=SMALL_PARAMS)
    assert _tree_equal(copy, SMALL_PARAMS)
    assert all(
        a is not b
        for a, b in zip(
            jax.tree.leaves(copy), jax.tree.leaves(SMALL_PARAMS), strict=True
        )
    )
    other = MLPScoreNet(hidden=(16, 32), time_embed_dim=16).init(
        jr.key(0), 0.5, jnp.zeros(2)
    )
    with pytest.raises(ValueError, match="Dense_0"):
        warm_start(SMALL_PARAMS, like=other)
    with pytest.raises(ValueError, match="structure"):
        warm_start(SMALL_PARAMS, like={"params": {}})


# ---------------------------------------------------------------------------------
# Data sets, and one end-to-end image run
# ---------------------------------------------------------------------------------


def test_swiss_roll():
    x = swiss_roll(0, 2000, noise=0.2)
    assert x.shape == (2000, 2) and x.dtype == jnp.float64
    # exact SDs: sklearn's roll is (t cos t, t sin t) + N(0, 0.2^2) per coordinate,
    # t ~ U[1.5 pi, 4.5 pi], divided by 7; by quadrature on a fine midpoint grid
    u = (np.arange(200_000) + 0.5) / 200_000
    t = 1.5 * np.pi * (1 + 2 * u)
    exact = (
        np.sqrt(np.array([np.var(t * np.cos(t)), np.var(t * np.sin(t))]) + 0.2**2) / 7
    )
    # SE of a sample SD: sigma sqrt((kurtosis - 1) / (4 n)), kurtosis estimated
    xn = np.asarray(x)
    xc = xn - xn.mean(axis=0)
    kurt = np.mean(xc**4, axis=0) / np.mean(xc**2, axis=0) ** 2
    se = exact * np.sqrt((kurt - 1) / (4 * xn.shape[0]))
    np.testing.assert_array_less(np.abs(xn.std(axis=0) - exact), 4 * se)
    noiseless = np.sqrt([np.var(t * np.cos(t)), np.var(t * np.sin(t))]) / 7
    np.testing.assert_allclose(noiseless, [0.95, 0.99], atol=0.005)  # the docstring's
    np.testing.assert_array_equal(x, swiss_roll(0, 2000, noise=0.2))
    assert not np.array_equal(x, swiss_roll(1, 2000, noise=0.2))
    y = swiss_roll(jr.key(0), 10, scale=2.0)
    assert y.shape == (10, 2)


def test_swiss_roll_scale():
    np.testing.assert_allclose(swiss_roll(0, 50, scale=2.0), 2 * swiss_roll(0, 50))


def test_digits():
    images, labels = digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    assert set(np.unique(labels).tolist()) == set(range(10))
    some, some_labels = digits(classes=(3, 7), channel_axis=True)
    assert some.shape[1:] == (8, 8, 1)
    assert set(np.unique(some_labels).tolist()) == {3, 7}
    keep = np.isin(np.asarray(labels), [3, 7])  # the image-label pairs kept
    np.testing.assert_array_equal(some[..., 0], np.asarray(images)[keep])
    np.testing.assert_array_equal(some_labels, np.asarray(labels)[keep])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        digits(classes=(11,))
    with pytest.raises(ValueError, match=r"0\.\.9"):
        digits(classes=(1, 11))  # not silently dropped


def test_data_seeds():
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
            swiss_roll(bad, 4)
    for bad in (jnp.asarray(3), 1.5, True):
        with pytest.raises(TypeError, match="PRNG key .* or an int seed"):
            swiss_roll(bad, 4)
    np.testing.assert_array_equal(swiss_roll(np.uint32(5), 4), swiss_roll(5, 4))


def test_unet_on_digits_smoke():
    """A class-conditional U-Net trains on the 8x8 digits (loss goes down)."""
    images, labels = digits()
    net = UNet(features=(8, 16), time_embed_dim=16, num_classes=10)
    params = jax.jit(net.init)(jr.key(0), 0.5, images[0], 0)

    def loss_fn(p, k, batch):
        return conditional_dsm_loss(
            net.apply, p, k, batch[0], batch[1], SDE, num_classes=10, p_uncond=0.1
        )

    result = fit(
        loss_fn,
        params,
        (images, labels),
        optimizer=optax.adam(3e-3),
        num_steps=60,
        batch_size=32,
        key=jr.key(0),
        # one step per call: XLA:CPU runs convolution gradients inside a loop many
        # times slower (test_chunking_does_not_change_a_unet_run covers the loop)
        steps_per_dispatch=1,
        progress=False,
    )
    assert np.all(np.isfinite(result.losses))
    assert np.mean(result.losses[-20:]) < np.mean(result.losses[:5])
    score = flax_score(net, result.ema_params, SDE)
    s = eqx.filter_jit(lambda sc, x: sc(0.5, x, 3))(score, images[0])
    assert s.shape == (8, 8) and np.all(np.isfinite(s))


# ---------------------------------------------------------------------------------
# fit: argument checks and evals in checkpoints
# ---------------------------------------------------------------------------------

TINY_P0 = {"w": jnp.zeros(2)}
TINY_DATA = jr.normal(jr.key(4), (64, 2))
TINY_OPT = optax.sgd(0.1)


def _tiny_loss(p, k, batch):
    return jnp.sum((p["w"] - jnp.mean(batch, axis=0)) ** 2)


def _fit_tiny(num_steps=6, data=TINY_DATA, **kw):
    kw = {"batch_size": 4, "steps_per_dispatch": 2, **kw}
    return fit(
        _tiny_loss,
        TINY_P0,
        data,
        optimizer=TINY_OPT,
        num_steps=num_steps,
        key=jr.key(0),
        progress=False,
        **kw,
    )


@pytest.mark.parametrize(
    "name",
    [
        "num_steps",
        "batch_size",
        "steps_per_dispatch",
        "eval_every",
        "checkpoint_every",
        "max_to_keep",
    ],
)
@pytest.mark.parametrize("value", [2.5, 3.0, True, np.float64(2.0), "3"])
def test_fit_rejects_non_integer_counts(name, value):
    """A float (even an integral one) or a bool where a count goes is a TypeError,
    raised before anything runs (a float steps_per_dispatch or eval_every used to
    repeat or skip steps)."""
    kw = {name: value}
    if name == "eval_every":
        kw["eval_fn"] = lambda s, p, e: 0.0
    with pytest.raises(TypeError, match=f"{name} must be an integer"):
        _fit_tiny(**kw)


def test_fit_counts_accept_numpy_integers(tmp_path):
    result = _fit_tiny(
        np.int64(6),
        batch_size=np.int32(4),
        steps_per_dispatch=np.int64(2),
        eval_every=np.int64(2),
        eval_fn=lambda s, p, e: s,
        checkpoint_dir=tmp_path / "run",
        checkpoint_every=np.int64(4),
        max_to_keep=np.int64(2),
    )
    assert type(result.step) is int and result.step == 6
    assert len(result.losses) == 6
    assert result.evals == [(2, 2), (4, 4), (6, 6)]
    assert all(type(s) is int for s, _ in result.evals)
    with pytest.raises(TypeError, match="step must be an integer"):
        load_checkpoint(tmp_path / "run", TINY_P0, TINY_OPT, step=6.0)


def test_fit_batch_size_and_empty_data():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {bad}"):
            _fit_tiny(batch_size=bad)
    with pytest.raises(ValueError, match="steps_per_dispatch must be >= 1"):
        _fit_tiny(steps_per_dispatch=0)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        _fit_tiny(-1)
    for empty in (jnp.zeros((0, 2)), (jnp.zeros((0, 2)), jnp.zeros((0,), int))):
        with pytest.raises(ValueError, match="no examples"):
            _fit_tiny(data=empty)


def _evals_equal(a, b) -> bool:
    """Same steps, and values of the same types and contents (arrays: dtype too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_evals_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_evals_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray | np.generic | jax.Array):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return a == b or (a != a and b != b)  # NaN == NaN here


def _rich_eval(step, params, ema):
    w = params["w"]
    return {
        "loss": float(_tiny_loss(params, None, TINY_DATA)),
        "w": w,  # a JAX array
        "w_np": np.asarray(w, np.float32),
        "w0": np.float32(w[0]),  # a NumPy scalar
        "pair": (step, "even" if step % 4 == 0 else "odd"),
        "list": [None, True, float("nan"), [1, 2]],
        "n": np.arange(3, dtype=np.int8),
    }


def test_evals_survive_resume(tmp_path):
    """A resumed run returns the same evals, of the same types, as an uninterrupted
    one (they used to be dropped, or come back as lists)."""
    kw = dict(eval_every=2, eval_fn=_rich_eval)
    full = _fit_tiny(6, **kw)
    _fit_tiny(4, checkpoint_dir=tmp_path / "run", **kw)
    resumed = _fit_tiny(6, checkpoint_dir=tmp_path / "run", resume=True, **kw)
    assert [s for s, _ in resumed.evals] == [2, 4, 6]
    assert _evals_equal(resumed.evals, full.evals)
    loaded = load_checkpoint(tmp_path / "run", TINY_P0, TINY_OPT)
    assert _evals_equal(loaded.evals, full.evals)


def test_evals_that_cannot_be_checkpointed(tmp_path):
    class Metric:
        def __init__(self, v):
            self.v = v

    with pytest.raises(TypeError, match="cannot save the eval at step 2 in a check"):
        _fit_tiny(
            4,
            eval_every=2,
            eval_fn=lambda s, p, e: Metric(1.0),
            checkpoint_dir=tmp_path / "a",
        )
    with pytest.raises(TypeError, match=r"step 2, part \['m'\]\[1\], .*Metric"):
        _fit_tiny(
            4,
            eval_every=2,
            eval_fn=lambda s, p, e: {"m": [0.0, Metric(1.0)]},
            checkpoint_dir=tmp_path / "b",
        )
    with pytest.raises(TypeError, match="non-str key 1"):
        _fit_tiny(
            4,
            eval_every=2,
            eval_fn=lambda s, p, e: {1: 0.0},
            checkpoint_dir=tmp_path / "c",
        )
    # Without checkpoints, any value goes.
    result = _fit_tiny(4, eval_every=2, eval_fn=lambda s, p, e: Metric(s))
    assert [e.v for _, e in result.evals] == [2, 4]


# ---------------------------------------------------------------------------------
# From an audit of fit: chunking, checkpointed evals, batch shapes, NaN gradients
# ---------------------------------------------------------------------------------


def test_chunking_does_not_change_a_unet_run():
    """With steps_per_dispatch > 1 every chunk is the same loop, also a 1-step chunk
    (one left before an eval, a checkpoint, the end or a resume point): chunks
    (4, 1) and one chunk of 5 give bit-identical UNet parameters. A 1-step chunk
    used to be compiled without the loop, which XLA rounds differently for
    convolutions, so where a run stopped changed its result."""
    images = digits()[0][:32]
    net = UNet(features=(4, 8), time_embed_dim=8)
    p0 = net.init(jr.key(0), 0.5, jnp.zeros((8, 8)))
    loss = lambda p, k, x0: dsm_loss(net.apply, p, k, x0, SDE)
    kw = dict(optimizer=optax.adam(1e-3), num_steps=5, batch_size=4, key=jr.key(1))
    a = fit(loss, p0, images, steps_per_dispatch=4, progress=False, **kw)
    b = fit(loss, p0, images, steps_per_dispatch=5, progress=False, **kw)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.losses, b.losses)


def test_one_step_chunks_of_host_batches_are_bit_exact():
    """Host batches (an iterator) with an eval every 3 steps cut 1-step chunks out
    of 2-step ones: the loss history is bit-identical to the run without evals.
    A `scan` of length 1 is compiled without its loop, which rounded the loss of
    such a step differently (by an ulp); the chunk's loop now has a run-time trip
    count."""

    def batches():
        k = 0
        while True:
            yield np.full((4, 2), float(k), np.float32)
            k += 1

    loss = lambda p, k, batch: jnp.mean((batch - p["m"][None]) ** 2)
    kw = dict(
        optimizer=optax.sgd(0.1), key=jr.key(1), progress=False, num_steps=6,
        steps_per_dispatch=2,
    )  # fmt: skip
    p0 = {"m": jnp.zeros(2, jnp.float32)}
    a = fit(loss, p0, batches(), **kw)
    b = fit(
        loss, p0, batches(), eval_every=3,
        eval_fn=lambda s, p, e: 0.0, **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.params["m"], b.params["m"])


def test_each_checkpoint_holds_only_its_own_evals(tmp_path):
    """orbax writes a checkpoint's JSON in the background: it must hold a copy of
    the evals up to its step, not the live list that later evals are appended to."""
    _fit_tiny(
        num_steps=30, steps_per_dispatch=1, eval_every=1,
        eval_fn=lambda s, p, e: float(s), checkpoint_dir=tmp_path / "run",
        checkpoint_every=1, max_to_keep=None,
    )  # fmt: skip
    for s in range(1, 31):
        loaded = load_checkpoint(tmp_path / "run", TINY_P0, TINY_OPT, step=s)
        assert [e[0] for e in loaded.evals] == list(range(1, s + 1)), s


def test_iterator_batches_of_different_shapes_are_a_clear_error():
    batches = iter([TINY_DATA[:8], TINY_DATA[8:16], TINY_DATA[16:20]] * 4)
    with pytest.raises(ValueError, match="batches differ in shape"):
        _fit_tiny(num_steps=6, data=batches, steps_per_dispatch=3)


def test_a_non_finite_gradient_of_a_finite_loss_is_reported():
    """sqrt(|w|^2) at w = 0: the loss is 0, its gradient NaN, so the first update
    makes the parameters NaN; fit names that step instead of returning NaNs."""
    loss = lambda p, k, batch: jnp.sqrt(jnp.sum(p["w"] ** 2))
    with pytest.raises(FloatingPointError, match="not finite after step 0's update"):
        fit(loss, TINY_P0, TINY_DATA, optimizer=TINY_OPT, num_steps=1, batch_size=4,
            key=jr.key(0), progress=False)  # fmt: skip


def test_training_side_takes_keys_as_sample_does():
    """(A consistency audit.) Other generators' keys are hashed to a Threefry key
    in the losses, metrics, oracles, data and fit, as in gd.sample: raw rbg data
    (uint32[4]) was refused with JAX's error, and a vmap over typed rbg keys drew
    other numbers than a loop (rbg's batching rule), silently."""
    raw = jr.key_data(jr.key(1, impl="rbg"))
    x0 = swiss_roll(raw, 16)
    gmm = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    cloud = gd.PointCloud(x0)
    draws = {
        "dsm_loss": lambda k: small_loss(SMALL_PARAMS, k, x0),
        "mixture": lambda k: gmm.sample(k, 3),
        "cloud": lambda k: cloud.sample(k, 3),
        "sliced": lambda k: gd.sliced_wasserstein(x0, x0 + 1.0, key=k),
    }
    keys = jr.split(jr.key(3, impl="rbg"), 3)
    for name, draw in draws.items():
        assert np.all(np.isfinite(draw(raw))), name
        looped = jnp.stack([draw(k) for k in keys])
        np.testing.assert_array_equal(jax.vmap(draw)(keys), looped, err_msg=name)
    fitted = fit(small_loss, SMALL_PARAMS, x0, optimizer=OPT, num_steps=1,
                 batch_size=8, key=raw, progress=False)  # fmt: skip
    assert np.isfinite(fitted.losses[0])


def test_training_side_errors_name_their_cause(tmp_path):
    """(A consistency audit.) Causes that got a raw or misleading error before."""
    net = MLPScoreNet(hidden=(8,), time_embed_dim=4, num_classes=3)
    params = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    x0, labels = swiss_roll(0, 16), jnp.full(16, 7)
    # an out-of-range label inside fit (traced there): "the loss is not finite"
    # for dsm_loss, a CpuCallback traceback for conditional_dsm_loss
    losses = {
        "dsm": lambda p, k, b: dsm_loss(net.apply, p, k, b[0], SDE, labels=b[1]),
        "conditional": lambda p, k, b: conditional_dsm_loss(
            net.apply, p, k, b[0], b[1], SDE, num_classes=3, p_uncond=0.1
        ),
    }
    for loss in losses.values():
        with pytest.raises(ValueError, match="class label out of range"):
            fit(loss, params, (x0, labels), optimizer=OPT, num_steps=1,
                batch_size=8, key=jr.key(0), progress=False)  # fmt: skip
    # one bad label, drawn after the first chunk: JAX raises a cached program's
    # failed check as a ValueError (not a JaxRuntimeError), with the traceback
    one_bad = (jnp.arange(64) % 3).at[40].set(7)
    with pytest.raises(ValueError, match=r"steps [1-9]\d*\.\.\d+: class label out"):
        fit(losses["dsm"], params, (swiss_roll(0, 64), one_bad), optimizer=OPT,
            num_steps=100, batch_size=4, key=jr.key(0), steps_per_dispatch=1,
            progress=False)  # fmt: skip
    # narrow label dtypes are compared in a wide type (int8 wrapped hi = 200)
    int8 = jnp.arange(8, dtype=jnp.int8) % 3
    np.testing.assert_array_equal(
        jax.jit(lambda c: gd.check_labels(c, 200))(int8), int8
    )
    # a NaN example: "the loss is not finite at step k" when a batch drew it
    with pytest.raises(ValueError, match=r"non-finite values .* in \[0\]"):
        fit(small_loss, SMALL_PARAMS, (x0.at[3, 1].set(jnp.nan), labels),
            optimizer=OPT, num_steps=1, batch_size=8, key=jr.key(0),
            progress=False)  # fmt: skip
    # load_checkpoint spoke of resume=True, and called a run with an EMA corrupt
    with pytest.raises(CheckpointError, match="does not exist$"):
        load_checkpoint(tmp_path / "nope", SMALL_PARAMS, OPT)
    _fit_small(1, checkpoint_dir=tmp_path / "run")
    with pytest.raises(CheckpointError, match="kept an EMA .* pass ema=True"):
        load_checkpoint(tmp_path / "run", SMALL_PARAMS, OPT, ema=False)
    with pytest.raises(CheckpointError, match="kept an EMA .* ema_decay to resume"):
        _fit_small(2, checkpoint_dir=tmp_path / "run", resume=True, ema_decay=None)
    # swiss_roll runs scikit-learn on the host; the oracles' draw counts
    with pytest.raises(TypeError, match="concrete key or seed"):
        jax.jit(lambda k: swiss_roll(k, 4))(jr.key(0))
    for kw in (dict(n=0), dict(n=4, noise=-1.0)):
        with pytest.raises(ValueError, match="must be"):
            swiss_roll(0, **kw)
    gmm = GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    for n, err in ((-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="number of draws"):
            gmm.sample(jr.key(0), n)
    assert gmm.sample(jr.key(0), jnp.asarray(3)).shape == (3, 2)  # a concrete int
