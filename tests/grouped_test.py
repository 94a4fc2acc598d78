"""NonPrivateModel: plain Keras training, group-aware evaluation like DPModel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf


def data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    sex = rng.integers(0, 2, size=n).astype(np.int32)
    return x, y, sex


def functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def test_trains_exactly_like_plain_keras_and_evaluates_groups(tmp_path):
    x, y, sex = data()
    model = dpf.make_non_private(functional())
    plain = functional()
    for m in (model, plain):
        m.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[dpf.fairness.streaming_auc.GroupedAUC({"sex": ["m", "f"]},
                                                  from_logits=True)]
                  if m is model else None)
    grouped = tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": {"sex": sex}})).batch(50)
    history = model.fit(grouped, epochs=2, validation_data=grouped, verbose=0)
    plain.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(50), epochs=2,
              verbose=0)
    for a, b in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert "val_auc/sex/f" in history.history
    assert not any(k.startswith("auc") for k in history.history)

    path = str(tmp_path / "np.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, dpf.NonPrivateModel)
    np.testing.assert_allclose(loaded.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6)


def test_make_non_private_needs_a_functional_model():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="needs a built functional"):
        dpf.make_non_private(Sub())
