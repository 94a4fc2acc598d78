"""Fashion-MNIST (Xiao et al. 2017) from its IDX gzip files.

Expected files in `root` (Debian's `dataset-fashion-mnist` package installs
them in `DEFAULT_ROOT`): train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (uncompressed files with
the same names minus `.gz` also work).
"""

import gzip

import numpy as np

from tf_dpfair.data import pipeline
from tf_dpfair.datasets import common
from tf_dpfair.data.groups import GroupSpec

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_HINT = ("On Debian/Ubuntu: apt-get install dataset-fashion-mnist; or download the "
         "files from https://github.com/zalandoresearch/fashion-mnist yourself.")


def read_idx(path):
    """Reads an IDX file (optionally gzip-compressed) of unsigned bytes.

    Args:
        path: file path; `.gz` files are decompressed.

    Returns:
        uint8 numpy array of the shape stored in the header.

    Raises:
        ValueError: the header is not an unsigned-byte IDX header or the size
            does not match it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        content = f.read()
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number).")
    ndim = content[3]
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
    values = np.frombuffer(content, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {values.size} values.")
    return values.reshape(shape)


def load(root=DEFAULT_ROOT, *, rotated_fraction=0.0, seed=0):
    """Loads Fashion-MNIST as in-memory `ExampleSource`s.

    Args:
        root: folder with the four IDX files.
        rotated_fraction: fraction of each split rotated by 90 degrees, as a
            rare subgroup (group "orientation"); 0 means no groups.
        seed: seed choosing the rotated images.

    Returns:
        dict "train" (60000) and "test" (10000) -> `pipeline.ExampleSource` of uint8
        `[28, 28, 1]` images and int32 class ids (`CLASS_NAMES`).

    Raises:
        FileNotFoundError: a file is missing (the message names them).
        ValueError: a file is malformed, or images and labels disagree.
    """
    return load_idx_splits(root, FILES, "Fashion-MNIST", _HINT,
                           rotated_fraction=rotated_fraction, seed=seed)


def load_idx_splits(root, files, dataset, hint, *, rotated_fraction=0.0, seed=0):
    """Loads splits stored as IDX image/label file pairs (any MNIST-like dataset).

    Args:
        root: folder with the files.
        files: dict split -> (image file name, label file name), without `.gz`.
        dataset: dataset name for error messages.
        hint: where to get the files, for error messages.
        rotated_fraction: see `load`.
        seed: seed of the rotated subgroup (split k uses `seed + k`).

    Returns:
        dict split -> `pipeline.ExampleSource`.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is malformed, or images and labels disagree.
    """
    sources = {}
    for offset, (split, (image_name, label_name)) in enumerate(files.items()):
        images = read_idx(common.find_file(root, (image_name + ".gz", image_name), dataset, hint))
        labels = read_idx(common.find_file(root, (label_name + ".gz", label_name), dataset, hint))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                    f"{dataset} {split}: images {images.shape} and labels {labels.shape} "
                    f"do not match.")
        sources[split] = from_digits(images[..., np.newaxis], labels,
                                     rotated_fraction=rotated_fraction, seed=seed + offset)
    return sources


def from_digits(images, labels, *, rotated_fraction=0.0, seed=0):
    """An in-memory `ExampleSource` of MNIST-like images.

    Args:
        images: uint8 `[N, H, W, 1]`.
        labels: integer class ids `[N]`.
        rotated_fraction: fraction rotated by 90 degrees (group
            "orientation"); 0 means no groups.
        seed: seed choosing the rotated images.

    Returns:
        `pipeline.ExampleSource`.

    Raises:
        ValueError: `rotated_fraction` is out of range.
    """
    if rotated_fraction == 0.0:
        return pipeline.ExampleSource.from_arrays(images, labels.astype(np.int32))
    images, ids = common.rotate_subgroup(images, rotated_fraction, seed)
    return pipeline.ExampleSource.from_arrays(
            images, labels.astype(np.int32), groups={"orientation": ids},
            group_spec=GroupSpec({"orientation": common.ORIENTATION_NAMES}))
