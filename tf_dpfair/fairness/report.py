"""The fairness report of one model or comparison: report.md, its tables and figures.

`write_report` is the one writer of report.md. It takes any of the
sections a run reports and writes them in this order, each with its CSV
tables and PNG figures beside it:

1. AUC (`auc.GroupEvaluation` or `auc_report.MatchedComparison`): title,
   overall or checkpoint table, disparities, one figure and table per
   attribute (files `groups.csv`, `disparities.csv`, `overall.csv` or
   `candidates.csv`, `auc_<attribute>.png`);
2. error rates and calibration (`rates.RateEvaluation` or
   `rates_report.RateComparison`, files `rates_*.csv`,
   `rates_<attribute>_<label>.png`);
3. top-1 accuracy (a pair of tables, files `accuracy_groups.csv` and
   `accuracy_disparities.csv`).

The Markdown shows the summary label (the mean over labels for a
multi-label model); the CSV files hold every label. A report of training
data says at the top that it is outside the DP guarantee.
`write_auc_report` and `write_rates_report` are the former entry points of
the two families (`auc_report.write_report`, `rates_report.write_report`).
"""

import math
import os
import re

import numpy as np
import pandas as pd

from tf_dpfair.fairness import auc_report
from tf_dpfair.fairness import engine
from tf_dpfair.fairness import rates_report

_SHOWN_IN_COMPARISON = ("equal_opportunity_difference", "equalized_odds_difference",
                        "error_gap", "ece_gap")
_DROP = ["split", "outside_dp_guarantee"]


def _cell(value, digits):
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def _merge_intervals(frame, digits):
    """Replaces columns X, X_low, X_high by one column "X [low, high]"."""
    frame = frame.copy()
    for column in list(frame.columns):
        low, high = column + "_low", column + "_high"
        if low in frame.columns and high in frame.columns:
            frame[column] = [
                f"{_cell(v, digits)} [{_cell(lo, digits)}, {_cell(hi, digits)}]"
                for v, lo, hi in zip(frame[column], frame[low], frame[high])]
            frame = frame.drop(columns=[low, high])
    return frame


def to_markdown(frame, digits=3, merge_intervals=True):
    """Formats a DataFrame as a GitHub Markdown table.

    Args:
        frame: the table.
        digits: decimals shown for floats; NaN prints as "NaN", missing
            counts as empty cells.
        merge_intervals: show columns X, X_low, X_high as one column
            "X [low, high]".

    Returns:
        The table as a string, numeric columns right-aligned.
    """
    if merge_intervals:
        frame = _merge_intervals(frame, digits)
    columns = [str(c) for c in frame.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(frame[c])
             and not pd.api.types.is_bool_dtype(frame[c]) else "---" for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, digits) for v in row) + " |")
    return "\n".join(lines) + "\n"


