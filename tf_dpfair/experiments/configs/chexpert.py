"""CheXpert with the paper's DP settings (Berrada et al. 2023, chest X-ray setup).

Needs CheXpert-v1.0(-small) on disk (`--data_dir`); nothing is downloaded.
Paper settings: clip norm 0.001, delta = 1/N, EMA decay 0.9999, very large
logical batches built from micro-batches, epsilon in {0.5, 1, 2, 4, 8}, and
an ImageNet-pretrained normalizer-free network fine-tuned end to end. The
paper's NFNet checkpoints are not available offline here; the pretrained
network we ship is EfficientNet-Lite0 (ImageNet, BatchNorm frozen). To use
your own pretrained NF-ResNet instead:
`--model=nf_resnet --pretrained=/path/to/weights.weights.h5`.

  tf-dpfair-train --config=chexpert --data_dir=/data/chexpert \
      --epsilon=8 --work_dir=/runs/chexpert/eps8
  tf-dpfair-sweep --config=chexpert --set=data_dir=... \
      --work_dir=/runs/chexpert_sweep   # epsilons 0.5-8 and non-private
"""

SETTINGS = {
    "dataset": "chexpert",
    # The 5 evaluation pathologies; uncertain labels count as negative.
    "dataset_options": {"uncertain": "zeros", "frontal_only": False},
    "image_size": 224,
    "model": "efficientnet_lite0",
    "model_options": {"image_size": 224},
    "pretrained": "imagenet",
    "finetune": "all",
    "clip_norm": 0.001,
    "delta": None,  # 1/N of the training split.
    "sampling": "poisson",
    "accountant": "rdp",
    "batch_size": 4096,
    "microbatch_size": 64,  # 64 per-example gradients at a time; 4096 per update.
    "augmult": 1,
    "ema_decay": 0.9999,
    "epochs": 10,
    "optimizer": "sgd",
    # Untuned here (no data): updates are means of gradients clipped to
    # 0.001, so the rate scales with 1 / clip norm. Tune it on validation data.
    "learning_rate": 1000.0,
    "momentum": 0.9,
    "non_private_optimizer": "adam",
    "non_private_learning_rate": 1e-4,
    "eval_batch_size": 256,
    "n_bootstrap": 1000,
}

SWEEP = {"grid": {"epsilon": [0.5, 1.0, 2.0, 4.0, 8.0, float("inf")], "seed": [0]}}
