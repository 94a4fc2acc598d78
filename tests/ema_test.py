"""Tests of EMA shadows: warm-up formula, evaluation swap, restoring weights."""

import os

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import tf_dpfair as dpf
from tf_dpfair.training import ema


def linear_model(ema_decay, **warmup):
    config = dpf.DPConfig(l2_norm_clip=10.0, noise_multiplier=0.0,
                          expected_batch_size=8, microbatch_size=4,
                          ema_decay=ema_decay, **warmup)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, kernel_initializer="ones")(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


class RecordWeights(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.values.append([v.numpy().copy()
                            for v in self.model.trainable_variables])
        self.logged.append(logs.get("ema_decay"))

    def on_train_begin(self, logs=None):
        self.values = [[v.numpy().copy()
                        for v in self.model.trainable_variables]]
        self.logged = []


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
    # The decay the update applied is a training figure; no EMA evaluation is.
    assert not any("ema" in tag for tag in train if tag != "epoch_ema_decay")
    assert train["epoch_ema_decay"] == pytest.approx([2 / 11, 4 / 13], rel=1e-6)
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


# d_t = min(decay, (1 + t) / (h + t)) at t = 0, 1, 19, 199, worked out by hand.
BY_HAND = [
    # (decay, horizon h, [d_0, d_1, d_19, d_199])
    (0.99, 10, [1 / 10, 2 / 11, 20 / 29, 200 / 209]),     # 0.1, 0.18, 0.69, 0.957
    (0.9, 10, [1 / 10, 2 / 11, 20 / 29, 0.9]),            # 200/209 > 0.9: capped
    (0.9999, 100, [1 / 100, 2 / 101, 20 / 119, 200 / 299]),
    (0.5, 2.5, [1 / 2.5, 0.5, 0.5, 0.5]),                 # 2/3.5 > 0.5: capped
]


@pytest.mark.parametrize("decay, horizon, want", BY_HAND)
def test_decay_by_hand_for_two_horizons(decay, horizon, want):
    steps = [0, 1, 19, 199]
    in_graph = [float(ema.warmup_decay(decay, t, horizon)) for t in steps]
    np.testing.assert_allclose(in_graph, want, rtol=1e-6)  # float32
    # effective_decay counts updates made: the (t + 1)-th has t before it.
    python = [ema.effective_decay(decay, t + 1, horizon) for t in steps]
    np.testing.assert_allclose(python, want, rtol=1e-15)


def test_the_default_horizon_is_ten():
    assert float(ema.warmup_decay(0.99, 19)) == pytest.approx(20 / 29, rel=1e-6)
    assert ema.effective_decay(0.99, 20) == pytest.approx(20 / 29, rel=1e-15)


@pytest.mark.parametrize("off", [None, 0])
def test_without_warmup_the_decay_holds_from_the_first_update(off):
    assert float(ema.warmup_decay(0.99, 0, None)) == np.float32(0.99)
    assert ema.effective_decay(0.99, 1, off) == 0.99
    assert ema.effective_decay(0.99, 200, off) == 0.99


def test_averaging_horizon_and_description():
    # 20 updates at h = 10: d = 20/29, 1 / (1 - d) = 29/9 = 3.22 updates.
    assert ema.effective_averaging_horizon(20 / 29) == pytest.approx(29 / 9)
    assert ema.effective_averaging_horizon(0.99) == pytest.approx(100.0)
    assert ema.effective_averaging_horizon(0.0) == 1.0
    assert ema.describe(0.99, 20) == (
        "EMA 0.99 (warm-up 10) reached 0.6897 after 20 updates (averaging "
        "over about 3.2 updates)")
    assert ema.describe(0.9999, 1, None) == (
        "EMA 0.9999 (no warm-up) reached 0.9999 after 1 update (averaging "
        "over about 10,000 updates)")
    # 200 updates: d = 200/209, 1 / (1 - d) = 209/9 = 23.2.
    assert ema.describe(0.99, 200, 10).endswith("(averaging over about 23 updates)")


@pytest.mark.parametrize("call, message", [
    (lambda: ema.effective_decay(1.0, 5), r"^decay must be in \[0, 1\), got 1\.0\.$"),
    (lambda: ema.effective_decay(True, 5), r"^decay must be in \[0, 1\), got True\.$"),
    (lambda: ema.effective_decay(0.9, 0), r"^updates must be an integer >= 1 \(no "
                                          r"update has applied a decay before the "
                                          r"first\), got 0\.$"),
    (lambda: ema.effective_decay(0.9, 2.5), r"^updates must be an integer >= 1 .*got 2\.5\.$"),
    (lambda: ema.effective_decay(0.9, 3, 0.5), r"^warmup must be None, 0 or a finite "
                                               r"number >= 1, got 0\.5\.$"),
    (lambda: ema.effective_decay(0.9, 3, "10"), r"^warmup must be .*got '10'\.$"),
    (lambda: ema.effective_averaging_horizon(1.0),
     r"^decay_reached must be in \[0, 1\), got 1\.0\.$"),
    (lambda: ema.effective_averaging_horizon(float("nan")),
     r"^decay_reached must be in \[0, 1\), got nan\.$"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("decay, warmup, want", [
    # d_t for t = 0, 1, 2, by hand.
    (0.5, {}, [1 / 10, 2 / 11, 3 / 12]),                 # the default, h = 10
    (0.5, dict(ema_warmup=None), [0.5, 0.5, 0.5]),       # off
    (0.5, dict(ema_warmup=0), [0.5, 0.5, 0.5]),          # off
    (0.9, dict(ema_warmup=2), [1 / 2, 2 / 3, 3 / 4]),
])
def test_shadows_logs_and_decay_reached_follow_the_configured_warmup(
        decay, warmup, want):
    model = linear_model(ema_decay=decay, **warmup)
    assert model.ema_decay_reached is None  # no update yet
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = rng.normal(size=(24, 1)).astype(np.float32)
    recorder = RecordWeights()
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                        callbacks=[recorder])
    assert len(recorder.values) == 4  # the start and 3 updates
    shadow = [np.asarray(w, np.float64) for w in recorder.values[0]]
    for d, weights in zip(want, recorder.values[1:]):
        shadow = [d * s + (1 - d) * w for s, w in zip(shadow, weights)]
    with model.ema_weights():
        inside = [v.numpy().copy() for v in model.trainable_variables]
    for got, expected in zip(inside, shadow):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # The weights moved enough that a wrong d would show.
    assert np.abs(recorder.values[3][0] - recorder.values[0][0]).max() > 0.05
    np.testing.assert_allclose(recorder.logged, want, rtol=1e-6)
    assert history.history["ema_decay"] == pytest.approx([want[-1]], rel=1e-6)
    assert model.ema_decay_reached == pytest.approx(want[-1], rel=1e-15)


def test_a_second_fit_continues_the_warmup_count():
    model = linear_model(ema_decay=0.99)
    x, y = np.ones((16, 3), np.float32), np.zeros((16, 1), np.float32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    # Updates 3 and 4 (t = 2, 3): d = 4/13 for the last.
    assert history.history["ema_decay"] == pytest.approx([4 / 13], rel=1e-6)
    assert model.ema_decay_reached == pytest.approx(4 / 13, rel=1e-15)


def test_without_ema_nothing_is_logged_or_reached():
    model = linear_model(ema_decay=None)
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert "ema_decay" not in history.history
    assert model.ema_decay_reached is None


def test_a_model_saved_before_the_warmup_field_loads_with_horizon_ten():
    # tests/fixtures/saved_before_the_ledger.keras: EMA on, 12 updates, saved
    # before DPConfig had `ema_warmup`.
    path = os.path.join(os.path.dirname(__file__), "fixtures",
                        "saved_before_the_ledger.keras")
    model = keras.models.load_model(path)
    config = model.dp_config
    assert config.ema_warmup == 10.0 and config.ema_decay is not None
    assert model.update_count == 12
    assert model.ema_decay_reached == pytest.approx(
        min(config.ema_decay, 12 / 21), rel=1e-15)


@pytest.mark.parametrize("compile_on_load", [True, False])
def test_a_saved_model_with_ema_loads_its_shadows_with_or_without_compile(
        tmp_path, compile_on_load):
    model = linear_model(ema_decay=0.5, ema_warmup=0.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = rng.normal(size=(32, 1)).astype(np.float32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    raw = [v.numpy() for v in model.trainable_variables]
    with model.ema_weights():
        shadows = [v.numpy() for v in model.trainable_variables]
    assert not all(np.allclose(a, b) for a, b in zip(raw, shadows))  # they differ
    path = str(tmp_path / "ema.keras")
    model.save(path)
    loaded = keras.models.load_model(path, compile=compile_on_load)
    for a, b in zip(raw, loaded.trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())
    with loaded.ema_weights():
        for a, b in zip(shadows, loaded.trainable_variables):
            np.testing.assert_array_equal(a, b.numpy())
    assert loaded.update_count == model.update_count == 4
