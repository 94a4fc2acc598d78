"""Exponential moving average (EMA) shadows of trainable weights.

The paper evaluates averaged weights: EMA with decay 0.9999 and the warm-up
`decay_t = min(decay, (1 + t) / (10 + t))`, where t counts the updates made
before this one. The shadows are derived from already-privatised weights, so
they cost no privacy.
"""

import contextlib

import keras
import tensorflow as tf


def warmup_decay(decay, step):
    """Returns min(decay, (1 + step) / (10 + step)) as float32."""
    step = tf.cast(step, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + step) / (10.0 + step))


def create_shadows(layer, variables):
    """Adds one non-trainable shadow weight per variable to `layer`.

    The shadows start equal to the variables and are saved with the model.

    Args:
      layer: the Keras layer/model that owns the shadows.
      variables: the trainable variables to average.

    Returns:
      A list of shadow variables, aligned with `variables`.
    """
    shadows = []
    for index, variable in enumerate(variables):
        shadow = layer.add_weight(
            shape=variable.shape, dtype=variable.dtype,
            initializer=keras.initializers.Zeros(), trainable=False,
            name=f"ema_{index}_{variable.name.replace('/', '_')}",
            aggregation="only_first_replica")
        shadow.assign(variable)
        shadows.append(shadow)
    return shadows


def update_shadows(shadows, variables, decay, step):
    """shadow <- d * shadow + (1 - d) * variable with the warm-up decay d."""
    d = warmup_decay(decay, step)
    for shadow, variable in zip(shadows, variables):
        value = tf.convert_to_tensor(variable.value)
        shadow.assign(d * tf.convert_to_tensor(shadow.value) + (1.0 - d) * value)


@contextlib.contextmanager
def swapped(variables, shadows):
    """Within the block, `variables` hold the EMA values; restored afterwards.

    Args:
      variables: the model's trainable variables.
      shadows: their EMA shadows (same order).
    """
    saved = [tf.identity(tf.convert_to_tensor(v.value)) for v in variables]
    try:
        for variable, shadow in zip(variables, shadows):
            variable.assign(tf.convert_to_tensor(shadow.value))
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
