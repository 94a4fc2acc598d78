"""Tables and figures of a sweep: Markdown + PNG + CSV.

From a sweep folder (`sweep_lib.run_sweep`) `write_sweep_report` writes:

- `summary.md/.csv`: one row per run: the grid's settings, accounted
  epsilon, overall figure, per-group figures, worst group and gap; with EMA
  weights (private runs that keep them) and with raw weights.
- `groups.md/.csv`: per-group figures with 95% bootstrap intervals.
- `metric_vs_epsilon.png`: overall and per-group figure against epsilon.
- `disparity_vs_overall.png`: gap against overall figure, for private runs
  and for every evaluated checkpoint of the non-private runs.
- `verdicts.md/.csv` (`verdicts_lib`): holds / fails / inconclusive per
  claim (accuracy gap; excess disparity at matched accuracy, interpolated
  on the non-private checkpoint curve), Holm-corrected across the report;
  `choices.md/.csv` when the grid varies a learning rate (chosen on the
  validation split).
- `mechanisms.md/.csv` (`mechanisms_lib`), when a private arm sets
  `adaptive_clipping`: each clipping mode against standard DP-SGD at the
  same epsilon (accuracy cost; difference of excess disparities: lower,
  higher or no difference detected), Holm across those claims.
- `matched.md/.csv` and `matched/<run>_<weights>/`: descriptive; each
  private model against the checkpoint of its non-private counterpart (same
  settings but epsilon) with the closest overall test AUC
  (`auc_report.compare_matched_auc`, paired intervals), and against the
  checkpoint of closest accuracy, whose error-rate and calibration gaps are
  compared too (`rates_report.compare_matched_rates`, paired intervals).
- `rates.csv`: per run, per-group top-1 error and ECE (multi-label: error,
  TPR, FPR and ECE at the threshold `evaluation_lib.THRESHOLD`), and per
  attribute the equal-opportunity and equalized-odds differences and the
  ECE gap.
- The PAIR explorable's figures where the sweep's axes allow
  (`explorable_lib`): per-example privacy sensitivity with image grids and
  an embedding projection, per-class accuracy against epsilon, and the
  subgroup heatmap with links to per-run tables.

The figure is accuracy for multi-class data and (mean) AUC for multi-label
data; see `evaluation_lib` for how AUC is computed per group. Every section
names the split its figures come from.

It is about 590 lines because it holds one short function per table and
figure listed above, all reading the one table `load_sweep` returns; the
explorable's figures already live apart (`explorable_lib`).
"""

import glob
import json
import math
import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import auc_report
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import rates_report
from tf_dpfair.fairness import report
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import explorable_lib
from tf_dpfair.experiments import mechanisms_lib
from tf_dpfair.experiments import sweep_lib
from tf_dpfair.experiments import verdicts_lib
from tf_dpfair.data.groups import GroupSpec

_NOT_FACETS = ("epsilon", "non_private", "noise_multiplier", "seed")
_TEST = "Split: test."


def load_sweep(sweep_dir):
    """Reads a sweep's results and the grid settings that vary across its runs.

    Args:
        sweep_dir: folder written by `sweep_lib.run_sweep`.

    Returns:
        `(table, keys)`: the results table (`sweep_lib.collect_results`) and
        the grid settings whose values differ between runs, in grid order.

    Raises:
        FileNotFoundError: no finished run in `sweep_dir`.
    """
    table = sweep_lib.collect_results(sweep_dir)
    if table.empty:
        raise FileNotFoundError(f"No finished run (result.json) under {sweep_dir}.")
    keys = []
    path = os.path.join(sweep_dir, sweep_lib.SWEEP_FILE)
    if os.path.exists(path):
        with open(path) as f:
            keys = json.load(f).get("axes", [])
    # A setting omitted where it is at its default (NaN) is a value of its own.
    keys = [k for k in keys if f"settings.{k}" in table
            and table[f"settings.{k}"].map(str).nunique(dropna=False) > 1]
    return table, keys


def _metric(table):
    multi_label = bool(table["data.multi_label"].iloc[0])
    return "auc" if multi_label else "accuracy"


