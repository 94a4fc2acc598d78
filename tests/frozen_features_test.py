"""Cached frozen-backbone features: the same DP run as the uncached one, faster."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import augment
from tf_dpfair.data import pipeline
from tf_dpfair.data.source import ExampleSource
from tf_dpfair.models import set_trainable
from tf_dpfair.training import frozen_features

N, CLASSES, BATCH = 48, 3, 16


def probe_model(seed=0, dropout=0.2, batchnorm=True):
    """A conv backbone (frozen BatchNorm) with a dropout and a Dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(CLASSES, kernel_initializer="glorot_uniform")(x)
    model = keras.Model(inputs, outputs)
    if batchnorm:  # moving statistics that are not the identity
        bn = model.layers[2]
        bn.moving_mean.assign(np.full(4, 0.3, np.float32))
        bn.moving_variance.assign(np.full(4, 2.0, np.float32))
    return set_trainable(model, "head")


def image_source(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=N)
    groups = {"g": rng.integers(0, 2, size=N).astype(np.int32)}
    return ExampleSource.from_arrays(images, labels, groups=groups,
                                     group_spec={"g": ("a", "b")})


def private(model, augmult=1):
    config = dpf.DPConfig(l2_norm_clip=0.7, noise_multiplier=0.9, expected_batch_size=BATCH,
                          microbatch_size=8, augmult=augmult, seed=1234)
    wrapped = dpf.make_private(model, config)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.5),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return wrapped


def fit(model, source, steps, augmult=1):
    data = pipeline.make_train_dataset(source, expected_batch_size=BATCH, seed=99,
                                       microbatch_size=8, augmult=augmult, num_steps=steps)
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)


def head_weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def test_split_gives_the_model_back_and_a_frozen_backbone():
    model = probe_model()
    backbone, head = frozen_features.split_frozen_backbone(model)
    x = np.random.default_rng(1).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(head(backbone(x)), model(x), atol=1e-6)
    assert not backbone.trainable_weights
    # The dropout just before the Dense layer goes with the head.
    assert [type(layer).__name__ for layer in head.layers[1:]] == ["Dropout", "Dense"]
    assert {id(v) for v in head.trainable_weights} == {id(v) for v in model.trainable_weights}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cached_run_equals_the_uncached_run(dropout):
    """Three noisy Poisson updates: same weights at 1e-5, same ledger and statement."""
    source = image_source()
    uncached = private(probe_model(dropout=dropout))
    fit(uncached, source, steps=3)
    backbone, head = frozen_features.split_frozen_backbone(probe_model(dropout=dropout))
    features = frozen_features.cache_features(backbone, source, verbose=0)
    assert features.num_examples == N and features.features
    cached = private(head)
    fit(cached, features, steps=3)
    for got, want in zip(head_weights(cached), head_weights(uncached), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(head_weights(cached)[0]).sum() > 0  # it trained
    assert cached.update_count == uncached.update_count == 3
    want = uncached.privacy_ledger.statement(1e-5)
    got = cached.privacy_ledger.statement(1e-5)
    assert got.epsilon == pytest.approx(want.epsilon, rel=1e-12)
    assert str(got) == str(want)


def test_cached_views_equal_the_uncached_views_of_update_zero():
    """K = 2 random crop/flip views: the cache's views are update 0's, exactly."""
    source = image_source(3)
    uncached = private(probe_model(dropout=0.0), augmult=2)
    fit(uncached, source, steps=1, augmult=2)
    backbone, head = frozen_features.split_frozen_backbone(probe_model(dropout=0.0))
    features = frozen_features.cache_features(backbone, source, views=2, seed=99, verbose=0)
    assert features.element_spec["image"].shape == (2, 4)
    cached = private(head, augmult=2)
    fit(cached, features, steps=1)
    for got, want in zip(head_weights(cached), head_weights(uncached), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cached_features_are_the_backbone_of_each_view():
    source = image_source(4)
    backbone, _ = frozen_features.split_frozen_backbone(probe_model())
    features = frozen_features.cache_features(backbone, source, views=3, seed=5,
                                              batch_size=7, verbose=0)
    got = features.elements().batch(N).get_single_element()
    root = frozen_features.view_seed(5)
    for index in (0, 11, N - 1):
        image = tf.cast(source.load(index)["image"], tf.float32) / 255.0
        views = augment.augment_views(image, dpf.data.sampler.fold_in(root, index), 3,
                                      augment.random_crop_flip)
        np.testing.assert_allclose(got["image"][index], backbone(views, training=False),
                                   atol=1e-6)
    want = source.elements().batch(N).get_single_element()
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["groups"]["g"], want["groups"]["g"])


def test_save_and_load_keep_everything_and_check_the_key(tmp_path):
    source = image_source(2)
    backbone, _ = frozen_features.split_frozen_backbone(probe_model())
    features = frozen_features.cache_features(backbone, source, verbose=0)
    path = str(tmp_path / "cache" / "train.npz")
    frozen_features.save_features(path, features, "key-1")
    assert frozen_features.load_features(path, "key-2") is None
    assert frozen_features.load_features(str(tmp_path / "none.npz"), "key-1") is None
    loaded = frozen_features.load_features(path, "key-1")
    a = features.elements().batch(N).get_single_element()
    b = loaded.elements().batch(N).get_single_element()
    for name in ("image", "label"):
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a["groups"]["g"], b["groups"]["g"])
    assert loaded.group_spec.names("g") == ("a", "b")


