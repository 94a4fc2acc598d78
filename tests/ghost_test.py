"""Ghost clipping gives the vectorized path's clipped sums on mixed models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import tf_dpfair as dpf
from tf_dpfair import ghost


def mixed_model(seed=0):
    """Every kind of layer ghost clipping handles, directly or per layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="valid")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(6, 3, dilation_rate=2, padding="same",
                            activation="relu", use_bias=False)(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.Conv2D(4, 1, activation="tanh")(h)  # generic: tanh
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    outputs = keras.layers.Dense(5)(h)
    return keras.Model(inputs, outputs)


def one_update(clipping, x, y, weights, augmult=1, microbatch=4, strategy=None):
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        config = dpf.DPConfig(l2_norm_clip=0.3, noise_multiplier=0.0,
                              expected_batch_size=len(y), augmult=augmult,
                              microbatch_size=microbatch, clipping=clipping)
        model = dpf.make_private(mixed_model(), config)
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, sample_weight=weights, batch_size=len(y), epochs=1,
              shuffle=False, verbose=0)
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables)]


def data(n, augmult=1, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, augmult, 12, 12, 3) if augmult > 1 else (n, 12, 12, 3)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    weights = rng.choice([0.0, 0.5, 1.0], size=n).astype(np.float32)
    return x, y, weights


def assert_same_update(a, b):
    for ga, gb in zip(a, b):
        scale = max(np.abs(gb).max(), 1e-12)
        np.testing.assert_allclose(ga / scale, gb / scale, rtol=1e-5, atol=1e-5)


def test_plan_covers_every_weight_and_picks_direct_forms():
    taps = ghost.plan(mixed_model())
    kinds = {layer.name.split("_")[0]: kind for layer, kind in taps}
    assert len(taps) == 9
    assert [k for _, k in taps].count("direct") == 5  # 3 convs, 2 dense
    assert kinds["depthwise"] == "generic"


@pytest.mark.parametrize("augmult, microbatch", [(1, 4), (1, 10), (3, 4)])
def test_ghost_equals_vectorized_with_masks_augmult_and_accumulation(
        augmult, microbatch):
    x, y, weights = data(10, augmult)
    fast = one_update("ghost", x, y, weights, augmult, microbatch)
    slow = one_update("vectorized", x, y, weights, augmult, microbatch)
    assert_same_update(fast, slow)
    assert max(np.abs(g).max() for g in slow) > 1e-4  # a real update


def test_ghost_equals_vectorized_on_two_replicas():
    x, y, weights = data(8)
    fast = one_update("ghost", x, y, weights,
                      strategy=conftest.mirrored_strategy())
    slow = one_update("vectorized", x, y, weights)
    assert_same_update(fast, slow)


def test_unsupported_models_refuse_ghost_and_train_with_auto():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    x = np.ones((4, 3), np.float32)
    y = np.zeros(4, np.int32)
    for clipping in ("auto", "ghost"):
        config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                              expected_batch_size=4, clipping=clipping)
        model = dpf.make_private(Sub(), config)
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        if clipping == "ghost":
            with pytest.raises(ValueError, match="needs a functional model"):
                model.fit(x, y, batch_size=4, verbose=0)
        else:
            model.fit(x, y, batch_size=4, verbose=0)
            assert model.update_count == 1


def test_shared_layer_is_not_planned():
    inputs = keras.Input((3,))
    dense = keras.layers.Dense(3)
    outputs = dense(dense(inputs))
    assert ghost.plan(keras.Model(inputs, outputs)) is None


def test_clipping_mode_is_validated():
    with pytest.raises(ValueError, match="clipping must be one of"):
        dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                     expected_batch_size=4, clipping="fast")


def test_embedding_and_layer_norm_match_vectorized():
    updates = {}
    rng = np.random.default_rng(1)
    tokens, y = rng.integers(0, 20, (8, 5)), rng.integers(0, 3, 8)
    for clipping in ("vectorized", "ghost"):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(20, 4)(inputs)
        h = keras.layers.LayerNormalization()(h)
        outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
        config = dpf.DPConfig(l2_norm_clip=0.1, noise_multiplier=0.0,
                              expected_batch_size=8, microbatch_size=4,
                              clipping=clipping)
        model = dpf.make_private(keras.Model(inputs, outputs), config)
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.fit(tokens, y, batch_size=8, verbose=0)
        updates[clipping] = [b - v.numpy() for b, v in
                             zip(before, model.trainable_variables)]
    assert_same_update(updates["ghost"], updates["vectorized"])
