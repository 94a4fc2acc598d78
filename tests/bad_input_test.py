"""Every bad input of issue 7 gets a clear error (problem and fix) or a
bounded, reported fallback, and nothing is written half-way."""

import re

import conftest
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import pipeline as data
from tf_dpfair.privacy import sampling
from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.fairness.streaming_auc import GroupedAUC

LR = 0.5


def classifier(noise=1.0, batch=4, layer=None, ema=0.9, optimizer="adam",
               jit_compile=False, seed=None):
    """A DPModel on 3 features: [Dense(3) | layer] -> 3 logits, Adam or SGD, EMA."""
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=batch, microbatch_size=2,
                          ema_decay=ema, seed=seed)
    inputs = keras.Input((3,))
    hidden = layer(inputs) if layer is not None else inputs
    outputs = keras.layers.Dense(
        3, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(hidden)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=(keras.optimizers.Adam(0.1) if optimizer == "adam"
                             else keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  jit_compile=jit_compile)
    return model


# The step's checks must hold under XLA too, which drops assertions (so the
# step keeps them outside XLA). SGD has no optimizer slots: with it the XLA
# step also ran before the optimizer was built in compile, and passed bad
# batches silently.
STEP_SETUPS = pytest.mark.parametrize("optimizer, jit_compile", [
    ("adam", False), ("adam", True), ("sgd", True)])


def state(model):
    """Every value a training step could write.

    The privacy ledger's ids (column 0 of its saved copy) are random per
    model; its counts and accounting are compared.
    """
    values = []
    for variable in model.weights + model.optimizer.variables:
        value = variable.numpy().copy()
        if "dp_ledger" in variable.path:
            value[:, 0] = 0
        values.append(value)
    return values


def assert_nothing_written(model, before):
    for old, new in zip(before, state(model)):
        np.testing.assert_array_equal(old, new)
    assert model.update_count == 0


X = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
Y = np.array([0, 1, 2, 1])


def test_batchnorm_in_training_mode():
    model = classifier(layer=keras.layers.BatchNormalization(name="bn"))
    model.optimizer.build(model.trainable_variables)
    before = state(model)
    with pytest.raises(ValueError, match=r"BatchNormalization in training mode"
                       r".*Offending layers: bn\. Freeze them"):
        model.fit(X, Y, batch_size=4, verbose=0)
    assert_nothing_written(model, before)


@STEP_SETUPS
@pytest.mark.parametrize("weights, message", [
    ([1, 2, 1, 1.0], r"sample weights above 1 would raise the sensitivity.*"
                     r"use weights in \[0, 1\]"),
    ([1, -0.5, 1, 1.0], r"sample weights must be >= 0"),
    ([1, np.nan, 1, 1.0], r"sample weights must be finite numbers in \[0, 1\] "
                          r"\(0 = padding\); got NaN or Inf"),
    ([1, 1, np.inf, 1.0], r"sample weights must be finite numbers.*got NaN or Inf"),
    ([1, 1, -np.inf, 1.0], r"sample weights must be finite numbers.*got NaN or Inf"),
])
def test_sample_weight_outside_zero_one(optimizer, jit_compile, weights, message):
    model = classifier(optimizer=optimizer, jit_compile=jit_compile)
    before = state(model)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as raised:
        model.fit(X, Y, sample_weight=np.array(weights), batch_size=4, verbose=0)
    # One problem, one message: a NaN must not also be called "above 1".
    assert len(re.findall("DPModel:", str(raised.value))) == 1
    assert_nothing_written(model, before)


@STEP_SETUPS
@pytest.mark.parametrize("labels", [[0, 1, 3, 1], [0, 1, -1, 1], [0, 1, 7, 1],
                                    [0, 1, 3.0, 1], [0, 1, np.nan, 1]])
def test_class_id_out_of_range(optimizer, jit_compile, labels):
    # Under XLA, label 7 of 3 classes gave a NaN loss: the example was
    # dropped, counted as non-finite, and the update applied.
    model = classifier(optimizer=optimizer, jit_compile=jit_compile)
    before = state(model)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"class ids must be in \[0, 3\) for a model with "
                             r"3 outputs\. Fix the labels"):
        model.fit(X, np.array(labels), batch_size=4, verbose=0)
    assert_nothing_written(model, before)
    assert model.nonfinite_examples == 0


@STEP_SETUPS
@pytest.mark.parametrize("labels", [[0, 1, 2.5, 1], [0.25, 1, 2, 1]])
def test_float_class_id_that_is_not_a_whole_number(optimizer, jit_compile,
                                                    labels):
    # Keras' sparse cross-entropy casts labels to int: 2.5 trained as class 2.
    model = classifier(optimizer=optimizer, jit_compile=jit_compile)
    before = state(model)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"class ids given as floats must be whole numbers"):
        model.fit(X, np.array(labels, np.float32), batch_size=4, verbose=0)
    assert_nothing_written(model, before)


