"""The `make demo` job: private training of a small CNN on Fashion-MNIST."""

import gzip
import os
import time

import keras
import numpy as np

import tf_dpfair as dpf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    """Reads one gzip IDX file (the MNIST file format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data(directory=FASHION_MNIST_DIR, synthetic_examples=6000, seed=0):
    """Returns ((x_train, y_train), (x_test, y_test), description).

    Real Fashion-MNIST when `directory` holds its four IDX files; otherwise a
    small synthetic 10-class set of 28x28 images, and the description says so.
    """
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    paths = [os.path.join(directory, n) for n in names]
    if all(os.path.exists(p) for p in paths):
        x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
        x_train = (x_train[..., None] / 255.0).astype(np.float32)
        x_test = (x_test[..., None] / 255.0).astype(np.float32)
        return ((x_train, y_train.astype(np.int32)),
                (x_test, y_test.astype(np.int32)),
                f"Fashion-MNIST from {directory}")
    print(f"Fashion-MNIST not found in {directory} (expected {', '.join(names)}); "
          f"install Debian's dataset-fashion-mnist package for the real data. "
          f"Using {synthetic_examples} synthetic examples instead.")
    rng = np.random.default_rng(seed)
    # Smooth class prototypes (7x7 upsampled to 28x28): spatial structure a
    # small CNN can pick up, like real garments.
    coarse = rng.uniform(0, 1, size=(10, 7, 7, 1))
    prototypes = coarse.repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)

    def make(n):
        y = rng.integers(0, 10, size=n).astype(np.int32)
        x = prototypes[y] + rng.normal(0, 0.3, size=(n, 28, 28, 1))
        return np.clip(x, 0, 1).astype(np.float32), y

    return make(synthetic_examples), make(synthetic_examples // 5), "synthetic"


def small_cnn(num_classes=10):
    """Conv16-GroupNorm-MaxPool-Conv32-GlobalAvgPool-Dense for 28x28x1 images."""
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(num_classes)(h)
    return keras.Model(inputs, outputs)


def run(target_epsilon=3.0, delta=1e-5, epochs=3, batch_size=1000,
        microbatch_size=100, l2_norm_clip=1.0, learning_rate=2.0, seed=0,
        data_dir=FASHION_MNIST_DIR, synthetic_examples=6000):
    """Trains privately and returns a dict of the results.

    Logical batches are shuffled fixed-size batches, so the privacy statement
    uses the "shuffle" accounting (no amplification by subsampling).
    """
    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test), source = load_data(
        data_dir, synthetic_examples=synthetic_examples, seed=seed)
    n = len(x_train)
    steps = epochs * (n // batch_size)
    sigma = dpf.accounting.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sampling_probability=batch_size / n,
        steps=steps, delta=delta, sampling="shuffle")
    print(f"Data: {source}, {n} training examples. Noise multiplier "
          f"{sigma:.3f} for epsilon {target_epsilon} over {steps} updates.")
    config = dpf.DPConfig(l2_norm_clip=l2_norm_clip, noise_multiplier=sigma,
                          expected_batch_size=batch_size,
                          microbatch_size=microbatch_size, ema_decay=0.99)
    model = dpf.make_private(small_cnn(), config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    logger = dpf.callbacks.PrivacyLogger(num_examples=n, delta=delta,
                                         sampling="shuffle")
    start = time.time()
    # drop_remainder keeps every epoch a partition into full batches, which
    # is what the "shuffle" accounting assumes.
    model.fit(x_train[: (n // batch_size) * batch_size],
              y_train[: (n // batch_size) * batch_size],
              batch_size=batch_size, epochs=epochs, callbacks=[logger],
              verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    with model.ema_weights():
        _, ema_accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {"source": source, "test_accuracy": accuracy,
            "ema_test_accuracy": ema_accuracy,
            "epsilon": logger.statement().epsilon, "delta": delta,
            "statement": str(logger.statement()),
            "seconds": time.time() - start}
