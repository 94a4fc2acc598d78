"""Error-rate fairness reports, and private vs non-private at matched accuracy.

`compare_matched` pairs a private model with the non-private checkpoint of
closest overall accuracy (top-1 for multi-class data, else at the threshold)
and sets both models' per-group error rates, calibration and their
differences (equal opportunity, equalized odds, ...) side by side, with
paired bootstrap intervals of private - non-private when both evaluations
drew the same resamples. Matching on accuracy keeps a difference in
disparity from being merely a difference in accuracy, as
`reports.compare_matched` does on AUC.

`write_report` writes the tables as CSV and Markdown and one PNG per
attribute (per-group TPR, FPR and ECE with interval bars, or top-1 error,
ECE and Brier score for multi-class data), alone or appended to the AUC
report of `reports.write_report`.
"""

import dataclasses
import math
import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import auc as fairness
from tf_dpfair.fairness import auc_report as reports

_KEYS = ["split", "outside_dp_guarantee", "attribute", "group", "label", "count",
         "positives", "negatives", "threshold", "status"]
_SHOWN_IN_COMPARISON = ("equal_opportunity_difference", "equalized_odds_difference",
                        "error_gap", "ece_gap")
_TITLES = {"tpr": "TPR", "fpr": "FPR", "selection_rate": "selection rate",
           "error": "error", "ece": "ECE", "brier": "Brier score"}


@dataclasses.dataclass(frozen=True, eq=False)
class RateComparison:
    """Result of `compare_matched`.

    Attributes:
        private: `RateEvaluation` of the private model.
        non_private: `RateEvaluation` of the matched non-private checkpoint.
        checkpoint: name of that checkpoint.
        candidates: DataFrame, one row per checkpoint: overall `accuracy`,
            `distance` to the private model's, `chosen`.
        groups: per (attribute, group, label): both models' figures with
            intervals.
        disparities: per (attribute, label): both models' disparities with
            intervals, and `delta_<disparity>` = private - non-private with
            paired intervals (NaN when not paired).
        paired: whether the difference intervals are paired.
    """

    private: error_rates.RateEvaluation
    non_private: error_rates.RateEvaluation
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


def _evaluated(scores_or_evaluation, what, labels, groups, kwargs, **overrides):
    if isinstance(scores_or_evaluation, error_rates.RateEvaluation):
        return scores_or_evaluation
    if labels is None or groups is None:
        raise ValueError(f"{what} is given as scores: pass `labels` and `groups` too (or "
                         "a RateEvaluation from error_rates.evaluate).")
    return error_rates.evaluate(labels, scores_or_evaluation, groups,
                                **{**kwargs, **overrides})


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