def test_float_class_ids_that_are_whole_numbers_train_as_integers():
    as_float = classifier(seed=7)
    as_int = classifier(seed=7)
    as_float.fit(X, Y.astype(np.float32), batch_size=4, shuffle=False, verbose=0)
    as_int.fit(X, Y, batch_size=4, shuffle=False, verbose=0)
    assert as_float.update_count == as_int.update_count == 1
    for a, b in zip(state(as_float), state(as_int)):
        np.testing.assert_array_equal(a, b)


def test_float_targets_of_other_losses_are_not_read_as_class_ids():
    # One-hot (or soft) targets with categorical cross-entropy: 0.5 is fine.
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, microbatch_size=2)
    inputs = keras.Input((3,))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(3)(inputs),
                        dp_config=config)
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(
        from_logits=True))
    soft = np.array([[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1], [0.25, 0.75, 0]],
                    np.float32)
    model.fit(X, soft, batch_size=4, verbose=0)
    assert model.update_count == 1


def test_nan_or_inf_in_input_arrays():
    images = np.zeros((5, 2, 2), np.float32)
    images[3, 1, 0] = np.inf
    with pytest.raises(ValueError, match=r"The images of 1 examples contain "
                                         r"NaN or Inf, e.g. example 3\. Fix"):
        data.ExampleSource.from_arrays(images, np.zeros(5, int))
    labels = np.zeros((5, 2), np.float32)
    labels[0, 1] = np.nan
    with pytest.raises(ValueError, match="The labels of 1 examples contain"):
        data.ExampleSource.from_arrays(np.zeros((5, 2, 2)), labels)


def linear(noise=0.0, batch=4):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=batch, microbatch_size=2)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, kernel_initializer="zeros")(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    return model


def weights(model):
    return np.concatenate([v.numpy().ravel()
                           for v in model.trainable_variables])


def test_nonfinite_gradient_contributes_zero_and_is_reported(capsys):
    # Two updates, one NaN example in each: Keras would keep only the last
    # update's count (1); the logger reports the epoch's 2, labelled.
    x = np.ones((8, 3), np.float32)
    x[1, 0], x[6, 2] = np.nan, -np.inf
    y = np.ones((8, 1), np.float32)
    model = linear()
    logger = dpf.callbacks.PrivacyLogger(num_examples=8, delta=1e-3)
    history = model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
                        callbacks=[logger])
    assert history.history["nonfinite_examples"] == [2.0]
    assert np.all(np.isfinite(weights(model)))
    out = capsys.readouterr().out
    assert "nonfinite_examples of training batches are computed on training " \
           "data" in out and "outside the DP guarantee" in out
    assert ("2 training examples had a NaN or Inf gradient (check inputs and "
            "labels for NaN/Inf) and contributed zero") in out
    assert "diagnostic on training data, outside the DP guarantee" in out

    # The same run without those two examples gives the same weights.
    clean = linear()
    mask = np.ones(8, np.float32)
    mask[[1, 6]] = 0
    clean.fit(np.nan_to_num(x, posinf=0, neginf=0), y, sample_weight=mask,
              batch_size=4, shuffle=False, verbose=0)
    np.testing.assert_allclose(weights(model), weights(clean), rtol=1e-6)


def test_nonfinite_count_covers_every_step_of_a_multi_step_execution(tmp_path, capsys):
    # Three updates per Keras call (steps_per_execution=3): the callbacks see
    # the logs of the third step only. Updates 1, 2 and 3 hold 1, 2 and 0
    # NaN/Inf examples; update 4 (a second call) holds 1.
    x = np.ones((16, 3), np.float32)
    x[1, 0], x[5, 1], x[6, 2], x[13, 0] = np.nan, np.inf, -np.inf, np.nan
    y = np.ones((16, 1), np.float32)
    model = linear()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                  steps_per_execution=3)
    logger = dpf.callbacks.PrivacyLogger(num_examples=16, delta=1e-3)
    history = model.fit(x, y, batch_size=4, shuffle=False, verbose=0,
                        callbacks=[logger])
    assert model.update_count == 4
    assert model.nonfinite_examples == 4
    assert logger.nonfinite_examples == 4
    assert history.history["nonfinite_examples"] == [4.0]
    assert "4 training examples had a NaN or Inf gradient" in capsys.readouterr().out

    # A second fit: the model keeps its running count; the logger and the
    # epoch logs count this fit only (one NaN example in the 4 updates).
    x2 = np.ones((16, 3), np.float32)
    x2[9, 1] = np.nan
    history = model.fit(x2, y, batch_size=4, shuffle=False, verbose=0,
                        callbacks=[logger])
    assert model.nonfinite_examples == 5
    assert logger.nonfinite_examples == 1
    assert history.history["nonfinite_examples"] == [1.0]
    # Saved with the model, like the update count.
    path = str(tmp_path / "model.keras")
    model.save(path)
    assert keras.models.load_model(path).nonfinite_examples == 5