def _groups(table):
    """[(attribute, group)] present in the results, in column order."""
    found = []
    for column in table.columns:
        parts = column.split(".")
        if len(parts) == 6 and parts[:3] == ["metrics", "raw", "groups"] and parts[5] == "count":
            found.append((parts[3], parts[4]))
    return found


def _epsilon_label(value):
    return "inf" if math.isinf(value) else f"{value:.2g}"


def summary_table(table, keys, variant):
    """One row per run: settings, epsilon, overall, per-group, worst, gap.

    Args:
        table: results table.
        keys: grid settings to show.
        variant: "ema" (EMA weights where the run kept them, else raw) or
            "raw".

    Returns:
        A DataFrame sorted by the facet settings and epsilon.
    """
    metric = _metric(table)
    facets = [k for k in keys if k not in _NOT_FACETS]
    rows = []
    for _, r in table.iterrows():
        use = variant if variant == "raw" or not pd.isna(r.get(f"metrics.ema.{metric}")) \
            else "raw"
        row = {k: r[f"settings.{k}"] for k in facets}
        row.update(epsilon=_epsilon_label(r["epsilon"]), weights=use,
                   **{metric: r[f"metrics.{use}.{metric}"]})
        for attribute, group in _groups(table):
            row[f"{metric} {group}"] = r.get(f"metrics.{use}.groups.{attribute}.{group}.{metric}")
        for attribute in dict.fromkeys(a for a, _ in _groups(table)):
            row[f"gap {attribute}"] = r.get(f"metrics.{use}.gap.{attribute}.{metric}")
        row["_epsilon"] = r["epsilon"]
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values(facets + ["_epsilon"], kind="stable")
    return frame.drop(columns="_epsilon").reset_index(drop=True)


def groups_table(table, keys):
    """Per-group figures with intervals, EMA weights where kept, one row per run and group."""
    metric = _metric(table)
    facets = [k for k in keys if k not in _NOT_FACETS]
    rows = []
    for _, r in table.iterrows():
        use = "ema" if not pd.isna(r.get(f"metrics.ema.{metric}")) else "raw"
        for attribute, group in _groups(table):
            prefix = f"metrics.{use}.groups.{attribute}.{group}."
            row = {k: r[f"settings.{k}"] for k in facets}
            row.update(epsilon=_epsilon_label(r["epsilon"]), weights=use,
                       attribute=attribute, group=group, count=r[prefix + "count"])
            for name in ("accuracy", "auc"):
                if prefix + name in r:
                    for suffix in ("", "_low", "_high"):
                        row[name + suffix] = r[prefix + name + suffix]
            rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["count"] = frame["count"].astype("Int64")
    return frame


def _rate_summary(sweep_dir, row, use):
    """A run's `evaluation_lib.summarize_rates`, from result.json or its predictions.

    Sweeps run before error rates were reported lack them in result.json;
    they are then worked out from the saved test scores (no intervals).
    """
    if f"metrics.{use}.rates.decision" in row and not pd.isna(row[f"metrics.{use}.rates.decision"]):
        with open(os.path.join(sweep_dir, row["run"], "result.json")) as f:
            return json.load(f)["metrics"][use]["rates"]
    saved = np.load(os.path.join(sweep_dir, row["run"], "predictions.npz"))
    attributes = [c.split(".")[-1] for c in row.index
                  if c.startswith("data.groups.") and isinstance(row[c], list)]
    spec = GroupSpec({a: row[f"data.groups.{a}"] for a in attributes})
    multi_label = bool(row["data.multi_label"])
    num = saved[f"scores_{use}"].shape[1]
    rates = evaluation_lib.rate_evaluation(
        _predictions(saved[f"scores_{use}"], saved, attributes), spec,
        [str(j) for j in range(num)], multi_label, n_bootstrap=0)
    return evaluation_lib.summarize_rates(rates)


