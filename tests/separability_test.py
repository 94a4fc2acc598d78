"""The separability probe, alone and as DP training's check before the first update."""

import contextlib

import conftest
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair import models
from tf_dpfair.dpsgd import separability

MIXES = r"Examples are not independent in '[\w]+': in training mode, changing only example 0 of a probe batch of 4 changed the output of example 1\."


class BatchCentering(keras.layers.Layer):
    """Mixes examples without being BatchNorm: subtracts the batch mean."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=0, keepdims=True)


class MaxAboveThreshold(keras.layers.Layer):
    """Mixes examples only where the batch maximum of a feature exceeds 3."""

    def call(self, x):
        return x + keras.ops.relu(keras.ops.max(x, axis=0, keepdims=True) - 3.0)


class RunningMean(keras.layers.Layer):
    """Separable outputs, but a running mean of the data kept in a variable."""

    def build(self, shape):
        self.mean = self.add_weight(shape=shape[1:], initializer="zeros",
                                    trainable=False, name="running_mean")

    def call(self, x, training=None):
        if training:
            self.mean.assign(0.9 * self.mean + 0.1 * keras.ops.mean(x, axis=0))
        return x


class TfNoise(keras.layers.Layer):
    """Noise from a stateful TF op, outside Keras' seed generators."""

    def call(self, x):
        return x + tf.random.uniform(tf.shape(x))


class KerasNoise(keras.layers.Layer):
    """Noise from Keras' global seed generator (no seed given)."""

    def call(self, x):
        return x + keras.random.normal(keras.ops.shape(x))


class NeedsLargeInputs(keras.layers.Layer):
    def call(self, x):
        tf.debugging.assert_greater(x, 5.0, message="inputs must exceed 5")
        return x


def classifier(*middle, inputs=(5,), name="clf"):
    """Input -> Dense(4) -> middle layers -> Dense(3) logits."""
    keras.utils.set_random_seed(0)
    x = keras.Input(inputs)
    h = keras.layers.Dense(4, name="dense_in")(keras.layers.Flatten()(x))
    for layer in middle:
        h = layer(h)
    return keras.Model(x, keras.layers.Dense(3, name="logits")(h), name=name)


def spec(*shape, dtype=tf.float32):
    return tf.TensorSpec((None,) + shape, dtype)


# ------------------------------------------------------------ probe_batch


def test_probe_batch_has_the_structure_of_the_inputs():
    batch = separability.probe_batch(
        {"image": spec(3, None), "ids": spec(2, dtype=tf.int32),
         "flag": spec(dtype=tf.bool)})
    assert batch["image"].shape == (4, 3, separability.UNKNOWN_DIM)
    assert batch["image"].dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(batch["image"])) < float(tf.reduce_max(batch["image"])) < 1.0
    assert batch["ids"].shape == (4, 2) and batch["ids"].dtype == tf.int32
    assert set(np.unique(batch["ids"])) <= {0, 1}
    assert batch["flag"].shape == (4,) and batch["flag"].dtype == tf.bool
    again = separability.probe_batch({"image": spec(3, None), "ids": spec(2, dtype=tf.int32),
                                      "flag": spec(dtype=tf.bool)})
    np.testing.assert_array_equal(batch["image"], again["image"])


def test_probe_batch_errors():
    with pytest.raises(ValueError, match="needs at least 2 rows; got 1"):
        separability.probe_batch(spec(3), rows=1)
    with pytest.raises(ValueError, match=r"input of shape \(\): inputs need a leading batch"):
        separability.probe_batch(tf.TensorSpec((), tf.float32))
    with pytest.raises(ValueError, match="dtype string: only numbers and booleans"):
        separability.probe_batch(spec(2, dtype=tf.string))


# ------------------------------------------------------------ check_separability


@pytest.mark.parametrize("middle", [
    [],
    [keras.layers.Dropout(0.5)],
    [keras.layers.GaussianNoise(1.0), keras.layers.Dropout(0.3)],
    [KerasNoise()],
    [keras.layers.LayerNormalization(), keras.layers.UnitNormalization()],
], ids=["plain", "dropout", "gaussian-noise", "keras-global-rng", "per-example-norms"])
def test_separable_models_pass_and_keep_their_state(middle):
    model = classifier(*middle)
    before = [v.numpy().copy() for v in model.variables]
    separability.check_separability(model, separability.probe_batch(spec(5)))
    for old, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(old, v.numpy())  # seed states included


