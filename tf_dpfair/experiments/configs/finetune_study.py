"""Study 2 redone, Stage B1: every layer of EfficientNet-Lite0 trained, learning-rate pilot.

The design was fixed in advance in docs/study2_redo/preregistration.md.
The data of `probe_study` at a 10% rotated share; every layer trained
(BatchNorm frozen in inference mode), expected batch 1,024, SGD with
momentum 0.9 for every arm: epsilon 8 and 1 (noise multipliers 0.602 and
1.401, calibrated for the final runs' 150 updates at q = 1024 / 50000, so the
pilot sees their noise per update), non-private, and clip-only (clipping
without noise: `noise_multiplier=0`). The pilot runs 30 updates at three
learning rates; the final runs (B2) give `--steps=150` and one learning
rate per arm:

  tf-dpfair-sweep --config=finetune_study --work_dir=/tmp/finetune_b1
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "rotated_fraction": 0.1,
    "test_rotated_fraction": 0.2,
    "validation_fraction": 1.0 / 6.0,
    "public_validation": True,
    "model": "efficientnet_lite0",
    "model_options": {"image_size": 64},
    "pretrained": "imagenet",
    "finetune": "all",
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 1024,
    "microbatch_size": 32,
    "steps": 30,
    "steps_per_epoch": 10,
    "checkpoint_every_updates": 5,
    "optimizer": "sgd",
    "momentum": 0.9,
    "ema_decay": 0.973,
    "ema_warmup": 0.0,
    "eval_batch_size": 500,
    "n_bootstrap": 200,
    "group_diagnostics": True,
}

_RATES = {"learning_rate": [0.03, 0.1, 0.3]}

SWEEP = {"grid": [
    {"noise_multiplier": [0.602, 1.401, 0.0], **_RATES},  # epsilon 8, 1, clip-only
    {"non_private": [True], **_RATES},
]}
