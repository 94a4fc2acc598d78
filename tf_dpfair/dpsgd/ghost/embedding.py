"""Ghost clipping of Embedding layers.

Closed form: example i's table gradient has row t equal to the sum of its
output gradients `g_ip` at the positions p holding token t, so
`||grad_i||^2 = sum_{p,q} [tok_ip == tok_iq] (g_ip . g_iq)` (the norm trick
over token positions; same token = same row). The clipped sum scatters the
reweighted output gradients into the table's rows.
"""

import keras
import tensorflow as tf

from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import tensors

# The norm trick forms [m, P, P]; above this many positions per example the
# layer uses its own vectorized per-example gradient instead.
MAX_EMBEDDING_POSITIONS = 1024


def handles(layer, input_shape):
    """True when this module's closed form applies to `layer` called on
    token ids of `input_shape` ([batch, positions...])."""
    if not (type(layer) is keras.layers.Embedding
            and tensors.weights_are(layer, "embeddings")):
        return False
    positions = tensors.static_prod(input_shape[1:])
    return positions is not None and positions <= MAX_EMBEDDING_POSITIONS


class EmbeddingClip:
    """Embedding: rows of the table; positions with the same token share one."""

    method = "norm_trick"

    def __init__(self, tap, m, views, keep_budget, method=None):
        self.layer = tap.layer
        positions = tensors.static_prod(tap.input_shape[1:]) * views
        self.estimates = {self.method: cost.Estimate(
            blas=m * positions ** 2 * tap.output_shape[-1],
            elementwise=6 * m * positions ** 2, calls=6,
            peak_bytes=8 * m * positions ** 2)}

    def sq_norms(self, a, y, g, m):
        self.ids = tf.reshape(tf.cast(a, tf.int32), [m, -1])
        self.g = tf.reshape(g, [m, tf.shape(self.ids)[1], -1])
        same = tf.cast(self.ids[:, :, tf.newaxis] == self.ids[:, tf.newaxis, :],
                       tf.float32)
        return tf.reduce_sum(
            same * tf.einsum("mpd,mqd->mpq", self.g, self.g), axis=[1, 2])

    def clipped_sum(self, scale, keep):
        table = self.layer.embeddings
        rows = tensors.scale_rows(self.g, scale, keep)
        return {id(table): tf.math.unsorted_segment_sum(
            tf.reshape(rows, [-1, table.shape[-1]]),
            tf.reshape(self.ids, [-1]), table.shape[0])}
