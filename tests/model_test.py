"""Exact and statistical tests of the DP step in DPModel.train_step."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import tf_dpfair as dpf

W0 = np.array([[0.5], [-1.0], [2.0]], dtype=np.float32)
B0 = np.array([0.1], dtype=np.float32)
LR = 0.5


@pytest.fixture(params=["vectorized", "ghost"])
def clipping(request):
    """Both ways of computing clipped sums must satisfy every exact test."""
    return request.param


def linear_dp_model(config, strategy=None):
    """y = x @ W0 + B0 under DPModel, compiled with SGD(LR) and MSE."""
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        inputs = keras.Input((3,))
        outputs = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.Constant(W0),
            bias_initializer=keras.initializers.Constant(B0))(inputs)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
        model.compile(optimizer=keras.optimizers.SGD(LR),
                      loss=keras.losses.MeanSquaredError())
    return model


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32) * 2
    y = rng.normal(size=(n, 1)).astype(np.float32)
    return x, y


def expected_weights(x, y, clip, batch, weights=None):
    """One DP-SGD update with noise 0, worked out by hand example by example.

    loss_i = (x_i . w + b - y_i)^2, so grad_w = 2 r_i x_i, grad_b = 2 r_i.
    """
    weights = np.ones(len(x)) if weights is None else weights
    sum_w = np.zeros(3)
    sum_b = 0.0
    for xi, yi, wi in zip(x.astype(np.float64), y.astype(np.float64), weights):
        r = float(xi @ W0[:, 0] + B0[0] - yi[0])
        gw, gb = 2 * r * xi, 2 * r
        norm = np.sqrt(np.sum(gw**2) + gb**2)
        factor = min(1.0, clip / norm) * wi
        sum_w += factor * gw
        sum_b += factor * gb
    return W0[:, 0] - LR * sum_w / batch, B0[0] - LR * sum_b / batch


def weights_of(model):
    kernel, bias = [v.numpy() for v in model.trainable_variables]
    return kernel[:, 0], bias[0]


def fit_one_update(model, x, y, sample_weight=None):
    model.fit(x, y, sample_weight=sample_weight, batch_size=len(x), epochs=1,
              shuffle=False, verbose=0)


@pytest.mark.parametrize("microbatch", [1, 4, 8])
def test_update_equals_mean_of_clipped_per_example_gradients(microbatch, clipping):
    x, y = data(8)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.5, noise_multiplier=0.0,
                          expected_batch_size=10, microbatch_size=microbatch)
    model = linear_dp_model(config)
    fit_one_update(model, x, y)
    want_w, want_b = expected_weights(x, y, clip=1.5, batch=10)
    got_w, got_b = weights_of(model)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    # The clip norm is small enough that clipping really happened.
    assert model.update_count == 1


def test_clipping_was_active_in_exact_test():
    x, y = data(8)
    unclipped = expected_weights(x, y, clip=1e9, batch=10)
    clipped = expected_weights(x, y, clip=1.5, batch=10)
    assert np.abs(unclipped[0] - clipped[0]).max() > 0.1


def test_huge_clip_equals_plain_sgd_step(clipping):
    x, y = data(16)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1e9, noise_multiplier=0.0,
                          expected_batch_size=16, microbatch_size=4)
    model = linear_dp_model(config)
    fit_one_update(model, x, y)

    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(W0),
        bias_initializer=keras.initializers.Constant(B0))(inputs)
    plain = keras.Model(inputs, outputs)
    plain.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.MeanSquaredError())
    plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for dp_var, var in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(dp_var.numpy(), var.numpy(), rtol=1e-5)


def test_microbatches_of_m_equal_one_pass_over_k_times_m(clipping):
    x, y = data(24, seed=3)
    results = []
    for microbatch in (4, 24):
        config = dpf.DPConfig(clipping=clipping, l2_norm_clip=0.7, noise_multiplier=0.0,
                              expected_batch_size=24, microbatch_size=microbatch)
        model = linear_dp_model(config)
        fit_one_update(model, x, y)
        results.append(np.concatenate(weights_of(model), axis=None))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_ragged_last_batch_is_padded_and_masked(clipping):
    # 10 examples, micro-batch 4: the step pads to 12 with weight 0.
    x, y = data(10, seed=5)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=10, microbatch_size=4)
    model = linear_dp_model(config)
    fit_one_update(model, x, y)
    want = expected_weights(x, y, clip=1.0, batch=10)
    np.testing.assert_allclose(np.concatenate(weights_of(model), axis=None),
                               np.concatenate(want, axis=None), rtol=1e-5)


def test_sample_weights_mask_examples_and_all_padding_changes_nothing(clipping):
    x, y = data(8, seed=7)
    mask = np.array([1, 0, 1, 0.5, 0, 1, 1, 0], dtype=np.float32)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=8, microbatch_size=4)
    model = linear_dp_model(config)
    fit_one_update(model, x, y, sample_weight=mask)
    want = expected_weights(x, y, clip=1.0, batch=8, weights=mask)
    np.testing.assert_allclose(np.concatenate(weights_of(model), axis=None),
                               np.concatenate(want, axis=None), rtol=1e-5)

    model = linear_dp_model(config)
    fit_one_update(model, x, y, sample_weight=np.zeros(8, np.float32))
    np.testing.assert_array_equal(weights_of(model)[0], W0[:, 0])
    np.testing.assert_array_equal(weights_of(model)[1], B0[0])


def test_sample_weight_above_one_is_refused():
    x, y = data(4)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, microbatch_size=2)
    model = linear_dp_model(config)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="sample weights above 1 would raise the sensitivity"):
        fit_one_update(model, x, y, sample_weight=np.array([1, 2, 1, 1.0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be >= 0"):
        fit_one_update(model, x, y, sample_weight=np.array([1, -1, 1, 1.0]))


def test_weight_regularizer_is_added_after_clipping(clipping):
    x, y = data(6, seed=11)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=0.5, noise_multiplier=0.0,
                          expected_batch_size=6, microbatch_size=3)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(
        1, kernel_initializer=keras.initializers.Constant(W0),
        bias_initializer=keras.initializers.Constant(B0),
        kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.MeanSquaredError())
    fit_one_update(model, x, y)
    want_w, want_b = expected_weights(x, y, clip=0.5, batch=6)
    # d/dw of 0.1 * ||w||^2 is 0.2 w, unclipped and not divided by the batch.
    want_w = want_w - LR * 0.2 * W0[:, 0]
    got_w, got_b = weights_of(model)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5)


def mirrored():
    return conftest.mirrored_strategy()


def test_two_replicas_give_the_same_update_as_one(clipping):
    x, y = data(16, seed=13)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=16, microbatch_size=4)
    model = linear_dp_model(config, strategy=mirrored())
    fit_one_update(model, x, y)
    want = expected_weights(x, y, clip=1.0, batch=16)
    np.testing.assert_allclose(np.concatenate(weights_of(model), axis=None),
                               np.concatenate(want, axis=None), rtol=1e-5)
    assert model.update_count == 1


def noise_spread(strategy, seed):
    """Std of a noise-only update (all weights 0) over 20,000 parameters."""
    config = dpf.DPConfig(l2_norm_clip=2.0, noise_multiplier=1.5,
                          expected_batch_size=50, microbatch_size=8, seed=seed)
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        inputs = keras.Input((1000,))
        outputs = keras.layers.Dense(20, kernel_initializer="zeros",
                                     use_bias=False)(inputs)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss=keras.losses.MeanSquaredError())
    x = np.ones((16, 1000), np.float32)
    y = np.zeros((16, 20), np.float32)
    model.fit(x, y, sample_weight=np.zeros(16, np.float32), batch_size=16,
              epochs=1, verbose=0)
    update = model.trainable_variables[0].numpy().ravel()
    return update


@pytest.mark.parametrize("replicas", [1, 2])
def test_noise_stddev_is_sigma_c_over_expected_batch(replicas):
    update = noise_spread(mirrored() if replicas == 2 else None, seed=123)
    want = 1.5 * 2.0 / 50  # sigma * C / B, SGD learning rate 1.
    # 20,000 draws: the sample std is within 1% of the truth with ~5 sigma.
    assert abs(update.std() / want - 1) < 0.03
    assert abs(update.mean()) < 3 * want / np.sqrt(update.size)


def test_noise_is_one_draw_shared_by_replicas_not_one_per_replica():
    # Same seed, same update index: the 2-replica job adds exactly the draw
    # of the 1-replica job (replica 0 adds it, replica 1 adds none).
    one = noise_spread(None, seed=77)
    two = noise_spread(mirrored(), seed=77)
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-9)


def test_noise_differs_between_updates_and_seeds():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
                          expected_batch_size=4, microbatch_size=4, seed=5)
    model = linear_dp_model(config)
    x, y = data(4)
    deltas = []
    for _ in range(3):
        before = np.concatenate(weights_of(model), axis=None)
        fit_one_update(model, x, np.zeros_like(y), sample_weight=np.zeros(4))
        deltas.append(np.concatenate(weights_of(model), axis=None) - before)
    assert not np.allclose(deltas[0], deltas[1])
    assert not np.allclose(deltas[1], deltas[2])
    assert model.update_count == 3


def test_train_on_batch_is_refused_with_several_replicas():
    # Keras gives every replica the whole batch here: each example would
    # count twice in the sum (measured: the update equalled that of the
    # batch concatenated with itself), while the noise is calibrated to one.
    with mirrored().scope():
        inputs = keras.Input((3,))
        model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs),
                            dp_config=dpf.DPConfig(l2_norm_clip=1.0,
                                                   noise_multiplier=1.0,
                                                   expected_batch_size=4))
        model.compile(optimizer="sgd", loss="mse")
    before = [v.numpy().copy() for v in model.trainable_variables]
    with pytest.raises(ValueError, match=r"every replica the whole batch, so "
                       r"each example would count 2 times"):
        model.train_on_batch(np.ones((4, 3), np.float32), np.ones((4, 1), np.float32))
    assert model.update_count == 0 and model.participations == 0
    for got, want in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(got.numpy(), want)


def test_augmult_update_uses_mean_loss_over_views_per_example(clipping):
    rng = np.random.default_rng(17)
    views, n = 3, 6
    x = rng.normal(size=(n, views, 3)).astype(np.float32)
    y = rng.normal(size=(n, 1)).astype(np.float32)
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=n, microbatch_size=2,
                          augmult=views)
    model = linear_dp_model(config)
    fit_one_update(model, x, y)
    # loss_i = mean_k (x_ik . w + b - y_i)^2: gradient is the mean over views.
    sum_w, sum_b = np.zeros(3), 0.0
    for xi, yi in zip(x.astype(np.float64), y.astype(np.float64)):
        r = xi @ W0[:, 0] + B0[0] - yi[0]
        gw = np.mean(2 * r[:, None] * xi, axis=0)
        gb = np.mean(2 * r)
        factor = min(1.0, 1.0 / np.sqrt(np.sum(gw**2) + gb**2))
        sum_w += factor * gw
        sum_b += factor * gb
    got_w, got_b = weights_of(model)
    np.testing.assert_allclose(got_w, W0[:, 0] - LR * sum_w / n, rtol=1e-5)
    np.testing.assert_allclose(got_b, B0[0] - LR * sum_b / n, rtol=1e-5)


def test_augmult_with_wrong_input_shape_is_refused():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, augmult=2)
    model = linear_dp_model(config)
    x, y = data(4)
    with pytest.raises(ValueError, match=r"augmult=2 needs inputs shaped"):
        fit_one_update(model, x, y)


def test_training_batchnorm_is_refused_and_frozen_is_accepted():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, microbatch_size=2)
    inputs = keras.Input((3,))
    h = keras.layers.BatchNormalization(name="bn_here")(inputs)
    outputs = keras.layers.Dense(1)(h)
    model = dpf.make_private(keras.Model(inputs, outputs), config)
    model.compile(optimizer="sgd", loss="mse")
    x, y = data(4)
    with pytest.raises(ValueError, match=r"Offending layers: bn_here.*GroupNorm"):
        fit_one_update(model, x, y)

    model.get_layer("bn_here").trainable = False
    model.compile(optimizer="sgd", loss="mse")
    fit_one_update(model, x, y)
    assert model.update_count == 1


def test_activity_regularizer_is_refused():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, activity_regularizer="l2",
                                 name="act_reg")(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    x, y = data(4)
    with pytest.raises(ValueError, match="Activity regularizers.*act_reg"):
        fit_one_update(model, x, y)


def test_dp_model_needs_a_config_and_a_loss():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1)(inputs)
    with pytest.raises(TypeError, match=r"needs dp_config=DPConfig"):
        dpf.DPModel(inputs=inputs, outputs=outputs)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    with pytest.raises(ValueError, match="needs a loss"):
        model.compile(optimizer="sgd")


def test_make_private_shares_weights_and_accepts_subclassed_models():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=8, microbatch_size=4)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    private = dpf.make_private(base, config)
    assert private.trainable_variables[0] is base.trainable_variables[0]

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    wrapped = dpf.make_private(sub, config)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = data(8)
    fit_one_update(wrapped, x, y)
    assert wrapped.update_count == 1
    assert len(sub.trainable_variables) == 2
    with pytest.raises(TypeError, match="already a DPModel"):
        dpf.make_private(private, config)
    with pytest.raises(TypeError, match="needs a keras.Model"):
        dpf.make_private(object(), config)


def test_loss_reduction_of_user_loss_object_does_not_matter(clipping):
    x, y = data(8, seed=19)
    results = []
    for reduction in ("sum", "sum_over_batch_size", None):
        config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                              expected_batch_size=8, microbatch_size=4)
        model = linear_dp_model(config)
        model.compile(optimizer=keras.optimizers.SGD(LR),
                      loss=keras.losses.MeanSquaredError(reduction=reduction))
        fit_one_update(model, x, y)
        results.append(np.concatenate(weights_of(model), axis=None))
    want = np.concatenate(expected_weights(x, y, 1.0, 8), axis=None)
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_nonfinite_gradient_contributes_nothing_and_is_counted(clipping):
    x, y = data(4, seed=23)
    x[1, 0] = np.nan
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, microbatch_size=2)
    model = linear_dp_model(config)
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    mask = np.array([1, 0, 1, 1], np.float32)
    want = expected_weights(np.nan_to_num(x), y, clip=1.0, batch=4,
                            weights=mask)
    np.testing.assert_allclose(np.concatenate(weights_of(model), axis=None),
                               np.concatenate(want, axis=None), rtol=1e-5)
    assert history.history["nonfinite_examples"] == [1.0]


# ------------------------------------------------------------- XLA

def xla_classifier(config, make_optimizer, jit_compile, strategy=None):
    """3 features -> Dense(4, tanh) -> Dense(3) logits, seeded initial weights."""
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(
            4, activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
        outputs = keras.layers.Dense(
            3, kernel_initializer=keras.initializers.GlorotUniform(seed=2))(hidden)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
        model.compile(optimizer=make_optimizer(), jit_compile=jit_compile,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def xla_data():
    rng = np.random.default_rng(5)
    return (rng.normal(size=(24, 3)).astype(np.float32) * 3,
            rng.integers(0, 3, size=24))


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.05),
    "adamw": lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
}


def trained_state(clipping, optimizer, jit_compile, strategy=None):
    """Weights, optimizer and EMA state after 3 noisy, clipped updates."""
    config = dpf.DPConfig(clipping=clipping, l2_norm_clip=0.5, noise_multiplier=0.7,
                          expected_batch_size=8, microbatch_size=4, ema_decay=0.9,
                          seed=3)
    model = xla_classifier(config, OPTIMIZERS[optimizer], jit_compile, strategy)
    # Built in compile, so no slot is created inside the traced step.
    assert model.optimizer.built
    x, y = xla_data()
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert model.update_count == 3
    with model.ema_weights():
        ema_values = [v.numpy().copy() for v in model.trainable_variables]
    return ([v.numpy().copy() for v in model.trainable_variables],
            [v.numpy().copy() for v in model.optimizer.variables], ema_values)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_xla_step_gives_the_weights_of_the_plain_step(clipping, optimizer):
    # Before the optimizer was built in compile, Adam and AdamW failed under
    # XLA ("We failed to lift variable creations out of this tf.function").
    plain = trained_state(clipping, optimizer, jit_compile=False)
    xla = trained_state(clipping, optimizer, jit_compile=True)
    initial = xla_classifier(dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                                          expected_batch_size=8),
                             OPTIMIZERS[optimizer], jit_compile=False)
    assert not np.allclose(plain[0][0], initial.trainable_variables[0].numpy())
    # Same data, same noise draws; XLA may fuse and reorder float32 sums.
    for got_group, want_group in zip(xla, plain):
        assert len(got_group) == len(want_group)
        for got, want in zip(got_group, want_group):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_xla_step_under_two_replicas_gives_the_weights_of_the_plain_step(clipping):
    plain = trained_state(clipping, "adam", jit_compile=False)
    xla = trained_state(clipping, "adam", jit_compile=True, strategy=mirrored())
    for got_group, want_group in zip(xla, plain):
        for got, want in zip(got_group, want_group):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _StringRoundTrip(keras.layers.Layer):
    """Identity through a string op, which XLA cannot compile."""

    def call(self, inputs):
        length = tf.strings.length(tf.strings.as_string(inputs[..., :1]))
        return inputs + 0.0 * tf.cast(length, inputs.dtype)


def test_jit_compile_puts_the_per_example_pass_on_xla():
    # The XLA test above would pass without XLA; this shows XLA compiles the
    # per-example pass: an op XLA lacks trains without jit and fails with it.
    config = dpf.DPConfig(clipping="vectorized", l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, microbatch_size=2)
    x, y = xla_data()
    for jit_compile in (False, True):
        inputs = keras.Input((3,))
        outputs = keras.layers.Dense(3)(_StringRoundTrip()(inputs))
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
        model.compile(optimizer="sgd", jit_compile=jit_compile,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if not jit_compile:
            model.fit(x[:4], y[:4], batch_size=4, verbose=0)
            assert model.update_count == 1
            continue
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"(?s)XLA.*_clipped_sum_over_microbatches"):
            model.fit(x[:4], y[:4], batch_size=4, verbose=0)
        assert model.update_count == 0
