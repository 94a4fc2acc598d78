"""Per-group error rates and calibration at an operating threshold.

`evaluate` (also named `evaluate_rates`) is the sibling of `auc.evaluate`
for the fairness measures that need a decision: equal opportunity,
equalized odds, and calibration within each group. Input validation, the
bootstrap and the tables come from `engine`; this module computes the
figures. It is about 500 lines because each figure exists three ways (point
estimate, bootstrap under weights, top-1 for multi-class data) and they are
kept side by side to stay consistent.

The decision:

- Binary and multi-label data: an example is predicted positive for a label
  when its score is >= that label's threshold. The threshold is given (a
  number, or one per label), or chosen on validation data by
  `thresholds.choose_threshold`, whose rule every table records (`threshold_rule`).
- Multi-class data (`multi_class=True`): the predicted class is the top-1
  class, and each class is a one-vs-rest decision (no threshold).

Per group and label (`groups` table): true-positive rate `tpr`,
false-positive rate `fpr`, selection rate (share predicted positive),
`error` (share of wrong decisions), expected calibration error `ece` and
Brier score `brier`, with bootstrap intervals. Multi-class data adds the
label `TOP1_LABEL`: top-1 error, the ECE of the top-1 confidence against
top-1 correctness (Guo et al. 2017) and the multi-class Brier score (mean
over examples of the sum over classes of (p_k - [y = k])^2, scikit-learn's
definition); its tpr, fpr and selection rate are NaN.

Per attribute and label (`disparities`), over the groups of at least
`min_group_size` examples: `equal_opportunity_difference` (max - min TPR),
`equalized_odds_difference` (the larger of the TPR and FPR differences, as
fairlearn defines it), `fpr_difference`, `selection_rate_difference`
(demographic parity), and the max - min `error_gap`, `ece_gap`,
`brier_gap`, each with an interval; `highest_error_group` and
`lowest_tpr_group` name the groups.

Multi-label and multi-class data get the label `MEAN_LABEL`: per group the
mean of each figure over the labels where it is defined; per attribute the
mean of each label's disparity (a mean of differences, not the difference
of means).

Calibration: ECE over `n_bins` equal-width bins of [0, 1] (default 10),
binned as scikit-learn's `calibration_curve(strategy="uniform")`; see
`tf_dpfair.fairness.calibration`. Scores must be probabilities.

Undefined is NaN, never 0: TPR without positives, FPR without negatives, any
figure of an empty group, a difference with fewer than two defined groups.

Point estimates come from fairlearn's `MetricFrame` (TPR, FPR, selection
rate, zero-one loss) and scikit-learn (`brier_score_loss`,
`calibration_curve`); the bootstrap recomputes them under resampling
weights. Each replicate resamples examples with replacement within each
group (`engine.bootstrap_weights`), as `auc.evaluate` does; the same
labels, groups, seed and replicate count draw the same resamples for any
scores (`resample_key`), which paired comparisons need. A difference is a
max - min of noisy estimates, biased upwards when the groups are alike: its
interval need not contain 0 (or even the point estimate) when they are
equal; read it with the per-group intervals.

Differential privacy: figures on training data are outside the guarantee;
`split="train"` marks every table and warns.
"""

import dataclasses
import math
import numbers

import fairlearn.metrics
import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, zero_one_loss

from tf_dpfair.fairness import calibration
from tf_dpfair.fairness import engine
from tf_dpfair.fairness.thresholds import Threshold

MEAN_LABEL = engine.MEAN_LABEL
TOP1_LABEL = "top1"
DEFAULT_BINS = calibration.DEFAULT_BINS
FIGURES = ("tpr", "fpr", "selection_rate", "error", "ece", "brier")
# Disparity -> the per-group figure whose max - min it is.
_RANGES = {"equal_opportunity_difference": "tpr", "fpr_difference": "fpr",
           "selection_rate_difference": "selection_rate", "error_gap": "error",
           "ece_gap": "ece", "brier_gap": "brier"}
