"""Is this model, and this batch, safe to train privately? (one home).

Every refusal the DP step makes before it writes anything lives here
(`tf_dpfair.dpsgd.step` says why each matters to the guarantee);
`checked_inputs` runs those of the model and the batch in the step's order,
and `check_rows` follows the all-reduce of the row counts:

- the model: `check_model` (trainable BatchNorm, activity regularizers, more
  than one output) and `check_separable` (the separability probe of
  `tf_dpfair.dpsgd.separability`: does any example's loss depend on another
  example, whatever the layers);
- the batch: `check_augmult_shape`, `checked_sample_weights` (weights in
  [0, 1]), `checked_labels` / `checked_class_ids` (class ids in range) and
  `check_rows` (no more real rows than the accounting assumes).

The in-graph checks return their tensor gated on an assertion (or the
assertion itself); the step makes every write of an update (optimizer, EMA,
update count) wait for them, so a bad batch raises and changes nothing. XLA
drops assertions, so each also bounds what an unchecked batch could do.
"""

import logging

import keras
import tensorflow as tf

from tf_dpfair.dpsgd import separability
from tf_dpfair.models import batchnorm


# ----------------------------------------------------------------- the model


def check_model(model):
    """Refuses a model whose layers break per-example clipping.

    Args:
      model: the DP model (`DPTraining`).

    Raises:
      ValueError: BatchNormalization in training mode anywhere in the model,
        an activity regularizer on any layer, or more than one output.
    """
    # Paths below this model, e.g. "block/bn" for a BatchNorm held by
    # the custom layer "block".
    offending = [finding.path.split("/", 1)[-1]
                 for finding in batchnorm.check_batchnorm(model)
                 if finding.status == batchnorm.TRAINING_MODE]
    if offending:
        names = ", ".join(offending)
        raise ValueError(
            f"BatchNormalization in training mode mixes examples, so "
            f"per-example clipping would not bound one example's "
            f"influence. Offending layers: {names}. Freeze them "
            f"(tf_dpfair.models.freeze_batchnorm, or layer.trainable = "
            f"False, which runs them in inference mode) or replace them "
            f"with GroupNormalization.")
    with_activity = [layer.name for layer in model._flatten_layers()
                     if getattr(layer, "activity_regularizer", None)]
    if with_activity:
        raise ValueError(
            f"Activity regularizers depend on the data and are not "
            f"clipped; remove them from: {', '.join(with_activity)}.")
    if len(getattr(model, "outputs", None) or [None]) != 1:
        raise ValueError("DPModel supports models with a single output.")


def check_separable(model, one_view, targets=None):
    """Refuses a model whose examples are not independent (once per compile).

    Both clipping paths rest on example i's loss depending on row i
    alone; `separability.check_separability` tests that on the model
    itself in training mode, whatever its layers, so that mixing the
    BatchNorm check cannot see (a custom layer's batch statistics) is
    refused too. It checks the batch the step's batched pass really
    sees: `microbatch_size` examples (at least 2) of `augmult` views,
    as ghost clipping feeds them, with probe labels and the compiled
    loss, so that the per-example losses and their gradient are checked
    as well as the outputs. A layer that mixes examples only at some
    batch sizes is seen at the one training uses. It runs eagerly
    (lifted out of the `train_step` trace), on random data shaped like
    `one_view` (one view per example) and the labels, before anything is
    applied; it draws nothing from the training random streams. It runs
    once per `compile`: a pass sets `model._separable`, which `compile`
    clears.

    Args:
      model: the DP model (`DPTraining`); the probe calls
        `model._separability_target()` with its per-example loss
        (`model._per_example_losses`).
      one_view: the traced inputs of this step, one view per example.
      targets: the traced targets of this step (`{"label": [n, ...]}`,
        plus `"mask"`), whose dtypes and inner shapes the probe labels
        take; None to derive them from the model's output and the loss.

    Raises:
      ValueError: from `check_separability`.
    """
    if model._separable:
        return
    config = model.dp_config
    loss_fn = model._per_example_losses
    examples = max(config.microbatch_size, 2)
    with tf.init_scope():
        inputs = separability.probe_batch(one_view,
                                          rows=examples * config.augmult)
        labels = probe_labels(model, inputs, targets, examples, loss_fn)
        separability.check_separability(
            model._separability_target(), inputs, targets=labels,
            loss_fn=None if labels is None else (
                lambda t, p: loss_fn(t["label"], p, t.get("mask"))),
            views=config.augmult)
    model._separable = True


