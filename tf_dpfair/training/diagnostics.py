"""Per-group training diagnostics: why a group pays under DP.

Outside the DP guarantee: everything here is computed on training examples
without noise, and their group ids, so it is for the person training the
model, never for release. It is off unless `GroupDiagnostics` is among
`fit`'s callbacks, and then it reads only what the DP step already has.

Clipping bounds each example's influence; examples of a rare or atypical group
tend to have larger gradients, get clipped harder, and their signal drowns in
noise sized for the majority. Per group of every attribute, each epoch:

- `examples`, `example_share`: real training examples seen, and their share;
- `clip_fraction`: the share of them whose gradient norm exceeded C;
- `grad_norm_mean`, `grad_norm_p10`, `grad_norm_p50`, `grad_norm_p90`: the
  pre-clip per-example gradient norm; quantiles from a histogram of
  log10(norm / C) with `BINS_PER_DECADE` bins per decade over
  [`LOW_DECADE`, `HIGH_DECADE`] (norms outside fall into the end bins), so a
  quantile is exact to within a factor 10 ** (1 / BINS_PER_DECADE);
- `loss`: mean per-example loss;

and, with `alignment=True` (extra backward passes, see below):

- `clipped_sum_share`: the group's share of the clipped sum S, the sum over
  updates of <S_g, S> divided by the sum of ||S||^2, where S_g is the group's
  part of S (the shares of an attribute's groups add up to 1); compare it
  with `example_share`;
- `update_cosine`: mean over updates of the cosine between the noised,
  clipped sum the optimizer received and the group's unclipped gradient sum
  (overall too: `train_diagnostics/update_cosine`).

Log names are `train_diagnostics/<attribute>/<group>/<figure>` and
`train_diagnostics/<figure>` overall.

Group ids never reach anything that updates the model: the step computes the
update exactly as without diagnostics (tests compare the weights bit for bit,
also with permuted group ids). The alignment figures come from their own
inference-mode forward pass (no dropout) and one backward pass per
coefficient vector; the update does not use them.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tf_dpfair.data.groups import GroupSpec

PREFIX = "train_diagnostics/"
LOW_DECADE = -6
HIGH_DECADE = 6
BINS_PER_DECADE = 8
NUM_BINS = (HIGH_DECADE - LOW_DECADE) * BINS_PER_DECADE
QUANTILES = (0.1, 0.5, 0.9)

# Per-example sums kept for every group: real examples, clipped examples,
# sum of norms, sum of losses.
_SUMS = ("examples", "clipped", "norm_sum", "loss_sum")


class GroupDiagnostics(keras.callbacks.Callback):
    """Turns on per-group training diagnostics and writes them to the epoch logs.

    Put it in `fit`'s callbacks before `keras.callbacks.TensorBoard` and
    `dashboards.FairnessDashboard`, and feed `fit` training batches that
    carry group ids (`data.make_train_dataset(..., with_groups=True)`). The
    step then accumulates the figures of the module docstring, summed over
    micro-batches and replicas; each epoch's figures are added to its logs.

    Args:
      groups: a `GroupSpec` or mapping attribute -> group names (id order).
      alignment: also compute `clipped_sum_share` and `update_cosine` (one
        inference-mode forward pass and about 2G + 1 backward passes per
        micro-batch, G the number of groups of all attributes).

    Raises:
      ValueError: no attributes, or a model that is not a DP model (at the
        start of `fit`).
    """

    def __init__(self, groups, *, alignment=False):
        super().__init__()
        self.group_spec = groups if isinstance(groups, GroupSpec) else GroupSpec(groups)
        if not self.group_spec.attributes:
            raise ValueError("GroupDiagnostics needs at least one group attribute.")
        self.alignment = bool(alignment)
        self._state = None
        self._clip = None

    # ------------------------------------------------------------ state

    def attach(self, model):
        """Creates the accumulators for `model` (called by `DPTraining.fit`).

        Args:
          model: the DP model; its clip norm C scales the norm histogram.
        """
        self._clip = float(model.dp_config.l2_norm_clip)
        if self._state is not None:
            return
        state = {}
        for attribute in self.group_spec.attributes:
            size = self.group_spec.num_groups(attribute)
            for key in _SUMS:
                state[(attribute, key)] = [size]
            state[(attribute, "hist")] = [size, NUM_BINS]
            if self.alignment:
                for key in ("share_dot", "cosine_sum", "cosine_count"):
                    state[(attribute, key)] = [size]
        if self.alignment:
            for key in ("sum_sq", "cosine_sum", "cosine_count"):
                state[(None, key)] = []
        with model.distribute_strategy.scope():
            self._state = {key: _sum_variable(shape)
                           for key, shape in state.items()}

    def reset(self):
        """Zeroes the accumulators."""
        for variable in self._state.values():
            variable.assign(tf.zeros_like(variable))

    # ------------------------------------------------------------ in the step

    @property
    def num_coefficients(self):
        """K, the rows of `coefficients`: 2G + 1 for G groups in all."""
        total = sum(self.group_spec.num_groups(a) for a in self.group_spec.attributes)
        return 2 * total + 1

    def check_groups(self, groups):
        """Raises unless the training batches carry every attribute's ids."""
        for attribute in self.group_spec.attributes:
            self._ids(groups, attribute)

    def update_examples(self, norms, losses, weights, nonfinite, groups,
                        l2_norm_clip):
        """Adds one replica's share of a logical batch (inside the step).

        Args:
          norms: float32 `[n]` pre-clip per-example gradient norms.
          losses: float32 `[n]` per-example losses.
          weights: float32 `[n]` sample weights (0 = padding).
          nonfinite: bool `[n]`, examples whose gradient was not finite
            (left out: they contributed nothing).
          groups: dict attribute -> int `[n]` group ids.
          l2_norm_clip: C.

        Returns:
          A list of the update ops (assign_add).
        """
        real = tf.logical_and(weights > 0, tf.logical_not(nonfinite))
        realf = tf.cast(real, tf.float32)
        safe_norms = tf.where(real, norms, 0.0)
        per_example = {
            "examples": realf,
            "clipped": realf * tf.cast(safe_norms > l2_norm_clip, tf.float32),
            "norm_sum": safe_norms,
            "loss_sum": tf.where(real, losses, 0.0),
        }
        bins = histogram_bins(safe_norms, l2_norm_clip)
        ops = []
        for attribute in self.group_spec.attributes:
            size = self.group_spec.num_groups(attribute)
            ids = self._ids(groups, attribute)
            for key, values in per_example.items():
                ops.append(self._state[(attribute, key)].assign_add(
                    tf.math.unsorted_segment_sum(values, ids, size)))
            cells = ids * NUM_BINS + bins
            hist = tf.math.unsorted_segment_sum(realf, cells, size * NUM_BINS)
            ops.append(self._state[(attribute, "hist")].assign_add(
                tf.reshape(hist, [size, NUM_BINS])))
        return ops

    def coefficients(self, norms, weights, nonfinite, groups, l2_norm_clip, threshold=None):
        """The per-example coefficients of the alignment sums of one micro-batch.

        Rows, in order: for each attribute and group, weight * clip factor *
        [in group] (that group's part of the clipped sum); then for each
        attribute and group, weight * [in group] (its unclipped sum); then
        weight (the unclipped sum).

        Args:
          norms, weights, nonfinite: `[m]`, as for `update_examples`.
          groups: dict attribute -> int `[m]` group ids.
          l2_norm_clip: C (the update's threshold with adaptive "quantile").
          threshold: None, or the "global_adapt" threshold: the factor is then
            C / max(||g||, T), as in the step (`dpsgd.adaptive.clip_factors`).

        Returns:
          float32 `[K, m]`.
        """
        finite = tf.logical_not(nonfinite)
        weights = tf.where(finite, weights, 0.0)
        if threshold is None:
            factor = tf.where(norms > l2_norm_clip,
                              l2_norm_clip / tf.maximum(norms, 1e-30), 1.0)
        else:
            factor = l2_norm_clip / tf.maximum(norms, threshold)
        members = [tf.one_hot(self._ids(groups, attribute),
                              self.group_spec.num_groups(attribute), axis=0)
                   for attribute in self.group_spec.attributes]
        members = tf.concat(members, axis=0)  # [G, m]
        return tf.concat([members * (weights * factor), members * weights,
                          weights[tf.newaxis]], axis=0)

    def update_alignment(self, sums, noised_sum):
        """Adds one update's alignment figures (after the cross-replica sum).

        Args:
          sums: list over variables of `[K, *shape]` gradient sums, the rows of
            `coefficients`, summed over micro-batches and replicas.
          noised_sum: list over variables of the noised, clipped sum.

        Returns:
          A list of update ops. An update whose sums are not finite adds
          nothing.
        """
        flat = tf.concat([tf.reshape(s, [tf.shape(s)[0], -1]) for s in sums], 1)
        update = tf.concat([tf.reshape(g, [-1]) for g in noised_sum], 0)
        total_groups = flat.shape[0] // 2
        clipped, unclipped = flat[:total_groups], flat[total_groups:]
        finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(flat)),
                                tf.reduce_all(tf.math.is_finite(update)))
        gate = tf.cast(finite, tf.float32)
        flat_clipped = tf.where(finite, clipped, 0.0)
        unclipped = tf.where(finite, unclipped, 0.0)
        update = tf.where(finite, update, 0.0)
        cosines = _cosines(unclipped, update)  # [G + 1], NaN-free
        defined = tf.cast(tf.norm(unclipped, axis=1) > 0, tf.float32) * gate
        ops = []
        start = 0
        for attribute in self.group_spec.attributes:
            size = self.group_spec.num_groups(attribute)
            part = flat_clipped[start:start + size]
            total = tf.reduce_sum(part, axis=0)
            ops.append(self._state[(attribute, "share_dot")].assign_add(
                tf.linalg.matvec(part, total) * gate))
            ops.append(self._state[(attribute, "cosine_sum")].assign_add(
                cosines[start:start + size] * defined[start:start + size]))
            ops.append(self._state[(attribute, "cosine_count")].assign_add(
                defined[start:start + size]))
            start += size
        first = self.group_spec.num_groups(self.group_spec.attributes[0])
        total = tf.reduce_sum(flat_clipped[:first], axis=0)
        ops.append(self._state[(None, "sum_sq")].assign_add(
            tf.reduce_sum(tf.square(total)) * gate))
        ops.append(self._state[(None, "cosine_sum")].assign_add(
            cosines[-1] * defined[-1]))
        ops.append(self._state[(None, "cosine_count")].assign_add(defined[-1]))
        return ops

    def _ids(self, groups, attribute):
        if groups is None or attribute not in groups:
            raise ValueError(
                f"GroupDiagnostics needs the group ids of {attribute!r} in the "
                f"training batches: build them with "
                f"data.make_train_dataset(..., with_groups=True).")
        return tf.cast(tf.reshape(groups[attribute], [-1]), tf.int32)

    # ------------------------------------------------------------ results

    def results(self):
        """The figures accumulated since the last reset, as a flat dict.

        Returns:
          dict log name -> float (NaN where a group had no example).
        """
        values = {key: v.numpy() for key, v in self._state.items()}
        logs = {}
        overall = None
        for attribute in self.group_spec.attributes:
            sums = {key: values[(attribute, key)] for key in _SUMS}
            if overall is None:
                overall = {key: s.sum() for key, s in sums.items()}
                overall["hist"] = values[(attribute, "hist")].sum(axis=0)
            total = sums["examples"].sum()
            for index, group in enumerate(self.group_spec.names(attribute)):
                name = f"{PREFIX}{attribute}/{group}/"
                count = sums["examples"][index]
                logs[name + "examples"] = float(count)
                logs[name + "example_share"] = _ratio(count, total)
                logs.update(_example_figures(
                    name, {k: s[index] for k, s in sums.items()},
                    values[(attribute, "hist")][index], self._clip))
                if self.alignment:
                    logs[name + "clipped_sum_share"] = _ratio(
                        values[(attribute, "share_dot")][index],
                        values[(None, "sum_sq")])
                    logs[name + "update_cosine"] = _ratio(
                        values[(attribute, "cosine_sum")][index],
                        values[(attribute, "cosine_count")][index])
        logs.update(_example_figures(PREFIX, overall, overall["hist"], self._clip))
        if self.alignment:
            logs[PREFIX + "update_cosine"] = _ratio(
                values[(None, "cosine_sum")], values[(None, "cosine_count")])
        return logs

    # ------------------------------------------------------------ callback

    def on_epoch_begin(self, epoch, logs=None):
        self.reset()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.results())


