"""Exact per-group AUC, disparity summaries and bootstrap confidence intervals.

`evaluate` turns labels, scores and group memberships into tidy pandas tables:

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
import hashlib
import itertools
import math
import numbers
import warnings

import fairlearn.metrics
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

MEAN_LABEL = "mean"
INTERSECTION_SEPARATOR = "&"
TRAINING_SPLITS = ("train", "training")
OUTSIDE_DP_NOTE = ("Computed on training data: outside the differential "
                   "privacy guarantee.")

# Bootstrap weights are built in chunks of at most this many entries.
_CHUNK_ENTRIES = 4_000_000


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


def _outside_dp(split):
    return split.lower() in TRAINING_SPLITS


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


def _nanmean_rows(values):
    """Mean over axis 0 ignoring NaN; NaN (without a warning) if all are."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=0)
    total = np.where(defined, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


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


def bootstrap_weights(n, n_bootstrap, rng):
    """Yields bootstrap resamples of n examples as counts, chunk by chunk.

    Each replicate draws n examples with replacement; its weights are how
    often each example was drawn. Chunks bound the memory to about
    `_CHUNK_ENTRIES` floats.

    Args:
        n: number of examples (> 0).
        n_bootstrap: number of replicates.
        rng: `numpy.random.Generator`; the draws consume it in order, so the
            same generator state gives the same resamples.

    Yields:
        `(start, weights)`: the index of the chunk's first replicate and
        float weights `[b, n]`.
    """
    chunk = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n, size=(b, n))
        flat = (np.arange(b)[:, None] * n + draws).ravel()
        yield start, np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


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


def percentile_interval(replicates, confidence):
    """Percentile bootstrap interval, ignoring undefined (NaN) replicates.

    Args:
        replicates: 1-D array of bootstrap values.
        confidence: confidence level in (0, 1), e.g. 0.95.

    Returns:
        `(low, high)`: the (1 - confidence) / 2 and (1 + confidence) / 2
        quantiles; NaNs when no replicate is defined.
    """
    replicates = np.asarray(replicates, dtype=float)
    replicates = replicates[~np.isnan(replicates)]
    if replicates.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _column(data, name, what):
    if name not in data.columns:
        raise ValueError(f"{what} column {name!r} is not in the DataFrame; columns: "
                         f"{list(data.columns)}.")
    return data[name].to_numpy()


