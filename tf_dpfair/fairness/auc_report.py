"""Private vs non-private at matched accuracy, and reports of the tables.

`compare_matched` follows Berrada et al. (2023): a private model is compared
with the non-private checkpoint whose overall AUC is closest to its own, so
that a difference in disparity is not merely a difference in accuracy. The
side-by-side tables carry both models' per-group AUC and disparity with
their confidence intervals; when both evaluations drew the same bootstrap
resamples (same labels, groups, seed and number of replicates), the
differences get paired intervals too.

`write_report` writes the tables as CSV and Markdown and one PNG figure per
attribute (per-group AUC with interval bars, private vs non-private side by
side).
"""

import dataclasses
import math
import os
import re

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import auc as fairness

_KEYS = ["split", "outside_dp_guarantee", "attribute", "group", "label", "count"]
_DISPARITY_FIGURES = ["worst_group", "worst_auc", "worst_auc_low", "worst_auc_high", "gap",
                      "gap_low", "gap_high", "ratio", "ratio_low", "ratio_high"]


@dataclasses.dataclass(frozen=True, eq=False)
class MatchedComparison:
    """Result of `compare_matched`.

    Attributes:
        private: `GroupEvaluation` of the private model.
        non_private: `GroupEvaluation` of the matched non-private checkpoint.
        checkpoint: name of that checkpoint.
        candidates: DataFrame, one row per checkpoint: overall `auc`,
            `distance` to the private model's, `chosen`.
        groups: DataFrame, per (attribute, group, label): both models' AUC
            and interval, and `difference` = private - non-private.
        disparities: DataFrame, per (attribute, label): both models' worst
            group, gap and ratio with intervals, and `gap_difference` =
            private gap - non-private gap.
        paired: whether the difference intervals are paired bootstrap
            intervals (else they are NaN).
    """

    private: fairness.GroupEvaluation
    non_private: fairness.GroupEvaluation
    checkpoint: str
    candidates: pd.DataFrame
    groups: pd.DataFrame
    disparities: pd.DataFrame
    paired: bool

    @property
    def split(self):
        """Where the data came from."""
        return self.private.split

    @property
    def outside_dp_guarantee(self):
        """True when the figures come from training data."""
        return self.private.outside_dp_guarantee


def _evaluated(scores_or_evaluation, what, labels, groups, data, kwargs, **overrides):
    if isinstance(scores_or_evaluation, fairness.GroupEvaluation):
        return scores_or_evaluation
    if labels is None or groups is None:
        raise ValueError(f"{what} is given as scores: pass `labels` and `groups` too (or "
                         "a GroupEvaluation from fairness.evaluate).")
    return fairness.evaluate(labels, scores_or_evaluation, groups, data=data,
                             **{**kwargs, **overrides})


def _paired_intervals(private, non_private, keys, paired):
    """Intervals of private - non-private over paired replicates (or NaN)."""
    if not paired:
        return [math.nan] * len(keys), [math.nan] * len(keys)
    bounds = [fairness.percentile_interval(
        private.replicates[key] - non_private.replicates[key], private.confidence)
        for key in keys]
    return [low for low, _ in bounds], [high for _, high in bounds]


