"""Tests for tf_dpfair.fairness.rates: per-group error rates, calibration, intervals."""

import math

import fairlearn.metrics
import numpy as np
import pandas as pd
import pytest

from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import thresholds

# Two groups of four; threshold 0.5. No score sits on a calibration bin edge.
# Group a: y 1 1 0 0, decisions 1 0 1 0: TPR 1/2, FPR 1/2, error 1/2.
# Group b: y 1 0 0 0, decisions 1 0 0 1: TPR 1, FPR 1/3, error 1/4.
TINY_Y = np.array([1, 1, 0, 0, 1, 0, 0, 0], float)
TINY_P = np.array([0.85, 0.45, 0.65, 0.15, 0.75, 0.35, 0.25, 0.72])
TINY_G = {"site": np.array(["a"] * 4 + ["b"] * 4)}


def _row(table, **where):
    mask = np.ones(len(table), bool)
    for column, value in where.items():
        mask &= (table[column] == value).to_numpy()
    assert mask.sum() == 1, where
    return table[mask].iloc[0]


def _tiny(**kwargs):
    return error_rates.evaluate(TINY_Y, TINY_P, TINY_G, threshold=0.5, min_group_size=1,
                                n_bootstrap=kwargs.pop("n_bootstrap", 20), **kwargs)


def test_binary_figures_by_hand():
    result = _tiny()
    a = _row(result.groups, group="a")
    b = _row(result.groups, group="b")
    expected = {
        # Brier: mean (p - y)^2. ECE: every score of a is alone in its bin;
        # b's 0.72 and 0.75 share bin 7 (rate 1/2, mean score 0.735).
        "a": {"tpr": 0.5, "fpr": 0.5, "selection_rate": 0.5, "error": 0.5,
              "brier": (0.15 ** 2 + 0.55 ** 2 + 0.65 ** 2 + 0.15 ** 2) / 4,
              "ece": (0.15 + 0.55 + 0.65 + 0.15) / 4},
        "b": {"tpr": 1.0, "fpr": 1 / 3, "selection_rate": 0.5, "error": 0.25,
              "brier": (0.25 ** 2 + 0.35 ** 2 + 0.25 ** 2 + 0.72 ** 2) / 4,
              "ece": 0.5 * 0.235 + 0.25 * 0.35 + 0.25 * 0.25},
    }
    for row, figures in ((a, expected["a"]), (b, expected["b"])):
        for name, value in figures.items():
            assert row[name] == pytest.approx(value), (row["group"], name)
    assert (a["count"], a["positives"], a["negatives"], a["threshold"]) == (4, 2, 2, 0.5)
    d = _row(result.disparities, attribute="site")
    assert d["equal_opportunity_difference"] == pytest.approx(0.5)
    assert d["fpr_difference"] == pytest.approx(1 / 6)
    assert d["equalized_odds_difference"] == pytest.approx(0.5)
    assert d["selection_rate_difference"] == pytest.approx(0.0)
    assert d["error_gap"] == pytest.approx(0.25)
    assert d["ece_gap"] == pytest.approx(0.375 - 0.2675)
    assert d["brier_gap"] == pytest.approx(0.1925 - 0.191475)
    assert (d["highest_error_group"], d["lowest_tpr_group"]) == ("a", "a")
    overall = result.overall.iloc[0]
    # 3 positives (2 caught), 5 negatives (2 selected), 3 wrong of 8.
    assert (overall["tpr"], overall["fpr"], overall["error"]) == pytest.approx(
        (2 / 3, 2 / 5, 3 / 8))
    assert overall["ece"] == pytest.approx(2.57 / 8)
    assert result.overall_accuracy == pytest.approx(5 / 8)
    assert result.threshold_rule == "given: score >= 0.5"


