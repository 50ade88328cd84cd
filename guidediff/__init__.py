"""guidediff: guided diffusion sampling in JAX.

The pipeline, one module per stage: forward SDE (`_sde`) -> score (`_score`, exact
oracles in `_oracle`) -> guidance (`_guidance`, score -> score, chained) -> reverse
terms (`_reverse`) -> diffrax solvers (`_solver`) on a grid (`_grid`) with grid
Brownian noise (`_brownian`), run by the scan / diffeqsolve drivers (`_driver`) ->
particles (`_sample`; log-likelihoods through the probability flow in `_likelihood`) -> metrics (`_metrics`, `_diagnostics`). Training (`_nn`, `_flax`, `_losses`,
`_train`, `_data`), differentiable tuning (`_tune`) and the paper's experiments
(`_experiments`) build on these.
"""

from ._brownian import GridBrownianPath as GridBrownianPath
from ._data import digits as digits, swiss_roll as swiss_roll
from ._diagnostics import guidance_norms as guidance_norms
from ._grid import (
    logsnr_grid as logsnr_grid,
    quadratic_grid as quadratic_grid,
    uniform_grid as uniform_grid,
)
from ._guidance.apg import AdaptiveProjected as AdaptiveProjected, apg as apg
from ._guidance.base import (
    AbstractGuidance as AbstractGuidance,
    Chain as Chain,
    Guided as Guided,
    Identity as Identity,
    chain as chain,
    guide as guide,
    stateless as stateless,
)
from ._guidance.cfg import ClassifierFree as ClassifierFree, cfg as cfg, cfgpp as cfgpp
from ._guidance.classifier import (
    ClassifierGuidance as ClassifierGuidance,
    classifier_guidance as classifier_guidance,
)
from ._guidance.gradient import (
    GradientGuidance as GradientGuidance,
    gradient_guidance as gradient_guidance,
)
from ._guidance.interval import Interval as Interval, interval as interval
from ._guidance.reward import (
    RewardGuidance as RewardGuidance,
    reward_guidance as reward_guidance,
)
from ._likelihood import (
    LogLikelihood as LogLikelihood,
    log_likelihood as log_likelihood,
)
from ._losses import (
    check_labels as check_labels,
    conditional_dsm_loss as conditional_dsm_loss,
    drop_labels as drop_labels,
    dsm_example_loss as dsm_example_loss,
    dsm_loss as dsm_loss,
    noisy_classifier_loss as noisy_classifier_loss,
    reward_weighted_dsm_loss as reward_weighted_dsm_loss,
    reward_weights as reward_weights,
)
from ._metrics import (
    energy_distance as energy_distance,
    frac_improved as frac_improved,
    mean_stderr as mean_stderr,
    mmd2 as mmd2,
    reciprocal_prob as reciprocal_prob,
    reward_stats as reward_stats,
    sliced_wasserstein as sliced_wasserstein,
    two_sample_test as two_sample_test,
)
from ._oracle import (
    ExpLinearReward as ExpLinearReward,
    Gaussian as Gaussian,
    GaussianBumpReward as GaussianBumpReward,
    GaussianMixture as GaussianMixture,
    MixtureScore as MixtureScore,
    PointCloud as PointCloud,
)
from ._reverse import (
    AdditiveNoiseTerm as AdditiveNoiseTerm,
    DriftTerm as DriftTerm,
    ReverseDrift as ReverseDrift,
    probability_flow as probability_flow,
    reverse_sde as reverse_sde,
)
from ._sample import (
    Samples as Samples,
    initial_noise as initial_noise,
    sample as sample,
)
from ._score import (
    AbstractScore as AbstractScore,
    EpsScore as EpsScore,
    ScoreFn as ScoreFn,
    VScore as VScore,
    X0Score as X0Score,
    denoise as denoise,
    eps_to_score as eps_to_score,
    score_to_eps as score_to_eps,
    score_to_v as score_to_v,
    score_to_x0 as score_to_x0,
    v_to_score as v_to_score,
    x0_to_score as x0_to_score,
)
from ._sde import (
    VESDE as VESDE,
    VPSDE as VPSDE,
    AbstractSDE as AbstractSDE,
    AbstractVPSchedule as AbstractVPSchedule,
    CosineSchedule as CosineSchedule,
    LinearBeta as LinearBeta,
    OneMinusT as OneMinusT,
)
from ._smc import (
    SMCSamples as SMCSamples,
    resample_indices as resample_indices,
    smc_sample as smc_sample,
)
from ._solver import (
    DDIM as DDIM,
    DPMSolverPP as DPMSolverPP,
    ExponentialIntegrator as ExponentialIntegrator,
    SDEDPMSolverPP as SDEDPMSolverPP,
    UniPC as UniPC,
)
from ._weights import (
    Constant as Constant,
    PerStep as PerStep,
    PiecewiseLinear as PiecewiseLinear,
    as_weight as as_weight,
)


__version__ = "0.2.0"

# Flax networks, the Flax adapter and the orbax-backed training loop load lazily, so
# that `import guidediff` (the sampling core) never imports flax or orbax.
_LAZY = {
    "MLPScoreNet": "._nn",
    "UNet": "._nn",
    "CNNClassifier": "._nn",
    "sinusoidal_embedding": "._nn",
    "count_params": "._nn",
    "LinenModel": "._flax",
    "flax_score": "._flax",
    "flax_classifier": "._flax",
    "FlaxClassifier": "._flax",
    "fit": "._train",
    "FitResult": "._train",
    "load_checkpoint": "._train",
    "warm_start": "._train",
    "CheckpointError": "._train",
    "tune_guidance": "._tune",
    "TuneResult": "._tune",
    "finetune_through_sampler": "._tune",
    "FinetuneResult": "._tune",
    "save_learning_curve": "._tune",
    "squared_displacement": "._tune",
}


# Every public name, the lazy ones included (`from guidediff import *` loads them).
__all__ = sorted([name for name in globals() if not name.startswith("_")] + list(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'guidediff' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
