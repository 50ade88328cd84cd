r"""Reverse-time dynamics as diffrax terms.

For the forward SDE $dX = f(t)X\,dt + g(t)\,dW$ with score $s_t$, integrated from
$t = T$ down to $t = \varepsilon$ (diffrax handles $t_0 > t_1$):

- reverse SDE (Anderson): $dX = [f(t)X - g(t)^2 s_t(X)]\,dt + g(t)\,d\bar W$;
- probability-flow ODE: $dX = [f(t)X - \tfrac12 g(t)^2 s_t(X)]\,dt$.

Both start from the prior at $T$ and share one drift module, so every guidance works
with both.
"""

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from ._custom_types import Args, Time
from ._score import AbstractScore
from ._sde import AbstractSDE


class ReverseDrift(eqx.Module):
    r"""$f(t)x - \lambda\,g(t)^2 s_t(x)$, with $\lambda = 1$ (SDE) or $\tfrac12$ (ODE).

    **Arguments:** `sde`, `score` and `score_scale` ($\lambda$). Built by
    `reverse_sde` / `probability_flow` (see their examples); solvers read the score
    from it directly.
    """

    sde: AbstractSDE
    score: AbstractScore
    score_scale: float = eqx.field(static=True)

    def __call__(self, t: Time, y: Array, args: Args) -> Array:
        s = self.score(t, y, args)
        # formed in at least float32 and rounded once: for 16-bit states g^2 alone
        # can overflow (float16 holds up to 65504; a VE SDE's g(T)^2 is 2e5 at
        # sigma_max = 100)
        wd = jnp.promote_types(y.dtype, jnp.float32)
        g2 = (self.sde.diffusion(t) ** 2).astype(wd)
        f_y = self.sde.drift(t, y.astype(wd))
        return (f_y - (self.score_scale * g2) * s.astype(wd)).astype(y.dtype)


class DriftTerm(dfx.ODETerm):
    r"""`diffrax.ODETerm` whose increment $v\,\Delta t$ keeps the drift's dtype.

    The time grid of 16-bit particles is float32 (16-bit times cannot resolve it);
    `ODETerm.prod` would promote a bfloat16 drift times a float32 step to float32,
    which diffrax's Runge-Kutta solvers cannot store in their 16-bit stage buffers.
    The product is formed in the wider dtype and rounded once."""

    def prod(self, vf, control):
        return jtu.tree_map(lambda v: (control * v).astype(v.dtype), vf)


class AdditiveNoiseTerm(dfx.AbstractTerm):
    r"""$g(t)\,dW_t$ for a scalar diffusion $g(t)$: the vector field is the scalar
    $g(t)$ and the product with the Brownian increment is elementwise (cheaper than a
    `lineax.DiagonalLinearOperator`)."""

    sde: AbstractSDE
    path: dfx.AbstractBrownianPath

    def vf(self, t, y, args):
        return self.sde.diffusion(t)

    def contr(self, t0, t1, **kwargs):
        return self.path.evaluate(t0, t1, **kwargs)

    def prod(self, vf, control):
        return jtu.tree_map(lambda c: jnp.asarray(vf, c.dtype) * c, control)


def reverse_sde(
    sde: AbstractSDE, score: AbstractScore, brownian: dfx.AbstractBrownianPath
) -> dfx.MultiTerm:
    r"""The reverse-time SDE $dX = [f(t)X - g(t)^2 s_t(X)]\,dt + g(t)\,d\bar W$ as
    diffrax terms, `MultiTerm(DriftTerm(ReverseDrift), AdditiveNoiseTerm)`.

    **Arguments:**

    - `sde`: the forward SDE; `score`: its (possibly guided) score.
    - `brownian`: the noise, a `diffrax.AbstractBrownianPath` of one particle's
      shape (`gd.GridBrownianPath` on a fixed grid, `diffrax.VirtualBrownianTree`
      for adaptive steps).

    `gd.sample` builds these terms; use them directly to drive diffrax yourself
    (with Euler-type or Runge-Kutta solvers: diffrax's stochastic Runge-Kutta
    solvers, `diffrax.ShARK()` and the like, are wrong backwards in time inside
    `diffrax.diffeqsolve`, diffrax issue #598; `gd.sample` runs them correctly):

    !!! example

        ```python
        import diffrax as dfx

        sde = gd.VPSDE()
        score = gd.Gaussian(jnp.array([2.0]), 1.0).score(sde)  # X0 ~ N(2, 1)
        ts = gd.uniform_grid(sde.T, 1e-3, 200)

        def particle(key):  # diffrax's Euler-Maruyama, from T down to 1e-3
            k0, kw = jr.split(key)
            terms = gd.reverse_sde(sde, score, gd.GridBrownianPath((1,), ts, kw))
            sol = dfx.diffeqsolve(terms, dfx.Euler(), ts[0], ts[-1], None,
                                  sde.prior_sample(k0, (1,)),
                                  stepsize_controller=dfx.StepTo(ts))
            return sol.ys[-1]

        ys = jax.vmap(particle)(jr.split(jr.key(0), 2000))
        assert abs(ys.mean() - 2.0) < 4 / jnp.sqrt(2000)  # 4 standard errors
        ```
    """
    return dfx.MultiTerm(
        DriftTerm(ReverseDrift(sde, score, 1.0)), AdditiveNoiseTerm(sde, brownian)
    )


def probability_flow(sde: AbstractSDE, score: AbstractScore) -> dfx.ODETerm:
    r"""The probability-flow ODE $dX = [f(t)X - \tfrac12 g(t)^2 s_t(X)]\,dt$ as a
    `DriftTerm` (a `diffrax.ODETerm`): deterministic, with the SDE's marginals.

    **Arguments:** `sde`, the forward SDE; `score`, its (possibly guided) score.

    !!! example

        ```python
        import diffrax as dfx

        # X0 ~ N(m, 1) under the VP SDE: X_t ~ N(alpha(t) m, 1), and the flow
        # shifts each point by (alpha(t1) - alpha(t0)) m
        sde, m = gd.VPSDE(), 2.0
        terms = gd.probability_flow(sde, gd.Gaussian(jnp.array([m]), 1.0).score(sde))
        sol = dfx.diffeqsolve(terms, dfx.Tsit5(), sde.T, 1e-3, -0.01, jnp.zeros(1),
                              stepsize_controller=dfx.PIDController(rtol=1e-6,
                                                                    atol=1e-6))
        shift = (sde.marginal(1e-3)[0] - sde.marginal(sde.T)[0]) * m
        assert jnp.allclose(sol.ys[-1], shift, atol=1e-4)
        ```
    """
    return DriftTerm(ReverseDrift(sde, score, 0.5))