def test_multi_class_one_vs_rest_and_top1_by_hand():
    labels = np.array([0, 1, 2, 2, 2])
    scores = np.array([[0.72, 0.18, 0.10], [0.30, 0.62, 0.08], [0.52, 0.10, 0.38],
                       [0.10, 0.12, 0.78], [0.06, 0.16, 0.78]])
    groups = {"g": np.array([0, 0, 0, 1, 1])}
    result = error_rates.evaluate(labels, scores, groups, multi_class=True,
                                  label_names=["x", "y", "z"], min_group_size=1,
                                  n_bootstrap=10)
    # Group 0 predicts 0, 1, 0: class x TPR 1, FPR 1/2; class z TPR 0.
    x0 = _row(result.groups, group="0", label="x")
    assert (x0["tpr"], x0["fpr"], x0["selection_rate"]) == pytest.approx((1, 0.5, 2 / 3))
    assert _row(result.groups, group="0", label="z")["tpr"] == 0.0
    # Group 1 has no example of x: TPR undefined, not 0.
    assert math.isnan(_row(result.groups, group="1", label="x")["tpr"])
    top1 = _row(result.groups, group="0", label="top1")
    assert top1["error"] == pytest.approx(1 / 3)
    # Confidences 0.72, 0.62, 0.52 in bins 7, 6, 5; right, right, wrong.
    assert top1["ece"] == pytest.approx((0.28 + 0.38 + 0.52) / 3)
    assert top1["brier"] == pytest.approx((0.1208 + 0.2408 + 0.6648) / 3)
    assert math.isnan(top1["tpr"]) and pd.isna(top1["positives"])
    assert _row(result.groups, group="1", label="top1")["error"] == 0.0
    # Only class z has a TPR in both groups (0 and 1): the mean over classes
    # of the defined differences is 1.
    assert math.isnan(_row(result.disparities, label="x")["equal_opportunity_difference"])
    assert _row(result.disparities, label="z")["equal_opportunity_difference"] == 1.0
    mean = _row(result.disparities, label="mean")
    assert mean["equal_opportunity_difference"] == pytest.approx(1.0)
    assert _row(result.disparities, label="top1")["error_gap"] == pytest.approx(1 / 3)
    assert result.overall_accuracy == pytest.approx(4 / 5)
    assert result.threshold_rule == "top-1 class (no threshold)"


def _random(n=4000, num_labels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) if num_labels == 1 else (n, num_labels)
    y = (rng.random(shape) < 0.3).astype(float)
    groups = {"sex": rng.integers(0, 2, n), "age": rng.integers(0, 3, n)}
    shift = np.where(groups["age"] == 2, 0.5, 1.5)
    shift = shift if num_labels == 1 else shift[:, None]
    p = 1 / (1 + np.exp(-rng.normal(-1 + shift * y, 1.0)))
    return y, p, groups


def test_disparities_match_fairlearn_on_random_data():
    y, p, groups = _random()
    result = error_rates.evaluate(y, p, groups, threshold=0.4, n_bootstrap=0)
    decision = (p >= 0.4).astype(int)
    for attribute, ids in groups.items():
        d = _row(result.disparities, attribute=attribute)
        assert d["equalized_odds_difference"] == pytest.approx(
            fairlearn.metrics.equalized_odds_difference(y, decision, sensitive_features=ids))
        assert d["equal_opportunity_difference"] == pytest.approx(
            fairlearn.metrics.equal_opportunity_difference(y, decision, sensitive_features=ids))
        assert d["selection_rate_difference"] == pytest.approx(
            fairlearn.metrics.demographic_parity_difference(y, decision,
                                                            sensitive_features=ids))
        frame = fairlearn.metrics.MetricFrame(
            metrics={"tpr": fairlearn.metrics.true_positive_rate,
                     "fpr": fairlearn.metrics.false_positive_rate},
            y_true=y, y_pred=decision, sensitive_features=ids)
        for group, values in frame.by_group.iterrows():
            row = _row(result.groups, attribute=attribute, group=str(group))
            assert (row["tpr"], row["fpr"]) == pytest.approx((values["tpr"], values["fpr"]))
    # The planted weaker signal of age group 2 shows as its lower TPR.
    assert _row(result.disparities, attribute="age")["lowest_tpr_group"] == "2"


def test_weighted_figures_equal_figures_of_repeated_examples():
    rng = np.random.default_rng(3)
    y = (rng.random(80) < 0.4).astype(float)
    p = rng.random(80)
    decision = (p >= 0.5).astype(float)
    counts = rng.integers(0, 4, size=(6, 80)).astype(float)
    weighted = error_rates._weighted_figures(y, decision, p, counts, 10)
    for k in range(6):
        repeat = counts[k].astype(int)
        expected = error_rates._figures(np.repeat(y, repeat), np.repeat(p, repeat),
                                        np.repeat(decision, repeat), 10)
        for name, value in expected.items():
            assert weighted[name][k] == pytest.approx(value, abs=1e-12), name


def test_bootstrap_stays_within_each_group_and_pairs_by_key():
    y, p, groups = _random(n=600, seed=4)
    # Site 0 is decided perfectly; a replicate that mixed in site 1 would err.
    site = (np.arange(600) % 2)
    p = np.where(site == 0, np.where(y == 1, 0.9, 0.1), p)
    result = error_rates.evaluate(y, p, {"site": site}, threshold=0.5, n_bootstrap=200)
    assert np.all(result.replicates[("group", "site", "0", "label", "error")] == 0.0)
    assert np.all(result.replicates[("group", "site", "0", "label", "tpr")] == 1.0)
    other = error_rates.evaluate(y, 1 - p, {"site": site}, threshold=0.5, n_bootstrap=200)
    assert other.resample_key == result.resample_key
    again = error_rates.evaluate(y, p, {"site": site}, threshold=0.5, n_bootstrap=200, seed=1)
    assert again.resample_key != result.resample_key
    row = _row(result.groups, group="1")
    assert row["error_low"] < row["error"] < row["error_high"]


