"""Ghost clipping gives the vectorized path's clipped sums on mixed models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import ghost_fixtures
from ghost_fixtures import assert_same_update
import tf_dpfair as dpf
from tf_dpfair.dpsgd import ghost
from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import dense_conv
from tf_dpfair import models


def mixed_model(seed=0):
    """Image layers of every kind ghost clipping handles, directly or per layer."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=4)(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="valid")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(6, 3, dilation_rate=2, padding="same",
                            activation="sigmoid", use_bias=False)(h)
    h = keras.layers.LayerNormalization()(h)
    h = models.nfnet.WSConv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(4, 1, activation="tanh")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    # 2x2 positions, 36 inputs, 32 outputs: the norm trick is the cheaper.
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.Conv2D(4, 1, activation="elu")(h)  # generic: elu
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    outputs = keras.layers.Dense(5)(h)
    return keras.Model(inputs, outputs)


def sequence_model(seed=0):
    """Token layers: Embedding, Conv1D, Dense on 3-D input, EinsumDense
    (Dense-like, and general)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(20, 4)(inputs)
    h = keras.layers.Conv1D(6, 3, padding="same", activation="relu")(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.Conv1D(5, 2, strides=2, padding="valid")(h)
    h = keras.layers.Dense(7, activation="tanh")(h)  # 3-D input: 3 positions
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(3, 4),
                                 bias_axes="d", activation="relu")(h)  # as Dense
    h = keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 2))(h)  # generic
    h = keras.layers.Reshape((3, 4))(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3)(h)
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):
    """A model without a functional graph: ghost clipping cannot tap it."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def one_update(clipping, x, y, weights, augmult=1, microbatch=4, strategy=None,
               build=mixed_model):
    return ghost_fixtures.one_update(clipping, x, y, weights, build, augmult,
                                     microbatch, strategy)


def data(n, augmult=1, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, augmult, 12, 12, 3) if augmult > 1 else (n, 12, 12, 3)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    weights = rng.choice([0.0, 0.5, 1.0], size=n).astype(np.float32)
    return x, y, weights


def test_plan_covers_every_weight_and_picks_closed_forms():
    taps = ghost.plan(mixed_model())
    kinds = [tap.kind for tap in taps]
    assert len(taps) == 12
    assert kinds == ["linear", "normalization", "linear", "depthwise", "linear",
                     "normalization", "linear", "linear", "linear", "generic",
                     "linear", "linear"]
    sequence_kinds = [tap.kind for tap in ghost.plan(sequence_model())]
    assert sequence_kinds == ["embedding", "linear", "normalization", "linear",
                              "linear", "linear", "generic", "linear"]


def test_norm_trick_is_picked_only_for_few_positions():
    inputs = keras.Input((32, 32, 32))
    h = keras.layers.Conv2D(32, 3, padding="same")(inputs)    # 1024 positions
    h = keras.layers.MaxPooling2D(16)(h)
    h = keras.layers.Conv2D(256, 3, padding="same")(h)        # 4 positions
    h = keras.layers.Dense(512)(keras.layers.Flatten()(h))    # 1 position
    taps = ghost.plan(keras.Model(inputs, h))
    methods = [ghost.make_clipper(tap, 32).method for tap in taps]
    assert methods[0] in ("patches", "per_example_conv", "folded_conv")
    assert methods[1:] == ["norm_trick", "norm_trick"]


@pytest.mark.parametrize("augmult, microbatch", [(1, 4), (1, 10), (3, 4)])
def test_ghost_equals_vectorized_with_masks_augmult_and_accumulation(
        augmult, microbatch):
    x, y, weights = data(10, augmult)
    fast = one_update("ghost", x, y, weights, augmult, microbatch)
    slow = one_update("vectorized", x, y, weights, augmult, microbatch)
    assert_same_update(fast, slow)
    assert min(np.abs(g).max() for g in slow) > 0.1  # every weight moved