def probe_labels(model, inputs, targets, examples, loss_fn):
    """Probe targets `{"label": [examples, ...]}` for the separability check.

    Shaped like `targets` where given; otherwise the first form the loss
    accepts of: class ids (the output's shape less its last axis), then
    floats shaped like the output (class ids first for a sparse
    categorical loss). None, with a warning, where neither fits: the
    check then covers the model's outputs only.
    """
    if targets is not None:
        return separability.probe_batch(dict(targets), rows=examples, seed=2)
    problems = []
    try:
        output = tf.nest.flatten(model.compute_output_spec(
            tf.nest.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype), inputs)))[0]
        forms = [tf.TensorSpec(output.shape[:-1], tf.int32),
                 tf.TensorSpec(output.shape, tf.float32)]
        prediction = tf.zeros([examples, *output.shape[1:]], output.dtype)
    except Exception as error:  # an output shape Keras cannot infer
        forms = []
        problems.append(f"{type(error).__name__}: {error}")
    if not is_sparse_categorical(model.loss):
        forms.reverse()
    for form in forms:
        try:
            labels = {"label": separability.probe_batch(form, rows=examples,
                                                        seed=2)}
            loss_fn(labels["label"], prediction)
            return labels
        except Exception as error:  # a loss that wants labels of another form
            problems.append(f"{type(error).__name__}: {error}")
    logging.getLogger(__name__).warning(
        "tf_dpfair: the separability check could not build probe labels "
        "for the loss (%s); it checks the model's outputs only.",
        "; ".join(problems))
    return None


