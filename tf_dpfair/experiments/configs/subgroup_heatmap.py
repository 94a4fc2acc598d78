"""The PAIR explorable's subgroup heatmap on real Fashion-MNIST, at CPU scale.

A grid of training-set size x epsilon x share of rotated training images
(3 x 4 x 4 = 48 runs): how accurate is the rotated group, and how far does
it trail the upright one, in every cell? The test split is the same in
every run (all 10k test images, a fixed 20% of them rotated), so the report
can also rank each test image by the smallest epsilon at which the sweep's
models still classify it (`tf_dpfair/experiments/explorable_lib.py`).

Each run is cheap: an MLP (one hidden layer of 64 units, the embedding the
report projects), 200 updates of Poisson
batches of expected size 250 whatever the training-set size (so that runs
cost the same and a larger set means fewer passes over the data and a
smaller sampling rate), test scores every 50 updates, 50 bootstrap
replicates. Delta 1e-5 is below 1/N for every size, so epsilons compare.

  tf-dpfair-sweep --config=subgroup_heatmap --work_dir=/tmp/subgroup_heatmap
  tf-dpfair-report --sweep_dir=/tmp/subgroup_heatmap --out_dir=/tmp/heatmap_report
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "test_rotated_fraction": 0.2,
    "model": "mlp",
    "model_options": {"hidden": [64]},
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 250,
    "microbatch_size": 125,
    "steps": 200,
    "steps_per_epoch": 50,
    "optimizer": "sgd",
    "learning_rate": 1.0,
    "momentum": 0.5,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 0.003,
    "ema_decay": 0.99,
    "eval_batch_size": 1000,
    "n_bootstrap": 50,
}

SWEEP = {
    "grid": {
        "train_examples": [5000, 20000, 60000],
        "epsilon": [1.0, 2.0, 8.0, float("inf")],
        "rotated_fraction": [0.0, 0.05, 0.1, 0.2],
    },
}
