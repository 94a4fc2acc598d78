"""Runs Stage A2 and A3 of the redone Study 2 from the A1 choices (pre-registered).

docs/study2_redo/preregistration.md: A2 reruns each arm's chosen setting
with augmentation multiplicity 4 (seed 0); A3 runs the final setting of each
arm (the chosen one, with K = 4 where A2's validation accuracy beat it) with
seeds 0-4, checkpointed every 4 updates. An arm whose choice was the raw
weights runs without EMA in A3, so that `tf-dpfair-report --weights=ema`
reads every arm's chosen weights.

  python tools/study2_stage_a.py a2 CHOICES.csv A2_DIR
  python tools/study2_stage_a.py a3 CHOICES.csv A3_DIR [A2_TABLE.csv]

CHOICES.csv is written by `tools/validation_table.py`; A2_TABLE.csv is the
validation table of the A2 sweep. Both sweeps resume where they stopped.
"""

import math
import os
import re
import sys

import pandas as pd

from tf_dpfair.experiments import sweep_lib

CONFIG = "probe_study"
SEEDS = [0, 1, 2, 3, 4]


def chosen_settings(choice):
    """The settings of one arm's chosen A1 run (its folder name holds the grid values)."""
    values = dict(part.split("=", 1) for part in choice["run"].split("__"))
    settings = {key: sweep_lib.parse_value(value) for key, value in values.items()}
    if choice["weights"] == "raw":
        settings["ema_decay"] = 0.0
    return settings


def a2_grid(choices):
    """One grid part per private arm: its chosen setting with augmult 4, seed 0.

    The non-private arm keeps K = 1: views are averaged inside the DP step,
    which non-private training does not run (a departure the results list).
    """
    parts = []
    for _, choice in choices.iterrows():
        settings = chosen_settings(choice)
        if math.isinf(float(settings["epsilon"])):
            continue
        parts.append({**{k: [v] for k, v in settings.items()}, "augmult": [4]})
    return parts


def a3_grid(choices, a2_table=None):
    """One grid part per arm: the final setting with seeds 0-4, dense checkpoints."""
    parts = []
    for _, choice in choices.iterrows():
        settings = chosen_settings(choice)
        if a2_table is not None:
            settings["augmult"] = _augmult(choice, a2_table)
        parts.append({**{k: [v] for k, v in settings.items()}, "seed": SEEDS,
                      "checkpoint_every_updates": [4], "n_bootstrap": [200]})
    return parts


def _augmult(choice, a2_table):
    """4 where the arm's A2 run beat its A1 choice on validation, else 1."""
    pattern = re.escape(choice["run"].split("__learning_rate")[0])
    runs = a2_table[a2_table["run"].str.contains(pattern)]
    if runs.empty:
        return 1
    column = f"validation_accuracy_{choice['weights']}"
    return 4 if float(runs[column].max()) > float(choice["validation_accuracy"]) else 1


def main(argv):
    if len(argv) not in (4, 5) or argv[1] not in ("a2", "a3"):
        raise SystemExit(__doc__)
    choices = pd.read_csv(argv[2])
    if argv[1] == "a2":
        grid = a2_grid(choices)
    else:
        grid = a3_grid(choices, pd.read_csv(argv[4]) if len(argv) == 5 else None)
    os.makedirs(argv[3], exist_ok=True)
    sweep_lib.run_sweep(argv[3], config=CONFIG, grid=grid)


if __name__ == "__main__":
    main(sys.argv)