def test_multi_label_mean_and_masked_labels():
    y, p, groups = _random(n=1500, num_labels=2, seed=5)
    mask = (np.random.default_rng(6).random(y.shape) < 0.7).astype(float)
    # Unknown labels hold a placeholder and a confident wrong score.
    placeholder = np.where(mask == 1, y, -1.0)
    p = np.where(mask == 1, p, 0.99)
    result = error_rates.evaluate(placeholder, p, groups, threshold=[0.4, 0.6],
                                  label_names=["a", "b"], label_mask=mask, n_bootstrap=30)
    for j, label in enumerate("ab"):
        rows = (groups["sex"] == 1) & (mask[:, j] == 1)
        decision = (p[rows, j] >= [0.4, 0.6][j]).astype(int)
        row = _row(result.groups, attribute="sex", group="1", label=label)
        assert row["count"] == rows.sum() and row["threshold"] == [0.4, 0.6][j]
        assert row["tpr"] == pytest.approx(
            fairlearn.metrics.true_positive_rate(y[rows, j], decision))
        assert row["error"] == pytest.approx(np.mean(decision != y[rows, j]))
    a = _row(result.groups, attribute="sex", group="1", label="a")
    b = _row(result.groups, attribute="sex", group="1", label="b")
    mean = _row(result.groups, attribute="sex", group="1", label="mean")
    assert mean["ece"] == pytest.approx((a["ece"] + b["ece"]) / 2)
    disparities = result.disparities.set_index(["attribute", "label"])
    assert disparities.loc[("age", "mean"), "error_gap"] == pytest.approx(
        disparities.loc[[("age", "a"), ("age", "b")], "error_gap"].mean())
    assert result.summary_label == "mean"
    assert result.threshold_rule == "given: score >= 0.4, 0.6"


def test_chosen_threshold_and_its_rule_reach_the_tables():
    y, p, groups = _random(n=1000, seed=7)
    validation, test = slice(0, 500), slice(500, None)
    chosen = thresholds.choose_threshold(y[validation], p[validation])
    result = error_rates.evaluate(y[test], p[test], {"sex": groups["sex"][test]},
                                  threshold=chosen, n_bootstrap=0)
    assert result.threshold_rule == "Youden's J (max TPR - FPR) on validation data"
    assert (result.groups["threshold"] == chosen.values[0]).all()


def test_small_groups_are_reported_but_not_compared_and_train_warns():
    y, p, groups = _random(n=400, seed=8)
    site = np.r_[np.zeros(390, int), np.ones(10, int)]
    result = error_rates.evaluate(y, p, {"site": site}, threshold=0.5, n_bootstrap=0)
    assert _row(result.groups, group="1")["status"] == "too_small"
    d = result.disparities.iloc[0]
    assert d["groups_compared"] == 1 and d["too_small"] == "1"
    assert math.isnan(d["equalized_odds_difference"])
    with pytest.warns(UserWarning, match="outside the differential privacy guarantee"):
        train = error_rates.evaluate(y, p, groups, threshold=0.5, n_bootstrap=0,
                                     split="train")
    assert train.outside_dp_guarantee and train.groups["outside_dp_guarantee"].all()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "need a threshold"),
    ({"threshold": [0.5, 0.5]}, "threshold must be a number or a list of 1 numbers"),
    ({"threshold": 0.5, "scores": np.linspace(-1, 1, 8)}, r"probabilities in \[0, 1\]"),
    ({"threshold": 0.5, "n_bins": 0}, "n_bins must be an integer >= 1"),
    ({"threshold": 0.5, "n_bootstrap": -1}, "n_bootstrap must be an integer >= 0"),
    ({"threshold": 0.5, "label_names": ["top1"]}, "'top1' is reserved"),
    ({"multi_class": True, "threshold": 0.5}, "decides by the top-1 class"),
    ({"multi_class": True}, r"class ids \[N\] and probabilities \[N, K\]"),
    ({"multi_class": True, "scores": np.full((8, 2), 0.5),
      "labels": np.r_[np.zeros(7, int), 2]}, r"integers in \[0, 2\)"),
])
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = {"labels": TINY_Y, "scores": TINY_P, "groups": TINY_G, "n_bootstrap": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        error_rates.evaluate(args.pop("labels"), args.pop("scores"), args.pop("groups"),
                             **args)


def test_multi_class_scores_must_sum_to_one():
    scores = np.array([[0.6, 0.6], [0.2, 0.8]])
    with pytest.raises(ValueError, match=r"summing to 1 per example .a softmax.; row sums "
                                         r"range over \[1, 1.2\]"):
        error_rates.evaluate(np.array([0, 1]), scores, {"g": np.array([0, 1])},
                             multi_class=True, n_bootstrap=0)
