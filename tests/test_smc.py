"""Sequential Monte Carlo (`gd.smc_sample`) against importance sampling and exact tilts.

Statistical checks compare UNBIASED estimates from R independent runs: Z-hat and
Z-hat times the weighted mean (the unnormalised mean, unbiased for Z E_pi[x] as Z-hat
is for Z; the normalised mean has an O(1/P) bias that differs between samplers).
The error bar is the spread between runs (the particles of one run are correlated
by resampling), and the threshold is the t quantile of a difference of two R-run
means at a family-wise 1e-3 over the module's checks.
"""

import itertools

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.stats
from helpers import three_class_gmm

import guidediff as gd


SDE = gd.VPSDE()
GMM = three_class_gmm()
REWARD = gd.GaussianBumpReward([1.0, 1.0], 1.0)
TS = gd.uniform_grid(1.0, 1e-3, 200)
TILTED = GMM.tilt(REWARD).score(SDE)  # the exact score of the tilted mixture
P, R = 128, 64  # particles per run, independent runs
NUM_CHECKS = 30  # two-sided agreement checks in this module (an upper bound)
K = float(scipy.stats.t.ppf(1 - 1e-3 / NUM_CHECKS / 2, df=R - 1))  # about 4.4


def _unbiased(out):
    """Z-hat and Z-hat times the weighted mean: unbiased for Z and Z E_pi[x]."""
    z = jnp.exp(out.log_normalizer)
    return z * (out.weights @ out.ys), z


def _replicates(key, **kw):
    """Per run: Z-hat times the weighted mean, Z-hat, and the resampling flags."""

    def run(k):
        out = gd.smc_sample(
            k, SDE, GMM.score(SDE), (2,), REWARD.log, num_particles=P, ts=TS, **kw
        )
        return *_unbiased(out), out.resampled

    zmean, z, resampled = jax.vmap(run)(jr.split(jr.key(key), R))
    return np.asarray(zmean), np.asarray(z), np.asarray(resampled)


def _mean_se(v):
    return v.mean(0), v.std(0, ddof=1) / np.sqrt(v.shape[0])


def _agree(a, b, what: str):
    """The means of two sets of R independent replicates agree within K standard
    errors of their difference (elementwise)."""
    (ma, sa), (mb, sb) = _mean_se(np.asarray(a)), _mean_se(np.asarray(b))
    z = np.abs(ma - mb) / np.hypot(sa, sb)
    assert np.all(z < K), f"{what}: {ma} vs {mb}, z = {z} (K = {K:.2f})"


@pytest.fixture(scope="module")
def importance():
    """Plain importance sampling of the same tilted law (no twist, no resampling)."""
    return _replicates(100, twist=0.0, ess_threshold=0.0)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # twist 1, systematic, resample below ESS = P/2
        {"resampling": "stratified", "ess_threshold": 1.0},
        {"resampling": "multinomial", "twist": 0.5},
        # moved by reward guidance at w = 1/2 (neither q nor the target), weights
        # corrected by the transition densities
        {"proposal": gd.guide(GMM.score(SDE), gd.reward_guidance(TILTED, 0.5))},
        # the same with a multistep solver (two histories), resampling every step
        {
            "proposal": gd.guide(GMM.score(SDE), gd.reward_guidance(TILTED, 0.5)),
            "solver": gd.SDEDPMSolverPP(SDE),
            "ess_threshold": 1.0,
        },
    ],
    ids=[
        "systematic",
        "stratified-every-step",
        "multinomial-half-twist",
        "proposal",
        "proposal-multistep",
    ],
)
def test_smc_targets_the_tilted_law(kw, importance):
    """Resampling and the twist leave the target q r / Z and Z-hat's mean unchanged:
    the same unbiased estimates as importance sampling on the same grid (q is the
    200-step sampler's law)."""
    zmean, z, resampled = _replicates(1, **kw)
    assert resampled.any() or "proposal" in kw
    if kw.get("ess_threshold") == 1.0:
        assert resampled.all()
    _agree(zmean, importance[0], "Z-hat times the weighted mean")
    _agree(z, importance[1], "Z-hat")


def test_importance_sampling_matches_the_exact_tilt(importance):
    """The reference itself: importance sampling of the 200-step sampler q estimates
    E_p[r] and E_p[r x] of the exact mixture (q's discretisation bias is below a
    fifth of a standard error here)."""
    tilted = GMM.tilt(REWARD)
    exact_z = float(REWARD.expectation(GMM))
    exact = np.asarray(tilted.mean()) * exact_z  # E_p[r x] = Z E_{p^r}[x]
    for est, value, what in (
        (importance[0], exact, "Z E[x]"),
        (importance[1], exact_z, "Z"),
    ):
        m, se = _mean_se(est)
        z = np.abs(m - value) / se
        assert np.all(z < K), f"{what}: {m} vs exact {value}, z = {z}"


def test_resample_of_one_device_particles_stays_uncommitted():
    """Only particles sharded over devices are put back on their sharding: a
    one-device result stays uncommitted, like any fresh array (a committed one
    would compile the user's jitted functions again)."""
    out = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log,
                        num_particles=8, ts=gd.uniform_grid(1.0, 1e-3, 4))  # fmt: skip
    assert not out.ys.committed and not out.resample(jr.key(1)).committed


