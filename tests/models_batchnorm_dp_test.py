"""A model with frozen BatchNorm trains under DP exactly as example-by-example math says."""

import re

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


# ------------------------------------------------------------------------
# BatchNorm wherever it sits, in every model family: a DP update never
# depends on an example of weight 0, or the model is refused.


class Holder(keras.layers.Layer):
    """A custom layer holding a Dense and a BatchNorm as attributes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="holder_dense")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


_EFFICIENTNET = []


def efficientnet_features():
    """EfficientNet-Lite0's stem and first block (its own BatchNorms included), pooled."""
    if not _EFFICIENTNET:
        full = models.build_efficientnet_lite0((32, 32, 3), include_top=False, pooling=None)
        pooled = keras.layers.GlobalAveragePooling2D()(full.get_layer("block0_project_bn").output)
        _EFFICIENTNET.append(keras.Model(full.input, pooled, name="efficientnet_lite0_stem"))
    return keras.models.clone_model(_EFFICIENTNET[0])  # fresh layers for every test


def pooled(model):
    """The model up to its pooled features (before its classifier)."""
    return keras.Model(model.input, model.get_layer("avg_pool").output, name=model.name)


# Tiny models of each family, as feature extractors [B, F].
FAMILIES = {
    "nf_resnet": lambda: pooled(models.nf_resnet((8, 8, 3), 4, depth=8, base_channels=4)),
    "wide_resnet": lambda: pooled(models.wide_resnet((8, 8, 3), 4, depth=10, width=1,
                                                     groups=4)),
    "small_cnn": lambda: pooled(models.small_cnn((8, 8, 3), 4, filters=(4, 4), groups=2)),
    "efficientnet_lite": efficientnet_features,
    # Fine-tuning helpers around a small CNN: add_head, adapt_inputs, set_trainable.
    "finetune": lambda: pooled(models.small_cnn((8, 8, 3), 4, filters=(4, 4), groups=2)),
}
# Where the BatchNorm goes, and its path in the DP model's refusal.
PLACEMENTS = {"top": "bn", "nested": "inner/bn", "custom": "holder/bn", "wrapper": "td/bn"}


def place_batchnorm(base, where):
    """`base` (features [B, F]) -> BatchNorm placed `where` -> Dense(3) logits."""
    features = base.output
    if where == "top":
        h = keras.layers.BatchNormalization(name="bn")(features)
        return keras.Model(base.input, keras.layers.Dense(3)(h), name="placed")
    if where == "nested":
        inner = keras.Model(base.input, keras.layers.BatchNormalization(name="bn")(features),
                            name="inner")
        x = keras.Input(base.input.shape[1:])
        return keras.Model(x, keras.layers.Dense(3)(inner(x)), name="placed")
    if where == "custom":
        h = Holder(name="holder")(features)
        return keras.Model(base.input, keras.layers.Dense(3)(h), name="placed")
    h = keras.layers.Reshape((1, features.shape[-1]))(features)
    h = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="bn"), name="td")(h)
    return keras.Model(base.input, keras.layers.Dense(3)(keras.layers.Flatten()(h)),
                       name="placed")


def family_model(family, where, frozen):
    """The model, its input shape and the path of the placed BatchNorm in refusals."""
    keras.utils.set_random_seed(3)
    model = place_batchnorm(FAMILIES[family](), where)
    path = PLACEMENTS[where]
    if family == "finetune":
        model = models.adapt_inputs(models.add_head(model, 3), (8, 8, 1), pixel_range=1.0,
                                    normalization=None)
        models.set_trainable(model, "all", train_batchnorm=not frozen)
        return model, (8, 8, 1), "placed_finetune/" + path
    if frozen:
        models.freeze_batchnorm(model)
    return model, tuple(model.input.shape[1:]), path


def updates_with_padding_changed(model, shape, clipping):
    """Variables after one DP update from the same start, twice: the second
    time only the example of weight 0 differs."""
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4,
                          microbatch_size=4, clipping=clipping)
    model = dpf.make_private(model, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    x = rng.random((4,) + shape).astype(np.float32)
    changed = x.copy()
    changed[3] = 5.0 * rng.random(shape) - 2.0
    y, weights = np.array([0, 1, 2, 1]), np.array([1.0, 1.0, 1.0, 0.0], np.float32)
    start = [v.numpy().copy() for v in model.variables]
    after = []
    for batch in (x, changed):
        for v, value in zip(model.variables, start):
            v.assign(value)
        model.train_on_batch(batch, y, sample_weight=weights)
        after.append([v.numpy().copy() for v in model.variables])
    trained = [i for i, v in enumerate(model.variables) if v.trainable]
    LEDGER_COPY[:] = [i for i, v in enumerate(model.variables) if "dp_ledger" in v.path]
    return start, after, trained


LEDGER_COPY = []  # index of the ledger's saved copy among the variables


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "training"])
@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
@pytest.mark.parametrize("where", list(PLACEMENTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_weight_zero_example_never_changes_the_update(family, where, clipping, frozen):
    model, shape, path = family_model(family, where, frozen)
    if not frozen:
        with pytest.raises(ValueError, match=(
                r"BatchNormalization in training mode mixes examples.*Offending layers: "
                rf"(.*, )?{re.escape(path)}(, |\. Freeze them)")):
            updates_with_padding_changed(model, shape, clipping)
        return
    start, (first, second), trained = updates_with_padding_changed(model, shape, clipping)
    assert any(not np.array_equal(start[i], first[i]) for i in trained)  # it did train
    ledger = LEDGER_COPY[0]
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if i != ledger:  # bit for bit, BatchNorm statistics included
            np.testing.assert_array_equal(a, b)
    # Assigning the start values back does not roll the privacy ledger back:
    # its saved copy holds both updates.
    assert not np.array_equal(first[ledger], second[ledger])


def test_issue_reproduction_batchnorm_in_a_custom_layer_is_refused():
    class Block(keras.layers.Layer):
        def __init__(s, **k):
            super().__init__(**k)
            s.c = keras.layers.Conv2D(4, 3, padding="same")
            s.bn = keras.layers.BatchNormalization()

        def call(s, x, training=None):
            return keras.ops.relu(s.bn(s.c(x), training=training))

    i = keras.Input((6, 6, 2))
    o = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(Block()(i)))
    m = dpf.make_private(keras.Model(i, o), dpf.DPConfig(
        l2_norm_clip=1., noise_multiplier=1., expected_batch_size=4, microbatch_size=4))
    m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=r"Offending layers: block(_\d+)?/batch_normalization"
                                         r"(_\d+)?\. Freeze them"):
        m.fit(np.random.rand(4, 6, 6, 2).astype("float32"), np.array([0, 1, 2, 1]),
              batch_size=4)
    assert m.update_count == 0
