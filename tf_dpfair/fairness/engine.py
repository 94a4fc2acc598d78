"""The engine of per-group evaluation, shared by every metric family.

The families (`auc`, `rates` with `calibration`) differ only in the figure
they compute; everything else lives here:

- input preparation and validation: `prepare_inputs` (labels, scores and
  group memberships as arrays, from arrays or a DataFrame),
  `add_intersections`, `check_settings`;
- the bootstrap within groups: `bootstrap_weights` draws resamples as
  counts, `percentile_interval` turns replicates into an interval, and
  `resample_key` fingerprints what fixes the draws (equal keys: paired
  intervals);
- summaries over groups, NaN-aware: `nanmean_rows` (means over labels),
  `spread` (worst, gap and ratio) and `value_range` (max - min);
- the output tables: `table` adds the `split` and `outside_dp_guarantee`
  columns, and `warn_outside_dp` warns about training data.

Differential privacy: figures computed on training data are outside the
guarantee (`TRAINING_SPLITS`, `OUTSIDE_DP_NOTE`).
"""

import hashlib
import itertools
import math
import numbers
import warnings

import numpy as np
import pandas as pd

MEAN_LABEL = "mean"
INTERSECTION_SEPARATOR = "&"
TRAINING_SPLITS = ("train", "training")
OUTSIDE_DP_NOTE = ("Computed on training data: outside the differential "
                   "privacy guarantee.")

# Bootstrap weights are built in chunks of at most this many entries.
_CHUNK_ENTRIES = 4_000_000


def outside_dp(split):
    """True when figures of `split` are outside the DP guarantee (training data)."""
    return split.lower() in TRAINING_SPLITS


def warn_outside_dp(split, stacklevel=3):
    """Warns when `split` is training data (see `OUTSIDE_DP_NOTE`).

    Args:
        split: where the data came from.
        stacklevel: as `warnings.warn`'s; the default points at the caller of
            the function that calls this one.
    """
    if outside_dp(split):
        warnings.warn(f"Group figures on split {split!r}: {OUTSIDE_DP_NOTE}",
                      stacklevel=stacklevel)


def check_settings(n_bootstrap, confidence, min_group_size, seed, split, n_bins=None):
    """Validates the settings every family's `evaluate` takes.

    Args:
        n_bootstrap, confidence, min_group_size, seed, split: as in
            `auc.evaluate`.
        n_bins: calibration bins (`rates.evaluate`), or None when unused.

    Raises:
        ValueError: a setting of the wrong type or out of range.
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
    if n_bins is not None and (not isinstance(n_bins, int) or n_bins < 1):
        raise ValueError(f"n_bins must be an integer >= 1; got {n_bins!r}.")


def nanmean_rows(values):
    """Mean over axis 0 ignoring NaN; NaN (without a warning) if all are."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=0)
    total = np.where(defined, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def spread(values):
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


def value_range(values):
    """max - min over axis 0 ignoring NaN; NaN with fewer than two defined."""
    values = np.asarray(values, dtype=float)
    defined = ~np.isnan(values)
    high = np.where(defined, values, -np.inf).max(axis=0, initial=-np.inf)
    low = np.where(defined, values, np.inf).min(axis=0, initial=np.inf)
    return np.where(defined.sum(axis=0) >= 2, high - low, np.nan)


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


def table(rows, split, integer_columns=("count", "positives", "negatives")):
    """A result table: `rows` behind the `split` and `outside_dp_guarantee` columns.

    Args:
        rows: list of dicts, one per row.
        split: where the data came from.
        integer_columns: columns shown as nullable integers (NA for the
            labels that have no count, such as the mean label).

    Returns:
        A DataFrame.
    """
    frame = pd.DataFrame(rows)
    frame.insert(0, "outside_dp_guarantee", outside_dp(split))
    frame.insert(0, "split", split)
    for column in integer_columns:
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


def _column(data, name, what):
    if name not in data.columns:
        raise ValueError(f"{what} column {name!r} is not in the DataFrame; columns: "
                         f"{list(data.columns)}.")
    return data[name].to_numpy()


def _from_data(labels, scores, groups, data, label_names):
    """Labels, scores, groups and label names read from the columns of `data`."""
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
    return labels, scores, groups, label_names


def _as_columns(values):
    values = np.asarray(values, dtype=float)
    return values[:, None] if values.ndim == 1 else values


def _checked_labels_and_scores(labels, scores, label_mask):
    """Float labels and scores `[N, L]`, labels NaN where `label_mask` is 0."""
    labels, scores = _as_columns(labels), _as_columns(scores)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same shape, [N] or [N, L]; "
                         f"got {labels.shape} and {scores.shape}.")
    if labels.shape[0] == 0:
        raise ValueError("No examples: labels and scores are empty.")
    if label_mask is not None:
        label_mask = _as_columns(label_mask)
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
    return labels, scores


