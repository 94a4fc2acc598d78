"""Remedy study, R2: group-aware DP-SGD against standard DP-SGD on a CNN trained from scratch.

The design, claims and statistics were fixed in advance in
docs/remedy_study/preregistration.md. The data of the redone Study 2
(Fashion-MNIST, 50k training / 10k validation declared public for the
choices / 10k test; 10% of the training and validation images rotated, 2%
with `--grid=rotated_fraction=0.02`; 20% of the test images). The
`tiny_cnn` from scratch, batch 1,024, 20 epochs, SGD with momentum 0.9 and
EMA 0.996 without warm-up for every arm; standard clipping (C = 1),
DPSGD-Global-Adapt (target quantile 0.9) and quantile clipping (0.5), the
count's noise B / 20, at epsilon 1, 4 and 8, and non-private with the same
optimizer, at four learning rates each (the choice runs, seed 0):

  tf-dpfair-sweep --config=remedy_study --work_dir=/tmp/remedy_r2
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "rotated_fraction": 0.1,
    "test_rotated_fraction": 0.2,
    "validation_fraction": 1.0 / 6.0,
    "public_validation": True,
    "model": "tiny_cnn",
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 1024,
    "microbatch_size": 64,
    "epochs": 20,
    "optimizer": "sgd",
    "momentum": 0.9,
    "ema_decay": 0.996,
    "ema_warmup": 0.0,
    "eval_batch_size": 1000,
    "eval_every": 5,
    "dashboard_every": 0,
    "n_bootstrap": 20,
    "group_diagnostics": True,
    "diagnostics_alignment": True,
}

_RATES = [0.03, 0.1, 0.3, 1.0]

SWEEP = {"grid": [
    {"adaptive_clipping": ["", "global_adapt", "quantile"], "epsilon": [1.0, 4.0, 8.0],
     "learning_rate": _RATES},
    {"epsilon": [float("inf")], "learning_rate": _RATES},
]}
