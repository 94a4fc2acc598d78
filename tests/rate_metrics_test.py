"""Tests for tf_dpfair.fairness.streaming_rates.GroupedErrorRates."""

import math

import fairlearn.metrics
import keras
import numpy as np
import pytest
import tensorflow as tf

import conftest
import tf_dpfair as dpf
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness.streaming_rates import GroupedErrorRates

GROUPS = {"sex": ["female", "male"], "age": ["young", "mid", "old"]}


def _floats(result):
    return {name: float(value) for name, value in result.items()}


def _random(n, num_labels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) if num_labels == 1 else (n, num_labels)
    labels = (rng.random(shape) < 0.3).astype("float32")
    scores = (1 / (1 + np.exp(-rng.normal(-1 + 1.5 * labels, 1.0)))).astype("float32")
    groups = {"sex": rng.integers(0, 2, n).astype("int32"),
              "age": rng.integers(0, 3, n).astype("int32")}
    return labels, scores, groups


def test_hand_computed_rates_and_gaps():
    metric = GroupedErrorRates({"sex": ["female", "male"]})
    # Women: y 1 1 0, decisions 1 0 0. Men: y 1 1 0, decisions 1 1 1.
    metric.update_state([1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [0.9, 0.2, 0.1, 0.8, 0.7, 0.6],
                        groups={"sex": [0, 0, 0, 1, 1, 1]})
    result = _floats(metric.result())
    assert result == pytest.approx({
        "tpr": 0.75, "fpr": 0.5, "selection_rate": 4 / 6,
        "tpr/sex/female": 0.5, "fpr/sex/female": 0.0, "selection_rate/sex/female": 1 / 3,
        "tpr/sex/male": 1.0, "fpr/sex/male": 1.0, "selection_rate/sex/male": 1.0,
        "tpr_gap/sex": 0.5, "fpr_gap/sex": 1.0, "selection_rate_gap/sex": 2 / 3,
        "equalized_odds/sex": 1.0})


def test_matches_exact_evaluation_and_fairlearn_on_random_data():
    labels, scores, groups = _random(3000)
    metric = GroupedErrorRates(GROUPS, threshold=0.4)
    metric.update_state(labels, scores, groups=groups)
    result = _floats(metric.result())
    exact = error_rates.evaluate(labels, scores, groups, threshold=0.4, min_group_size=1,
                                 group_names=GROUPS, n_bootstrap=0)
    for row in exact.groups.itertuples():
        for name in ("tpr", "fpr", "selection_rate"):
            assert result[f"{name}/{row.attribute}/{row.group}"] == pytest.approx(
                getattr(row, name), abs=1e-6)
    decisions = (scores >= 0.4).astype(int)
    for attribute in GROUPS:
        assert result[f"equalized_odds/{attribute}"] == pytest.approx(
            fairlearn.metrics.equalized_odds_difference(
                labels, decisions, sensitive_features=groups[attribute]), abs=1e-6)
        assert result[f"tpr_gap/{attribute}"] == pytest.approx(
            fairlearn.metrics.equal_opportunity_difference(
                labels, decisions, sensitive_features=groups[attribute]), abs=1e-6)


def test_multi_label_means_and_label_mask_match_exact_evaluation():
    labels, scores, groups = _random(2000, num_labels=2, seed=1)
    mask = (np.random.default_rng(2).random(labels.shape) < 0.7).astype("float32")
    metric = GroupedErrorRates(GROUPS, label_names=["a", "b"], threshold=0.5)
    metric.update_state({"label": labels * mask, "groups": groups, "label_mask": mask},
                        np.where(mask == 1, scores, 0.99))
    result = _floats(metric.result())
    exact = error_rates.evaluate(labels, scores, groups, threshold=0.5, label_mask=mask,
                                 label_names=["a", "b"], group_names=GROUPS,
                                 min_group_size=1, n_bootstrap=0)
    rows = exact.groups.set_index(["attribute", "group", "label"])
    disparities = exact.disparities.set_index(["attribute", "label"])
    for attribute, names in GROUPS.items():
        for group in names:
            for label in ("a", "b"):
                assert result[f"tpr/{label}/{attribute}/{group}"] == pytest.approx(
                    rows.loc[(attribute, group, label), "tpr"], abs=1e-6)
            assert result[f"fpr/{attribute}/{group}"] == pytest.approx(
                rows.loc[(attribute, group, "mean"), "fpr"], abs=1e-6)
        assert result[f"equalized_odds/{attribute}"] == pytest.approx(
            disparities.loc[(attribute, "mean"), "equalized_odds_difference"], abs=1e-6)
        assert result[f"tpr_gap/{attribute}"] == pytest.approx(
            disparities.loc[(attribute, "mean"), "equal_opportunity_difference"], abs=1e-6)


def test_multi_class_top1_and_one_vs_rest():
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, 900).astype("int32")
    logits = rng.normal(size=(900, 3)).astype("float32") + 1.5 * np.eye(3)[classes]
    groups = {"sex": rng.integers(0, 2, 900).astype("int32")}
    metric = GroupedErrorRates({"sex": ["female", "male"]}, threshold=None,
                               label_names=["x", "y", "z"], multi_class=True,
                               from_logits=True)
    metric.update_state(classes, logits, groups=groups)
    result = _floats(metric.result())
    probabilities = tf.nn.softmax(logits).numpy().astype(np.float64)
    exact = error_rates.evaluate(classes, probabilities, groups, multi_class=True,
                                 label_names=["x", "y", "z"], min_group_size=1,
                                 group_names={"sex": ["female", "male"]}, n_bootstrap=0)
    rows = exact.groups.set_index(["group", "label"])
    for group in ("female", "male"):
        top1 = rows.loc[(group, "top1"), "error"]
        assert result[f"top1_error/sex/{group}"] == pytest.approx(top1, abs=1e-6)
        assert result[f"tpr/z/sex/{group}"] == pytest.approx(rows.loc[(group, "z"), "tpr"],
                                                             abs=1e-6)
    predicted = logits.argmax(1)
    assert result["top1_error"] == pytest.approx(np.mean(predicted != classes), abs=1e-6)
    assert result["top1_error_gap/sex"] == pytest.approx(abs(
        np.mean(predicted[groups["sex"] == 0] != classes[groups["sex"] == 0])
        - np.mean(predicted[groups["sex"] == 1] != classes[groups["sex"] == 1])), abs=1e-6)


