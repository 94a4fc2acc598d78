"""The privacy ledger: the review's cases 2-7, each against dp_accounting.

Every expected epsilon is computed here straight from `dp_accounting` for
what the test really ran; the old code stated less than that in each case.
"""

import os

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.privacy import ledger

DELTA = 1e-5


def rdp_eps(*events, delta=DELTA):
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(list(events)))
    return accountant.get_epsilon(delta)


def gaussians(count, sigma=1.0):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(sigma), count)


def poisson(count, q, sigma=1.0):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        count)


def config(batch=10, noise=1.0, **kwargs):
    return dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                        expected_batch_size=batch, microbatch_size=5, **kwargs)


def base_model(features=4):
    return keras.Sequential([keras.Input((features, 1, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1)])


def private(base=None, **kwargs):
    model = dpf.make_private(base or base_model(), config(**kwargs))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def arrays(n, features=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, features, 1, 1)).astype("float32"),
            rng.normal(size=(n, 1)).astype("float32"))


def source(n, features=4):
    x, y = arrays(n, features)
    return dpf.data.ExampleSource.from_arrays(
        (np.abs(x) * 50).astype(np.uint8), np.zeros(n, int))


class Deltas(keras.callbacks.Callback):
    """The weight change of every update (the noise, when weights are 0)."""

    def __init__(self):
        super().__init__()
        self.deltas = []

    def on_train_batch_begin(self, batch, logs=None):
        self._before = np.concatenate([w.ravel() for w in self.model.get_weights()
                                       if w.dtype == np.float32 and w.ndim])

    def on_train_batch_end(self, batch, logs=None):
        after = np.concatenate([w.ravel() for w in self.model.get_weights()
                                if w.dtype == np.float32 and w.ndim])
        self.deltas.append(after - self._before)


# ---------------------------------------------------------------- the Ledger itself


def test_absorbing_an_older_copy_changes_nothing_and_another_history_adds():
    live = ledger.Ledger()
    first = live.append(sampling="poisson", source="pipeline",
                        noise_multiplier=1.0, sampling_probability=0.1)
    live.record(first.segment_id, 10)
    older = ledger.Ledger.from_table(live.to_table())
    later = live.append(sampling="passes", source="arrays", noise_multiplier=1.0,
                        updates_per_pass=4, first_noise_index=10)
    live.record(later.segment_id, 8)
    assert live.absorb(older) is False and live.total_updates == 18
    with pytest.raises(ValueError, match="only grows"):
        live.record(later.segment_id, 7)
    other = ledger.Ledger()
    theirs = other.append(sampling="passes", source="unstated",
                          noise_multiplier=2.0, updates_per_pass=1)
    other.record(theirs.segment_id, 3)
    assert live.absorb(other) is True
    assert live.total_updates == 21 and live.participations == 10 + 2 + 3


def test_table_round_trip_and_compaction_never_lowers_epsilon():
    live = ledger.Ledger()
    rng = np.random.default_rng(0)
    for i in range(ledger.TABLE_ROWS + 20):
        if i % 2:
            fields = {"sampling": "poisson", "sampling_probability": float(rng.uniform(0.01, 0.2))}
        else:
            fields = {"sampling": "passes", "updates_per_pass": int(rng.integers(1, 6)),
                      "pass_offset": int(rng.integers(0, 3))}
        segment = live.append(source="pipeline", noise_multiplier=float(rng.uniform(1, 3)),
                              **fields)
        live.record(segment.segment_id, int(rng.integers(1, 5)))
    exact = live.statement(DELTA).epsilon
    saved = ledger.Ledger.from_table(live.to_table())
    assert len(saved.segments) < ledger.TABLE_ROWS
    assert saved.statement(DELTA).epsilon >= exact
    short = ledger.Ledger(live.segments[:30], root=live.root)
    assert ledger.Ledger.from_table(short.to_table()).segments == short.segments


def test_legacy_counts_load_as_a_conservative_ledger():
    # A model saved before the ledger: 12 updates, 3 passes, not Poisson.
    legacy = ledger.Ledger.from_legacy(update_count=12, participations=3,
                                       non_poisson_updates=12, noise_multiplier=1.0)
    assert legacy.total_updates == 12 and legacy.participations >= 3
    # Poisson updates whose q was not saved: every one unamplified.
    legacy = ledger.Ledger.from_legacy(update_count=12, participations=12,
                                       non_poisson_updates=0, noise_multiplier=1.0)
    assert legacy.statement(DELTA).epsilon == pytest.approx(rdp_eps(gaussians(12)))


# ---------------------------------------------------------------- the review's cases