def rates_table(table, keys, sweep_dir):
    """Per run (EMA weights where kept): per-group error and ECE, and the gaps.

    Args:
        table, keys: from `load_sweep`.
        sweep_dir: the sweep folder.

    Returns:
        A DataFrame sorted as `summary_table`: per group `error <group>`,
        `ECE <group>` (and `TPR`, `FPR` for multi-label data), per attribute
        `EO diff <attribute>`, `EOdds diff <attribute>`, `ECE gap <attribute>`.
    """
    metric = _metric(table)
    facets = [k for k in keys if k not in _NOT_FACETS]
    rows = []
    for _, r in table.iterrows():
        use = "ema" if not pd.isna(r.get(f"metrics.ema.{metric}")) else "raw"
        summary = _rate_summary(sweep_dir, r, use)
        row = {k: r[f"settings.{k}"] for k in facets}
        row.update(epsilon=_epsilon_label(r["epsilon"]), weights=use)
        for attribute, groups in summary["groups"].items():
            for group, figures in groups.items():
                names = ("error", "ece") if metric == "accuracy" else ("error", "tpr", "fpr",
                                                                        "ece")
                for name in names:
                    row[f"{name.upper() if name != 'error' else 'error'} {group}"] = \
                        figures.get(name)
        for attribute, figures in summary["disparities"].items():
            row[f"EO diff {attribute}"] = figures.get("equal_opportunity_difference")
            row[f"EOdds diff {attribute}"] = figures.get("equalized_odds_difference")
            row[f"ECE gap {attribute}"] = figures.get("ece_gap")
        row["_epsilon"] = r["epsilon"]
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values(facets + ["_epsilon"], kind="stable")
    return frame.drop(columns="_epsilon").reset_index(drop=True)


DIAGNOSTIC_FIGURES = ("example_share", "clip_fraction", "grad_norm_p50", "loss",
                      "clipped_sum_share", "update_cosine")


def diagnostics_table(table, keys):
    """Per run and group: the last epoch's training diagnostics (outside the guarantee).

    Args:
        table: the results table.
        keys: the grid settings that vary.

    Returns:
        A `pandas.DataFrame` (empty when no run kept diagnostics).
    """
    prefix = "training.diagnostics."
    columns = [c for c in table.columns if c.startswith(prefix)]
    rows = []
    for _, run in table.iterrows():
        found = {}
        for column in columns:
            attribute, group, figure = column[len(prefix):].rsplit(".", 2)
            value = run[column]
            if figure in DIAGNOSTIC_FIGURES and pd.notna(value):
                found.setdefault((attribute, group), {})[figure] = float(value)
        measured = [f for f in DIAGNOSTIC_FIGURES
                    if any(f in figures for figures in found.values())]
        for (attribute, group), figures in found.items():
            rows.append({**{k: run[f"settings.{k}"] for k in keys},
                         "epsilon": _epsilon_label(run["epsilon"]),
                         "attribute": attribute, "group": group,
                         **{f: figures.get(f, np.nan) for f in measured}})
    return pd.DataFrame(rows)


def _checkpoint_points(run_dir, metric, attribute):
    """(overall, gap) of each saved checkpoint of a run, from its test scores."""
    labels = np.load(os.path.join(run_dir, "checkpoints", "labels.npz"))
    points = []
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.npz"))):
        scores = np.load(path)["scores"]
        points.append(_overall_and_gap(scores, labels, metric, attribute))
    return points


def _overall_and_gap(scores, labels, metric, attribute):
    truth, ids = labels["labels"], labels["group_" + attribute]
    if metric == "accuracy":
        correct = scores.argmax(1) == truth
        per_group = [correct[ids == g].mean() for g in np.unique(ids)]
        return float(correct.mean()), float(max(per_group) - min(per_group))
    predictions = {"scores": scores, "labels": truth, "groups": {attribute: ids},
                   "label_mask": _label_mask(labels)}
    names = GroupSpec({attribute: [str(g) for g in range(ids.max() + 1)]})
    evaluation = evaluation_lib.auc_evaluation(predictions, names,
                                               [str(j) for j in range(scores.shape[1])],
                                               True, n_bootstrap=0)
    gap = evaluation.disparities.set_index("label").loc[evaluation.summary_label, "gap"]
    return evaluation.overall_auc, float(gap)


