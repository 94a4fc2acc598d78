"""Streaming per-group ROC AUC as a Keras metric, for `fit` and `evaluate`.

`GroupedAUC` keeps, for every group of every attribute (and for every label
of a multi-label model), a histogram of positive and negative example weight
over the score buckets of `keras.metrics.AUC`. The true/false positive and
negative counts at each threshold are cumulative sums of these histograms, so
the AUC of a group is exactly what `keras.metrics.AUC` (ROC curve,
'interpolation' summation, the same thresholds) reports on that group's
examples. Histograms are additive, so the metric variables use SUM
aggregation and add up correctly across `tf.distribute` replicas.

Result names (all scalars, ready for the progress bar, CSV logger and
TensorBoard):

- `auc`: overall AUC.
- `auc/<attribute>/<group>`: AUC of one group.
- `auc_gap/<attribute>`: largest minus smallest group AUC, over the groups
  where the AUC is defined (NaN with fewer than two).
- `auc_worst/<attribute>`: smallest defined group AUC.

For a multi-label model, the names above hold the mean over labels (per
group: over the labels whose positives and negatives both occur in that
group), and each label also gets `auc/<label>`,
`auc/<label>/<attribute>/<group>`, `auc_gap/<label>/<attribute>` and
`auc_worst/<label>/<attribute>`.

An AUC with no positive or no negative example behind it is NaN (Keras's own
AUC reports 0 there).

Group figures computed on training data are outside the differential privacy
guarantee; attach this metric to held-out data (`validation_data`,
`evaluate`), not to training batches.
"""

import keras
import tensorflow as tf

from tf_dpfair.fairness import streaming
# Shared with `streaming_rates`, in `streaming` now; kept here under the
# names they had.
from tf_dpfair.fairness.streaming import checked_groups, checked_label_names, group_rows  # noqa: F401

_check_name = streaming._check_name
_nan_like = streaming.nan_like
_nan_mean = streaming.nan_mean
_gap_and_worst = streaming.gap_and_worst

# Measured on sigmoid scores of normal logits (prevalence 1-50%, scores as
# crowded as a mean logit of -6): the largest gap to the exact AUC was 0.0046
# with 1000 thresholds and 0.0009 with 2000.
DEFAULT_NUM_THRESHOLDS = 2000


