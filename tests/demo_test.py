"""End-to-end test of the demo job on its synthetic fallback data."""

import json
import os

import pytest

from tf_dpfair.experiments import demo_lib


def test_demo_trains_privately_and_reports_epsilon(tmp_path, capsys):
    result = demo_lib.run(target_epsilon=3.0, epochs=3, batch_size=300,
                          microbatch_size=50, data_dir=str(tmp_path),
                          synthetic_examples=3000)
    out = capsys.readouterr().out
    assert "dataset-fashion-mnist" in out and "synthetic" in out
    assert result["source"] == "synthetic"
    # Calibrated to the target and accounted for the updates actually made.
    assert 2.5 < result["epsilon"] <= 3.0
    assert "Poisson subsampling" in result["statement"]
    # Ten smooth prototypes: private training clearly beats chance (0.1).
    assert result["test_accuracy"] > 0.5


def test_run_demo_trains_both_and_writes_report_on_synthetic_fallback(tmp_path, capsys):
    from experiment_fixtures import TINY

    work_dir = str(tmp_path / "demo")
    table, paths, description = demo_lib.run_demo(
        work_dir, epsilon=2.0, data_dir=str(tmp_path / "missing"),
        overrides={**TINY, "steps": 2}, verbose=0)
    assert "synthetic" in capsys.readouterr().out and "synthetic" in description
    assert sorted(table["privacy.private"]) == [False, True]
    assert os.path.exists(paths["report"]) and os.path.exists(paths["metric_vs_epsilon"])
    for run in ("epsilon=2", "epsilon=inf"):
        assert os.listdir(os.path.join(work_dir, run, "tensorboard"))
        assert os.path.exists(os.path.join(work_dir, run, "report_raw", "report.md"))
    # The private run's per-group training diagnostics reach its result, the
    # report and the dashboards, labelled as outside the guarantee.
    private_dir = os.path.join(work_dir, "epsilon=2")
    with open(os.path.join(private_dir, "result.json")) as f:
        diagnostics = json.load(f)["training"]["diagnostics"]
    assert set(diagnostics) == {"sex", "age"}
    shares = [g["example_share"] for g in diagnostics["sex"].values()]
    assert sum(shares) == pytest.approx(1.0)
    assert all(0 <= g["clip_fraction"] <= 1 for g in diagnostics["age"].values())
    report = open(paths["report"]).read()
    assert "## Training diagnostics (training data, outside the DP guarantee)" in report
    assert os.path.isdir(os.path.join(private_dir, "tensorboard", "train_diagnostics"))
    assert not os.path.exists(os.path.join(work_dir, "epsilon=inf", "tensorboard",
                                           "train_diagnostics"))