def test_frozen_batchnorm_passes_and_training_batchnorm_is_caught():
    model = classifier(keras.layers.BatchNormalization(name="bn"))
    with pytest.raises(ValueError, match=MIXES + r".*first layer whose output mixes examples "
                       r"is 'bn' \(BatchNormalization\).*writes state that depends on the "
                       r"data: 'bn/moving_mean', 'bn/moving_variance'"):
        separability.check_separability(model, separability.probe_batch(spec(5)))
    models.freeze_batchnorm(model)
    separability.check_separability(model, separability.probe_batch(spec(5)))


def test_batch_mean_layer_is_refused_and_named():
    model = classifier(BatchCentering(name="centering"))
    with pytest.raises(ValueError, match=MIXES + r" Per-example clipping bounds .* The first "
                       r"layer whose output mixes examples is 'centering' \(BatchCentering\)\. "
                       r"Typical causes: BatchNormalization in training mode"):
        separability.check_separability(model, separability.probe_batch(spec(5)))


def test_mixing_that_only_some_inputs_show_is_caught():
    model = classifier(MaxAboveThreshold(name="max_above"))
    # Inputs in the probe batch's range do not reach the threshold...
    batch = separability.probe_batch(spec(5))
    hidden = keras.Model(model.input, model.get_layer("dense_in").output)(batch)
    assert float(tf.reduce_max(hidden)) < 3.0
    # ...the wider redraw of odd rows does.
    with pytest.raises(ValueError, match=r"mixes examples is 'max_above'"):
        separability.check_separability(model, separability.probe_batch(spec(5)))


def test_mixing_is_located_in_nested_sequential_and_op_nodes():
    inner = classifier(BatchCentering(name="centering"), name="inner")
    x = keras.Input((5,))
    outer = keras.Model(x, keras.layers.Dense(2)(inner(keras.layers.Dense(5)(x))), name="outer")
    with pytest.raises(ValueError, match=r"mixes examples is 'inner/centering' \(BatchCentering\)"):
        separability.check_separability(outer, separability.probe_batch(spec(5)))
    found = separability.find_mixing_layer(outer, separability.probe_batch(spec(5)))
    assert found[0] == "outer/inner/centering" and found[1] is inner.get_layer("centering")

    sequential = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3),
                                   MaxAboveThreshold(name="seq_max")], name="seq")
    with pytest.raises(ValueError, match=r"mixes examples is 'seq_max'"):
        separability.check_separability(sequential, separability.probe_batch(spec(5)))

    # A Keras op in a functional graph: the batch mean is the first node
    # whose output moves (it has no row of its own).
    x = keras.Input((5,))
    centred = x - keras.ops.mean(x, axis=0)
    graph = keras.Model(x, keras.layers.Dense(2)(centred), name="graph")
    with pytest.raises(ValueError, match=r"mixes examples is 'mean(_\d+)?' \(Mean\)"):
        separability.check_separability(graph, separability.probe_batch(spec(5)))
    assert separability.find_mixing_layer(classifier(), separability.probe_batch(spec(5))) is None


class Subclassed(keras.Model):
    def __init__(self, mix, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.mix = mix
        self.out = keras.layers.Dense(3)

    def call(self, x, training=None):
        h = self.dense(x)
        if self.mix:
            h = h - keras.ops.mean(h, axis=0)
        return self.out(h)


def test_subclassed_model_mixing_is_refused_without_a_name():
    model = Subclassed(mix=True, name="sub")
    model(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match=MIXES + r".*The layer could not be located \('sub' is "
                       r"not a functional or Sequential graph\)"):
        separability.check_separability(model, separability.probe_batch(spec(5)))


def test_data_dependent_state_is_refused_and_named():
    model = classifier(RunningMean(name="running"))
    with pytest.raises(ValueError, match=r"^The training-mode call of 'clf' writes state that "
                       r"depends on the data: 'running/running_mean' .* without clipping or noise"):
        separability.check_separability(model, separability.probe_batch(spec(5)))


def test_randomness_outside_keras_is_refused_as_uncheckable():
    model = classifier(TfNoise(name="noise"))
    with pytest.raises(ValueError, match=r"^Could not check that examples stay independent in "
                       r"'clf': two identical training-mode calls gave different results.*"
                       r"keras\.random\.SeedGenerator"):
        separability.check_separability(model, separability.probe_batch(spec(5)))


def test_model_that_cannot_run_on_the_probe_batch_is_refused():
    x = keras.Input((5,))
    model = keras.Model(x, keras.layers.Dense(3)(NeedsLargeInputs()(x)), name="picky")
    with pytest.raises(ValueError, match=r"(?s)could not run 'picky' in training mode on a probe "
                       r"batch of random data shaped like its inputs \(float32\[4, 5\]\): "
                       r"InvalidArgumentError: .*inputs must exceed 5"):
        separability.check_separability(model, separability.probe_batch(spec(5)))
    with pytest.raises(ValueError, match="one common leading dimension >= 2"):
        separability.check_separability(classifier(), tf.zeros([1, 5]))


# ------------------------------------------------------------ DP training

X = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
Y = np.array([0, 1, 2, 1])


def private(model, clipping="auto", augmult=1, microbatch_size=4, **compile_kwargs):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4,
                          microbatch_size=microbatch_size, clipping=clipping, augmult=augmult)
    dp_model = dpf.make_private(model, config)
    dp_model.compile(optimizer=keras.optimizers.SGD(0.1),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     **compile_kwargs)
    return dp_model