def test_no_resampling_is_gd_sample_with_importance_weights():
    """ess_threshold=0: the particles are gd.sample's (slot i uses fold_in(key, i)),
    and the twisted increments telescope to log r of the final particle."""
    kw = dict(num_particles=8, ts=gd.uniform_grid(1.0, 1e-3, 20))
    # ShARK: SMC draws the space-time Levy areas gd.sample's path does
    for solver in (None, gd.SDEDPMSolverPP(SDE), dfx.ShARK()):
        out = gd.smc_sample(
            jr.key(3), SDE, GMM.score(SDE), (2,), REWARD.log, ess_threshold=0.0,
            solver=solver, **kw,
        )  # fmt: skip
        ref = gd.sample(jr.key(3), SDE, GMM.score(SDE), (2,), solver=solver, **kw).ys
        # the same arithmetic in two programs: XLA:CPU may fuse (and round) them
        # differently by an ulp (a change elsewhere in SMC's step did); ShARK's
        # three stages per step leave more room (16 ulp seen over 20 steps;
        # other noise would differ by O(1))
        maxulp = 32 if isinstance(solver, dfx.ShARK) else 8
        np.testing.assert_array_max_ulp(out.ys, ref, maxulp=maxulp)
        np.testing.assert_allclose(
            out.log_weights, jax.vmap(REWARD.log)(ref), rtol=1e-10, atol=1e-10
        )
        assert not np.any(out.resampled)
        np.testing.assert_allclose(
            out.log_normalizer,
            jax.nn.logsumexp(out.log_weights) - np.log(8),
            rtol=1e-12,
        )
        np.testing.assert_allclose(np.sum(out.weights), 1.0, rtol=1e-12)


def test_resampled_particles_keep_their_slot_noise():
    """Always resampling (ESS threshold 1) with a multistep solver and a sharp
    potential, so that resampling duplicates ancestors (the ESS falls far below
    P): resampling picks among the x_k before the step, and copies of one ancestor
    then move with their slots' own increments, so no two final particles
    coincide; the solver state travels with the particle (finite samples)."""
    sharp = lambda x: 8.0 * REWARD.log(x)
    out = gd.smc_sample(
        jr.key(4), SDE, GMM.score(SDE), (2,), sharp, num_particles=64,
        ts=gd.logsnr_grid(SDE, 1.0, 1e-3, 30), solver=gd.SDEDPMSolverPP(SDE),
        ess_threshold=1.0,
    )  # fmt: skip
    assert np.all(np.asarray(out.resampled))
    assert float(np.min(np.asarray(out.ess))) < 0.5 * 64  # ancestors duplicated
    ys = np.asarray(out.ys)
    assert np.all(np.isfinite(ys)) and not np.any(out.failed)
    assert len(np.unique(ys[:, 0])) == ys.shape[0]
    assert out.ess.shape == (31,) and out.resampled.shape == (30,)


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "multinomial"])
def test_resample_indices_are_unbiased(scheme):
    """E[count_i] = n w_i; systematic counts are floor or ceil of n w_i."""
    n, reps = 16, 4000
    w = np.asarray(jr.dirichlet(jr.key(0), jnp.ones(n)))
    logw = jnp.log(jnp.asarray(w))

    def counts(k):
        idx = gd.resample_indices(k, logw, scheme)
        return jnp.zeros(n).at[idx].add(1.0)

    c = np.asarray(jax.vmap(counts)(jr.split(jr.key(1), reps)))
    assert np.all(c.sum(1) == n)
    if scheme == "systematic":
        assert np.all(c >= np.floor(n * w) - 1e-9) and np.all(
            c <= np.ceil(n * w) + 1e-9
        )
    # multinomial: Var = n w (1 - w); stratified and systematic have smaller variance
    se = np.sqrt(n * w * (1 - w) / reps)
    np.testing.assert_array_less(np.abs(c.mean(0) - n * w), 4 * se + 1e-12)
    # zero weight: never chosen
    logw0 = logw.at[3].set(-jnp.inf)
    idx = jax.vmap(lambda k: gd.resample_indices(k, logw0, scheme))(
        jr.split(jr.key(2), 200)
    )
    assert not np.any(np.asarray(idx) == 3)


def test_failed_and_zero_weight_particles():
    """A potential that is NaN on part of the space: those particles are flagged and
    weigh nothing; the rest of the batch is unaffected. A potential of zero
    (log r = -inf) is a zero weight, not a failure. Equal weights (no twist: the
    weights change only at the end) never trigger resampling, even at threshold 1."""

    def log_r(x):
        return jnp.where(x[0] > 0.0, jnp.nan, REWARD.log(x))

    kw = dict(num_particles=32, ts=gd.uniform_grid(1.0, 1e-3, 20), twist=0.0)
    score = GMM.score(SDE)
    out = gd.smc_sample(jr.key(6), SDE, score, (2,), log_r, **kw, ess_threshold=1.0)
    assert not np.any(out.resampled)
    bad = np.asarray(out.ys[:, 0] > 0.0)
    assert bad.any() and not bad.all()
    np.testing.assert_array_equal(out.failed, bad)
    assert np.all(np.asarray(out.weights)[bad] == 0.0)
    assert np.isfinite(float(out.log_normalizer))

    def hard(x):  # an indicator: log r = 0 or -inf
        return jnp.where(x[0] > 0.0, 0.0, -jnp.inf)

    out = gd.smc_sample(jr.key(6), SDE, score, (2,), hard, **kw)
    assert not np.any(out.failed)
    np.testing.assert_array_equal(np.asarray(out.weights) > 0, bad)
    np.testing.assert_allclose(np.exp(out.log_normalizer), bad.mean(), rtol=1e-12)


