"""Tables that put several runs of one study side by side (Study 2's summary).

A sweep is one run of every setting; a study repeats it with other seeds.
Given the sweep folders of each repeat (and, optionally, the folders of an
ablation and the report folders of `report.py`), prints Markdown tables with
one column per repeat:

- accuracy, rotated-group accuracy and the accuracy gap per epsilon, EMA and
  raw weights, with the noise multiplier and the run's minutes;
- EMA minus raw accuracy per epsilon (the EMA ablation);
- the ablation's runs against the main runs at the same epsilon (for Study 2,
  the logical batch size with the same examples seen);
- the last epoch's training diagnostics of the designated group and the rest;
- the matched comparison with the non-private checkpoints (from each report's
  `matched.csv`).

Usage:
  python tools/study_summary.py --runs=/tmp/ft/run0,/tmp/ft/run1,/tmp/ft/run2 \\
      --ablation=/tmp/ft/batch250_run0,...  --reports=/tmp/ft/report0,... \\
      --attribute=orientation --group=rotated > summary.md
"""

import argparse
import math
import os

import pandas as pd


def load(folders):
    """Each folder's results.csv, in the order given."""
    return [pd.read_csv(os.path.join(folder, "results.csv")) for folder in folders]


def epsilon_label(value):
    return "inf" if not math.isfinite(float(value)) else f"{float(value):g}"


def by_epsilon(table):
    """Rows keyed by the target epsilon's label, in increasing epsilon (inf last)."""
    table = table.copy()
    table["_key"] = table["settings.epsilon"].astype(float)
    return {epsilon_label(row["_key"]): row for _, row in table.sort_values("_key").iterrows()}


def cell(values, digits=3):
    """Values of the repeats as 'a / b / c' ('-' where a repeat lacks one)."""
    return " / ".join("-" if v is None or pd.isna(v) else f"{v:.{digits}f}" for v in values)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def get(row, column):
    return None if row is None or column not in row.index else row[column]


def main_table(runs, attribute, group):
    keyed = [by_epsilon(t) for t in runs]
    epsilons = list(dict.fromkeys(e for k in keyed for e in k))
    rows = []
    for eps in epsilons:
        found = [k.get(eps) for k in keyed]
        private = eps != "inf"
        for weights in (("ema", "raw") if private else ("raw",)):
            m = f"metrics.{weights}."
            rows.append([
                eps, weights,
                cell([get(r, m + "accuracy") for r in found]),
                cell([get(r, f"{m}groups.{attribute}.{group}.accuracy") for r in found]),
                cell([get(r, f"{m}gap.{attribute}.accuracy") for r in found]),
                cell([get(r, "privacy.noise_multiplier") for r in found], 3) if private
                else "-",
                cell([None if get(r, "training.seconds_this_session") is None
                      else get(r, "training.seconds_this_session") / 60 for r in found], 1),
            ])
    return markdown(["epsilon", "weights", "accuracy", f"accuracy {group}",
                     f"gap {attribute}", "noise multiplier", "minutes"], rows)


def ema_table(runs):
    keyed = [by_epsilon(t) for t in runs]
    epsilons = [e for e in dict.fromkeys(e for k in keyed for e in k) if e != "inf"]
    rows = []
    for eps in epsilons:
        found = [k.get(eps) for k in keyed]
        diffs = [None if r is None else r["metrics.ema.accuracy"] - r["metrics.raw.accuracy"]
                 for r in found]
        rows.append([eps, cell(diffs)])
    return markdown(["epsilon", "EMA - raw accuracy"], rows)


def ablation_table(runs, ablations, axis, attribute, group):
    """The ablation's runs beside the main runs of the same epsilon."""
    rows_by_value = {}
    epsilons = set()
    for repeat, tables in enumerate(ablations):
        for _, row in tables.iterrows():
            epsilons.add(epsilon_label(row["settings.epsilon"]))
            rows_by_value.setdefault(row[f"settings.{axis}"], {})[repeat] = row
    for repeat, table in enumerate(runs):
        for _, row in table.iterrows():
            if epsilon_label(row["settings.epsilon"]) in epsilons:
                rows_by_value.setdefault(row[f"settings.{axis}"], {})[repeat] = row
    n = max(len(runs), len(ablations))
    rows = []
    for value in sorted(rows_by_value):
        found = [rows_by_value[value].get(i) for i in range(n)]
        rows.append([
            value, cell([get(r, "privacy.steps") for r in found], 0),
            cell([get(r, "privacy.noise_multiplier") for r in found]),
            cell([get(r, "privacy.epsilon") for r in found], 2),
            cell([get(r, "metrics.ema.accuracy") for r in found]),
            cell([get(r, "metrics.raw.accuracy") for r in found]),
            cell([get(r, f"metrics.ema.groups.{attribute}.{group}.accuracy") for r in found]),
        ])
    return markdown([axis, "updates", "noise multiplier", "epsilon", "accuracy (EMA)",
                     "accuracy (raw)", f"accuracy {group} (EMA)"], rows)


