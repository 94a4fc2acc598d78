"""Exact per-group AUC, disparity summaries and bootstrap confidence intervals.

`evaluate_auc` (also named `evaluate`) turns labels, scores and group
memberships into tidy pandas tables (input validation, the bootstrap
within groups and the table layout come from `engine`):

- `groups`: one row per attribute, group and label: count, positives,
  negatives, AUC (scikit-learn, grouped by fairlearn's `MetricFrame`) and a
  bootstrap confidence interval, with a `status` of "ok", "too_small" (fewer
  than `min_group_size` examples: reported, left out of the disparity
  summaries) or "single_class" (AUC undefined: NaN, never 0).
- `disparities`: one row per attribute and label: worst group, max-min gap
  and min/max ratio over the "ok" groups, each with a confidence interval.
- `overall`: one row per label: AUC over all examples with its interval.

For a multi-label model, a label named `MEAN_LABEL` holds the mean AUC over
the labels whose positives and negatives both occur in the group.

Bootstrap: each replicate resamples examples with replacement within each
group of an attribute, so every group keeps its size (small groups never
vanish), and the gap, worst AUC and ratio are computed per replicate. The
interval is the percentile interval over the replicates where the figure is
defined. The same seed on the same labels and groups draws the same
replicates for any scores, which `compare_matched` uses for paired intervals.
The gap is a max - min of noisy estimates, so it is biased upwards when the
groups are alike: its interval never reaches 0 even when the groups are
equal; read it together with the per-group intervals.

Differential privacy: figures computed on training data are outside the DP
guarantee. Every table carries `split` and `outside_dp_guarantee` columns;
`split="train"` sets the latter and warns.
"""

import dataclasses
import math

import fairlearn.metrics
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from tf_dpfair.fairness import engine
# Shared machinery, in `engine` now; kept here under the names it had.
from tf_dpfair.fairness.engine import (  # noqa: F401
    INTERSECTION_SEPARATOR, MEAN_LABEL, OUTSIDE_DP_NOTE, TRAINING_SPLITS, add_intersections,
    bootstrap_weights, percentile_interval, prepare_inputs, resample_key)

_outside_dp = engine.outside_dp
_nanmean_rows = engine.nanmean_rows
_spread = engine.spread


@dataclasses.dataclass(frozen=True, eq=False)
class GroupEvaluation:
    """Result of `evaluate`: tidy tables plus what paired comparisons need.

    Attributes:
        groups: DataFrame, one row per (attribute, group, label).
        disparities: DataFrame, one row per (attribute, label).
        overall: DataFrame, one row per label.
        split: where the data came from ("test", "validation", "train", ...).
        summary_label: the label that summarises the model: the only label,
            or `MEAN_LABEL` for a multi-label model.
        confidence: confidence level of the intervals.
        replicates: bootstrap replicates, keyed `("group", attribute, group,
            label)`, `("worst_auc"|"gap"|"ratio", attribute, label)` and
            `("overall", label)`; arrays of shape `[n_bootstrap]`.
        resample_key: fingerprint of the labels, groups, seed and number of
            replicates; equal keys mean the same resamples were drawn.
    """

    groups: pd.DataFrame
    disparities: pd.DataFrame
    overall: pd.DataFrame
    split: str
    summary_label: str
    confidence: float
    replicates: dict
    resample_key: str

    @property
    def outside_dp_guarantee(self):
        """True when the figures come from training data."""
        return _outside_dp(self.split)

    @property
    def overall_auc(self):
        """Overall AUC of `summary_label`, the figure matched on."""
        return float(self.overall.set_index("label").loc[self.summary_label, "auc"])




def _auc_or_nan(y_true, y_score):
    """scikit-learn's ROC AUC, NaN when only one class is present.

    Entries whose label is NaN (unknown, masked out) are left out.
    """
    y_true = np.asarray(y_true, dtype=float)
    known = ~np.isnan(y_true)
    y_true, y_score = y_true[known], np.asarray(y_score)[known]
    if y_true.size == 0 or y_true.min() == y_true.max():
        return math.nan
    return float(roc_auc_score(y_true, y_score))