def test_huge_but_finite_example_moves_the_update_by_at_most_lr_c_over_b():
    x = np.ones((4, 3), np.float32)
    x[2] = [1e15, -1e15, 1e15]  # gradient norm ~3e15: finite, clipped to C
    y = np.ones((4, 1), np.float32)
    with_it, without_it = linear(), linear()
    with_it.fit(x, y, batch_size=4, verbose=0)
    without_it.fit(x, y, sample_weight=np.array([1, 1, 0, 1.0]), batch_size=4,
                   verbose=0)
    moved = np.linalg.norm(weights(with_it) - weights(without_it))
    assert 0 < moved <= LR * 1.0 / 4 * (1 + 1e-5)


def test_group_ids_out_of_range_or_missing():
    spec = {"sex": ("male", "female")}
    with pytest.raises(ValueError, match=r"must be in \[0, 2\).*e.g. 2 at "
                                         r"example 3"):
        data.ExampleSource.from_arrays(np.zeros((4, 2, 2)), np.arange(4),
                                       groups={"sex": [0, 1, 0, 2]},
                                       group_spec=spec)
    with pytest.raises(ValueError, match="do not match the GroupSpec"):
        data.ExampleSource.from_arrays(np.zeros((4, 2, 2)), np.arange(4),
                                       groups={}, group_spec=spec)
    metric = GroupedAUC({"sex": ["male", "female"], "age": ["young", "old"]})
    y, p = np.array([0.0, 1.0]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="no group ids"):
        metric.update_state(y, p)
    with pytest.raises(ValueError, match=r"missing for attribute\(s\) "
                                         r"\['age'\]"):
        metric.update_state(y, p, groups={"sex": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"attribute `sex` must lie in \[0, 2\)"):
        metric.update_state(y, p, groups={"sex": [0, 5], "age": [0, 1]})


def test_delta_of_one_over_n_or_more_warns(capsys):
    logger = dpf.callbacks.PrivacyLogger(num_examples=8, delta=1 / 8,
                                         verbose=0)
    linear().fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=4, verbose=0,
                 callbacks=[logger])
    assert ("Warning: delta=0.125 >= 1/N=0.125: a guarantee this weak allows "
            "releasing an example outright.") in capsys.readouterr().out


def test_expected_batch_larger_than_the_dataset():
    with pytest.raises(ValueError, match="expected_batch_size=16 exceeds "
                                         "num_examples=8"):
        sampling.make_sampling_spec("poisson", 8, 16)
    model = linear(batch=16)
    logger = dpf.callbacks.PrivacyLogger(num_examples=8, delta=1e-3, verbose=0)
    with pytest.raises(ValueError, match="expected_batch_size 16 is larger "
                                         "than num_examples 8.*Use a logical "
                                         "batch of at most 8"):
        model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=8, verbose=0,
                  callbacks=[logger])
    assert model.update_count == 0  # refused before the first update


def test_microbatch_size_that_does_not_divide_the_static_batch():
    with pytest.raises(ValueError, match="padded_batch_size=10 is not a "
                                         "multiple of microbatch_size"):
        sampling.SamplingSpec(mode="poisson", num_examples=100,
                              expected_batch_size=8, sampling_probability=0.08,
                              steps_per_epoch=12, padded_batch_size=10,
                              overflow_probability=0.0, microbatch_size=4)
    source = data.ExampleSource.from_arrays(np.zeros((6, 2, 2)), np.arange(6))
    with pytest.raises(ValueError, match="batch_size must be a positive "
                                         "multiple of microbatch_size"):
        data.make_eval_dataset(source, batch_size=6, microbatch_size=4)


def test_missing_data_path(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"Fashion-MNIST: expected one of .*"
                             r"train-images-idx3-ubyte.* found none\. Nothing "
                             r"is downloaded; place the files there"):
        fashion_mnist.load(str(tmp_path / "nowhere"))


