"""In-memory sources read a logical batch in one gather: the same batches as row by row."""

import numpy as np
import pytest
import tensorflow as tf

from tf_dpfair.data import pipeline
from tf_dpfair.data.source import ExampleSource


def _sources(kind, rng, n):
    groups = {"g": rng.integers(0, 3, size=n).astype(np.int32)}
    spec = {"g": ("a", "b", "c")}
    if kind == "uint8":
        images = rng.integers(0, 256, size=(n, 5, 5, 1), dtype=np.uint8)
        make = lambda: ExampleSource.from_arrays(images, rng_labels, groups=groups,
                                                 group_spec=spec)
        rng_labels = rng.integers(0, 4, size=n)
    elif kind == "multi_label":
        images = rng.uniform(size=(n, 4, 4, 3)).astype(np.float32)
        rng_labels = rng.integers(0, 2, size=(n, 3)).astype(np.float32)
        mask = rng.integers(0, 2, size=(n, 3)).astype(np.float32)
        make = lambda: ExampleSource.from_arrays(images, rng_labels, groups=groups,
                                                 group_spec=spec, label_mask=mask)
    else:  # features with 2 views
        features = rng.normal(size=(n, 2, 6)).astype(np.float32)
        rng_labels = rng.integers(0, 4, size=n)
        make = lambda: ExampleSource.from_features(features, rng_labels, groups=groups,
                                                   group_spec=spec)
    batched, row_by_row = make(), make()
    assert batched.load_many is not None  # the gathered path is the one tested
    row_by_row.load_many = None
    return batched, row_by_row


def _batches(source, **kwargs):
    data = pipeline.make_train_dataset(source, **kwargs)
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in data.dataset]


@pytest.mark.parametrize("trial", range(6))
def test_gathered_batches_equal_row_by_row_batches(trial):
    rng = np.random.default_rng(trial)
    kind = ("uint8", "multi_label", "features")[trial % 3]
    n = int(rng.integers(20, 90))
    batched, row_by_row = _sources(kind, rng, n)
    if trial >= 3:  # a subset reads through its parent's gather
        keep = np.sort(rng.choice(n, size=n // 2, replace=False))
        batched, row_by_row = batched.subset(keep), row_by_row.subset(keep)
        assert batched.load_many is not None and row_by_row.load_many is None
    kwargs = dict(expected_batch_size=int(rng.integers(4, 12)), seed=int(rng.integers(1e6)),
                  mode=("poisson", "shuffle")[trial % 2], microbatch_size=2,
                  num_replicas=int(rng.integers(1, 3)), start_step=int(rng.integers(0, 5)),
                  num_steps=7, with_groups=bool(trial % 2))
    got, want = _batches(batched, **kwargs), _batches(row_by_row, **kwargs)
    assert len(got) == len(want) == 7
    for a, b in zip(got, want):
        tf.nest.assert_same_structure(a, b)
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    # Padding rows are all zero, weight 0; real rows are not all padding.
    weights = np.concatenate([b[2] for b in got])
    assert set(np.unique(weights)) <= {0.0, 1.0} and weights.sum() > 0


def test_augmentation_keeps_the_row_by_row_path():
    rng = np.random.default_rng(9)
    batched, row_by_row = _sources("uint8", rng, 30)
    kwargs = dict(expected_batch_size=6, seed=3, microbatch_size=2, augmult=2, num_steps=3)
    for a, b in zip(_batches(batched, **kwargs), _batches(row_by_row, **kwargs)):
        np.testing.assert_array_equal(a[0], b[0])
        assert a[0].shape[1] == 2  # the views axis


@pytest.mark.parametrize("trial", range(6))
def test_gathered_evaluation_batches_equal_row_by_row_batches(trial):
    rng = np.random.default_rng(100 + trial)
    kind = ("uint8", "multi_label", "features")[trial % 3]
    n = int(rng.integers(20, 90))
    batched, row_by_row = _sources(kind, rng, n)
    if trial >= 3:
        keep = np.sort(rng.choice(n, size=n // 2, replace=False))
        batched, row_by_row = batched.subset(keep), row_by_row.subset(keep)
    replicas = int(rng.integers(1, 3))
    kwargs = dict(batch_size=2 * replicas * int(rng.integers(2, 9)), microbatch_size=2,
                  num_replicas=replicas, with_groups=bool(trial % 2))
    got = [tf.nest.map_structure(lambda t: t.numpy(), b)
           for b in pipeline.make_eval_dataset(batched, **kwargs)]
    want = [tf.nest.map_structure(lambda t: t.numpy(), b)
            for b in pipeline.make_eval_dataset(row_by_row, **kwargs)]
    assert len(got) == len(want) == -(-batched.num_examples // kwargs["batch_size"])
    for a, b in zip(got, want):
        tf.nest.assert_same_structure(a, b)
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
    # Every example once, in order, then weight-0 padding.
    weights = np.concatenate([b[2] for b in got])
    assert weights.sum() == batched.num_examples and weights[:batched.num_examples].all()
