"""In-graph checks of a training batch, passed before anything is written.

`DPModel.train_step` makes every write of an update (optimizer, EMA, update
count) wait for these checks, so a bad batch raises and changes nothing.
"""

import tensorflow as tf


def checked_class_ids(labels, output_spec):
    """Returns `labels`, gated on being valid class ids for the model's output.

    Applies to sparse class ids only: integer labels `[n]` (or `[n, 1]`) for
    an output `[n, K]` with K > 1. Anything else (multi-label or one-hot
    targets, a single logit) is returned unchanged. Without this check an
    out-of-range id fails deep inside the per-example pass on CPU, and on GPU
    gives a NaN loss, so the example would be silently dropped as non-finite.

    Args:
      labels: the label tensor of a batch.
      output_spec: the model's output spec (`keras.KerasTensor` or anything
        with a static `.shape`) for this batch.

    Returns:
      `labels`, with a run-time dependency on `0 <= labels < K`.

    Raises:
      tf.errors.InvalidArgumentError: at run time, a label is out of range.
    """
    shape = getattr(output_spec, "shape", None)
    if (not labels.dtype.is_integer or shape is None or len(shape) < 2
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
    checks = [tf.debugging.assert_non_negative(labels, message=message),
              tf.debugging.assert_less(
                  labels, tf.cast(num_classes, labels.dtype), message=message)]
    with tf.control_dependencies(checks):
        return tf.identity(labels)