def test_streaming_padding_and_undefined_rates():
    labels, scores, groups = _random(600, seed=4)
    whole = GroupedErrorRates(GROUPS)
    whole.update_state(labels, scores, groups=groups)
    streamed = GroupedErrorRates(GROUPS)
    old = groups["age"] == 2
    for rows in (~old, old):  # the first batch holds no "old" example
        streamed.update_state(labels[rows], scores[rows],
                              groups={k: v[rows] for k, v in groups.items()})
    # Padding rows of weight 0 with ids out of range count nowhere.
    streamed.update_state([1.0, 0.0], [0.9, 0.9], sample_weight=[0.0, 0.0],
                          groups={"sex": [5, -1], "age": [9, 9]})
    assert _floats(streamed.result()) == pytest.approx(_floats(whole.result()), abs=1e-6)
    # A group without positives has no TPR (NaN, not 0), and no TPR gap.
    only_negatives = GroupedErrorRates({"sex": ["female", "male"]})
    only_negatives.update_state([0.0, 0.0, 1.0], [0.9, 0.1, 0.8], groups={"sex": [0, 0, 1]})
    result = _floats(only_negatives.result())
    assert math.isnan(result["tpr/sex/female"]) and math.isnan(result["tpr_gap/sex"])
    assert math.isnan(result["equalized_odds/sex"])
    assert result["fpr/sex/female"] == 0.5


def test_two_replicas_give_the_same_result_as_one():
    labels, scores, groups = _random(1000, num_labels=2, seed=5)
    single = GroupedErrorRates(GROUPS, label_names=["a", "b"])
    single.update_state(labels, scores, groups=groups)
    strategy = conftest.mirrored_strategy()
    with strategy.scope():
        metric = GroupedErrorRates(GROUPS, label_names=["a", "b"])
    dataset = tf.data.Dataset.from_tensor_slices(
        ({"label": labels, "groups": groups}, scores)).batch(128)

    @tf.function
    def step(y, y_pred):
        strategy.run(lambda y, p: metric.update_state(y, p), args=(y, y_pred))

    for y, y_pred in strategy.experimental_distribute_dataset(dataset):
        step(y, y_pred)
    # Both replicas' counts are read: 1000 examples, not one replica's share.
    assert float(tf.reduce_sum(metric.counts.value[0, 0, :2])) == 1000
    assert _floats(metric.result()) == pytest.approx(_floats(single.result()), abs=1e-6,
                                                     nan_ok=True)


