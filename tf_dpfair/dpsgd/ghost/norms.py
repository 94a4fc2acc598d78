"""Ghost clipping of LayerNormalization and GroupNormalization on the last axis.

Closed form: the output is `y = xhat * gamma + beta` per channel, so example
i's gradients are `dL/dgamma = sum_p g_i * xhat_i` and `dL/dbeta = sum_p g_i`
(sums over its positions p). The first is read off the tapped output as
`(sum_p g_i * y_i - beta * sum_p g_i) / gamma` where gamma allows (see
`NormalizationClip`).
"""

import keras
import tensorflow as tf

from tf_dpfair.dpsgd.ghost import generic
from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import tensors


def handles(layer, input_shape):
    """True when this module's closed form applies to `layer` called on
    inputs of `input_shape`."""
    if type(layer) not in (keras.layers.LayerNormalization,
                           keras.layers.GroupNormalization):
        return False
    rank = len(input_shape)
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return ([a % rank for a in axis] == [rank - 1]
            and tensors.weights_are(layer, "gamma", "beta"))


class NormalizationClip(generic.PerExampleClip):
    """Layer/Group normalization on the last axis: `y = xhat * gamma + beta`.

    Per example, `dL/dgamma = sum_p g * xhat` and `dL/dbeta = sum_p g`. When
    every channel's gamma is non-zero and not much smaller than its beta, the
    first comes from the tapped output, `(sum_p g * y - beta sum_p g) / gamma`,
    at the cost of a product and two sums; otherwise xhat is recomputed from
    the layer input with gamma = 1 and beta = 0 (a second forward pass of the
    layer). Either way the norm is the norm of the gradient that is summed.
    """

    # Largest |beta / gamma| for which the gamma gradient is read off the
    # output: y's rounding error, divided by gamma, stays ~1e-5 relative.
    MAX_BETA_OVER_GAMMA = 100.0
    method = "from_output"

    def __init__(self, tap, m, views, keep_budget, method=None):
        super().__init__(tap, m, views, keep_budget)
        rows = m * views * (tensors.static_prod(tap.output_shape[1:]) or 0)
        self.estimates = {self.method: cost.Estimate(
            elementwise=5 * rows, calls=8, peak_bytes=4 * rows)}

    def _xhat_dot(self, a, g, m, channels):
        """sum_p g * xhat, recomputing xhat from the layer input."""
        layer = self.layer
        unit = [tf.ones(v.shape, tf.float32) if v is layer.gamma
                else tf.zeros(v.shape, tf.float32)
                for v in layer.trainable_variables]
        xhat, _ = layer.stateless_call(
            unit, [v.value for v in layer.non_trainable_variables], a)
        xhat = tf.reshape(tf.cast(xhat, tf.float32), [m, -1, channels])
        return tf.reduce_sum(g * xhat, axis=1)

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        channels = g.shape[-1]
        g = tf.reshape(g, [m, -1, channels])
        beta_grads = tf.reduce_sum(g, axis=1)
        if layer.gamma is not None:
            gamma = tf.cast(layer.gamma, tf.float32)
            beta = (tf.zeros_like(gamma) if layer.beta is None
                    else tf.cast(layer.beta, tf.float32))

            def from_output():
                y_rows = tf.reshape(tf.cast(y, tf.float32), [m, -1, channels])
                return (tf.reduce_sum(g * y_rows, axis=1)
                        - beta * beta_grads) / gamma

            well_conditioned = tf.reduce_all(
                (gamma != 0)
                & (tf.abs(beta) <= self.MAX_BETA_OVER_GAMMA * tf.abs(gamma)))
            self.grads[id(layer.gamma)] = tf.cond(
                well_conditioned, from_output,
                lambda: self._xhat_dot(a, g, m, channels))
        if layer.beta is not None:
            self.grads[id(layer.beta)] = beta_grads
        return tf.add_n([tensors.sq_sum(t) for t in self.grads.values()])
