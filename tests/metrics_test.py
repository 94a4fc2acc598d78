"""Tests for tf_dpfair.fairness.streaming_auc.GroupedAUC."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from tf_dpfair.fairness.streaming_auc import GroupedAUC

GROUPS = {"sex": ["female", "male"], "age": ["young", "mid", "old"]}
NUM_THRESHOLDS = 2000
# Float32 sums over 2000 thresholds, taken in a different order than Keras.
TOL = 1e-5


def _random_data(n, num_labels=1, seed=0):
    """Labels, scores in [0, 1] that depend on the labels, and group ids."""
    rng = np.random.default_rng(seed)
    shape = (n,) if num_labels == 1 else (n, num_labels)
    labels = (rng.random(shape) < 0.3).astype("float32")
    scores = 1 / (1 + np.exp(-rng.normal(-1 + 1.5 * labels, 1.0)))
    groups = {"sex": rng.integers(0, 2, n).astype("int32"),
              "age": rng.integers(0, 3, n).astype("int32")}
    return labels, scores.astype("float32"), groups


def _keras_auc(labels, scores, sample_weight=None):
    metric = keras.metrics.AUC(num_thresholds=NUM_THRESHOLDS)
    metric.update_state(labels, scores, sample_weight=sample_weight)
    return float(metric.result())


def _floats(result):
    return {name: float(value) for name, value in result.items()}


def test_groups_match_keras_auc_and_sklearn_on_random_data():
    labels, scores, groups = _random_data(3000)
    metric = GroupedAUC(GROUPS, num_thresholds=NUM_THRESHOLDS)
    metric.update_state(labels, scores, groups=groups)
    result = _floats(metric.result())

    assert result["auc"] == pytest.approx(_keras_auc(labels, scores), abs=TOL)
    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=0.005)
    for attribute, names in GROUPS.items():
        group_aucs = []
        for i, group in enumerate(names):
            rows = groups[attribute] == i
            expected = _keras_auc(labels[rows], scores[rows])
            value = result[f"auc/{attribute}/{group}"]
            assert value == pytest.approx(expected, abs=TOL), (attribute, group)
            assert value == pytest.approx(
                roc_auc_score(labels[rows], scores[rows]), abs=0.005)
            group_aucs.append(value)
        assert result[f"auc_gap/{attribute}"] == pytest.approx(
            max(group_aucs) - min(group_aucs), abs=TOL)
        assert result[f"auc_worst/{attribute}"] == pytest.approx(min(group_aucs), abs=TOL)
    expected_names = {"auc", "auc/sex/female", "auc/sex/male", "auc/age/young",
                      "auc/age/mid", "auc/age/old", "auc_gap/sex", "auc_gap/age",
                      "auc_worst/sex", "auc_worst/age"}
    assert set(result) == expected_names


def test_multi_label_matches_keras_per_label_and_group():
    label_names = ["edema", "effusion", "atelectasis"]
    labels, scores, groups = _random_data(3000, num_labels=3, seed=1)
    metric = GroupedAUC(GROUPS, label_names=label_names, num_thresholds=NUM_THRESHOLDS)
    assert metric.multi_label
    metric.update_state(labels, scores, groups=groups)
    result = _floats(metric.result())

    per_label = []
    for j, label in enumerate(label_names):
        expected = _keras_auc(labels[:, j], scores[:, j])
        assert result[f"auc/{label}"] == pytest.approx(expected, abs=TOL)
        per_label.append(expected)
    assert result["auc"] == pytest.approx(np.mean(per_label), abs=TOL)
    for attribute, names in GROUPS.items():
        for i, group in enumerate(names):
            rows = groups[attribute] == i
            group_label_aucs = []
            for j, label in enumerate(label_names):
                expected = _keras_auc(labels[rows, j], scores[rows, j])
                value = result[f"auc/{label}/{attribute}/{group}"]
                assert value == pytest.approx(expected, abs=TOL)
                assert value == pytest.approx(
                    roc_auc_score(labels[rows, j], scores[rows, j]), abs=0.005)
                group_label_aucs.append(value)
            assert result[f"auc/{attribute}/{group}"] == pytest.approx(
                np.mean(group_label_aucs), abs=TOL)
        for label in label_names:
            values = [result[f"auc/{label}/{attribute}/{g}"] for g in names]
            assert result[f"auc_gap/{label}/{attribute}"] == pytest.approx(
                max(values) - min(values), abs=TOL)
            assert result[f"auc_worst/{label}/{attribute}"] == pytest.approx(
                min(values), abs=TOL)


def test_single_class_group_is_nan_with_counts():
    labels, scores, groups = _random_data(400, seed=2)
    groups["age"] = groups["age"].copy()
    # Every positive of group "old" is moved elsewhere: only negatives remain.
    labels[groups["age"] == 2] = 0.0
    metric = GroupedAUC(GROUPS, num_thresholds=NUM_THRESHOLDS, include_counts=True)
    metric.update_state(labels, scores, groups=groups)
    result = _floats(metric.result())

    old = groups["age"] == 2
    assert math.isnan(result["auc/age/old"])
    assert _keras_auc(labels[old], scores[old]) == 0.0  # what Keras's AUC says
    assert result["count/age/old"] == old.sum()
    assert result["positives/age/old"] == 0.0
    assert result["negatives/age/old"] == old.sum()
    assert result["positives"] == labels.sum()
    # The gap and worst value come from the groups where the AUC is defined.
    defined = [result["auc/age/young"], result["auc/age/mid"]]
    assert result["auc_gap/age"] == pytest.approx(max(defined) - min(defined), abs=TOL)
    assert result["auc_worst/age"] == pytest.approx(min(defined), abs=TOL)
    assert _floats(metric.counts()) == {
        k: v for k, v in result.items() if not k.startswith("auc")}


def test_multi_label_group_mean_skips_undefined_labels():
    labels, scores, groups = _random_data(600, num_labels=2, seed=3)
    labels[groups["sex"] == 0, 1] = 1.0  # label 1 has no negative among women
    metric = GroupedAUC(GROUPS, label_names=["a", "b"], num_thresholds=NUM_THRESHOLDS)
    metric.update_state(labels, scores, groups=groups)
    result = _floats(metric.result())
    assert math.isnan(result["auc/b/sex/female"])
    assert result["auc/sex/female"] == pytest.approx(result["auc/a/sex/female"], abs=TOL)


def test_gap_needs_two_defined_groups_and_is_nan_not_zero():
    metric = GroupedAUC({"sex": ["female", "male"]})
    metric.update_state([0.0, 0.0, 1.0], [0.2, 0.4, 0.9], groups={"sex": [0, 0, 1]})
    result = _floats(metric.result())
    assert math.isnan(result["auc_gap/sex"])
    assert math.isnan(result["auc_worst/sex"])
    assert result["auc"] == 1.0
    # One defined group: a worst value but no gap to speak of.
    metric.update_state([0.0, 1.0], [0.3, 0.8], groups={"sex": [0, 0]})
    result = _floats(metric.result())
    assert result["auc_worst/sex"] == result["auc/sex/female"] == 1.0
    assert math.isnan(result["auc_gap/sex"])


def test_group_absent_from_a_batch_accumulates():
    labels, scores, groups = _random_data(900, seed=4)
    whole = GroupedAUC(GROUPS, num_thresholds=NUM_THRESHOLDS)
    whole.update_state(labels, scores, groups=groups)

    streamed = GroupedAUC(GROUPS, num_thresholds=NUM_THRESHOLDS)
    old = groups["age"] == 2
    # First batch holds no "old" example, the second nothing else.
    for rows in (~old, old):
        streamed.update_state(labels[rows], scores[rows],
                              groups={k: v[rows] for k, v in groups.items()})
    np.testing.assert_allclose(
        np.array(list(_floats(streamed.result()).values())),
        np.array(list(_floats(whole.result()).values())), atol=TOL)


def test_zero_weight_rows_are_ignored_whatever_their_ids():
    labels, scores, groups = _random_data(500, seed=5)
    padded = {k: np.concatenate([v, [-1, 7]]).astype("int32") for k, v in groups.items()}
    weights = np.concatenate([np.ones(500), [0.0, 0.0]]).astype("float32")
    metric = GroupedAUC(GROUPS, include_counts=True)
    metric.update_state(np.concatenate([labels, [1.0, 0.0]]),
                        np.concatenate([scores, [0.9, 0.1]]),
                        sample_weight=weights, groups=padded)
    reference = GroupedAUC(GROUPS, include_counts=True)
    reference.update_state(labels, scores, groups=groups)
    assert _floats(metric.result()) == pytest.approx(_floats(reference.result()))
    assert float(metric.result()["count"]) == 500


def test_sample_weights_match_keras():
    labels, scores, groups = _random_data(800, seed=6)
    weights = np.random.default_rng(6).random(800).astype("float32")
    metric = GroupedAUC(GROUPS, num_thresholds=NUM_THRESHOLDS)
    metric.update_state(labels, scores, sample_weight=weights, groups=groups)
    rows = groups["sex"] == 1
    expected = _keras_auc(labels[rows], scores[rows], sample_weight=weights[rows])
    assert float(metric.result()["auc/sex/male"]) == pytest.approx(expected, abs=TOL)


def test_dict_labels_from_logits_and_graph_mode_agree():
    labels, scores, groups = _random_data(700, seed=7)
    eager = GroupedAUC(GROUPS)
    eager.update_state(labels, scores, groups=groups)

    logits_metric = GroupedAUC(GROUPS, from_logits=True)
    update = tf.function(logits_metric.update_state)
    logits = np.log(scores) - np.log1p(-scores)
    half = 350
    for rows in (slice(0, half), slice(half, None)):
        y = {"label": labels[rows], "groups": {k: v[rows] for k, v in groups.items()}}
        update(y, logits[rows])
    np.testing.assert_allclose(
        list(_floats(tf.function(logits_metric.result)()).values()),
        list(_floats(eager.result()).values()), atol=1e-5)


def test_reset_state_forgets_everything():
    labels, scores, groups = _random_data(300, seed=8)
    metric = GroupedAUC(GROUPS, include_counts=True)
    metric.update_state(1 - labels, scores, groups=groups)
    metric.reset_state()
    metric.update_state(labels, scores, groups=groups)
    fresh = GroupedAUC(GROUPS, include_counts=True)
    fresh.update_state(labels, scores, groups=groups)
    assert _floats(metric.result()) == pytest.approx(_floats(fresh.result()))


def test_config_round_trip_and_serialization():
    metric = GroupedAUC(GROUPS, label_names=["a", "b"], num_thresholds=300,
                        from_logits=True, include_counts=True, name="fair")
    config = metric.get_config()
    clone = GroupedAUC.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric))
    assert isinstance(restored, GroupedAUC)
    assert restored.groups == GROUPS
    assert restored.label_names == ["a", "b"]
    assert restored.num_thresholds == 300 and restored.from_logits
    assert restored.name == "fair"


def test_two_replicas_give_the_same_result_as_one():
    labels, scores, groups = _random_data(1000, num_labels=2, seed=9)
    single = GroupedAUC(GROUPS, label_names=["a", "b"], include_counts=True)
    single.update_state(labels, scores, groups=groups)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        metric = GroupedAUC(GROUPS, label_names=["a", "b"], include_counts=True)
    dataset = tf.data.Dataset.from_tensor_slices(
        ({"label": labels, "groups": groups}, scores)).batch(128)

    @tf.function
    def step(y, y_pred):
        strategy.run(lambda y, p: metric.update_state(y, p), args=(y, y_pred))

    for y, y_pred in strategy.experimental_distribute_dataset(dataset):
        step(y, y_pred)
    distributed = _floats(metric.result())
    assert distributed["count"] == 1000  # both replicas' histograms are read
    assert distributed == pytest.approx(_floats(single.result()), abs=TOL, nan_ok=True)


def test_dict_results_reach_evaluate_logs():
    labels, scores, groups = _random_data(200, seed=10)

    class GroupModel(keras.Model):
        """Returns its input as the score; feeds group ids to the metric."""

        def __init__(self):
            super().__init__()
            self.grouped_auc = GroupedAUC(GROUPS)

        def call(self, x):
            return x

        def test_step(self, data):
            x, y = data
            self.grouped_auc.update_state(y, self(x))
            return {**self.grouped_auc.result()}

    model = GroupModel()
    model.compile()
    logs = model.evaluate(scores, {"label": labels, "groups": groups},
                          batch_size=64, return_dict=True, verbose=0)
    reference = GroupedAUC(GROUPS)
    reference.update_state(labels, scores, groups=groups)
    assert logs == pytest.approx(_floats(reference.result()), abs=TOL)


def test_out_of_range_id_names_attribute_and_range():
    metric = GroupedAUC(GROUPS)
    groups = {"sex": np.array([0, 1, 2]), "age": np.array([0, 1, 2])}
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"attribute `sex` must lie in \[0, 2\) \(groups: female, male\)"):
        metric.update_state([0, 1, 1], [0.1, 0.5, 0.9], groups=groups)
    graph_update = tf.function(metric.update_state)
    groups = {"sex": np.array([0, 1, 1]), "age": np.array([0, -1, 2])}
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"attribute `age` must lie in \[0, 3\) \(groups: young, mid, old\)"):
        graph_update(np.array([0.0, 1.0, 1.0]), np.array([0.1, 0.5, 0.9]), groups=groups)


def test_bad_inputs_raise_clear_errors():
    metric = GroupedAUC(GROUPS)
    y, p = np.array([0.0, 1.0]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="no group ids"):
        metric.update_state(y, p)
    with pytest.raises(ValueError, match=r"missing for attribute\(s\) \['age'\]"):
        metric.update_state(y, p, groups={"sex": [0, 1]})
    with pytest.raises(ValueError, match=r"y_pred must have shape \[B\] or \[B, 1\]"):
        metric.update_state(y, np.ones((2, 3)), groups={"sex": [0, 1], "age": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="different batch sizes"):
        metric.update_state([0.0, 1.0, 1.0], p, groups={"sex": [0, 1], "age": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        metric.update_state(y, [0.2, np.nan], groups={"sex": [0, 1], "age": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="one id per example"):
        metric.update_state(y, p, groups={"sex": [0, 1, 1], "age": [0, 1]})
    with pytest.raises(tf.errors.InvalidArgumentError, match="one weight per example"):
        metric.update_state(y, p, sample_weight=[1.0],
                            groups={"sex": [0, 1], "age": [0, 1]})
    multi = GroupedAUC(GROUPS, label_names=["a", "b"])
    with pytest.raises(ValueError, match=r"y_true must have shape \[B, 2\]"):
        multi.update_state(y, np.ones((2, 2)), groups={"sex": [0, 1], "age": [0, 1]})


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": {}}, "non-empty dict"),
    ({"groups": {"sex": []}}, r"groups\['sex'\] must be a non-empty list"),
    ({"groups": {"sex": "female"}}, r"groups\['sex'\] must be a non-empty list"),
    ({"groups": {"sex": ["f", "f"]}}, "duplicate names"),
    ({"groups": {"a/b": ["f"]}}, "attribute name must be a non-empty string without '/'"),
    ({"groups": {"sex": ["f/m"]}}, "group name must be"),
    ({"groups": {"sex": ["f"]}, "multi_label": True}, "needs `label_names`"),
    ({"groups": {"sex": ["f"]}, "label_names": ["a"], "multi_label": False},
     "only for multi_label=True"),
    ({"groups": {"sex": ["f"]}, "label_names": ["a", "a"]}, "duplicate label names"),
    ({"groups": {"sex": ["f"]}, "label_names": [], "multi_label": True}, "`label_names` is empty"),
    ({"groups": {"sex": ["f"]}, "label_names": ["a/b"]}, "label name must be"),
    ({"groups": {"sex": ["f"]}, "num_thresholds": 1}, "integer > 1"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupedAUC(**kwargs)


def test_label_mask_leaves_unknown_labels_out_of_every_auc():
    labels, scores, groups = _random_data(3000, num_labels=2, seed=7)
    mask = (np.random.default_rng(8).random(labels.shape) < 0.6).astype("float32")
    # Unknown entries recorded as negatives with high scores: counted, they
    # would drag every AUC down.
    recorded = labels * mask
    scores = np.where(mask == 1, scores, 0.99).astype("float32")
    metric = GroupedAUC(GROUPS, label_names=["a", "b"], num_thresholds=NUM_THRESHOLDS)
    metric.update_state({"label": recorded, "groups": groups, "label_mask": mask}, scores)
    result = _floats(metric.result())
    for j, label in enumerate("ab"):
        known = mask[:, j] == 1
        assert result[f"auc/{label}"] == pytest.approx(
            _keras_auc(labels[known, j], scores[known, j]), abs=TOL)
        for i, group in enumerate(GROUPS["sex"]):
            rows = known & (groups["sex"] == i)
            assert result[f"auc/{label}/sex/{group}"] == pytest.approx(
                roc_auc_score(labels[rows, j], scores[rows, j]), abs=0.005)
