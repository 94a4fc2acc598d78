"""Runs the remedy study's R1 (pre-registered): clipping modes on the Study 2 probe.

docs/remedy_study/preregistration.md: the linear probe on cached
EfficientNet-Lite0 features, at the batch and EMA decay Study 2's Stage A1
chose for standard DP-SGD at each epsilon (1, 4, 8); Global-Adapt (target
quantile 0.9) and quantile clipping (0.5) at learning rates 0.03, 0.1, 0.3,
1.0 (seed 0, EMA kept so that raw or EMA weights can be chosen), with the
group diagnostics and their alignment figures on. The standard arm keeps
Study 2's choice; it is rerun here at seed 0 with the diagnostics only, to
describe its clip fractions and update cosines beside the modes'.

  python tools/remedy_r1.py choice STUDY2_CHOICES.csv R1_DIR FEATURES_DIR
  python tools/validation_table.py R1_DIR r1.csv r1_choices.csv
  python tools/remedy_r1.py extend STUDY2_CHOICES.csv R1_DIR FEATURES_DIR r1_choices.csv
  python tools/remedy_r1.py final STUDY2_CHOICES.csv FINAL_DIR FEATURES_DIR r1_choices.csv A3_DIR

`extend` adds, once, a learning rate three times beyond a choice at an end
of the grid (the rule of Study 2). `final` runs each mode's choice with
seeds 0-4 (checkpoints every 4 updates; an arm whose choice was the raw
weights runs without EMA, as in Study 2's A3), then links the Study 2 A3
runs of the standard arms (epsilon 1, 4, 8) and the non-private arm into
FINAL_DIR, so that one `tf-dpfair-report --sweep_dir=FINAL_DIR
--weights=ema --plateau_window=0.25 --tuned_settings=batch_size,ema_decay`
judges every claim. FEATURES_DIR is a feature cache of the same data (Study
2's A3 folder's `features`): the features are not computed again.
"""

import math
import os
import sys

import pandas as pd

from tf_dpfair.experiments import sweep_lib

CONFIG = "probe_study"
MODES = ("global_adapt", "quantile")
EPSILONS = (1.0, 4.0, 8.0)
RATES = (0.03, 0.1, 0.3, 1.0)
SEEDS = (0, 1, 2, 3, 4)
DIAGNOSTICS = {"group_diagnostics": [True], "diagnostics_alignment": [True]}


def run_settings(run):
    """The grid settings of a run, from its folder name."""
    values = dict(part.split("=", 1) for part in run.split("__"))
    return {key: sweep_lib.parse_value(value) for key, value in values.items()}


def _standard_choices(study2_choices):
    """Study 2's chosen run per epsilon of the study (1, 4, 8)."""
    rows = {}
    for _, choice in study2_choices.iterrows():
        epsilon = float(choice["epsilon"])
        if epsilon in EPSILONS:
            rows[epsilon] = choice
    missing = [e for e in EPSILONS if e not in rows]
    if missing:
        raise SystemExit(f"Study 2's choices lack epsilon {missing}.")
    return rows


def _base(choice):
    """The data, batch and EMA of Study 2's choice (its learning rate left out)."""
    settings = run_settings(choice["run"])
    keep = ("rotated_fraction", "batch_size", "ema_decay", "epsilon")
    return {key: [settings[key]] for key in keep}


def choice_grid(study2_choices):
    """Each mode at each epsilon over the rates, and the standard choices, seed 0."""
    parts = []
    for epsilon, choice in _standard_choices(study2_choices).items():
        parts.append({**_base(choice), "adaptive_clipping": list(MODES),
                      "learning_rate": list(RATES), **DIAGNOSTICS})
        parts.append({**_base(choice), "learning_rate": [run_settings(choice["run"])[
            "learning_rate"]], **DIAGNOSTICS})
    return parts


def extension_grid(study2_choices, r1_choices):
    """One rate three times beyond each (mode, epsilon) choice at an end of the grid."""
    parts = []
    standard = _standard_choices(study2_choices)
    for _, row in r1_choices.iterrows():
        mode, end = row.get("adaptive_clipping"), row.get("at_grid_end")
        if not isinstance(mode, str) or mode not in MODES or not isinstance(end, str):
            continue
        rate = min(RATES) / 3 if end == "low" else max(RATES) * 3
        parts.append({**_base(standard[float(row["epsilon"])]), "adaptive_clipping": [mode],
                      "learning_rate": [round(rate, 6)], **DIAGNOSTICS})
    return parts


def final_grid(r1_choices):
    """Each mode's chosen run with seeds 0-4 and dense checkpoints."""
    parts = []
    for _, row in r1_choices.iterrows():
        if row.get("adaptive_clipping") not in MODES:
            continue
        settings = run_settings(row["run"])
        settings = {k: v for k, v in settings.items() if k not in DIAGNOSTICS}
        if row["weights"] == "raw":
            settings["ema_decay"] = 0.0
        parts.append({**{k: [v] for k, v in settings.items()}, "seed": list(SEEDS),
                      "checkpoint_every_updates": [4], "n_bootstrap": [200], **DIAGNOSTICS})
    return parts


def link_study2_runs(study2_choices, a3_dir, final_dir):
    """Links Study 2's A3 runs of the standard (1, 4, 8) and non-private arms."""
    wanted = {float(e) for e in EPSILONS} | {math.inf}
    linked = 0
    for name in sorted(os.listdir(a3_dir)):
        if not os.path.exists(os.path.join(a3_dir, name, "result.json")):
            continue
        if float(run_settings(name).get("epsilon", math.nan)) in wanted:
            target = os.path.join(final_dir, name)
            if not os.path.lexists(target):
                os.symlink(os.path.abspath(os.path.join(a3_dir, name)), target)
            linked += 1
    print(f"{linked} Study 2 A3 runs linked into {final_dir}.")


def main(argv):
    if len(argv) < 5 or argv[1] not in ("choice", "extend", "final"):
        raise SystemExit(__doc__)
    command, study2, work_dir, features = argv[1:5]
    study2_choices = pd.read_csv(study2)
    base = {"feature_cache_dir": os.path.abspath(features)}
    if command == "choice":
        grid = choice_grid(study2_choices)
    elif command == "extend":
        grid = extension_grid(study2_choices, pd.read_csv(argv[5]))
        if not grid:
            print("No choice at an end of the grid: nothing to extend.")
            return
        grid = choice_grid(study2_choices) + grid  # the sweep file lists every run
    else:
        grid = final_grid(pd.read_csv(argv[5]))
    os.makedirs(work_dir, exist_ok=True)
    sweep_lib.run_sweep(work_dir, config=CONFIG, base=base, grid=grid)
    if command == "final":
        link_study2_runs(study2_choices, argv[6], work_dir)


if __name__ == "__main__":
    main(sys.argv)
