"""The data pipeline feeding DPModel: Poisson padding, sampling spec, label masks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import augment
from tf_dpfair.data import pipeline as data

LR = 0.5


def hand_update(kernel, bias, x, y, clip, batch, mask=None):
    """One noise-free DP update of logits = x @ kernel + bias under sigmoid BCE.

    Per example, loss = sum_l m_l * bce_l / sum_l m_l, so the gradient wrt
    logit l is m_l * (sigmoid(z_l) - y_l) / sum_l m_l.
    """
    x = x.reshape(len(x), -1).astype(np.float64)
    mask = np.ones_like(y, dtype=np.float64) if mask is None else mask
    sum_k, sum_b = np.zeros_like(kernel, np.float64), np.zeros_like(bias, np.float64)
    for xi, yi, mi in zip(x, y.astype(np.float64), mask):
        z = xi @ kernel + bias
        dz = mi * (1 / (1 + np.exp(-z)) - yi) / mi.sum()
        gk, gb = np.outer(xi, dz), dz
        factor = min(1.0, clip / np.sqrt(np.sum(gk**2) + np.sum(gb**2)))
        sum_k += factor * gk
        sum_b += factor * gb
    return kernel - LR * sum_k / batch, bias - LR * sum_b / batch


def multilabel_model(config, input_shape, labels, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(int(np.prod(input_shape)), labels)).astype(np.float32)
    bias = rng.normal(size=labels).astype(np.float32)
    inputs = keras.Input(input_shape)
    h = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(
        labels, kernel_initializer=keras.initializers.Constant(kernel),
        bias_initializer=keras.initializers.Constant(bias))(h)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(LR),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model, kernel, bias


def test_label_mask_leaves_unknown_labels_out_of_the_loss():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=(6, 3)).astype(np.float32)
    mask = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                     [1, 1, 1]], np.float32)
    config = dpf.DPConfig(l2_norm_clip=0.8, noise_multiplier=0.0,
                          expected_batch_size=6, microbatch_size=3)
    model, kernel, bias = multilabel_model(config, (4,), 3)
    ds = tf.data.Dataset.from_tensors((x, {"label": y, "label_mask": mask}))
    model.fit(ds, epochs=1, verbose=0)
    want_k, want_b = hand_update(kernel, bias, x, y, 0.8, 6, mask)
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), want_k,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.trainable_variables[1].numpy(), want_b,
                               rtol=1e-4, atol=1e-6)
    # The mask mattered: ignoring it gives a different update.
    plain_k, _ = hand_update(kernel, bias, x, y, 0.8, 6)
    assert np.abs(plain_k - want_k).max() > 1e-3


def poisson_source(n=60, labels=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, 2, 2, 1)).astype(np.float32)
    targets = rng.integers(0, 2, size=(n, labels)).astype(np.float32)
    return data.ExampleSource.from_arrays(images, targets)


def test_poisson_batches_padding_never_changes_the_update():
    train = data.make_train_dataset(poisson_source(), expected_batch_size=12,
                                    seed=3, microbatch_size=4, num_steps=1)
    x, y, w = next(iter(train.dataset))
    x, y, w = x.numpy(), y.numpy(), w.numpy()
    assert (w == 0).any() and (w == 1).any()  # real rows and padding
    assert len(w) == train.spec.padded_batch_size
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=0.0,
                          expected_batch_size=12, microbatch_size=4)
    model, kernel, bias = multilabel_model(config, (2, 2, 1), 2)
    model.fit(train.dataset, epochs=1, steps_per_epoch=1, verbose=0)
    real = w > 0
    want_k, want_b = hand_update(kernel, bias, x[real], y[real], 0.5, 12)
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), want_k,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.trainable_variables[1].numpy(), want_b,
                               rtol=1e-4, atol=1e-6)


def test_privacy_logger_takes_sampling_mode_from_the_pipeline(capsys):
    for mode, phrase in (("poisson", "Poisson subsampling"),
                         ("shuffle", "shuffled batches")):
        train = data.make_train_dataset(poisson_source(), expected_batch_size=12,
                                        seed=3, microbatch_size=4, mode=mode)
        config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0,
                              expected_batch_size=12, microbatch_size=4)
        model, _, _ = multilabel_model(config, (2, 2, 1), 2)
        logger = dpf.callbacks.PrivacyLogger(delta=1e-3,
                                             sampling_spec=train.spec)
        model.fit(train.dataset, epochs=1, steps_per_epoch=5, verbose=0,
                  callbacks=[logger])
        out = capsys.readouterr().out
        assert phrase in out and f"Sampling: {mode}" in out
        statement = logger.statement()
        want = dpf.privacy.accounting.compute_epsilon(
            noise_multiplier=1.0, delta=1e-3, **train.spec.accountant_kwargs(5))
        assert statement.epsilon == pytest.approx(want)
        assert statement.delta >= 1e-3  # plus the truncation allowance


def test_pipeline_and_model_batch_sizes_must_agree():
    train = data.make_train_dataset(poisson_source(), expected_batch_size=12,
                                    seed=3, microbatch_size=4)
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0,
                          expected_batch_size=20, microbatch_size=4)
    model, _, _ = multilabel_model(config, (2, 2, 1), 2)
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, sampling_spec=train.spec)
    with pytest.raises(ValueError, match="noise would be calibrated"):
        model.fit(train.dataset, epochs=1, steps_per_epoch=1, verbose=0,
                  callbacks=[logger])
    with pytest.raises(ValueError, match="disagrees with the sampling spec"):
        dpf.callbacks.PrivacyLogger(num_examples=7, delta=1e-3,
                                    sampling_spec=train.spec)


def test_augmult_pipeline_feeds_views_to_the_model():
    train = data.make_train_dataset(poisson_source(), expected_batch_size=12,
                                    seed=3, microbatch_size=4, augmult=3,
                                    augment_fn=augment.make_random_crop_flip(1),
                                    num_steps=2)
    x, _, _ = next(iter(train.dataset))
    assert x.shape[1:] == (3, 2, 2, 1)
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0,
                          expected_batch_size=12, microbatch_size=4, augmult=3)
    model, _, _ = multilabel_model(config, (2, 2, 1), 2)
    model.fit(train.dataset, epochs=1, steps_per_epoch=2, verbose=0)
    assert model.update_count == 2