_INTEGER_COLUMNS = ("count", "positives", "negatives", "groups_compared")
DISPARITIES = ("equal_opportunity_difference", "equalized_odds_difference",
               "fpr_difference", "selection_rate_difference", "error_gap", "ece_gap",
               "brier_gap")


@dataclasses.dataclass(frozen=True, eq=False)
class RateEvaluation:
    """Result of `evaluate`: tidy tables plus what paired comparisons need.

    Attributes:
        groups: DataFrame, one row per (attribute, group, label).
        disparities: DataFrame, one row per (attribute, label).
        overall: DataFrame, one row per label (all examples).
        split: where the data came from.
        summary_label: the label that summarises the model: the only label,
            or `MEAN_LABEL`.
        multi_class: whether decisions are top-1 classes.
        threshold_rule: how the decision was made, in words.
        n_bins: calibration bins.
        confidence: confidence level of the intervals.
        replicates: bootstrap replicates `[n_bootstrap]`, keyed
            `("group", attribute, group, label, figure)`,
            `("overall", label, figure)` and `(disparity, attribute, label)`.
        resample_key: equal keys mean the same resamples were drawn.
    """

    groups: pd.DataFrame
    disparities: pd.DataFrame
    overall: pd.DataFrame
    split: str
    summary_label: str
    multi_class: bool
    threshold_rule: str
    n_bins: int
    confidence: float
    replicates: dict
    resample_key: str

    @property
    def outside_dp_guarantee(self):
        """True when the figures come from training data."""
        return engine.outside_dp(self.split)

    @property
    def overall_accuracy(self):
        """1 - overall error: top-1 (multi-class), else of `summary_label`."""
        label = TOP1_LABEL if self.multi_class else self.summary_label
        return 1.0 - float(self.overall.set_index("label").loc[label, "error"])


def _figures(y_true, prob, decision, n_bins):
    """The figures of one binary decision, from fairlearn and scikit-learn.

    Args:
        y_true: 0/1 outcomes `[n]`.
        prob: probabilities `[n]`.
        decision: 0/1 decisions `[n]`.
        n_bins: calibration bins.

    Returns:
        dict figure -> float; NaN where undefined (fairlearn returns 0 for
        a rate without a denominator).
    """
    y_true = np.asarray(y_true, dtype=float)
    if y_true.size == 0:
        return dict.fromkeys(FIGURES, math.nan)
    has = {1: (y_true == 1).any(), 0: (y_true == 0).any()}
    return {
        "tpr": (float(fairlearn.metrics.true_positive_rate(y_true, decision))
                if has[1] else math.nan),
        "fpr": (float(fairlearn.metrics.false_positive_rate(y_true, decision))
                if has[0] else math.nan),
        "selection_rate": float(fairlearn.metrics.selection_rate(y_true, decision)),
        "error": float(zero_one_loss(y_true, decision)),
        "ece": calibration.expected_calibration_error(y_true, prob, n_bins),
        "brier": float(brier_score_loss(y_true, prob, labels=[0, 1])),
    }


def _point_by_group(y, decision, prob, features, names, n_bins):
    """Figures per group (rows in `names` order), grouped by fairlearn's MetricFrame.

    One metric function returns every figure, so that the frame splits the
    data once per group (its per-call overhead dominates otherwise).
    """
    # The frame also reduces its results over groups (min, max), which
    # NumPy warns about when a figure is NaN in some group.
    with np.errstate(invalid="ignore"):
        frame = fairlearn.metrics.MetricFrame(
            metrics=lambda y_true, y_pred, decision: tuple(
                _figures(y_true, y_pred, decision, n_bins).values()),
            y_true=y, y_pred=prob, sensitive_features=features,
            sample_params={"decision": decision})
    by_group = frame.by_group.reindex(names)
    empty = (math.nan,) * len(FIGURES)
    return pd.DataFrame([empty if not isinstance(v, tuple) else v for v in by_group],
                        index=names, columns=list(FIGURES))


