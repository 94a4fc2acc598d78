"""Tests for the BatchNorm validator, freezer and GroupNorm replacement."""

import re

import numpy as np
import pytest
import tensorflow as tf
import keras

from tf_dpfair.models import (
    batchnorm_report,
    check_batchnorm,
    freeze_batchnorm,
    replace_batchnorm,
    set_trainable,
    training_batchnorm_layers,
)


def bn_functional():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv0")(inputs)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.ReLU(name="relu0")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    return keras.Model(inputs, outputs, name="bn_functional")


def bn_sequential():
    keras.utils.set_random_seed(1)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(8, name="d0"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Dense(2, name="d1"),
    ], name="bn_sequential")


def bn_nested():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense"),
                              keras.layers.BatchNormalization(name="inner_bn")], name="inner")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="out")(inner(inputs))
    return keras.Model(inputs, outputs, name="outer")


def test_validator_lists_every_batchnorm_with_its_behaviour():
    model = bn_nested()
    findings = check_batchnorm(model)
    assert [(f.path, f.status) for f in findings] == [("outer/inner/inner_bn", "training-mode")]
    assert "statistics of the current batch" in findings[0].message
    assert "freeze_batchnorm(model) or replace_batchnorm(model)" in findings[0].message
    report = batchnorm_report(model)
    assert report.startswith("outer: 1 of 1 BatchNormalization layers would mix examples")
    assert check_batchnorm(keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])) == []


@pytest.mark.parametrize("make", [bn_functional, bn_sequential, bn_nested])
def test_freeze_makes_model_pass(make):
    model = make()
    assert training_batchnorm_layers(model)
    assert freeze_batchnorm(model) is model
    assert training_batchnorm_layers(model) == []
    assert {f.status for f in check_batchnorm(model)} == {"frozen"}
    assert "fit for DP training" in batchnorm_report(model)


@pytest.mark.parametrize("make", [bn_functional, bn_sequential, bn_nested])
def test_replace_keeps_other_weights(make):
    model = make()
    new = replace_batchnorm(model, group_norm_groups=2)
    assert type(new) is type(model)
    assert check_batchnorm(new) == [] and training_batchnorm_layers(new) == []
    old_layers = {layer.name: layer for layer in _leaves(model)}
    for layer in _leaves(new):
        old = old_layers[layer.name]
        if isinstance(old, keras.layers.BatchNormalization):
            assert isinstance(layer, keras.layers.GroupNormalization)
            assert layer.groups == 2
            np.testing.assert_array_equal(layer.gamma.numpy(), old.gamma.numpy())
            np.testing.assert_array_equal(layer.beta.numpy(), old.beta.numpy())
            continue
        assert layer is not old
        for a, b in zip(layer.get_weights(), old.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    # The original is untouched.
    assert training_batchnorm_layers(model)


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def test_replace_unaffected_outputs_match():
    model = bn_functional()
    new = replace_batchnorm(model, group_norm_groups=32)
    assert new.get_layer("bn0").groups == 4  # lowered to a divisor of 4 channels
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype("float32")
    before = keras.Model(model.input, model.get_layer("conv0").output)(x)
    after = keras.Model(new.input, new.get_layer("conv0").output)(x)
    np.testing.assert_array_equal(before, after)
    assert new(x).shape == (3, 3)


def test_replace_errors():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="needs a functional or Sequential model"):
        replace_batchnorm(Subclassed(name="sub"))
    with pytest.raises(ValueError, match="group_norm_groups must be a positive int"):
        replace_batchnorm(bn_functional(), group_norm_groups=0)
    with pytest.raises(ValueError, match="is not built"):
        replace_batchnorm(keras.Sequential([keras.layers.Dense(2)], name="unbuilt"))


def _loss(model, x, y):
    logits = model(x, training=True)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _one_at_a_time(model, x, y):
    grads = []
    variables = [v.value for v in model.trainable_variables]
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = _loss(model, x[i:i + 1], y[i:i + 1])[0]
        grads.append(tape.gradient(loss, variables))
    return [np.stack(g) for g in zip(*grads)]


def _jacobian(model, x, y):
    """Per-example gradients from one batched forward pass."""
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        losses = _loss(model, x, y)
    return [j.numpy() for j in tape.jacobian(losses, variables)]