# one program per constant c, on purpose (each c is compiled in)
@pytest.mark.filterwarnings("ignore:gd.smc_sample is compiling again")
def test_a_huge_finite_log_potential_acts_as_zero():
    """A hard constraint written with a large finite log r = c (not -inf): once
    e^c is 0 the estimate must not depend on c. Accumulating log w += log h_k -
    log h_{k-1} rounded a resampling's offset away when c was huge (Z-hat biased
    high, 0.45 for a true 0.25) and overflowed to -inf at c = -finfo.max. In
    float32 (x64 off; in float64 neither happens at these c)."""

    def log_z(c):  # the oracle and SDE made with x64 off (float32 parameters)
        log_r = lambda x: jnp.where(x[0] > 2.0, 0.0, c).astype(x.dtype)
        sde = gd.VPSDE()
        out = gd.smc_sample(jr.key(0), sde, three_class_gmm().score(sde), (2,), log_r,
                            num_particles=256, ts=gd.uniform_grid(1.0, 1e-3, 50))  # fmt: skip
        assert out.resampled.any() and out.log_weights.dtype == jnp.float32
        return float(out.log_normalizer)

    with jax.enable_x64(False):
        cs = (-1e5, -1e8, -1e30, float(-np.finfo(np.float32).max))
        values = [log_z(c) for c in cs]
    assert np.isfinite(values[0]) and values == [values[0]] * 4, values


def test_failures_are_counted_through_resampling():
    """Resampling replaces failed slots with live copies, which erased every trace
    of the failures (and Z-hat silently estimated E[r 1{no failure}])."""

    class NaNLeft(gd.AbstractScore):  # NaN at one time for particles with x[0] < 0
        def __call__(self, t, x, args=None):
            s = GMM.score(SDE)(t, x, args)
            return jnp.where((jnp.abs(t - 0.5) < 0.02) & (x[0] < 0), jnp.nan, s)

    kw = dict(num_particles=256, ts=gd.uniform_grid(1.0, 1e-3, 50))
    for threshold in (0.0, 1.0):
        out = gd.smc_sample(jr.key(0), SDE, NaNLeft(), (2,), REWARD.log,
                            ess_threshold=threshold, **kw)  # fmt: skip
        counts = np.asarray(out.num_failed_per_step)
        assert counts.shape == (51,) and counts.sum() > 50
        if threshold == 0.0:  # no resampling: the flags are all there
            assert counts.sum() == int(out.failed.sum())
        else:  # resampled away, but counted
            assert not out.failed.any()
    # a bad traced grid fails every particle from the start: counted at ts[0]
    run = jax.jit(lambda ts: gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,),
                                           REWARD.log, num_particles=8, ts=ts))  # fmt: skip
    bad = run(gd.uniform_grid(1.0, 1e-3, 4)[::-1])
    assert bad.failed.all() and int(bad.num_failed_per_step[0]) == 8
    with pytest.raises(ValueError, match="twist must be >= 0"):
        gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log, twist=-1.0,
                      **kw)  # fmt: skip


def test_twist_scales_the_intermediate_potentials():
    """The intermediate weights are exp(twist * log r(x0_hat)): without resampling
    (the same particles) a run with `twist=lam` has the ESS trace of a run with
    potential lam * log r and twist 1 up to the last time (where the weight is the
    potential itself, r against r^lam). The statistical tests cannot see the twist:
    Z-hat and the tilted law telescope to r for any lam."""
    ts = gd.uniform_grid(1.0, 1e-3, 12)
    kw = dict(num_particles=64, ts=ts, ess_threshold=0.0)
    for lam in (0.25, 2.0):
        twisted = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log,
                                twist=lam, **kw)  # fmt: skip
        scaled = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,),
                               lambda x, lam=lam: lam * REWARD.log(x), **kw)  # fmt: skip
        np.testing.assert_allclose(twisted.ess[:-1], scaled.ess[:-1], rtol=1e-10)
        assert not np.allclose(twisted.ess[:-1], 64.0, rtol=1e-3)  # weights vary


