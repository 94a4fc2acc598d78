"""Streaming per-group TPR, FPR and selection rate at a threshold, as a Keras metric.

`GroupedErrorRates` keeps, for every group of every attribute (row 0: all
examples) and every label, four weighted counts: positives, negatives, true
positives and false positives at the decision. Counts are additive, so the
variables use SUM aggregation and add up correctly across `tf.distribute`
replicas; the result is exactly what `fairness.rates.evaluate` reports on the
same examples (without intervals).

The decision: a score >= `threshold` is positive (binary and multi-label
data; with `from_logits`, on the sigmoid of the logit); with `multi_class`,
the top-1 class, each class one-vs-rest.

Result names (scalars; the progress bar, CSV logger and TensorBoard take them):

- `tpr`, `fpr`, `selection_rate`: over all examples.
- `tpr/<attribute>/<group>`, `fpr/...`, `selection_rate/...`: per group.
- `tpr_gap/<attribute>`: max - min group TPR (the equal-opportunity
  difference); `fpr_gap/<attribute>`; `equalized_odds/<attribute>`: the
  larger of the two (NaN if either is).
- Multi-class data also: `top1_error`, `top1_error/<attribute>/<group>` and
  `top1_error_gap/<attribute>`.

With several labels (multi-label, or the classes of multi-class data) the
names above hold the mean over the labels where the figure is defined (for
the gaps and equalized odds: the mean of each label's figure, as
`fairness.rates.evaluate` reports them), and with `per_label` each label
also gets `tpr/<label>`, `tpr/<label>/<attribute>/<group>`,
`tpr_gap/<label>/<attribute>`, and likewise for the others.

A rate without a denominator (TPR of a group without positives) is NaN, and
a gap needs two groups where it is defined.

Like `GroupedAUC`, the metric has `needs_groups = True`: models of this
package feed it group ids in evaluation (`validation_data`, `evaluate`) and
never update it on training batches, whose group figures would be outside
the DP guarantee.
"""

import keras
import tensorflow as tf

from tf_dpfair.fairness import streaming

RATES = ("tpr", "fpr", "selection_rate")
_POSITIVES, _NEGATIVES, _TRUE_POSITIVES, _FALSE_POSITIVES = range(4)


