"""The paper's experiments, run by `guidediff reproduce NAME [--quick] [--out DIR]`.

One module per experiment; each has `run(out, *, quick, seed) -> dict`, which writes
`results.json` and PNG figures into the folder `out` (created by the caller, see
`_common.prepare_out_dir`). `--quick` sizes a run to finish in under two minutes
on a small CPU; the default (full) mode is sized for a GPU: like the paper where
PAPER.md gives sizes (cfg-gmm: 4,000 steps, 10^4 samples per weight, w from 0.01 to
10), our choice elsewhere (the papers' sizes are not known).
"""

from . import (
    cfg_digits,
    cfg_gmm,
    reward_gmm,
    reward_pointset,
    robustness,
    training_efficiency,
)


EXPERIMENTS = {
    "cfg-gmm": cfg_gmm.run,
    "cfg-digits": cfg_digits.run,
    "reward-gmm": reward_gmm.run,
    "reward-pointset": reward_pointset.run,
    "robustness": robustness.run,
    "training-efficiency": training_efficiency.run,
}
"""Experiment name -> run function."""
