"""Writes a sweep's per-group training diagnostics of the last epoch, one row per run.

For the remedy study's descriptive part (docs/remedy_study/preregistration.md,
item 4): does a clipping mode bring the rotated group's clip fraction towards
the upright group's, and its update cosine up? Reads each finished run's
result.json ("training.diagnostics", written with `group_diagnostics` and
`diagnostics_alignment`; figures on training data, outside the DP guarantee)
and the final clip threshold of adaptive modes:

  python tools/diagnostics_table.py SWEEP_DIR OUT.csv [ATTRIBUTE]

Columns: the run, the sweep's axes, then per group of ATTRIBUTE
(default "orientation") its clip fraction (the share of its examples above
the update's threshold), median gradient norm (in units of C's threshold,
within a histogram bin), share of the clipped sum against its share of
examples, and update cosine; and the final threshold where the mode adapts
one. Means over the runs of each arm (seed aside) are printed.
"""

import json
import os
import sys

import pandas as pd

FIGURES = ("clip_fraction", "grad_norm_p50", "clipped_sum_share", "example_share",
           "update_cosine")


def run_row(run_dir, axes, attribute):
    """One run's diagnostics, or None when unfinished or without them."""
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    groups = result.get("training", {}).get("diagnostics", {}).get(attribute)
    if not groups:
        return None
    row = {"run": os.path.basename(run_dir)}
    row.update({axis: result["settings"].get(axis) for axis in axes})
    row["adaptive_clipping"] = result["settings"].get("adaptive_clipping") or "standard"
    for group, figures in sorted(groups.items()):
        for figure in FIGURES:
            row[f"{group}_{figure}"] = figures.get(figure)
    adaptive = result.get("privacy", {}).get("adaptive_clipping") or {}
    row["final_threshold"] = adaptive.get("final_threshold")
    return row


def diagnostics_table(sweep_dir, attribute="orientation"):
    """The table of `run_row` over a sweep folder's runs (axes from its sweep.json)."""
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        axes = [a for a in json.load(f)["axes"] if a != "adaptive_clipping"]
    rows = [run_row(os.path.join(sweep_dir, name), axes, attribute)
            for name in sorted(os.listdir(sweep_dir))]
    return pd.DataFrame([r for r in rows if r is not None])


def main(argv):
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__)
    table = diagnostics_table(argv[1], *argv[3:])
    if table.empty:
        raise SystemExit(f"No run under {argv[1]} saved group diagnostics.")
    table.to_csv(argv[2], index=False)
    print(f"{len(table)} runs written to {argv[2]}.")
    arm = [c for c in ("adaptive_clipping", "epsilon", "learning_rate") if c in table]
    figures = [c for c in table.columns if c.endswith(("clip_fraction", "update_cosine",
                                                       "final_threshold"))]
    print(table.groupby(arm, dropna=False)[figures].mean().round(3).to_string())


if __name__ == "__main__":
    main(sys.argv)
