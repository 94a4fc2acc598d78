"""Tests for tf_dpfair.fairness.auc_report: matched comparison, Markdown, CSV, figures."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tf_dpfair.fairness import auc as fairness
from tf_dpfair.fairness import auc_report as reports

PATHOLOGIES = ["atelectasis", "cardiomegaly", "consolidation", "edema", "effusion"]
AGES = ["<40", "40-60", "60-80", ">80"]
NAMES = {"sex": ["female", "male"], "age": AGES, "race": ["a", "b", "c"]}


def _chexpert_like(n=3000, seed=0, strength=1.0, age_signal=(1.6, 1.3, 1.0, 0.7)):
    """Five pathologies; score signal planted per age band, none by sex or race."""
    rng = np.random.default_rng(seed)
    groups = {"sex": rng.integers(0, 2, n), "age": rng.integers(0, 4, n),
              "race": rng.choice(3, n, p=[0.6, 0.3, 0.1])}
    prevalence = np.array([0.15, 0.12, 0.07, 0.25, 0.38])
    labels = (rng.random((n, 5)) < prevalence).astype(float)
    signal = strength * np.asarray(age_signal)[groups["age"]][:, None]
    scores = rng.normal(labels * signal, 1.0)
    return labels, scores, groups


def _evaluate(labels, scores, groups, **kwargs):
    kwargs = {"label_names": PATHOLOGIES, "group_names": NAMES, "n_bootstrap": 200, **kwargs}
    return fairness.evaluate(labels, scores, groups, **kwargs)


def test_report_recovers_planted_age_ordering(tmp_path):
    labels, scores, groups = _chexpert_like()
    paths = reports.write_report(_evaluate(labels, scores, groups), str(tmp_path))

    table = pd.read_csv(paths["groups"])
    mean = table[(table["attribute"] == "age") & (table["label"] == "mean")]
    assert list(mean.sort_values("auc", ascending=False)["group"]) == AGES
    disparities = pd.read_csv(paths["disparities"]).set_index(["attribute", "label"])
    assert disparities.loc[("age", "mean"), "worst_group"] == ">80"
    assert disparities.loc[("age", "mean"), "gap_low"] > 0.05
    assert disparities.loc[("sex", "mean"), "gap"] < disparities.loc[("age", "mean"), "gap_low"]
    markdown = open(paths["report"]).read()
    assert "| age | >80 | mean |" in markdown
    assert "![AUC by age](auc_age.png)" in markdown


def test_compare_matched_picks_the_closest_checkpoint():
    labels, private_scores, groups = _chexpert_like(seed=0, strength=0.8)
    rng = np.random.default_rng(5)
    checkpoints = {f"step{k}": rng.normal(labels * s, 1.0)
                   for k, s in [(1, 0.4), (2, 0.7), (3, 1.0), (4, 1.4)]}
    result = reports.compare_matched(private_scores, checkpoints, labels=labels,
                                     groups=groups, label_names=PATHOLOGIES,
                                     group_names=NAMES, n_bootstrap=50)

    def overall(scores):
        return np.mean([roc_auc_score(labels[:, j], scores[:, j]) for j in range(5)])

    target = overall(private_scores)
    distances = {name: abs(overall(s) - target) for name, s in checkpoints.items()}
    assert result.checkpoint == min(distances, key=distances.get)
    candidates = result.candidates.set_index("checkpoint")
    for name, distance in distances.items():
        assert candidates.loc[name, "distance"] == pytest.approx(distance, abs=1e-12)
    assert candidates["chosen"].sum() == 1 and candidates.loc[result.checkpoint, "chosen"]
    assert result.non_private.overall_auc == pytest.approx(overall(checkpoints[result.checkpoint]))
    # Side by side: the private columns are the private evaluation's figures.
    row = result.groups[(result.groups["attribute"] == "age")
                        & (result.groups["group"] == ">80") & (result.groups["label"] == "mean")]
    private = result.private.groups.loc[row.index[0]]
    assert row["private_auc"].iloc[0] == private["auc"]
    assert row["difference"].iloc[0] == pytest.approx(
        private["auc"] - result.non_private.groups.loc[row.index[0], "auc"])


def test_identical_models_have_zero_paired_differences():
    labels, scores, groups = _chexpert_like(n=1500)
    evaluation = _evaluate(labels, scores, groups, n_bootstrap=100)
    result = reports.compare_matched(evaluation, {"a": evaluation, "b": evaluation})
    assert result.checkpoint == "a"  # equal distance: the first wins
    assert result.paired
    for column in ("difference", "difference_low", "difference_high"):
        assert (result.groups[column].dropna() == 0).all()
    for column in ("gap_difference", "gap_difference_low", "gap_difference_high"):
        assert (result.disparities[column] == 0).all()


def test_paired_intervals_need_the_same_resamples():
    labels, scores, groups = _chexpert_like(n=1500)
    other = scores + np.random.default_rng(3).normal(0, 0.5, scores.shape)
    paired = reports.compare_matched(other, {"np": scores}, labels=labels, groups=groups,
                                     n_bootstrap=100, seed=4)
    assert paired.paired
    assert paired.disparities["gap_difference_low"].notna().all()
    low, high = paired.disparities["gap_difference_low"], paired.disparities["gap_difference_high"]
    assert (low <= high).all()
    unpaired = reports.compare_matched(
        fairness.evaluate(labels, other, groups, n_bootstrap=100, seed=4),
        {"np": fairness.evaluate(labels, scores, groups, n_bootstrap=100, seed=5)})
    assert not unpaired.paired
    assert unpaired.disparities["gap_difference_low"].isna().all()
    assert unpaired.disparities["gap_difference"].notna().all()


def test_compare_matched_refuses_bad_inputs():
    labels, scores, groups = _chexpert_like(n=600)
    evaluation = fairness.evaluate(labels, scores, groups, n_bootstrap=10)
    with pytest.raises(ValueError, match="checkpoints must be a non-empty dict"):
        reports.compare_matched(evaluation, {})
    with pytest.raises(ValueError, match="Checkpoint 'x' is given as scores: pass `labels`"):
        reports.compare_matched(evaluation, {"x": scores})
    shuffled = {k: v[::-1] for k, v in groups.items()}
    other_data = fairness.evaluate(labels, scores, shuffled, n_bootstrap=10)
    with pytest.raises(ValueError, match="'x' were evaluated on different data"):
        reports.compare_matched(evaluation, {"x": other_data})
    other_size = fairness.evaluate(labels, scores, groups, n_bootstrap=10, min_group_size=100)
    with pytest.raises(ValueError, match="min_group_size differ"):
        reports.compare_matched(evaluation, {"x": other_size})
    other_level = fairness.evaluate(labels, scores, groups, n_bootstrap=10, confidence=0.9)
    with pytest.raises(ValueError, match="different confidence levels"):
        reports.compare_matched(evaluation, {"x": other_level})
    one_class = fairness.evaluate(np.zeros(600), scores[:, 0], groups, n_bootstrap=10)
    with pytest.raises(ValueError, match="overall AUC is undefined"):
        reports.compare_matched(one_class, {"x": evaluation})
    with pytest.raises(ValueError, match="No checkpoint has a defined overall AUC"):
        reports.compare_matched(evaluation, {"x": one_class})


def test_to_markdown_formats_cells():
    frame = pd.DataFrame({"group": ["a|b", "c"], "count": pd.array([3, pd.NA], "Int64"),
                          "auc": [0.81234, math.nan], "auc_low": [0.7, math.nan],
                          "auc_high": [0.9, math.nan], "ok": [True, False]})
    assert reports.to_markdown(frame, digits=2) == (
        "| group | count | auc | ok |\n"
        "| --- | ---: | --- | --- |\n"
        "| a\\|b | 3 | 0.81 [0.70, 0.90] | yes |\n"
        "| c |  | NaN [NaN, NaN] | no |\n")
    plain = reports.to_markdown(frame[["auc", "auc_low"]], digits=1, merge_intervals=False)
    assert plain.splitlines()[2] == "| 0.8 | 0.7 |"


def test_write_report_of_a_comparison_on_training_data(tmp_path):
    labels, scores, groups = _chexpert_like(n=800)
    with pytest.warns(UserWarning, match="outside the differential privacy guarantee"):
        result = reports.compare_matched(scores, {"np": scores * 1.1}, labels=labels,
                                         groups=groups, group_names=NAMES,
                                         n_bootstrap=20, split="train",
                                         intersections=[("sex", "race")])
    paths = reports.write_report(result, str(tmp_path), title="Train check")
    assert set(paths) == {"groups", "disparities", "candidates", "report", "figure/sex",
                          "figure/age", "figure/race", "figure/sex&race"}
    for name in ("sex", "age", "race", "sex&race"):
        with open(paths[f"figure/{name}"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.basename(paths["figure/sex&race"]) == "auc_sex_race.png"
    markdown = open(paths["report"]).read()
    assert markdown.startswith("# Train check\n")
    assert f"**Warning: {fairness.OUTSIDE_DP_NOTE}**" in markdown
    assert "**np**" in markdown and "with paired intervals" in markdown
    assert pd.read_csv(paths["groups"])["outside_dp_guarantee"].all()


def test_plot_attribute_draws_both_models_and_labels_counts():
    labels, scores, groups = _chexpert_like(n=800)
    with pytest.warns(UserWarning, match="outside the differential privacy guarantee"):
        result = reports.compare_matched(scores, {"np": scores + 0.1}, labels=labels,
                                         groups=groups, group_names=NAMES, n_bootstrap=20,
                                         split="train", min_group_size=100)
    figure = reports.plot_attribute(result, "race")
    axes = figure.axes[0]
    ticks = [t.get_text() for t in axes.get_xticklabels()]
    counts = np.bincount(groups["race"], minlength=3)
    assert ticks == [f"{g}\nn={c}" for g, c in zip(NAMES["race"], counts)]
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == ["private", "non-private (np)"]
    assert counts[2] < 100  # race "c" is too small: one hollow marker per model
    hollow = [line for line in axes.get_lines() if line.get_markerfacecolor() == "white"]
    assert [len(line.get_xdata()) for line in hollow] == [1, 1]
    assert fairness.OUTSIDE_DP_NOTE in axes.get_title()
    single = reports.plot_attribute(result.private, "sex", label="label_3")
    legend = [t.get_text() for t in single.axes[0].get_legend().get_texts()]
    assert legend == ["private"]
    assert "AUC by sex (label_3)" in single.axes[0].get_title()
    with pytest.raises(ValueError, match="Unknown attribute 'site'"):
        reports.plot_attribute(result, "site")
    with pytest.raises(ValueError, match="Unknown label 'edema'"):
        reports.plot_attribute(result, "sex", label="edema")


def test_plot_survives_an_interval_that_misses_the_estimate():
    evaluation = fairness.evaluate(
        np.array([0, 1, 0, 1, 1, 0, 0, 1]), np.linspace(0, 1, 8),
        {"sex": np.array([0, 0, 0, 0, 1, 1, 1, 1])}, n_bootstrap=3, seed=0)
    groups = evaluation.groups.copy()
    groups.loc[:, "auc_low"] = groups["auc"] + 0.1  # interval above the estimate
    groups.loc[:, "auc_high"] = groups["auc"] + 0.2
    evaluation.groups.loc[:, ["auc_low", "auc_high"]] = groups[["auc_low", "auc_high"]]
    figure = reports.plot_attribute(evaluation, "sex")
    assert len(figure.axes) == 1
