"""tools/validation_table.py: validation figures of a sweep's runs, never test figures."""

import importlib.util
import json
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "validation_table.py")


def _tool():
    spec = importlib.util.spec_from_file_location("validation_table", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder, learning_rate, val_scores, ema_val_scores, labels):
    os.makedirs(os.path.join(folder, "checkpoints"))
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"settings": {"learning_rate": learning_rate, "seed": 0},
                   "training": {"seconds_this_session": 3.5}}, f)
    np.savez(os.path.join(folder, "checkpoints", "val_labels.npz"), labels=labels)
    # An earlier checkpoint, and the last one, which alone counts.
    np.savez(os.path.join(folder, "checkpoints", "epoch_001.npz"), updates=2,
             val_scores=np.eye(3)[np.zeros(4, int)], scores=np.eye(3)[labels])
    np.savez(os.path.join(folder, "checkpoints", "epoch_002.npz"), updates=4,
             val_scores=val_scores, ema_val_scores=ema_val_scores,
             scores=np.eye(3)[labels])


def test_table_has_the_last_checkpoints_validation_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    labels = np.array([0, 1, 2, 1])
    _run(str(sweep / "lr=0.1"), 0.1, np.eye(3)[[0, 1, 2, 0]], np.eye(3)[[0, 1, 2, 1]], labels)
    _run(str(sweep / "lr=1"), 1.0, np.eye(3)[[2, 2, 2, 2]], np.eye(3)[[0, 0, 0, 0]], labels)
    os.makedirs(sweep / "unfinished")
    (sweep / "sweep.json").write_text(json.dumps({"axes": ["learning_rate"]}))
    table = _tool().validation_table(str(sweep)).set_index("run")
    assert sorted(table.index) == ["lr=0.1", "lr=1"]
    assert table.loc["lr=0.1", "validation_accuracy_raw"] == pytest.approx(0.75)
    assert table.loc["lr=0.1", "validation_accuracy_ema"] == pytest.approx(1.0)
    assert table.loc["lr=1", "validation_accuracy_raw"] == pytest.approx(0.25)
    assert table.loc["lr=1", "learning_rate"] == 1.0 and table.loc["lr=1", "updates"] == 4
    assert "test" not in " ".join(table.columns)


def test_choice_per_arm_takes_the_best_run_and_weights():
    import pandas as pd

    table = pd.DataFrame({
        "run": ["a", "b", "c", "d"], "rotated_fraction": [0.1] * 4,
        "epsilon": [1.0, 1.0, 1.0, 8.0], "learning_rate": [0.1, 0.3, 1.0, 0.1],
        "validation_accuracy_raw": [0.80, 0.84, 0.70, 0.9],
        "validation_accuracy_ema": [0.81, 0.83, 0.86, None]})
    chosen = _tool().choices(table).set_index("epsilon")
    assert chosen.loc[1.0, "run"] == "c" and chosen.loc[1.0, "weights"] == "ema"
    assert chosen.loc[1.0, "at_grid_end"] == "high" and chosen.loc[1.0, "candidates"] == 3
    assert chosen.loc[8.0, "run"] == "d" and chosen.loc[8.0, "weights"] == "raw"
