"""The one place where DP noise is drawn.

Noise for update t is a stateless function of (secret run seed, t), so every
replica can compute the same draw without communication, a resumed run
continues the same stream, and no draw is ever reused for a different update
(t only grows).

The algorithm is pinned to Philox: TensorFlow's default ("auto_select")
picks Philox on CPU and GPU but ThreeFry on TPU. Pinning fixes the
algorithm, not every number: XLA's Philox normals differ from those of TF's
own kernel for the same seed (measured on CPU), so a step compiled whole
with XLA, as on a TPU, draws a stream of its own, still a function of
(seed, t) alone. A run resumed on other hardware thus draws other noise for
re-done updates, as if re-keyed (see `tf_dpfair.training.checkpoints`); it never gives
the same draw to different data.
"""

import tensorflow as tf

ALGORITHM = "philox"


def _seed_pair(seed):
    """Splits a 62-bit Python int into the [2] int64 seed of stateless ops."""
    return tf.constant([seed >> 31, seed & (2**31 - 1)], dtype=tf.int64)


def gaussian_noise(shapes, stddev, seed, step):
    """Draws independent N(0, stddev^2) noise tensors for one optimizer update.

    Args:
      shapes: list of static shapes, one per trainable variable.
      stddev: noise standard deviation (noise_multiplier * l2_norm_clip).
      seed: the secret 62-bit run seed (Python int).
      step: int64 scalar tensor, the index of the update being made.

    Returns:
      A list of float32 tensors with the given shapes.
    """
    update_seed = tf.random.experimental.stateless_fold_in(
        _seed_pair(seed), tf.cast(step, tf.int64), alg=ALGORITHM)
    noises = []
    for index, shape in enumerate(shapes):
        var_seed = tf.random.experimental.stateless_fold_in(
            update_seed, index, alg=ALGORITHM)
        noises.append(stddev * tf.random.stateless_normal(
            shape, seed=var_seed, dtype=tf.float32, alg=ALGORITHM))
    return noises


# The count stream's root: update indices are >= 0, so no update's gradient
# key, fold_in(seed, t), is ever this root.
_COUNT_STREAM = -1


def count_noise(stddev, seed, step):
    """Draws the N(0, stddev^2) noise of update `step`'s count (adaptive clipping).

    Keyed by (secret run seed, a stream of its own, update index), so it is
    independent of the gradient noise of every update and, like it, never
    reused.

    Args:
      stddev: the count's noise standard deviation (count_noise_multiplier).
      seed: the secret 62-bit run seed (Python int).
      step: int64 scalar tensor, the index of the update being made.

    Returns:
      A float32 scalar.
    """
    root = tf.random.experimental.stateless_fold_in(
        _seed_pair(seed), tf.constant(_COUNT_STREAM, tf.int64), alg=ALGORITHM)
    key = tf.random.experimental.stateless_fold_in(root, tf.cast(step, tf.int64),
                                                   alg=ALGORITHM)
    return stddev * tf.random.stateless_normal([], seed=key, dtype=tf.float32,
                                               alg=ALGORITHM)
