"""Particles sharded over 4 (forced) CPU devices give the same samples as one device.

The checks run in a subprocess whose environment sets
`XLA_FLAGS=--xla_force_host_platform_device_count=4` before jax is imported. The
score is the exact Gaussian-mixture oracle, so each particle's arithmetic does not
depend on how many particles share a device, and the samples must be bit-identical
(a network's batched matmuls may round differently with the batch size).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json

    import diffrax as dfx
    import jax
    import jax.random as jr
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import guidediff as gd


    class StandardNormalScore(gd.AbstractScore):
        # The exact score of every VP marginal of N(0, I) data: elementwise.
        def __call__(self, t, x, args=None):
            return -x


    def errors(calls):
        # name -> the ValueError's message, or "no error"
        out = {}
        for name, call in calls.items():
            try:
                call()
                out[name] = "no error"
            except ValueError as e:
                out[name] = str(e)
        return out


    assert jax.device_count() == 4, jax.devices()
    sde = gd.VPSDE()
    gmm = gd.GaussianMixture(
        [0.3, 0.3, 0.4], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.3, 0.5, 0.4]
    )
    ts = gd.uniform_grid(sde.T, 1e-3, 40)
    key = jr.key(7)
    spec = PartitionSpec("p")
    sharding = NamedSharding(Mesh(jax.devices(), ("p",)), spec)
    cases = {
        "normal_sde_euler": (StandardNormalScore(), {"solver": dfx.Euler()}),
        "normal_ode_heun": (StandardNormalScore(), {"process": "ode"}),
        "gmm_sde_exponential": (gmm.score(sde), {}),
        "gmm_sde_euler": (gmm.score(sde), {"solver": dfx.Euler()}),
        # one batched diffeqsolve over all particles (fixed grid)
        "normal_sde_diffeqsolve": (
            StandardNormalScore(),
            {"solver": dfx.Euler(), "driver": "diffeqsolve"},
        ),
        # multistep solvers: the previous prediction is carried per particle
        "normal_sde_dpm2m": (StandardNormalScore(), {"solver": gd.SDEDPMSolverPP(sde)}),
        "normal_ode_dpm2m": (
            StandardNormalScore(),
            {"process": "ode", "solver": gd.DPMSolverPP(sde)},
        ),
    }
    out = {}
    for name, (score, kw) in cases.items():
        kw = dict(num_particles=64, ts=ts, **kw)
        one = gd.sample(key, sde, score, (2,), **kw).ys
        four = gd.sample(key, sde, score, (2,), sharding=sharding, **kw).ys
        a, b = np.asarray(one), np.asarray(four)
        out[name] = {
            "one_devices": len(one.sharding.device_set),
            "four_devices": len(four.sharding.device_set),
            "four_is_sharded": four.sharding.spec == spec,
            "equal": bool(np.array_equal(a, b)),
            "max_abs_diff": float(np.max(np.abs(a - b))),
            "scale": float(np.max(np.abs(a))),
            "finite": bool(np.all(np.isfinite(b))),
        }
    score, kw = cases["gmm_sde_euler"]
    kw = dict(num_particles=64, ts=ts, **kw)
    jitted = jax.jit(
        lambda k: gd.sample(k, sde, score, (2,), sharding=sharding, **kw).ys
    )(key)
    one = gd.sample(key, sde, score, (2,), **kw).ys
    out["jit"] = {
        "is_sharded": jitted.sharding.spec == spec,
        "max_abs_diff": float(np.max(np.abs(np.asarray(jitted) - np.asarray(one)))),
    }
    # SMC: resampling gathers particles across the devices
    smc_kw = dict(num_particles=64, ts=ts, ess_threshold=1.0)
    log_r = lambda x: -0.5 * ((x[0] - 1.0) ** 2 + x[1] ** 2)
    smc_one = gd.smc_sample(key, sde, gmm.score(sde), (2,), log_r, **smc_kw)
    smc_four = gd.smc_sample(
        key, sde, gmm.score(sde), (2,), log_r, sharding=sharding, **smc_kw
    )
    drawn = smc_four.resample(jr.key(5))
    out["smc"] = {
        "is_sharded": smc_four.ys.sharding.spec == spec,
        "resample_is_sharded": drawn.sharding.spec == spec
        and len(drawn.sharding.device_set) == 4,
        "resample_diff": float(
            np.max(np.abs(np.asarray(drawn) - np.asarray(smc_one.resample(jr.key(5)))))
        ),
        "num_devices": len(smc_four.ys.sharding.device_set),
        "resampled": int(np.sum(np.asarray(smc_four.resampled))),
        "same_resampling": bool(
            np.array_equal(np.asarray(smc_one.resampled), np.asarray(smc_four.resampled))
        ),
        "max_abs_diff": float(
            np.max(np.abs(np.asarray(smc_one.ys) - np.asarray(smc_four.ys)))
        ),
        "max_abs_diff_logw": float(
            np.max(
                np.abs(
                    np.asarray(smc_one.log_weights) - np.asarray(smc_four.log_weights)
                )
            )
        ),
    }
    # a sharding of the (P, 2) particles that names both axes: the keys, weights
    # and solver state take its particle axis (it was a with_sharding_constraint
    # error inside)
    both_axes = NamedSharding(Mesh(jax.devices(), ("p",)), PartitionSpec("p", None))
    ref = gd.sample(key, sde, score, (2,), sharding=sharding, **kw).ys
    two = gd.sample(key, sde, score, (2,), sharding=both_axes, **kw).ys
    smc_two = gd.smc_sample(
        key, sde, gmm.score(sde), (2,), log_r, sharding=both_axes, **smc_kw
    )
    out["both_axes"] = {
        "num_devices": [len(two.sharding.device_set), len(smc_two.ys.sharding.device_set)],
        "sample_equal": bool(np.array_equal(np.asarray(two), np.asarray(ref))),
        "smc_equal": bool(np.array_equal(np.asarray(smc_two.ys), np.asarray(smc_four.ys))),
    }
    # a 2 x 2 mesh that also shards the state axis: gd.sample lays its particles
    # (and a trajectory, save axis replicated) out over both, as smc_sample does
    mesh22 = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    grid = NamedSharding(mesh22, PartitionSpec("a", "b"))
    g_final = gd.sample(key, sde, score, (2,), sharding=grid, **kw).ys
    g_traj = gd.sample(
        key, sde, score, (2,), sharding=grid, save_trajectory=True, save_every=4, **kw
    ).ys
    g_smc = gd.smc_sample(key, sde, gmm.score(sde), (2,), log_r, sharding=grid, **smc_kw)
    out["mesh_2x2"] = {
        "specs": [
            list(g_final.sharding.spec),
            list(g_traj.sharding.spec),
            list(g_smc.ys.sharding.spec),
        ],
        "max_abs_diff": float(np.max(np.abs(np.asarray(g_final) - np.asarray(one)))),
        "traj_last_diff": float(
            np.max(np.abs(np.asarray(g_traj[:, -1]) - np.asarray(g_final)))
        ),
    }
    # a spec naming more axes than the (P, *shape) particles have: one clear error
    # from both entry points, with or without y0 (it was accepted, or failed inside
    # jax with an IndexError or a sharding-constraint error)
    too_long = NamedSharding(Mesh(jax.devices(), ("p",)), PartitionSpec("p", None, None))
    calls = {
        "sample": lambda: gd.sample(key, sde, score, (2,), sharding=too_long, **kw),
        "sample_y0": lambda: gd.sample(
            key, sde, score, (2,), y0=np.zeros((64, 2), np.float32), ts=ts,
            solver=dfx.Euler(), sharding=too_long,
        ),
        "smc": lambda: gd.smc_sample(
            key, sde, gmm.score(sde), (2,), log_r, sharding=too_long, **smc_kw
        ),
    }
    out["too_long"] = errors(calls)
    # a checkpoint of sharded parameters restores them sharded (not gathered onto
    # one device), and a typed key in the optimiser state restores at all
    import tempfile

    import jax.numpy as jnp
    import optax

    p0 = jax.device_put(jnp.zeros(4), sharding)
    loss_fn = lambda p, k, x: jnp.mean((x[:, None] - p) ** 2)
    opt = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.sgd(0.1))
    ckpt = tempfile.mkdtemp() + "/run"
    fit_kw = dict(optimizer=opt, batch_size=8, key=jr.key(0), progress=False)
    run = gd.fit(loss_fn, p0, jnp.arange(8.0), num_steps=4, checkpoint_dir=ckpt, **fit_kw)
    loaded = gd.load_checkpoint(ckpt, p0, opt)
    out["checkpoint"] = {
        "run_sharded": run.params.sharding.spec == spec,
        "loaded_sharded": loaded.params.sharding.spec == spec
        and len(loaded.params.sharding.device_set) == 4,
        "equal": bool(np.array_equal(np.asarray(run.params), np.asarray(loaded.params))),
    }
    # tune's cached step is keyed by where committed arguments live: the same call
    # with parameters on another device runs there (it raised a sharding mismatch)
    make = lambda prm: gd.guide(
        gmm.score(sde), gd.reward_guidance(gmm.score(sde), prm["w"])
    )
    tune_kw = dict(num_iters=1, num_particles=4, ts=gd.uniform_grid(sde.T, 1e-3, 3))
    placed = []
    for device in jax.devices()[:2]:
        prm = jax.device_put({"w": jnp.asarray(0.5)}, device)
        res = gd.finetune_through_sampler(
            jr.key(0), sde, make, prm, lambda x: -jnp.sum(x**2), (2,), **tune_kw
        )
        placed.append(next(iter(res.params["w"].devices())).id)
    out["tune_placement"] = placed
    # an eager vmap over y0 (3 sets of particles): the eager device_put laid the
    # particles' sharding onto the vmapped axis (an error for 3 sets, from a review)
    y0s = np.stack([np.full((8, 2), v, np.float32) for v in (0.5, -1.0, 2.0)])
    run = lambda y, shd: gd.sample(key, sde, score, (2,), y0=y, ts=ts[-5:],
                                   solver=dfx.Euler(), sharding=shd).ys  # fmt: skip
    try:
        vmapped = jax.vmap(lambda y: run(y, sharding))(y0s)
        reference = jax.vmap(lambda y: run(y, None))(y0s)
        out["eager_vmap_y0"] = {
            "spec": list(vmapped.sharding.spec),
            "max_abs_diff": float(np.max(np.abs(np.asarray(vmapped - reference)))),
        }
    except Exception as e:
        out["eager_vmap_y0"] = f"{type(e).__name__}: {e}"
    # the gradient with respect to a y0 committed to one device (moved before the
    # program: skipping that for every traced y0 broke it, from a review)
    y0c = jax.device_put(np.full((8, 2), 0.5, np.float32), jax.devices()[3])
    grad_of = lambda shd: jax.grad(lambda y: run(y, shd).sum())(y0c)
    try:
        g4, g1 = grad_of(sharding), grad_of(None)
        out["grad_committed_y0"] = float(np.max(np.abs(np.asarray(g4 - g1))))
    except ValueError as e:
        out["grad_committed_y0"] = str(e)
    # a traced y0 is put replicated, then laid out in the program: jax.jacfwd
    # batches the tangents (of a committed y0 here), and an eager vmap runs
    # jax.checkpoint's recorded device_put batched (each laid the particle
    # sharding onto a batch axis, or left a committed y0 in place; from reviews)
    transformed = {
        "jacfwd": lambda shd: jax.jacfwd(lambda c: run(c * y0c, shd).sum())(1.0),
        "vmap_checkpoint": lambda shd: jax.vmap(
            jax.checkpoint(lambda y: run(y, shd))
        )(y0s),
    }
    out["transformed_y0"] = {}
    for name, f in transformed.items():
        try:
            diff = np.max(np.abs(np.asarray(f(sharding)) - np.asarray(f(None))))
            out["transformed_y0"][name] = float(diff)
        except ValueError as e:
            out["transformed_y0"][name] = str(e)
    # a particle axis that the mesh does not divide: the error names it
    try:
        uneven = NamedSharding(Mesh(jax.devices(), ("p",)), PartitionSpec(None, "p"))
        gd.sample(key, sde, score, (2,), num_particles=8, ts=ts, sharding=uneven)
        out["uneven_state_axis"] = "no error"
    except ValueError as e:
        out["uneven_state_axis"] = str(e)
    # a guidance weight committed to one device: JAX's error blamed the key
    w1 = jax.device_put(jnp.asarray(0.5), jax.devices()[0])
    committed = gd.guide(gmm.score(sde), gd.reward_guidance(gmm.score(sde), w1))
    short = dict(num_particles=8, ts=gd.uniform_grid(sde.T, 1e-3, 4), sharding=sharding)
    calls = {
        "sample": lambda: gd.sample(key, sde, committed, (2,), **short),
        "smc": lambda: gd.smc_sample(key, sde, committed, (2,), log_r, **short),
    }
    out["committed"] = errors(calls)
    # a mesh with Explicit axes: with_sharding_constraint takes Auto axes only
    explicit = jax.make_mesh(
        (4,), ("p",), axis_types=(jax.sharding.AxisType.Explicit,)
    )
    out["explicit"] = errors({
        "sample": lambda: gd.sample(key, sde, score, (2,), num_particles=8, ts=ts,
                                    sharding=NamedSharding(explicit, spec)),
        "smc": lambda: gd.smc_sample(key, sde, score, (2,), log_r, num_particles=8,
                                     ts=ts, sharding=NamedSharding(explicit, spec)),
    })  # fmt: skip
    # ... but axes the spec does not name may be of any type (refused before)
    mixed = jax.make_mesh(
        (2, 2), ("p", "q"),
        axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit),
    )  # fmt: skip
    short_ts = gd.uniform_grid(sde.T, 1e-3, 4)
    # (inside jax.set_mesh: outside it, JAX's gradient of the program failed with
    # "cannot reshape array of size 1"; a sharding over another mesh than the
    # context's got JAX's own errors)
    s_r = gmm.tilt(gd.GaussianBumpReward([1.0, 1.0], 1.0)).score(sde)

    def mean_of(w, shd):
        guided = gd.guide(gmm.score(sde), gd.reward_guidance(s_r, w))
        return gd.sample(key, sde, guided, (2,), num_particles=8, ts=short_ts,
                         sharding=shd).ys.mean()  # fmt: skip

    ref = jax.grad(mean_of)(0.5, None)
    out["mixed"] = {}
    with jax.set_mesh(mixed):
        try:
            out["mixed"]["grad"] = float(
                abs(jax.grad(mean_of)(0.5, NamedSharding(mixed, spec)) - ref)
            )
        except ValueError as e:
            out["mixed"]["grad"] = str(e)
        out["mixed"].update(errors({
            "other_mesh": lambda: mean_of(0.5, sharding),
        }))  # fmt: skip
    # outside it, sampling works (only JAX's eager gradient needs the context)
    out["mixed"]["forward"] = float(
        abs(mean_of(0.5, NamedSharding(mixed, spec)) - mean_of(0.5, None))
    )
    # inside shard_map the mesh axes are Manual: sharding= there is a clear error
    in_map = jax.jit(
        jax.shard_map(
            lambda x: gd.sample(key, sde, score, (2,), num_particles=8, ts=short_ts,
                                sharding=sharding).ys[:2] + x,
            mesh=sharding.mesh, in_specs=spec, out_specs=spec,
        )
    )  # fmt: skip
    out["shard_map"] = errors({"sample": lambda: in_map(jnp.zeros((8, 2)))})
    # one particle (num_particles=None) cannot be split over 4 devices
    out["single"] = errors({
        "sample": lambda: gd.sample(key, sde, score, (2,), ts=short_ts,
                                    sharding=sharding),
    })  # fmt: skip
    try:  # 6 particles do not split over 4 devices: a clear error, not replication
        gd.sample(key, sde, score, (2,), num_particles=6, ts=ts, sharding=sharding)
        out["indivisible"] = "no error"
    except ValueError as e:
        out["indivisible"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded_runs() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_checkpoints_keep_the_sharding(sharded_runs):
    """Restored parameters were gathered onto one device (a numpy round trip)."""
    r = sharded_runs["checkpoint"]
    assert r["run_sharded"] and r["loaded_sharded"] and r["equal"]


def test_tune_step_cache_respects_placement(sharded_runs):
    assert sharded_runs["tune_placement"] == [0, 1]


def _check_layout(r: dict) -> None:
    assert r["finite"]
    assert (r["one_devices"], r["four_devices"]) == (1, 4)
    assert r["four_is_sharded"]


@pytest.mark.parametrize(
    "case",
    [
        "normal_sde_euler",
        "normal_ode_heun",
        "normal_sde_diffeqsolve",
        "normal_ode_dpm2m",
    ],
)
def test_sharded_samples_are_bit_identical(sharded_runs, case):
    r = sharded_runs[case]
    _check_layout(r)
    assert r["equal"], f"max |one - four| = {r['max_abs_diff']}"


@pytest.mark.parametrize(
    "case", ["gmm_sde_exponential", "gmm_sde_euler", "normal_sde_dpm2m"]
)
def test_sharded_samples_agree_to_rounding(sharded_runs, case):
    # Not bitwise: XLA compiles the 4-way partitioned program with other algebraic
    # rewrites than the 1-device one (seen: the mixture's per-component variance v,
    # shared by all particles, becomes one reciprocal 1/v that is multiplied in,
    # where the 1-device program divides by v; for the SDE 2M step the rewritten op
    # was not traced), so values differ by a few float32 ulps per step. The
    # particle's noise and prior draw are the same.
    r = sharded_runs[case]
    _check_layout(r)
    assert r["max_abs_diff"] <= 1e-5 * max(1.0, r["scale"])


def test_sharded_samples_under_jit_agree(sharded_runs):
    r = sharded_runs["jit"]
    assert r["max_abs_diff"] <= 1e-5


def test_sharding_is_kept_under_jit(sharded_runs):
    # Inside jax.jit (and jax.grad) the particles must still be laid out over the
    # devices, not computed replicated on each (jax.device_put on a tracer adds no
    # sharding constraint; gd.sample uses with_sharding_constraint).
    assert sharded_runs["jit"]["is_sharded"]


def test_indivisible_particle_count_is_an_error(sharded_runs):
    assert "cannot be split evenly" in sharded_runs["indivisible"]


def test_sharded_smc_agrees_to_rounding(sharded_runs):
    """smc_sample(sharding=...): the particles stay laid out over the 4 devices
    through the resampling gathers (resampling at every step here), with the same
    resampling decisions and the one-device samples and weights up to rounding."""
    r = sharded_runs["smc"]
    assert r["is_sharded"] and r["num_devices"] == 4
    assert r["resample_is_sharded"] and r["resample_diff"] <= 1e-5  # .resample()
    assert r["resampled"] > 0 and r["same_resampling"]
    assert r["max_abs_diff"] <= 1e-5 and r["max_abs_diff_logw"] <= 1e-5


def test_a_sharding_naming_both_particle_axes(sharded_runs):
    r = sharded_runs["both_axes"]
    assert r["num_devices"] == [4, 4]
    assert r["sample_equal"] and r["smc_equal"]


def test_a_sharding_of_the_state_axis_is_honoured(sharded_runs):
    """gd.sample laid out only the particle axis of a sharding (smc_sample all of
    its axes): the same argument gave two layouts."""
    r = sharded_runs["mesh_2x2"]
    assert r["specs"] == [["a", "b"], ["a", None, "b"], ["a", "b"]]
    assert r["max_abs_diff"] <= 1e-5 and r["traj_last_diff"] == 0.0


def test_a_spec_longer_than_the_particles_rank_is_an_error(sharded_runs):
    for name, msg in sharded_runs["too_long"].items():
        assert "names more axes than the particles have" in msg, (name, msg)


def test_an_eager_vmap_over_y0_keeps_the_particle_sharding(sharded_runs):
    res = sharded_runs["eager_vmap_y0"]
    assert isinstance(res, dict), res
    assert res["spec"] == [None, "p"]
    assert res["max_abs_diff"] < 1e-5


def test_gradient_wrt_a_committed_y0_with_a_sharding(sharded_runs):
    diff = sharded_runs["grad_committed_y0"]
    assert isinstance(diff, float) and diff < 1e-5, diff


def test_transformed_y0_with_a_sharding(sharded_runs):
    for name, diff in sharded_runs["transformed_y0"].items():
        assert isinstance(diff, float) and diff < 1e-4, (name, diff)


def test_an_unevenly_split_particle_axis_is_named(sharded_runs):
    msg = sharded_runs["uneven_state_axis"]
    assert "splits an axis of each particle's shape (2,)" in msg, msg


def test_an_argument_committed_to_one_device_is_named(sharded_runs):
    for name, msg in sharded_runs["committed"].items():
        assert "committed elsewhere" in msg, (name, msg)


def test_a_spec_naming_explicit_axes_is_a_clear_error(sharded_runs):
    for name, msg in sharded_runs["explicit"].items():
        assert "may name Auto axes only" in msg, (name, msg)


def test_explicit_mesh_axes_the_spec_does_not_name_are_accepted(sharded_runs):
    """Samples are the unsharded ones; inside `jax.set_mesh(mesh)` so is the
    gradient; a sharding over another mesh than the context's is a clear error."""
    r = sharded_runs["mixed"]
    assert isinstance(r["forward"], float) and r["forward"] < 1e-5, r
    assert isinstance(r["grad"], float) and r["grad"] < 1e-5, r
    assert "is not the mesh set by jax.set_mesh" in r["other_mesh"], r


def test_sharding_inside_shard_map_is_a_clear_error(sharded_runs):
    msg = sharded_runs["shard_map"]["sample"]
    assert "not supported inside jax.shard_map" in msg, msg


def test_one_particle_with_a_splitting_sharding_is_named(sharded_runs):
    msg = sharded_runs["single"]["sample"]
    assert "a single particle (num_particles=None)" in msg, msg
