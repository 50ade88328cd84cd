"""Regressions from an audit of grids, diagnostics and learning-curve files."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import guidediff as gd
from guidediff._tune import save_learning_curve


def test_quadratic_grid_hits_both_ends_exactly():
    """t_0 = t_start exactly: the formula rounded it an ulp above T = 0.9 in float32
    for many t_end, and `sample` then rejected the grid as leaving the SDE's range."""
    for t_end in np.geomspace(1e-6, 0.1, 40):
        for dtype in (jnp.float32, jnp.float64):
            start = jnp.asarray(0.9, dtype)
            ts = gd.quadratic_grid(start, jnp.asarray(t_end, dtype), 7)
            assert ts[0] == start and ts[-1] == jnp.asarray(t_end, dtype)
            assert ts.dtype == dtype  # the ends' dtype, as uniform_grid
            assert np.all(np.diff(np.asarray(ts)) < 0)
    # 16-bit ends: a 16-bit grid, computed in float32 and rounded once (16-bit
    # arithmetic misplaced the times by up to 14 % and made neighbours equal)
    for dtype, n in ((jnp.bfloat16, 300), (jnp.float16, 1000)):
        ts = gd.quadratic_grid(jnp.asarray(1.0, dtype), jnp.asarray(1e-3, dtype), n)
        exact = gd.quadratic_grid(1.0, float(jnp.asarray(1e-3, dtype)), n)
        assert ts.dtype == dtype
        eps = float(jnp.finfo(dtype).eps)  # within one rounding of the exact times
        np.testing.assert_allclose(np.asarray(ts, np.float64), exact, rtol=eps)
        assert np.all(np.diff(np.asarray(ts, np.float32)) < 0)
    sde = gd.VPSDE(T=jnp.float32(0.9))
    ts = gd.quadratic_grid(jnp.float32(0.9), jnp.float32(1e-5), 7)
    score = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    out = gd.sample(jr.key(0), sde, score, (2,), num_particles=4, ts=ts)
    assert np.all(np.isfinite(out.ys))


def test_learning_curve_names_keep_their_dots(tmp_path):
    """Only a .json / .png suffix is dropped: "tune_lam0.05" and "tune_lam0.1"
    used to both become tune_lam0.json (one overwriting the other)."""
    curve = [{"step": k, "objective": 0.1 * k} for k in range(3)]
    paths = [save_learning_curve(curve, tmp_path / f"tune_lam{x}") for x in (0.05, 0.1)]
    assert [p.name for p in paths[0]] == ["tune_lam0.05.json", "tune_lam0.05.png"]
    assert [p.name for p in paths[1]] == ["tune_lam0.1.json", "tune_lam0.1.png"]
    json_path, png_path = save_learning_curve(curve, tmp_path / "run.v2.json")
    assert (json_path.name, png_path.name) == ("run.v2.json", "run.v2.png")


def test_guidance_norms_of_float16_particles_do_not_overflow():
    """A norm of several hundred is finite in float16, its square is not: the norms of 16-bit
    trajectories are computed in float32."""
    sde = gd.VPSDE()
    base = gd.Gaussian(jnp.zeros(2), jnp.eye(2)).score(sde)
    far = gd.Gaussian(jnp.full(2, 3.0), jnp.eye(2)).score(sde)
    guided = gd.guide(base, gd.reward_guidance(far, 300.0))
    ts = jnp.array([0.5, 0.3])
    ys = jnp.zeros((3, 2, 2), jnp.float16)
    mean, se = gd.guidance_norms(guided, ts, ys)
    ref, _ = gd.guidance_norms(guided, ts, ys.astype(jnp.float32))
    assert mean.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(mean)))
    assert np.all(np.asarray(ref) > 256)  # beyond float16's sqrt(max)
    np.testing.assert_allclose(mean, ref, rtol=2e-3)
    assert np.all(np.asarray(se) <= 1e-6 * np.asarray(mean))  # every particle at 0


def test_filter_jit_keys_static_leaves_with_their_type():
    """2, 2.0 and True are equal and hash alike: the program traced for one was
    reused for the other (x / 2.0 where x // 2 was asked)."""
    from guidediff._jit import filter_jit

    g = filter_jit(lambda x, s: x / s if isinstance(s, float) else x // s)
    x = jnp.asarray(7.0)
    assert float(g(x, 2.0)) == 3.5
    assert float(g(x, 2)) == 3.0


def test_check_grid_with_a_traced_sde_end():
    """A custom SDE whose T is an array leaf, traced under jit, with a concrete
    grid: the range check called float(T) unguarded (ConcretizationTypeError)."""
    from guidediff._grid import check_grid

    class Brownian(gd.AbstractSDE):
        T: float

        def drift_coeff(self, t):
            return jnp.zeros_like(jnp.asarray(t, float))

        def diffusion(self, t):
            return jnp.ones_like(jnp.asarray(t, float))

        def marginal(self, t):
            t = jnp.asarray(t, float)
            return jnp.ones_like(t), jnp.sqrt(t)

        def prior_std(self):
            return jnp.sqrt(jnp.asarray(self.T, float))

    ts = gd.uniform_grid(1.0, 1e-3, 5)
    jax.jit(lambda sde: check_grid(sde, ts) or 0)(Brownian(T=1.0))
    below = ts - 2.0  # concrete, ends below 0: still an error
    with pytest.raises(ValueError, match="leaves the SDE's range"):
        jax.jit(lambda sde: check_grid(sde, below) or 0)(Brownian(T=1.0))


def test_learning_curve_json_is_strict_and_keeps_its_curve(tmp_path):
    """A NaN was written bare (strict parsers reject it), a numpy scalar in `meta`
    was not serialisable, and `meta={"curve": ...}` replaced the curve."""
    import json

    curve = [{"step": 0, "objective": float("nan")}, {"step": 1, "objective": 1.0}]

    def strict(s):
        raise ValueError(f"bare {s} in the JSON")

    path, _ = save_learning_curve(curve, tmp_path / "c", meta={"lam": np.float32(0.5)})
    data = json.loads(path.read_text(), parse_constant=strict)
    assert data["curve"][0]["objective"] is None and data["lam"] == 0.5
    with pytest.raises(ValueError, match="'curve' key"):
        save_learning_curve(curve, tmp_path / "d", meta={"curve": []})


def test_digits_rejects_boolean_classes():
    with pytest.raises(ValueError, match="digits are classes 0..9"):
        gd.digits(classes=(True,))