def _figure(panels, width=4.2):
    figure = Figure(figsize=(width * panels, 3.6))
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_metric_vs_epsilon(table, keys, path):
    """Overall and per-group figure (EMA weights where kept) against epsilon."""
    summary = summary_table(table, keys, "ema")
    metric = _metric(table)
    facets = [k for k in keys if k not in _NOT_FACETS]
    columns = [metric] + [f"{metric} {g}" for _, g in _groups(table)]
    finite = [float(e) for e in summary["epsilon"] if e != "inf"] or [1.0]
    inf_x = max(finite) * 4
    figure, axes = _figure(len(columns))
    lines = summary.groupby(facets, sort=False) if facets else [((), summary)]
    for combo, rows in lines:
        combo = combo if isinstance(combo, tuple) else (combo,)
        label = ", ".join(f"{k}={v}" for k, v in zip(facets, combo)) or "runs"
        x = [inf_x if e == "inf" else float(e) for e in rows["epsilon"]]
        for ax, column in zip(axes, columns):
            ax.plot(x, rows[column].astype(float), "o-", label=label)
    for ax, column in zip(axes, columns):
        ax.set_xscale("log")
        ticks = sorted(set(finite)) + [inf_x]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["non-\nprivate"])
        ax.set_xlabel("epsilon")
        ax.set_title(column if column != metric else f"{metric} (all test examples)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    figure.set_figheight(3.6 + 0.2 * rows)
    figure.tight_layout(rect=(0, 0.05 + 0.2 * rows / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=90)


def plot_disparity(table, keys, sweep_dir, path):
    """Gap against overall figure: private runs, and non-private checkpoints."""
    metric = _metric(table)
    attributes = list(dict.fromkeys(a for a, _ in _groups(table)))
    if not attributes:
        return False
    figure, axes = _figure(len(attributes), width=5.0)
    for ax, attribute in zip(axes, attributes):
        for _, r in table.iterrows():
            run_dir = os.path.join(sweep_dir, r["run"])
            if not r["privacy.private"]:
                points = np.array(_checkpoint_points(run_dir, metric, attribute))
                if len(points):
                    ax.plot(points[:, 0], points[:, 1], ".-", color="grey", alpha=0.5,
                            linewidth=0.8)
                continue
            for use, marker in (("raw", "s"), ("ema", "o")):
                x = r.get(f"metrics.{use}.{metric}")
                if not pd.isna(x):
                    ax.scatter(x, r[f"metrics.{use}.gap.{attribute}.{metric}"], marker=marker,
                               c=[np.log(r["epsilon"])], cmap="viridis", vmin=np.log(0.5),
                               vmax=np.log(8), edgecolors="k", linewidths=0.4)
        ax.set_xlabel(f"overall test {metric}")
        ax.set_ylabel(f"{metric} gap across {attribute} (max - min)")
        ax.set_title("grey: non-private checkpoints; o EMA, s raw\n"
                     "colour: epsilon (dark = small)", fontsize=9)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return True


def _counterpart(table, row, keys):
    """The non-private run with the same settings as `row` but epsilon."""
    same = ~table["privacy.private"].astype(bool)
    for key in [k for k in keys if k not in _NOT_FACETS] + ["seed"]:
        column = f"settings.{key}"
        if column in table:
            same &= table[column].astype(str) == str(row[column])
    matches = table[same]
    return None if matches.empty else matches.iloc[0]


def _label_mask(labels_file):
    """The saved label mask (0 = label unknown), or None if all are known."""
    return labels_file["label_mask"] if "label_mask" in labels_file else None


def _predictions(scores, labels_file, attribute_names):
    groups = {a: labels_file["group_" + a] for a in attribute_names}
    return {"scores": scores.astype(np.float64), "labels": labels_file["labels"],
            "groups": groups, "label_mask": _label_mask(labels_file)}


def matched_comparisons(table, keys, sweep_dir, out_dir, n_bootstrap=200):
    """Each private model against its non-private counterpart's checkpoints.

    Matched on overall AUC with `auc_report.compare_matched_auc` (paired bootstrap
    intervals of the gap difference; a report per comparison in
    `out_dir/matched/`), and, for multi-class data, on overall accuracy.

    Args:
        table, keys: from `load_sweep`.
        sweep_dir: the sweep folder (runs' predictions and checkpoints).
        out_dir: report folder.
        n_bootstrap: bootstrap replicates.

    Returns:
        A DataFrame, one row per private run, weights (raw/EMA) and attribute.
    """
    metric = _metric(table)
    multi_label = metric == "auc"
    facets = [k for k in keys if k not in _NOT_FACETS]
    rows = []
    for _, r in table[table["privacy.private"].astype(bool)].iterrows():
        other = _counterpart(table, r, keys)
        if other is None:
            continue
        attributes = [c.split(".")[-1] for c in table.columns
                      if c.startswith("data.groups.") and isinstance(r[c], list)]
        spec = GroupSpec({a: r[f"data.groups.{a}"] for a in attributes})
        checkpoint_dir = os.path.join(sweep_dir, other["run"], "checkpoints")
        labels = np.load(os.path.join(checkpoint_dir, "labels.npz"))
        checkpoints = {os.path.basename(p)[:-4]: np.load(p)["scores"].astype(np.float64)
                       for p in sorted(glob.glob(os.path.join(checkpoint_dir, "epoch_*.npz")))}
        final = np.load(os.path.join(sweep_dir, r["run"], "predictions.npz"))
        num_classes = next(iter(checkpoints.values())).shape[1]
        names = [str(j) for j in range(num_classes)]
        truth = labels["labels"] if multi_label else np.eye(num_classes)[labels["labels"]]
        groups = {a: labels["group_" + a] for a in attributes}
        for use in ("raw", "ema"):
            if f"scores_{use}" not in final:
                continue
            private, private_rates = evaluation_lib.evaluate_both(
                _predictions(final[f"scores_{use}"], labels, attributes), spec, names,
                multi_label, n_bootstrap=n_bootstrap)
            comparison = auc_report.compare_matched_auc(
                private, checkpoints, labels=truth, groups=groups, label_names=names,
                group_names={a: list(spec.names(a)) for a in attributes},
                n_bootstrap=n_bootstrap, seed=0, split="test",
                label_mask=_label_mask(labels))
            rates = rates_report.compare_matched_rates(
                private_rates, checkpoints, labels=labels["labels"], groups=groups,
                label_names=names, group_names={a: list(spec.names(a)) for a in attributes},
                n_bootstrap=n_bootstrap, seed=0, split="test",
                **evaluation_lib.rate_kwargs(multi_label, _label_mask(labels)))
            report.write_report(
                os.path.join(out_dir, "matched", f"{r['run']}_{use}"), auc=comparison,
                rates=rates,
                title=f"{r['run']} ({use} weights) vs non-private at matched AUC; error "
                      "rates at matched accuracy")
            for d in comparison.disparities[
                    comparison.disparities["label"] == private.summary_label].itertuples():
                row = {k: r[f"settings.{k}"] for k in facets}
                row.update(epsilon=_epsilon_label(r["epsilon"]), weights=use,
                           attribute=d.attribute, private_auc=private.overall_auc,
                           matched_checkpoint=comparison.checkpoint,
                           non_private_auc=comparison.non_private.overall_auc,
                           private_auc_gap=d.private_gap, non_private_auc_gap=d.non_private_gap,
                           gap_difference=d.gap_difference,
                           gap_difference_low=d.gap_difference_low,
                           gap_difference_high=d.gap_difference_high)
                if not multi_label:
                    row.update(_accuracy_matched(final[f"scores_{use}"], checkpoints,
                                                 labels, d.attribute))
                row.update(_rate_gaps(rates, d.attribute))
                rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = {"raw": 0, "ema": 1}
    return frame.sort_values(facets + ["epsilon", "attribute", "weights"],
                             key=lambda c: c.map(order) if c.name == "weights" else c,
                             kind="stable").reset_index(drop=True)


def _rate_gaps(comparison, attribute):
    """Equalized-odds and ECE-gap differences at matched accuracy, for the table."""
    private = comparison.private
    table = comparison.disparities.set_index(["attribute", "label"])
    calibrated = error_rates.TOP1_LABEL if private.multi_class else private.summary_label
    odds = table.loc[(attribute, private.summary_label)]
    ece = table.loc[(attribute, calibrated)]
    return {"rates_matched_checkpoint": comparison.checkpoint,
            "private_eodds": odds["private_equalized_odds_difference"],
            "non_private_eodds": odds["non_private_equalized_odds_difference"],
            "eodds_difference": odds["delta_equalized_odds_difference"],
            "eodds_difference_low": odds["delta_equalized_odds_difference_low"],
            "eodds_difference_high": odds["delta_equalized_odds_difference_high"],
            "ece_gap_difference": ece["delta_ece_gap"],
            "ece_gap_difference_low": ece["delta_ece_gap_low"],
            "ece_gap_difference_high": ece["delta_ece_gap_high"]}


def _accuracy_matched(private_scores, checkpoints, labels, attribute):
    """Private accuracy gap vs the gap of the checkpoint of closest accuracy."""
    accuracy, gap = _overall_and_gap(private_scores, labels, "accuracy", attribute)
    points = {name: _overall_and_gap(s, labels, "accuracy", attribute)
              for name, s in checkpoints.items()}
    name = min(points, key=lambda n: abs(points[n][0] - accuracy))
    return {"private_accuracy": accuracy, "acc_matched_checkpoint": name,
            "non_private_accuracy": points[name][0], "private_accuracy_gap": gap,
            "non_private_accuracy_gap": points[name][1]}


def _write_matched(table, keys, sweep_dir, out_dir, n_bootstrap):
    """matched.csv/.md (`matched_comparisons`): `(paths, lines of report.md)`."""
    matched = matched_comparisons(table, keys, sweep_dir, out_dir, n_bootstrap)
    if matched.empty:
        return {}, []
    paths = {"matched": os.path.join(out_dir, "matched.csv"),
             "matched_md": os.path.join(out_dir, "matched.md")}
    matched.to_csv(paths["matched"], index=False)
    closest = "" if _metric(table) == "auc" else ", and with the closest accuracy"
    section = [
        "## Private vs non-private at matched performance (nearest checkpoint)", "",
        _TEST + " Descriptive: each private model is matched with the non-private "
        "checkpoint nearest by test AUC (and accuracy), picked on the test split, one "
        "checkpoint per run; the verdict table's comparison, interpolated on the "
        "checkpoint curve, is the one to read (`verdicts.md`).", "",
        "Each private model against the checkpoint of its non-private counterpart "
        "with the closest overall AUC (gap difference = private - non-private, "
        f"paired 95% interval){closest}; at the checkpoint of closest accuracy, the "
        "differences of the equalized-odds difference (eodds) and of the ECE gap, "
        "paired 95% intervals. Each comparison's full report is in `matched/`.", "",
        report.to_markdown(matched)]
    with open(paths["matched_md"], "w") as f:
        f.write("\n".join(["# " + section[0][3:]] + section[1:]))
    return paths, section


def write_sweep_report(sweep_dir, out_dir=None, n_bootstrap=200, explorable=None,
                       verdicts=None):
    """Writes the sweep's tables and figures (see the module docstring).

    Args:
        sweep_dir: folder written by `sweep_lib.run_sweep`.
        out_dir: output folder (default `sweep_dir/report`).
        n_bootstrap: bootstrap replicates of the matched comparisons.
        explorable: keyword arguments of `explorable_lib.write_explorable`
            (`facets`, `projection`, `count`).
        verdicts: `verdicts_lib.VerdictOptions` of the verdict table (default:
            its defaults).

    Returns:
        dict name -> path of what was written ("report" is report.md).

    Raises:
        FileNotFoundError: the sweep has no finished run.
    """
    out_dir = out_dir or os.path.join(sweep_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    table, keys = load_sweep(sweep_dir)
    metric = _metric(table)
    paths = {}
    lines = [f"# Sweep report: {os.path.abspath(sweep_dir)}", "",
             f"{len(table)} finished runs. Figure: test {metric} "
             f"({'mean AUC over labels' if metric == 'auc' else 'top-1'}). Epsilon as "
             "accounted; inf = non-private. Each section names the split its figures come "
             "from (test, validation or training diagnostics).", ""]
    for variant, title in (("ema", "EMA weights (where kept; raw otherwise)"),
                           ("raw", "raw weights")):
        frame = summary_table(table, keys, variant)
        paths[f"summary_{variant}"] = os.path.join(out_dir, f"summary_{variant}.csv")
        frame.to_csv(paths[f"summary_{variant}"], index=False)
        lines += [f"## Summary, {title}", "", _TEST, "", report.to_markdown(frame)]
    paths["metric_vs_epsilon"] = os.path.join(out_dir, "metric_vs_epsilon.png")
    plot_metric_vs_epsilon(table, keys, paths["metric_vs_epsilon"])
    lines += [f"## {metric} against epsilon", "", _TEST, "", "![](metric_vs_epsilon.png)",
              ""]
    disparity_path = os.path.join(out_dir, "disparity_vs_overall.png")
    if plot_disparity(table, keys, sweep_dir, disparity_path):
        paths["disparity_vs_overall"] = disparity_path
        lines += ["## Disparity against overall performance", "", _TEST, "",
                  "![](disparity_vs_overall.png)", ""]
    verdict_paths, verdict_lines = verdicts_lib.write_verdicts(sweep_dir, table, keys,
                                                               out_dir, verdicts)
    paths.update(verdict_paths)
    lines += verdict_lines
    mechanism_paths, mechanism_lines = mechanisms_lib.write_mechanism_verdicts(
        sweep_dir, table, keys, out_dir, verdicts)
    paths.update(mechanism_paths)
    lines += mechanism_lines
    matched_paths, matched_lines = _write_matched(table, keys, sweep_dir, out_dir, n_bootstrap)
    paths.update(matched_paths)
    lines += matched_lines
    rates = rates_table(table, keys, sweep_dir)
    paths["rates"] = os.path.join(out_dir, "rates.csv")
    rates.to_csv(paths["rates"], index=False)
    decision = ("top-1 class" if metric == "accuracy"
                else f"score >= {evaluation_lib.THRESHOLD:g} (given)")
    lines += ["## Error rates and calibration", "", _TEST, "",
              f"Decision: {decision}; ECE over 10 equal-width bins of [0, 1]"
              + (" of the top-1 confidence; EO diff and EOdds diff: means over classes "
                 "(one-vs-rest) of the max - min TPR and of max(TPR, FPR differences)"
                 if metric == "accuracy" else "; means over labels") + ".", "",
              report.to_markdown(rates)]
    explorable_paths, explorable_lines = explorable_lib.write_explorable(
        sweep_dir, table, keys, out_dir, **(explorable or {}))
    paths.update(explorable_paths)
    lines += explorable_lines
    diagnostics = diagnostics_table(table, keys)
    if not diagnostics.empty:
        paths["diagnostics"] = os.path.join(out_dir, "diagnostics.csv")
        diagnostics.to_csv(paths["diagnostics"], index=False)
        lines += ["## Training diagnostics (training data, outside the DP guarantee)", "",
                  "Split: training diagnostics (training batches). Last epoch of each "
                  "private run with group diagnostics: each group's "
                  "share of the training examples, the fraction of its examples whose "
                  "gradient was clipped, their median pre-clip gradient norm and mean "
                  "loss (and, where measured, its share of the clipped sum and the "
                  "cosine of the update with its gradient). For the person training "
                  "the model, never for release.", "", report.to_markdown(diagnostics)]
    groups = groups_table(table, keys)
    if not groups.empty:
        paths["groups"] = os.path.join(out_dir, "groups.csv")
        groups.to_csv(paths["groups"], index=False)
        lines += ["## Per-group figures (95% bootstrap intervals)", "", _TEST, "",
                  report.to_markdown(groups)]
    paths["report"] = os.path.join(out_dir, "report.md")
    with open(paths["report"], "w") as f:
        f.write("\n".join(lines))
    return paths