def assert_refused_before_any_write(model, x, y, match):
    before = [v.numpy().copy() for v in model.variables]
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=4, verbose=0)
    for old, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(old, v.numpy())
    assert model.update_count == 0


@pytest.mark.parametrize("clipping", ["vectorized", "ghost", "auto"])
def test_dp_training_refuses_a_layer_that_mixes_examples(clipping):
    model = private(classifier(BatchCentering(name="centering")), clipping)
    assert_refused_before_any_write(model, X, Y, MIXES + r".*mixes examples is 'centering'")


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_dp_training_accepts_dropout(clipping):
    model = private(classifier(keras.layers.Dropout(0.5), keras.layers.GaussianNoise(0.1)),
                    clipping)
    model.fit(X, Y, batch_size=4, verbose=0)
    assert model.update_count == 1


@pytest.mark.parametrize("execution", [{"run_eagerly": True}, {"jit_compile": True}],
                         ids=["eager", "xla"])
def test_eager_and_xla_steps_refuse_mixing_and_accept_dropout(execution):
    model = private(classifier(BatchCentering(name="centering")), "vectorized", **execution)
    assert_refused_before_any_write(model, X, Y, r"mixes examples is 'centering'")
    model = private(classifier(keras.layers.Dropout(0.5)), "vectorized", **execution)
    model.fit(X, Y, batch_size=4, verbose=0)
    assert model.update_count == 1


def dict_classifier(mix):
    keras.utils.set_random_seed(0)
    image = keras.Input((3, 3, 1), name="image")
    tokens = keras.Input((2,), dtype="int32", name="tokens")
    h = keras.layers.Concatenate()([
        keras.layers.Flatten()(image),
        keras.layers.Flatten()(keras.layers.Embedding(5, 2)(tokens))])
    if mix:
        h = MaxAboveThreshold(name="dict_max")(h)
    return keras.Model({"image": image, "tokens": tokens}, keras.layers.Dense(3)(h))


@pytest.mark.parametrize("clipping", ["vectorized", "auto"])
def test_multi_input_models(clipping):
    rng = np.random.default_rng(2)
    x = {"image": rng.random((4, 3, 3, 1)).astype(np.float32),
         "tokens": rng.integers(0, 5, (4, 2)).astype(np.int32)}
    assert_refused_before_any_write(private(dict_classifier(True), clipping), x, Y,
                                    r"mixes examples is 'dict_max'")
    model = private(dict_classifier(False), clipping)
    model.fit(x, Y, batch_size=4, verbose=0)
    assert model.update_count == 1


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_augmult_inputs(clipping):
    views = np.random.default_rng(3).normal(size=(4, 2, 5)).astype(np.float32)
    model = private(classifier(BatchCentering(name="centering")), clipping, augmult=2)
    assert_refused_before_any_write(model, views, Y, r"mixes examples is 'centering'")
    model = private(classifier(keras.layers.Dropout(0.5)), clipping, augmult=2)
    model.fit(views, Y, batch_size=4, verbose=0)
    assert model.update_count == 1


