"""fit's progress line: headline figures printed, every figure still in History."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.fairness.streaming_auc import GroupedAUC
from tf_dpfair.training import diagnostics
from tf_dpfair.training import progress

GROUPS = {"sex": ["female", "male"]}
N = 40


def grouped_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 3)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    sex = np.array([0, 1] * (N // 2), np.int32)
    return tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": {"sex": sex}})).batch(20)


def auc_metric():
    return GroupedAUC(GROUPS, from_logits=True)


def dp_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=20, microbatch_size=5)
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs),
                        dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[auc_metric()])
    return model


def non_private_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = dpf.make_non_private(keras.Model(inputs, keras.layers.Dense(1)(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[auc_metric()])
    return model


def printed_keys(text):
    """The `name: value` keys of Keras' progress lines in `text`."""
    return {part.split(":")[0].strip() for line in text.splitlines()
            for part in line.split(" - ")[1:] if ":" in part}


def test_headline_keys_have_no_slash():
    assert progress.is_headline("loss") and progress.is_headline("val_auc")
    assert progress.is_headline("epsilon") and progress.is_headline("ema_val_auc")
    assert not progress.is_headline("val_auc/sex/female")
    assert not progress.is_headline("auc_gap/sex")
    assert not progress.is_headline(diagnostics.PREFIX + "clip_fraction")
    logs = {"loss": 1.0, "val_auc/sex/male": 0.5}
    assert progress.headline(logs) == {"loss": 1.0}
    assert logs == {"loss": 1.0, "val_auc/sex/male": 0.5}  # a copy is filtered
    assert progress.headline(None) is None


@pytest.mark.parametrize("verbose", [2, 1])
def test_dp_fit_prints_headlines_and_history_keeps_every_key(verbose, capsys):
    model = dp_model()
    data = grouped_data()
    history = model.fit(data, epochs=2, steps_per_epoch=2, validation_data=data,
                        verbose=verbose,
                        callbacks=[diagnostics.GroupDiagnostics(GROUPS)])
    out = capsys.readouterr().out
    keys = printed_keys(out)
    assert {"loss", "val_loss", "val_auc"} <= keys, out
    assert not any("/" in key for key in keys), out
    assert "train_diagnostics" not in out and "val_auc/sex" not in out
    # History (and so TensorBoard and CSVLogger) gets every figure.
    assert "val_auc/sex/female" in history.history
    assert "val_auc_gap/sex" in history.history
    assert diagnostics.PREFIX + "sex/male/clip_fraction" in history.history


def test_non_private_fit_prints_headlines(capsys):
    model = non_private_model()
    data = grouped_data()
    history = model.fit(data, epochs=1, validation_data=data, verbose=2)
    out = capsys.readouterr().out
    assert "val_auc" in printed_keys(out), out
    assert "val_auc/sex" not in out
    assert "val_auc/sex/male" in history.history


def test_verbose_0_prints_nothing(capsys):
    model = non_private_model()
    model.fit(grouped_data(), epochs=1, validation_data=grouped_data(), verbose=0)
    assert capsys.readouterr().out == ""


def test_a_progbar_of_ones_own_is_kept(capsys):
    model = non_private_model()
    own = keras.callbacks.ProgbarLogger()
    data = grouped_data()
    model.fit(data, epochs=1, validation_data=data, verbose=2, callbacks=[own])
    out = capsys.readouterr().out
    assert "val_auc/sex/male" in out  # Keras' own bar prints every key


def test_with_headline_progbar_adds_a_bar_only_where_keras_would():
    assert progress.with_headline_progbar(None, 0) is None
    added = progress.with_headline_progbar(None, "auto")
    assert [type(c) for c in added] == [progress.HeadlineProgbarLogger]
    own = [keras.callbacks.ProgbarLogger()]
    assert progress.with_headline_progbar(own, 2) is own
    given = keras.callbacks.CallbackList([])
    assert progress.with_headline_progbar(given, 1) is given
    history = keras.callbacks.History()
    callbacks = [history]
    assert progress.with_headline_progbar(callbacks, 1)[0] is history
    assert callbacks == [history]  # the caller's list is not changed