def _top1_point(labels, scores, n_bins):
    """Top-1 error, confidence ECE and multi-class Brier (scikit-learn)."""
    nan = dict.fromkeys(FIGURES, math.nan)
    if len(labels) == 0:
        return nan
    truth, predicted = labels.argmax(axis=1), scores.argmax(axis=1)
    ece = calibration.expected_calibration_error(truth == predicted, scores.max(axis=1), n_bins)
    brier = brier_score_loss(truth, scores, labels=np.arange(scores.shape[1]))
    return {**nan, "error": float(zero_one_loss(truth, predicted)), "ece": ece,
            "brier": float(brier)}


def _weighted_figures(y, decision, prob, weights, n_bins):
    """The figures of one binary decision under many weightings.

    Args:
        y, decision: 0/1 `[n]`; prob: probabilities `[n]`.
        weights: `[b, n]`, e.g. bootstrap counts.
        n_bins: calibration bins.

    Returns:
        dict figure -> `[b]`, NaN where undefined.
    """
    total = weights.sum(axis=1)
    positives = weights @ y
    true_pos = weights @ (y * decision)
    false_pos = weights @ ((1 - y) * decision)
    onehot = np.eye(n_bins)[calibration.calibration_bins(prob, n_bins)]
    # Per bin, |sum of outcomes - sum of scores| / n = (n_b / n) |gap of the means|.
    bin_gaps = np.abs(weights @ (onehot * (y - prob)[:, None]))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"tpr": true_pos / positives, "fpr": false_pos / (total - positives),
               "selection_rate": (true_pos + false_pos) / total,
               "error": (positives - true_pos + false_pos) / total,
               "ece": bin_gaps.sum(axis=1) / total, "brier": weights @ (prob - y) ** 2 / total}
    out["tpr"][positives == 0] = np.nan
    out["fpr"][total - positives == 0] = np.nan
    for name in ("selection_rate", "error", "ece", "brier"):
        out[name][total == 0] = np.nan
    return out


def _weighted_top1(labels, scores, weights, n_bins):
    """Top-1 figures (see `_top1_point`) under many weightings."""
    correct = (labels.argmax(axis=1) == scores.argmax(axis=1)).astype(float)
    out = _weighted_figures(correct, np.ones_like(correct), scores.max(axis=1), weights,
                            n_bins)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        brier = weights @ ((scores - labels) ** 2).sum(axis=1) / total
    nan = np.full(len(weights), np.nan)
    # With outcome "top-1 is right" and every decision positive, the "error"
    # is the share of wrong top-1 classes and the ECE that of the confidence.
    return {"tpr": nan, "fpr": nan, "selection_rate": nan, "error": out["error"],
            "ece": out["ece"], "brier": np.where(total > 0, brier, np.nan)}




def _disparities(group_values):
    """Disparities (point or replicates) from per-group figures `{figure: [G, ...]}`."""
    out = {name: engine.value_range(group_values[figure]) for name, figure in _RANGES.items()}
    # NaN if either difference is undefined: equalized odds needs both.
    out["equalized_odds_difference"] = np.maximum(out["equal_opportunity_difference"],
                                                  out["fpr_difference"])
    return out




def _thresholds(threshold, num_labels):
    """(values per label, rule text) of the given threshold."""
    if threshold is None:
        raise ValueError("Binary and multi-label data need a threshold: a number, one per "
                         "label, or thresholds.choose_threshold(...) on validation data.")
    if isinstance(threshold, Threshold):
        values, rule = list(threshold.values), threshold.rule
    else:
        values = ([threshold] if isinstance(threshold, numbers.Real) else list(threshold))
        rule = None
    if len(values) == 1:
        values = values * num_labels
    if len(values) != num_labels or not all(isinstance(v, numbers.Real) and not math.isnan(v)
                                            for v in values):
        raise ValueError(f"threshold must be a number or a list of {num_labels} numbers "
                         f"(one per label); got {threshold!r}.")
    if rule is None:
        shown = ", ".join(f"{v:g}" for v in dict.fromkeys(values))
        rule = f"given: score >= {shown}"
    return np.asarray(values, dtype=float), rule