def test_private_model_of_a_subclassed_model():
    mixing = Subclassed(mix=True, name="sub")
    mixing(X)
    model = private(mixing)
    assert type(model).__name__ == "PrivateModel"
    assert_refused_before_any_write(model, X, Y, MIXES + r".*'sub' is not a functional")
    model = private(Subclassed(mix=False, name="sub_ok"))
    assert not model.built
    model.fit(X, Y, batch_size=4, verbose=0)
    assert model.update_count == 1


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_two_replicas(clipping):
    with conftest.mirrored_strategy().scope():
        mixing = private(classifier(BatchCentering(name="centering")), clipping,
                         microbatch_size=2)
        dropout = private(classifier(keras.layers.Dropout(0.5)), clipping, microbatch_size=2)
    assert_refused_before_any_write(mixing, X, Y, r"mixes examples is 'centering'")
    dropout.fit(X, Y, batch_size=4, verbose=0)
    assert dropout.update_count == 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_probe_runs_once_per_compile(monkeypatch, replicas):
    calls = []
    check = separability.check_separability
    monkeypatch.setattr(separability, "check_separability",
                        lambda *args, **kwargs: (calls.append(1), check(*args, **kwargs)))
    scope = conftest.mirrored_strategy().scope() if replicas == 2 else contextlib.nullcontext()
    with scope:
        model = private(classifier(keras.layers.Dropout(0.5)), microbatch_size=2)
    x, y = np.concatenate([X] * 3), np.concatenate([Y] * 3)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)  # 6 updates
    model.fit(x, y, batch_size=4, verbose=0)
    assert (len(calls), model.update_count) == (1, 9)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=4, verbose=0)
    assert (len(calls), model.update_count) == (2, 12)


# ------------------------------------------------------------ training shapes


class CentresLargeBatches(keras.layers.Layer):
    """Subtracts the batch mean only when the batch has more than `threshold` rows.

    A 4-row probe sees the identity; a ghost micro-batch of more rows mixes.
    """

    def __init__(self, threshold=4, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def call(self, x):
        rows = tf.shape(x)[0]
        return tf.where(rows > self.threshold,
                        x - tf.reduce_mean(x, axis=0, keepdims=True), x)


def case_one_model():
    """Issue 26, case 1: Dense -> CentresLargeBatches(4) -> Dense logits."""
    keras.utils.set_random_seed(26)
    x = keras.Input((5,))
    h = keras.layers.Dense(6, name="dense_in")(x)
    h = CentresLargeBatches(4, name="centre_large")(h)
    return keras.Model(x, keras.layers.Dense(3, name="logits")(h), name="case_one")


@pytest.mark.parametrize("clipping", ["auto", "vectorized"])
def test_batch_size_dependent_mixing_is_refused_at_the_training_microbatch(clipping):
    # Issue 26, case 1: the layer mixes only in batches of more than 4 rows.
    # Ghost clipping runs it on micro-batches of 8, where removing one
    # example moved the clipped sum by 7.58 C; the check must run at the
    # micro-batch size the step uses, on every clipping path.
    rng = np.random.default_rng(26)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=8,
                          microbatch_size=8, clipping=clipping)
    model = dpf.make_private(case_one_model(), config)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"Examples are not independent in '\w+': in training "
                       r"mode, changing only example \d of a probe batch of 8 changed the "
                       r"output of example \d\..*mixes examples is 'centre_large' "
                       r"\(CentresLargeBatches\)"):
        model.fit(x, y, batch_size=8, verbose=0)
    for old, v in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(old, v.numpy())
    assert model.update_count == 0


def random_model(rng, name):
    """A small functional classifier of random depth, widths and layer kinds.

    Returns the model, its input shape and the threshold of its
    `CentresLargeBatches` layer (None when it has none).
    """
    conv = bool(rng.integers(2))
    shape = (6, 6, 2) if conv else (int(rng.integers(3, 7)),)
    x = keras.Input(shape)
    h = x
    if conv:
        for _ in range(int(rng.integers(1, 3))):
            h = keras.layers.Conv2D(int(rng.integers(2, 5)), 3, padding="same",
                                    activation="relu")(h)
        h = keras.layers.Flatten()(h)
    threshold = None
    depth = int(rng.integers(1, 4))
    mix_at = int(rng.integers(depth)) if rng.random() < 0.6 else None
    for i in range(depth):
        h = keras.layers.Dense(int(rng.integers(3, 9)), activation="tanh")(h)
        if i == mix_at:
            threshold = int(rng.integers(1, 12))
            h = CentresLargeBatches(threshold, name=f"centre_{name}")(h)
    if rng.random() < 0.3:
        h = keras.layers.Dropout(0.2)(h)
    return keras.Model(x, keras.layers.Dense(3)(h), name=name), shape, threshold


