"""Ghost clipping of DepthwiseConv2D layers.

Closed form: per input channel c, example i's kernel gradient is
`A_ic^T G_ic`, where `A_ic` [P, kh*kw] holds channel c of its input patches
and `G_ic` [P, M] the pre-activation output gradients of the M output
channels that channel feeds. These per-example gradients are small
(`kh*kw*C*M` per example), so they are formed, squared, and reweighted for the
clipped sum.
"""

import keras
import tensorflow as tf

from tf_dpfair.ghost import generic
from tf_dpfair.ghost import tensors


def handles(layer):
    """True when this module's closed form applies to `layer`."""
    return (type(layer) is keras.layers.DepthwiseConv2D
            and tensors.activation_name(layer) is not None
            and layer.data_format == "channels_last"
            and tensors.weights_are(layer, "kernel", "bias"))


class DepthwiseClip(generic.PerExampleClip):
    """DepthwiseConv2D: per channel, the kernel gradient is `A_ic^T G_ic`."""

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        kh, kw, channels, multiplier = layer.kernel.shape
        a = tf.cast(a, tf.float32)
        g = tensors.pre_activation_grad(layer, y, g)
        patches = tensors.image_patches(a, layer.kernel_size, layer.strides,
                                        layer.dilation_rate, layer.padding)
        patches = tf.reshape(patches, [m, -1, kh * kw, channels])
        g = tf.reshape(g, [m, -1, channels, multiplier])
        self.grads[id(layer.kernel)] = tf.reshape(
            tf.einsum("mpsc,mpcj->mscj", patches, g), [m, *layer.kernel.shape])
        if layer.use_bias:
            self.grads[id(layer.bias)] = tf.reshape(tf.reduce_sum(g, axis=1), [m, -1])
        return tf.add_n([tensors.sq_sum(t) for t in self.grads.values()])