def test_a_run_without_noise_cannot_be_reported_as_private(capsys):
    statement = dpf.privacy.accounting.privacy_statement(
        noise_multiplier=0.0, sampling_probability=0.5, steps=2, delta=1e-3,
        sampling="poisson")
    assert statement.epsilon == float("inf")
    assert str(statement).startswith("NOT private: (epsilon=inf")
    with pytest.raises(ValueError, match="noise_multiplier is 0, so epsilon "
                                         "is infinite.*not private"):
        linear(noise=0.0).fit(
            np.ones((8, 3)), np.ones((8, 1)), batch_size=4, verbose=0,
            callbacks=[dpf.callbacks.PrivacyLogger(
                num_examples=8, delta=1e-3, target_epsilon=8.0)])
    logger = dpf.callbacks.PrivacyLogger(num_examples=8, delta=1e-3)
    history = linear(noise=0.0).fit(np.ones((8, 3)), np.ones((8, 1)),
                                    batch_size=4, verbose=0,
                                    callbacks=[logger])
    assert history.history["epsilon"] == [float("inf")]
    out = capsys.readouterr().out
    assert "this run is NOT private (epsilon = inf)" in out
    assert "Privacy: NOT private: (epsilon=inf" in out
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="PrivacyLogger needs a DPModel"):
        plain.fit(np.ones((8, 3)), np.ones((8, 1)), verbose=0,
                  callbacks=[dpf.callbacks.PrivacyLogger(num_examples=8,
                                                         delta=1e-3)])


def test_training_logs_carry_no_group_figures_even_when_batches_have_groups():
    rng = np.random.default_rng(1)
    source = data.ExampleSource.from_arrays(
        rng.uniform(size=(16, 2, 2)).astype(np.float32),
        rng.integers(0, 2, 16).astype(np.float32)[:, None],
        groups={"sex": rng.integers(0, 2, 16)},
        group_spec={"sex": ("male", "female")})
    train = data.make_train_dataset(source, expected_batch_size=4, seed=1,
                                    microbatch_size=4, num_steps=2,
                                    with_groups=True)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                          expected_batch_size=4, microbatch_size=4)
    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd",
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[GroupedAUC({"sex": ["male", "female"]},
                                      from_logits=True)])
    history = model.fit(train.dataset, verbose=0)
    assert model.update_count == 2
    assert not any("auc" in key for key in history.history)


def test_nonfinite_count_is_counted_once_over_two_replicas():
    # Two updates of 8 rows split over 2 replicas; NaN/Inf rows 1 (replica 0),
    # 6 (replica 1) and 12: three examples, whatever replica holds them.
    x = np.ones((16, 3), np.float32)
    x[1, 0], x[6, 2], x[12, 1] = np.nan, np.inf, np.nan
    y = np.ones((16, 1), np.float32)
    with conftest.mirrored_strategy().scope():
        model = linear(batch=8)
    logger = dpf.callbacks.PrivacyLogger(num_examples=16, delta=1e-3, verbose=0)
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0,
                        callbacks=[logger])
    assert model.update_count == 2
    assert model.nonfinite_examples == 3 and logger.nonfinite_examples == 3
    assert history.history["nonfinite_examples"] == [3.0]


def test_several_steps_per_execution_under_several_replicas_are_refused():
    # Keras 3.15's fit fails inside its step loop with steps_per_execution > 1
    # under a strategy with several replicas (keras-team/keras#19246).
    x, y = np.ones((16, 3), np.float32), np.ones((16, 1), np.float32)
    message = (r"steps_per_execution=3 is not supported under MirroredStrategy "
               r"with 2 replicas: Keras 3's fit fails with more than one step "
               r"per call under a tf.distribute strategy with several replicas "
               r"\(keras-team/keras#19246\)\. Use steps_per_execution=1\.")
    with conftest.mirrored_strategy().scope():
        model = linear(batch=8)
        with pytest.raises(ValueError, match=message):
            model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                          steps_per_execution=3)
    # Compiled outside the scope: the model still trains under its strategy.
    with pytest.raises(ValueError, match=message):
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=3)
    # Set after compile: refused when fit builds its train function.
    model.steps_per_execution = 3
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, batch_size=8, verbose=0)
    assert model.update_count == 0
    model.steps_per_execution = 1
    model.fit(x, y, batch_size=8, verbose=0)
    assert model.update_count == 2


def test_several_steps_per_execution_on_one_replica_are_accepted():
    # One replica under a strategy works in Keras 3.15, so it is not refused;
    # 4 updates in two calls of 3 steps (the second call has 1 batch left).
    x, y = np.ones((16, 3), np.float32), np.ones((16, 1), np.float32)
    x[5, 1] = np.nan
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        model = linear()
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse",
                      steps_per_execution=3)
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert model.update_count == 4
    assert model.nonfinite_examples == 1
