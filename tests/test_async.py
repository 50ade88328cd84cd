"""The entry points dispatch asynchronously: they return before the device finishes.

`equinox.filter_jit` waits for every call to finish; `gd.sample` must not, so a loop
of calls overlaps host work with the device's. Each call below enqueues a program
that runs for a large fraction of a second on a CPU (about a million particle-steps),
so its output cannot be ready when a non-blocking call returns, and is always ready
when a blocking one does. (Host callbacks cannot stand in for a slow program: the
CPU backend runs programs holding them synchronously.)
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr

import guidediff as gd


SDE = gd.VPSDE()
TS = gd.uniform_grid(1.0, 1e-3, 64)
P = 65536


def _score():
    return gd.ScoreFn(lambda t, x, args: -x * jnp.cos(t * x))


def _returns_first(call):
    jax.block_until_ready(call(0))  # compiled and warm
    out = call(1)
    pending = not all(leaf.is_ready() for leaf in jax.tree.leaves(out))
    jax.block_until_ready(out)
    return pending


def test_sample_returns_before_the_device_finishes():
    score = _score()

    def call(seed):
        return gd.sample(
            jr.key(seed), SDE, score, (2,), num_particles=P, ts=TS, solver=dfx.Euler()
        ).ys

    assert _returns_first(call), "gd.sample waited for its program to finish"


def test_smc_sample_and_initial_noise_return_before_the_device_finishes():
    score = _score()

    def smc(seed):
        out = gd.smc_sample(
            jr.key(seed),
            SDE,
            score,
            (2,),
            lambda x: -jnp.sum(x**2),
            num_particles=P // 4,
            ts=TS,
            solver=dfx.Euler(),
        )
        return out.ys

    assert _returns_first(smc), "gd.smc_sample waited for its program to finish"

    def noise(seed):
        return gd.initial_noise(jr.key(seed), SDE, (256,), num_particles=P)

    assert _returns_first(noise), "gd.initial_noise waited for its program to finish"
