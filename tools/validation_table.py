"""Writes a sweep's validation figures, one row per finished run, for the study's choices.

Reads only validation figures (the last checkpoint's `val_scores` and
`ema_val_scores` against `val_labels.npz`), never test figures, so that a
pre-registered choice (docs/study2_redo/preregistration.md) can be made and
checked from the table alone:

  python tools/validation_table.py SWEEP_DIR OUT.csv [CHOICES.csv]

Columns: the run's folder, the grid settings that vary, the update count of
the last checkpoint, validation accuracy with raw and with EMA weights, and
the training seconds of the run. With CHOICES.csv, also the pre-registered
choice of each arm (rotated share and epsilon): the run and weights (raw or
EMA) of highest validation accuracy, and whether its learning rate is an end
of the grid (then the grid is extended once on that side).
"""

import glob
import json
import os
import sys

import numpy as np
import pandas as pd


def run_row(run_dir, axes):
    """One finished run's validation figures (None when unfinished or without them)."""
    result_path = os.path.join(run_dir, "result.json")
    labels_path = os.path.join(run_dir, "checkpoints", "val_labels.npz")
    checkpoints = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.npz")))
    if not (os.path.exists(result_path) and os.path.exists(labels_path) and checkpoints):
        return None
    with open(result_path) as f:
        result = json.load(f)
    with np.load(labels_path) as saved:
        labels = saved["labels"]
    row = {"run": os.path.basename(run_dir)}
    row.update({axis: result["settings"].get(axis) for axis in axes})
    with np.load(checkpoints[-1]) as last:
        row["updates"] = int(last["updates"])
        for weights, key in (("raw", "val_scores"), ("ema", "ema_val_scores")):
            row[f"validation_accuracy_{weights}"] = (
                float((last[key].argmax(1) == labels).mean()) if key in last.files else None)
    row["train_seconds"] = result["training"]["seconds_this_session"]
    return row


def validation_table(sweep_dir):
    """The table of `run_row` over a sweep folder's runs (axes from its sweep.json)."""
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        axes = json.load(f)["axes"]
    rows = [run_row(os.path.join(sweep_dir, name), axes)
            for name in sorted(os.listdir(sweep_dir))]
    return pd.DataFrame([r for r in rows if r is not None])


ARM = ("rotated_fraction", "epsilon")


def choices(table, arm=ARM, rate="learning_rate"):
    """Per arm, the run and weights of highest validation accuracy.

    An arm is the runs of one value of each setting of `arm` and, where the
    table has it, of `adaptive_clipping` (a missing value, standard clipping,
    is a value of its own). Ties go to the first run in the table's order. `at_grid_end` says
    whether the chosen learning rate is the smallest or largest tried for
    that arm.
    """
    # The remedy study's arms are also told apart by their clipping mode.
    arm = tuple(arm) + tuple(a for a in ("adaptive_clipping",) if a in table.columns
                             and a not in arm)
    rows = []
    for key, runs in table.groupby(list(arm), sort=True, dropna=False):
        scored = runs.melt(id_vars=[c for c in runs.columns if not c.startswith(
            "validation_accuracy_")], var_name="weights", value_name="validation_accuracy")
        scored = scored.dropna(subset=["validation_accuracy"])
        best = scored.loc[scored["validation_accuracy"].idxmax()]
        rates = sorted(runs[rate].unique())
        end = ("" if len(rates) < 2 else "low" if best[rate] == rates[0] else
               "high" if best[rate] == rates[-1] else "")
        rows.append({**dict(zip(arm, key if isinstance(key, tuple) else (key,))),
                     "run": best["run"], "weights": best["weights"].split("_")[-1],
                     "validation_accuracy": best["validation_accuracy"],
                     "candidates": len(runs), "at_grid_end": end})
    return pd.DataFrame(rows)


def main(argv):
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__)
    table = validation_table(argv[1])
    table.to_csv(argv[2], index=False)
    print(f"{len(table)} finished runs written to {argv[2]}.")
    if len(argv) == 4:
        chosen = choices(table)
        chosen.to_csv(argv[3], index=False)
        print(chosen.to_string(index=False))


if __name__ == "__main__":
    main(sys.argv)