def compare_matched(private, checkpoints, *, labels=None, groups=None, **evaluate_kwargs):
    """Compares a private model with the non-private checkpoint of closest accuracy.

    Args:
        private: `RateEvaluation` of the private model, or its scores (then
            `labels` and `groups` are needed).
        checkpoints: non-empty dict name -> `RateEvaluation` or scores; on
            equal distance the first wins. Only the chosen checkpoint is
            evaluated in full.
        labels, groups: as in `error_rates.evaluate`, needed for scores.
        **evaluate_kwargs: passed to `error_rates.evaluate` (threshold or
            multi_class, and the same seed and n_bootstrap for both models
            to get paired intervals).

    Returns:
        A `RateComparison`.

    Raises:
        ValueError: no checkpoints, scores without labels or groups, or
            evaluations that differ in data, decision rule, bins or
            confidence level.
    """
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise ValueError("checkpoints must be a non-empty dict name -> RateEvaluation "
                         "or scores.")
    context = (labels, groups, evaluate_kwargs)
    private = _evaluated(private, "The private model", *context)
    target = private.overall_accuracy
    rows = []
    for name, candidate in checkpoints.items():
        if isinstance(candidate, error_rates.RateEvaluation):
            accuracy = candidate.overall_accuracy
        elif labels is None or groups is None:
            raise ValueError(f"Checkpoint {name!r} is given as scores: pass `labels` and "
                             "`groups` too (or a RateEvaluation from error_rates.evaluate).")
        else:
            accuracy = _accuracy(candidate, labels, evaluate_kwargs)
        rows.append({"checkpoint": str(name), "accuracy": accuracy,
                     "distance": abs(accuracy - target)})
    candidates = pd.DataFrame(rows)
    best = int(candidates["distance"].idxmin())
    candidates["chosen"] = candidates.index == best
    name = list(checkpoints)[best]
    non_private = _evaluated(checkpoints[name], f"Checkpoint {name!r}", *context)

    same = (private.split == non_private.split
            and private.threshold_rule == non_private.threshold_rule
            and private.n_bins == non_private.n_bins
            and private.groups[_KEYS].equals(non_private.groups[_KEYS]))
    if not same:
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated on "
                         "different data or settings (split, groups, labels, counts, "
                         "threshold rule, calibration bins or min_group_size differ).")
    if private.confidence != non_private.confidence:
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated at "
                         f"different confidence levels ({private.confidence} and "
                         f"{non_private.confidence}).")
    paired = private.resample_key == non_private.resample_key

    side = private.groups[_KEYS].copy()
    for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
        for figure in error_rates.FIGURES:
            for suffix in ("", "_low", "_high"):
                side[prefix + figure + suffix] = evaluation.groups[figure + suffix].to_numpy()
    disparities = private.disparities[["split", "outside_dp_guarantee", "attribute",
                                       "label"]].copy()
    for name_ in error_rates.DISPARITIES:
        for prefix, evaluation in (("private_", private), ("non_private_", non_private)):
            for suffix in ("", "_low", "_high"):
                disparities[prefix + name_ + suffix] = evaluation.disparities[
                    name_ + suffix].to_numpy()
        disparities["delta_" + name_] = (disparities["private_" + name_]
                                         - disparities["non_private_" + name_])
        keys = [(name_, a, lab) for a, lab in zip(disparities["attribute"],
                                                  disparities["label"])]
        lows, highs = [], []
        for key in keys:
            low, high = (fairness.percentile_interval(
                private.replicates[key] - non_private.replicates[key], private.confidence)
                if paired else (math.nan, math.nan))
            lows.append(low)
            highs.append(high)
        disparities["delta_" + name_ + "_low"] = lows
        disparities["delta_" + name_ + "_high"] = highs
    return RateComparison(private=private, non_private=non_private, checkpoint=str(name),
                          candidates=candidates, groups=side, disparities=disparities,
                          paired=paired)


def _evaluation(result):
    return result.private if isinstance(result, RateComparison) else result


def shown_labels(evaluation):
    """The labels a report shows: the summary label, and `top1` for multi-class."""
    labels = [evaluation.summary_label]
    if evaluation.multi_class:
        labels.append(error_rates.TOP1_LABEL)
    return labels


def _panels(label):
    if label == error_rates.TOP1_LABEL:
        return ["error", "ece", "brier"]
    return ["tpr", "fpr", "ece"]


def plot_attribute(result, attribute, *, label=None, private_name="private"):
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
    shown = {fairness.MEAN_LABEL: "mean over labels", error_rates.TOP1_LABEL: "top-1"}
    title = (f"{attribute} ({shown.get(label, label)}; {evaluation.threshold_rule}; "
             f"ECE over {evaluation.n_bins} bins; {100 * evaluation.confidence:g}% intervals)")
    if evaluation.outside_dp_guarantee:
        title += "\n" + fairness.OUTSIDE_DP_NOTE
    figure.suptitle(title, fontsize=9)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


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
    os.makedirs(directory, exist_ok=True)
    names = ["groups", "disparities"]
    names.append("candidates" if isinstance(result, RateComparison) else "overall")
    paths = {}
    for name in names:
        paths[name] = os.path.join(directory, f"{prefix}{name}.csv")
        getattr(result, name).to_csv(paths[name], index=False)
    return paths


