"""The `make demo` job: private and non-private training on Fashion-MNIST, with reports.

`run_demo` trains the `configs/demo.py` settings at one epsilon and without
privacy (through `sweep_lib`, so a rerun resumes or skips finished runs) and
writes the sweep report (`report_lib`). `run` is the older single private
run, kept for scripts that call it.

Logical batches are drawn by true Poisson sampling (`tf_dpfair.data.pipeline`), so the
privacy statement uses the Poisson accountant, and the pipeline's sampling
spec is handed to the accountant so the two cannot disagree.
"""

import math
import os
import time

import keras
import numpy as np

import tf_dpfair as dpf
from tf_dpfair.data import pipeline
from tf_dpfair.datasets import common
from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.experiments import report_lib
from tf_dpfair.experiments import sweep_lib
from tf_dpfair.experiments.configs import demo as demo_config


def synthetic_sources(num_train, seed=0):
    """A small 10-class stand-in for Fashion-MNIST: smooth prototypes + noise.

    Returns:
      dict "train", "test" -> `pipeline.ExampleSource` of [28, 28, 1] images.
    """
    rng = np.random.default_rng(seed)
    # Smooth class prototypes (7x7 upsampled to 28x28): spatial structure a
    # small CNN can pick up, like real garments.
    coarse = rng.uniform(0, 1, size=(10, 7, 7, 1))
    prototypes = coarse.repeat(4, axis=1).repeat(4, axis=2)

    def make(n):
        y = rng.integers(0, 10, size=n).astype(np.int32)
        x = prototypes[y] + rng.normal(0, 0.3, size=(n, 28, 28, 1))
        return pipeline.ExampleSource.from_arrays(
            np.clip(x, 0, 1).astype(np.float32), y)

    return {"train": make(num_train), "test": make(num_train // 5)}


def load_sources(data_dir, synthetic_examples, seed):
    """Fashion-MNIST from `data_dir`, else synthetic data; and a description."""
    try:
        return fashion_mnist.load(data_dir), f"Fashion-MNIST from {data_dir}"
    except FileNotFoundError as error:
        print(f"{error}\nInstall Debian's dataset-fashion-mnist package for the "
              f"real data. Using {synthetic_examples} synthetic examples instead.")
        return synthetic_sources(synthetic_examples, seed), "synthetic"


def small_cnn(num_classes=10):
    """Conv16-GroupNorm-MaxPool-Conv32-MaxPool-Dense for 28x28x1 images."""
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
        data_dir=fashion_mnist.DEFAULT_ROOT, synthetic_examples=6000):
    """Trains privately and returns a dict of the results."""
    keras.utils.set_random_seed(seed)
    sources, description = load_sources(data_dir, synthetic_examples, seed)
    train = pipeline.make_train_dataset(
        sources["train"], expected_batch_size=batch_size,
        seed=int.from_bytes(os.urandom(7), "big"),  # secret sampling seed
        mode="poisson", microbatch_size=microbatch_size)
    spec = train.spec
    steps = epochs * spec.steps_per_epoch
    sigma = dpf.privacy.accounting.calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta,
        **spec.accountant_kwargs(steps))
    print(f"Data: {description}, {spec.num_examples} training examples. Noise "
          f"multiplier {sigma:.3f} for epsilon {target_epsilon} over {steps} "
          f"updates.")
    config = dpf.DPConfig(l2_norm_clip=l2_norm_clip, noise_multiplier=sigma,
                          expected_batch_size=batch_size,
                          microbatch_size=microbatch_size, ema_decay=0.99)
    model = dpf.make_private(small_cnn(), config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    logger = dpf.callbacks.PrivacyLogger(delta=delta, sampling_spec=spec)
    start = time.time()
    model.fit(train.dataset, epochs=epochs, steps_per_epoch=spec.steps_per_epoch,
              callbacks=[logger], verbose=2)
    test = pipeline.make_eval_dataset(sources["test"], batch_size=1000,
                                  with_groups=False)
    _, accuracy = model.evaluate(test, verbose=0)
    with model.ema_weights():
        _, ema_accuracy = model.evaluate(test, verbose=0)
    return {"source": description, "test_accuracy": accuracy,
            "ema_test_accuracy": ema_accuracy,
            "epsilon": logger.statement().epsilon,
            "delta": logger.statement().delta,
            "statement": str(logger.statement()),
            "seconds": time.time() - start}


def run_demo(work_dir, *, epsilon=3.0, data_dir=fashion_mnist.DEFAULT_ROOT, overrides=None,
             verbose=2):
    """Trains privately and non-privately, then writes the Markdown report.

    Args:
        work_dir: output folder: one subfolder per run (TensorBoard logs,
            reports, result.json) and `report/`.
        epsilon: epsilon of the private run.
        data_dir: Fashion-MNIST folder; without it, synthetic CheXpert-shaped
            data is used (and the demo says so).
        overrides: more settings for both runs (tests make them tiny).
        verbose: `fit` verbosity.

    Returns:
        `(results table, report paths, data description)`.
    """
    base = {"data_dir": data_dir}
    try:
        image_file = fashion_mnist.FILES["train"][0]
        common.find_file(data_dir, (image_file + ".gz", image_file), "Fashion-MNIST")
    except FileNotFoundError as error:
        print(f"{error}\nInstall Debian's dataset-fashion-mnist package for the real data. "
              f"Using synthetic CheXpert-shaped data instead.")
        base.update(demo_config.SYNTHETIC)
    base.update(overrides or {})
    table = sweep_lib.run_sweep(work_dir, config="demo", base=base,
                                grid={"epsilon": [epsilon, math.inf]}, verbose=verbose)
    paths = report_lib.write_sweep_report(work_dir, os.path.join(work_dir, "report"))
    return table, paths, table["data.description"].iloc[0]
