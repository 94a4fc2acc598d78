"""Participations traced out of the batches `fit` really fed to the step.

Each training example carries its id in its first feature. A `DPModel`
subclass records the ids of every real row of every batch `train_step` gets,
so the test counts how many updates each example actually joined and
compares that with what the accountant composed (`model.participations`,
`PrivacyLogger.statement().participations`), for every way of feeding `fit`.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.privacy import accounting

N = 20
SEEN = []  # one int array of example ids per update


class Tracing(dpf.DPModel):
    """Records the ids of the real rows of each logical batch."""

    def train_step(self, data):
        x, _, weights = keras.utils.unpack_x_y_sample_weight(data)
        ids = tf.reshape(x, [tf.shape(x)[0], -1])[:, 0]
        if weights is None:
            weights = tf.ones_like(ids)
        tf.py_function(lambda i, w: SEEN.append(
            i.numpy()[w.numpy() > 0].round().astype(int)), [ids, weights], [])
        return super().train_step(data)


def make_model(batch, noise=1.0, input_shape=(2,)):
    SEEN.clear()
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=batch, microbatch_size=2, seed=0)
    inputs = keras.Input(input_shape)
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(inputs))
    model = Tracing(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    return model


def traced_participations():
    counts = np.zeros(N, int)
    for ids in SEEN:
        assert len(set(ids.tolist())) == len(ids), "an example twice in one batch"
        counts[ids] += 1
    return counts


def arrays():
    x = np.stack([np.arange(N), np.random.default_rng(0).random(N)], 1)
    return x.astype("float32"), np.zeros((N, 1), "float32")


def source():
    images = np.arange(N, dtype="float32").reshape(N, 1, 1, 1)
    return dpf.data.ExampleSource.from_arrays(images, np.zeros(N, int))


def pipeline(batch, mode="shuffle", seed=1, start_step=0):
    return dpf.data.make_train_dataset(source(), expected_batch_size=batch,
                                       seed=seed, mode=mode, microbatch_size=2,
                                       start_step=start_step)


def test_package_shuffle_pipeline_batch_not_dividing_n():
    # N=20, B=6: 3 updates per epoch (2 examples left out of each), q=0.3.
    # 30 updates start 10 epochs; the old count, ceil(30 * 0.3) = 9, is short.
    model = make_model(6, input_shape=(1, 1, 1))
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    model.fit(pipeline(6), epochs=10, verbose=0, callbacks=[logger])
    assert model.update_count == len(SEEN) == 30
    traced = traced_participations()
    assert traced.max() == 10 > math.ceil(30 * 6 / N)
    assert model.participations == 10
    statement = logger.statement()
    assert (statement.sampling, statement.participations) == ("shuffle", 10)


def test_package_shuffle_pipeline_batch_dividing_n():
    model = make_model(5, input_shape=(1, 1, 1))
    model.fit(pipeline(5), epochs=3, verbose=0)
    traced = traced_participations()
    assert (traced == 3).all()  # every example once per epoch, exactly
    assert model.participations == 3


@pytest.mark.parametrize("resume_at, second_seed, expected", [
    (15, 1, 10),  # a pass boundary, same seed: 5 + 5 passes, as uninterrupted
    (14, 1, 11),  # mid-pass: the rest of pass 4 counts as a new pass
    (14, 2, 11),  # mid-pass with another permutation: the +1 is what covers it
])
def test_resumed_shuffle_pipeline(resume_at, second_seed, expected):
    model = make_model(6, input_shape=(1, 1, 1))
    model.fit(pipeline(6), epochs=1, steps_per_epoch=resume_at, verbose=0)
    resumed = pipeline(6, seed=second_seed, start_step=model.update_count)
    model.fit(resumed, epochs=1, steps_per_epoch=30 - resume_at, verbose=0)
    assert model.update_count == len(SEEN) == 30
    assert model.participations == expected
    assert traced_participations().max() <= expected


def test_resumed_model_saved_and_loaded_keeps_its_ledger(tmp_path):
    model = make_model(6, input_shape=(1, 1, 1))
    model.fit(pipeline(6), epochs=1, steps_per_epoch=14, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects={"Tracing": Tracing})
    assert (loaded.update_count, loaded.participations) == (14, 5)
    loaded.compile(optimizer="sgd", loss="mse")
    loaded.fit(pipeline(6, start_step=14), epochs=1, steps_per_epoch=16, verbose=0)
    assert loaded.participations == 11
    assert traced_participations().max() <= 11


def test_pipeline_not_started_at_the_update_count_is_refused():
    model = make_model(6, input_shape=(1, 1, 1))
    train = pipeline(6)
    model.fit(train, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="starts at update 0 but the model has "
                                         "applied 3 updates"):
        model.fit(train, epochs=1, verbose=0)
    assert model.update_count == 3


def test_finite_pipeline_that_keras_would_replay_is_refused():
    model = make_model(6, input_shape=(1, 1, 1))
    train = dpf.data.make_train_dataset(source(), expected_batch_size=6, seed=1,
                                        mode="poisson", microbatch_size=2,
                                        num_steps=4)
    with pytest.raises(ValueError, match="fit would run 6 updates .* on a "
                                         "pipeline of 4 batches"):
        model.fit(train, epochs=2, steps_per_epoch=3, verbose=0)
    assert model.update_count == 0


def test_numpy_arrays_count_a_pass_per_fit_call():
    # ceil(20 / 6) = 4 batches per pass (the last of 2 rows); Keras starts a
    # new permutation at every fit call, so 3 + 1 + 1 passes.
    x, y = arrays()
    model = make_model(6)
    model.fit(x, y, batch_size=6, epochs=3, verbose=0)
    model.fit(x, y, batch_size=6, epochs=1, steps_per_epoch=2, verbose=0)
    model.fit(x, y, batch_size=6, epochs=1, steps_per_epoch=2, verbose=0)
    traced = traced_participations()
    assert model.update_count == 16
    # Three whole passes, then two partial ones of 12 examples each.
    assert (traced >= 3).all() and traced.max() == 5
    assert model.participations == 5
    assert math.ceil(16 / 4) < 5  # what counting updates alone would claim


def test_user_tf_data_stated_shuffle_is_never_undercounted():
    x, y = arrays()
    model = make_model(6)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N, seed=0)
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling="shuffle",
                                         num_examples=N, verbose=0)
    # Keeping the partial batch: 4 updates per pass; counted as 20 // 6 = 3.
    model.fit(data.batch(6), epochs=2, verbose=0, callbacks=[logger])
    assert traced_participations().max() == 2
    assert model.participations == accounting.epochs_started(8, 3) == 3
    assert logger.statement().participations == 3


def test_unstated_input_moves_the_ledger_by_every_update():
    x, y = arrays()
    model = make_model(6)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
    model.fit(data, epochs=2, verbose=0)  # no logger: nothing stated
    assert model.update_count == 8
    assert model.participations == 8 and model.non_poisson_updates == 8


def test_poisson_pipeline_inclusion_rate_is_q():
    model = make_model(5, noise=0.0, input_shape=(1, 1, 1))
    model.fit(pipeline(5, mode="poisson"), epochs=1, steps_per_epoch=400,
              verbose=0)
    traced = traced_participations()
    # Binomial(400, q=0.25) per example: mean 100, sd 8.7; 5 sd either side.
    assert ((traced > 100 - 44) & (traced < 100 + 44)).all()
    assert abs(traced.mean() - 100) < 5 * 8.7 / math.sqrt(N)
    assert model.non_poisson_updates == 0
    assert model.participations == 400  # any update may hold any example


def test_train_on_batch_counts_as_an_update_anyone_may_have_joined():
    x, y = arrays()
    model = make_model(6)
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)  # one pass of 4 updates
    model.train_on_batch(x[:6], y[:6])
    model.train_on_batch(x[:6], y[:6])
    assert model.update_count == 6
    assert (model.participations, model.non_poisson_updates) == (3, 6)
    assert traced_participations().max() == 3  # rows 0..5: the pass, then twice
    assert model.feeding is None
