"""Group ids travelling in `y` reach GroupedAUC through DPModel, never training."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import conftest
import tf_dpfair as dpf


def dataset(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    sex = rng.integers(0, 2, size=n).astype(np.int32)
    # Group 1's labels are noisier: a planted AUC gap.
    noise = np.where(sex == 1, 2.0, 0.3)
    y = ((x[:, 0] + noise * rng.normal(size=n)) > 0).astype(np.float32)[:, None]
    return x, y, sex


def grouped_model(strategy=None):
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                              expected_batch_size=100, microbatch_size=25)
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(
            1, kernel_initializer=keras.initializers.Constant([[1], [0], [0], [0]]),
            bias_initializer="zeros")(inputs)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
        model.compile(optimizer=keras.optimizers.SGD(0.0),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True),
                      metrics=[dpf.fairness.streaming_auc.GroupedAUC({"sex": ["male", "female"]},
                                                      from_logits=True)])
    return model


def as_dataset(x, y, sex, batch):
    return tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": {"sex": sex}})).batch(batch)


@pytest.mark.parametrize("replicas", [1, 2])
def test_evaluate_reports_group_aucs_matching_sklearn(replicas):
    x, y, sex = dataset()
    model = grouped_model(conftest.mirrored_strategy() if replicas == 2 else None)
    logs = model.evaluate(as_dataset(x, y, sex, 100), return_dict=True, verbose=0)
    scores = x[:, 0]  # the model's logit is x0 exactly
    for gid, name in enumerate(["male", "female"]):
        want = roc_auc_score(y[sex == gid, 0], scores[sex == gid])
        assert logs[f"auc/sex/{name}"] == pytest.approx(want, abs=0.005)
    assert logs["auc/sex/female"] < logs["auc/sex/male"]
    assert logs["auc_gap/sex"] == pytest.approx(
        logs["auc/sex/male"] - logs["auc/sex/female"], abs=1e-6)


def test_validation_during_fit_gets_group_metrics_but_training_does_not():
    x, y, sex = dataset()
    model = grouped_model()
    history = model.fit(as_dataset(x, y, sex, 100), epochs=1, verbose=0,
                        validation_data=as_dataset(x, y, sex, 100))
    assert "val_auc/sex/female" in history.history
    # Group figures of training data are never computed by default.
    assert not any(k.startswith("auc") for k in history.history)
    assert model.update_count == 4