def test_case2_early_stopping_restore_keeps_every_update_and_never_repeats_noise():
    # 40 examples in batches of 10 with weight 0: each update is its noise
    # alone, so a repeated draw would show as a repeated weight change.
    x, y = arrays(40)
    zero = np.zeros(40, np.float32)

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = [3.0, 2.0, 1.0][epoch]  # epoch 1 is the best

    model = private(seed=7)
    deltas = Deltas()
    model.fit(x, y, sample_weight=zero, batch_size=10, epochs=3, verbose=0,
              callbacks=[Score(), keras.callbacks.EarlyStopping(
                  monitor="score", mode="max", patience=5,
                  restore_best_weights=True), deltas])
    assert model.update_count == 12  # the old code restored it to 4
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    model.fit(x, y, sample_weight=zero, batch_size=10, epochs=1, verbose=0,
              callbacks=[deltas, logger])
    assert model.update_count == 16
    # 3 passes of 4 updates, then a fit that starts a fourth.
    assert logger.statement().epsilon == pytest.approx(rdp_eps(gaussians(4)))
    assert logger.statement().epsilon >= rdp_eps(gaussians(3))
    changes = np.array(deltas.deltas)
    assert np.all(np.abs(changes).max(axis=1) > 0)
    for i in range(len(changes)):
        for j in range(i):
            assert not np.allclose(changes[i], changes[j]), (i, j)


def test_case3_arrays_with_steps_per_epoch_are_accounted_as_keras_batches_them():
    # No batch_size: Keras cuts 256 rows into ceil(256 / 2) = 128-row batches.
    x, y = arrays(256)
    model = private(batch=128)
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    model.fit(x, y, steps_per_epoch=2, epochs=4, verbose=0, callbacks=[logger])
    statement = logger.statement()
    assert (statement.steps, statement.participations) == (8, 4)  # old: 1
    assert statement.epsilon == pytest.approx(rdp_eps(gaussians(4)))
    assert model.privacy_ledger.segments[-1].row_limit == 128


def test_case4_heterogeneous_q_is_composed_and_budget_guard_agrees(tmp_path):
    model = private(base_model(features=2))
    small = dpf.data.make_train_dataset(source(100, 2), expected_batch_size=10,
                                        seed=1, microbatch_size=5)
    model.fit(small, epochs=5, steps_per_epoch=10, verbose=0)
    first = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    first.set_model(model)
    after_first = first.statement().epsilon
    assert after_first == pytest.approx(rdp_eps(poisson(50, 0.1)), rel=1e-6)
    large = dpf.data.make_train_dataset(source(1000, 2), expected_batch_size=10,
                                        seed=2, microbatch_size=5, start_step=50)
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    guard = dpf.callbacks.BudgetGuard(target_epsilon=50.0,
                                      save_path=str(tmp_path / "m.keras"),
                                      delta=DELTA, verbose=0)
    model.fit(large, epochs=1, steps_per_epoch=50, verbose=0,
              callbacks=[logger, guard])
    want = rdp_eps(poisson(50, 0.1), poisson(50, 0.01))
    assert logger.statement().epsilon == pytest.approx(want, rel=1e-6)
    assert logger.statement().epsilon > after_first  # old: fell to q=0.01's
    assert guard.statement().epsilon == logger.statement().epsilon


def test_case5_a_stated_pipeline_with_larger_batches_than_accounted_is_refused():
    x, y = arrays(200)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(200, seed=0).batch(40)
    model = private(batch=4)
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, sampling="shuffle",
                                         num_examples=200, verbose=0)
    with pytest.raises(ValueError, match=r"40 rows > 4 allowed"):
        model.fit(batches, epochs=10, verbose=0, callbacks=[logger])
    assert model.update_count == 0  # refused before anything was applied


def test_case6_a_new_wrapper_of_trained_weights_continues_their_ledger():
    x, y = arrays(60)
    base = base_model()
    first = private(base)
    first.fit(x, y, batch_size=10, epochs=10, verbose=0)  # 60 updates, 10 passes
    again = private(base)
    assert again.update_count == 60  # the old wrapper started at 0
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    again.fit(x, y, batch_size=10, epochs=5, verbose=0, callbacks=[logger])
    assert again.update_count == 90
    assert logger.statement().epsilon == pytest.approx(rdp_eps(gaussians(15)))


