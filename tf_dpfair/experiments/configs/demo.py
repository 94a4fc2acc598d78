"""`make demo`: a private and a non-private run on Fashion-MNIST in a few minutes.

A small CNN on the 60k Fashion-MNIST images, of which 10% are rotated 90 degrees
(a rare group; 20% of the test images are rotated so it is measured), 2
epochs at epsilon 3 (delta 1e-5) and without privacy; the private run also
records per-group training diagnostics.
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "rotated_fraction": 0.1,
    "test_rotated_fraction": 0.2,
    "model": "tiny_cnn",
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 1000,
    "microbatch_size": 100,
    "epochs": 2,
    "steps_per_epoch": 10,
    "optimizer": "sgd",
    "learning_rate": 2.0,
    "momentum": 0.5,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 0.003,
    "ema_decay": 0.99,
    "eval_batch_size": 1000,
    "n_bootstrap": 200,
    # Per-group clipping and gradient norms of the private run, in the report and
    # dashboards (training data, outside the DP guarantee).
    "group_diagnostics": True,
}

# Without Fashion-MNIST: CheXpert-shaped synthetic data (groups sex and age).
SYNTHETIC = {"dataset": "synthetic", "train_examples": 4000, "test_examples": 2000,
             "rotated_fraction": 0.0, "test_rotated_fraction": None,
             "batch_size": 500, "microbatch_size": 50, "epochs": 3, "learning_rate": 0.5}

SWEEP = {"grid": {"epsilon": [3.0, float("inf")]}}