def prepare_inputs(labels, scores, groups, data, label_names, group_names, label_mask=None):
    """Validates the inputs of `evaluate` (and of `error_rates.evaluate`).

    Args:
        labels, scores, groups, data, label_names, group_names, label_mask:
            as in `evaluate`.

    Returns:
        `(labels, scores, label_names, groups)`: float labels and scores
        `[N, L]` (labels that `label_mask` marks unknown come back as NaN),
        the L label names, and a dict attribute -> (group names list, int
        codes `[N]`).

    Raises:
        ValueError: as listed in `evaluate`.
    """
    if data is not None:
        if not isinstance(data, pd.DataFrame):
            raise ValueError(f"`data` must be a pandas DataFrame; got {type(data).__name__}.")
        label_cols = [labels] if isinstance(labels, str) else list(labels)
        score_cols = [scores] if isinstance(scores, str) else list(scores)
        if label_names is None:
            label_names = label_cols
        labels = np.stack([_column(data, c, "label") for c in label_cols], axis=1)
        scores = np.stack([_column(data, c, "score") for c in score_cols], axis=1)
        group_cols = [groups] if isinstance(groups, str) else list(groups)
        groups = {c: _column(data, c, "group") for c in group_cols}
    elif isinstance(groups, pd.DataFrame):
        groups = {c: groups[c].to_numpy() for c in groups.columns}
    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, [N] or [N, L]; "
                         f"got {labels.shape} and {scores.shape}.")
    n, num_labels = labels.shape
    if n == 0:
        raise ValueError("No examples: labels and scores are empty.")
    if label_mask is not None:
        label_mask = np.asarray(label_mask, dtype=float)
        if label_mask.ndim == 1:
            label_mask = label_mask[:, None]
        if label_mask.shape != labels.shape or not np.all(np.isin(label_mask, (0.0, 1.0))):
            raise ValueError(f"label_mask must be 0/1 of the labels' shape {labels.shape}; "
                             f"got shape {label_mask.shape}.")
        labels = np.where(label_mask == 1, labels, np.nan)
    known = np.ones(labels.shape, bool) if label_mask is None else label_mask == 1
    if not np.all(np.isin(labels[known], (0.0, 1.0))):
        bad = labels[known][~np.isin(labels[known], (0.0, 1.0))]
        raise ValueError("labels must be 0 or 1 (NaN, -1 or soft labels are not "
                         "supported; mark unknown labels with label_mask); got values "
                         f"{np.unique(bad)[:5]}.")
    if not np.all(np.isfinite(scores)):
        bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
        raise ValueError(f"scores contain NaN or infinite values ({bad.size} rows, "
                         f"first at row {bad[0]}).")
    if label_names is None:
        label_names = ["label"] if num_labels == 1 else [f"label_{j}" for j in range(num_labels)]
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_labels or len(set(label_names)) != num_labels:
        raise ValueError(f"label_names must be {num_labels} distinct names; got {label_names}.")
    if num_labels > 1 and MEAN_LABEL in label_names:
        raise ValueError(f"The label name {MEAN_LABEL!r} is reserved for the mean over labels.")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("groups must be a non-empty dict attribute -> [N] group values "
                         "(or a DataFrame of group columns).")
    group_names = dict(group_names or {})
    unknown = sorted(set(group_names) - set(groups))
    if unknown:
        raise ValueError(f"group_names has unknown attribute(s) {unknown}; attributes: "
                         f"{list(groups)}.")
    prepared = {}
    for attribute, values in groups.items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"groups[{attribute!r}] has shape {values.shape}; expected "
                             f"({n},), one value per example.")
        if pd.isna(values).any():
            raise ValueError(f"groups[{attribute!r}] has missing values.")
        if attribute in group_names:
            names = [str(name) for name in group_names[attribute]]
            if len(set(names)) != len(names):
                raise ValueError(f"group_names[{attribute!r}] has duplicate names: {names}.")
            if values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= len(names):
                raise ValueError(f"group ids of attribute {attribute!r} must be integers in "
                                 f"[0, {len(names)}) ({names}).")
            codes = values.astype(np.int64)
        else:
            unique, codes = np.unique(values, return_inverse=True)
            names = [str(name) for name in unique]
        prepared[str(attribute)] = (names, codes)
    return labels, scores, label_names, prepared


def add_intersections(groups, intersections):
    """Adds attribute 'a&b' whose groups are all combinations 'x&y'.

    Args:
        groups: dict from `prepare_inputs`, updated in place.
        intersections: attribute tuples to cross, as in `evaluate`.

    Raises:
        ValueError: an intersection of fewer than two known attributes.
    """
    for combo in intersections:
        combo = [combo] if isinstance(combo, str) else list(combo)
        unknown = [a for a in combo if a not in groups]
        if unknown or len(combo) < 2:
            raise ValueError(f"An intersection needs two or more known attributes; got "
                             f"{combo} (known: {list(groups)}).")
        names = [INTERSECTION_SEPARATOR.join(p)
                 for p in itertools.product(*(groups[a][0] for a in combo))]
        codes = np.zeros_like(groups[combo[0]][1])
        for attribute in combo:
            codes = codes * len(groups[attribute][0]) + groups[attribute][1]
        groups[INTERSECTION_SEPARATOR.join(combo)] = (names, codes)


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


def _spread(values):
    """(min, max - min, min / max) per column of `[groups, k]`, NaN ignored.

    The gap and ratio need two defined groups, the minimum one.
    """
    defined = ~np.isnan(values)
    count = defined.sum(axis=0)
    # The infinite row keeps the reductions defined when there is no group.
    low = np.vstack([np.where(defined, values, np.inf), np.full(values.shape[1], np.inf)])
    high = np.vstack([np.where(defined, values, -np.inf), np.full(values.shape[1], -np.inf)])
    low, high = low.min(axis=0), high.max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(count >= 1, low, np.nan),
                np.where(count >= 2, high - low, np.nan),
                np.where(count >= 2, low / high, np.nan))


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