def _checked_label_names(label_names, num_labels):
    if label_names is None:
        label_names = ["label"] if num_labels == 1 else [f"label_{j}" for j in range(num_labels)]
    label_names = [str(name) for name in label_names]
    if len(label_names) != num_labels or len(set(label_names)) != num_labels:
        raise ValueError(f"label_names must be {num_labels} distinct names; got {label_names}.")
    if num_labels > 1 and MEAN_LABEL in label_names:
        raise ValueError(f"The label name {MEAN_LABEL!r} is reserved for the mean over labels.")
    return label_names


def _group_codes(attribute, values, n, names):
    """(group names, int codes `[n]`) of one attribute's values."""
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(f"groups[{attribute!r}] has shape {values.shape}; expected "
                         f"({n},), one value per example.")
    if pd.isna(values).any():
        raise ValueError(f"groups[{attribute!r}] has missing values.")
    if names is None:
        unique, codes = np.unique(values, return_inverse=True)
        return [str(name) for name in unique], codes
    names = [str(name) for name in names]
    if len(set(names)) != len(names):
        raise ValueError(f"group_names[{attribute!r}] has duplicate names: {names}.")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= len(names):
        raise ValueError(f"group ids of attribute {attribute!r} must be integers in "
                         f"[0, {len(names)}) ({names}).")
    return names, values.astype(np.int64)


def _checked_groups(groups, group_names, n):
    """dict attribute -> (group names list, int codes `[n]`)."""
    if not isinstance(groups, dict) or not groups:
        raise ValueError("groups must be a non-empty dict attribute -> [N] group values "
                         "(or a DataFrame of group columns).")
    group_names = dict(group_names or {})
    unknown = sorted(set(group_names) - set(groups))
    if unknown:
        raise ValueError(f"group_names has unknown attribute(s) {unknown}; attributes: "
                         f"{list(groups)}.")
    return {str(attribute): _group_codes(attribute, values, n, group_names.get(attribute))
            for attribute, values in groups.items()}


def prepare_inputs(labels, scores, groups, data, label_names, group_names, label_mask=None):
    """Validates the inputs of every family's `evaluate`.

    Args:
        labels, scores, groups, data, label_names, group_names, label_mask:
            as in `auc.evaluate`.

    Returns:
        `(labels, scores, label_names, groups)`: float labels and scores
        `[N, L]` (labels that `label_mask` marks unknown come back as NaN),
        the L label names, and a dict attribute -> (group names list, int
        codes `[N]`).

    Raises:
        ValueError: as listed in `auc.evaluate`.
    """
    if data is not None:
        labels, scores, groups, label_names = _from_data(labels, scores, groups, data,
                                                         label_names)
    elif isinstance(groups, pd.DataFrame):
        groups = {c: groups[c].to_numpy() for c in groups.columns}
    labels, scores = _checked_labels_and_scores(labels, scores, label_mask)
    label_names = _checked_label_names(label_names, labels.shape[1])
    return labels, scores, label_names, _checked_groups(groups, group_names, len(labels))


def add_intersections(groups, intersections):
    """Adds attribute 'a&b' whose groups are all combinations 'x&y'.

    Args:
        groups: dict from `prepare_inputs`, updated in place.
        intersections: attribute tuples to cross, as in `auc.evaluate`.

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
