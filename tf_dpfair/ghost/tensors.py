"""Row helpers shared by the layer kinds of ghost clipping.

No closed form lives here: these reshape a layer's tapped tensors into
per-example rows, reweight rows by their clip factors, and undo a layer's own
activation on its output gradient.

A micro-batch of m examples with K augmented views has `n = m * K` rows,
example i's views being rows `i * K .. i * K + K - 1`.
"""

import math

import tensorflow as tf

_ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")


def activation_name(layer):
    """The name of `layer`'s activation if its derivative is read off the
    output (linear, relu, tanh, sigmoid), else None."""
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return name if name in _ACTIVATIONS else None


def weights_are(layer, *names):
    """True when the layer's trainable weights are exactly these attributes."""
    expected = [getattr(layer, n, None) for n in names]
    expected = {id(v) for v in expected if v is not None}
    return expected == {id(v) for v in layer.trainable_weights}


def static_prod(dims):
    """Product of static dimensions, or None if one is unknown."""
    dims = list(dims)
    return None if None in dims else math.prod(dims)


def per_example(t, m):
    """[m * K * ..., C] -> [m, positions, C]: views and positions of one example."""
    channels = t.shape[-1] if t.shape[-1] is not None else tf.shape(t)[-1]
    return tf.reshape(t, [m, -1, channels])


def zero_rows(t, keep):
    """Zeroes example i's slice of `t` ([m, ...]) where keep[i] is False."""
    mask = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
    return tf.where(mask, t, tf.zeros_like(t))


def scale_rows(t, scale, keep):
    """`scale[i] * t[i]`, exactly zero where keep[i] is False (even if NaN)."""
    t = zero_rows(t, keep)
    return t * tf.reshape(scale, [-1] + [1] * (t.shape.rank - 1))


def sq_sum(t):
    """[m, ...] -> [m]: sum of squares of each example's slice."""
    return tf.reduce_sum(tf.reshape(tf.square(t), [tf.shape(t)[0], -1]), axis=1)


def pre_activation_grad(layer, y, g):
    """Output gradient before the layer's own activation, from its output y."""
    name = activation_name(layer)
    y = tf.cast(y, g.dtype)
    if name == "relu":
        return g * tf.cast(y > 0, g.dtype)
    if name == "tanh":
        return g * (1.0 - tf.square(y))
    if name == "sigmoid":
        return g * y * (1.0 - y)
    return g


def image_patches(a, kernel_size, strides, dilation, padding):
    """[n, H, W, C] -> [n, H', W', kh * kw * C]: what each output position reads.

    Flattened in (kh, kw, C) order, the order of a conv kernel's axes. Built
    from kh * kw strided slices of the (padded) input, several times faster
    on CPU than `tf.image.extract_patches`, which it equals; that op is the
    fallback when the spatial size is not static.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    h, w = a.shape[1], a.shape[2]
    if h is None or w is None:
        return tf.image.extract_patches(
            a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1], padding=padding.upper())
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        oh, ow = -(-h // sh), -(-w // sw)
        pad_h = max((oh - 1) * sh + span_h - h, 0)
        pad_w = max((ow - 1) * sw + span_w - w, 0)
        a = tf.pad(a, [[0, 0], [pad_h // 2, pad_h - pad_h // 2],
                       [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
    else:
        oh, ow = (h - span_h) // sh + 1, (w - span_w) // sw + 1
    return tf.concat(
        [a[:, i * dh:i * dh + (oh - 1) * sh + 1:sh,
           j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
         for i in range(kh) for j in range(kw)], axis=-1)