def evaluate(labels, scores, groups, *, data=None, label_names=None, group_names=None,
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
            ids (index = id), as in `metrics.GroupedAUC`; named groups absent
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
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'test'; got {split!r}.")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0; got {n_bootstrap!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}.")
    if not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"min_group_size must be an integer >= 1; got {min_group_size!r}.")
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}.")
    if _outside_dp(split):
        warnings.warn(f"Group figures on split {split!r}: {OUTSIDE_DP_NOTE}", stacklevel=2)
    labels, scores, label_names, groups = prepare_inputs(
        labels, scores, groups, data, label_names, group_names, label_mask)
    add_intersections(groups, intersections)
    multi = len(label_names) > 1
    summary_label = MEAN_LABEL if multi else label_names[0]
    all_labels = label_names + ([MEAN_LABEL] if multi else [])
    replicates = {}

    rng = np.random.default_rng([seed, 0])
    reps = _bootstrap_aucs(labels, scores, np.arange(len(labels)), n_bootstrap, rng)
    aucs = [_auc_or_nan(labels[:, j], scores[:, j]) for j in range(len(label_names))]
    aucs, reps = _with_mean(aucs, reps, multi)
    overall_rows = []
    for j, label in enumerate(all_labels):
        replicates[("overall", label)] = reps[j]
        overall_rows.append({"label": label, **_counts(labels, np.arange(len(labels)), j),
                             "auc": aucs[j], **_bounds(reps[j], confidence)})

    group_rows, disparity_rows = [], []
    for a, (attribute, (names, codes)) in enumerate(groups.items()):
        group_aucs = _group_aucs(labels, scores, label_names, names, codes, attribute)
        rng = np.random.default_rng([seed, a + 1])
        rows_by_label = {label: [] for label in all_labels}
        for g, group in enumerate(names):
            rows = np.flatnonzero(codes == g)
            reps = _bootstrap_aucs(labels, scores, rows, n_bootstrap, rng)
            aucs = group_aucs.loc[group].tolist()
            aucs, reps = _with_mean(aucs, reps, multi)
            for j, label in enumerate(all_labels):
                replicates[("group", attribute, group, label)] = reps[j]
                counts = _counts(labels, rows, j)
                rows_by_label[label].append({
                    "attribute": attribute, "group": group, "label": label, **counts,
                    "auc": aucs[j], **_bounds(reps[j], confidence),
                    "status": _status(counts["count"], aucs[j], min_group_size)})
        for label in all_labels:
            group_rows.extend(rows_by_label[label])
            disparity_rows.append(_disparity_row(
                attribute, label, rows_by_label[label], replicates, n_bootstrap, confidence))

    def table(rows):
        frame = pd.DataFrame(rows)
        frame.insert(0, "outside_dp_guarantee", _outside_dp(split))
        frame.insert(0, "split", split)
        for column in ("count", "positives", "negatives"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        return frame

    return GroupEvaluation(
        groups=table(group_rows), disparities=table(disparity_rows),
        overall=table(overall_rows), split=split, summary_label=summary_label,
        confidence=confidence, replicates=replicates,
        resample_key=resample_key(labels, groups, seed, n_bootstrap))


def resample_key(labels, groups, seed, n_bootstrap):
    """Fingerprint of what fixes the bootstrap draws of an evaluation.

    Args:
        labels: float labels `[N, L]` (NaN where unknown).
        groups: dict attribute -> (names, codes), as from `prepare_inputs`.
        seed: bootstrap seed.
        n_bootstrap: number of replicates.

    Returns:
        A hex string; two evaluations with equal keys drew the same resamples.
    """
    key = hashlib.sha256(repr((seed, n_bootstrap)).encode())
    key.update(np.ascontiguousarray(labels).tobytes())
    for attribute, (names, codes) in groups.items():
        key.update(repr((attribute, names)).encode())
        key.update(codes.astype(np.int64).tobytes())
    return key.hexdigest()
