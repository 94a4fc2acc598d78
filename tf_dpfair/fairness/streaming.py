"""What the streaming per-group metrics share: groups, rows, the batch's opening.

`GroupedAUC` (`streaming_auc`) and `GroupedErrorRates` (`streaming_rates`)
keep per-group statistics in one table whose row 0 holds all examples and
then one row per group (`group_rows`), updated by one segment sum per batch.
Both derive from `GroupedMetric`, which validates the group and label names
(`checked_groups`, `checked_label_names`) and opens every `update_state`
the same way (`GroupedMetric._batch`: label mask and group ids;
`GroupedMetric._weights`: the example weights and their check). `nan_mean` and `gap_and_worst` summarise over labels and
groups, NaN-aware.
"""

import math

import keras
import tensorflow as tf

from tf_dpfair.data import batch as batch_lib


def _check_name(kind, name, owner="GroupedAUC"):
    """Raises ValueError unless `name` can be part of a `/`-separated key."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"{owner}: each {kind} name must be a non-empty string without "
            f"'/' (it becomes part of a metric name); got {name!r}.")


def checked_groups(groups, owner):
    """Validates a metric's `groups` argument.

    Args:
        groups: dict attribute -> list of group names (index = group id).
        owner: class name for error messages.

    Returns:
        `(groups, offsets, num_rows)`: the groups as a dict of lists, the
        first statistics row of each attribute (row 0 is all examples; see
        `group_rows`) and the number of rows.

    Raises:
        ValueError: empty or malformed groups, names with '/', duplicates.
    """
    if not isinstance(groups, dict) or not groups:
        raise ValueError(
            f"{owner}: `groups` must be a non-empty dict attribute -> list "
            f"of group names; got {groups!r}.")
    checked, offsets, num_rows = {}, {}, 1
    for attribute, names in groups.items():
        _check_name("attribute", attribute, owner)
        if isinstance(names, str) or not list(names):
            raise ValueError(
                f"{owner}: groups[{attribute!r}] must be a non-empty list "
                f"of group names; got {names!r}.")
        names = list(names)
        for group in names:
            _check_name("group", group, owner)
        if len(set(names)) != len(names):
            raise ValueError(
                f"{owner}: groups[{attribute!r}] has duplicate names: "
                f"{names}.")
        checked[attribute] = names
        offsets[attribute] = num_rows
        num_rows += len(names)
    return checked, offsets, num_rows


def checked_label_names(label_names, owner):
    """Validates label (or class) names; returns them as a list.

    Raises:
        ValueError: empty, with '/', or duplicated names.
    """
    label_names = list(label_names)
    if not label_names:
        raise ValueError(f"{owner}: `label_names` is empty.")
    for label in label_names:
        _check_name("label", label, owner)
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"{owner}: duplicate label names: {label_names}.")
    return label_names


def nan_like(x):
    """A tensor of NaN of the shape and dtype of `x`."""
    return tf.fill(tf.shape(x), tf.constant(math.nan, x.dtype))


def nan_mean(values, axis):
    """Mean over the non-NaN entries along `axis`; NaN where there are none."""
    defined = tf.logical_not(tf.math.is_nan(values))
    total = tf.reduce_sum(tf.where(defined, values, tf.zeros_like(values)), axis)
    count = tf.reduce_sum(tf.cast(defined, values.dtype), axis)
    return tf.where(count > 0, total / tf.maximum(count, 1), nan_like(total))


def gap_and_worst(values):
    """Returns (max - min, min) over the non-NaN entries of 1-D `values`.

    The gap needs two defined groups, the minimum one; else they are NaN.
    """
    defined = tf.logical_not(tf.math.is_nan(values))
    count = tf.reduce_sum(tf.cast(defined, tf.int32))
    inf = tf.constant(math.inf, values.dtype)
    worst = tf.reduce_min(tf.where(defined, values, inf))
    best = tf.reduce_max(tf.where(defined, values, -inf))
    nan = tf.constant(math.nan, values.dtype)
    return (tf.where(count >= 2, best - worst, nan),
            tf.where(count >= 1, worst, nan))


def group_rows(group_names, offsets, groups, live, size, owner):
    """Row of every example in a per-group statistics table, and its checks.

    Row 0 holds all examples; then one row per group, attribute after
    attribute (`offsets[attribute]` is the row of the attribute's group 0),
    so that one segment sum updates every group.

    Args:
        group_names: dict attribute -> list of group names.
        offsets: dict attribute -> first row of that attribute's groups.
        groups: dict attribute -> int ids `[B]` (extra attributes ignored).
        live: bool `[B]`, False for padding rows (weight 0), whose ids may
            be anything.
        size: batch size B (scalar tensor).
        owner: class name for error messages.

    Returns:
        `(rows, checks)`: int32 `[B, 1 + attributes]`, -1 where an id is out
        of range (a segment sum drops it, so a bad id cannot land in another
        attribute's rows even where assertions are compiled out), and the
        assertions to run first.
    """
    rows = [tf.zeros([size], tf.int32)]
    checks = []
    for attribute, names in group_names.items():
        ids = tf.reshape(tf.cast(groups[attribute], tf.int32), [-1])
        checks.append(tf.debugging.assert_equal(
            tf.size(ids), size,
            message=f"{owner}: groups[{attribute!r}] must have one id per example"))
        checked = tf.where(live, ids, tf.zeros_like(ids))
        # No quotes: graph-mode assertion messages print them escaped.
        message = (f"{owner}: group ids of attribute `{attribute}` must lie "
                   f"in [0, {len(names)}) (groups: {', '.join(names)})")
        checks.append(tf.debugging.assert_non_negative(checked, message=message))
        checks.append(tf.debugging.assert_less(checked, len(names), message=message))
        valid = (ids >= 0) & (ids < len(names))
        rows.append(tf.where(valid, ids + offsets[attribute], -1))
    return tf.stack(rows, axis=1), checks


class GroupedMetric(keras.metrics.Metric):
    """Base of the per-group Keras metrics: groups, and the opening of `update_state`.

    Subclasses set `_groups`, `_offsets` and `_num_rows` from
    `checked_groups` in their constructor.
    """

    needs_groups = True

    @property
    def groups(self):
        """dict attribute -> list of group names (index = group id)."""
        return {attribute: list(names) for attribute, names in self._groups.items()}

    def _batch(self, y_true, groups, label_mask):
        """Splits the labels of a batch from their groups and label mask.

        Args:
            y_true, groups, label_mask: as in `update_state`.

        Returns:
            `(y_true, groups, label_mask)`: the labels without their dict,
            the group ids and the label mask (or None).

        Raises:
            ValueError: no group ids, or a configured attribute missing.
        """
        owner = type(self).__name__
        if label_mask is None:
            label_mask = batch_lib.label_mask_of(y_true)
        y_true, label_groups = batch_lib.split_labels(y_true)
        groups = label_groups if groups is None else groups
        if groups is None:
            raise ValueError(
                f"{owner}: no group ids. Pass groups={{attribute: ids}} or "
                "y_true={'label': labels, 'groups': {attribute: ids}}; attributes "
                f"expected: {sorted(self._groups)}.")
        missing = [a for a in self._groups if a not in groups]
        if missing:
            raise ValueError(f"{owner}: group ids missing for attribute(s) {missing}; got "
                             f"attributes {sorted(groups)}.")
        return y_true, groups, label_mask

    def _weights(self, sample_weight, size):
        """`(weights [B], checks)`: ones without `sample_weight`, else checked weights."""
        if sample_weight is None:
            return tf.ones([size], self.dtype), []
        weights = tf.reshape(tf.cast(sample_weight, self.dtype), [-1])
        return weights, [tf.debugging.assert_equal(
            tf.size(weights), size,
            message=f"{type(self).__name__}: sample_weight must have one weight per example")]