def test_weights_digest_follows_the_weights():
    model = probe_model()
    before = frozen_features.weights_digest(model)
    assert frozen_features.weights_digest(probe_model()) == before
    model.layers[1].kernel.assign(model.layers[1].kernel + 1.0)
    assert frozen_features.weights_digest(model) != before


def test_refusals_say_why():
    # No trainable weights.
    model = probe_model()
    model.trainable = False
    with pytest.raises(ValueError, match="no trainable weights"):
        frozen_features.split_frozen_backbone(model)
    # Trainable weights inside the backbone (finetune='all').
    model = set_trainable(probe_model(), "all")
    with pytest.raises(ValueError, match="no frozen backbone"):
        frozen_features.split_frozen_backbone(model)
    # A trained layer before a frozen layer with two inputs.
    inputs = keras.Input((4,))
    trained = keras.layers.Dense(4)(inputs)
    frozen = keras.layers.Dense(4, trainable=False)(inputs)
    model = keras.Model(inputs, keras.layers.Add()([trained, frozen]))
    with pytest.raises(ValueError, match="not all in a chain"):
        frozen_features.split_frozen_backbone(model)
    # A dropout inside the backbone: the features depend on the training flag.
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Dropout(0.5)(keras.layers.Flatten()(inputs))
    x = keras.layers.Dense(6, trainable=False)(x)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(x))
    backbone, _ = frozen_features.split_frozen_backbone(model)
    with pytest.raises(ValueError, match="differs between training and inference"):
        frozen_features.cache_features(backbone, image_source(), verbose=0)
    with pytest.raises(ValueError, match="views"):
        frozen_features.cache_features(backbone, image_source(), views=0)
    with pytest.raises(ValueError, match="features must be"):
        ExampleSource.from_features(np.zeros(4), np.zeros(4, int))


def test_the_cut_may_lie_inside_a_nested_model():
    """As `models.efficientnet_lite0_finetune` builds it: an adapter, then a model."""
    inner = probe_model(dropout=0.0)
    inputs = keras.Input((4, 4, 1))
    outer = keras.Model(inputs, inner(keras.layers.UpSampling2D(2)(inputs)))
    backbone, head = frozen_features.split_frozen_backbone(outer)
    assert backbone.outputs[0].shape == (None, 4)  # pooled conv features, not images
    assert not backbone.trainable_weights
    x = np.random.default_rng(2).uniform(size=(3, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(head(backbone(x)), outer(x), atol=1e-6)
    # Directly after the input, too.
    inputs = keras.Input((8, 8, 1))
    direct = keras.Model(inputs, probe_model(dropout=0.0)(inputs))
    backbone, head = frozen_features.split_frozen_backbone(direct)
    assert backbone.outputs[0].shape == (None, 4)
