"""Tests for tf_dpfair.fairness.auc: exact grouped AUC, disparities, bootstrap."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from tf_dpfair.fairness import auc as fairness

NAMES = {"sex": ["female", "male"], "age": ["young", "mid", "old"]}


def _random_data(n, num_labels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n,) if num_labels == 1 else (n, num_labels)
    labels = (rng.random(shape) < 0.3).astype(float)
    scores = rng.normal(labels, 1.0)
    groups = {"sex": rng.integers(0, 2, n), "age": rng.integers(0, 3, n)}
    return labels, scores, groups


def _row(table, **where):
    mask = np.ones(len(table), bool)
    for column, value in where.items():
        mask &= (table[column] == value).to_numpy()
    assert mask.sum() == 1, where
    return table[mask].iloc[0]


def test_group_aucs_and_counts_match_sklearn_multi_label():
    labels, scores, groups = _random_data(1200, num_labels=3, seed=1)
    result = fairness.evaluate(labels, scores, groups, group_names=NAMES,
                               label_names=["a", "b", "c"], n_bootstrap=20)
    assert result.summary_label == fairness.MEAN_LABEL
    for attribute, names in NAMES.items():
        for g, group in enumerate(names):
            rows = groups[attribute] == g
            aucs = []
            for j, label in enumerate("abc"):
                row = _row(result.groups, attribute=attribute, group=group, label=label)
                expected = roc_auc_score(labels[rows, j], scores[rows, j])
                assert row["auc"] == pytest.approx(expected, abs=1e-12)
                assert row["count"] == rows.sum()
                assert row["positives"] == labels[rows, j].sum()
                assert row["negatives"] == rows.sum() - labels[rows, j].sum()
                assert row["auc_low"] < row["auc"] < row["auc_high"]
                assert row["status"] == "ok"
                aucs.append(expected)
            mean = _row(result.groups, attribute=attribute, group=group, label="mean")
            assert mean["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
            assert pd.isna(mean["positives"])
    overall = result.overall.set_index("label")
    assert overall.loc["b", "auc"] == pytest.approx(roc_auc_score(labels[:, 1], scores[:, 1]))
    assert result.overall_auc == pytest.approx(overall.loc[["a", "b", "c"], "auc"].mean())


def test_disparities_are_worked_out_from_the_ok_groups():
    labels, scores, groups = _random_data(900, seed=2)
    result = fairness.evaluate(labels, scores, groups, group_names=NAMES, n_bootstrap=50)
    assert result.summary_label == "label"
    age = result.groups[result.groups["attribute"] == "age"].set_index("group")["auc"]
    row = _row(result.disparities, attribute="age", label="label")
    assert row["worst_group"] == age.idxmin() and row["best_group"] == age.idxmax()
    assert row["worst_auc"] == age.min()
    assert row["gap"] == pytest.approx(age.max() - age.min())
    assert row["ratio"] == pytest.approx(age.min() / age.max())
    assert row["groups_compared"] == 3 and row["too_small"] == ""
    assert row["gap_low"] <= row["gap_high"] and row["ratio_low"] <= row["ratio_high"]


def test_weighted_auc_handles_ties_and_repeats_like_sklearn():
    rng = np.random.default_rng(3)
    labels = (rng.random(60) < 0.4).astype(float)
    scores = np.round(rng.normal(labels, 1.0), 0)  # many ties
    counts = rng.integers(0, 4, size=(5, 60)).astype(float)
    aucs = fairness._weighted_aucs(labels, scores, np.vstack([np.ones(60), counts]))
    assert aucs[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for k in range(5):
        repeat = counts[k].astype(int)
        expected = roc_auc_score(np.repeat(labels, repeat), np.repeat(scores, repeat))
        assert aucs[k + 1] == pytest.approx(expected, abs=1e-12)
    only_negatives = fairness._weighted_aucs(np.zeros(4), np.arange(4.0), np.ones((1, 4)))
    assert math.isnan(only_negatives[0])


def test_bootstrap_resamples_within_each_group():
    rng = np.random.default_rng(4)
    n = 400
    sex = rng.integers(0, 2, n)
    labels = (rng.random(n) < 0.5).astype(float)
    # Women's scores separate the classes perfectly; men's are noise.
    scores = np.where(sex == 0, labels + rng.random(n) * 0.5, rng.random(n))
    result = fairness.evaluate(labels, scores, {"sex": sex}, n_bootstrap=300)
    women = result.replicates[("group", "sex", "0", "label")]
    # A resample that let men's examples into the women's group would score below 1.
    assert np.all(women == 1.0)
    row = _row(result.groups, group="0")
    assert (row["auc"], row["auc_low"], row["auc_high"]) == (1.0, 1.0, 1.0)


def test_bootstrap_keeps_each_group_size():
    # A group of two (one positive, one negative) among 1000 examples. Drawn
    # within the group, a replicate keeps both classes with probability 1/2;
    # drawn from the pooled data (group size ~ Poisson(2)), with 0.40.
    labels = np.r_[1.0, 0.0, np.tile([0.0, 1.0], 500)]
    scores = np.r_[0.9, 0.1, np.random.default_rng(12).random(1000)]
    site = np.r_[0, 0, np.ones(1000, int)]
    result = fairness.evaluate(labels, scores, {"site": site}, min_group_size=1,
                               n_bootstrap=4000)
    tiny = result.replicates[("group", "site", "0", "label")]
    assert set(tiny[~np.isnan(tiny)]) == {1.0}
    assert np.mean(~np.isnan(tiny)) == pytest.approx(0.5, abs=0.03)


def test_single_class_group_is_nan_and_left_out_of_disparities():
    labels, scores, groups = _random_data(600, seed=5)
    labels[groups["age"] == 2] = 0.0
    result = fairness.evaluate(labels, scores, groups, group_names=NAMES, n_bootstrap=50)
    old = _row(result.groups, attribute="age", group="old")
    assert math.isnan(old["auc"]) and math.isnan(old["auc_low"])
    assert old["status"] == "single_class"
    assert old["count"] == (groups["age"] == 2).sum() and old["positives"] == 0
    row = _row(result.disparities, attribute="age")
    assert row["groups_compared"] == 2
    assert row["worst_group"] in ("young", "mid")
    assert not math.isnan(row["gap"])


def test_no_comparable_group_gives_nan_disparities():
    labels, scores, groups = _random_data(100, seed=13)
    result = fairness.evaluate(np.zeros(100), scores, groups, n_bootstrap=10)
    row = _row(result.disparities, attribute="sex")
    assert row["groups_compared"] == 0 and row["worst_group"] is None
    for column in ("worst_auc", "worst_auc_low", "gap", "gap_high", "ratio"):
        assert math.isnan(row[column]), column
    assert math.isnan(result.overall_auc)


def test_intersections_flag_small_and_empty_groups():
    labels, scores, groups = _random_data(800, seed=6)
    groups["age"] = np.where(groups["sex"] == 1, groups["age"], 0)  # no old or mid women
    keep = np.ones(800, bool)
    men_old = np.flatnonzero((groups["sex"] == 1) & (groups["age"] == 2))
    keep[men_old[10:]] = False  # ten old men remain
    labels, scores = labels[keep], scores[keep]
    groups = {k: v[keep] for k, v in groups.items()}
    result = fairness.evaluate(labels, scores, groups, group_names=NAMES,
                               intersections=[("sex", "age")], min_group_size=30,
                               n_bootstrap=30)
    cross = result.groups[result.groups["attribute"] == "sex&age"].set_index("group")
    assert list(cross.index) == ["female&young", "female&mid", "female&old",
                                 "male&young", "male&mid", "male&old"]
    assert cross.loc["female&mid", "count"] == 0
    assert cross.loc["female&mid", "status"] == "too_small"
    assert math.isnan(cross.loc["female&mid", "auc"])
    assert cross.loc["male&old", "count"] == 10
    assert cross.loc["male&old", "status"] == "too_small"
    row = _row(result.disparities, attribute="sex&age")
    assert row["too_small"] == "female&mid, female&old, male&old"
    assert row["groups_compared"] == 3
    ok = cross[cross["status"] == "ok"]["auc"]
    assert row["gap"] == pytest.approx(ok.max() - ok.min())


def test_dataframe_input_matches_arrays():
    labels, scores, groups = _random_data(500, num_labels=2, seed=7)
    frame = pd.DataFrame({"y0": labels[:, 0], "y1": labels[:, 1], "p0": scores[:, 0],
                          "p1": scores[:, 1], "sex": np.array(["f", "m"])[groups["sex"]]})
    from_frame = fairness.evaluate(["y0", "y1"], ["p0", "p1"], ["sex"], data=frame,
                                   n_bootstrap=40, seed=3)
    from_arrays = fairness.evaluate(labels, scores, {"sex": frame["sex"].to_numpy()},
                                    label_names=["y0", "y1"], n_bootstrap=40, seed=3)
    pd.testing.assert_frame_equal(from_frame.groups, from_arrays.groups)
    pd.testing.assert_frame_equal(from_frame.disparities, from_arrays.disparities)
    assert set(from_frame.groups["group"]) == {"f", "m"}
    assert from_frame.resample_key == from_arrays.resample_key


def test_named_groups_absent_from_data_are_reported():
    labels, scores, _ = _random_data(200, seed=8)
    result = fairness.evaluate(labels, scores, {"site": np.zeros(200, int)},
                               group_names={"site": ["a", "b"]}, n_bootstrap=10)
    absent = _row(result.groups, group="b")
    assert absent["count"] == 0 and absent["status"] == "too_small"
    assert math.isnan(absent["auc"])


def test_split_labels_every_table_and_train_warns():
    labels, scores, groups = _random_data(300, seed=9)
    held_out = fairness.evaluate(labels, scores, groups, n_bootstrap=10)
    assert not held_out.outside_dp_guarantee
    assert set(held_out.groups["split"]) == {"test"}
    with pytest.warns(UserWarning, match="outside the differential privacy guarantee"):
        train = fairness.evaluate(labels, scores, groups, n_bootstrap=10, split="train")
    assert train.outside_dp_guarantee
    for table in (train.groups, train.disparities, train.overall):
        assert table["outside_dp_guarantee"].all() and set(table["split"]) == {"train"}


def test_seed_fixes_the_intervals():
    labels, scores, groups = _random_data(300, seed=10)
    first = fairness.evaluate(labels, scores, groups, n_bootstrap=100, seed=1)
    again = fairness.evaluate(labels, scores, groups, n_bootstrap=100, seed=1)
    other = fairness.evaluate(labels, scores, groups, n_bootstrap=100, seed=2)
    pd.testing.assert_frame_equal(first.groups, again.groups)
    assert not np.allclose(first.groups["auc_low"], other.groups["auc_low"])
    assert first.resample_key == again.resample_key != other.resample_key
    no_intervals = fairness.evaluate(labels, scores, groups, n_bootstrap=0)
    assert no_intervals.groups["auc_low"].isna().all()
    assert not no_intervals.groups["auc"].isna().any()


def test_percentile_interval_ignores_undefined_replicates():
    low, high = fairness.percentile_interval(
        np.r_[np.arange(1.0, 101.0), [np.nan] * 50], 0.9)
    assert (low, high) == pytest.approx((5.95, 95.05))
    assert all(math.isnan(v) for v in fairness.percentile_interval([np.nan], 0.9))


@pytest.mark.slow
def test_bootstrap_interval_coverage_is_near_nominal():
    # Binormal scores: AUC = Phi(d / sqrt(2)) exactly.
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(11)
    covered = []
    for repeat in range(200):
        sex = np.r_[np.zeros(150, int), np.ones(250, int)]
        labels = (rng.random(400) < 0.4).astype(float)
        scores = rng.normal(d * labels, 1.0)
        result = fairness.evaluate(labels, scores, {"sex": sex}, n_bootstrap=400,
                                   seed=repeat, confidence=0.95)
        for _, row in result.groups.iterrows():
            covered.append(row["auc_low"] <= true_auc <= row["auc_high"])
    coverage = np.mean(covered)
    print(f"coverage of {len(covered)} intervals: {coverage:.3f}")
    assert 0.90 <= coverage <= 0.99, coverage


@pytest.mark.slow
def test_gap_interval_coverage_with_a_planted_gap():
    # Two groups of 300 with binormal AUCs 0.80 and 0.70 (gap 0.100); the
    # percentile interval of max - min covered it in 93% of 150 repeats.
    separations = np.array([1.19, 0.74])
    true_gap = np.ptp(norm.cdf(separations / math.sqrt(2)))
    rng = np.random.default_rng(14)
    group = np.r_[np.zeros(300, int), np.ones(300, int)]
    covered = []
    for repeat in range(100):
        labels = (rng.random(600) < 0.4).astype(float)
        scores = rng.normal(labels * separations[group], 1.0)
        result = fairness.evaluate(labels, scores, {"g": group}, n_bootstrap=400, seed=repeat)
        row = result.disparities.iloc[0]
        covered.append(row["gap_low"] <= true_gap <= row["gap_high"])
    assert 0.85 <= np.mean(covered) <= 0.99, np.mean(covered)


@pytest.mark.parametrize("kwargs, message", [
    ({"scores": np.zeros(9)}, r"same shape, \[N\] or \[N, L\]; got \(10, 1\) and \(9, 1\)"),
    ({"groups": {"sex": np.zeros(9, int)}}, r"groups\['sex'\] has shape \(9,\)"),
    ({"scores": np.r_[np.nan, np.zeros(9)]}, "NaN or infinite values .1 rows, first at row 0"),
    ({"labels": np.r_[2.0, np.zeros(9)]}, "labels must be 0 or 1"),
    ({"labels": np.r_[np.nan, np.zeros(9)]}, "labels must be 0 or 1"),
    ({"groups": {}}, "groups must be a non-empty dict"),
    ({"groups": {"sex": np.r_[None, np.zeros(9)]}}, r"groups\['sex'\] has missing values"),
    ({"group_names": {"sex": ["f"]}}, r"attribute 'sex' must be integers in \[0, 1\)"),
    ({"group_names": {"race": ["a"]}}, r"unknown attribute\(s\) \['race'\]"),
    ({"intersections": [("sex", "race")]}, r"two or more known attributes; got \['sex', 'race'\]"),
    ({"intersections": [("sex",)]}, "two or more known attributes"),
    ({"label_names": ["a", "b"]}, "label_names must be 1 distinct names"),
    ({"split": ""}, "split must be a non-empty string"),
    ({"n_bootstrap": -1}, "n_bootstrap must be an integer >= 0"),
    ({"confidence": 1.0}, r"confidence must lie in \(0, 1\)"),
    ({"min_group_size": 0}, "min_group_size must be an integer >= 1"),
    ({"seed": None}, "seed must be an integer >= 0"),
    ({"group_names": {"sex": ["f", "f"]}}, r"group_names\['sex'\] has duplicate names"),
])
def test_bad_inputs_raise_clear_errors(kwargs, message):
    rng = np.random.default_rng(0)
    args = {"labels": np.r_[np.zeros(5), np.ones(5)], "scores": rng.random(10),
            "groups": {"sex": np.r_[np.zeros(5, int), np.ones(5, int)]}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fairness.evaluate(args.pop("labels"), args.pop("scores"), args.pop("groups"),
                          n_bootstrap=args.pop("n_bootstrap", 5), **args)


def test_bad_dataframe_and_label_inputs():
    frame = pd.DataFrame({"y": [0, 1], "p": [0.1, 0.9], "sex": ["f", "m"]})
    with pytest.raises(ValueError, match="score column 'q' is not in the DataFrame"):
        fairness.evaluate("y", "q", ["sex"], data=frame)
    with pytest.raises(ValueError, match="`data` must be a pandas DataFrame"):
        fairness.evaluate("y", "p", ["sex"], data={"y": [0, 1]})
    labels = np.array([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="'mean' is reserved"):
        fairness.evaluate(labels, labels * 0.5, {"sex": [0, 1]}, label_names=["a", "mean"])
    with pytest.raises(ValueError, match="No examples"):
        fairness.evaluate(np.zeros(0), np.zeros(0), {"sex": np.zeros(0)})


def test_label_mask_leaves_unknown_labels_out_of_aucs_counts_and_intervals():
    labels, scores, groups = _random_data(900, num_labels=2, seed=4)
    rng = np.random.default_rng(5)
    mask = (rng.random(labels.shape) < 0.7).astype(float)
    # Unknown labels may hold any placeholder; a confident wrong score on
    # each would pull every AUC down if they were counted.
    placeholder = np.where(mask == 1, labels, -1.0)
    scores = np.where(mask == 1, scores, 10.0)
    result = fairness.evaluate(placeholder, scores, groups, group_names=NAMES,
                               label_names=["a", "b"], n_bootstrap=200, label_mask=mask)
    for g, group in enumerate(NAMES["sex"]):
        for j, label in enumerate("ab"):
            rows = (groups["sex"] == g) & (mask[:, j] == 1)
            row = _row(result.groups, attribute="sex", group=group, label=label)
            assert row["auc"] == pytest.approx(
                roc_auc_score(labels[rows, j], scores[rows, j]), abs=1e-12)
            assert row["count"] == rows.sum()
            assert row["positives"] == labels[rows, j].sum()
            assert row["auc_low"] < row["auc"] < row["auc_high"]
            assert row["auc_high"] - row["auc_low"] < 0.3
    # Without the mask the placeholders are refused, not silently scored.
    with pytest.raises(ValueError, match="mark unknown labels with label_mask"):
        fairness.evaluate(placeholder, scores, groups, n_bootstrap=0)
    with pytest.raises(ValueError, match="label_mask must be 0/1"):
        fairness.evaluate(labels, scores, groups, n_bootstrap=0, label_mask=mask[:, :1])
