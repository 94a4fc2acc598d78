"""Ghost clipping of DepthwiseConv2D layers.

Closed form: per input channel c, example i's kernel gradient is
`A_ic^T G_ic`, where `A_ic` [P, kh*kw] holds channel c of its input patches
and `G_ic` [P, M] the pre-activation output gradients of the M output
channels that channel feeds. These per-example gradients are small
(`kh*kw*C*M` per example), so they are formed, squared, and reweighted for the
clipped sum. Three ways to form them, each at the cost of one convolution
(`m*P*kh*kw*C*M` multiply-adds), picked per layer by `cost`:

- SHIFTED: for each kernel offset, the input values it reads at every output
  position (`tensors.kernel_views`) times the output gradients, summed over
  positions: kh*kw products of [m, P, C], no patch tensor.
- FOLDED_KERNEL_GRAD: the examples folded into the channel axis
  ([n, H, W, C] -> [1, H, W, n*C]) make one call of TensorFlow's depthwise
  kernel gradient return every example's kernel gradient at once (that op
  sums over the batch axis, which is now 1, and never mixes channels).
- FOLDED_CORRELATION: the same gradient is a correlation of the input with
  the output gradients, `G[i, j] = sum_p a_pad[p * s + (i, j)] g[p]` per
  channel: one depthwise convolution of the folded (padded) input with the
  folded output gradients as its [H', W'] filter, dilated by the stride,
  whose [kh, kw] output is every example's kernel gradient.
"""

import keras
import tensorflow as tf

from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import generic
from tf_dpfair.dpsgd.ghost import tensors

SHIFTED = "shifted"
FOLDED_KERNEL_GRAD = "folded_kernel_grad"
FOLDED_CORRELATION = "folded_correlation"


def handles(layer):
    """True when this module's closed form applies to `layer`."""
    return (type(layer) is keras.layers.DepthwiseConv2D
            and tensors.activation_name(layer) is not None
            and layer.data_format == "channels_last"
            and tensors.weights_are(layer, "kernel", "bias"))


def estimates(tap, m, views):
    """`{method: cost.Estimate}` of forming the per-example kernel gradients."""
    layer = tap.layer
    kh, kw, channels, multiplier = layer.kernel.shape
    n = m * views
    _, h, w, _ = tap.input_shape
    _, oh, ow, _ = tap.output_shape
    if None in (h, w, oh, ow):
        return {SHIFTED: cost.UNKNOWN_COST}
    offsets = kh * kw
    outputs = n * oh * ow * channels * multiplier   # one output-gradient tensor
    inputs = n * h * w * channels
    macs = offsets * outputs
    strided = max(layer.strides) > 1 and offsets > 1
    found = {SHIFTED: cost.Estimate(
        # Per offset: a view of the input, its product with the output
        # gradients, and the sum over positions (read twice, written once).
        elementwise=offsets * 3 * outputs + (2 * inputs if strided else 0),
        calls=3 * offsets, peak_bytes=4 * (2 * outputs + (inputs if strided else 0)))}
    if max(layer.dilation_rate) == 1:
        fold = cost.Estimate(elementwise=2 * (inputs + outputs), calls=4,
                             peak_bytes=4 * 2 * (inputs + outputs))
        found[FOLDED_KERNEL_GRAD] = fold + cost.Estimate(
            native_depthwise=macs, native_kernel=(kh, kw))
        found[FOLDED_CORRELATION] = fold + cost.Estimate(
            depthwise_correlation=macs,
            calls=6 if max(layer.strides) > 1 else 1)
    return found


class DepthwiseClip(generic.PerExampleClip):
    """DepthwiseConv2D: per channel, the kernel gradient is `A_ic^T G_ic`."""

    def __init__(self, tap, m, views, keep_budget, method=None):
        super().__init__(tap, m, views, keep_budget)
        self.views = views
        self.estimates = estimates(tap, m, views)
        self.method = method or cost.cheapest(self.estimates)

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        a = tf.cast(a, tf.float32)
        g = tensors.pre_activation_grad(layer, y, g)
        if self.method == SHIFTED:
            kernel_grads = self._shifted(a, g, m)
        else:
            kernel_grads = self._folded(a, g, m)
        self.grads[id(layer.kernel)] = kernel_grads
        if layer.use_bias:
            self.grads[id(layer.bias)] = tf.reduce_sum(
                tf.reshape(g, [m, -1, g.shape[-1]]), axis=1)
        return tf.add_n([tensors.sq_sum(t) for t in self.grads.values()])

    def _shifted(self, a, g, m):
        """[m, kh, kw, C, M] from the kernel views of `a` and `g` [n, H', W', C*M]."""
        layer = self.layer
        kh, kw, channels, multiplier = layer.kernel.shape
        g = tf.reshape(g, tf.concat([tf.shape(g)[:3], [channels, multiplier]], 0))
        per_offset = [
            tf.reduce_sum(view[..., tf.newaxis] * g, axis=[1, 2])    # [n, C, M]
            for view in tensors.kernel_views(a, layer.kernel_size, layer.strides,
                                             layer.dilation_rate, layer.padding)]
        grads = tf.reshape(tf.stack(per_offset, axis=1),
                           [m, self.views, kh, kw, channels, multiplier])
        return tf.reduce_sum(grads, axis=1)

    def _folded(self, a, g, m):
        """[m, kh, kw, C, M] from one depthwise op on the batch folded into
        channels: the kernel gradient, or the correlation of the input with
        the output gradients."""
        layer = self.layer
        kh, kw, channels, multiplier = layer.kernel.shape
        (sh, sw), n = layer.strides, a.shape[0] or m * self.views
        oh, ow = g.shape[1], g.shape[2]
        # Pad as the layer does, then crop to exactly what the kernel reads,
        # so that "VALID" gives the layer's output positions.
        rows, cols = (oh - 1) * sh + kh, (ow - 1) * sw + kw
        h, w = a.shape[1], a.shape[2]
        top = max(rows - h, 0) // 2 if layer.padding == "same" else 0
        left = max(cols - w, 0) // 2 if layer.padding == "same" else 0
        a = tf.pad(a[:, :rows - top, :cols - left],
                   [[0, 0], [top, max(rows - h - top, 0)],
                    [left, max(cols - w - left, 0)], [0, 0]])

        def fold(t):
            """[n, H, W, D] -> [1, H, W, n * D], example-major channels."""
            return tf.reshape(tf.transpose(t, [1, 2, 0, 3]),
                              [1, t.shape[1], t.shape[2], -1])

        if self.method == FOLDED_KERNEL_GRAD:
            kernel = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=fold(a), filter_sizes=[kh, kw, n * channels, multiplier],
                out_backprop=fold(g), strides=[1, sh, sw, 1], padding="VALID")
        else:
            # Input channel c of the folded input feeds folded output
            # channels c * M .. c * M + M - 1: one filter channel each, so the
            # filter [H', W', n*C, M] takes the output gradients in that order.
            filters = tf.reshape(fold(g)[0], [oh, ow, n * channels, multiplier])
            kernel = tf.nn.depthwise_conv2d(
                fold(a), filters, strides=[1, 1, 1, 1], padding="VALID",
                dilations=[sh, sw])[0]                     # [kh, kw, n*C*M]
        kernel = tf.reshape(kernel, [kh, kw, m, self.views, channels, multiplier])
        return tf.transpose(tf.reduce_sum(kernel, axis=3), [2, 0, 1, 3, 4])