def weighted_gradient_sums(losses_fn, variables, coefficients):
    """Gradients of K weighted sums of per-example losses, in one backward pass each.

    Row k is the sum over examples of coefficients[k, i] * grad(loss_i): with
    coefficients weight * clip factor * [in group g], that is group g's part
    of the clipped sum, by linearity of the gradient.

    Args:
      losses_fn: `fn() -> [m]` per-example losses, computed under the tape.
      variables: the trainable variables.
      coefficients: float32 `[K, m]`.

    Returns:
      A list over variables of float32 `[K, *var.shape]`.
    """
    with tf.GradientTape() as tape:
        objectives = tf.linalg.matvec(coefficients, tf.cast(losses_fn(), tf.float32))
    sums = tape.jacobian(objectives, variables)
    # A weight the losses do not depend on has zero rows (ZERO would call
    # zeros_like on the Keras variable, whose dtype is a string).
    rows = tf.shape(coefficients)[:1]
    return [tf.zeros(tf.concat([rows, list(v.shape)], 0), tf.float32) if g is None
            else tf.cast(g, tf.float32) for v, g in zip(variables, sums)]


def histogram_bins(norms, l2_norm_clip):
    """The histogram bin of each norm: floor of log10(norm / C) in bins, clamped.

    Args:
      norms: float32 `[n]`, >= 0.
      l2_norm_clip: C.

    Returns:
      int32 `[n]` in [0, NUM_BINS).
    """
    ratio = tf.maximum(norms / l2_norm_clip, 10.0 ** (LOW_DECADE - 1))
    position = (tf.math.log(ratio) / math.log(10.0) - LOW_DECADE) * BINS_PER_DECADE
    return tf.cast(tf.clip_by_value(tf.floor(position), 0, NUM_BINS - 1), tf.int32)