def compare_matched(private, checkpoints, *, labels=None, groups=None, data=None,
                    **evaluate_kwargs):
    """Compares a private model with the non-private checkpoint of closest AUC.

    Args:
        private: `GroupEvaluation` of the private model, or its scores (then
            `labels` and `groups` are needed).
        checkpoints: non-empty dict name -> `GroupEvaluation` or scores of
            non-private checkpoints; on equal distance the first one wins.
            Checkpoints given as scores are first evaluated without
            bootstrap; only the chosen one is evaluated in full.
        labels: as in `fairness.evaluate`, needed for scores.
        groups: as in `fairness.evaluate`, needed for scores.
        data: as in `fairness.evaluate`, optional.
        **evaluate_kwargs: passed to `fairness.evaluate` for scores (use the
            same `seed` and `n_bootstrap` for both models to get paired
            intervals of the differences).

    Returns:
        A `MatchedComparison`.

    Raises:
        ValueError: no checkpoints, scores without labels or groups, an
            undefined overall AUC, or evaluations that differ in data (split,
            groups, labels, counts), `min_group_size` or confidence level.
    """
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise ValueError("checkpoints must be a non-empty dict name -> GroupEvaluation "
                         "or scores.")
    context = (labels, groups, data, evaluate_kwargs)
    private = _evaluated(private, "The private model", *context)
    target = private.overall_auc
    if math.isnan(target):
        raise ValueError("The private model's overall AUC is undefined (NaN).")
    rows = []
    for name, candidate in checkpoints.items():
        quick = _evaluated(candidate, f"Checkpoint {name!r}", *context, n_bootstrap=0)
        rows.append({"checkpoint": str(name), "auc": quick.overall_auc,
                     "distance": abs(quick.overall_auc - target)})
    candidates = pd.DataFrame(rows)
    if candidates["distance"].isna().all():
        raise ValueError("No checkpoint has a defined overall AUC.")
    best = int(candidates["distance"].idxmin())
    candidates["chosen"] = candidates.index == best
    name = list(checkpoints)[best]
    non_private = _evaluated(checkpoints[name], f"Checkpoint {name!r}", *context)

    # Status differs only through min_group_size once the labels agree.
    data_columns = _KEYS + ["positives", "negatives", "status"]
    if (private.split != non_private.split
            or not private.groups[data_columns].equals(non_private.groups[data_columns])):
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated on "
                         "different data or settings (split, groups, labels, counts or "
                         "min_group_size differ); compare them on the same held-out set.")
    if private.confidence != non_private.confidence:
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated at "
                         f"different confidence levels ({private.confidence} and "
                         f"{non_private.confidence}).")
    # Same labels, groups, seed and replicate count: the same resamples.
    paired = private.resample_key == non_private.resample_key

    side = private.groups[_KEYS + ["status"]].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for column in ("auc", "auc_low", "auc_high"):
            side[prefix + column] = evaluation.groups[column].to_numpy()
    side["difference"] = side["private_auc"] - side["non_private_auc"]
    keys = [("group", a, g, lab) for a, g, lab in
            zip(side["attribute"], side["group"], side["label"])]
    side["difference_low"], side["difference_high"] = _paired_intervals(
        private, non_private, keys, paired)

    disparities = private.disparities[_KEYS[:3] + ["label"]].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for column in _DISPARITY_FIGURES:
            disparities[prefix + column] = evaluation.disparities[column].to_numpy()
    disparities["gap_difference"] = disparities["private_gap"] - disparities["non_private_gap"]
    keys = [("gap", a, lab) for a, lab in zip(disparities["attribute"], disparities["label"])]
    (disparities["gap_difference_low"],
     disparities["gap_difference_high"]) = _paired_intervals(private, non_private, keys, paired)
    return MatchedComparison(private=private, non_private=non_private, checkpoint=str(name),
                             candidates=candidates, groups=side, disparities=disparities,
                             paired=paired)


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


def _file_name(attribute):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", attribute)


def _summary_rows(frame, result):
    return frame[frame["label"] == _evaluation(result).summary_label]


def _evaluation(result):
    return result.private if isinstance(result, MatchedComparison) else result