def test_twist_floor_keeps_hard_constraints_unbiased():
    """A hard constraint (log r = 0 or -inf) with twist 1: every particle's denoised
    estimate leaves the half-space at some step, so without a floor all weights
    die. With a floor of -3 the particles are resampled, and Z-hat's mean over
    independent runs equals importance sampling's on the same grid (4 standard
    errors of the spread between runs: Z-hat is bounded by e^3 per resampling)."""

    def hard(x):
        return jnp.where(x[0] > 1.0, 0.0, -jnp.inf)

    def replicates(seed, **kw):
        def run(k):
            o = gd.smc_sample(
                k, SDE, GMM.score(SDE), (2,), hard, num_particles=P, ts=ts, **kw
            )
            return *_unbiased(o), o.resampled.any(), o.weights @ o.ys

        zmean, z, did, mean = jax.vmap(run)(jr.split(jr.key(seed), R))
        return tuple(map(np.asarray, (zmean, z, did, mean)))

    ts = gd.uniform_grid(1.0, 1e-3, 100)
    zmean, z, did, mean = replicates(1, twist_floor=-3.0)
    izmean, iz, _, _ = replicates(200, twist=0.0, ess_threshold=0.0)
    assert did.all()
    _agree(z, iz, "Z-hat")
    _agree(zmean, izmean, "Z-hat times the weighted mean")
    kept = z > 0  # a run whose particles all left the constraint has Z-hat = 0
    assert kept.mean() > 0.9 and np.all(mean[kept, 0] > 1.0)  # all satisfy it
    none = gd.smc_sample(
        jr.key(1), SDE, GMM.score(SDE), (2,), hard, num_particles=P, ts=ts
    )
    assert float(none.log_normalizer) < np.log(iz.mean()) - 3  # the bias it removes


def test_smc_bad_input():
    score = GMM.score(SDE)
    kw = dict(num_particles=4, ts=gd.uniform_grid(1.0, 1e-3, 5))
    with pytest.raises(ValueError, match="ess_threshold must be in"):
        gd.smc_sample(jr.key(0), SDE, score, (2,), REWARD.log, ess_threshold=1.5, **kw)
    with pytest.raises(ValueError, match="resampling must be one of"):
        gd.smc_sample(jr.key(0), SDE, score, (2,), REWARD.log, resampling="x", **kw)
    with pytest.raises(ValueError, match="must return a real scalar"):
        gd.smc_sample(jr.key(0), SDE, score, (2,), lambda x: x, **kw)
    with pytest.raises(ValueError, match="at least 1"):
        gd.smc_sample(jr.key(0), SDE, score, (2,), REWARD.log, num_particles=0)
    with pytest.raises(ValueError, match="steps the probability-flow ODE"):
        gd.smc_sample(
            jr.key(0), SDE, score, (2,), REWARD.log, solver=gd.DDIM(SDE), **kw
        )
    with pytest.raises(ValueError, match="resampling must be one of"):
        gd.resample_indices(jr.key(0), jnp.zeros(3), "x")


@pytest.mark.parametrize(
    "scheme, exact",
    [("systematic", 0.0), ("stratified", 0.25), ("multinomial", 108 / 1024)],
)
def test_resample_indices_joint_law(scheme, exact):
    """The schemes share their means (above) but not their joint law. With
    w = (1, 3, 3, 1)/8 the cdf is (1/8, 1/2, 7/8, 1): one particle each of the two
    light ones needs u_0 < 1/8 and u_3 >= 7/8. Systematic (u_j = (j + U)/4): never;
    stratified (independent U_j): 1/4; multinomial: 4!/2! (1/8)^2 (3/4)^2."""
    reps = 4000
    lw = jnp.log(jnp.array([1.0, 3.0, 3.0, 1.0]) / 8)
    idx = jax.vmap(lambda k: gd.resample_indices(k, lw, scheme))(
        jr.split(jr.key(3), reps)
    )
    both = (jnp.sum(idx == 0, 1) == 1) & (jnp.sum(idx == 3, 1) == 1)
    p_hat = float(jnp.mean(both))
    se = np.sqrt(max(exact * (1 - exact), 1e-12) / reps)
    assert abs(p_hat - exact) <= 4 * se, (scheme, p_hat, exact)


def test_each_resampling_draws_fresh_randomness(monkeypatch):
    """Every resampling of a run uses its own key. One key for all would reuse one
    U across the steps: each step stays unbiased marginally, so the statistical
    tests cannot see it, but conditional on the past U is no longer uniform. Spied
    on: the keys reaching the resampler (compiled programs cleared around it)."""
    from guidediff import _smc

    seen = []
    original = _smc._resample_indices

    def spy(key, logw, scheme):
        jax.debug.callback(lambda k: seen.append(np.asarray(k).tobytes()),
                           jr.key_data(key))  # fmt: skip
        return original(key, logw, scheme)

    monkeypatch.setattr(_smc, "_resample_indices", spy)
    jax.clear_caches()
    try:
        out = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log,
                            num_particles=8, ts=gd.uniform_grid(1.0, 1e-3, 6),
                            ess_threshold=1.0)  # fmt: skip
        jax.effects_barrier()
    finally:
        jax.clear_caches()
    assert bool(out.resampled.all()) and len(seen) >= 6
    assert len(set(seen)) == len(seen)


