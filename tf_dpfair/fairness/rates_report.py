"""Error-rate family: private vs non-private at matched accuracy, figures, CSV tables.

`compare_matched_rates` (also named `compare_matched`) runs
`matching.compare_matched` on accuracy: the private model meets the
non-private checkpoint of closest overall accuracy (top-1 for multi-class
data, else at the threshold), and both models' per-group error rates,
calibration and their differences (equal opportunity, equalized odds, ...)
are set side by side, with paired bootstrap intervals of private -
non-private when both evaluations drew the same resamples. Matching on
accuracy keeps a difference in disparity from being merely a difference in
accuracy, as `auc_report.compare_matched_auc` does on AUC.

`plot_rates_attribute` draws one PNG per attribute (per-group TPR, FPR and
ECE with interval bars, or top-1 error, ECE and Brier score for multi-class
data) and `write_tables` the CSV files. The Markdown sections and report.md
are written by `report` (the names `markdown` and `write_report` here lead
there).
"""


import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import engine
from tf_dpfair.fairness import matching
from tf_dpfair.fairness import rates

_KEYS = ["split", "outside_dp_guarantee", "attribute", "group", "label", "count",
         "positives", "negatives", "threshold", "status"]
_TITLES = {"tpr": "TPR", "fpr": "FPR", "selection_rate": "selection rate",
           "error": "error", "ece": "ECE", "brier": "Brier score"}


class RateComparison(matching.Comparison):
    """Result of `compare_matched_rates`: a `matching.Comparison` of two `RateEvaluation`s.

    `candidates` holds each checkpoint's overall `accuracy`; `groups` both
    models' figures with intervals; `disparities` both models' disparities
    with intervals and `delta_<disparity>` = private - non-private.
    """


def _accuracy(scores, labels, kwargs):
    """Overall accuracy of scores, as `RateEvaluation.overall_accuracy` has it.

    Much cheaper than a full evaluation, for choosing among checkpoints.
    """
    scores = np.asarray(scores, dtype=float)
    if kwargs.get("multi_class"):
        return float(np.mean(scores.argmax(axis=1) == np.asarray(labels)))
    labels = np.asarray(labels, dtype=float)
    labels, scores = labels.reshape(len(labels), -1), scores.reshape(len(scores), -1)
    known = np.ones(labels.shape, bool)
    if kwargs.get("label_mask") is not None:
        known = np.asarray(kwargs["label_mask"]).reshape(labels.shape) == 1
    threshold = kwargs.get("threshold")
    values = getattr(threshold, "values", threshold)
    values = np.broadcast_to(np.asarray(values, dtype=float).reshape(-1), labels.shape[1:])
    right = (scores >= values) == (labels == 1)
    return float(np.mean([right[known[:, j], j].mean() for j in range(labels.shape[1])]))


def _quick_accuracy(scores, labels, groups, kwargs):
    return _accuracy(scores, labels, kwargs)


def _same_data(private, non_private):
    return (private.split == non_private.split
            and private.threshold_rule == non_private.threshold_rule
            and private.n_bins == non_private.n_bins
            and private.groups[_KEYS].equals(non_private.groups[_KEYS]))


def _side_by_side(private, non_private, paired):
    """Per-group and disparity tables of both models, with differences."""
    side = private.groups[_KEYS].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for figure in rates.FIGURES:
            for suffix in ("", "_low", "_high"):
                side[prefix + figure + suffix] = evaluation.groups[figure + suffix].to_numpy()
    disparities = private.disparities[["split", "outside_dp_guarantee", "attribute",
                                       "label"]].copy()
    for name in rates.DISPARITIES:
        for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
            for suffix in ("", "_low", "_high"):
                disparities[prefix + name + suffix] = evaluation.disparities[
                    name + suffix].to_numpy()
        disparities["delta_" + name] = (disparities["private_" + name]
                                        - disparities["non_private_" + name])
        keys = [(name, a, lab) for a, lab in zip(disparities["attribute"],
                                                 disparities["label"])]
        (disparities["delta_" + name + "_low"],
         disparities["delta_" + name + "_high"]) = matching.paired_intervals(
             private, non_private, keys, paired)
    return side, disparities


FAMILY = matching.Family(
    evaluation_type=rates.RateEvaluation,
    source="RateEvaluation from rates.evaluate", evaluate=rates.evaluate,
    figure="accuracy", column="accuracy",
    overall=lambda evaluation: evaluation.overall_accuracy, quick=_quick_accuracy,
    same_data=_same_data,
    settings=("(split, groups, labels, counts, threshold rule, calibration bins or "
              "min_group_size differ)."),
    side_by_side=_side_by_side, comparison=RateComparison)