def _linear_dp_model(strategy=None):
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
                      metrics=[GroupedErrorRates({"sex": ["male", "female"]},
                                                 from_logits=True)])
    return model


def _grouped_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    sex = rng.integers(0, 2, size=n).astype(np.int32)
    noise = np.where(sex == 1, 2.0, 0.3)
    y = ((x[:, 0] + noise * rng.normal(size=n)) > 0).astype(np.float32)[:, None]
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": {"sex": sex}})).batch(100)
    return x, y, sex, dataset


@pytest.mark.parametrize("replicas", [1, 2])
def test_validation_during_fit_gets_rates_and_training_does_not(replicas):
    x, y, sex, dataset = _grouped_data()
    model = _linear_dp_model(conftest.mirrored_strategy() if replicas == 2 else None)
    history = model.fit(dataset, epochs=1, verbose=0, validation_data=dataset)
    # Group figures of training batches are never computed.
    assert not any(k.startswith(("tpr", "fpr", "equalized")) for k in history.history)
    # The model's logit is x0 (learning rate 0): decisions are x0 >= 0.
    decisions = (x[:, 0] >= 0).astype(int)
    for gid, name in enumerate(["male", "female"]):
        rows = sex == gid
        assert history.history[f"val_tpr/sex/{name}"][0] == pytest.approx(
            fairlearn.metrics.true_positive_rate(y[rows, 0], decisions[rows]), abs=1e-6)
    assert history.history["val_equalized_odds/sex"][0] == pytest.approx(
        fairlearn.metrics.equalized_odds_difference(y[:, 0], decisions,
                                                    sensitive_features=sex), abs=1e-6)


def test_config_round_trip():
    metric = GroupedErrorRates(GROUPS, threshold=None, label_names=["x", "y"],
                               multi_class=True, per_label=False, name="rates")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric))
    assert isinstance(restored, GroupedErrorRates)
    assert restored.get_config() == metric.get_config()
    assert restored.multi_class and restored.groups == GROUPS and not restored.per_label


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": {}}, "GroupedErrorRates: `groups` must be a non-empty dict"),
    ({"groups": {"sex": ["f/m"]}}, "group name must be"),
    ({"threshold": 1.5}, r"threshold must be a probability in \[0, 1\]"),
    ({"threshold": None}, r"threshold must be a probability in \[0, 1\]"),
    ({"multi_class": True, "label_names": ["a", "b"]}, "pass threshold=None"),
    ({"multi_class": True, "threshold": None}, "multi_class needs `label_names`"),
    ({"label_names": ["a", "a"]}, "duplicate label names"),
    ({"label_names": ["a"], "multi_label": False}, "`label_names` go with multi_label"),
])
def test_bad_constructor_arguments(kwargs, message):
    args = {"groups": {"sex": ["f", "m"]}, **kwargs}
    with pytest.raises(ValueError, match=message):
        GroupedErrorRates(**args)


def test_bad_updates_raise_clear_errors():
    metric = GroupedErrorRates({"sex": ["f", "m"]})
    with pytest.raises(ValueError, match="no group ids"):
        metric.update_state([0.0, 1.0], [0.2, 0.8])
    with pytest.raises(ValueError, match=r"y_pred must have shape \[B\] or \[B, 1\]"):
        metric.update_state([0.0, 1.0], np.ones((2, 3)), groups={"sex": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"attribute `sex` must lie in \[0, 2\)"):
        metric.update_state([0.0, 1.0], [0.2, 0.8], groups={"sex": [0, 2]})
    multi = GroupedErrorRates({"sex": ["f", "m"]}, threshold=None, label_names=["a", "b"],
                              multi_class=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class ids must lie in \[0, 2\)"):
        multi.update_state([0, 3], np.ones((2, 2)), groups={"sex": [0, 1]})
