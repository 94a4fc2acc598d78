"""Tests of PrivacyLogger: epsilon in the logs, budget stop, refusals, and a
statement whose sampling is how `fit` was really fed."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf


def make_model(noise=1.0, batch=10, input_shape=(2,)):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=batch, microbatch_size=5)
    inputs = keras.Input(input_shape)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    return model


X = np.ones((50, 2), np.float32)
Y = np.zeros((50, 1), np.float32)


def shuffle_eps(passes, noise=1.0, delta=1e-3):
    """Epsilon of `passes` unamplified Gaussian mechanisms, straight from dp_accounting."""
    import dp_accounting
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise), passes)
    return accountant.get_epsilon(delta)


def poisson_eps(steps, q, noise=1.0, delta=1e-3):
    return dpf.privacy.accounting.compute_epsilon(noise_multiplier=noise,
                                          sampling_probability=q, steps=steps,
                                          delta=delta, sampling="poisson")


def source(n=50):
    images = np.random.default_rng(0).random((n, 2, 1, 1)).astype("float32")
    return dpf.data.ExampleSource.from_arrays(images, np.zeros(n, int))


# ---------------------------------------------------------------- each way of feeding fit


def test_numpy_arrays_are_accounted_as_keras_shuffled_batches():
    # 50 examples in batches of 10: a new pass every 5 updates.
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    history = model.fit(X, Y, batch_size=10, epochs=2, verbose=0,
                        callbacks=[logger])
    assert history.history["epsilon"] == pytest.approx(
        [shuffle_eps(1), shuffle_eps(2)])
    assert model.update_count == 10
    statement = logger.statement()
    assert (statement.sampling, statement.participations) == ("shuffle", 2)
    assert statement.epsilon > 1.4 * poisson_eps(10, 0.2)  # the optimistic figure


def test_numpy_arrays_stated_poisson_are_refused_unless_accepted(capsys):
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="poisson",
                                         num_examples=50, verbose=0)
    with pytest.raises(ValueError, match="Keras shuffles them into fixed-size "
                                         "batches, which are not Poisson"):
        model.fit(X, Y, batch_size=10, verbose=0, callbacks=[logger])
    assert model.update_count == 0
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="poisson",
                                         num_examples=50, verbose=0,
                                         accept_shuffle_as_poisson=True)
    model.fit(X, Y, batch_size=10, epochs=2, verbose=0, callbacks=[logger])
    out = capsys.readouterr().out
    assert out.count("Poisson sampling is assumed on your word") == 1
    assert "make_train_dataset(mode='poisson')" in out
    assert logger.statement().epsilon == pytest.approx(poisson_eps(10, 0.2))


def test_package_poisson_pipeline_needs_only_delta(capsys):
    train = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5)
    model = make_model(input_shape=(2, 1, 1))
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3)
    model.fit(train, epochs=2, verbose=0, callbacks=[logger])
    assert model.update_count == 2 * train.spec.steps_per_epoch == 10
    statement = logger.statement()
    assert statement.sampling == "poisson"
    assert statement.epsilon == pytest.approx(poisson_eps(10, 0.2))
    out = capsys.readouterr().out
    assert "Poisson subsampling" in out and "Sampling: poisson" in out
    assert "on your word" not in out


def test_package_shuffle_pipeline_needs_only_delta():
    train = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5,
                                        mode="shuffle")
    model = make_model(input_shape=(2, 1, 1))
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    model.fit(train.dataset, epochs=3, verbose=0, callbacks=[logger])
    statement = logger.statement()
    assert (statement.sampling, statement.participations) == ("shuffle", 3)
    assert statement.epsilon == pytest.approx(shuffle_eps(3))


def test_a_spec_that_is_not_the_pipelines_is_refused():
    train = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5)
    other = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5,
                                        mode="shuffle")
    model = make_model(input_shape=(2, 1, 1))
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling_spec=other.spec)
    with pytest.raises(ValueError, match="not the spec of the pipeline"):
        model.fit(train, epochs=1, verbose=0, callbacks=[logger])
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="shuffle",
                                         num_examples=50)
    with pytest.raises(ValueError, match="sampling='shuffle' was stated, but "
                                         "the pipeline given to fit is "
                                         "accounted as 'poisson'"):
        model.fit(train, epochs=1, verbose=0, callbacks=[logger])
    assert model.update_count == 0


def test_own_tf_data_without_a_statement_is_refused_before_any_update():
    data = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50).batch(10)
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3)
    with pytest.raises(ValueError, match="nobody stated how it draws examples"):
        model.fit(data, verbose=0, callbacks=[logger])
    assert model.update_count == 0


def test_own_tf_data_stated_shuffle_and_poisson(capsys):
    data = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(50).batch(10)
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="shuffle",
                                         num_examples=50, verbose=0)
    model.fit(data, epochs=2, verbose=0, callbacks=[logger])
    assert logger.statement().epsilon == pytest.approx(shuffle_eps(2))
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="poisson",
                                         num_examples=50, verbose=0)
    model.fit(data, epochs=2, verbose=0, callbacks=[logger])
    assert capsys.readouterr().out.count("assumed on your word") == 1
    assert logger.statement().epsilon == pytest.approx(poisson_eps(10, 0.2))


def mixed_eps(events, delta=1e-3):
    """Epsilon of a composition, straight from dp_accounting's RDP accountant."""
    import dp_accounting
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return accountant.get_epsilon(delta)