def clone_under_seed(model, seed):
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def one_update(model, clipping, microbatch, augmult, x, y, w):
    """Trainable weights moved by one DP update with noise 0 (None if refused)."""
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=0.0,
                          expected_batch_size=len(y), microbatch_size=microbatch,
                          clipping=clipping, augmult=augmult)
    dp_model = dpf.make_private(model, config)
    dp_model.compile(optimizer=keras.optimizers.SGD(1.0),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in dp_model.trainable_variables]
    try:
        dp_model.fit(x, y, sample_weight=w, batch_size=len(y), verbose=0)
    except ValueError as error:
        assert "Examples are not independent" in str(error)
        assert dp_model.update_count == 0
        return None
    return [v.numpy() - b for v, b in zip(dp_model.trainable_variables, before)]


def test_an_example_of_weight_zero_cannot_move_the_update_whatever_the_model():
    # The invariant both clipping paths must keep: with noise 0, replacing an
    # example of weight 0 by any other row leaves the update as it was; a
    # model for which it cannot be kept must be refused. Random models,
    # some with a layer that mixes examples only in batches above a random
    # size, at random micro-batch sizes and augmult.
    rng = np.random.default_rng(2026)
    outcomes = []
    for trial in range(6):
        base, shape, threshold = random_model(rng, f"rand{trial}")
        microbatch = int(rng.integers(2, 10))
        augmult = int(rng.choice([1, 1, 2]))
        n = microbatch + int(rng.integers(0, microbatch))
        views = (n, augmult) + shape if augmult > 1 else (n,) + shape
        x = rng.normal(size=views).astype(np.float32)
        y = rng.integers(0, 3, n)
        w = rng.uniform(0.2, 1.0, n).astype(np.float32)
        j = int(rng.integers(n))
        w[j] = 0.0
        other = x.copy()
        other[j] = 5.0 * rng.normal(size=x.shape[1:])
        for clipping in ["ghost", "vectorized"]:
            # Clones under one global seed: their dropout draws the same masks.
            first, second = (clone_under_seed(base, trial) for _ in range(2))
            moved = one_update(first, clipping, microbatch, augmult, x, y, w)
            if moved is None:
                outcomes.append("refused")
                # Refused only where the step really would mix examples.
                assert threshold is not None and threshold < microbatch * augmult
                continue
            again = one_update(second, clipping, microbatch, augmult, other, y, w)
            assert again is not None
            outcomes.append("kept")
            for a, b in zip(moved, again, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert {"refused", "kept"} <= set(outcomes), outcomes


class ScaledBatchMean(keras.layers.Layer):
    """Adds alpha times the batch mean, alpha trainable and 0 at first: the
    outputs do not mix yet, the gradient with respect to alpha does."""

    def build(self, shape):
        self.alpha = self.add_weight(shape=(), initializer="zeros", name="alpha")

    def call(self, x):
        return x + self.alpha * tf.reduce_mean(x, axis=0, keepdims=True)


def batch_relative_loss(y_true, y_pred):
    """Cross-entropy of logits centred over the batch: the loss mixes examples."""
    centred = y_pred - tf.reduce_mean(y_pred, axis=0, keepdims=True)
    return keras.losses.sparse_categorical_crossentropy(y_true, centred, from_logits=True)


@pytest.mark.parametrize("clipping", ["auto", "vectorized"])
def test_mixing_in_the_loss_or_only_in_the_gradient_is_refused(clipping):
    x = np.random.default_rng(4).normal(size=(8, 5)).astype(np.float32)
    y = np.arange(8) % 3
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=8,
                          microbatch_size=8, clipping=clipping)
    model = dpf.make_private(classifier(), config)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=batch_relative_loss)
    with pytest.raises(ValueError, match=r"changing only example \d of a probe batch of 8 "
                       r"changed the loss of example \d, although the model's outputs for it "
                       r"stayed the same\..*The loss mixes examples"):
        model.fit(x, y, batch_size=8, verbose=0)
    assert model.update_count == 0

    model = private(classifier(ScaledBatchMean(name="scaled_mean")), clipping, microbatch_size=8)
    with pytest.raises(ValueError, match=r"changing only example \d of a probe batch of 8 "
                       r"changed the gradient of the weighted sum of the other examples' "
                       r"losses .*The mixing is in the backward pass"):
        model.fit(x, y, batch_size=8, verbose=0)
    assert model.update_count == 0


