"""Tests for tf_dpfair.fairness.rates_report: matched on accuracy, Markdown, CSV, figures."""

import os

import numpy as np
import pandas as pd
import pytest

from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import auc as fairness
from tf_dpfair.fairness import rates_report as rate_reports


def _data(n=2000, seed=0):
    """Binary labels; group 1's scores carry a weaker signal."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 2, n)
    y = (rng.random(n) < 0.4).astype(float)
    return y, site, rng


def _scores(y, site, rng, strength):
    signal = strength * np.where(site == 1, 0.5, 1.5)
    return 1 / (1 + np.exp(-rng.normal(-1 + 2 * signal * y, 1.0)))


def test_compare_matched_picks_the_checkpoint_of_closest_accuracy():
    y, site, rng = _data()
    private = _scores(y, site, rng, 0.8)
    checkpoints = {f"epoch_{k}": _scores(y, site, rng, s)
                   for k, s in ((1, 0.3), (2, 0.7), (3, 1.2))}
    kwargs = {"threshold": 0.5, "n_bootstrap": 50}
    result = rate_reports.compare_matched(private, checkpoints, labels=y,
                                          groups={"site": site}, **kwargs)

    def accuracy(p):
        return np.mean((p >= 0.5) == y)

    distances = {name: abs(accuracy(p) - accuracy(private)) for name, p in checkpoints.items()}
    assert result.checkpoint == min(distances, key=distances.get)
    assert result.candidates["distance"].tolist() == pytest.approx(list(distances.values()))
    assert result.paired
    row = result.disparities.iloc[0]
    # Worked out again from the two models' own evaluations.
    non_private = error_rates.evaluate(y, checkpoints[result.checkpoint], {"site": site},
                                       **kwargs)
    expected = (result.private.disparities["equalized_odds_difference"].iloc[0]
                - non_private.disparities["equalized_odds_difference"].iloc[0])
    assert row["delta_equalized_odds_difference"] == pytest.approx(expected)
    assert (row["delta_equalized_odds_difference_low"]
            <= row["delta_equalized_odds_difference_high"])


def test_identical_models_have_zero_paired_differences():
    y, site, rng = _data(n=800, seed=1)
    scores = _scores(y, site, rng, 1.0)
    result = rate_reports.compare_matched(scores, {"same": scores.copy()}, labels=y,
                                          groups={"site": site}, threshold=0.5,
                                          n_bootstrap=30)
    for name in error_rates.DISPARITIES:
        row = result.disparities.iloc[0]
        assert row["delta_" + name] == 0.0
        assert row["delta_" + name + "_low"] == row["delta_" + name + "_high"] == 0.0


def test_compare_matched_refuses_mismatched_settings():
    y, site, rng = _data(n=400, seed=2)
    a = error_rates.evaluate(y, _scores(y, site, rng, 1.0), {"site": site}, threshold=0.5,
                             n_bootstrap=0)
    b = error_rates.evaluate(y, _scores(y, site, rng, 1.0), {"site": site}, threshold=0.6,
                             n_bootstrap=0)
    with pytest.raises(ValueError, match="different data or settings"):
        rate_reports.compare_matched(a, {"b": b})
    with pytest.raises(ValueError, match="pass `labels` and `groups`"):
        rate_reports.compare_matched(a, {"b": np.zeros(400)})
    with pytest.raises(ValueError, match="non-empty dict"):
        rate_reports.compare_matched(a, {})


def test_write_report_alone_and_after_the_auc_report(tmp_path):
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, 600)
    probabilities = rng.dirichlet(np.ones(3), 600)
    probabilities[np.arange(600), classes] += 1.0
    probabilities /= probabilities.sum(1, keepdims=True)
    groups = {"orientation": np.where(rng.random(600) < 0.2, "rotated", "upright")}
    rates = error_rates.evaluate(classes, probabilities, groups, multi_class=True,
                                 label_names=["a", "b", "c"], n_bootstrap=20)
    paths = rate_reports.write_report(rates, str(tmp_path / "alone"), title="Rates")
    text = open(paths["report"]).read()
    assert text.startswith("# Rates")
    assert "Decision: top-1 class (no threshold). ECE over 10 equal-width bins" in text
    assert "![Error rates by orientation](rates_orientation_top1.png)" in text
    assert os.path.getsize(paths["rates_figure/orientation/top1"]) > 5000
    table = pd.read_csv(paths["rates_groups"])
    assert set(table["label"]) == {"a", "b", "c", "mean", "top1"}
    top1 = table[(table["label"] == "top1") & (table["group"] == "rotated")].iloc[0]
    rotated = groups["orientation"] == "rotated"
    assert top1["error"] == pytest.approx(
        np.mean(probabilities[rotated].argmax(1) != classes[rotated]))

    auc = fairness.evaluate(np.eye(3)[classes], probabilities, groups,
                            label_names=["a", "b", "c"], n_bootstrap=20)
    paths = rate_reports.write_report(rates, str(tmp_path / "both"), auc=auc, title="Both")
    text = open(paths["report"]).read()
    assert text.index("## Disparities") < text.index("## Error rates and calibration")
    assert {"groups", "rates_groups", "rates_disparities", "rates_overall"} <= set(paths)


def test_report_of_training_data_says_it_is_outside_the_guarantee(tmp_path):
    y, site, rng = _data(n=300, seed=4)
    with pytest.warns(UserWarning):
        rates = error_rates.evaluate(y, _scores(y, site, rng, 1.0), {"site": site},
                                     threshold=0.5, n_bootstrap=0, split="train")
    text = open(rate_reports.write_report(rates, str(tmp_path))["report"]).read()
    assert fairness.OUTSIDE_DP_NOTE in text
    figure = rate_reports.plot_attribute(rates, "site")
    assert fairness.OUTSIDE_DP_NOTE in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="Unknown attribute"):
        rate_reports.plot_attribute(rates, "sex")


def test_candidate_accuracy_agrees_with_the_full_evaluation():
    rng = np.random.default_rng(5)
    y = (rng.random((500, 2)) < 0.3).astype(float)
    mask = (rng.random((500, 2)) < 0.8).astype(float)
    groups = {"site": rng.integers(0, 2, 500)}
    checkpoints = {f"c{k}": rng.random((500, 2)) for k in range(3)}
    kwargs = {"threshold": [0.4, 0.6], "label_mask": mask, "n_bootstrap": 0}
    result = rate_reports.compare_matched(rng.random((500, 2)), checkpoints, labels=y,
                                          groups=groups, **kwargs)
    for name, scores in checkpoints.items():
        full = error_rates.evaluate(y, scores, groups, **kwargs)
        assert result.candidates.set_index("checkpoint").loc[name, "accuracy"] == \
            pytest.approx(full.overall_accuracy)
    classes = rng.integers(0, 3, 500)
    probabilities = rng.dirichlet(np.ones(3), 500)
    result = rate_reports.compare_matched(probabilities, {"c": probabilities[::-1].copy()},
                                          labels=classes, groups=groups, multi_class=True,
                                          n_bootstrap=0)
    assert result.candidates["accuracy"][0] == pytest.approx(
        np.mean(probabilities[::-1].argmax(1) == classes))