@pytest.mark.parametrize("augmult, microbatch", [(1, 4), (2, 3)])
def test_sequence_layers_equal_vectorized(augmult, microbatch):
    rng = np.random.default_rng(3)
    shape = (10, augmult, 6) if augmult > 1 else (10, 6)
    tokens = rng.integers(0, 20, shape)
    tokens[:, ..., 1] = tokens[:, ..., 0]  # repeated tokens share a table row
    y = rng.integers(0, 3, 10)
    weights = rng.choice([0.0, 0.5, 1.0], size=10).astype(np.float32)
    fast = one_update("ghost", tokens, y, weights, augmult, microbatch,
                      build=sequence_model)
    slow = one_update("vectorized", tokens, y, weights, augmult, microbatch,
                      build=sequence_model)
    assert_same_update(fast, slow)
    assert min(np.abs(g).max() for g in slow) > 0.1


def force_methods(monkeypatch, *methods):
    """Makes every layer use the first of `methods` it has."""
    real = cost.cheapest

    def forced(estimates):
        return next((m for m in methods if m in estimates), None) or real(estimates)

    monkeypatch.setattr(cost, "cheapest", forced)


@pytest.mark.parametrize("methods, keep_bytes", [
    (("patches", "folded_kernel_grad"), 0),  # sums recomputed from reweighted output gradients
    (("per_example_conv", "shifted"), 2**28),  # sums from kept gradients
    (("per_example_conv", "shifted"), 0),      # sums recomputed
    (("folded_conv", "folded_correlation"), 2**28),
    (("folded_conv",), 0),
    (("norm_trick",), 2**28),                  # wherever the layer allows it
], ids=lambda v: "+".join(v) if isinstance(v, tuple) else f"keep{v}")
def test_every_way_to_the_norms_and_sums_equals_vectorized(
        monkeypatch, methods, keep_bytes):
    if "folded_conv" in methods and not dense_conv.grouped_kernel_gradient_supported():
        pytest.skip("TensorFlow's kernels here take no groups; "
                    "test_folded_conv_where_onednn_is_forced runs this case")
    force_methods(monkeypatch, *methods)
    monkeypatch.setattr(ghost, "KEEP_PER_EXAMPLE_BYTES", keep_bytes)
    x, y, weights = data(10, augmult=2)
    fast = one_update("ghost", x, y, weights, augmult=2)
    slow = one_update("vectorized", x, y, weights, augmult=2)
    assert_same_update(fast, slow)
    rng = np.random.default_rng(3)
    tokens, labels = rng.integers(0, 20, (10, 6)), rng.integers(0, 3, 10)
    fast = one_update("ghost", tokens, labels, weights, build=sequence_model)
    slow = one_update("vectorized", tokens, labels, weights, build=sequence_model)
    assert_same_update(fast, slow)


def test_folded_conv_where_onednn_is_forced():
    """The grouped kernel gradient exists only with oneDNN (or cuDNN): where
    TensorFlow runs without it, the folded_conv cases above run in a process
    that forces oneDNN on, so every machine tests that method; and here the
    method is not offered, so "auto" never picks it."""
    if dense_conv.grouped_kernel_gradient_supported():
        pytest.skip("the folded_conv cases ran in this process")
    inputs = keras.Input((16, 16, 8))
    tap = ghost.plan(keras.Model(inputs, keras.layers.Conv2D(8, 3)(inputs)))[0]
    assert "folded_conv" not in dense_conv.LinearClip(tap, 4, 1, [0]).estimates
    with pytest.raises(ValueError, match="folded_conv"):
        dense_conv.LinearClip(tap, 4, 1, [0], method="folded_conv")
    import os
    import subprocess
    import sys
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         __file__, "-k", "every_way and folded_conv"],
        env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout, done.stdout[-3000:]


def test_large_feature_maps_take_conv_kernel_gradients_not_patches():
    inputs = keras.Input((64, 64, 16))
    conv = keras.layers.Conv2D(16, 3, padding="same")
    small = keras.layers.Conv2D(16, 3, padding="same")
    taps = ghost.plan(keras.Model(
        inputs, small(keras.layers.MaxPooling2D(4)(conv(inputs)))))
    # 4096 positions x 144 = 590k patch entries per example; 256 x 144 = 37k.
    large = dense_conv.LinearClip(taps[0], 8, 1, [0])
    assert large.method in ("per_example_conv", "folded_conv")
    assert large.estimates["patches"].peak_bytes == 4 * 8 * 4096 * 144
    small = dense_conv.LinearClip(taps[1], 8, 1, [0])
    assert small.estimates["patches"].peak_bytes == 4 * 8 * 256 * 144


