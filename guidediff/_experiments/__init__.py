"""The paper's experiments, run by `guidediff reproduce NAME [--quick] [--out DIR]`.

One module per experiment; each has `run(out, *, quick, seed) -> dict`, which writes
`results.json` and PNG figures into the folder `out` (created by the caller, see
`_common.prepare_out_dir`). `--quick` sizes a run to finish in under two minutes
on a small CPU; the default (full) mode is sized like the paper, for a GPU.
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