def plot_attribute(result, attribute, *, label=None, private_name="private"):
    """Draws per-group AUC with interval bars for one attribute.

    Groups below the minimum size are drawn hollow; tick labels show counts;
    dashed lines mark each model's overall AUC.

    Args:
        result: a `fairness.GroupEvaluation` (one model) or a
            `MatchedComparison` (private and non-private side by side).
        attribute: attribute to draw (as in the `attribute` column).
        label: label to draw (default: the summary label).
        private_name: legend name of the (private) model.

    Returns:
        A `matplotlib.figure.Figure` on an Agg canvas (no pyplot state).

    Raises:
        ValueError: unknown attribute or label.
    """
    evaluation = _evaluation(result)
    label = evaluation.summary_label if label is None else label
    table = evaluation.groups
    if attribute not in set(table["attribute"]):
        raise ValueError(f"Unknown attribute {attribute!r}; attributes: "
                         f"{list(dict.fromkeys(table['attribute']))}.")
    if label not in set(table["label"]):
        raise ValueError(f"Unknown label {label!r}; labels: "
                         f"{list(dict.fromkeys(table['label']))}.")
    series = [(private_name, evaluation)]
    if isinstance(result, MatchedComparison):
        series.append((f"non-private ({result.checkpoint})", result.non_private))

    num_groups = int(((table["attribute"] == attribute) & (table["label"] == label)).sum())
    figure = Figure(figsize=(max(5.0, 1.1 * num_groups + 2.5), 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.35 if len(series) > 1 else 0.0
    colors = ["tab:blue", "tab:orange"]
    for k, (name, model) in enumerate(series):
        rows = model.groups[(model.groups["attribute"] == attribute)
                            & (model.groups["label"] == label)]
        x = np.arange(len(rows)) + (k - (len(series) - 1) / 2) * width
        auc = rows["auc"].to_numpy(float)
        # A percentile interval need not contain the point estimate (few
        # replicates, skewed resamples); bars then start at the estimate.
        errors = np.maximum(0.0, np.nan_to_num(np.vstack(
            [auc - rows["auc_low"].to_numpy(float),
             rows["auc_high"].to_numpy(float) - auc])))
        axes.errorbar(x, auc, yerr=errors, fmt="o", capsize=4, color=colors[k], label=name)
        small = (rows["status"] == "too_small").to_numpy()
        axes.plot(x[small], auc[small], "o", color=colors[k], markerfacecolor="white", zorder=3)
        overall = model.overall.set_index("label").loc[label, "auc"]
        axes.axhline(overall, color=colors[k], linestyle="--", linewidth=1)
    ticks = [f"{g}\nn={c}" for g, c in zip(rows["group"], rows["count"])]
    rotate = {"rotation": 30, "ha": "right", "rotation_mode": "anchor"} if len(rows) > 6 else {}
    axes.set_xticks(np.arange(len(rows)), ticks, **rotate)
    axes.set_xlim(-0.6, len(rows) - 0.4)
    axes.set_ylabel(f"AUC ({_confidence_text(evaluation)} interval)")
    shown = "mean over labels" if label == fairness.MEAN_LABEL else label
    title = f"AUC by {attribute} ({shown})"
    if evaluation.outside_dp_guarantee:
        title += "\n" + fairness.OUTSIDE_DP_NOTE
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    note = "dashed: overall AUC"
    if (table[table["attribute"] == attribute]["status"] == "too_small").any():
        note += "; hollow: too small"
    axes.legend(fontsize=8, title=note, title_fontsize=7)
    figure.tight_layout()
    return figure


def _confidence_text(evaluation):
    return f"{100 * evaluation.confidence:g}%"


def write_tables(result, directory):
    """Writes the tables of an evaluation or comparison as CSV files.

    Args:
        result: a `fairness.GroupEvaluation` or a `MatchedComparison`.
        directory: output directory (created if missing).

    Returns:
        dict table name -> path: `groups`, `disparities`, and `overall`
        (evaluation) or `candidates` (comparison).
    """
    os.makedirs(directory, exist_ok=True)
    names = ["groups", "disparities"]
    names.append("candidates" if isinstance(result, MatchedComparison) else "overall")
    paths = {}
    for name in names:
        paths[name] = os.path.join(directory, f"{name}.csv")
        getattr(result, name).to_csv(paths[name], index=False)
    return paths


def write_report(result, directory, *, title="Fairness report", private_name="private",
                 digits=3):
    """Writes CSV tables, a Markdown report and one PNG figure per attribute.

    The Markdown report shows the summary label (the mean over labels for a
    multi-label model); the CSV files hold every label. A report of
    training data says at the top that it is outside the DP guarantee.

    Args:
        result: a `fairness.GroupEvaluation` or a `MatchedComparison`.
        directory: output directory (created if missing).
        title: first heading of the report.
        private_name: name of the (private) model in the figures.
        digits: decimals in the Markdown tables.

    Returns:
        dict name -> path: the CSV tables, `report` (report.md) and
        `figure/<attribute>` (PNG files).
    """
    paths = write_tables(result, directory)
    evaluation = _evaluation(result)
    level = _confidence_text(evaluation)
    lines = [f"# {title}", "", f"Data split: **{evaluation.split}**. Intervals: {level} "
             "bootstrap percentile intervals, resampled within each group.", ""]
    if evaluation.outside_dp_guarantee:
        lines += [f"**Warning: {fairness.OUTSIDE_DP_NOTE}**", ""]
    if isinstance(result, MatchedComparison):
        lines += [f"Private model (overall AUC {result.private.overall_auc:.{digits}f}) vs "
                  f"the non-private checkpoint of closest overall AUC, "
                  f"**{result.checkpoint}** ({result.non_private.overall_auc:.{digits}f}).",
                  "Differences are private minus non-private"
                  + (" with paired intervals." if result.paired else
                     "; no paired intervals (different resamples)."), "",
                  "## Checkpoints", "", to_markdown(result.candidates, digits)]
    else:
        lines += ["## Overall", "", to_markdown(result.overall, digits)]
    drop = ["split", "outside_dp_guarantee"]
    lines += ["## Disparities", "",
              to_markdown(_summary_rows(result.disparities, result).drop(columns=drop), digits)]
    groups = _summary_rows(result.groups, result).drop(columns=drop)
    for attribute in dict.fromkeys(groups["attribute"]):
        figure = plot_attribute(result, attribute, private_name=private_name)
        name = f"auc_{_file_name(attribute)}.png"
        figure.savefig(os.path.join(directory, name), dpi=120)
        paths[f"figure/{attribute}"] = os.path.join(directory, name)
        lines += [f"## {attribute}", "", f"![AUC by {attribute}]({name})", "",
                  to_markdown(groups[groups["attribute"] == attribute], digits)]
    paths["report"] = os.path.join(directory, "report.md")
    with open(paths["report"], "w") as f:
        f.write("\n".join(lines))
    return paths