def test_resample_indices_never_pick_zero_weight_in_float32():
    """(j + U) / n rounds to 1 in float32 for large n; such u go to the last particle
    WITH weight, never to a zero-weight last slot. In float32 (x64 off: with x64 the
    positions are float64 and never round), with keys whose last position does round
    to 1 (about one draw in 16 at 2^20), so the case is exercised, not left to a seed."""
    n = 2**20
    with jax.enable_x64(False):
        logw = jnp.zeros(n, jnp.float32).at[-1].set(-jnp.inf)
        pick = jax.jit(
            jax.vmap(gd.resample_indices, in_axes=(0, None, None)),
            static_argnums=2,
        )
        draws = {
            "systematic": jax.jit(lambda k: jr.uniform(k, (), jnp.float32)),
            "stratified": jax.jit(lambda k: jr.uniform(k, (n,), jnp.float32)[-1]),
        }
        # indices of such keys among the 256, found by the search below (it scans
        # about 124 keys for stratified, 7 s); checked here, and searched for again
        # where a JAX version draws other numbers
        known = {"systematic": (67, 125, 194, 199), "stratified": (25, 78, 109, 123)}
        all_keys = jr.split(jr.key(0), 256)
        for scheme, last_u in draws.items():

            def rounds(k, last_u=last_u):
                u = np.float32(last_u(k))
                return (np.float32(n - 1) + u) / np.float32(n) >= 1

            keys = [all_keys[i] for i in known[scheme] if rounds(all_keys[i])]
            if len(keys) < 4:
                keys = list(itertools.islice(filter(rounds, all_keys), 4))
            assert len(keys) == 4, scheme  # about 16 of 256 expected
            idx = pick(jnp.stack(keys), logw, scheme)
            assert int(jnp.max(idx)) < n - 1, scheme
    with pytest.raises(ValueError, match="no NaN"):
        gd.resample_indices(jr.key(0), jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match="at least one finite"):
        gd.resample_indices(jr.key(0), jnp.full(3, -jnp.inf))
    with pytest.raises(ValueError, match="1-D"):
        gd.resample_indices(jr.key(0), jnp.zeros((2, 2)))


def test_resample_indices_never_pick_zero_weights_among_many():
    """XLA's parallel cumsum is not monotone: in float32 a zero-weight slot's
    cumulative weight could step up by an ulp, and that failed (NaN) particle be
    drawn (about 0.4 picks per draw here before the fix). In float32 (x64 off, as
    users run) with 30 % zero weights among 2^16."""
    n = 2**16
    with jax.enable_x64(False):
        pick = jax.jit(
            jax.vmap(gd.resample_indices, in_axes=(0, None, None)),
            static_argnums=2,
        )
        picked = 0
        for s in range(4):
            lw = 3 * jr.normal(jr.key(s), (n,), jnp.float32)
            zero = jr.uniform(jr.key(100 + s), (n,)) < 0.3
            lw = jnp.where(zero, -jnp.inf, lw)
            for scheme in ("systematic", "stratified", "multinomial"):
                idx = pick(jr.split(jr.key(1000 + s), 8), lw, scheme)
                picked += int(jnp.sum(zero[idx]))
    assert picked == 0


def test_systematic_counts_hold_at_a_million_particles_with_x64():
    """With x64 the cumulative weights are float64, also for float32 log-weights:
    every systematic count is floor(n w) or ceil(n w) at 2^20 particles (in float32
    about ten slots per draw missed by one)."""
    n = 2**20
    lw = jr.normal(jr.key(1), (n,), jnp.float32)
    w = np.exp(np.asarray(lw, np.float64) - float(jnp.max(lw)))
    nw = n * w / w.sum()
    for k in range(2):
        idx = np.asarray(gd.resample_indices(jr.key(k), lw, "systematic"))
        count = np.bincount(idx, minlength=n)
        assert np.all((count >= np.floor(nw) - 1e-9) & (count <= np.ceil(nw) + 1e-9))


def test_resample_indices_check_traced_log_weights():
    pick = jax.jit(gd.resample_indices)
    np.testing.assert_array_equal(pick(jr.key(0), jnp.array([-jnp.inf, 0.0])), [1, 1])
    for bad in ([0.0, jnp.nan], [-jnp.inf, -jnp.inf], [0.0, jnp.inf]):
        with pytest.raises(Exception, match="no NaN or \\+inf"):
            pick(jr.key(0), jnp.array(bad)).block_until_ready()
    # float32 positions (j + U) / n stop resolving j above 2^24 particles
    big = jax.ShapeDtypeStruct((2**24 + 1,), jnp.float32)
    with (
        jax.enable_x64(False),
        pytest.raises(ValueError, match="enable jax_enable_x64"),
    ):
        jax.eval_shape(gd.resample_indices, jr.key(0), big)
    assert jax.eval_shape(gd.resample_indices, jr.key(0), big).shape == big.shape  # x64