def test_a_run_that_was_not_always_poisson_is_composed_as_it_ran():
    # Fit 1: 5 updates of Keras-shuffled arrays (one pass of 50 in tens);
    # fit 2: 5 Poisson updates at q = 0.2. Each is accounted as it ran: one
    # unamplified Gaussian plus 5 amplified ones.
    import dp_accounting

    model = make_model(input_shape=(2, 1, 1))
    x = source().elements().map(lambda e: e["image"]).batch(50).get_single_element()
    model.fit(x.numpy(), np.zeros((50, 1)), batch_size=10, epochs=1, verbose=0)
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    train = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5, start_step=5)
    model.fit(train, epochs=1, verbose=0, callbacks=[logger])
    statement = logger.statement()
    assert statement.sampling == "mixed" and statement.steps == 10
    gaussian = dp_accounting.GaussianDpEvent(1.0)
    want = mixed_eps([
        dp_accounting.SelfComposedDpEvent(gaussian, 1),
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.2, gaussian), 5)])
    assert statement.epsilon == pytest.approx(want, rel=1e-9)
    # Between the old statement without amplification and one pass alone.
    assert shuffle_eps(1) < statement.epsilon < shuffle_eps(6)
    assert "zero-out" in str(statement) and "5 updates" in str(statement)


# ---------------------------------------------------------------- budget and messages


def test_budget_stops_before_the_update_that_would_exceed_it():
    # Shuffle accounting moves at pass starts: updates 1, 6, 11, ...
    target = (shuffle_eps(2) + shuffle_eps(3)) / 2  # two passes fit, not three
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, target_epsilon=target,
                                         verbose=0)
    model.fit(X, Y, batch_size=10, epochs=5, verbose=0, callbacks=[logger])
    assert model.update_count == 10
    assert logger.stopped_for_budget
    assert logger.statement().epsilon <= target < shuffle_eps(3)


def test_budget_too_small_for_one_update_refuses_to_start():
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3,
                                         target_epsilon=shuffle_eps(1) / 2,
                                         verbose=0)
    with pytest.raises(ValueError, match="does not allow one more update"):
        model.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[logger])
    assert model.update_count == 0


