"""A model with frozen BatchNorm trains under DP exactly as example-by-example math says."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair import models


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    # Non-trivial moving statistics, as a pretrained model would have.
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 4).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 4).astype(np.float32))
    return model


def one_at_a_time(model, x, y, clip, batch):
    """Sum of clipped gradients, each example on its own, divided by the batch."""
    variables = model.trainable_variables
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    total = [np.zeros(v.shape) for v in variables]
    for xi, yi in zip(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(yi[None], model(xi[None], training=True))
        grads = [g.numpy() for g in tape.gradient(loss, variables)]
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        total = [t + g * min(1.0, clip / norm) for t, g in zip(total, grads)]
    return [t / batch for t in total]


def test_training_batchnorm_is_refused_until_frozen():
    model = models.freeze_batchnorm(bn_model())
    assert not models.training_batchnorm_layers(model)
    assert models.training_batchnorm_layers(bn_model())


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_frozen_batchnorm_dp_update_equals_example_by_example(clipping):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    base = models.freeze_batchnorm(bn_model())
    want = one_at_a_time(base, x, y, clip=0.5, batch=8)
    before = [v.numpy().copy() for v in base.trainable_variables]
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=0.0,
                          expected_batch_size=8, microbatch_size=4,
                          clipping=clipping)
    model = dpf.make_private(base, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for b, v, w in zip(before, model.trainable_variables, want):
        np.testing.assert_allclose(b - v.numpy(), w, rtol=1e-4, atol=1e-6)
