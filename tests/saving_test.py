"""Saving, loading and resuming a DPModel without losing its privacy state."""

import os

import keras
import numpy as np
import pytest

import tf_dpfair as dpf


def make_model():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.5,
                          expected_batch_size=8, microbatch_size=4,
                          ema_decay=0.9)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="relu")(inputs)
    outputs = keras.layers.Dense(2)(h)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"])
    return model


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(32, 4)).astype(np.float32),
            rng.integers(0, 2, size=32))


def test_keras_file_round_trip_keeps_config_count_ema_and_weights(tmp_path):
    model = make_model()
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, dpf.DPModel)
    assert loaded.update_count == 4
    assert loaded.dp_config.l2_norm_clip == 1.0
    assert loaded.dp_config.ema_decay == 0.9
    assert loaded.dp_config.seed != model.dp_config.seed  # never saved
    for a, b in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with model.ema_weights(), loaded.ema_weights():
        np.testing.assert_array_equal(loaded.trainable_variables[0].numpy(),
                                      model.trainable_variables[0].numpy())
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert loaded.update_count == 8


def test_make_private_subclassed_round_trip(tmp_path):
    @keras.saving.register_keras_serializable(package="saving_test")
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.5,
                          expected_batch_size=8)
    model = dpf.make_private(Net(), config)
    model.compile(optimizer="sgd", loss="mse")
    x, _ = data()
    model.fit(x, np.zeros((32, 2), np.float32), batch_size=8, verbose=0)
    path = os.path.join(tmp_path, "sub.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, dpf.PrivateModel)
    assert loaded.update_count == 4
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6)


class StopAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_backup_and_restore_resumes_update_count_and_epsilon(tmp_path):
    x, y = data()
    backup = str(tmp_path / "backup")
    logger = dpf.callbacks.PrivacyLogger(num_examples=32, delta=1e-3, verbose=0)
    model = make_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(backup),
                             StopAtEpoch(2), logger])
    assert model.update_count == 8

    resumed = make_model()  # a fresh process would start like this
    history = resumed.fit(x, y, batch_size=8, epochs=3, verbose=0,
                          callbacks=[keras.callbacks.BackupAndRestore(backup),
                                     logger])
    assert resumed.update_count == 12
    assert len(history.history["epsilon"]) == 1  # only the third epoch ran
    # Keras' shuffled batches of 8 from 32 examples: passes of 4 updates; the
    # restored run starts its third pass afresh, so 3 participations.
    assert resumed.participations == 3
    want = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=0.5, participations=3, steps=12, delta=1e-3,
        sampling="shuffle")
    assert history.history["epsilon"][-1] == pytest.approx(want)


def test_model_checkpoint_saves_a_loadable_dp_model(tmp_path):
    x, y = data()
    path = str(tmp_path / "ckpt.keras")
    model = make_model()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.models.load_model(path)
    assert loaded.update_count == 8
