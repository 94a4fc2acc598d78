"""tools/study2_stage_a.py: the A2 and A3 grids follow the A1 choices."""

import importlib.util
import math
import os

import pandas as pd

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "study2_stage_a.py")


def _tool():
    spec = importlib.util.spec_from_file_location("study2_stage_a", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHOICES = pd.DataFrame([
    {"rotated_fraction": 0.1, "epsilon": 1.0, "weights": "ema", "validation_accuracy": 0.85,
     "run": "rotated_fraction=0.1__batch_size=4096__ema_decay=0.984__epsilon=1__"
            "learning_rate=0.3"},
    {"rotated_fraction": 0.1, "epsilon": math.inf, "weights": "raw",
     "validation_accuracy": 0.9,
     "run": "rotated_fraction=0.1__batch_size=1024__ema_decay=0.996__epsilon=inf__"
            "learning_rate=0.1"},
])


def test_grids_follow_the_choices():
    tool = _tool()
    (a2,) = tool.a2_grid(CHOICES)  # the non-private arm has no K = 4 run
    assert a2 == {"rotated_fraction": [0.1], "batch_size": [4096], "ema_decay": [0.984],
                  "epsilon": [1], "learning_rate": [0.3], "augmult": [4]}
    a2_table = pd.DataFrame({"run": ["rotated_fraction=0.1__batch_size=4096__ema_decay=0.984"
                                     "__epsilon=1__learning_rate=0.3__augmult=4"],
                             "validation_accuracy_ema": [0.86]})
    private, non_private = tool.a3_grid(CHOICES, a2_table)
    assert private["augmult"] == [4] and private["seed"] == [0, 1, 2, 3, 4]
    assert private["checkpoint_every_updates"] == [4]
    assert non_private["augmult"] == [1] and non_private["ema_decay"] == [0.0]
    assert math.isinf(non_private["epsilon"][0])
    worse = a2_table.assign(validation_accuracy_ema=[0.84])
    assert tool.a3_grid(CHOICES, worse)[0]["augmult"] == [1]