def _multi_class_inputs(labels, scores, label_names):
    """One-hot labels `[N, K]` from class ids; default class names."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (len(scores),):
        raise ValueError("multi_class=True needs class ids [N] and probabilities [N, K]; "
                         f"got labels {labels.shape} and scores {scores.shape}.")
    num_classes = scores.shape[1]
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class ids must be integers in [0, {num_classes}).")
    sums = scores.sum(axis=1)
    if not np.all(np.abs(sums - 1.0) < 1e-3):
        raise ValueError("multi-class scores must be probabilities summing to 1 per example "
                         f"(a softmax); row sums range over [{sums.min():g}, {sums.max():g}].")
    # Float32 softmax sums miss 1 by ~1e-7, which scikit-learn's multi-class
    # Brier score warns about; renormalised, every figure sees the same scores.
    scores = scores / sums[:, None]
    names = [str(k) for k in range(num_classes)] if label_names is None else label_names
    return np.eye(num_classes)[labels], scores, names


def evaluate_rates(labels, scores, groups, *, threshold=None, multi_class=False, data=None,
             label_names=None, group_names=None, intersections=(), min_group_size=30,
             n_bins=DEFAULT_BINS, n_bootstrap=1000, confidence=0.95, seed=0, split="test",
             label_mask=None):
    """Per-group TPR, FPR, selection rate, error, ECE and Brier score, with intervals.

    Args:
        labels: `[N]` or `[N, L]` 0/1 labels; with `multi_class`, class ids
            `[N]`. With `data`, column name(s) (not with `multi_class`).
        scores: probabilities in [0, 1] of the labels' shape; with
            `multi_class`, `[N, K]` class probabilities (e.g. a softmax).
        groups: dict attribute -> `[N]` group values, or a DataFrame of
            group columns; with `data`, a list of column names.
        threshold: binary and multi-label data: a number, one number per
            label, or a `Threshold` from `thresholds.choose_threshold` (on validation
            data). Must be None with `multi_class` (the decision is top-1).
        multi_class: labels are class ids and decisions the top-1 classes.
        data, label_names, group_names, intersections, min_group_size,
            n_bootstrap, confidence, seed, split, label_mask: as in
            `auc.evaluate` (`label_mask` not with `multi_class`).
            With `multi_class`, rows of `scores` must sum to 1 (within
            1e-3; they are renormalised).
        n_bins: calibration bins (see the module docstring).

    Returns:
        A `RateEvaluation`.

    Raises:
        ValueError: as `auc.evaluate`, plus: a missing or malformed
            threshold, a threshold or label mask or `data` with
            `multi_class`, scores outside [0, 1], class ids out of range,
            a reserved label name, or a bad `n_bins`.
    """
    engine.check_settings(n_bootstrap, confidence, min_group_size, seed, split, n_bins)
    engine.warn_outside_dp(split)
    if multi_class:
        if threshold is not None or label_mask is not None or data is not None:
            raise ValueError("multi_class=True decides by the top-1 class: pass no "
                             "threshold, label_mask or data.")
        labels, scores, label_names = _multi_class_inputs(labels, scores, label_names)
    labels, scores, label_names, groups = engine.prepare_inputs(
        labels, scores, groups, data, label_names, group_names, label_mask)
    if TOP1_LABEL in label_names:
        raise ValueError(f"The label name {TOP1_LABEL!r} is reserved.")
    if scores.min() < 0.0 or scores.max() > 1.0:
        raise ValueError("scores must be probabilities in [0, 1] (apply the sigmoid or "
                         f"softmax to logits); got values in [{scores.min():g}, "
                         f"{scores.max():g}].")
    if multi_class:
        thresholds, rule = np.full(len(label_names), np.nan), "top-1 class (no threshold)"
        decisions = np.eye(scores.shape[1])[scores.argmax(axis=1)]
    else:
        thresholds, rule = _thresholds(threshold, len(label_names))
        decisions = (scores >= thresholds[None, :]).astype(float)
    engine.add_intersections(groups, intersections)
    summaries = ([MEAN_LABEL] if len(label_names) > 1 else []) + (
        [TOP1_LABEL] if multi_class else [])
    context = _Context(labels, scores, decisions, label_names, thresholds, summaries,
                       n_bins, n_bootstrap, confidence)

    overall_rows = context.overall_rows(np.random.default_rng([seed, 0]))
    group_rows, disparity_rows = [], []
    for a, (attribute, (names, codes)) in enumerate(groups.items()):
        rows = context.group_rows(attribute, names, codes, min_group_size,
                                  np.random.default_rng([seed, a + 1]))
        group_rows.extend(rows)
        disparity_rows.extend(context.disparity_rows(attribute, rows))

    def table(rows):
        return engine.table(rows, split, _INTEGER_COLUMNS)

    return RateEvaluation(
        groups=table(group_rows), disparities=table(disparity_rows),
        overall=table(overall_rows), split=split,
        summary_label=MEAN_LABEL if len(label_names) > 1 else label_names[0],
        multi_class=bool(multi_class), threshold_rule=rule, n_bins=n_bins,
        confidence=confidence, replicates=context.replicates,
        resample_key=engine.resample_key(labels, groups, seed, n_bootstrap))


# The name this function had; `evaluate_rates` says which family it computes.
evaluate = evaluate_rates


class _Context:
    """The figures of one evaluation: point estimates, replicates, rows."""

    def __init__(self, labels, scores, decisions, label_names, thresholds, summaries,
                 n_bins, n_bootstrap, confidence):
        self.labels, self.scores, self.decisions = labels, scores, decisions
        self.label_names, self.thresholds = label_names, thresholds
        self.summaries, self.n_bins = summaries, n_bins
        self.n_bootstrap, self.confidence = n_bootstrap, confidence
        self.replicates = {}

    def _replicates(self, rows, rng):
        """{label: {figure: [n_bootstrap]}} of the examples `rows`, resampled."""
        out = {label: {f: np.full(self.n_bootstrap, np.nan) for f in FIGURES}
               for label in self.label_names + self.summaries}
        if len(rows) == 0:
            return out
        for start, weights in engine.bootstrap_weights(len(rows), self.n_bootstrap, rng):
            stop = start + len(weights)
            for j, label in enumerate(self.label_names):
                y = self.labels[rows, j]
                known = ~np.isnan(y)
                figures = _weighted_figures(y[known], self.decisions[rows, j][known],
                                            self.scores[rows, j][known], weights[:, known],
                                            self.n_bins)
                for figure, values in figures.items():
                    out[label][figure][start:stop] = values
            if TOP1_LABEL in self.summaries:
                top1 = _weighted_top1(self.labels[rows], self.scores[rows], weights, self.n_bins)
                for figure, values in top1.items():
                    out[TOP1_LABEL][figure][start:stop] = values
        if MEAN_LABEL in self.summaries:
            for figure in FIGURES:
                out[MEAN_LABEL][figure] = engine.nanmean_rows(
                    np.array([out[label][figure] for label in self.label_names]))
        return out

    def _row(self, rows, label, point, replicates, key):
        """Counts, threshold, figures with intervals of one label on `rows`."""
        row = {"label": label, "count": len(rows), "positives": pd.NA, "negatives": pd.NA,
               "threshold": math.nan}
        if label in self.label_names:
            j = self.label_names.index(label)
            y = self.labels[rows, j]
            row.update(count=int((~np.isnan(y)).sum()), positives=int(np.nansum(y)),
                       threshold=float(self.thresholds[j]))
            row["negatives"] = row["count"] - row["positives"]
        for figure in FIGURES:
            self.replicates[key + (label, figure)] = replicates[label][figure]
            low, high = engine.percentile_interval(replicates[label][figure], self.confidence)
            row.update({figure: float(point[figure]), figure + "_low": low,
                        figure + "_high": high})
        return row

    def _mean_point(self, points):
        return {f: float(engine.nanmean_rows(
            np.array([[points[label][f]] for label in self.label_names]))[0])
            for f in FIGURES}

    def overall_rows(self, rng):
        """One row per label over all examples (resampled as one group)."""
        everything = np.arange(len(self.labels))
        points = {}
        for j, label in enumerate(self.label_names):
            known = ~np.isnan(self.labels[:, j])
            points[label] = _figures(self.labels[known, j], self.scores[known, j],
                                     self.decisions[known, j], self.n_bins)
        if MEAN_LABEL in self.summaries:
            points[MEAN_LABEL] = self._mean_point(points)
        if TOP1_LABEL in self.summaries:
            points[TOP1_LABEL] = _top1_point(self.labels, self.scores, self.n_bins)
        replicates = self._replicates(everything, rng)
        return [self._row(everything, label, points[label], replicates, ("overall",))
                for label in self.label_names + self.summaries]

    def group_rows(self, attribute, names, codes, min_group_size, rng):
        """One row per group and label of one attribute, with its status."""
        features = pd.Series(np.asarray(names, dtype=object)[codes], name=attribute)
        points = {}
        for j, label in enumerate(self.label_names):
            known = ~np.isnan(self.labels[:, j])
            points[label] = _point_by_group(
                self.labels[known, j], self.decisions[known, j], self.scores[known, j],
                features[known].reset_index(drop=True), names, self.n_bins)
        out = []
        for g, group in enumerate(names):
            rows = np.flatnonzero(codes == g)
            by_label = {label: points[label].loc[group].to_dict() for label in self.label_names}
            if MEAN_LABEL in self.summaries:
                by_label[MEAN_LABEL] = self._mean_point(by_label)
            if TOP1_LABEL in self.summaries:
                by_label[TOP1_LABEL] = _top1_point(self.labels[rows], self.scores[rows],
                                                   self.n_bins)
            replicates = self._replicates(rows, rng)
            for label in self.label_names + self.summaries:
                row = self._row(rows, label, by_label[label], replicates,
                                ("group", attribute, group))
                row["status"] = "too_small" if row["count"] < min_group_size else "ok"
                out.append({"attribute": attribute, "group": group, **row})
        return out

    def disparity_rows(self, attribute, group_rows):
        """One row per label: disparities over the 'ok' groups, with intervals."""
        out, per_label = [], {}
        for label in self.label_names + self.summaries:
            rows = [r for r in group_rows if r["label"] == label]
            ok = [r for r in rows if r["status"] == "ok"]
            point = {f: np.array([r[f] for r in ok], dtype=float) for f in FIGURES}
            reps = {f: np.array([self.replicates[("group", attribute, r["group"], label, f)]
                                 for r in ok]).reshape(len(ok), self.n_bootstrap)
                    for f in FIGURES}
            values, replicates = _disparities(point), _disparities(reps)
            if label == MEAN_LABEL:
                # A mean of each label's difference, not the difference of means.
                values = {d: engine.nanmean_rows(np.array(
                    [[per_label[k][0][d]] for k in self.label_names]))[0] for d in DISPARITIES}
                replicates = {d: engine.nanmean_rows(np.array(
                    [per_label[k][1][d] for k in self.label_names])) for d in DISPARITIES}
            elif label != TOP1_LABEL:
                per_label[label] = (values, replicates)
            errors, tprs = point["error"], point["tpr"]
            row = {"attribute": attribute, "label": label, "groups_compared": len(ok),
                   "too_small": ", ".join(r["group"] for r in rows if r["status"] != "ok"),
                   "highest_error_group": (ok[int(np.nanargmax(errors))]["group"]
                                           if np.isfinite(errors).any() else None),
                   "lowest_tpr_group": (ok[int(np.nanargmin(tprs))]["group"]
                                        if np.isfinite(tprs).any() else None)}
            for name in DISPARITIES:
                self.replicates[(name, attribute, label)] = replicates[name]
                low, high = engine.percentile_interval(replicates[name], self.confidence)
                row.update({name: float(values[name]), name + "_low": low,
                            name + "_high": high})
            out.append(row)
        return out
