"""Ghost clipping of any layer, from its own per-example gradients.

Closed form: none. With the layer's input `a_i` and output gradient `g_i`
fixed, example i's gradient of the layer's weights is
`d(y(a_i; theta) . g_i) / d theta`, computed for every example at once with
`tf.vectorized_map` over that layer alone (not the whole network). The
clipped sum reweights those per-example gradients.
"""

import tensorflow as tf

from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import tensors


class PerExampleClip:
    """A layer whose per-example gradients are formed: `self.grads` maps each
    weight's id to its `[m, *shape]` gradients; the clipped sum reweights them."""

    method = "per_example"

    def __init__(self, tap, m, views, keep_budget, method=None):
        self.layer = tap.layer
        self.grads = {}
        self.estimates = {self.method: cost.UNKNOWN_COST}

    def clipped_sum(self, scale, keep):
        return {key: tf.reduce_sum(tensors.scale_rows(t, scale, keep), axis=0)
                for key, t in self.grads.items()}


class GenericClip(PerExampleClip):
    """Any layer: its own per-example gradients, vectorized over examples."""

    method = "vectorized"

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        variables = layer.trainable_weights
        a = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[m, -1], tf.shape(t)[1:]], 0)), a)
        g = tf.reshape(g, tf.concat([[m, -1], tf.shape(g)[1:]], 0))

        def one(example):
            inputs, out_grad = example
            with tf.GradientTape() as tape:
                out = layer(inputs, training=True)
                dot = tf.reduce_sum(tf.cast(out, tf.float32) * out_grad)
            grads = tape.gradient(dot, variables)
            # A weight the output does not depend on has gradient zero (not
            # UnconnectedGradients.ZERO: its zeros_like fails on Keras
            # variables, whose dtype is a string).
            return [tf.zeros(v.shape, tf.float32) if gr is None
                    else tf.cast(tf.convert_to_tensor(gr), tf.float32)
                    for v, gr in zip(variables, grads)]

        self.grads = dict(zip([id(v) for v in variables],
                              tf.vectorized_map(one, (a, g))))
        return tf.add_n([tensors.sq_sum(t) for t in self.grads.values()])