def _weighted_aucs(labels, scores, weights):
    """ROC AUC of one sample under many weightings (ties count one half).

    Args:
        labels: `[n]` 0/1.
        scores: `[n]`.
        weights: `[b, n]`, e.g. bootstrap counts.

    Returns:
        `[b]` AUCs, NaN where a weighting leaves no positive or no negative.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    positive = labels[order] == 1
    # Tied scores share a block; a positive beats the negative weight in
    # lower blocks and half of that in its own block.
    block = np.cumsum(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    neg_block, pos_block = block[~positive], block[positive]
    below = np.searchsorted(neg_block, pos_block, side="left")
    up_to = np.searchsorted(neg_block, pos_block, side="right")
    pos_weights = weights[:, order[positive]]
    neg_cumsum = np.zeros((len(weights), len(neg_block) + 1))
    np.cumsum(weights[:, order[~positive]], axis=1, out=neg_cumsum[:, 1:])
    wins = (pos_weights * (neg_cumsum[:, below] + neg_cumsum[:, up_to])).sum(axis=1) / 2
    total_pos = pos_weights.sum(axis=1)
    total_neg = neg_cumsum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = wins / (total_pos * total_neg)
    auc[(total_pos == 0) | (total_neg == 0)] = np.nan
    return auc




def _bootstrap_aucs(labels, scores, rows, n_bootstrap, rng):
    """AUC replicates `[L, n_bootstrap]` of the examples `rows`, resampled."""
    num_labels = labels.shape[1]
    out = np.full((num_labels, n_bootstrap), np.nan)
    n = len(rows)
    if n == 0:
        return out
    for start, weights in bootstrap_weights(n, n_bootstrap, rng):
        b = len(weights)
        for j in range(num_labels):
            known = ~np.isnan(labels[rows, j])  # masked-out labels drop out
            out[j, start:start + b] = _weighted_aucs(
                labels[rows, j][known], scores[rows, j][known], weights[:, known])
    return out










def _group_aucs(labels, scores, label_names, names, codes, attribute):
    """AUC per group (rows, in `names` order) and label (columns).

    Grouping is fairlearn's `MetricFrame`; groups absent from the data get
    NaN rather than vanishing.
    """
    features = pd.Series(np.asarray(names, dtype=object)[codes], name=attribute)
    columns = {}
    for j, label in enumerate(label_names):
        frame = fairlearn.metrics.MetricFrame(
            metrics=_auc_or_nan, y_true=labels[:, j], y_pred=scores[:, j],
            sensitive_features=features)
        columns[label] = frame.by_group.reindex(names).astype(float)
    return pd.DataFrame(columns)


def _with_mean(aucs, replicates, multi):
    """For a multi-label model, appends the mean over defined labels."""
    if not multi:
        return list(aucs), replicates
    mean = _nanmean_rows(np.array(aucs, dtype=float)[:, None])[0]
    return list(aucs) + [float(mean)], np.vstack([replicates, _nanmean_rows(replicates)])


def _counts(labels, rows, j):
    """Count, positives and negatives of label j (NA for the mean label).

    The count is of the examples whose label j is known (not masked out).
    """
    if j >= labels.shape[1]:
        return {"count": len(rows), "positives": pd.NA, "negatives": pd.NA}
    values = labels[rows, j]
    count = int((~np.isnan(values)).sum())
    positives = int(np.nansum(values))
    return {"count": count, "positives": positives, "negatives": count - positives}


def _bounds(replicates, confidence):
    low, high = percentile_interval(replicates, confidence)
    return {"auc_low": low, "auc_high": high}


def _status(count, auc, min_group_size):
    if count < min_group_size:
        return "too_small"
    return "single_class" if math.isnan(auc) else "ok"




def _disparity_row(attribute, label, group_rows, replicates, n_bootstrap, confidence):
    """Worst group, gap and ratio over the 'ok' groups, with intervals."""
    ok = [r for r in group_rows if r["status"] == "ok"]
    values = np.array([r["auc"] for r in ok], dtype=float)
    reps = np.array([replicates[("group", attribute, r["group"], label)] for r in ok],
                    dtype=float).reshape(len(ok), n_bootstrap)
    row = {"attribute": attribute, "label": label, "groups_compared": len(ok),
           "too_small": ", ".join(r["group"] for r in group_rows if r["status"] == "too_small"),
           "worst_group": ok[int(np.argmin(values))]["group"] if ok else None,
           "best_group": ok[int(np.argmax(values))]["group"] if ok else None}
    points = _spread(values[:, None])
    for name, point, replicate in zip(("worst_auc", "gap", "ratio"), points, _spread(reps)):
        replicates[(name, attribute, label)] = replicate
        row[name] = float(point[0])
        row[name + "_low"], row[name + "_high"] = percentile_interval(replicate, confidence)
    return row


def evaluate_auc(labels, scores, groups, *, data=None, label_names=None, group_names=None,
             intersections=(), min_group_size=30, n_bootstrap=1000, confidence=0.95,
             seed=0, split="test", label_mask=None):
    """Exact per-group AUC and disparities with bootstrap confidence intervals.

    Args:
        labels: `[N]` or `[N, L]` 0/1 labels; with `data`, a column name or a
            list of L column names.
        scores: scores of the same shape (probabilities or logits: only their
            order matters); with `data`, column name(s).
        groups: dict attribute -> `[N]` group values (ids or names), or a
            DataFrame of group columns; with `data`, a list of column names.
        data: optional DataFrame holding the columns named above.
        label_names: names of the L labels (default: the column names, or
            "label" / "label_<j>").
        group_names: optional dict attribute -> list of names for integer
            ids (index = id), as in `streaming_auc.GroupedAUC`; named groups absent
            from the data are reported with count 0.
        intersections: attribute tuples to cross, e.g. `[("sex", "age")]`;
            each adds the attribute "sex&age" with groups like "female&<40".
        min_group_size: groups with fewer examples get status "too_small":
            reported, but left out of the disparity summaries.
        n_bootstrap: bootstrap replicates (0: no intervals, NaN bounds).
        confidence: confidence level of the intervals, in (0, 1).
        seed: seed of the bootstrap draws.
        split: where the data came from. "train" (or "training") marks every
            table as outside the DP guarantee and warns.
        label_mask: optional 0/1 array of the labels' shape; 0 marks a label
            as unknown (e.g. CheXpert's uncertain labels under the "ignore"
            policy). An unknown label is left out of that label's AUC, its
            intervals and its counts, as it is left out of the training loss.

    Returns:
        A `GroupEvaluation`.

    Raises:
        ValueError: mismatched shapes or lengths, labels other than 0/1 (or a
            label_mask that is not 0/1 of their shape),
            NaN or infinite scores, missing or unknown columns, attributes or
            group ids, reserved or duplicate names, bad settings.
    """
    engine.check_settings(n_bootstrap, confidence, min_group_size, seed, split)
    engine.warn_outside_dp(split)
    labels, scores, label_names, groups = prepare_inputs(
        labels, scores, groups, data, label_names, group_names, label_mask)
    add_intersections(groups, intersections)
    multi = len(label_names) > 1
    context = _Context(labels, scores, label_names, n_bootstrap, confidence)
    overall_rows = context.overall_rows(np.random.default_rng([seed, 0]))
    group_rows, disparity_rows = [], []
    for a, (attribute, (names, codes)) in enumerate(groups.items()):
        rows_by_label = context.group_rows(attribute, names, codes, min_group_size,
                                           np.random.default_rng([seed, a + 1]))
        for label, rows in rows_by_label.items():
            group_rows.extend(rows)
            disparity_rows.append(_disparity_row(
                attribute, label, rows, context.replicates, n_bootstrap, confidence))
    return GroupEvaluation(
        groups=engine.table(group_rows, split), disparities=engine.table(disparity_rows, split),
        overall=engine.table(overall_rows, split), split=split,
        summary_label=MEAN_LABEL if multi else label_names[0],
        confidence=confidence, replicates=context.replicates,
        resample_key=resample_key(labels, groups, seed, n_bootstrap))


# The name this function had; `evaluate_auc` says which family it computes.
evaluate = evaluate_auc


class _Context:
    """The data of one AUC evaluation, and the replicates drawn so far."""

    def __init__(self, labels, scores, label_names, n_bootstrap, confidence):
        self.labels, self.scores, self.label_names = labels, scores, label_names
        self.multi = len(label_names) > 1
        self.all_labels = label_names + ([MEAN_LABEL] if self.multi else [])
        self.n_bootstrap, self.confidence = n_bootstrap, confidence
        self.replicates = {}

    def overall_rows(self, rng):
        """One row per label over all examples (resampled as one group)."""
        everything = np.arange(len(self.labels))
        reps = _bootstrap_aucs(self.labels, self.scores, everything, self.n_bootstrap, rng)
        aucs = [_auc_or_nan(self.labels[:, j], self.scores[:, j])
                for j in range(len(self.label_names))]
        aucs, reps = _with_mean(aucs, reps, self.multi)
        rows = []
        for j, label in enumerate(self.all_labels):
            self.replicates[("overall", label)] = reps[j]
            rows.append({"label": label, **_counts(self.labels, everything, j),
                         "auc": aucs[j], **_bounds(reps[j], self.confidence)})
        return rows

    def group_rows(self, attribute, names, codes, min_group_size, rng):
        """dict label -> one row per group of `attribute`, with its status."""
        group_aucs = _group_aucs(self.labels, self.scores, self.label_names, names, codes,
                                 attribute)
        rows_by_label = {label: [] for label in self.all_labels}
        for g, group in enumerate(names):
            rows = np.flatnonzero(codes == g)
            reps = _bootstrap_aucs(self.labels, self.scores, rows, self.n_bootstrap, rng)
            aucs, reps = _with_mean(group_aucs.loc[group].tolist(), reps, self.multi)
            for j, label in enumerate(self.all_labels):
                self.replicates[("group", attribute, group, label)] = reps[j]
                counts = _counts(self.labels, rows, j)
                rows_by_label[label].append({
                    "attribute": attribute, "group": group, "label": label, **counts,
                    "auc": aucs[j], **_bounds(reps[j], self.confidence),
                    "status": _status(counts["count"], aucs[j], min_group_size)})
        return rows_by_label
