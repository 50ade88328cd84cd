"""Regressions from an audit of the training side (losses, `fit`, `warm_start`,
tuning): each test names the wrong behaviour it pins down. All checks run before
any training step, so the tests are cheap."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import guidediff as gd


SDE = gd.VPSDE()


@pytest.fixture(scope="module")
def conditional_net():
    net = gd.MLPScoreNet(hidden=(8,), time_embed_dim=8, num_classes=10)
    return net, net.init(jr.key(0), 0.5, jnp.zeros(2))


def test_conditional_loss_num_classes_must_match_the_network(conditional_net):
    """A smaller num_classes trained a real class as the null one (CFG's
    unconditional row never trained); a larger one fed labels with no row (NaN)."""
    net, p = conditional_net
    x0 = jr.normal(jr.key(1), (8, 2))
    for k in (3, 12):
        with pytest.raises(ValueError, match=r"built with num_classes=10"):
            gd.conditional_dsm_loss(net.apply, p, jr.key(2), x0, jnp.arange(8) % 3,
                                    SDE, num_classes=k)  # fmt: skip
    loss = gd.conditional_dsm_loss(net.apply, p, jr.key(2), x0, jnp.arange(8) % 3,
                                   SDE, num_classes=10)  # fmt: skip
    assert np.isfinite(loss)


def test_a_users_module_without_a_num_classes_field_is_not_checked():
    """A user's Flax module that keeps its class count under another name was read
    as built with num_classes=0 and rejected (the error's fix then failed too)."""
    import flax.linen as nn

    class MyNet(nn.Module):
        n_classes: int = 2

        @nn.compact
        def __call__(self, t, x, label):
            e = nn.Embed(self.n_classes + 1, 4)(jnp.asarray(label))
            h = jnp.concatenate([x, jnp.atleast_1d(t), e])
            return nn.Dense(x.shape[-1])(nn.silu(nn.Dense(8)(h)))

    net = MyNet()
    p = net.init(jr.key(0), 0.5, jnp.zeros(2), 0)
    x0, labels = jr.normal(jr.key(1), (8, 2)), jnp.arange(8) % 2
    loss = gd.conditional_dsm_loss(net.apply, p, jr.key(2), x0, labels, SDE,
                                   num_classes=2)  # fmt: skip
    assert np.isfinite(loss)


def test_labels_on_an_unconditional_network_are_an_error():
    """dsm_loss and reward_weighted_dsm_loss dropped the labels silently."""
    net = gd.MLPScoreNet(hidden=(8,), time_embed_dim=8)
    p = net.init(jr.key(0), 0.5, jnp.zeros(2))
    x0, labels = jr.normal(jr.key(1), (8, 2)), jnp.arange(8) % 3
    with pytest.raises(ValueError, match="built without num_classes"):
        gd.dsm_loss(net.apply, p, jr.key(2), x0, SDE, labels=labels)
    with pytest.raises(ValueError, match="built without num_classes"):
        gd.reward_weighted_dsm_loss(net.apply, p, jr.key(2), x0, jnp.ones(8), SDE,
                                    labels=labels)  # fmt: skip


def test_reward_weights_extremes_and_types():
    """R / alpha overflowed to inf (NaN weights, against the docstring's 'never
    overflows'); a subnormal temperature is flushed to 0; True was a temperature of
    1 and complex rewards lost their imaginary parts."""
    for rewards, temp in (([0.0, 1e38], 0.1), ([0.0, 100.0], 1e-30)):
        w = gd.reward_weights(jnp.array(rewards, jnp.float32), temperature=temp)
        np.testing.assert_allclose(w, [0.0, 2.0])
    with pytest.raises(ValueError, match="temperature must be positive"):
        gd.reward_weights(jnp.array([0.0, 1.0], jnp.float32), temperature=1e-40)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        gd.reward_weights(jnp.array([0.0, 1.0]), temperature=True)
    with pytest.raises(TypeError, match="rewards must be real"):
        gd.reward_weights(jnp.array([1 + 5j, 2 + 0j]))


def _quadratic_fit(tmp, **kw):
    loss = lambda p, k, x: jnp.mean((x - p) ** 2)
    base = dict(optimizer=optax.adam(0.1), key=jr.key(0), progress=False)
    return gd.fit(loss, jnp.asarray(0.0), jnp.arange(16.0), **base, **kw)


def test_fit_resume_refuses_another_batch_size_or_ema(tmp_path):
    """Resuming with another batch_size or ema_decay reproduced neither run."""
    d = tmp_path / "run"
    _quadratic_fit(tmp_path, num_steps=2, batch_size=2, checkpoint_dir=d)
    for kw in (dict(batch_size=8), dict(batch_size=2, ema_decay=0.5)):
        with pytest.raises(gd.CheckpointError, match="would not reproduce"):
            _quadratic_fit(tmp_path, num_steps=4, checkpoint_dir=d, resume=True, **kw)
    out = _quadratic_fit(tmp_path, num_steps=4, batch_size=2, checkpoint_dir=d,
                         resume=True)  # fmt: skip
    assert len(out.losses) == 4


def test_fit_checks_its_checkpoint_folder_and_ema_first(tmp_path):
    """A checkpoint_dir that is a file failed at the first save, after
    checkpoint_every steps of work; ema_decay=False was an EMA of decay 0."""
    afile = tmp_path / "ckpt"
    afile.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        _quadratic_fit(tmp_path, num_steps=3, batch_size=2, checkpoint_dir=afile,
                       checkpoint_every=2)  # fmt: skip
    with pytest.raises(TypeError, match="ema_decay must be a number"):
        _quadratic_fit(tmp_path, num_steps=1, batch_size=2, ema_decay=False)


def test_warm_start_needs_parameters():
    """None (the ema_params of a run without EMA) passed and failed deep in Flax; a
    FitResult gave its whole repr."""
    result = _quadratic_fit(None, num_steps=1, batch_size=2, ema_decay=None)
    with pytest.raises(ValueError, match="use its .params"):
        gd.warm_start(result.ema_params)
    with pytest.raises(TypeError, match="pass its .params or .ema_params"):
        gd.warm_start(result)
    assert gd.warm_start(result.params) == result.params


def test_tuning_penalty_weight_and_init_are_checked():
    """A negative lam rewarded moving away (unbounded objective); NaN failed at
    step 0 with advice about the learning rate; True was an init of 1."""
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    reward = gd.GaussianBumpReward([1.0, 1.0], 1.0)
    s, s_r = gmm.score(SDE), gmm.tilt(reward).score(SDE)
    guided = lambda w: gd.guide(s, gd.reward_guidance(s_r, w))
    kw = dict(ts=gd.uniform_grid(1.0, 1e-3, 5), num_particles=8, num_iters=2)
    for lam, err in ((-1.0, ValueError), (float("nan"), ValueError),
                     (jnp.ones(2), TypeError)):  # fmt: skip
        with pytest.raises(err, match="lam must be"):
            gd.tune_guidance(jr.key(0), SDE, guided, reward, (2,), lam=lam, **kw)
        with pytest.raises(err, match="lam must be"):
            gd.finetune_through_sampler(jr.key(0), SDE, lambda p: guided(p["w"]),
                                        {"w": 0.5}, reward, (2,), lam=lam, **kw)  # fmt: skip
    with pytest.raises(TypeError, match="init must be a number"):
        gd.tune_guidance(jr.key(0), SDE, guided, reward, (2,), init=True, **kw)


def test_save_learning_curve_checks_before_writing(tmp_path):
    """Keys that collide as text lost a value; a row without a plotted quantity
    raised a bare KeyError after the JSON was written (no PNG)."""
    with pytest.raises(ValueError, match="read the same as text"):
        gd.save_learning_curve([{"step": 0, "objective": 1.0}], tmp_path / "a",
                               meta={1: "x", "1": "y"})  # fmt: skip
    with pytest.raises(ValueError, match=r"row 1 lacks \['objective'\]"):
        gd.save_learning_curve([{"step": 0, "objective": 1.0}, {"step": 1}],
                               tmp_path / "b")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_network_sizes_and_digit_classes_are_checked_when_built():
    """Sizes a network cannot have failed at init with a ZeroDivisionError or an
    IndexError; digits(classes=3) with "'int' object is not iterable"."""
    for build, match in ((lambda: gd.MLPScoreNet(hidden=(0,)), "hidden must be >= 1"),
                         (lambda: gd.UNet(features=()), "at least one level"),
                         (lambda: gd.CNNClassifier(num_classes=0), "num_classes"),
                         (lambda: gd.MLPScoreNet(time_embed_dim=7), "must be even"),
                         (lambda: gd.UNet(blocks_per_level=0), "blocks_per_level")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            build()
    with pytest.raises(TypeError, match="a sequence of digits"):
        gd.digits(classes=3)