def diagnostics_table(runs, attribute, group, others):
    keyed = [by_epsilon(t) for t in runs]
    epsilons = [e for e in dict.fromkeys(e for k in keyed for e in k) if e != "inf"]
    prefix = f"training.diagnostics.{attribute}."
    rows = []
    for eps in epsilons:
        found = [k.get(eps) for k in keyed]
        row = [eps]
        for figure in ("clip_fraction", "grad_norm_p50", "loss"):
            for name in (group, others):
                row.append(cell([get(r, f"{prefix}{name}.{figure}") for r in found], 2))
        rows.append(row)
    header = ["epsilon"]
    for figure in ("clip fraction", "median norm / C", "loss"):
        header += [f"{figure} {group}", f"{figure} {others}"]
    return markdown(header, rows)


def matched_table(reports, attribute):
    tables = [pd.read_csv(os.path.join(folder, "matched.csv")) for folder in reports]
    rows = []
    keys = []
    for table in tables:
        table = table[table["attribute"] == attribute]
        for _, row in table.iterrows():
            key = (str(row["epsilon"]), row["weights"])
            if key not in keys:
                keys.append(key)
    for eps, weights in keys:
        found = []
        for table in tables:
            match = table[(table["epsilon"].astype(str) == eps)
                          & (table["weights"] == weights) & (table["attribute"] == attribute)]
            found.append(None if match.empty else match.iloc[0])

        def interval(r):
            if r is None:
                return "-"
            return (f"{r['gap_difference']:+.3f} [{r['gap_difference_low']:+.3f}, "
                    f"{r['gap_difference_high']:+.3f}]")

        rows.append([
            eps, weights,
            cell([get(r, "private_accuracy") for r in found]),
            cell([get(r, "non_private_accuracy") for r in found]),
            cell([get(r, "private_accuracy_gap") for r in found]),
            cell([get(r, "non_private_accuracy_gap") for r in found]),
            " / ".join(interval(r) for r in found),
        ])
    return markdown(["epsilon", "weights", "private accuracy", "matched non-private accuracy",
                     "private accuracy gap", "non-private accuracy gap",
                     "AUC gap difference at matched AUC [95%]"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated sweep folders")
    parser.add_argument("--ablation", default="", help="comma-separated sweep folders, "
                        "each holding the ablation's runs of one repeat")
    parser.add_argument("--ablation_axis", default="batch_size")
    parser.add_argument("--reports", default="", help="comma-separated report folders")
    parser.add_argument("--attribute", default="orientation")
    parser.add_argument("--group", default="rotated")
    parser.add_argument("--others", default="upright")
    args = parser.parse_args()
    runs = load(args.runs.split(","))
    print(f"## Accuracy per epsilon ({len(runs)} runs, as run 1 / run 2 / ...)\n")
    print(main_table(runs, args.attribute, args.group) + "\n")
    print("## EMA ablation: EMA minus raw accuracy, same runs\n")
    print(ema_table(runs) + "\n")
    if args.ablation:
        groups = [f.split(";") for f in args.ablation.split(",")]
        ablations = [pd.concat(load(folders), ignore_index=True) for folders in groups]
        print(f"## Ablation: {args.ablation_axis}\n")
        print(ablation_table(runs, ablations, args.ablation_axis, args.attribute,
                             args.group) + "\n")
    if any(c.startswith("training.diagnostics.") for c in runs[0].columns):
        print("## Training diagnostics, last epoch (training data, outside the guarantee)\n")
        print(diagnostics_table(runs, args.attribute, args.group, args.others) + "\n")
    if args.reports:
        print("## Private vs non-private at matched performance\n")
        print(matched_table(args.reports.split(","), args.attribute) + "\n")


if __name__ == "__main__":
    main()
