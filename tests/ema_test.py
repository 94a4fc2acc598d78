"""Tests of EMA shadows: warm-up formula, evaluation swap, restoring weights."""

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import tf_dpfair as dpf
from tf_dpfair.training import ema


def linear_model(ema_decay):
    config = dpf.DPConfig(l2_norm_clip=10.0, noise_multiplier=0.0,
                          expected_batch_size=8, microbatch_size=4,
                          ema_decay=ema_decay)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, kernel_initializer="ones")(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


class RecordWeights(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.values.append([v.numpy().copy()
                            for v in self.model.trainable_variables])

    def on_train_begin(self, logs=None):
        self.values = [[v.numpy().copy()
                        for v in self.model.trainable_variables]]


def test_warmup_decay_values():
    got = [float(ema.warmup_decay(0.9999, t)) for t in (0, 1, 10, 10**6)]
    want = [1 / 10, 2 / 11, 11 / 20, 0.9999]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_shadows_follow_the_warmup_formula_and_swap_back():
    model = linear_model(ema_decay=0.5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = rng.normal(size=(24, 1)).astype(np.float32)
    recorder = RecordWeights()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder])
    shadow = recorder.values[0]
    for t, weights in enumerate(recorder.values[1:]):
        d = min(0.5, (1 + t) / (10 + t))
        shadow = [d * s + (1 - d) * w for s, w in zip(shadow, weights)]
    raw = [v.numpy().copy() for v in model.trainable_variables]
    with model.ema_weights():
        inside = [v.numpy().copy() for v in model.trainable_variables]
    for got, want in zip(inside, shadow):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(model.trainable_variables, raw):
        np.testing.assert_array_equal(got.numpy(), want)
    assert not np.allclose(inside[0], raw[0])


def test_ema_evaluation_callback_adds_ema_metrics():
    model = linear_model(ema_decay=0.9)
    x = np.ones((16, 3), np.float32)
    y = np.zeros((16, 1), np.float32)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        callbacks=[dpf.callbacks.EMAEvaluation((x, y))])
    assert len(history.history["val_ema_loss"]) == 2
    with model.ema_weights():
        direct = model.evaluate(x, y, verbose=0)
    assert history.history["val_ema_loss"][-1] == pytest.approx(direct, rel=1e-5)


def scalars(run_dir):
    """{tag: [values by epoch]} of the scalars in one TensorBoard run."""
    accumulator = event_accumulator.EventAccumulator(str(run_dir))
    accumulator.Reload()
    return {tag: [float(tensor_util.make_ndarray(event.tensor_proto))
                  for event in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def test_tensorboard_writes_ema_figures_to_the_validation_run(tmp_path):
    # Keras' TensorBoard sends keys starting with "val_" to its validation
    # run; EMA figures named "ema_val_..." landed among the training figures.
    model = linear_model(ema_decay=0.9)
    x = np.ones((16, 3), np.float32)
    y = np.zeros((16, 1), np.float32)
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[dpf.callbacks.EMAEvaluation((x, y)),
                   keras.callbacks.TensorBoard(tmp_path, write_graph=False,
                                               profile_batch=0)])
    train, validation = scalars(tmp_path / "train"), scalars(tmp_path / "validation")
    assert not any("ema" in tag for tag in train)
    assert "epoch_loss" in train
    assert validation["epoch_ema_loss"] == pytest.approx(
        history.history["val_ema_loss"], rel=1e-6)
    assert validation["epoch_loss"] == pytest.approx(
        history.history["val_loss"], rel=1e-6)
    # Two different figures: EMA weights trail the current ones.
    assert validation["epoch_ema_loss"] != pytest.approx(validation["epoch_loss"])


def test_ema_weights_without_ema_is_refused():
    model = linear_model(ema_decay=None)
    with pytest.raises(ValueError, match="keeps no EMA weights"):
        with model.ema_weights():
            pass
