"""Tests of sampling, padding, augmult and the element structure (tf_dpfair.data.pipeline)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_dpfair.data import augment
from tf_dpfair.data import pipeline as data
from tf_dpfair.privacy import sampling
from tf_dpfair.data import sampler

N, B = 500, 50  # q = 0.1
Q = B / N
STEPS = 2000
SEED = 1234


def _images(num, size=8, channels=1, seed=0):
    return np.random.default_rng(seed).integers(1, 255, (num, size, size, channels),
                                                dtype=np.uint8)


def _source(num=N, size=8, with_groups=True):
    groups = {"sex": np.arange(num) % 2, "age": np.arange(num) % 4} if with_groups else None
    spec = {"sex": ("male", "female"), "age": ("a", "b", "c", "d")} if with_groups else None
    return data.ExampleSource.from_arrays(_images(num, size), np.arange(num) % 10,
                                          groups=groups, group_spec=spec)


@pytest.fixture(scope="module")
def poisson_draws():
    """Indices and masks of STEPS Poisson updates (computed once, ~2 s)."""
    spec = sampling.make_sampling_spec("poisson", N, B)
    steps = sampler.index_dataset(spec, SEED, num_steps=STEPS).batch(STEPS)
    _, indices, valid = next(iter(steps))
    return spec, indices.numpy(), valid.numpy()


# Poisson sampling.

def test_poisson_batch_sizes_match_binomial(poisson_draws):
    spec, _, valid = poisson_draws
    sizes = valid.sum(axis=1)
    # Binomial(500, 0.1): mean 50, variance 45. Standard errors over 2000 draws:
    # mean 0.15, variance ~45 * sqrt(2 / 1999) = 1.42; tolerances are 4 of them.
    assert abs(sizes.mean() - N * Q) < 0.6
    assert abs(sizes.var(ddof=1) - N * Q * (1 - Q)) < 5.7
    # No overflow at this cap: the realised size is the drawn size.
    drawn = sampler.drawn_batch_sizes(spec, SEED, num_steps=STEPS)
    np.testing.assert_array_equal(sizes, drawn)


def test_poisson_inclusion_rate_is_q(poisson_draws):
    _, indices, valid = poisson_draws
    counts = np.bincount(indices[valid], minlength=N)
    # Each count is Binomial(2000, 0.1): sd 13.4; allow 5 sd for the worst of 500.
    assert np.abs(counts / STEPS - Q).max() < 5 * math.sqrt(Q * (1 - Q) / STEPS)
    assert abs(counts.mean() / STEPS - Q) < 0.002
    # Independent across updates: the spread of counts is binomial (var 180).
    assert abs(counts.var() / (STEPS * Q * (1 - Q)) - 1) < 0.2


def test_poisson_rows_are_distinct_and_real_rows_come_first(poisson_draws):
    spec, indices, valid = poisson_draws
    for row, mask in zip(indices[:50], valid[:50]):
        count = mask.sum()
        assert mask[:count].all() and not mask[count:].any()
        assert len(np.unique(row[:count])) == count
        assert (row[count:] == 0).all()
    assert indices.shape[1] == spec.padded_batch_size


def test_padding_rows_have_weight_zero_and_hold_zeros():
    dataset, spec = data.make_train_dataset(_source(), expected_batch_size=B, seed=SEED,
                                            microbatch_size=8, num_steps=3)
    drawn = sampler.drawn_batch_sizes(spec, SEED, num_steps=3)
    for (x, y, w), size in zip(dataset, drawn):
        assert x.shape == (spec.padded_batch_size, 8, 8, 1)
        assert y.shape == (spec.padded_batch_size,)
        w = w.numpy()
        assert set(np.unique(w)) == {0.0, 1.0}
        assert w.sum() == size
        assert not np.any(x.numpy()[w == 0]) and not np.any(y.numpy()[w == 0])
        assert np.all(x.numpy()[w == 1].max(axis=(1, 2, 3)) > 0)


def test_pipeline_is_reproducible_and_resumable():
    source = _source()

    def batches(seed, start_step, num_steps):
        dataset, _ = data.make_train_dataset(source, expected_batch_size=B, seed=seed,
                                             augmult=2, start_step=start_step,
                                             num_steps=num_steps)
        return [tuple(t.numpy() for t in batch) for batch in dataset]

    full = batches(SEED, 0, 5)
    again = batches(SEED, 0, 5)
    resumed = batches(SEED, 3, 2)
    other = batches(SEED + 1, 0, 1)
    for a, b in zip(full, again):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    for a, b in zip(full[3:], resumed):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(full[0][2], other[0][2]) or not np.array_equal(
            full[0][0], other[0][0])


def test_overflow_drop_keeps_a_random_subset_of_the_drawn_examples():
    small = sampling.make_sampling_spec("poisson", 100, 10, max_overflow_probability=0.6)
    large = sampling.make_sampling_spec("poisson", 100, 10)
    drawn = sampler.drawn_batch_sizes(small, SEED, num_steps=20)
    assert (drawn > small.padded_batch_size).any()
    kept = list(sampler.index_dataset(small, SEED, num_steps=20))
    full = list(sampler.index_dataset(large, SEED, num_steps=20))
    for (_, idx_small, valid_small), (_, idx_large, valid_large), n in zip(kept, full, drawn):
        kept_set = set(idx_small.numpy()[valid_small.numpy()])
        drawn_set = set(idx_large.numpy()[valid_large.numpy()])
        assert len(drawn_set) == n
        assert len(kept_set) == min(n, small.padded_batch_size)
        assert kept_set <= drawn_set


def test_overflow_raise_names_the_update():
    spec = sampling.make_sampling_spec("poisson", 100, 10, max_overflow_probability=0.6,
                                       on_overflow="raise")
    with pytest.raises(tf.errors.InvalidArgumentError, match="Poisson sampling drew"):
        for _ in sampler.index_dataset(spec, SEED, num_steps=20):
            pass


def test_replicas_get_equal_shares_of_real_rows():
    spec = sampling.make_sampling_spec("poisson", N, B, microbatch_size=4, num_replicas=2)
    share = spec.padded_batch_size // 2
    for _, _, valid in sampler.index_dataset(spec, SEED, num_steps=5):
        valid = valid.numpy()
        first, second = valid[:share], valid[share:]
        assert abs(int(first.sum()) - int(second.sum())) <= 1
        for half in (first, second):
            assert half[:half.sum()].all()


# The sampling spec.

def test_spec_cap_and_overflow_probability_exact():
    spec = sampling.make_sampling_spec("poisson", 100, 10, microbatch_size=4)
    # P(Binomial(101, 0.1) > cap), summed exactly term by term.
    def tail(cap):
        return sum(math.comb(101, k) * 0.1 ** k * 0.9 ** (101 - k) for k in range(cap + 1, 102))
    assert spec.padded_batch_size % 4 == 0
    assert tail(spec.padded_batch_size) <= sampling.DEFAULT_MAX_OVERFLOW_PROBABILITY
    assert tail(spec.padded_batch_size - 4) > sampling.DEFAULT_MAX_OVERFLOW_PROBABILITY
    assert spec.overflow_probability == pytest.approx(tail(spec.padded_batch_size), rel=1e-6)


def test_spec_tells_the_accountant_the_mode():
    poisson = sampling.make_sampling_spec("poisson", N, B)
    assert poisson.accountant_kwargs(100) == {
            "sampling_probability": Q, "steps": 100, "sampling": "poisson"}
    assert poisson.steps_per_epoch == 10
    assert "poisson" in poisson.statement()
    assert poisson.delta_overhead(1000, 2.0) == pytest.approx(
            math.exp(2.0) * 1000 * poisson.overflow_probability, rel=1e-6)


def test_shuffle_spec_says_no_amplification():
    spec = sampling.make_sampling_spec("shuffle", N, B)
    assert spec.accounting_sampling == "shuffle"
    assert spec.accountant_kwargs(10)["sampling"] == "shuffle"
    assert "does not apply" in spec.statement()
    assert spec.overflow_probability == 0.0 and spec.delta_overhead(10, 1.0) == 0.0
    accepted = sampling.make_sampling_spec("shuffle", N, B, accept_shuffle_as_poisson=True)
    assert accepted.accept_shuffle_as_poisson
    assert accepted.accountant_kwargs(10)["sampling"] == "poisson"
    assert "heuristic" in accepted.statement()


def test_shuffle_mode_covers_each_example_once_per_epoch():
    spec = sampling.make_sampling_spec("shuffle", 100, 30, microbatch_size=4)
    assert (spec.steps_per_epoch, spec.padded_batch_size) == (3, 32)
    epochs = []
    for _, indices, valid in sampler.index_dataset(spec, SEED, num_steps=6):
        assert valid.numpy().sum() == 30
        epochs.append(indices.numpy()[valid.numpy()])
    for epoch in (np.concatenate(epochs[:3]), np.concatenate(epochs[3:])):
        assert len(np.unique(epoch)) == 90
    assert not np.array_equal(epochs[0], epochs[3])


@pytest.mark.parametrize("kwargs, message", [
        ({"mode": "uniform"}, "mode must be one of"),
        ({"expected_batch_size": 600}, "exceeds num_examples"),
        ({"expected_batch_size": 0}, "expected_batch_size must be a positive integer"),
        ({"microbatch_size": 0}, "microbatch_size must be a positive integer"),
        ({"max_overflow_probability": 0.0}, "max_overflow_probability must be in"),
        ({"on_overflow": "ignore"}, "on_overflow must be one of"),
        ({"accept_shuffle_as_poisson": True}, "only makes sense with mode='shuffle'"),
])
def test_sampling_spec_errors(kwargs, message):
    args = {"mode": "poisson", "num_examples": N, "expected_batch_size": B, **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling.make_sampling_spec(args.pop("mode"), args.pop("num_examples"),
                                    args.pop("expected_batch_size"), **args)


def test_pipeline_argument_errors():
    spec = sampling.make_sampling_spec("poisson", N, B)
    with pytest.raises(ValueError, match="seed must be an integer"):
        sampler.index_dataset(spec, -1)
    with pytest.raises(ValueError, match="start_step must be an integer >= 0"):
        sampler.index_dataset(spec, 0, start_step=-1)
    with pytest.raises(ValueError, match="num_steps must be None or an integer"):
        sampler.index_dataset(spec, 0, num_steps=-2)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        spec.accountant_kwargs(-1)
    with pytest.raises(ValueError, match="source must be an ExampleSource"):
        data.make_train_dataset(np.zeros((4, 8, 8, 1)), expected_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="augmult must be an integer >= 1"):
        data.make_train_dataset(_source(), expected_batch_size=B, seed=0, augmult=0)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
        data.make_eval_dataset(_source(), batch_size=10, microbatch_size=4)


# Augmentation multiplicity.

def test_augmult_shape_views_differ_and_k1_is_plain():
    source = _source(size=16)
    dataset, spec = data.make_train_dataset(source, expected_batch_size=B, seed=SEED,
                                            augmult=4, num_steps=1)
    x, _, w = next(iter(dataset))
    assert x.shape == (spec.padded_batch_size, 4, 16, 16, 1)
    real = x.numpy()[w.numpy() == 1]
    differs = [not np.array_equal(views[0], views[k]) for views in real for k in (1, 2, 3)]
    assert np.mean(differs) > 0.8
    plain, _ = data.make_train_dataset(source, expected_batch_size=B, seed=SEED, num_steps=1)
    indices = next(iter(sampler.index_dataset(spec, SEED, num_steps=1)))[1].numpy()
    x1, _, w1 = next(iter(plain))
    assert x1.shape == (spec.padded_batch_size, 16, 16, 1)
    images = _images(N, 16)[indices] / 255.0
    np.testing.assert_allclose(x1.numpy()[w1.numpy() == 1], images[w1.numpy() == 1], rtol=1e-6)


def test_views_are_seeded_per_step_and_example():
    source = _source(size=16)
    dataset, spec = data.make_train_dataset(source, expected_batch_size=B, seed=SEED,
                                            augmult=2, start_step=7, num_steps=1)
    x, _, _ = next(iter(dataset))
    _, indices, _ = next(iter(sampler.index_dataset(spec, SEED, start_step=7, num_steps=1)))
    index = indices[0]
    seed = sampler.fold_in(sampler.fold_in(
            sampler.stream_seed(SEED, sampler.AUGMENT_STREAM), 7), index)
    image = tf.constant(_images(N, 16)[index.numpy()] / 255.0, tf.float32)
    expected = augment.augment_views(image, seed, 2, augment.random_crop_flip)
    np.testing.assert_allclose(x[0].numpy(), expected.numpy(), rtol=1e-6)


def test_random_crop_flip_is_a_crop_of_the_reflect_padded_image():
    image = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    candidates = [padded[i:i + 5, j:j + 6] for i in range(5) for j in range(5)]
    candidates += [c[:, ::-1] for c in candidates]
    seen = set()
    for s in range(40):
        out = augment.random_crop_flip(tf.constant(image), tf.constant([s, 9], tf.int64),
                                       padding=2).numpy()
        matches = [k for k, c in enumerate(candidates) if np.array_equal(out, c)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 10


def test_augment_errors():
    image = tf.zeros([8, 8, 1])
    seed = tf.constant([0, 0], tf.int64)
    with pytest.raises(ValueError, match="padding must be in"):
        augment.random_crop_flip(image, seed, padding=8)
    with pytest.raises(ValueError, match="must keep the image shape"):
        augment.augment_views(image, seed, 2, lambda im, s: im[:4])
    with pytest.raises(ValueError, match="static shape"):
        augment.augment_views(tf.zeros([8, 8]), seed, 2, augment.random_crop_flip)


# Elements, groups and evaluation batches.

def test_eval_dataset_has_every_example_once_with_groups():
    source = _source(num=37)
    batches = list(data.make_eval_dataset(source, batch_size=16))
    assert len(batches) == 3
    weights = np.concatenate([w.numpy() for _, _, w in batches])
    labels = np.concatenate([y["label"].numpy() for _, y, _ in batches])
    sex = np.concatenate([y["groups"]["sex"].numpy() for _, y, _ in batches])
    assert weights.sum() == 37 and not weights[37:].any()
    np.testing.assert_array_equal(labels[:37], np.arange(37) % 10)
    np.testing.assert_array_equal(sex[:37], np.arange(37) % 2)
    assert batches[0][0].shape == (16, 8, 8, 1) and batches[0][0].dtype == tf.float32


def test_training_batches_carry_groups_only_on_request():
    source = _source()
    plain, _ = data.make_train_dataset(source, expected_batch_size=B, seed=0, num_steps=1)
    grouped, _ = data.make_train_dataset(source, expected_batch_size=B, seed=0, num_steps=1,
                                         with_groups=True)
    _, y, _ = next(iter(plain))
    _, y_grouped, _ = next(iter(grouped))
    assert isinstance(y, tf.Tensor)
    assert set(y_grouped) == {"label", "groups"} and set(y_grouped["groups"]) == {"sex", "age"}


def test_to_keras_batch_with_label_mask():
    elements = {"image": tf.zeros([2, 4, 4, 1], tf.uint8), "label": tf.ones([2, 3]),
                "label_mask": tf.constant([[1., 0., 1.], [1., 1., 1.]]),
                "groups": {"sex": tf.constant([0, 1])}}
    x, y, w = data.to_keras_batch(elements, with_groups=False)
    assert set(y) == {"label", "label_mask"}
    np.testing.assert_array_equal(w.numpy(), [1.0, 1.0])
    _, y, _ = data.to_keras_batch(elements)
    assert set(y) == {"label", "label_mask", "groups"}
    with pytest.raises(ValueError, match="lack the keys"):
        data.to_keras_batch({"image": elements["image"]})


def test_group_id_errors():
    images, labels = _images(4), np.arange(4)
    spec = {"sex": ("male", "female")}
    with pytest.raises(ValueError, match=r"must be in \[0, 2\).*e.g. 2 at example 3"):
        data.ExampleSource.from_arrays(images, labels, groups={"sex": [0, 1, 0, 2]},
                                       group_spec=spec)
    with pytest.raises(ValueError, match="do not match the GroupSpec"):
        data.ExampleSource.from_arrays(images, labels, groups={}, group_spec=spec)
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        data.ExampleSource.from_arrays(images, labels, groups={"sex": [0, 1]}, group_spec=spec)
    with pytest.raises(ValueError, match="must be integers"):
        data.ExampleSource.from_arrays(images, labels, groups={"sex": [0.5, 1, 0, 1]},
                                       group_spec=spec)
    with pytest.raises(ValueError, match="has no group names"):
        data.GroupSpec({"sex": ()})
    with pytest.raises(ValueError, match="repeats a group name"):
        data.GroupSpec({"sex": ("a", "a")})
    with pytest.raises(KeyError, match="Unknown group attribute"):
        data.GroupSpec(spec).names("race")


def test_group_ids_are_checked_at_run_time_for_index_sources():
    def load(index):
        return {"image": tf.zeros([4, 4, 1], tf.uint8), "label": tf.cast(index, tf.int32),
                "groups": {"sex": tf.cast(index, tf.int32)}}

    source = data.ExampleSource(5, load, {"sex": ("male", "female")})
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        list(data.make_eval_dataset(source, batch_size=5))


def test_element_structure_errors():
    def image_of(shape, dtype=tf.uint8):
        return lambda index: {"image": tf.zeros(shape, dtype), "label": tf.constant(0),
                              "groups": {}}

    with pytest.raises(ValueError, match=r"static \[H, W, C\] shape"):
        data.ExampleSource(3, image_of([4, 4]))
    with pytest.raises(ValueError, match="uint8 or float32"):
        data.ExampleSource(3, image_of([4, 4, 1], tf.int32))
    with pytest.raises(ValueError, match="Unknown element keys"):
        data.ExampleSource(3, lambda i: {"image": tf.zeros([4, 4, 1]), "label": 0, "id": i,
                                         "groups": {}})
    with pytest.raises(ValueError, match="int32 scalars"):
        data.ExampleSource(3, lambda i: {"image": tf.zeros([4, 4, 1]), "label": 0,
                                         "groups": {"sex": i}}, {"sex": ("m", "f")})
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        data.ExampleSource(0, image_of([4, 4, 1]))
    with pytest.raises(ValueError, match="Labels of shape"):
        data.ExampleSource.from_arrays(_images(3), [0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="label_mask must have the shape"):
        data.ExampleSource.from_arrays(_images(3), np.ones((3, 2)), label_mask=np.ones((3, 3)))
