"""Per-example gradients and per-example L2 clipping (pure TensorFlow)."""

import collections

import tensorflow as tf

from tf_dpfair.dpsgd import adaptive

ClippedSum = collections.namedtuple(
    "ClippedSum", ["gradient_sum", "losses", "outputs", "norms", "nonfinite"])
ClippedSum.__doc__ = """Result of `clipped_gradient_sum` over m examples.

Attributes:
  gradient_sum: list of tensors shaped like the variables: sum over examples of
    weight_i * g_i * min(1, C / ||g_i||).
  losses: [m] each example's own loss.
  outputs: [m, ...] whatever `loss_fn` returned beside the loss (predictions).
  norms: [m] each example's gradient L2 norm before clipping.
  nonfinite: [m] bool, True where the gradient had a NaN or Inf; such an
    example contributes zero to the sum.
"""


def per_example_gradients(loss_fn, variables, inputs):
    """Computes every example's gradient in one vectorized pass.

    Args:
      loss_fn: `loss_fn(example) -> (loss, output)` for ONE example (inputs
        without the leading batch dimension); `loss` is a scalar.
      variables: list of the variables to differentiate.
      inputs: nest of tensors with leading dimension m.

    Returns:
      `(gradients, losses, outputs)`: gradients is a list of [m, *var.shape]
      tensors (zeros for variables the loss does not touch).
    """
    def one_example(example):
        with tf.GradientTape() as tape:
            loss, output = loss_fn(example)
        grads = tape.gradient(loss, variables)
        # Not UnconnectedGradients.ZERO: it calls zeros_like on the variable,
        # which fails for Keras variables (their dtype is a string).
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g
                 for v, g in zip(variables, grads)]
        return grads, loss, output

    return tf.vectorized_map(one_example, inputs)


def global_norms(per_example_grads):
    """Returns the [m] L2 norms of per-example gradients over all variables."""
    squares = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]),
                             axis=1)
               for g in per_example_grads]
    return tf.sqrt(tf.add_n(squares))


def clipped_gradient_sum(loss_fn, variables, inputs, weights, l2_norm_clip,
                         threshold=None):
    """Sums per-example gradients, each clipped to L2 norm `l2_norm_clip`.

    Example i contributes `weights[i] * g_i * min(1, C / ||g_i||)`, whose norm
    is at most C because weights are in [0, 1] (the caller checks this). An
    example whose gradient is not finite contributes zero.

    Args:
      loss_fn: `loss_fn(example) -> (loss, output)` for ONE example.
      variables: list of trainable variables.
      inputs: nest of tensors with leading dimension m.
      weights: [m] float32 weights in [0, 1]; 0 marks padding.
      l2_norm_clip: C > 0.
      threshold: None, or the "global_adapt" threshold T: example i is then
        scaled by C / max(||g_i||, T) (`adaptive.clip_factors`), still at
        most C in norm.

    Returns:
      A `ClippedSum`.
    """
    grads, losses, outputs = per_example_gradients(loss_fn, variables, inputs)
    norms = global_norms(grads)
    finite = tf.math.is_finite(norms)
    scale = adaptive.clip_factors(norms, l2_norm_clip, threshold) * weights
    scale = tf.where(finite, scale, tf.zeros_like(scale))
    gradient_sum = []
    for g in grads:
        per_example_scale = tf.reshape(
            tf.cast(scale, g.dtype), [-1] + [1] * (g.shape.rank - 1))
        # multiply_no_nan gives 0 where scale is 0, even where g is NaN/Inf.
        gradient_sum.append(tf.reduce_sum(
            tf.math.multiply_no_nan(g, per_example_scale), axis=0))
    return ClippedSum(gradient_sum, losses, outputs, norms,
                      tf.logical_not(finite))
