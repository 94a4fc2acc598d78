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


def conv_output_size(size, kernel, stride, dilation, padding):
    """Output length of a conv along one axis (Keras/TensorFlow padding)."""
    span = (kernel - 1) * dilation + 1
    if padding == "same":
        return -(-size // stride)
    return (size - span) // stride + 1


def kernel_views(a, kernel_size, strides, dilation, padding):
    """What each kernel offset reads at every output position of a 2-D conv.

    Args:
      a: [n, H, W, C] input rows.
      kernel_size, strides, dilation: (rows, cols) pairs.
      padding: "same" or "valid" (Keras' meaning).

    Returns:
      A list of kh * kw tensors [n, H', W', C] in row-major kernel order:
      view (i, j) holds `a_padded[:, p * sh + i * dh, q * sw + j * dw, :]` at
      output position (p, q).

    Strided convs with kernels larger than 1x1 are read through a phase
    decomposition: one transpose puts the input rows with the same remainder
    modulo the stride together, and every offset is then a contiguous slice
    (strided slices are several times slower on CPU).
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        return [a]
    n, h, w, c = a.shape
    if h is None or w is None:
        patches = tf.image.extract_patches(
            a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1], padding=padding.upper())
        patches = tf.reshape(patches, tf.concat(
            [tf.shape(patches)[:3], [kh * kw, c]], 0))
        return tf.unstack(patches, axis=3)
    oh = conv_output_size(h, kh, sh, dh, padding)
    ow = conv_output_size(w, kw, sw, dw, padding)
    top = left = 0
    if padding == "same":
        top = max((oh - 1) * sh + (kh - 1) * dh + 1 - h, 0) // 2
        left = max((ow - 1) * sw + (kw - 1) * dw + 1 - w, 0) // 2
    if kh * kw == 1 or (sh == 1 and sw == 1):
        # Pad to exactly what the views read, then slice.
        rows = (oh - 1) * sh + (kh - 1) * dh + 1
        cols = (ow - 1) * sw + (kw - 1) * dw + 1
        a = tf.pad(a, [[0, 0], [top, max(rows - h - top, 0)],
                       [left, max(cols - w - left, 0)], [0, 0]])
        return [a[:, i * dh:i * dh + (oh - 1) * sh + 1:sh,
                  j * dw:j * dw + (ow - 1) * sw + 1:sw, :]
                for i in range(kh) for j in range(kw)]
    # Rows p * sh + r live in phase r % sh at index p + r // sh.
    qh, qw = (kh - 1) * dh // sh, (kw - 1) * dw // sw
    rows, cols = (oh + qh) * sh, (ow + qw) * sw
    a = tf.pad(a[:, :rows - top, :cols - left],
               [[0, 0], [top, max(rows - h - top, 0)],
                [left, max(cols - w - left, 0)], [0, 0]])
    phases = tf.transpose(tf.reshape(a, [-1, rows // sh, sh, cols // sw, sw, c]),
                          [2, 4, 0, 1, 3, 5])
    views = []
    for i in range(kh):
        for j in range(kw):
            r, s = i * dh, j * dw
            views.append(phases[r % sh, s % sw, :, r // sh:r // sh + oh,
                                s // sw:s // sw + ow, :])
    return views


def image_patches(a, kernel_size, strides, dilation, padding):
    """[n, H, W, C] -> [n, H', W', kh * kw * C]: what each output position reads.

    Flattened in (kh, kw, C) order, the order of a conv kernel's axes: the
    `kernel_views` side by side, several times faster on CPU than
    `tf.image.extract_patches`, which it equals; that op is the fallback when
    the spatial size is not static.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    if a.shape[1] is None or a.shape[2] is None:
        return tf.image.extract_patches(
            a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1], padding=padding.upper())
    views = kernel_views(a, kernel_size, strides, dilation, padding)
    return views[0] if len(views) == 1 else tf.concat(views, axis=-1)