@keras.saving.register_keras_serializable(package="tf_dpfair")
class GroupedErrorRates(streaming.GroupedMetric):
    """TPR, FPR and selection rate overall and per group, streamed over batches.

    Example (threshold 0.5; women: one of two positives found, men: both):

    >>> metric = GroupedErrorRates({"sex": ["female", "male"]})
    >>> metric.update_state([1., 1., 0., 1., 1., 0.], [0.9, 0.2, 0.1, 0.8, 0.7, 0.6],
    ...                     groups={"sex": [0, 0, 0, 1, 1, 1]})
    >>> result = metric.result()
    >>> float(result["tpr/sex/female"]), float(result["tpr/sex/male"])
    (0.5, 1.0)
    >>> float(result["tpr_gap/sex"]), float(result["equalized_odds/sex"])
    (0.5, 1.0)

    See the module docstring for the result names.
    """

    def __init__(self, groups, threshold=0.5, label_names=None, from_logits=False,
                 multi_label=None, multi_class=False, per_label=True,
                 name="grouped_error_rates", dtype=None):
        """Creates the metric and its count variables.

        Args:
            groups: dict attribute -> list of group names (index = group id).
            threshold: the decision threshold on probabilities, in [0, 1]
                (binary and multi-label data); None with `multi_class`.
            label_names: names of the L labels (multi-label) or of the K
                classes (`multi_class`, required there).
            from_logits: `y_pred` holds logits (a sigmoid is applied before
                the threshold; the top-1 class needs none).
            multi_label: `y_true`/`y_pred` are `[B, L]`; defaults to
                `label_names is not None and not multi_class`.
            multi_class: `y_true` holds class ids `[B]` and `y_pred` `[B, K]`
                scores; the decision is the top-1 class.
            per_label: also report each label's figures (several labels).
            name: metric name.
            dtype: dtype of the counts (default float32).

        Raises:
            ValueError: malformed `groups` or names (as `GroupedAUC`), a
                threshold outside [0, 1] or given with `multi_class`, or
                `multi_class` without `label_names`.
        """
        super().__init__(name=name, dtype=dtype)
        owner = "GroupedErrorRates"
        self._groups, self._offsets, self._num_rows = streaming.checked_groups(groups, owner)
        if label_names is not None:
            label_names = streaming.checked_label_names(label_names, owner)
        if multi_class:
            if threshold is not None:
                raise ValueError(f"{owner}: multi_class decides by the top-1 class; pass "
                                 "threshold=None.")
            if label_names is None or len(label_names) < 2 or multi_label:
                raise ValueError(f"{owner}: multi_class needs `label_names`, the names of "
                                 "the K >= 2 classes, and multi_label unset.")
            multi_label = False
        elif (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
              or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"{owner}: threshold must be a probability in [0, 1]; got "
                             f"{threshold!r}.")
        if multi_label is None:
            multi_label = label_names is not None
        if multi_label != (label_names is not None) and not multi_class:
            raise ValueError(f"{owner}: `label_names` go with multi_label=True (or "
                             "multi_class=True); got label_names="
                             f"{label_names!r}, multi_label={multi_label!r}.")
        self.threshold = None if threshold is None else float(threshold)
        self.label_names = label_names
        self.from_logits = bool(from_logits)
        self.multi_label = bool(multi_label)
        self.multi_class = bool(multi_class)
        self.per_label = bool(per_label)
        self._num_labels = len(label_names) if label_names else 1
        self.counts = self.add_variable(
            shape=(self._num_rows, self._num_labels, 4), initializer="zeros",
            aggregation="sum", name="counts")
        if self.multi_class:
            self.top1 = self.add_variable(shape=(self._num_rows, 2), initializer="zeros",
                                          aggregation="sum", name="top1")

    def _labels_and_decisions(self, y_true, y_pred, live):
        """(labels [B, L] 0/1, decisions [B, L] 0/1) in the metric's dtype.

        Class ids are checked on live rows (weight > 0) only: padding rows
        may carry any id.
        """
        y_pred = tf.convert_to_tensor(y_pred)
        num_labels = self._num_labels
        if self.multi_class:
            if y_pred.shape.rank != 2 or y_pred.shape[-1] not in (None, num_labels):
                raise ValueError(f"GroupedErrorRates: y_pred must have shape [B, "
                                 f"{num_labels}] (one score per class); got {y_pred.shape}.")
            ids = tf.reshape(tf.cast(y_true, tf.int32), [-1])
            checked = tf.where(live, ids, tf.zeros_like(ids))
            message = f"GroupedErrorRates: class ids must lie in [0, {num_labels})"
            checks = [tf.debugging.assert_non_negative(checked, message=message),
                      tf.debugging.assert_less(checked, num_labels, message=message)]
            with tf.control_dependencies(checks):
                labels = tf.one_hot(ids, num_labels, dtype=self.dtype)
            decisions = tf.one_hot(tf.argmax(y_pred, axis=-1), num_labels, dtype=self.dtype)
            return labels, decisions
        rank = y_pred.shape.rank
        if self.multi_label:
            ok = rank == 2 and y_pred.shape[-1] in (None, num_labels)
        else:
            ok = rank in (None, 1) or (rank == 2 and y_pred.shape[-1] in (None, 1))
        if not ok:
            expected = f"[B, {num_labels}]" if self.multi_label else "[B] or [B, 1]"
            raise ValueError(f"GroupedErrorRates: y_pred must have shape {expected}; got "
                             f"shape {y_pred.shape}.")
        scores = tf.reshape(tf.cast(y_pred, self.dtype), [-1, num_labels])
        if self.from_logits:
            scores = tf.sigmoid(scores)
        labels = tf.cast(tf.reshape(y_true, [-1, num_labels]) != 0, self.dtype)
        return labels, tf.cast(scores >= self.threshold, self.dtype)

    def update_state(self, y_true, y_pred, sample_weight=None, groups=None,
                     label_mask=None):
        """Adds a batch to the per-group counts.

        Args:
            y_true: labels: `[B]`/`[B, 1]` (binary, nonzero = positive),
                `[B, L]` (multi-label) or class ids `[B]` (`multi_class`); or
                the dict `{"label": ..., "groups": {...}}` of `tf_dpfair.data.batch`.
            y_pred: probabilities (or logits with `from_logits`) of the
                labels' shape; `[B, K]` scores with `multi_class`.
            sample_weight: optional `[B]`; weight-0 rows (padding) count
                nowhere, whatever their ids.
            groups: dict attribute -> int ids `[B]`; required unless `y_true`
                carries them.
            label_mask: optional 0/1 of the labels' shape (taken from
                `y_true["label_mask"]` when not given): 0 leaves a label out.

        Raises:
            ValueError: no group ids, a configured attribute missing, or
                shapes that do not fit.
            tf.errors.InvalidArgumentError: (when the batch runs) group or
                class ids out of range, or ids/weights not one per example.
        """
        y_true, groups, label_mask = self._batch(y_true, groups, label_mask)
        size = tf.shape(tf.convert_to_tensor(y_pred))[0]
        weights, checks = self._weights(sample_weight, size)
        with tf.control_dependencies(checks):
            labels, decisions = self._labels_and_decisions(y_true, y_pred, weights != 0)
        checks.append(tf.debugging.assert_equal(
            tf.shape(labels)[0], size,
            message="GroupedErrorRates: y_true and y_pred have different batch sizes"))
        rows, row_checks = streaming.group_rows(self._groups, self._offsets, groups,
                                                  weights != 0, size, "GroupedErrorRates")
        with tf.control_dependencies(checks + row_checks):
            rows = tf.identity(rows)  # [B, 1 + attributes]
        known = (tf.ones_like(labels) if label_mask is None or self.multi_class
                 else tf.reshape(tf.cast(label_mask, self.dtype), tf.shape(labels)))
        weight = weights[:, None] * known
        per_example = tf.stack([weight * labels, weight * (1.0 - labels),
                                weight * labels * decisions,
                                weight * (1.0 - labels) * decisions], axis=-1)  # [B, L, 4]
        shape = tf.concat([tf.shape(rows), tf.shape(per_example)[1:]], axis=0)
        data = tf.broadcast_to(per_example[:, None], shape)
        self.counts.assign_add(tf.math.unsorted_segment_sum(data, rows, self._num_rows))
        if self.multi_class:
            correct = tf.reduce_sum(labels * decisions, axis=-1)
            top1 = tf.stack([weights, weights * correct], axis=-1)  # [B, 2]
            data = tf.broadcast_to(top1[:, None], tf.concat([tf.shape(rows), [2]], axis=0))
            self.top1.assign_add(tf.math.unsorted_segment_sum(data, rows, self._num_rows))

    def _rates(self):
        """dict rate -> `[rows, L]`, NaN where the denominator is 0."""
        counts = tf.convert_to_tensor(self.counts.value)
        positives, negatives = counts[..., _POSITIVES], counts[..., _NEGATIVES]
        true_pos, false_pos = counts[..., _TRUE_POSITIVES], counts[..., _FALSE_POSITIVES]
        return {"tpr": _ratio(true_pos, positives), "fpr": _ratio(false_pos, negatives),
                "selection_rate": _ratio(true_pos + false_pos, positives + negatives)}

    def _add(self, out, prefix, rates, gaps=None):
        """Adds rates `{name: [rows]}` per group, and gaps per attribute."""
        for name, values in rates.items():
            out[name + prefix] = values[0]
            for attribute, names in self._groups.items():
                start = self._offsets[attribute]
                for i, group in enumerate(names):
                    out[f"{name}{prefix}/{attribute}/{group}"] = values[start + i]
        for attribute, names in self._groups.items():
            if gaps is None:
                start = self._offsets[attribute]
                attribute_gaps = {name: streaming.gap_and_worst(
                    values[start:start + len(names)])[0] for name, values in rates.items()}
                # NaN if either gap is: equalized odds needs both.
                attribute_gaps["equalized_odds"] = tf.maximum(attribute_gaps["tpr"],
                                                              attribute_gaps["fpr"])
            else:
                attribute_gaps = gaps[attribute]
            for name, gap in attribute_gaps.items():
                key = name if name == "equalized_odds" else name + "_gap"
                out[f"{key}{prefix}/{attribute}"] = gap

    def result(self):
        """Returns a flat dict name -> scalar tensor (see the module docstring)."""
        rates = self._rates()
        out = {}
        several = self._num_labels > 1
        per_label_gaps = []
        for j in range(self._num_labels):
            label_out = {}
            self._add(label_out, "", {name: values[:, j] for name, values in rates.items()})
            per_label_gaps.append(label_out)
            if several and self.per_label:
                self._add(out, "/" + self.label_names[j],
                          {name: values[:, j] for name, values in rates.items()})
        if not several:
            out.update(per_label_gaps[0])
        else:
            # Mean over labels of each label's gap, as error_rates.evaluate.
            keys = {name: name + "_gap" for name in RATES}
            keys["equalized_odds"] = "equalized_odds"
            gaps = {attribute: {name: streaming.nan_mean(tf.stack(
                [g[f"{key}/{attribute}"] for g in per_label_gaps]), axis=0)
                for name, key in keys.items()} for attribute in self._groups}
            self._add(out, "", {name: streaming.nan_mean(values, axis=1)
                                for name, values in rates.items()}, gaps)
        if self.multi_class:
            top1 = tf.convert_to_tensor(self.top1.value)
            error = 1.0 - _ratio(top1[:, 1], top1[:, 0])
            out["top1_error"] = error[0]
            for attribute, names in self._groups.items():
                start = self._offsets[attribute]
                for i, group in enumerate(names):
                    out[f"top1_error/{attribute}/{group}"] = error[start + i]
                out[f"top1_error_gap/{attribute}"] = streaming.gap_and_worst(
                    error[start:start + len(names)])[0]
        return out

    def get_config(self):
        """Returns the constructor arguments, for `keras.saving`."""
        config = super().get_config()
        config.update({"groups": self.groups, "threshold": self.threshold,
                       "label_names": self.label_names, "from_logits": self.from_logits,
                       "multi_label": self.multi_label, "multi_class": self.multi_class,
                       "per_label": self.per_label})
        return config


def _ratio(numerator, denominator):
    """numerator / denominator, NaN (not 0) where the denominator is 0."""
    nan = tf.fill(tf.shape(numerator), tf.constant(float("nan"), numerator.dtype))
    return tf.where(denominator > 0, numerator / tf.where(denominator > 0, denominator, 1.0),
                    nan)
