"""The mechanism study: per-group diagnostics and accuracy, run on tiny IDX files."""

import json
import math
import os

import pytest

from experiment_fixtures import tiny_fashion
from tf_dpfair.experiments import mechanism_lib


@pytest.fixture
def recipe(tmp_path):
    tiny_fashion(str(tmp_path))
    return mechanism_lib.Recipe(data_dir=str(tmp_path), test_examples=200, batch_size=100,
                                microbatch_size=50, epochs=2, steps_per_epoch=2)


def test_study_records_groups_per_epoch_and_writes_its_report(recipe, tmp_path):
    settings = [mechanism_lib.Setting(300, 0.2, "inf"), mechanism_lib.Setting(300, 0.2, "4")]
    work = str(tmp_path / "study")
    results = mechanism_lib.run_study(recipe, settings, work, log=lambda _: None)
    no_dp, private = results
    assert no_dp["noise_multiplier"] == 0 and math.isinf(no_dp["epsilon"])
    assert private["epsilon"] <= 4.0 and private["noise_multiplier"] > 0
    for result in results:
        history = result["history"]
        for group in ("upright", "rotated"):
            assert len(history[f"test_accuracy/{group}"]) == 2
            shares = history[f"train_diagnostics/orientation/{group}/example_share"]
            # About 20% of the training images are rotated (300 of them, Poisson).
            expected = 0.2 if group == "rotated" else 0.8
            assert all(abs(s - expected) < 0.15 for s in shares)
    # Nothing is clipped without DP; the clipped run clips.
    assert no_dp["history"]["train_diagnostics/clip_fraction"] == [0.0, 0.0]
    assert private["history"]["train_diagnostics/clip_fraction"][-1] > 0
    path = mechanism_lib.write_report(results, str(tmp_path / "report"))
    text = open(path).read()
    assert "outside the DP guarantee" in text and "| inf | 0.2 | 300 |" in text
    for name in ("curves.png", "summary.png", "summary.json"):
        assert os.path.getsize(tmp_path / "report" / name) > 0
    rows = json.load(open(tmp_path / "report" / "summary.json"))
    assert rows[0]["accuracy_gap"] == pytest.approx(
        rows[0]["upright_accuracy"] - rows[0]["rotated_accuracy"])
    # A finished setting is read back, not trained again.
    again = mechanism_lib.run_setting(recipe, settings[0], work)
    assert again["seconds"] == no_dp["seconds"]