def test_case7_an_update_applied_before_a_refused_batch_is_in_the_ledger():
    x, y = arrays(20)
    weights = np.ones(20, np.float32)
    weights[10:] = 2.0  # the second batch is refused
    model = dpf.make_private(base_model(), config())
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    with pytest.raises(Exception, match="above 1"):
        model.fit(x, y, sample_weight=weights, batch_size=10, shuffle=False,
                  epochs=1, verbose=0)
    assert model.update_count == 1 and model.privacy_ledger.total_updates == 1
    model.compile(optimizer="sgd", loss="mse")
    train = dpf.data.make_train_dataset(source(100), expected_batch_size=10,
                                        seed=3, microbatch_size=5, start_step=1)
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    model.fit(train, epochs=1, steps_per_epoch=20, verbose=0, callbacks=[logger])
    want = rdp_eps(gaussians(1), poisson(20, 0.1))
    assert logger.statement().epsilon == pytest.approx(want, rel=1e-6)


def test_saved_model_and_weights_carry_the_ledger_and_loading_never_shortens_it(tmp_path):
    x, y = arrays(40)
    model = private()
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    model.save_weights(tmp_path / "early.weights.h5")
    model.fit(x, y, batch_size=10, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    model.load_weights(tmp_path / "early.weights.h5")  # a rollback
    assert model.update_count == 12
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.update_count == 12
    assert [s.updates for s in loaded.privacy_ledger.segments] == [4, 8]
    fresh = private()
    fresh.load_weights(tmp_path / "early.weights.h5")
    assert fresh.update_count == 4


def test_an_assigned_ledger_weight_cannot_shorten_the_ledger():
    x, y = arrays(40)
    model = private()
    model.fit(x, y, batch_size=10, epochs=2, verbose=0)
    model._ledger_table.assign(np.zeros(model._ledger_table.shape))
    assert model.update_count == 8
    model._ledger_table.assign(np.full(model._ledger_table.shape, 7.0))
    assert model.update_count == 8


def test_a_spec_stated_for_a_transformed_pipeline_stays_the_users_word():
    train = dpf.data.make_train_dataset(source(40), expected_batch_size=10,
                                        seed=4, microbatch_size=5)
    transformed = train.dataset.map(lambda x, y, w: (x, y, w))  # loses the tag
    model = private()
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, sampling_spec=train.spec,
                                         verbose=0)
    model.fit(transformed, epochs=1, steps_per_epoch=3, verbose=0,
              callbacks=[logger])
    text = str(logger.statement())
    assert "rests on the user's statement" in text
    assert "as stated by the user" in text
    # The package's own pipeline needs no such sentence.
    own = private()
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    own.fit(train, epochs=1, steps_per_epoch=3, verbose=0, callbacks=[logger])
    assert "user's statement" not in str(logger.statement())


def test_a_model_saved_before_the_ledger_loads_with_a_conservative_one():
    # tests/fixtures/saved_before_the_ledger.keras: a DPModel (EMA on) saved
    # by the package before the ledger, after 12 updates of arrays in
    # batches of 10 from 40 examples: 3 passes, none Poisson.
    path = os.path.join(os.path.dirname(__file__), "fixtures",
                        "saved_before_the_ledger.keras")
    model = keras.models.load_model(path)
    assert model.update_count == 12 and model.participations >= 3
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, verbose=0)
    x, y = arrays(40)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[logger])
    assert model.update_count == 16
    assert logger.statement().epsilon >= rdp_eps(gaussians(4)) - 1e-9
    with model.ema_weights():  # the shadows loaded beside the ledger
        assert all(np.isfinite(w).all() for w in model.get_weights())


def test_updates_of_a_custom_loop_calling_train_step_are_in_the_ledger():
    x, y = arrays(10)
    model = private()
    model(x)  # built
    step = tf.function(model.train_step)
    for _ in range(3):
        step((tf.constant(x), tf.constant(y), tf.ones(10)))
    assert model.update_count == 3
    (segment,) = model.privacy_ledger.segments
    assert (segment.source, segment.updates_per_pass) == ("unstated", 1)
    assert segment.dp_event() == gaussians(3)


def test_an_oversized_batch_moves_nothing_where_xla_drops_the_refusal():
    # On a TPU the whole step is compiled with XLA, which drops assertions:
    # the step then multiplies the update (noise included) by 0 and still
    # counts it, so its noise index is never drawn again.
    x, y = arrays(8)
    model = private()
    model(x)
    model._step_row_limit().assign(4)  # as a segment allowing 4 rows would
    batch = (tf.constant(x), tf.constant(y), tf.ones(8))
    before = [v.numpy().copy() for v in model.trainable_variables]
    tf.function(model.train_step, jit_compile=True)(batch)
    after = [v.numpy() for v in model.trainable_variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert model.update_count == 1
    with pytest.raises(tf.errors.InvalidArgumentError, match="8.*rows >.*4"):
        tf.function(model.train_step)(batch)  # a plain graph refuses it
    assert model.update_count == 1
