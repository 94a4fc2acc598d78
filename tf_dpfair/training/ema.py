"""Exponential moving average (EMA) shadows of trainable weights.

The paper evaluates averaged weights: EMA with decay 0.9999 over thousands of
updates. Update t (t counts the updates made before it) applies

    shadow <- d_t * shadow + (1 - d_t) * weights,
    d_t = min(decay, (1 + t) / (h + t))      (warm-up horizon h, default 10)
    d_t = decay                               (warm-up off: h = None)

The warm-up keeps the first shadows from being dominated by the initial
weights, but it holds d_t far below `decay` for a long time: with h = 10 an
"EMA 0.99" has reached 0.69 after 20 updates and 0.96 after 200. Reports
should therefore give the decay reached (`effective_decay`, the model's
`ema_decay_reached`, the `ema_decay` training log) and the number of updates
it averages over (`effective_averaging_horizon`), not the configured decay.

The shadows are derived from already-privatised weights and d_t depends only
on the update count and the config, so neither costs privacy.
"""

import contextlib
import math
import numbers

import keras
import tensorflow as tf

DEFAULT_WARMUP = 10.0


def warmup_decay(decay, step, warmup=DEFAULT_WARMUP):
    """The decay d_t applied by the update with `step` updates before it.

    Args:
      decay: the configured decay, in [0, 1).
      step: t, the updates made before this one (a scalar tensor or int).
      warmup: the horizon h of min(decay, (1 + t) / (h + t)), or None for no
        warm-up (d_t = decay).

    Returns:
      d_t, a float32 scalar tensor.
    """
    decay = tf.constant(decay, tf.float32)
    if warmup is None:
        return decay
    step = tf.cast(step, tf.float32)
    return tf.minimum(decay, (1.0 + step) / (tf.constant(warmup, tf.float32) + step))


def effective_decay(decay, updates, warmup=DEFAULT_WARMUP):
    """The decay the last of `updates` updates applied (pure Python).

    The `updates`-th update has t = updates - 1 updates before it, so this is
    min(decay, updates / (h + updates - 1)), or `decay` with no warm-up. It
    matches `warmup_decay(decay, updates - 1, warmup)` up to float32 rounding.

    Args:
      decay: the configured decay, in [0, 1).
      updates: updates made so far, an integer >= 1.
      warmup: the warm-up horizon h (a number >= 1), or None or 0 for none.

    Returns:
      The decay reached, a float.

    Raises:
      ValueError: `decay` is not in [0, 1), `updates` is not an integer >= 1,
        or `warmup` is not None, 0 or a number >= 1.
    """
    if not (_real(decay) and 0 <= decay < 1):
        raise ValueError(f"decay must be in [0, 1), got {decay!r}.")
    if not (_real(updates) and float(updates).is_integer() and updates >= 1):
        raise ValueError(f"updates must be an integer >= 1 (no update has "
                         f"applied a decay before the first), got {updates!r}.")
    if warmup is None or (_real(warmup) and warmup == 0):
        return float(decay)
    if not (_real(warmup) and warmup >= 1):
        raise ValueError(f"warmup must be None, 0 or a finite number >= 1, "
                         f"got {warmup!r}.")
    return min(float(decay), float(updates) / (warmup + updates - 1))


def effective_averaging_horizon(decay_reached):
    """About how many recent updates an EMA with this decay averages over.

    1 / (1 - d): the mean age (plus one) of the iterates under a constant
    decay d. During the warm-up it is (h + t) / (h - 1), close to the window
    the warm-up weights really cover (they fall off like (k / n)^(h - 1) over
    the iterates k = 1..n).

    Args:
      decay_reached: d, in [0, 1) (from `effective_decay`).

    Returns:
      1 / (1 - d), a float >= 1.

    Raises:
      ValueError: `decay_reached` is not in [0, 1).
    """
    if not (_real(decay_reached) and 0 <= decay_reached < 1):
        raise ValueError(f"decay_reached must be in [0, 1), got "
                         f"{decay_reached!r}.")
    return 1.0 / (1.0 - float(decay_reached))


def describe(decay, updates, warmup=DEFAULT_WARMUP):
    """One sentence for reports: the decay reached and what it averages over.

    Args:
      decay, updates, warmup: as for `effective_decay`.

    Returns:
      e.g. "EMA 0.99 (warm-up 10) reached 0.6897 after 20 updates (averaging
      over about 3.2 updates)"; the horizon is
      `effective_averaging_horizon` of the decay reached.

    Raises:
      ValueError: as `effective_decay`.
    """
    reached = effective_decay(decay, updates, warmup)
    horizon = effective_averaging_horizon(reached)
    setting = "no warm-up" if not warmup else f"warm-up {warmup:g}"
    horizon = f"{horizon:,.0f}" if horizon >= 10 else f"{horizon:.1f}"
    return (f"EMA {decay:g} ({setting}) reached {reached:.4g} after {updates} "
            f"update{'s' if updates != 1 else ''} (averaging over about "
            f"{horizon} updates)")


def _real(value):
    """Whether `value` is a finite real number (not a bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


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


def apply_decay(shadows, variables, d):
    """shadow <- d * shadow + (1 - d) * variable, for every pair.

    Args:
      shadows: the shadow variables.
      variables: the trainable variables (same order).
      d: the decay of this update, a float32 scalar (`warmup_decay`).
    """
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
