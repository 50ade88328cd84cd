r"""Diffusion-specific diffrax solvers.

`ExponentialIntegrator` solves the linear part of the reverse SDE exactly with the
score frozen at the start of each step. Between times $t > s$ with
$\alpha_{t|s} = \alpha_t/\alpha_s$ and $\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2
\sigma_s^2$, the step is the Gaussian posterior $q(x_s \mid x_t, \hat x_0)$:

$$x_s = \frac{x_t + \sigma_{t|s}^2\,s_t(x_t)}{\alpha_{t|s}}
      + \frac{\sigma_{t|s}\,\sigma_s}{\sigma_t}\,\xi,\qquad \xi\sim\mathcal N(0, I).$$

Writing $s_t = (\alpha_t\hat x_0 - x_t)/\sigma_t^2$ gives the DDPM ancestral step of
PAPER.md §5.1 (SDE-DPM-Solver-1). It has no $1/\alpha_t$ in it, so it is stable from a
start time where $\beta$ is large.
"""

from typing import ClassVar

import diffrax as dfx
import jax.numpy as jnp
from diffrax._local_interpolation import LocalLinearInterpolation

from ._sde import AbstractSDE


class ExponentialIntegrator(dfx.AbstractItoSolver):
    r"""The exponential-integrator (DDPM-ancestral) step for `reverse_sde` terms.

    It reads the score back from the drift term, $s = (f(t)x - v)/g(t)^2$ where $v$ is
    the reverse drift, and the Brownian increment $\Delta W$ from the noise term, using
    $\xi = \Delta W/\sqrt{|\Delta t|}$, so for the same Brownian path it is coupled to
    Euler-Maruyama. Works forward and backward in time and with `diffrax.diffeqsolve`
    (`StepTo` grids) or guidediff's fixed-grid driver.

    **Arguments:**

    - `sde`: the forward SDE whose reverse is being solved.
    """

    sde: AbstractSDE
    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.AbstractTerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar = LocalLinearInterpolation

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        drift_term, noise_term = terms.terms
        # The ODE term's control is the signed time step in the SDE's own time, also
        # when diffeqsolve has flipped time to integrate backwards.
        dt = drift_term.contr(t0, t1)
        direction = jnp.where(dt * (t1 - t0) < 0, -1, 1)
        ta, tb = t0 * direction, t1 * direction
        dtype = y0.dtype
        v = drift_term.vf(t0, y0, args)
        g2 = (self.sde.diffusion(ta) ** 2).astype(dtype)
        score = (self.sde.drift(ta, y0) - v) / g2
        alpha_a, sigma_a = self.sde.marginal(ta)
        alpha_b, sigma_b = self.sde.marginal(tb)
        a_ab = (alpha_a / alpha_b).astype(dtype)
        var_ab = (sigma_a**2 - (alpha_a / alpha_b) ** 2 * sigma_b**2).astype(dtype)
        mean = (y0 + var_ab * score) / a_ab
        std = jnp.sqrt(jnp.maximum(var_ab, 0.0)) * (sigma_b / sigma_a).astype(dtype)
        dw = noise_term.contr(t0, t1)
        xi = dw / jnp.sqrt(jnp.abs(dt)).astype(dtype)
        y1 = mean + std * xi
        dense_info = dict(y0=y0, y1=y1)
        return y1, None, dense_info, None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