def histogram_quantile(counts, quantile, l2_norm_clip):
    """A quantile of the norms from their histogram (geometric within a bin).

    Args:
      counts: `[NUM_BINS]` example counts.
      quantile: in (0, 1).
      l2_norm_clip: C.

    Returns:
      A float, NaN for an empty histogram.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return math.nan
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, quantile * total, side="left"))
    before = cumulative[index - 1] if index else 0.0
    within = (quantile * total - before) / counts[index]
    low = LOW_DECADE + index / BINS_PER_DECADE
    return float(l2_norm_clip * 10.0 ** (low + within / BINS_PER_DECADE))


def _example_figures(name, sums, hist, l2_norm_clip):
    count = sums["examples"]
    figures = {
        name + "clip_fraction": _ratio(sums["clipped"], count),
        name + "grad_norm_mean": _ratio(sums["norm_sum"], count),
        name + "loss": _ratio(sums["loss_sum"], count),
    }
    for q in QUANTILES:
        figures[f"{name}grad_norm_p{round(q * 100)}"] = histogram_quantile(
            hist, q, l2_norm_clip)
    return figures


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else math.nan


def _cosines(rows, vector):
    norms = tf.norm(rows, axis=1) * tf.norm(vector)
    return tf.math.divide_no_nan(tf.linalg.matvec(rows, vector), norms)


def _sum_variable(shape):
    return tf.Variable(tf.zeros(shape, tf.float32), trainable=False,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.SUM)
