"""Adaptive clipping thresholds: clip factors, the noisy count, the threshold's update.

Two modes (`DPConfig.adaptive_clipping`) share one threshold T_t per update:

- "quantile" (Andrew et al. 2021, "Differentially Private Learning with
  Adaptive Clipping"): T_t is the clip norm. Example i contributes
  g_i * min(1, T_t / ||g_i||); the noise is N(0, (sigma_g * T_t)^2).
- "global_adapt" (DPSGD-Global-Adapt, Esipova et al. 2023, "Disparate
  Impact in Differential Privacy from Gradient Misalignment"): the clip norm
  C is fixed and example i contributes g_i * C / max(||g_i||, T_t). Below
  T_t every gradient keeps its direction and its size relative to the
  others (scaled by C / T_t); above it, it is clipped to C, so the rare,
  large gradients of a minority group are not shrunk more than the rest's.
  The noise is N(0, (sigma_g * C)^2).

Either way an example's contribution has norm at most the clip norm (T_t,
or C), times its weight in [0, 1]: the sensitivity of the sum is the clip
norm, as with fixed clipping.

The threshold follows a noisy count. Each update counts, over the real rows
of the whole job, b = sum_i w_i * [||g_i|| <= T_t] (sensitivity 1), draws
z ~ N(0, sigma_b^2) from (secret seed, update index) on its own stream
(`noise.count_noise`), and sets

    T_{t+1} = T_t * exp(-eta * ((b + z) / B - gamma))

with B the expected batch size, gamma the target quantile and eta the
threshold's learning rate. Only the noisy count reaches T; the exact count
is never read by anything that is released.

Accounting. The update releases the noisy sum (sensitivity C_t, noise
sigma_g * C_t) and the noisy count (sensitivity 1, noise sigma_b) of the
same Poisson sample. Scaled to unit noise, this is one Gaussian mechanism on
the pair (sum / (sigma_g C_t), b / sigma_b), whose L2 sensitivity is
sqrt(sigma_g^-2 + sigma_b^-2): a Gaussian of multiplier
sigma = (sigma_g^-2 + sigma_b^-2)^(-1/2) per sampled update. The package
states `noise_multiplier` = sigma and derives sigma_g from it
(`DPConfig.gradient_noise_multiplier`), so the ledger, the calculator and a
noise multiplier calibrated to a target epsilon are unchanged.
"""

import keras
import tensorflow as tf

from tf_dpfair.config import QUANTILE
from tf_dpfair.dpsgd import noise


def clip_factors(norms, l2_norm_clip, threshold=None):
    """Each example's factor: min(1, C / ||g||), or C / max(||g||, T) with a threshold.

    Args:
      norms: [m] per-example gradient norms.
      l2_norm_clip: C (a number or a scalar tensor: the "quantile" threshold).
      threshold: None (fixed clipping, or "quantile" with C = T_t), or the
        "global_adapt" threshold T_t (a scalar tensor).

    Returns:
      float32 [m]; factor * ||g|| <= C for every finite norm.
    """
    if threshold is None:
        return tf.minimum(1.0, l2_norm_clip / norms)
    return l2_norm_clip / tf.maximum(norms, tf.cast(threshold, norms.dtype))


def count_at_most(weights, norms, nonfinite, threshold):
    """b = sum_i w_i [||g_i|| <= T] over this replica's real rows (sensitivity 1)."""
    below = tf.logical_and(norms <= tf.cast(threshold, norms.dtype),
                           tf.logical_not(nonfinite))
    return tf.reduce_sum(weights * tf.cast(below, tf.float32))


def noisy_share(count, config, index):
    """(b + z) / B: the released share of examples at or below the threshold."""
    z = noise.count_noise(config.count_noise_multiplier, config.seed, index)
    return (count + z) / float(config.expected_batch_size)


def next_threshold(threshold, share, config):
    """T * exp(-eta * (share - gamma))."""
    return threshold * tf.exp(-config.threshold_learning_rate
                              * (share - config.target_quantile))


def adapt_threshold(threshold, current, share, config, within_limit):
    """Sets the threshold of the next update from this one's released noisy share.

    T <- T * exp(-eta * (share - gamma)), `share` from `noisy_share` (the
    count plus its own Gaussian noise, the same on every replica). A batch
    refused by the row check (`within_limit` 0) leaves T as it was. Call it
    among the update's writes (`apply_update`'s `after_apply`), which wait
    for the step's checks.

    Args:
      threshold: the model's threshold variable (scalar float32).
      current: its value read at the start of this update (the T_t that
        clipped it and was counted against); the assignment waits for it.
      share: the noisy share (`noisy_share`), never the exact count.
      config: the `DPConfig` (target quantile, learning rate).
      within_limit: float32 1.0 / 0.0 from `checks.check_rows`.

    Returns:
      The assignment.
    """
    new = next_threshold(current, share, config)
    with tf.control_dependencies([current, share]):
        return threshold.assign(tf.where(within_limit > 0, new, current))


def create_threshold(model, config):
    """The model's threshold variable T (initial_threshold), or None without adaptive clipping.

    A non-trainable weight, so checkpoints and saved models carry it and a
    resumed run continues from the saved T.
    """
    if config.adaptive_clipping is None:
        return None
    return model.add_weight(
        shape=(), dtype="float32", trainable=False, name="dp_clip_threshold",
        initializer=keras.initializers.Constant(config.initial_threshold),
        aggregation="only_first_replica")


def clip_norm_and_threshold(config, threshold):
    """(clip norm, "global_adapt" threshold or None) of the update being made.

    Fixed clipping (`threshold` None): (C, None). "quantile": (T_t, None),
    the threshold is the clip norm. "global_adapt": (C, T_t).
    """
    if threshold is None:
        return config.l2_norm_clip, None
    # One read, as a tensor: `tf.cast` would hand back the variable itself,
    # and each use would then read it again, possibly after the update's
    # assignment.
    current = tf.identity(tf.convert_to_tensor(threshold.value))
    if config.adaptive_clipping == QUANTILE:
        return current, None
    return config.l2_norm_clip, current
