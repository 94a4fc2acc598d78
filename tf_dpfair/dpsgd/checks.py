"""In-graph checks of a training batch, passed before anything is written.

`DPModel.train_step` makes every write of an update (optimizer, EMA, update
count) wait for these checks, so a bad batch raises and changes nothing.
"""

import tensorflow as tf


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
