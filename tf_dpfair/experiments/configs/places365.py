"""Places-365 (via TFDS) fine-tuned from ImageNet weights with the paper's DP settings.

Needs the TFDS `places365` files (`--data_dir`); nothing is downloaded.
Paper settings: clip norm 1, delta 8e-7, EMA, augmentation multiplicity,
very large logical batches from micro-batches, epsilon up to 8, an
ImageNet-pretrained network fine-tuned (here EfficientNet-Lite0, the
ImageNet checkpoint available offline; the paper used an NFNet).

  tf-dpfair-train --config=places365 --data_dir=/data/tfds \
      --epsilon=8 --work_dir=/runs/places365/eps8
"""

SETTINGS = {
    "dataset": "places365",
    "dataset_options": {"test_split": "validation"},
    "image_size": 224,
    "model": "efficientnet_lite0",
    "model_options": {"image_size": 224},
    "pretrained": "imagenet",
    "finetune": "all",
    "clip_norm": 1.0,
    "delta": 8e-7,
    "sampling": "poisson",
    "batch_size": 16384,
    "microbatch_size": 32,
    "augmult": 4,
    "ema_decay": 0.9999,
    "epochs": 10,
    "optimizer": "sgd",
    "learning_rate": 4.0,  # Untuned here (no data).
    "momentum": 0.0,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 1e-4,
    "eval_batch_size": 256,
    "n_bootstrap": 200,
}

SWEEP = {"grid": {"epsilon": [1.0, 4.0, 8.0, float("inf")], "seed": [0]}}