def markdown(result, *, heading="##", digits=3, figures=None):
    """The Markdown sections of an evaluation or comparison.

    Args:
        result: a `RateEvaluation` or `RateComparison`.
        heading: Markdown heading level of the sections.
        digits: decimals.
        figures: optional dict attribute -> image file names to show.

    Returns:
        The text (the labels of `shown_labels` only; the CSVs hold all).
    """
    evaluation = _evaluation(result)
    drop = ["split", "outside_dp_guarantee"]
    lines = [f"{heading} Error rates and calibration", "",
             f"Decision: {evaluation.threshold_rule}. ECE over {evaluation.n_bins} "
             "equal-width bins of [0, 1]. Differences are max - min over the groups with "
             "status ok; intervals: "
             f"{100 * evaluation.confidence:g}% bootstrap percentile intervals, resampled "
             "within each group.", ""]
    if evaluation.outside_dp_guarantee:
        lines += [f"**Warning: {fairness.OUTSIDE_DP_NOTE}**", ""]
    labels = shown_labels(evaluation)
    if isinstance(result, RateComparison):
        lines += [f"Matched on overall accuracy: private "
                  f"{result.private.overall_accuracy:.{digits}f}, non-private checkpoint "
                  f"**{result.checkpoint}** {result.non_private.overall_accuracy:.{digits}f}. "
                  "Differences are private - non-private"
                  + (", with paired intervals." if result.paired else
                     "; no paired intervals (different resamples)."), "",
                  reports.to_markdown(result.candidates, digits)]
        # The CSV holds every difference; the Markdown table the main ones.
        columns = ["attribute", "label"] + [
            prefix + name + suffix for name in _SHOWN_IN_COMPARISON
            for prefix in ("private_", "non_private_", "delta_")
            for suffix in ("", "_low", "_high")]
    else:
        lines += [f"{heading}# Overall", "", reports.to_markdown(
            result.overall[result.overall["label"].isin(labels)].drop(columns=drop), digits)]
        columns = [c for c in result.disparities.columns if c not in drop]
    disparities = result.disparities[result.disparities["label"].isin(labels)][columns]
    lines += [f"{heading}# Differences between groups", "",
              reports.to_markdown(disparities, digits)]
    groups = result.groups[result.groups["label"].isin(labels)].drop(columns=drop)
    for attribute in dict.fromkeys(groups["attribute"]):
        lines += [f"{heading}# Error rates by {attribute}", ""]
        for name in (figures or {}).get(attribute, []):
            lines += [f"![Error rates by {attribute}]({name})", ""]
        lines.append(reports.to_markdown(groups[groups["attribute"] == attribute], digits))
    return "\n".join(lines)


def write_report(result, directory, *, auc=None, title="Fairness report",
                 private_name="private", digits=3):
    """Writes CSV tables, Markdown sections and one PNG per attribute.

    Args:
        result: a `RateEvaluation` or `RateComparison`.
        directory: output directory (created if missing).
        auc: optional `fairness.GroupEvaluation` or
            `reports.MatchedComparison` of the same model(s): its report
            (`reports.write_report`) comes first and these sections are
            appended to its report.md.
        title: first heading (of the AUC report when `auc` is given).
        private_name: name of the (private) model in the figures.
        digits: decimals in the Markdown tables.

    Returns:
        dict name -> path: the AUC report's paths (with `auc`), the CSV
        tables `rates_<table>`, `report` and `rates_figure/<attribute>`.
    """
    paths = reports.write_report(auc, directory, title=title, private_name=private_name,
                                 digits=digits) if auc is not None else {}
    os.makedirs(directory, exist_ok=True)
    paths.update({f"rates_{k}": v for k, v in write_tables(result, directory).items()})
    evaluation = _evaluation(result)
    figures = {}
    for attribute in dict.fromkeys(evaluation.groups["attribute"]):
        for label in shown_labels(evaluation):
            figure = plot_attribute(result, attribute, label=label, private_name=private_name)
            name = f"rates_{reports._file_name(attribute)}_{reports._file_name(label)}.png"
            figure.savefig(os.path.join(directory, name), dpi=110)
            paths[f"rates_figure/{attribute}/{label}"] = os.path.join(directory, name)
            figures.setdefault(attribute, []).append(name)
    text = markdown(result, figures=figures, digits=digits)
    paths["report"] = os.path.join(directory, "report.md")
    if auc is not None:
        with open(paths["report"], "a") as f:
            f.write("\n\n" + text)
    else:
        with open(paths["report"], "w") as f:
            f.write(f"# {title}\n\nData split: **{evaluation.split}**.\n\n" + text)
    return paths