def _vectorized(model, x, y):
    variables = [v.value for v in model.trainable_variables]

    def one(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            loss = _loss(model, xi[None], yi[None])[0]
        return tape.gradient(loss, variables)

    return [g.numpy() for g in tf.vectorized_map(one, (x, y))]


def test_per_example_gradients_frozen_equal_unfrozen_mix():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 6, 6, 2)).astype("float32"))
    y = tf.constant([0, 1, 2, 1])
    model = bn_functional()
    # Non-trivial moving statistics, so inference mode is not the identity.
    bn = model.get_layer("bn0")
    bn.moving_mean.assign([0.1, -0.2, 0.3, 0.0])
    bn.moving_variance.assign([0.5, 2.0, 1.5, 1.0])

    unfrozen = _jacobian(model, x, y)
    reference = _one_at_a_time(model, x, y)
    assert max(np.abs(a - b).max() for a, b in zip(unfrozen, reference)) > 1e-2

    freeze_batchnorm(model)
    reference = _one_at_a_time(model, x, y)
    for batched in (_jacobian(model, x, y), _vectorized(model, x, y)):
        for a, b in zip(batched, reference, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


class Holder(keras.layers.Layer):
    """A custom layer holding a Dense and a BatchNorm as attributes."""

    def __init__(self, prefix, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name=f"{prefix}_dense")
        self.bn = keras.layers.BatchNormalization(name=f"{prefix}_bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


class ListHolder(keras.layers.Layer):
    """A custom layer holding its layers in a list, the deepest one in a nested model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = [keras.layers.Dense(4, name="list_dense"),
                      keras.Sequential([keras.layers.BatchNormalization(name="deep_bn")],
                                       name="deep_seq")]

    def call(self, x):
        for step in self.steps:
            x = step(x)
        return x


def bn_everywhere():
    """BatchNorm at the top level, in a nested model, in custom layers and a wrapper."""
    keras.utils.set_random_seed(2)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="inner_bn")],
                             name="inner")
    inputs = keras.Input((4,))
    h = keras.layers.BatchNormalization(name="top_bn")(inputs)
    h = inner(h)
    h = Holder("block", name="block")(h)
    h = keras.layers.Reshape((2, 2))(h)
    h = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="td_bn"), name="td")(h)
    h = keras.layers.Flatten()(h)
    h = ListHolder(name="stack")(h)
    outputs = keras.layers.Dense(2, name="out")(h)
    return keras.Model(inputs, outputs, name="m")


EVERY_BN = ["m/top_bn", "m/inner/inner_bn", "m/block/block_bn", "m/td/td_bn",
            "m/stack/deep_seq/deep_bn"]


def test_batchnorm_is_found_in_custom_layers_wrappers_and_nested_models():
    model = bn_everywhere()
    findings = check_batchnorm(model)
    assert [f.path for f in findings] == EVERY_BN
    assert {f.status for f in findings} == {"training-mode"}
    assert [layer.name for layer in training_batchnorm_layers(model)] == [
        p.rsplit("/", 1)[1] for p in EVERY_BN]
    assert batchnorm_report(model).startswith(
        "m: 5 of 5 BatchNormalization layers would mix examples")


def test_freeze_reaches_batchnorm_held_by_custom_layers_and_wrappers():
    model = bn_everywhere()
    freeze_batchnorm(model)
    assert training_batchnorm_layers(model) == []
    assert [f.status for f in check_batchnorm(model)] == ["frozen"] * 5
    # Frozen means inference mode: batch statistics no longer enter the output.
    x = np.random.default_rng(0).normal(size=(4, 4)).astype("float32")
    np.testing.assert_array_equal(model(x, training=True), model(x, training=False))


@pytest.mark.parametrize("make, bad, holder", [
    (lambda i: Holder("block", name="block")(i), "m/block/block_bn", "'block' (Holder)"),
    (lambda i: keras.layers.Flatten()(keras.layers.TimeDistributed(
        keras.layers.BatchNormalization(name="td_bn"), name="td")(
            keras.layers.Reshape((2, 2))(i))), "m/td/td_bn", "'td' (TimeDistributed)"),
    (lambda i: keras.Sequential([keras.Input((4,)), Holder("deep", name="holder")],
                                name="seq")(i),
     "m/seq/holder/deep_bn", "'holder' (Holder)"),
])
def test_replace_refuses_batchnorm_it_cannot_reach(make, bad, holder):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(make(inputs)), name="m")
    with pytest.raises(ValueError, match=(
            rf"replace_batchnorm cannot convert BatchNormalization '{bad}': "
            rf"'{bad}' is held by {re.escape(holder)}.*freeze_batchnorm\(model\)")):
        replace_batchnorm(model)
    # Once frozen it is still refused: replace_batchnorm promises no BatchNorm left.
    freeze_batchnorm(model)
    with pytest.raises(ValueError, match="cannot convert"):
        replace_batchnorm(model)


def test_set_trainable_keeps_batchnorm_in_custom_layers_frozen():
    model = bn_everywhere()
    # A frozen start, as when fine-tuning: unfreezing a holder unfreezes
    # every layer it holds (Keras copies a changed flag down).
    model.trainable = False
    set_trainable(model, "all")
    block = model.get_layer("block")
    assert block.dense.trainable and not block.bn.trainable
    assert not model.get_layer("td").layer.trainable
    assert training_batchnorm_layers(model) == []
    model.trainable = False
    set_trainable(model, "all", train_batchnorm=True)
    assert len(training_batchnorm_layers(model)) == 5
