"""The paper's claim at CPU scale: DP fine-tuning of an ImageNet-pretrained network.

EfficientNet-Lite0 with its real ImageNet weights, run at 64x64 on
Fashion-MNIST (grayscale clothing: a distribution shift from ImageNet),
fine-tuned as a linear probe (the new head only; BatchNorm frozen) at
epsilon 1, 8 and non-private. The designated subgroup is the rotated one:
10% of the training images and 20% of the test images are rotated 90
degrees. The report compares accuracy private vs non-private and the
disparity of each private model with the non-private checkpoint of matched
accuracy/AUC, with raw and with EMA weights. Reduced to fit about 15-20
minutes on 2 CPU cores: 10k training and 2k test images, 3 epochs, linear
probe only; `pretrained_finetune_study` trains every layer.

  tf-dpfair-sweep --config=pretrained_study --work_dir=/tmp/pretrained_study
  tf-dpfair-report --sweep_dir=/tmp/pretrained_study
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
    "finetune": "head",
    "clip_norm": 1.0,
    "delta": 1e-5,
    "sampling": "poisson",
    "batch_size": 500,
    "microbatch_size": 50,
    "epochs": 3,
    "steps_per_epoch": 10,
    "optimizer": "sgd",
    "learning_rate": 2.0,
    "momentum": 0.5,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 0.003,
    "ema_decay": 0.99,
    "eval_batch_size": 500,
    "n_bootstrap": 200,
}

SWEEP = {"grid": {"epsilon": [1.0, 8.0, float("inf")]}}