def test_smc_threshold_and_labels_do_not_recompile(monkeypatch):
    import equinox as eqx

    from guidediff import _smc
    from guidediff._jit import filter_jit

    counted = eqx.debug.assert_max_traces(
        _smc._smc_sample_jit.__wrapped__, max_traces=1
    )
    monkeypatch.setattr(_smc, "_smc_sample_jit", filter_jit(counted))
    cond = GMM.conditional_score(SDE)
    kw = dict(num_particles=8, ts=gd.uniform_grid(1.0, 1e-3, 5))
    for thr, label, floor in ((0.5, 0, -np.inf), (0.7, 1, -3.0), (0.9, 2, -1)):
        out = gd.smc_sample(
            jr.key(0), SDE, cond, (2,), REWARD.log, args=label, ess_threshold=thr,
            twist_floor=floor, **kw,
        )  # fmt: skip
        assert out.ys.shape == (8, 2)
    with pytest.raises(ValueError, match="twist must be finite"):
        gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log, twist=np.nan, **kw
        )
    with pytest.raises(ValueError, match="twist_floor must be finite"):
        gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log, twist_floor=np.inf, **kw
        )
    with pytest.raises(TypeError, match="ess_threshold must be a number"):
        gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log, ess_threshold="0.5", **kw
        )


def test_smc_costs_the_score_evaluations_of_gd_sample():
    """The twist reuses the score value the step needs: with a network score and a
    potential without matmuls, SMC's program does exactly gd.sample's matmul FLOPs
    (counted from the jaxpr, scan bodies times their length)."""
    from benchmarks._flops import matmul_flops

    net = gd.MLPScoreNet(hidden=(16, 16), time_embed_dim=8)
    variables = net.init(jr.key(0), 0.5, jnp.zeros(2))
    score = gd.flax_score(net, variables, SDE)
    kw = dict(num_particles=4, ts=gd.uniform_grid(1.0, 1e-3, 6))

    def plain(key):
        return gd.sample(key, SDE, score, (2,), **kw).ys

    def smc(key):
        return gd.smc_sample(key, SDE, score, (2,), REWARD.log, **kw).ys

    with jax.numpy_rank_promotion("allow"):
        a, b = matmul_flops(plain, jr.key(0)), matmul_flops(smc, jr.key(0))
    assert a["flops"] > 0
    assert b["flops"] == a["flops"], (a, b)


def test_proposal_equal_to_the_score_changes_nothing():
    """With proposal = score the two transition kernels coincide: the density ratio
    is 0 and the run is the one without a proposal (to float rounding), for a
    one-step solver and for the multistep SDEDPMSolverPP. A solver that evaluates
    the score more than once per step is refused."""
    kw = dict(num_particles=16, ts=gd.uniform_grid(1.0, 1e-3, 20))
    score = GMM.score(SDE)
    for solver in (None, gd.SDEDPMSolverPP(SDE)):
        a = gd.smc_sample(jr.key(2), SDE, score, (2,), REWARD.log, solver=solver, **kw)
        b = gd.smc_sample(
            jr.key(2), SDE, score, (2,), REWARD.log, proposal=score, solver=solver,
            **kw,
        )  # fmt: skip
        # the same values up to the rounding of differently fused programs
        np.testing.assert_allclose(a.ys, b.ys, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a.log_weights, b.log_weights, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="transition density .* not Heun"):
        gd.smc_sample(
            jr.key(2), SDE, score, (2,), REWARD.log, proposal=score,
            solver=dfx.Heun(), **kw,
        )  # fmt: skip


def test_multistep_proposal_weights_are_the_path_density_ratio():
    """SDEDPMSolverPP (multistep) with a proposal, no resampling and no twist: the
    particles are gd.sample's with the proposal score, and each log-weight is
    log r(x_N) plus the log ratio of the base and proposal path densities, each
    kernel's mean taken with its own score's history along the path. Computed here
    by stepping the solver along the saved trajectory with each score."""
    from guidediff._brownian import _StepIncrement
    from guidediff._reverse import reverse_sde

    solver = gd.SDEDPMSolverPP(SDE)
    ts = gd.logsnr_grid(SDE, 1.0, 1e-3, 10)
    score = GMM.score(SDE)
    prop = gd.guide(score, gd.reward_guidance(TILTED, 0.5))
    kw = dict(num_particles=4, ts=ts, solver=solver)
    out = gd.smc_sample(
        jr.key(4), SDE, score, (2,), REWARD.log, proposal=prop, twist=0.0,
        ess_threshold=0.0, **kw,
    )  # fmt: skip
    paths = gd.sample(jr.key(4), SDE, prop, (2,), save_trajectory=True, **kw).ys
    np.testing.assert_allclose(out.ys, paths[:, -1], rtol=1e-10, atol=1e-10)

    def step(s, x, state, k, inc):
        terms = reverse_sde(SDE, s, _StepIncrement(inc, ts[k], ts[k + 1]))
        x1, _, _, state1, _ = solver.step(
            terms, ts[k], ts[k + 1], x, None, state, False
        )
        return x1, state1

    def log_weight(path):
        zero, one = jnp.zeros(2), jnp.ones(2)
        terms = reverse_sde(SDE, score, _StepIncrement(zero, ts[0], ts[1]))
        state_p = state_q = solver.init(terms, ts[0], ts[1], path[0], None)
        total = float(REWARD.log(path[-1]))
        for k in range(len(ts) - 1):
            x, x1, dt = path[k], path[k + 1], abs(float(ts[k + 1] - ts[k]))
            m_p, state_p = step(score, x, state_p, k, zero)
            m_q, next_q = step(prop, x, state_q, k, zero)
            sd = np.abs(np.asarray(step(prop, x, state_q, k, one)[0] - m_q)) * dt**0.5
            state_q = next_q
            # log N(x1; m_p, sd^2) - log N(x1; m_q, sd^2), per coordinate
            lp = -((x1 - m_p) ** 2) / (2 * sd**2)
            lq = -((x1 - m_q) ** 2) / (2 * sd**2)
            total += float(jnp.sum(lp - lq))
        return total

    expected = [log_weight(path) for path in np.asarray(paths)]
    # (taking the base kernel's mean with the proposal's history instead moves
    # these log-weights by O(1): the history matters)
    np.testing.assert_allclose(out.log_weights, expected, rtol=1e-8, atol=1e-8)


