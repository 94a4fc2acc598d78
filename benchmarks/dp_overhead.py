"""Times DP training against plain Keras training of the same model, in one run.

Model: 32x32x3 input, Conv32-GroupNorm-MaxPool-Conv64-GlobalAvgPool-Dense10;
2048 random examples, logical batch 256, noise multiplier 1, clip norm 1.
The first (tracing) epoch is excluded; the figure is the ratio of median
epoch times, DP / non-private.

Usage: python benchmarks/dp_overhead.py [--epochs 4] [--microbatch 64]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_dpfair as dpf  # noqa: E402


def build_model(seed=0):
    """The benchmark CNN."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=8)(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs)


class EpochTimer(keras.callbacks.Callback):
    """Records wall time of each epoch."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def time_fit(model, x, y, batch_size, epochs):
    """Median epoch time of `fit`, first (tracing) epoch excluded."""
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    timer = EpochTimer()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
              callbacks=[timer], shuffle=False)
    return statistics.median(timer.times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--microbatch", type=int, default=64)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=args.examples)

    plain = time_fit(build_model(), x, y, args.batch, args.epochs)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                          expected_batch_size=args.batch,
                          microbatch_size=args.microbatch)
    private = time_fit(dpf.make_private(build_model(), config), x, y,
                       args.batch, args.epochs)
    print(f"non-private: {plain:.3f} s/epoch ({args.examples / plain:.0f} ex/s)")
    print(f"DP (microbatch {args.microbatch}): {private:.3f} s/epoch "
          f"({args.examples / private:.0f} ex/s)")
    print(f"DP / non-private time ratio: {private / plain:.2f}x")


if __name__ == "__main__":
    main()
