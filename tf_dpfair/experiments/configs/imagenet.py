"""ImageNet (ILSVRC 2012, via TFDS with a manual download) with the paper's DP settings.

Needs the TFDS `imagenet2012` manual files (`--data_dir`, and
`--dataset_options={"manual_dir": "..."}`); nothing is downloaded. Paper
settings: clip norm 1, delta 8e-7, EMA, augmentation multiplicity, very large
logical batches from micro-batches, epsilon up to 8. The paper fine-tunes an
NFNet pre-trained on a larger private dataset (JFT), which is not available:
by default this trains an NF-ResNet from scratch; pass your own pretrained
weights with `--pretrained=/path/to/model.weights.h5`.

  tf-dpfair-train --config=imagenet --data_dir=/data/tfds \
      --dataset_options='{"manual_dir": "/data/imagenet"}' --epsilon=8 \
      --work_dir=/runs/imagenet/eps8
"""

SETTINGS = {
    "dataset": "imagenet2012",
    "dataset_options": {"test_split": "validation"},
    "image_size": 224,
    "model": "nf_resnet",
    "model_options": {"depth": 50, "width": 2, "stem_stride": 4},
    "pretrained": "",
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
    "eval_batch_size": 256,
    "n_bootstrap": 200,
}

SWEEP = {"grid": {"epsilon": [1.0, 4.0, 8.0, float("inf")], "seed": [0]}}
