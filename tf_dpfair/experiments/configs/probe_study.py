"""Study 2 redone, Stage A1: a DP linear probe on cached EfficientNet-Lite0 features.

The design, claims and statistics were fixed in advance in
docs/study2_redo/preregistration.md. Fashion-MNIST, 50k training / 10k
validation (carved by the seed, declared public for the study's choices) /
10k test images; 10% (then 2%) of the training and validation images and
20% of the test images rotated 90 degrees. EfficientNet-Lite0 with its
ImageNet weights at 64x64, the head trained on features computed once
(`cache_features`). Every arm, private or not, uses SGD with momentum 0.9;
the grid crosses epsilon 1, 2, 4, 8 and non-private with expected batches
1,024 / 4,096 / 16,384 (20 epochs each, EMA decay about 1 - 4 / T for T
updates, no warm-up) and five learning rates:

  tf-dpfair-sweep --config=probe_study --work_dir=/tmp/probe_a1
  tf-dpfair-sweep --config=probe_study --work_dir=/tmp/probe_a1_r2 \\
      --grid=rotated_fraction=0.02

The runs of a sweep share one feature cache (`<work_dir>/features`).
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
    "finetune": "head",
    "cache_features": True,
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "microbatch_size": 256,
    "epochs": 20,
    "optimizer": "sgd",
    "momentum": 0.9,
    "ema_warmup": 0.0,
    "eval_batch_size": 1000,
    # Validation (and test) scored every 5 epochs and at the end; the A1 runs'
    # test figures are not read by the analysis, so their reports keep few
    # bootstrap replicates and the dashboard makes no exact evaluation.
    "eval_every": 5,
    "dashboard_every": 0,
    "n_bootstrap": 20,
}

_ARMS = {"epsilon": [1.0, 2.0, 4.0, 8.0, float("inf")],
         "learning_rate": [0.01, 0.03, 0.1, 0.3, 1.0]}

# One part per batch size: its EMA decay is about 1 - 4 / T for its T updates.
SWEEP = {"grid": [
    {"rotated_fraction": [0.1], "batch_size": [1024], "ema_decay": [0.996], **_ARMS},
    {"rotated_fraction": [0.1], "batch_size": [4096], "ema_decay": [0.984], **_ARMS},
    {"rotated_fraction": [0.1], "batch_size": [16384], "ema_decay": [0.94], **_ARMS},
]}