def file_name(name):
    """`name` (an attribute or label) as a safe part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _confidence_text(evaluation):
    return f"{100 * evaluation.confidence:g}%"


def auc_markdown(result, directory, *, title, private_name, digits):
    """The AUC sections of report.md, drawing each attribute's figure.

    Args:
        result: an `auc.GroupEvaluation` or `auc_report.MatchedComparison`.
        directory: where the figures `auc_<attribute>.png` go.
        title: first heading of the report.
        private_name: name of the (private) model in the figures.
        digits: decimals in the Markdown tables.

    Returns:
        `(text, paths)`: the Markdown and dict `figure/<attribute>` -> path.
    """
    evaluation = auc_report._evaluation(result)
    lines = [f"# {title}", "", f"Data split: **{evaluation.split}**. Intervals: "
             f"{_confidence_text(evaluation)} bootstrap percentile intervals, resampled "
             "within each group.", ""]
    if evaluation.outside_dp_guarantee:
        lines += [f"**Warning: {engine.OUTSIDE_DP_NOTE}**", ""]
    if isinstance(result, auc_report.MatchedComparison):
        lines += [f"Private model (overall AUC {result.private.overall_auc:.{digits}f}) vs "
                  f"the non-private checkpoint of closest overall AUC, "
                  f"**{result.checkpoint}** ({result.non_private.overall_auc:.{digits}f}).",
                  "Differences are private minus non-private"
                  + (" with paired intervals." if result.paired else
                     "; no paired intervals (different resamples)."), "",
                  "## Checkpoints", "", to_markdown(result.candidates, digits)]
    else:
        lines += ["## Overall", "", to_markdown(result.overall, digits)]
    summary = evaluation.summary_label
    disparities = result.disparities[result.disparities["label"] == summary]
    lines += ["## Disparities", "", to_markdown(disparities.drop(columns=_DROP), digits)]
    groups = result.groups[result.groups["label"] == summary].drop(columns=_DROP)
    paths = {}
    for attribute in dict.fromkeys(groups["attribute"]):
        figure = auc_report.plot_auc_attribute(result, attribute, private_name=private_name)
        name = f"auc_{file_name(attribute)}.png"
        figure.savefig(os.path.join(directory, name), dpi=120)
        paths[f"figure/{attribute}"] = os.path.join(directory, name)
        lines += [f"## {attribute}", "", f"![AUC by {attribute}]({name})", "",
                  to_markdown(groups[groups["attribute"] == attribute], digits)]
    return "\n".join(lines), paths


def _rates_figures(result, directory, private_name):
    """Draws the error-rate figures; returns (paths, dict attribute -> file names)."""
    evaluation = rates_report._evaluation(result)
    paths, figures = {}, {}
    for attribute in dict.fromkeys(evaluation.groups["attribute"]):
        for label in rates_report.shown_labels(evaluation):
            figure = rates_report.plot_rates_attribute(result, attribute, label=label,
                                                       private_name=private_name)
            name = f"rates_{file_name(attribute)}_{file_name(label)}.png"
            figure.savefig(os.path.join(directory, name), dpi=110)
            paths[f"rates_figure/{attribute}/{label}"] = os.path.join(directory, name)
            figures.setdefault(attribute, []).append(name)
    return paths, figures


def accuracy_markdown(accuracy):
    """The top-1 accuracy section: `(groups, disparities)` tables as Markdown."""
    groups, disparities = accuracy
    return ("## Accuracy (top-1)\n\n" + to_markdown(groups) + "\n"
            + to_markdown(disparities))


def write_report(directory, *, auc=None, rates=None, accuracy=None, title="Fairness report",
                 private_name="private", digits=3):
    """Writes report.md with its CSV tables and PNG figures (see the module docstring).

    Args:
        directory: output directory (created if missing).
        auc: an `auc.GroupEvaluation` or `auc_report.MatchedComparison`, or
            None.
        rates: a `rates.RateEvaluation` or `rates_report.RateComparison` of
            the same model(s), or None.
        accuracy: `(groups, disparities)` DataFrames of top-1 accuracy (see
            `tf_dpfair.experiments.evaluation_lib.accuracy_table`), or None.
        title: first heading of the report.
        private_name: name of the (private) model in the figures.
        digits: decimals in the Markdown tables (not of the accuracy tables).

    Returns:
        dict name -> path: the AUC tables (`groups`, `disparities`,
        `overall` or `candidates`) and `figure/<attribute>`; `report`
        (report.md); the error-rate tables `rates_<table>` and
        `rates_figure/<attribute>/<label>`; `accuracy_groups` and
        `accuracy_disparities`.

    Raises:
        ValueError: neither `auc` nor `rates` given.
    """
    if auc is None and rates is None:
        raise ValueError("A report needs an AUC or an error-rate evaluation.")
    report = os.path.join(directory, "report.md")
    paths, parts = {}, []
    if auc is not None:
        paths.update(auc_report.write_tables(auc, directory))
        text, figures = auc_markdown(auc, directory, title=title, private_name=private_name,
                                     digits=digits)
        paths.update(figures)
        paths["report"] = report
        parts.append(text)
    if rates is not None:
        os.makedirs(directory, exist_ok=True)
        tables = rates_report.write_tables(rates, directory)
        paths.update({f"rates_{k}": v for k, v in tables.items()})
        figure_paths, figures = _rates_figures(rates, directory, private_name)
        paths.update(figure_paths)
        paths.setdefault("report", report)
        text = rates_markdown(rates, figures=figures, digits=digits)
        if auc is None:
            split = rates_report._evaluation(rates).split
            text = f"# {title}\n\nData split: **{split}**.\n\n" + text
        parts.append(text)
    if accuracy is not None:
        for name, frame in zip(("accuracy_groups", "accuracy_disparities"), accuracy):
            paths[name] = os.path.join(directory, f"{name}.csv")
            frame.to_csv(paths[name], index=False)
        parts.append(accuracy_markdown(accuracy))
    with open(report, "w") as f:
        f.write("\n\n".join(parts))
    return paths


def write_auc_report(result, directory, *, title="Fairness report", private_name="private",
                     digits=3):
    """Writes the AUC report of `result` (`write_report` with `auc=result`).

    Args:
        result: an `auc.GroupEvaluation` or `auc_report.MatchedComparison`.
        directory, title, private_name, digits: as in `write_report`.

    Returns:
        dict name -> path: the CSV tables, `report` and `figure/<attribute>`.
    """
    return write_report(directory, auc=result, title=title, private_name=private_name,
                        digits=digits)


def write_rates_report(result, directory, *, auc=None, title="Fairness report",
                       private_name="private", digits=3):
    """Writes the error-rate report of `result`, after the AUC sections of `auc`.

    Args:
        result: a `rates.RateEvaluation` or `rates_report.RateComparison`.
        directory, title, private_name, digits: as in `write_report`.
        auc: optional AUC evaluation or comparison of the same model(s),
            whose sections come first.

    Returns:
        dict name -> path, as `write_report`.
    """
    return write_report(directory, auc=auc, rates=result, title=title,
                        private_name=private_name, digits=digits)


def rates_markdown(result, *, heading="##", digits=3, figures=None):
    """The Markdown sections of an evaluation or comparison.

    Args:
        result: a `RateEvaluation` or `RateComparison`.
        heading: Markdown heading level of the sections.
        digits: decimals.
        figures: optional dict attribute -> image file names to show.

    Returns:
        The text (the labels of `shown_labels` only; the CSVs hold all).
    """
    evaluation = rates_report._evaluation(result)
    drop = ["split", "outside_dp_guarantee"]
    lines = [f"{heading} Error rates and calibration", "",
             f"Decision: {evaluation.threshold_rule}. ECE over {evaluation.n_bins} "
             "equal-width bins of [0, 1]. Differences are max - min over the groups with "
             "status ok; intervals: "
             f"{100 * evaluation.confidence:g}% bootstrap percentile intervals, resampled "
             "within each group.", ""]
    if evaluation.outside_dp_guarantee:
        lines += [f"**Warning: {engine.OUTSIDE_DP_NOTE}**", ""]
    labels = rates_report.shown_labels(evaluation)
    if isinstance(result, rates_report.RateComparison):
        lines += [f"Matched on overall accuracy: private "
                  f"{result.private.overall_accuracy:.{digits}f}, non-private checkpoint "
                  f"**{result.checkpoint}** {result.non_private.overall_accuracy:.{digits}f}. "
                  "Differences are private - non-private"
                  + (", with paired intervals." if result.paired else
                     "; no paired intervals (different resamples)."), "",
                  to_markdown(result.candidates, digits)]
        # The CSV holds every difference; the Markdown table the main ones.
        columns = ["attribute", "label"] + [
            prefix + name + suffix for name in _SHOWN_IN_COMPARISON
            for prefix in ("private_", "non_private_", "delta_")
            for suffix in ("", "_low", "_high")]
    else:
        lines += [f"{heading}# Overall", "", to_markdown(
            result.overall[result.overall["label"].isin(labels)].drop(columns=drop), digits)]
        columns = [c for c in result.disparities.columns if c not in drop]
    disparities = result.disparities[result.disparities["label"].isin(labels)][columns]
    lines += [f"{heading}# Differences between groups", "",
              to_markdown(disparities, digits)]
    groups = result.groups[result.groups["label"].isin(labels)].drop(columns=drop)
    for attribute in dict.fromkeys(groups["attribute"]):
        lines += [f"{heading}# Error rates by {attribute}", ""]
        for name in (figures or {}).get(attribute, []):
            lines += [f"![Error rates by {attribute}]({name})", ""]
        lines.append(to_markdown(groups[groups["attribute"] == attribute], digits))
    return "\n".join(lines)