def compare_matched_rates(private, checkpoints, *, labels=None, groups=None,
                          **evaluate_kwargs):
    """Compares a private model with the non-private checkpoint of closest accuracy.

    Args:
        private: `RateEvaluation` of the private model, or its scores (then
            `labels` and `groups` are needed).
        checkpoints: non-empty dict name -> `RateEvaluation` or scores; on
            equal distance the first wins. Only the chosen checkpoint is
            evaluated in full.
        labels, groups: as in `rates.evaluate`, needed for scores.
        **evaluate_kwargs: passed to `rates.evaluate` (threshold or
            multi_class, and the same seed and n_bootstrap for both models
            to get paired intervals).

    Returns:
        A `RateComparison`.

    Raises:
        ValueError: no checkpoints, scores without labels or groups, or
            evaluations that differ in data, decision rule, bins or
            confidence level.
    """
    return matching.compare_matched(FAMILY, private, checkpoints, labels=labels,
                                    groups=groups, evaluate_kwargs=evaluate_kwargs)


# The name this function had; `compare_matched_rates` says its family.
compare_matched = compare_matched_rates


def _evaluation(result):
    return result.private if isinstance(result, RateComparison) else result


def shown_labels(evaluation):
    """The labels a report shows: the summary label, and `top1` for multi-class."""
    labels = [evaluation.summary_label]
    if evaluation.multi_class:
        labels.append(rates.TOP1_LABEL)
    return labels


def _panels(label):
    if label == rates.TOP1_LABEL:
        return ["error", "ece", "brier"]
    return ["tpr", "fpr", "ece"]


def plot_rates_attribute(result, attribute, *, label=None, private_name="private"):
    """Draws per-group error rates and calibration with interval bars.

    Panels: TPR, FPR and ECE (top-1 error, ECE and Brier score for the
    `top1` label); private and matched non-private side by side for a
    comparison; hollow markers for groups below the minimum size.

    Args:
        result: a `RateEvaluation` or `RateComparison`.
        attribute: attribute to draw.
        label: label to draw (default: the summary label).
        private_name: legend name of the (private) model.

    Returns:
        A `matplotlib.figure.Figure` on an Agg canvas.

    Raises:
        ValueError: unknown attribute or label.
    """
    evaluation = _evaluation(result)
    label = evaluation.summary_label if label is None else label
    table = evaluation.groups
    if attribute not in set(table["attribute"]) or label not in set(table["label"]):
        raise ValueError(f"Unknown attribute {attribute!r} or label {label!r}; attributes: "
                         f"{list(dict.fromkeys(table['attribute']))}, labels: "
                         f"{list(dict.fromkeys(table['label']))}.")
    series = [(private_name, evaluation)]
    if isinstance(result, RateComparison):
        series.append((f"non-private ({result.checkpoint})", result.non_private))
    panels = _panels(label)
    rows = table[(table["attribute"] == attribute) & (table["label"] == label)]
    figure = Figure(figsize=(3.2 * len(panels) + 0.4 * len(rows), 3.6))
    FigureCanvasAgg(figure)
    width = 0.3 if len(series) > 1 else 0.0
    colors = ["tab:blue", "tab:orange"]
    for p, figure_name in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), p + 1)
        for k, (name, model) in enumerate(series):
            rows = model.groups[(model.groups["attribute"] == attribute)
                                & (model.groups["label"] == label)]
            x = np.arange(len(rows)) + (k - (len(series) - 1) / 2) * width
            values = rows[figure_name].to_numpy(float)
            # Percentile intervals need not contain the estimate: bars start there.
            errors = np.maximum(0.0, np.nan_to_num(np.vstack(
                [values - rows[figure_name + "_low"].to_numpy(float),
                 rows[figure_name + "_high"].to_numpy(float) - values])))
            axes.errorbar(x, values, yerr=errors, fmt="o", capsize=3, color=colors[k],
                          label=name)
            small = (rows["status"] == "too_small").to_numpy()
            axes.plot(x[small], values[small], "o", color=colors[k], markerfacecolor="white")
        axes.set_xticks(np.arange(len(rows)), [f"{g}\nn={c}" for g, c in
                                               zip(rows["group"], rows["count"])])
        axes.set_title(_TITLES[figure_name], fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    shown = {engine.MEAN_LABEL: "mean over labels", rates.TOP1_LABEL: "top-1"}
    title = (f"{attribute} ({shown.get(label, label)}; {evaluation.threshold_rule}; "
             f"ECE over {evaluation.n_bins} bins; {100 * evaluation.confidence:g}% intervals)")
    if evaluation.outside_dp_guarantee:
        title += "\n" + engine.OUTSIDE_DP_NOTE
    figure.suptitle(title, fontsize=9)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


# The name this function had; `plot_rates_attribute` says its family.
plot_attribute = plot_rates_attribute


def write_tables(result, directory, prefix="rates_"):
    """Writes the tables of an evaluation or comparison as CSV files.

    Args:
        result: a `RateEvaluation` or `RateComparison`.
        directory: output directory (created if missing).
        prefix: file name prefix.

    Returns:
        dict table name -> path: `groups`, `disparities`, and `overall`
        (evaluation) or `candidates` (comparison), each `<prefix><name>.csv`.
    """
    return matching.write_tables(result, directory, prefix=prefix)


# Names of the Markdown report, written by `report` now.
_IN_REPORT = {"markdown": "rates_markdown", "write_report": "write_rates_report"}


def __getattr__(name):
    # Read lazily: `report` imports this module.
    if name in _IN_REPORT:
        from tf_dpfair.fairness import report
        return getattr(report, _IN_REPORT[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