def batch_relative_binary_loss(y_true, y_pred):
    """Binary cross-entropy of logits centred over the batch (mixes examples)."""
    centred = y_pred - tf.reduce_mean(y_pred, axis=0, keepdims=True)
    return keras.losses.binary_crossentropy(y_true, centred, from_logits=True)


def test_probe_labels_take_the_shape_of_the_training_targets():
    # Given the step's targets, the probe labels take their dtype and shape
    # (here multi-label floats and a label mask).
    model = dpf.make_private(classifier(), dpf.DPConfig(
        l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4, microbatch_size=16))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=batch_relative_binary_loss)
    calls = []
    check = separability.check_separability

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return check(*args, **kwargs)

    targets = {"label": tf.TensorSpec((None, 3), tf.float32),
               "mask": tf.TensorSpec((None, 3), tf.bool)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(separability, "check_separability", spy)
        with pytest.raises(ValueError, match=r"probe batch of 16 changed the loss"):
            model._check_separable(tf.TensorSpec((None, 5), tf.float32), targets)
    labels = calls[0]["targets"]
    assert labels["label"].dtype == tf.float32 and labels["label"].shape == (16, 3)
    assert labels["mask"].dtype == tf.bool and labels["mask"].shape == (16, 3)
    assert calls[0]["views"] == 1


class RoundingNoise(keras.layers.Layer):
    """Identity whose gradient is off by about 1e-5, differently on every run,
    as non-deterministic accelerator reductions round (stateful TF noise in
    the backward pass only)."""

    def call(self, x):
        @tf.custom_gradient
        def identity(h):
            def grad(upstream):
                return upstream * (1.0 + 1e-5 * tf.random.uniform(tf.shape(upstream)))
            return tf.identity(h), grad
        return identity(x)


def sparse_loss(targets, y_pred):
    return keras.losses.sparse_categorical_crossentropy(targets["label"], y_pred,
                                                        from_logits=True)


@pytest.mark.parametrize("rows", [4, 12])
def test_gradients_that_round_differently_each_run_are_not_mistaken_for_mixing(rows):
    inputs = separability.probe_batch(spec(5), rows=rows)
    labels = {"label": separability.probe_batch(spec(dtype=tf.int32), rows=rows, seed=2)}
    separability.check_separability(classifier(RoundingNoise()), inputs,
                                    targets=labels, loss_fn=sparse_loss)
    # Mixing far beyond the rounding is still refused.
    with pytest.raises(ValueError, match=r"changed the gradient of the weighted sum"):
        separability.check_separability(
            classifier(RoundingNoise(), ScaledBatchMean(name="scaled_mean")), inputs,
            targets=labels, loss_fn=sparse_loss)


def test_change_sets_separate_every_ordered_pair():
    for n in [2, 3, 4, 6, 7, 8, 33, 64, 100]:
        sets = separability.change_sets(n)
        bits = (n - 1).bit_length()
        assert len(sets) == (n if n <= 2 * bits else 2 * bits)
        for r in range(n):
            for j in range(n):
                if r != j:
                    assert any(r in s and j not in s for s in sets), (n, r, j)


def test_check_separability_argument_errors():
    inputs = separability.probe_batch(spec(5), rows=6)
    labels = {"label": separability.probe_batch(spec(dtype=tf.int32), rows=3, seed=2)}
    with pytest.raises(ValueError, match="needs targets and loss_fn together"):
        separability.check_separability(classifier(), inputs, targets=labels)
    with pytest.raises(ValueError, match=r"at least 2 examples of 4 view\(s\) each; got 6 rows"):
        separability.check_separability(classifier(), inputs, views=4)
    with pytest.raises(ValueError, match=r"one row per example \(6\); got 3"):
        separability.check_separability(classifier(), inputs, targets=labels,
                                        loss_fn=sparse_loss)
    with pytest.raises(ValueError, match=r"(?s)could not compute the per-example loss of 'clf' "
                       r"on probe targets shaped like the training targets \(int32\[6\]\)"):
        separability.check_separability(
            classifier(), inputs, targets={"label": tf.zeros([6], tf.int32)},
            loss_fn=lambda t, p: t["wrong"])
