"""DP fine-tuning of ImageNet-pretrained EfficientNet-Lite0 vs the same net from scratch.

The paper's mechanism at CPU scale: on a small subset of real Fashion-MNIST
(a distribution shift from ImageNet), both start from the same architecture
and train with the same DP settings and epsilon; only the initialisation
differs. Prints test accuracy of each and the privacy statement.

Usage: python -m tf_dpfair.experiments.pretrained_vs_scratch --train_examples 3000

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

import os

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

import numpy as np  # noqa: E402

import tf_dpfair as dpf  # noqa: E402
from tf_dpfair import models  # noqa: E402
from tf_dpfair.datasets import fashion_mnist  # noqa: E402

_TRAIN = flags.DEFINE_integer("train_examples", 3000, "Training subset size.")
_TEST = flags.DEFINE_integer("test_examples", 2000, "Test subset size.")
_EPSILON = flags.DEFINE_float("epsilon", 4.0, "Target epsilon.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs.")
_BATCH = flags.DEFINE_integer("batch", 250, "Logical batch size.")
_RECIPE = flags.DEFINE_string("recipe", "head",
                              "Trainable layers of the pretrained net: head, last_blocks, all.")
_SCRATCH_RECIPE = flags.DEFINE_string(
    "scratch_recipe", "all", "Trainable layers of the randomly initialised net.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Size the network runs at.")
_LR = flags.DEFINE_float("learning_rate", 1.0, "SGD learning rate.")
_DATA_DIR = flags.DEFINE_string("data_dir", fashion_mnist.DEFAULT_ROOT,
                                "Folder with the Fashion-MNIST IDX files.")


def load_arrays(root):
    """Fashion-MNIST as ((x_train, y_train), (x_test, y_test)) in [0, 1]."""
    arrays = []
    for split in ("train", "t10k"):
        images = fashion_mnist.read_idx(
            os.path.join(root, f"{split}-images-idx3-ubyte.gz"))
        labels = fashion_mnist.read_idx(
            os.path.join(root, f"{split}-labels-idx1-ubyte.gz"))
        arrays.append(((images[..., None] / 255.0).astype(np.float32),
                       labels.astype(np.int32)))
    return arrays


def train_and_evaluate(weights_path, recipe, data, sigma):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(0)
    base = models.efficientnet_lite0_finetune(
        10, input_shape=(28, 28, 1), image_size=_IMAGE_SIZE.value,
        weights_path=weights_path, recipe=recipe, pixel_range=1.0)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=sigma,
                          expected_batch_size=_BATCH.value, microbatch_size=50)
    model = dpf.make_private(base, config)
    model.compile(optimizer=keras.optimizers.SGD(_LR.value, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    logger = dpf.callbacks.PrivacyLogger(num_examples=len(x_train), delta=1e-5,
                                         sampling="shuffle", verbose=0)
    model.fit(x_train, y_train, batch_size=_BATCH.value, epochs=_EPOCHS.value,
              callbacks=[logger], verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return accuracy, logger.statement()


def main(argv):
    del argv
    (x_train, y_train), (x_test, y_test) = load_arrays(_DATA_DIR.value)
    source = f"Fashion-MNIST from {_DATA_DIR.value}"
    n = _TRAIN.value - _TRAIN.value % _BATCH.value
    data = ((x_train[:n], y_train[:n]), (x_test[:_TEST.value], y_test[:_TEST.value]))
    steps = _EPOCHS.value * n // _BATCH.value
    sigma = dpf.privacy.accounting.calibrate_noise_multiplier(
        target_epsilon=_EPSILON.value, delta=1e-5,
        **dpf.privacy.accounting.sampling_arguments(
            sampling="shuffle", num_examples=n, batch_size=_BATCH.value,
            steps=steps))
    print(f"{source}: {n} training, {len(data[1][0])} test examples; "
          f"sigma={sigma:.3f}; pretrained trains {_RECIPE.value}, scratch "
          f"trains {_SCRATCH_RECIPE.value}")
    results = {}
    for name, weights, recipe in (("pretrained", "imagenet", _RECIPE.value),
                                  ("scratch", None, _SCRATCH_RECIPE.value)):
        results[name] = train_and_evaluate(weights, recipe, data, sigma)
        print(f"{name}: test accuracy {results[name][0]:.4f}")
    print(f"\nPrivacy (both runs): {results['pretrained'][1]}")
    for name, (accuracy, _) in results.items():
        print(f"{name:>10}: {accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
