"""AUC family: private vs non-private at matched AUC, figures and CSV tables.

`compare_matched_auc` (also named `compare_matched`) runs
`matching.compare_matched` on AUC: the private model meets the non-private
checkpoint whose overall AUC is closest to its own. The side-by-side
tables carry both models' per-group AUC and disparity with their
confidence intervals; when both evaluations drew the same bootstrap
resamples (same labels, groups, seed and number of replicates), the
differences get paired intervals too.

`plot_auc_attribute` draws one PNG figure per attribute (per-group AUC with
interval bars, private vs non-private side by side) and `write_tables` the
CSV files. The Markdown report is written by `report.write_report` (the
names `write_report` and `to_markdown` here lead there).
"""


import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import auc as fairness
from tf_dpfair.fairness import engine
from tf_dpfair.fairness import matching

_KEYS = ["split", "outside_dp_guarantee", "attribute", "group", "label", "count"]
_DISPARITY_FIGURES = ["worst_group", "worst_auc", "worst_auc_low", "worst_auc_high", "gap",
                      "gap_low", "gap_high", "ratio", "ratio_low", "ratio_high"]


class MatchedComparison(matching.Comparison):
    """Result of `compare_matched_auc`: a `matching.Comparison` of two `GroupEvaluation`s.

    `candidates` holds each checkpoint's overall `auc`; `groups` both
    models' AUC with intervals and `difference` = private - non-private;
    `disparities` both models' worst group, gap and ratio with intervals
    and `gap_difference` = private gap - non-private gap.
    """


def _same_data(private, non_private):
    # Status differs only through min_group_size once the labels agree.
    data_columns = _KEYS + ["positives", "negatives", "status"]
    return (private.split == non_private.split
            and private.groups[data_columns].equals(non_private.groups[data_columns]))


def _side_by_side(private, non_private, paired):
    """Per-group and disparity tables of both models, with differences."""
    side = private.groups[_KEYS + ["status"]].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for column in ("auc", "auc_low", "auc_high"):
            side[prefix + column] = evaluation.groups[column].to_numpy()
    side["difference"] = side["private_auc"] - side["non_private_auc"]
    keys = [("group", a, g, lab) for a, g, lab in
            zip(side["attribute"], side["group"], side["label"])]
    side["difference_low"], side["difference_high"] = matching.paired_intervals(
        private, non_private, keys, paired)

    disparities = private.disparities[_KEYS[:3] + ["label"]].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for column in _DISPARITY_FIGURES:
            disparities[prefix + column] = evaluation.disparities[column].to_numpy()
    disparities["gap_difference"] = disparities["private_gap"] - disparities["non_private_gap"]
    keys = [("gap", a, lab) for a, lab in zip(disparities["attribute"], disparities["label"])]
    (disparities["gap_difference_low"],
     disparities["gap_difference_high"]) = matching.paired_intervals(
         private, non_private, keys, paired)
    return side, disparities


def _quick_auc(scores, labels, groups, kwargs):
    """Overall AUC of a checkpoint's scores, evaluated without bootstrap."""
    return fairness.evaluate(labels, scores, groups, **{**kwargs, "n_bootstrap": 0}).overall_auc


FAMILY = matching.Family(
    evaluation_type=fairness.GroupEvaluation,
    source="GroupEvaluation from fairness.evaluate",
    evaluate=fairness.evaluate,
    figure="AUC", column="auc", overall=lambda evaluation: evaluation.overall_auc,
    quick=_quick_auc, same_data=_same_data,
    settings=("(split, groups, labels, counts or min_group_size differ); compare them on "
              "the same held-out set."),
    side_by_side=_side_by_side, comparison=MatchedComparison)


def compare_matched_auc(private, checkpoints, *, labels=None, groups=None, data=None,
                        **evaluate_kwargs):
    """Compares a private model with the non-private checkpoint of closest AUC.

    Args:
        private: `GroupEvaluation` of the private model, or its scores (then
            `labels` and `groups` are needed).
        checkpoints: non-empty dict name -> `GroupEvaluation` or scores of
            non-private checkpoints; on equal distance the first one wins.
            Checkpoints given as scores are first evaluated without
            bootstrap; only the chosen one is evaluated in full.
        labels: as in `auc.evaluate`, needed for scores.
        groups: as in `auc.evaluate`, needed for scores.
        data: as in `auc.evaluate`, optional.
        **evaluate_kwargs: passed to `auc.evaluate` for scores (use the
            same `seed` and `n_bootstrap` for both models to get paired
            intervals of the differences).

    Returns:
        A `MatchedComparison`.

    Raises:
        ValueError: no checkpoints, scores without labels or groups, an
            undefined overall AUC, or evaluations that differ in data (split,
            groups, labels, counts), `min_group_size` or confidence level.
    """
    return matching.compare_matched(FAMILY, private, checkpoints, labels=labels,
                                    groups=groups,
                                    evaluate_kwargs={"data": data, **evaluate_kwargs})


# The name this function had; `compare_matched_auc` says its family.
compare_matched = compare_matched_auc


def _evaluation(result):
    return result.private if isinstance(result, MatchedComparison) else result


def plot_auc_attribute(result, attribute, *, label=None, private_name="private"):
    """Draws per-group AUC with interval bars for one attribute.

    Groups below the minimum size are drawn hollow; tick labels show counts;
    dashed lines mark each model's overall AUC.

    Args:
        result: an `auc.GroupEvaluation` (one model) or a
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
    axes.set_ylabel(f"AUC ({100 * evaluation.confidence:g}% interval)")
    shown = "mean over labels" if label == engine.MEAN_LABEL else label
    title = f"AUC by {attribute} ({shown})"
    if evaluation.outside_dp_guarantee:
        title += "\n" + engine.OUTSIDE_DP_NOTE
    axes.set_title(title, fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    note = "dashed: overall AUC"
    if (table[table["attribute"] == attribute]["status"] == "too_small").any():
        note += "; hollow: too small"
    axes.legend(fontsize=8, title=note, title_fontsize=7)
    figure.tight_layout()
    return figure


# The name this function had; `plot_auc_attribute` says its family.
plot_attribute = plot_auc_attribute


def write_tables(result, directory):
    """Writes the tables of an evaluation or comparison as CSV files.

    Args:
        result: an `auc.GroupEvaluation` or a `MatchedComparison`.
        directory: output directory (created if missing).

    Returns:
        dict table name -> path: `groups`, `disparities`, and `overall`
        (evaluation) or `candidates` (comparison).
    """
    return matching.write_tables(result, directory, prefix="")


# Names of the Markdown report, written by `report` now.
_IN_REPORT = {"to_markdown": "to_markdown", "write_report": "write_auc_report"}


def __getattr__(name):
    # Read lazily: `report` imports this module.
    if name in _IN_REPORT:
        from tf_dpfair.fairness import report
        return getattr(report, _IN_REPORT[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