def test_proposal_on_a_grid_ending_at_zero():
    """The exponential integrator's last step to t = 0 has no noise: with a proposal
    that step follows the base score (point-mass kernels), so the weights stay
    finite and the run matches importance sampling's target on the same grid (R
    independent runs each: weighted mean and Z-hat within 4 combined standard
    errors), not all zero."""
    ts = gd.uniform_grid(1.0, 0.0, 20)
    prop = gd.guide(GMM.score(SDE), gd.reward_guidance(TILTED, 0.5))
    out = gd.smc_sample(
        jr.key(3), SDE, GMM.score(SDE), (2,), REWARD.log, num_particles=64, ts=ts,
        proposal=prop,
    )  # fmt: skip
    assert np.isfinite(float(out.log_normalizer)) and not np.any(out.failed)
    assert np.all(np.isfinite(np.asarray(out.weights)))

    def replicates(seed, **kw):
        def run(k):
            o = gd.smc_sample(
                k, SDE, GMM.score(SDE), (2,), REWARD.log, num_particles=P, ts=ts,
                **kw,
            )  # fmt: skip
            return _unbiased(o)

        return jax.vmap(run)(jr.split(jr.key(seed), R))

    zmean, z = replicates(3, proposal=prop)
    izmean, iz = replicates(300, twist=0.0, ess_threshold=0.0)
    _agree(zmean, izmean, "Z-hat times the weighted mean")
    _agree(z, iz, "Z-hat")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_resample_indices_of_16_bit_log_weights(dtype):
    """Systematic resampling of equal weights picks every slot exactly once: the
    cumulative sum runs in float32 (in 16 bits it stopped growing and the last
    particles were never picked)."""
    n = 4096
    idx = gd.resample_indices(jr.key(1), jnp.zeros(n, dtype), "systematic")
    np.testing.assert_array_equal(np.sort(np.asarray(idx)), np.arange(n))


def test_equal_large_log_weights_never_trigger_resampling():
    """A constant potential log r = -1000 keeps the weights equal: the ESS is n
    (computed from shifted log-weights: float32 lost it), so threshold 1 never
    resamples."""
    out = gd.smc_sample(
        jr.key(0), SDE, GMM.score(SDE), (2,), lambda x: -1000.0 + 0 * x[0],
        num_particles=100, ts=gd.uniform_grid(1.0, 1e-3, 10), ess_threshold=1.0,
        dtype=jnp.float32,
    )  # fmt: skip
    assert not bool(jnp.any(out.resampled))
    np.testing.assert_allclose(out.log_normalizer, -1000.0, rtol=1e-6)


def test_twist_gradient_with_a_hard_constraint_is_finite():
    """Without resampling the weights telescope to log r(x_N) for every twist, so
    d log Z-hat / d twist = 0, also where the potential is zero (log r = -inf) at
    some denoised estimate (it was NaN: the derivative of twist * -inf)."""
    hard = lambda x: jnp.where(x[0] > 1.0, 0.0, -jnp.inf)

    def log_z(twist):
        return gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), hard, num_particles=8,
            ts=gd.uniform_grid(1.0, 1e-3, 10), twist=twist, twist_floor=-3.0,
            ess_threshold=0.0,
        ).log_normalizer  # fmt: skip

    for twist in (1.0, 0.0):
        value, grad = jax.value_and_grad(log_z)(twist)
        assert np.isfinite(float(value))
        assert float(grad) == 0.0


def test_smc_grid_error_does_not_suggest_y0():
    with pytest.raises(ValueError, match=r"start the grid at sde.T$"):
        gd.smc_sample(
            jr.key(0), SDE, GMM.score(SDE), (2,), REWARD.log, num_particles=4,
            ts=gd.uniform_grid(0.5, 1e-3, 5),
        )  # fmt: skip