def test_statement_is_printed_with_sampling_and_warnings(capsys):
    model = make_model(noise=0.0)
    logger = dpf.callbacks.PrivacyLogger(delta=0.5)
    model.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[logger])
    out = capsys.readouterr().out
    assert "outside the DP guarantee" in out
    assert "NOT private" in out
    assert "delta=0.5 >= 1/N" in out
    assert "shuffled batches" in out
    assert "numpy arrays of N=50 examples, shuffled by Keras" in out


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_examples=0, sampling="shuffle"), "num_examples must be a positive integer"),
    (dict(delta=2.0), "delta must be in"),
    (dict(delta=None), "delta is required"),
    (dict(sampling="bogus", num_examples=50), "sampling must be one of"),
    (dict(sampling="shuffle"), "sampling='shuffle' needs num_examples"),
    (dict(accept_shuffle_as_poisson=True), "goes with sampling='poisson'"),
    (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(delta=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dpf.callbacks.PrivacyLogger(**args)


def test_wrong_num_examples_batch_larger_than_dataset_and_non_dp_model():
    logger = dpf.callbacks.PrivacyLogger(num_examples=5, sampling="shuffle",
                                         delta=1e-3, verbose=0)
    with pytest.raises(ValueError, match="num_examples=5 was stated, but fit "
                                         "trains on 50 examples"):
        make_model().fit(X, Y, batch_size=10, verbose=0, callbacks=[logger])
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(10)
    with pytest.raises(ValueError, match="larger than num_examples"):
        make_model().fit(data, verbose=0, callbacks=[logger])
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    with pytest.raises(ValueError, match="needs a DPModel"):
        plain.fit(X, Y, batch_size=10, verbose=0, callbacks=[logger])


def test_statement_before_any_fit_says_why_it_cannot_be_made():
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3)
    logger.set_model(make_model())
    with pytest.raises(ValueError, match="has not been fit yet"):
        logger.statement()


def test_restored_model_without_a_fit_is_stated_as_its_logger_says(tmp_path):
    # E.g. a rerun checking whether budget is left before training again.
    train = dpf.data.make_train_dataset(source(), expected_batch_size=10,
                                        seed=3, microbatch_size=5, mode="shuffle")
    model = make_model(input_shape=(2, 1, 1))
    model.fit(train, epochs=1, steps_per_epoch=7, verbose=0)  # passes 0 and 1
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling_spec=train.spec)
    logger.set_model(restored)
    assert restored.feeding is None and restored.participations == 2
    assert logger.statement().epsilon == pytest.approx(shuffle_eps(2))
    # Update 8 continues pass 1 from step 7 in a new fit: counted as a new pass.
    assert logger.statement(8).participations == 3


def saved_ledger_table(*segments):
    """The `dp_ledger` weight of a model whose ledger holds these segments."""
    from tf_dpfair.privacy import ledger

    history = ledger.Ledger()
    for fields, updates in segments:
        segment = history.append(**fields)
        history.record(segment.segment_id, updates)
    return history.to_table()


def test_statement_before_fit_with_a_spec_reads_the_restored_ledger():
    # A run restored from a backup asks for its epsilon before fit (is its
    # budget spent?): a logger given the pipeline's spec answers from the
    # model's ledger. N = 50, B = 10: q = 0.2 for Poisson.
    from tf_dpfair.privacy import sampling

    model = make_model()
    poisson = {"sampling": "poisson", "source": "pipeline",
               "noise_multiplier": 1.0, "sampling_probability": 0.2}
    model.set_weights([w if w.shape != model._ledger_table.shape
                       else saved_ledger_table((poisson, 7))
                       for w in model.get_weights()])
    assert model.update_count == 7
    spec = sampling.make_sampling_spec("poisson", 50, 10, microbatch_size=5)
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling_spec=spec)
    logger.set_model(model)
    for steps in (7, 8):
        assert logger.statement(steps).epsilon == pytest.approx(
            dpf.privacy.accounting.compute_epsilon(noise_multiplier=1.0, delta=1e-3,
                                           sampling="poisson", steps=steps,
                                           sampling_probability=0.2), rel=1e-9)
    with pytest.raises(ValueError, match="would leave some out"):
        logger.statement(6)
