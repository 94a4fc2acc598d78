"""Tests for NF-ResNet, WRN-GroupNorm and the small CNN: scale, shapes, saving."""

import math

import numpy as np
import pytest
import tensorflow as tf
import keras

from tf_dpfair.models import (
    SkipGain,
    WSConv2D,
    check_batchnorm,
    nf_resnet,
    small_cnn,
    wide_resnet,
)


def _block_output_stds(model, x):
    names = [layer.name for layer in model.layers if layer.name.endswith("_add")]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return [float(np.std(o)) for o in probe(x)]


@pytest.mark.parametrize("depth", [8, 20, 38])
def test_nf_resnet_activation_scale_is_stable_with_depth(depth):
    keras.utils.set_random_seed(0)
    model = nf_resnet((16, 16, 3), 10, depth=depth, width=1)
    x = np.random.default_rng(depth).normal(size=(8, 16, 16, 3)).astype("float32")
    stds = _block_output_stds(model, x)
    assert len(stds) == 3 * (depth - 2) // 6
    # SkipInit: at initialisation every block output keeps the input's scale.
    assert all(0.5 * x.std() < s < 2.0 * x.std() for s in stds), stds


def test_nf_resnet_variance_grows_as_alpha_beta_predict():
    # With the skip gains at 1, each block adds alpha^2 to the variance and a
    # transition block resets it to 1 + alpha^2: std_k ~ sqrt(1 + k alpha^2).
    keras.utils.set_random_seed(1)
    depth, alpha = 38, 0.2
    model = nf_resnet((16, 16, 3), 10, depth=depth, width=2, alpha=alpha)
    for layer in model.layers:
        if isinstance(layer, SkipGain):
            layer.skip_gain.assign(1.0)
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    stds = _block_output_stds(model, x)
    per_stage = (depth - 2) // 6
    predicted = [math.sqrt(1 + (i % per_stage + 1) * alpha ** 2) for i in range(len(stds))]
    ratios = np.array(stds) / np.array(predicted)
    assert np.all((ratios > 0.8) & (ratios < 1.2)), ratios
    assert stds[per_stage - 1] > stds[0]  # it does grow within a stage


def test_ws_conv_standardises_each_output_channel():
    layer = WSConv2D(5, 3)
    layer.build((None, 8, 8, 4))
    layer.kernel.assign(np.random.default_rng(0).normal(2.0, 3.0, size=(3, 3, 4, 5)))
    layer.gain.assign([1.0, 2.0, 1.0, 1.0, 0.5])
    w = np.asarray(layer.standardized_kernel())
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    # Unit variance over the fan-in, times 1/sqrt(fan_in): sum of squares = gain^2.
    np.testing.assert_allclose((w ** 2).sum(axis=(0, 1, 2)), [1, 4, 1, 1, 0.25], rtol=1e-4)


def test_nf_resnet_has_no_batchnorm_and_zero_head():
    model = nf_resnet((8, 8, 3), 4, depth=8)
    assert check_batchnorm(model) == []
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), 0.0)
    assert model(np.ones((2, 8, 8, 3), "float32")).shape == (2, 4)


def test_nf_resnet_per_example_gradients_are_finite():
    model = nf_resnet((8, 8, 1), 3, depth=8)
    variables = [v.value for v in model.trainable_variables]
    x = tf.random.stateless_normal((3, 8, 8, 1), seed=(1, 2))
    y = tf.constant([0, 1, 2])

    def one(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            logits = model(xi[None], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(yi[None], logits, from_logits=True)
        return tape.gradient(loss, variables)

    grads = tf.vectorized_map(one, (x, y))
    assert all(g.shape[0] == 3 and np.all(np.isfinite(g)) for g in grads)


def test_wrn_16_4_shape_and_groupnorm():
    model = wide_resnet((32, 32, 3), 10)
    assert model.name == "wrn16_4_gn"
    assert len([layer for layer in model.layers if layer.name.endswith("_add")]) == 6
    assert check_batchnorm(model) == []
    gns = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(gns) == 13 and all(layer.groups == 16 for layer in gns)
    # WRN-16-4 has about 2.75M parameters.
    assert 2.6e6 < model.count_params() < 2.9e6
    assert model.output.shape == (None, 10)


def test_small_cnn_shape():
    model = small_cnn((28, 28, 1), 10)
    assert model(np.zeros((2, 28, 28, 1), "float32")).shape == (2, 10)
    assert check_batchnorm(model) == []


@pytest.mark.parametrize("build", [
    lambda: nf_resnet((8, 8, 3), 5, depth=8, width=1, dropout_rate=0.1),
    lambda: wide_resnet((8, 8, 3), 5, depth=10, width=1),
    lambda: small_cnn((8, 8, 1), 5),
])
def test_keras_save_load_round_trip(build, tmp_path):
    keras.utils.set_random_seed(3)
    model = build()
    # Non-zero heads and skip gains, so the round trip is not trivially equal.
    for layer in model.layers:
        if isinstance(layer, SkipGain):
            layer.skip_gain.assign(0.7)
    head = model.get_layer("predictions")
    head.kernel.assign(np.random.default_rng(0).normal(size=head.kernel.shape))
    x = np.random.default_rng(1).normal(size=(2,) + model.input.shape[1:]).astype("float32")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]


@pytest.mark.parametrize("call, message", [
    (lambda: nf_resnet((8, 8, 3), 2, depth=9), "depth must be 6 \\* n \\+ 2"),
    (lambda: nf_resnet((8, 8, 3), 2, width=0), "must be positive"),
    (lambda: nf_resnet((8, 8, 3), 2, alpha=0), "alpha must be positive"),
    (lambda: wide_resnet((8, 8, 3), 2, depth=16.0), "depth must be 6 \\* n \\+ 4"),
    (lambda: wide_resnet((8, 8, 3), 2, groups=3), "groups must divide 16"),
    (lambda: small_cnn((8, 8, 1), 2, filters=(30, 64)), "filters must be two positive multiples"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