def test_gradient_through_resampling_is_consistent():
    """`jax.grad` of log Z-hat through resampling left the ancestor selection
    undifferentiated: with resampling at every step the mean gradient w.r.t. the
    reward's centre was 15 standard errors off the gradient without resampling
    (both estimate d log Z / dc = E_pi[d log r / dc]). Each copy now carries its
    ancestor's log-weight as a zero-valued stop-gradient term (Scibior & Wood).
    The score's parameters (the mixture's means) move the particles: their
    gradient, each lineage's derivative with its noise held fixed, is consistent
    too (in noise space pi is N(0, I) times the lineage's weight)."""
    ts = gd.uniform_grid(1.0, 1e-3, 20)
    runs = 20

    @jax.jit
    def grads(threshold, keys):
        def log_z(c, means, k):
            gmm = gd.GaussianMixture(
                jnp.array([0.5, 0.5]), means, jnp.array([0.5, 0.5])
            )
            reward = gd.GaussianBumpReward(c, 1.0)
            return gd.smc_sample(k, SDE, gmm.score(SDE), (2,), reward.log,
                                 num_particles=500, ts=ts,
                                 ess_threshold=threshold).log_normalizer  # fmt: skip

        c, means = jnp.array([1.0, 1.0]), jnp.array([[-2.0, 0.0], [2.0, 0.0]])
        grad = jax.grad(log_z, argnums=(0, 1))
        return jax.vmap(lambda k: jnp.concatenate([g.ravel() for g in grad(c, means, k)]))(keys)  # fmt: skip

    keys = jr.split(jr.key(5), runs)
    plain = np.asarray(grads(0.0, keys))  # never resamples
    resampled = np.asarray(grads(1.0, keys))  # resamples at every step
    assert plain.shape == (runs, 2 + 4)  # the centre's and the means' gradients
    se = np.sqrt((plain.var(0, ddof=1) + resampled.var(0, ddof=1)) / runs)
    z = (resampled.mean(0) - plain.mean(0)) / se
    # Student's t with runs - 1 degrees of freedom (K is for R runs)
    k = scipy.stats.t.ppf(1 - 1e-3 / NUM_CHECKS / 2, df=runs - 1)  # about 5.4
    assert np.all(np.abs(z) < k), z
    # the case tested: a resampling at every step
    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    out = gd.smc_sample(keys[0], SDE, gmm.score(SDE), (2,), REWARD.log,
                        num_particles=500, ts=ts, ess_threshold=1.0)  # fmt: skip
    assert bool(out.resampled.all())


def test_a_potential_may_return_a_python_number():
    """`lambda x: 1.0` failed with AttributeError ('float' has no 'astype'); a
    constant log-potential c gives log Z = c exactly."""
    out = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), lambda x: 1.0,
                        num_particles=4, ts=gd.uniform_grid(1.0, 1e-3, 3))  # fmt: skip
    np.testing.assert_allclose(out.log_normalizer, 1.0, rtol=1e-12)
    assert int(out.num_failed_per_step.sum()) == 0


def test_a_dead_population_has_an_ess_of_zero():
    """When every weight is zero (a hard constraint that every denoised estimate
    violates) the ESS trace was NaN, with no record of the step where the
    population died; it is now 0 from that step on."""
    far = lambda x: jnp.where(x[0] > 50.0, 0.0, -jnp.inf)
    out = gd.smc_sample(jr.key(0), SDE, GMM.score(SDE), (2,), far, num_particles=8,
                        ts=gd.uniform_grid(1.0, 1e-3, 4))  # fmt: skip
    ess = np.asarray(out.ess)
    assert not np.any(np.isnan(ess)), ess
    assert ess[0] == 0 and np.all(ess == 0)
    assert out.log_normalizer == -np.inf
    assert not bool(out.resampled.any())  # nothing to resample from
    assert int(out.num_failed_per_step.sum()) == 0  # zero weights, not failures


def test_a_failed_solver_step_fails_the_particle():
    """smc_sample dropped the solver's result code (consistency audit): an implicit
    step whose root finder did not converge leaves finite values, which gd.sample
    flags as failed; smc_sample gave those particles full weight."""
    import optimistix as optx

    gmm = gd.GaussianMixture([0.5, 0.5], [[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.5])
    s = gmm.score(SDE)
    ts = gd.uniform_grid(1.0, 1e-3, 10)
    solver = dfx.ImplicitEuler(root_finder=optx.Chord(rtol=1e-6, atol=1e-6))
    kw = dict(num_particles=4, ts=ts, solver=solver)
    ref = gd.sample(jr.key(0), SDE, s, (2,), **kw)
    # flagged by the result code (the solver's values were finite): NaN
    assert 0 < int(ref.num_failed) < 4
    assert np.all(np.asarray(ref.result != dfx.RESULTS.successful) == ref.failed)
    smc = gd.smc_sample(jr.key(0), SDE, s, (2,), REWARD.log, ess_threshold=0.0, **kw)
    np.testing.assert_array_equal(smc.failed, ref.failed)
    assert int(smc.num_failed) == int(ref.num_failed)
    assert int(smc.num_failed_per_step.sum()) == int(ref.num_failed)
    assert np.all(np.asarray(smc.weights)[np.asarray(ref.failed)] == 0.0)
    assert np.all(np.asarray(smc.weights)[~np.asarray(ref.failed)] > 0.0)
    ok = ~np.asarray(ref.failed)  # (sample sets failed particles to NaN)
    np.testing.assert_array_max_ulp(np.asarray(smc.ys)[ok], np.asarray(ref.ys)[ok], 8)
