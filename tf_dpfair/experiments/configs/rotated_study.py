"""The PAIR explorable's subgroup study on real Fashion-MNIST, at CPU scale.

"Can a model be differentially private and fair?" trains on digits of which
a small share is rotated 90 degrees; the rotated group loses accuracy first
as epsilon falls and as its share shrinks. Here: Fashion-MNIST with 0, 5, 10
or 20% of the training images rotated, a test split with a fixed 20% rotated
(so the rotated group is always measured), epsilon 1, 4 and non-private, and
10k or all 60k training images. Reduced to fit about 20 minutes on 2 CPU
cores: a small CNN, one seed, 2 epochs on 10k images and 1 epoch on 60k
(only the 5% and 20% shares), evaluation on the 10k test images.

  tf-dpfair-sweep --config=rotated_study --work_dir=/tmp/rotated_study
  tf-dpfair-report --sweep_dir=/tmp/rotated_study
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "test_rotated_fraction": 0.2,
    "model": "tiny_cnn",
    "clip_norm": 1.0,
    # Fixed delta below 1/N for both training-set sizes, so epsilons compare.
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 500,
    "microbatch_size": 50,
    "epochs": 2,
    "steps_per_epoch": 10,  # Evaluate and checkpoint every 10 updates.
    "optimizer": "sgd",
    "learning_rate": 2.0,
    "momentum": 0.5,
    # Unclipped gradients: plain SGD at this rate diverges; Adam is the usual
    # non-private recipe.
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 0.003,
    "ema_decay": 0.99,
    "eval_batch_size": 1000,
    "n_bootstrap": 200,
}

EPSILONS = [1.0, 4.0, float("inf")]
SWEEP = {
    "grid": [
        # 10k images, 2 epochs (40 updates): every rotated share.
        {"train_examples": [10000], "epochs": [2], "rotated_fraction": [0.0, 0.05, 0.1, 0.2],
         "epsilon": EPSILONS},
        # All 60k images, 1 epoch (120 updates) to fit the time: the rare shares.
        {"train_examples": [60000], "epochs": [1], "rotated_fraction": [0.05, 0.2],
         "epsilon": EPSILONS},
    ],
}