def test_nonfinite_example_contributes_exactly_nothing():
    x, y, weights = data(8)
    weights[:] = 1.0
    clean = one_update("ghost", x[1:], y[1:], weights[1:], microbatch=7)
    x[0, 3, 3, 1] = np.nan
    with_nan = one_update("ghost", x, y, weights, microbatch=8)
    # Same examples apart from the NaN one, divided by 8 instead of 7.
    assert_same_update([u * 8 for u in with_nan], [u * 7 for u in clean])


def test_ghost_equals_vectorized_on_two_replicas():
    x, y, weights = data(8)
    fast = one_update("ghost", x, y, weights,
                      strategy=conftest.mirrored_strategy())
    slow = one_update("vectorized", x, y, weights)
    assert_same_update(fast, slow)


def test_unsupported_models_refuse_ghost_and_train_with_auto():
    x = np.ones((4, 3), np.float32)
    y = np.zeros(4, np.int32)
    for clipping in ("auto", "ghost"):
        config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                              expected_batch_size=4, clipping=clipping)
        model = dpf.make_private(Subclassed(), config)
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
        model.compile(optimizer=keras.optimizers.SGD(ghost_fixtures.LEARNING_RATE),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.fit(tokens, y, batch_size=8, verbose=0)
        updates[clipping] = [b - v.numpy() for b, v in
                             zip(before, model.trainable_variables)]
    assert_same_update(updates["ghost"], updates["vectorized"])


def test_fallbacks_are_announced_in_one_line(caplog):
    x, y, weights = data(4)
    with caplog.at_level("WARNING", logger="tf_dpfair.dpsgd.ghost"):
        one_update("auto", x, y, weights)
    notices = [r.getMessage() for r in caplog.records if "closed form" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "conv2d" in notices[0]  # the elu conv, the one generic layer

    caplog.clear()
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, clipping="auto")
    model = dpf.make_private(Subclassed(), config)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with caplog.at_level("WARNING", logger="tf_dpfair.dpsgd.ghost"):
        model.fit(np.ones((4, 3), np.float32), np.zeros(4, np.int32), batch_size=4,
                  verbose=0)
    assert [r.getMessage() for r in caplog.records] == [
        "tf_dpfair: ghost clipping does not apply (it is not a functional model); "
        "the whole model uses vectorized per-example gradients."]


@keras.saving.register_keras_serializable(package="ghost_test")
class WithUnusedWeight(keras.layers.Layer):
    """A scalar gain and a weight the output does not depend on."""

    def build(self, input_shape):
        self.gain = self.add_weight(name="gain", shape=(), initializer="ones")
        self.unused = self.add_weight(name="unused", shape=(2,), initializer="ones")

    def call(self, x):
        return x * self.gain


@keras.saving.register_keras_serializable(package="ghost_test")
class ScaledTanh(keras.layers.Layer):
    """`a * tanh(b * x) + c` with three scalar weights: nonlinear in them."""

    def build(self, input_shape):
        self.a, self.b, self.c = (
            self.add_weight(name=n, shape=(), initializer=keras.initializers.Constant(v))
            for n, v in (("a", 1.3), ("b", 0.7), ("c", -0.2)))

    def call(self, x):
        return self.a * keras.ops.tanh(self.b * x) + self.c


def scalar_weight_model(seed=0):
    """Generic layers with scalar weights: a gain at zero (SkipInit) and
    non-zero, three nonlinear scalars, and a weight nothing depends on."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = keras.layers.Add()([h, models.nfnet.SkipGain(0.2)(h)])
    h = models.nfnet.SkipGain(0.5, initial_value=0.8)(h)
    h = ScaledTanh()(h)
    h = WithUnusedWeight()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("augmult", [1, 2])
def test_scalar_and_unused_weights_equal_vectorized(augmult):
    """Both paths give an unused weight a zero gradient (they once crashed
    on it) and agree on the scalar weights of generic layers."""
    x, y, weights = data(10, augmult=augmult)
    x, y = x[..., :6, :6, :], y % 3
    fast = one_update("ghost", x, y, weights, augmult=augmult,
                      build=scalar_weight_model)
    slow = one_update("vectorized", x, y, weights, augmult=augmult,
                      build=scalar_weight_model)
    assert_same_update(fast, slow)
    moved = [np.abs(u).max() > 1e-4 for u in slow]
    assert sum(moved) == len(slow) - 1 and not np.any(slow[-3])  # the unused weight
