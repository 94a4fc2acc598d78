"""Tests of PrivacyLogger: epsilon in the logs, budget stop, refusals."""

import keras
import numpy as np
import pytest

import tf_dpfair as dpf


def make_model(noise=1.0, batch=10):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=batch, microbatch_size=5)
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    return model


X = np.ones((50, 2), np.float32)
Y = np.zeros((50, 1), np.float32)


def eps(steps, noise=1.0):
    return dpf.accounting.compute_epsilon(noise_multiplier=noise,
                                          sampling_probability=10 / 50,
                                          steps=steps, delta=1e-3)


def test_epsilon_in_logs_matches_update_count():
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(num_examples=50, delta=1e-3, verbose=0)
    history = model.fit(X, Y, batch_size=10, epochs=2, verbose=0,
                        callbacks=[logger])
    assert history.history["epsilon"] == pytest.approx([eps(5), eps(10)])
    assert model.update_count == 10


def test_budget_stops_before_the_update_that_would_exceed_it():
    target = (eps(7) + eps(8)) / 2  # 7 updates fit, the 8th would not.
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(num_examples=50, delta=1e-3,
                                         target_epsilon=target, verbose=0)
    model.fit(X, Y, batch_size=10, epochs=5, verbose=0, callbacks=[logger])
    assert model.update_count == 7
    assert logger.stopped_for_budget
    assert logger.statement().epsilon <= target


def test_budget_too_small_for_one_update_refuses_to_start():
    model = make_model()
    logger = dpf.callbacks.PrivacyLogger(num_examples=50, delta=1e-3,
                                         target_epsilon=eps(1) / 2, verbose=0)
    with pytest.raises(ValueError, match="does not allow one more update"):
        model.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[logger])
    assert model.update_count == 0


def test_statement_is_printed_with_sampling_and_warnings(capsys):
    model = make_model(noise=0.0)
    logger = dpf.callbacks.PrivacyLogger(num_examples=50, delta=0.5,
                                         sampling="shuffle")
    model.fit(X, Y, batch_size=10, epochs=1, verbose=0, callbacks=[logger])
    out = capsys.readouterr().out
    assert "outside the DP guarantee" in out
    assert "NOT private" in out
    assert "delta=0.5 >= 1/N" in out
    assert "shuffled fixed-size batches" in out


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_examples=0), "num_examples must be a positive integer"),
    (dict(delta=2.0), "delta must be in"),
    (dict(sampling="bogus"), "sampling must be one of"),
    (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(num_examples=50, delta=1e-3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dpf.callbacks.PrivacyLogger(**args)


def test_batch_larger_than_dataset_and_non_dp_model_are_refused():
    logger = dpf.callbacks.PrivacyLogger(num_examples=5, delta=1e-3, verbose=0)
    with pytest.raises(ValueError, match="larger than num_examples"):
        make_model().fit(X, Y, batch_size=10, verbose=0, callbacks=[logger])
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    logger = dpf.callbacks.PrivacyLogger(num_examples=50, delta=1e-3, verbose=0)
    with pytest.raises(ValueError, match="needs a DPModel"):
        plain.fit(X, Y, batch_size=10, verbose=0, callbacks=[logger])