@keras.saving.register_keras_serializable(package="tf_dpfair")
class GroupedAUC(streaming.GroupedMetric):
    """ROC AUC overall and per demographic group, streamed over batches.

    Models that know about groups (`needs_groups = True`) call
    `update_state(y_true, y_pred, sample_weight, groups=...)` with the group
    ids split off the labels; a user may instead pass `y_true` in the dict
    form of `tf_dpfair.data.batch` (`{"label": ..., "groups": {...}}`).

    Example (female examples ranked perfectly, male ones in reverse):

    >>> metric = GroupedAUC({"sex": ["female", "male"]})
    >>> metric.update_state([0., 1., 0., 1.], [0.1, 0.9, 0.8, 0.2],
    ...                     groups={"sex": [0, 0, 1, 1]})
    >>> result = metric.result()
    >>> float(result["auc/sex/female"]), float(result["auc/sex/male"])
    (1.0, 0.0)
    >>> float(result["auc_gap/sex"])
    1.0

    See the module docstring for the result names.
    """

    def __init__(self, groups, label_names=None,
                 num_thresholds=DEFAULT_NUM_THRESHOLDS, from_logits=False,
                 multi_label=None, include_counts=False, name="grouped_auc",
                 dtype=None):
        """Creates the metric and its histogram variables.

        Args:
            groups: dict attribute -> list of group names; the position of a
                name is the group id used in the data (e.g.
                `{"sex": ["female", "male"], "age": ["<40", "40-60", ">60"]}`).
            label_names: for a multi-label model, the names of the L labels
                (columns of `y_true` and `y_pred`), e.g. 5 pathologies.
            num_thresholds: number of evenly spaced thresholds in [0, 1],
                as in `keras.metrics.AUC` (> 1).
            from_logits: whether `y_pred` holds logits (a sigmoid is applied).
            multi_label: whether `y_true`/`y_pred` are `[B, L]` independent
                binary labels. Defaults to `label_names is not None`; True
                requires `label_names`.
            include_counts: also report the example, positive and negative
                weight per group in `result()` (see `counts`).
            name: metric name.
            dtype: dtype of the histograms (default float32).

        Raises:
            ValueError: empty or malformed `groups`, names with '/',
                duplicates, `multi_label` inconsistent with `label_names`, or
                `num_thresholds` < 2.
        """
        super().__init__(name=name, dtype=dtype)
        self._groups, self._offsets, self._num_rows = checked_groups(groups, "GroupedAUC")
        if multi_label is None:
            multi_label = label_names is not None
        if multi_label and label_names is None:
            raise ValueError(
                "GroupedAUC: multi_label=True needs `label_names` (one name per "
                "column of y_true and y_pred).")
        if not multi_label and label_names is not None:
            raise ValueError(
                "GroupedAUC: `label_names` is only for multi_label=True; got "
                f"label_names={label_names!r} with multi_label=False.")
        if label_names is not None:
            label_names = checked_label_names(label_names, "GroupedAUC")
        if not isinstance(num_thresholds, int) or num_thresholds < 2:
            raise ValueError(
                "GroupedAUC: `num_thresholds` must be an integer > 1; got "
                f"{num_thresholds!r}.")
        self.label_names = label_names
        self.multi_label = bool(multi_label)
        self.num_thresholds = num_thresholds
        self.from_logits = bool(from_logits)
        self.include_counts = bool(include_counts)
        self._num_labels = len(label_names) if label_names else 1

        # Row 0 of the histograms holds all examples, then one row per group
        # (`group_rows`), so one segment sum updates them all.
        num_rows = self._num_rows
        shape = (num_rows, num_thresholds, self._num_labels)
        self.positives = self.add_variable(
            shape=shape, initializer="zeros", aggregation="sum",
            name="positives")
        self.negatives = self.add_variable(
            shape=shape, initializer="zeros", aggregation="sum",
            name="negatives")

    def _as_matrix(self, values, what):
        """Casts labels or scores to `[B, L]`, checking the static shape."""
        values = tf.convert_to_tensor(values)
        rank = values.shape.rank
        num_labels = self._num_labels
        if self.multi_label:
            ok = rank == 2 and values.shape[-1] in (None, num_labels)
        else:
            ok = rank in (None, 0, 1) or (rank == 2 and values.shape[-1] in (None, 1))
            ok = ok and rank != 0
        if not ok:
            expected = f"[B, {num_labels}]" if self.multi_label else "[B] or [B, 1]"
            raise ValueError(
                f"GroupedAUC: {what} must have shape {expected}; got shape "
                f"{values.shape}.")
        return tf.reshape(tf.cast(values, self.dtype), [-1, num_labels])

    def _histogram_index(self, rows, scores):
        """Flat histogram entry `[B, rows, L]` of each example, row and label; -1 drops it."""
        num_thresholds = self.num_thresholds
        num_labels = self._num_labels
        # The bucketing of keras.metrics.AUC with evenly spaced thresholds: a
        # score counts at threshold i when it is strictly above it, and the
        # -epsilon / 1+epsilon end thresholds take every score / none.
        scores = tf.clip_by_value(scores, 0.0, 1.0)
        buckets = tf.cast(tf.math.ceil(scores * (num_thresholds - 1)) - 1, tf.int32)
        buckets = tf.clip_by_value(buckets, 0, num_thresholds - 1)
        index = ((rows[:, :, None] * num_thresholds + buckets[:, None, :]) * num_labels
                 + tf.range(num_labels)[None, None, :])  # [B, rows, L]
        return tf.where(rows[:, :, None] >= 0, index, -1)

    def update_state(self, y_true, y_pred, sample_weight=None, groups=None,
                     label_mask=None):
        """Adds a batch to the per-group histograms.

        Args:
            y_true: labels, `[B]` or `[B, 1]` (binary) or `[B, L]`
                (multi-label); nonzero means positive, as in
                `keras.metrics.AUC`. May also be the dict
                `{"label": labels, "groups": {...}}` of `tf_dpfair.data.batch`.
            y_pred: scores of the same shape: probabilities in [0, 1] (values
                outside are clipped) or, with `from_logits`, logits.
            sample_weight: optional float `[B]`; rows of weight 0 (padding)
                are ignored, ids included.
            groups: dict attribute -> int `[B]` group ids; required unless
                `y_true` carries them. Extra attributes are ignored.
            label_mask: optional `[B, L]` (or `[B]`) 0/1: 0 marks a label as
                unknown, and that entry counts in no AUC (it is left out of
                the training loss too). Taken from `y_true["label_mask"]`
                when not given.

        Raises:
            ValueError: no group ids, a configured attribute missing, or
                labels/scores of the wrong shape.
            tf.errors.InvalidArgumentError: (when the batch runs) a group id
                outside `[0, number of groups)` on a row of nonzero weight,
                ids or weights not one per example, or non-finite scores.
                Under XLA (`jit_compile=True`) TensorFlow drops assertions;
                rows with out-of-range ids then count only in the overall
                AUC, never in another group.
        """
        y_true, groups, label_mask = self._batch(y_true, groups, label_mask)
        labels = self._as_matrix(y_true, "y_true")
        scores = self._as_matrix(y_pred, "y_pred")
        if self.from_logits:
            scores = tf.sigmoid(scores)
        size = tf.shape(scores)[0]
        weights, checks = self._weights(sample_weight, size)
        checks += [
            tf.debugging.assert_equal(
                tf.shape(labels)[0], size,
                message="GroupedAUC: y_true and y_pred have different batch sizes"),
            tf.debugging.assert_all_finite(
                scores, "GroupedAUC: y_pred contains NaN or Inf"),
        ]
        rows, row_checks = group_rows(self._groups, self._offsets, groups, weights != 0,
                                      size, "GroupedAUC")
        with tf.control_dependencies(checks + row_checks):
            rows = tf.identity(rows)  # [B, 1 + attributes]
        index = self._histogram_index(rows, scores)  # [B, rows, L]
        num_thresholds, num_labels = self.num_thresholds, self._num_labels
        positive = tf.cast(labels != 0, self.dtype)
        known = (tf.ones_like(positive) if label_mask is None
                 else tf.reshape(tf.cast(label_mask, self.dtype), tf.shape(positive)))
        shape = tf.shape(index)
        segments = self._num_rows * num_thresholds * num_labels
        variable_shape = (self._num_rows, num_thresholds, num_labels)
        for variable, label_weight in ((self.positives, positive * known),
                                       (self.negatives, (1.0 - positive) * known)):
            data = tf.broadcast_to((weights[:, None] * label_weight)[:, None, :], shape)
            histogram = tf.math.unsorted_segment_sum(data, index, segments)
            variable.assign_add(tf.reshape(histogram, variable_shape))

    def _row_aucs(self):
        """Returns (auc [rows, L], positives [rows, L], negatives [rows, L])."""
        positives = tf.convert_to_tensor(self.positives.value)
        negatives = tf.convert_to_tensor(self.negatives.value)
        tp = tf.math.cumsum(positives, axis=1, reverse=True)
        fp = tf.math.cumsum(negatives, axis=1, reverse=True)
        total_pos = tp[:, 0, :]
        total_neg = fp[:, 0, :]
        tpr = tf.math.divide_no_nan(tp, total_pos[:, None, :])
        fpr = tf.math.divide_no_nan(fp, total_neg[:, None, :])
        heights = (tpr[:, :-1, :] + tpr[:, 1:, :]) / 2.0
        auc = tf.reduce_sum((fpr[:, :-1, :] - fpr[:, 1:, :]) * heights, axis=1)
        defined = (total_pos > 0) & (total_neg > 0)
        return tf.where(defined, auc, _nan_like(auc)), total_pos, total_neg

    def _add_summaries(self, out, prefix, values):
        """Adds per-group AUCs and gap/worst per attribute of one row vector."""
        out["auc" + prefix] = values[0]
        for attribute, names in self._groups.items():
            start = self._offsets[attribute]
            group_values = values[start:start + len(names)]
            for i, group in enumerate(names):
                out[f"auc{prefix}/{attribute}/{group}"] = group_values[i]
            gap, worst = _gap_and_worst(group_values)
            out[f"auc_gap{prefix}/{attribute}"] = gap
            out[f"auc_worst{prefix}/{attribute}"] = worst

    def result(self):
        """Returns a flat dict name -> scalar tensor (see module docstring)."""
        auc, total_pos, total_neg = self._row_aucs()
        out = {}
        self._add_summaries(out, "", _nan_mean(auc, axis=1))
        if self.multi_label:
            for j, label in enumerate(self.label_names):
                self._add_summaries(out, "/" + label, auc[:, j])
        if self.include_counts:
            out.update(self._counts(total_pos, total_neg))
        return out

    def _counts(self, total_pos, total_neg):
        out = {}
        prefixes = [("", 0)]
        if self.multi_label:
            prefixes = [("/" + label, j) for j, label in enumerate(self.label_names)]
        count = total_pos[:, 0] + total_neg[:, 0]
        out["count"] = count[0]
        for attribute, names in self._groups.items():
            for i, group in enumerate(names):
                out[f"count/{attribute}/{group}"] = count[self._offsets[attribute] + i]
        for prefix, j in prefixes:
            for kind, totals in (("positives", total_pos), ("negatives", total_neg)):
                out[kind + prefix] = totals[0, j]
                for attribute, names in self._groups.items():
                    for i, group in enumerate(names):
                        row = self._offsets[attribute] + i
                        out[f"{kind}{prefix}/{attribute}/{group}"] = totals[row, j]
        return out

    def counts(self):
        """Returns the accumulated example weight per group.

        Returns:
            A flat dict of scalar tensors: `count` and `count/<attr>/<group>`
            (total weight), `positives[/<label>]/<attr>/<group>` and
            `negatives[/<label>]/<attr>/<group>` (the label part only for
            multi-label), plus the overall `positives[/<label>]` and
            `negatives[/<label>]`. With unit weights these are counts.
        """
        total_pos = tf.reduce_sum(tf.convert_to_tensor(self.positives.value), axis=1)
        total_neg = tf.reduce_sum(tf.convert_to_tensor(self.negatives.value), axis=1)
        return self._counts(total_pos, total_neg)

    def get_config(self):
        """Returns the constructor arguments, for `keras.saving`."""
        config = super().get_config()
        config.update({
            "groups": self.groups,
            "label_names": self.label_names,
            "num_thresholds": self.num_thresholds,
            "from_logits": self.from_logits,
            "multi_label": self.multi_label,
            "include_counts": self.include_counts,
        })
        return config