def is_sparse_categorical(loss):
    """Whether `loss` (as given to `compile`) reads labels as class ids."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    return getattr(loss, "fn", loss) is keras.losses.sparse_categorical_crossentropy


# ----------------------------------------------------------------- the batch


def checked_inputs(model, x, targets, sample_weight):
    """Runs every check of the model and the batch before the update, in order.

    The shape of the views axis, the model's layers (`check_model`), the
    sample weights, then (once the model is built) the separability probe
    (`check_separable`, once per compile) and the class ids.

    Args:
      model: the DP model (`DPTraining`).
      x: the batch's inputs, `[n, ...]` (`[n, K, ...]` with augmult K).
      targets: `{"label": [n, ...]}`, plus `"mask"`.
      sample_weight: the batch's weights, or None.

    Returns:
      `(weights, targets)`: the checked float32 weights `[n]` and the
      targets with checked labels; both depend on the run-time checks.

    Raises:
      ValueError: the model or the inputs' shape is refused.
      tf.errors.InvalidArgumentError: at run time, a weight or a label is.
    """
    augmult = model.dp_config.augmult
    check_augmult_shape(x, augmult)
    check_model(model)
    weights = checked_sample_weights(sample_weight,
                                     tf.shape(tf.nest.flatten(x)[0])[0])
    one_view = (tf.nest.map_structure(lambda t: t[:, 0], x)
                if augmult > 1 else x)
    if not all(layer.built for layer in model._flatten_layers()):
        # Create variables outside the vectorized per-example pass.
        model(one_view, training=False)
    model._check_separable(one_view, targets)
    targets = dict(targets)
    targets["label"] = checked_labels(model, targets["label"], one_view)
    return weights, targets


def check_augmult_shape(x, augmult):
    """Refuses inputs without the views axis that `augmult` > 1 needs.

    Args:
      x: the batch's inputs (a nest; its first tensor is checked).
      augmult: views per example.

    Raises:
      ValueError: `augmult` > 1 and the inputs are not `[batch, augmult, ...]`.
    """
    first = tf.nest.flatten(x)[0]
    if augmult > 1 and (first.shape.rank < 2 or first.shape[1] != augmult):
        raise ValueError(
            f"DPConfig.augmult={augmult} needs inputs shaped "
            f"[batch, {augmult}, ...]; got {first.shape}.")


def checked_sample_weights(sample_weight, n):
    """The batch's sample weights `[n]`, gated on lying in [0, 1].

    Args:
      sample_weight: the batch's weights (any shape of n elements), or None
        for all ones.
      n: the batch's row count (scalar int32 tensor).

    Returns:
      float32 `[n]`, clamped to [0, 1] with NaN or Inf as 0, and dependent on
      the run-time checks below.

    Raises:
      tf.errors.InvalidArgumentError: at run time, a weight is NaN or
        Inf, above 1 or below 0.
    """
    if sample_weight is None:
        return tf.ones([n], tf.float32)
    weights = tf.reshape(tf.cast(sample_weight, tf.float32), [n])
    # One condition per problem, each failing on its own values only, so
    # that the message names the problem (a NaN also fails `w <= 1`).
    finite = tf.math.is_finite(weights)

    def refuse_any(bad, message):
        return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)),
                                   [message])

    weight_checks = [
        refuse_any(tf.logical_not(finite), (
            "DPModel: sample weights must be finite numbers in [0, 1] "
            "(0 = padding); got NaN or Inf. Check how the weights are "
            "computed.")),
        refuse_any(tf.logical_and(finite, weights > 1.0), (
            "DPModel: sample weights above 1 would raise the "
            "sensitivity above l2_norm_clip; use weights in [0, 1] "
            "(0 = padding).")),
        refuse_any(tf.logical_and(finite, weights < 0.0),
                   "DPModel: sample weights must be >= 0."),
    ]
    # The update depends on the checks, so a failing batch writes nothing.
    # Should a check ever be skipped (XLA drops assertions: on TPU the
    # whole step is compiled), clamping keeps each contribution within C
    # and a NaN or Inf weight counts as 0 rather than poisoning the sum.
    with tf.control_dependencies(weight_checks):
        return tf.clip_by_value(tf.where(finite, weights, 0.0), 0.0, 1.0)


def checked_labels(model, labels, one_view):
    """`labels`, gated on being valid class ids where the loss reads them so.

    Args:
      model: the DP model (its loss and output shape are read).
      labels: the batch's label tensor.
      one_view: the batch's inputs, one view per example.

    Returns:
      `labels`, through `checked_class_ids` where they are integers (or
      floats read as class ids by a sparse categorical loss); else as given.
    """
    sparse = is_sparse_categorical(model.loss)
    if labels.dtype.is_integer or (sparse and labels.dtype.is_floating):
        output_spec = model.compute_output_spec(tf.nest.map_structure(
            lambda t: keras.KerasTensor(t.shape, t.dtype), one_view))
        return checked_class_ids(labels, output_spec, sparse_loss=sparse)
    return labels


def check_rows(rows, limit, marker):
    """Refuses a batch with more real rows than the accounting assumes.

    Args:
      rows: float32 scalar, the rows of weight > 0 over all replicas
        (what the update really holds).
      limit: int64 scalar, the running ledger segment's row limit.
      marker: the text that starts the assertion's message, by which `fit`
        turns the failure into a ValueError.

    Returns:
      `(check, within)`: the assertion the update waits for, and a
      float32 1.0 / 0.0 that the update is multiplied by. Should the
      assertion be dropped (XLA drops assertions: on TPU the whole step is
      compiled), an oversized batch then moves nothing, noise included,
      and is still counted, so its noise index is never drawn again.
    """
    within = tf.cast(rows, tf.int64) <= limit
    check = tf.debugging.Assert(
        within, [marker, tf.cast(rows, tf.int64), "rows >", limit, "allowed"])
    return check, tf.cast(within, tf.float32)


def checked_class_ids(labels, output_spec, sparse_loss=False):
    """Returns `labels`, gated on being valid class ids for the model's output.

    Applies to sparse class ids only: labels `[n]` (or `[n, 1]`) for an
    output `[n, K]` with K > 1, given as integers, or as floats when the loss
    reads them as class ids (`sparse_loss`; Keras' sparse categorical
    cross-entropy casts floats to integers, so 2.5 would silently train as
    class 2). Anything else (multi-label or one-hot targets, a single logit)
    is returned unchanged. Without this check an out-of-range id fails deep
    inside the per-example pass on CPU, and gives a NaN loss on GPU and
    under XLA, so the example would be silently dropped as non-finite.

    Args:
      labels: the label tensor of a batch.
      output_spec: the model's output spec (`keras.KerasTensor` or anything
        with a static `.shape`) for this batch.
      sparse_loss: whether the loss reads `labels` as class ids (sparse
        categorical cross-entropy); float labels are checked only then.

    Returns:
      `labels`, with a run-time dependency on `0 <= labels < K` (and, for
      float labels, on each being a whole number).

    Raises:
      tf.errors.InvalidArgumentError: at run time, a label is out of range,
        or a float label is not a whole number.
    """
    shape = getattr(output_spec, "shape", None)
    floating = labels.dtype.is_floating
    if (not (labels.dtype.is_integer or (floating and sparse_loss))
            or shape is None or len(shape) < 2
            or shape[-1] is None or shape[-1] < 2):
        return labels
    rank, pred_rank = labels.shape.rank, len(shape)
    if not (rank == pred_rank - 1
            or (rank == pred_rank and labels.shape[-1] == 1)):
        return labels
    num_classes = int(shape[-1])
    message = (f"DPModel: class ids must be in [0, {num_classes}) for a "
               f"model with {num_classes} outputs. Fix the labels (e.g. "
               f"remap them to 0..{num_classes - 1}) or give the last layer "
               f"as many units as there are classes.")
    # Conditions that are false for NaN too: a NaN label fails the range
    # check rather than passing both comparisons unnoticed.
    in_range = tf.logical_and(labels >= 0,
                              labels < tf.cast(num_classes, labels.dtype))
    checks = []
    if floating:
        checks.append(tf.debugging.Assert(
            tf.reduce_all(tf.logical_or(tf.equal(labels, tf.floor(labels)),
                                        tf.logical_not(in_range))),
            ["DPModel: class ids given as floats must be whole numbers "
             "(a sparse categorical loss would truncate 2.5 to class 2). "
             "Fix the labels, or use a loss for soft or one-hot targets."]))
    checks.append(tf.debugging.Assert(tf.reduce_all(in_range), [message]))
    with tf.control_dependencies(checks):
        return tf.identity(labels)
