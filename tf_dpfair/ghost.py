"""Fast per-example clipping from layer activations ("ghost" clipping).

Instead of differentiating every example separately through the whole network
(`clipping.clipped_gradient_sum`), one batched forward pass records each
parameterised layer's input `a` and output `y`, and one backward pass of the
summed loss gives every example's output gradient `g = dL_i/dy_i` (example i's
loss depends on its own rows only: BatchNorm in training mode is refused).
Everything else is done layer by layer, from `a` and `g`:

1. Each layer's share of every example's squared gradient norm:

   - Dense (any input rank; also EinsumDense of that form), Conv1D and Conv2D (and their kernel-transforming
     subclasses such as `nfnet.WSConv2D`), with a linear, ReLU, tanh or
     sigmoid activation. Example i's kernel gradient is `A_i^T G_i`, where
     `A_i` [P, K] holds its input patches (input rows for Dense) at the P
     output positions and `G_i` [P, O] its pre-activation output gradients.
     Two ways to get its norm; the cheaper is picked per layer:
     * direct: form `A_i^T G_i` (P*K*O multiply-adds per example);
     * norm trick: `||A_i^T G_i||^2 = sum((A_i A_i^T) * (G_i G_i^T))`
       (P^2*(K+O)), which wins when P is small: always for Dense on flat
       inputs (P = 1: `|a_i|^2 |g_i|^2`), never for large feature maps.
   - DepthwiseConv2D: direct, per channel.
   - Embedding: the norm trick over token positions (same token = same row).
   - LayerNormalization / GroupNormalization on the last axis: the output is
     `xhat * gamma + beta`, so the gamma gradient is `sum_p g * xhat`, read
     off the output where gamma allows (see `_NormalizationClip`).
   - Any other layer: its own per-example gradients, vectorized over examples
     for that layer only (`d(y_i . g_i)/d theta` with `a_i` and `g_i` fixed).

2. Each example's clip factor `s_i = weight_i * min(1, C / ||grad_i||)`.

3. The clipped sum, again per layer, with no second pass through the network:
   `sum_i s_i A_i^T G_i` is one matrix product of the patches with the
   reweighted output gradients (or, where the per-example gradients were
   formed and fit in memory, their reweighted sum).

It equals the vectorized path's sum (tested to 1e-5 relative). An example
whose gradient is not finite gets `s_i = 0`, and its rows are zeroed before
they are summed, so it contributes exactly nothing.
"""

import logging
import math

import keras
import tensorflow as tf

from tf_dpfair import clipping

_LOG = logging.getLogger(__name__)

LINEAR = "linear"
DEPTHWISE = "depthwise"
EMBEDDING = "embedding"
NORMALIZATION = "normalization"
GENERIC = "generic"

# Per-example kernel gradients formed for a norm are kept for the clipped sum
# while their total size stays below this; beyond it they are recomputed as a
# product of patches and reweighted output gradients.
KEEP_PER_EXAMPLE_BYTES = 256 * 2**20
# The Embedding norm trick forms [m, P, P]; above this many positions per
# example the layer uses its own vectorized per-example gradient instead.
MAX_EMBEDDING_POSITIONS = 1024

_ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")


def _activation_name(layer):
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return name if name in _ACTIVATIONS else None


def _weights_are(layer, *names):
    """True when the layer's trainable weights are exactly these attributes."""
    expected = [getattr(layer, n, None) for n in names]
    expected = {id(v) for v in expected if v is not None}
    return expected == {id(v) for v in layer.trainable_weights}


def _is_conv(layer, cls):
    """A `cls` (Conv1D/Conv2D proper, or a subclass whose only change is the
    kernel it convolves with) that the patch form handles."""
    if not isinstance(layer, cls):
        return False
    transformed = type(layer) is not cls
    if transformed and not callable(getattr(layer, "standardized_kernel", None)):
        return False
    extra = ("gain",) if transformed else ()
    return (layer.groups == 1 and layer.data_format == "channels_last"
            and layer.padding in ("valid", "same")
            and _activation_name(layer) is not None
            and (not transformed or hasattr(layer, "gain"))
            and _weights_are(layer, "kernel", "bias", *extra))


def _is_dense_like(layer):
    """Dense, or an EinsumDense that is a Dense on the last axis
    ("...c,cd->...d" with a 2-D kernel, bias on "d" or none)."""
    if type(layer) is keras.layers.Dense:
        return True
    if type(layer) is not keras.layers.EinsumDense:
        return False
    inputs, _, output = layer.equation.replace(" ", "").partition("->")
    inputs, _, kernel = inputs.partition(",")
    return (len(kernel) == 2 and inputs.endswith(kernel[0])
            and output == inputs[:-1] + kernel[1]
            and kernel[0] not in inputs[:-1] + kernel[1]
            and layer.bias_axes in (None, kernel[1])
            and "." not in inputs)


def layer_kind(layer):
    """How per-example norms and the clipped sum of `layer` are computed."""
    plain = not getattr(layer, "lora_enabled", False) and not getattr(
        layer, "quantization_mode", None)
    if not plain:
        return GENERIC
    if (_is_dense_like(layer) and _activation_name(layer)
            and _weights_are(layer, "kernel", "bias")):
        return LINEAR
    if _is_conv(layer, keras.layers.Conv2D) or _is_conv(layer, keras.layers.Conv1D):
        return LINEAR
    if (type(layer) is keras.layers.DepthwiseConv2D and _activation_name(layer)
            and layer.data_format == "channels_last"
            and _weights_are(layer, "kernel", "bias")):
        return DEPTHWISE
    if (type(layer) is keras.layers.Embedding
            and _weights_are(layer, "embeddings")):
        positions = _static_prod(layer.input.shape[1:])
        if positions is not None and positions <= MAX_EMBEDDING_POSITIONS:
            return EMBEDDING
    if type(layer) in (keras.layers.LayerNormalization,
                       keras.layers.GroupNormalization):
        rank = len(layer.input.shape)
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        if ([a % rank for a in axis] == [rank - 1]
                and _weights_are(layer, "gamma", "beta")):
            return NORMALIZATION
    return GENERIC


def _plan(model):
    """`(taps, None)`, or `(None, reason)` when ghost clipping cannot apply."""
    if not (getattr(model, "inputs", None) and getattr(model, "outputs", None)):
        return None, "it is not a functional model"
    if len(model.outputs) != 1:
        return None, "it has several outputs"
    taps = []
    covered = set()
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        try:
            if len(layer._inbound_nodes) != 1:
                raise ValueError
            layer.input  # raises for layers with several call sites
        except (AttributeError, ValueError):
            return None, f"layer {layer.name!r} is called more than once"
        node = layer._inbound_nodes[0]
        if len(node.input_tensors) != 1 or len(node.output_tensors) != 1:
            return None, f"layer {layer.name!r} has several inputs or outputs"
        taps.append((layer, layer_kind(layer)))
        covered.update(id(v) for v in layer.trainable_weights)
    if covered != {id(v) for v in model.trainable_weights}:
        return None, "some trainable weights are not owned by its top-level layers"
    return taps, None


def plan(model):
    """Returns the layers whose weights ghost clipping handles, or None.

    None means the model cannot use ghost clipping (it is not a functional
    graph, a layer with weights is used more than once, or trainable weights
    live outside the model's top-level layers); use the vectorized path.

    Args:
      model: a built functional Keras model.

    Returns:
      A list of `(layer, kind)` pairs, kind one of LINEAR, DEPTHWISE,
      EMBEDDING, NORMALIZATION, GENERIC; or None.
    """
    return _plan(model)[0]


def prepare(model, required):
    """The taps and tap model of ghost clipping, with a one-line notice of
    what falls back to per-example gradients.

    Args:
      model: a built Keras model.
      required: True when the user asked for ghost clipping: a model it
        cannot handle is then an error rather than a notice, and nested
        models with trainable weights are handled as generic layers (in
        "auto" they send the whole model to the vectorized path, which is
        then the cheaper).

    Returns:
      `(taps, tap_model)`, or None for the vectorized path.

    Raises:
      ValueError: `required` and the model cannot use ghost clipping.
    """
    taps, reason = _plan(model)
    nested = [layer.name for layer, kind in taps or ()
              if kind == GENERIC and isinstance(layer, keras.Model)]
    if nested and not required:
        # Its own per-example gradients would cost the vectorized path's
        # pass, on top of the tapped forward and backward passes.
        taps, reason = None, f"model layer(s) {', '.join(nested)} hold trainable weights"
    probe = None
    if taps is not None:
        try:
            probe = tap_model(model, taps)
        except ValueError as error:
            taps, reason = None, f"its layer graph cannot be tapped: {error}"
    if taps is None:
        if required:
            raise ValueError(
                f"DPConfig(clipping='ghost') needs a functional model whose "
                f"layers with weights are each called once, but {reason}; use "
                f"clipping='vectorized' or 'auto' for this model.")
        _LOG.warning("tf_dpfair: ghost clipping does not apply (%s); the "
                     "whole model uses vectorized per-example gradients.", reason)
        return None
    generic = [layer.name for layer, kind in taps if kind == GENERIC]
    if generic:
        _LOG.warning("tf_dpfair: ghost clipping has no closed form for %s; "
                     "those layers use their own vectorized per-example "
                     "gradients.", ", ".join(generic))
    return taps, probe


def tap_model(model, taps):
    """A model returning every tapped layer's input and output, then the output.

    The tensors are those of each layer's call in `model`'s graph (for a
    nested model, `layer.input` would be its own inner input instead).
    """
    nodes = [layer._inbound_nodes[0] for layer, _ in taps]
    outputs = ([node.input_tensors[0] for node in nodes]
               + [node.output_tensors[0] for node in nodes] + [model.outputs[0]])
    return keras.Model(model.inputs, outputs)


def _static_prod(dims):
    """Product of static dimensions, or None if one is unknown."""
    dims = list(dims)
    return None if None in dims else math.prod(dims)


def _per_example(t, m):
    """[m * K * ..., C] -> [m, positions, C]: views and positions of one example."""
    channels = t.shape[-1] if t.shape[-1] is not None else tf.shape(t)[-1]
    return tf.reshape(t, [m, -1, channels])


def _zero_rows(t, keep):
    """Zeroes example i's slice of `t` ([m, ...]) where keep[i] is False."""
    mask = tf.reshape(keep, [-1] + [1] * (t.shape.rank - 1))
    return tf.where(mask, t, tf.zeros_like(t))


def _scale_rows(t, scale, keep):
    """`scale[i] * t[i]`, exactly zero where keep[i] is False (even if NaN)."""
    t = _zero_rows(t, keep)
    return t * tf.reshape(scale, [-1] + [1] * (t.shape.rank - 1))


def _sq_sum(t):
    """[m, ...] -> [m]: sum of squares of each example's slice."""
    return tf.reduce_sum(tf.reshape(tf.square(t), [tf.shape(t)[0], -1]), axis=1)


def _pre_activation_grad(layer, y, g):
    """Output gradient before the layer's own activation, from its output y."""
    name = _activation_name(layer)
    y = tf.cast(y, g.dtype)
    if name == "relu":
        return g * tf.cast(y > 0, g.dtype)
    if name == "tanh":
        return g * (1.0 - tf.square(y))
    if name == "sigmoid":
        return g * y * (1.0 - y)
    return g


def _image_patches(a, kernel_size, strides, dilation, padding):
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


def _patches(layer, a):
    """The input patches each output position of a Dense/Conv layer reads."""
    if _is_dense_like(layer):
        return a
    if isinstance(layer, keras.layers.Conv1D):  # as a 1 x L image
        return _image_patches(a[:, tf.newaxis], (1, layer.kernel_size[0]),
                              (1, layer.strides[0]),
                              (1, layer.dilation_rate[0]), layer.padding)
    return _image_patches(a, layer.kernel_size, layer.strides,
                          layer.dilation_rate, layer.padding)


class _PerExampleClip:
    """A layer whose per-example gradients are formed: `self.grads` maps each
    weight's id to its `[m, *shape]` gradients; the clipped sum reweights them."""

    def __init__(self, layer, m, views, keep_budget):
        self.layer = layer
        self.grads = {}

    def clipped_sum(self, scale, keep):
        return {key: tf.reduce_sum(_scale_rows(t, scale, keep), axis=0)
                for key, t in self.grads.items()}


def _conv_kernel_grad(layer, a, g):
    """`sum_n dL/dkernel` of a conv on rows `a` with output gradients `g`.

    The gradient of TensorFlow's own convolution with respect to its kernel,
    which does not depend on the kernel's value (the op is linear in it).
    """
    kernel = tf.zeros(layer.kernel.shape, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        out = tf.nn.convolution(a, kernel, strides=layer.strides,
                                padding=layer.padding.upper(),
                                dilations=layer.dilation_rate)
    return tape.gradient(out, kernel, output_gradients=g)


class _LinearClip:
    """Dense / Conv1D / Conv2D: kernel gradient `A_i^T G_i`, bias `sum_p G_i`.

    Three ways to the per-example kernel norms, picked per layer from its
    static shapes (P output positions per example, views included; K = patch
    size; O = filters):

    - NORM_TRICK where `P (K + O) < K O` (always for Dense on flat inputs);
    - PATCHES, one batched product of the input patches and output gradients,
      for small feature maps or few input channels;
    - PER_EXAMPLE_CONV, the convolution's own kernel gradient example by
      example (`tf.map_fn`), where the patches would be large or slow to
      build: on a 2-core CPU it wins once `P K` exceeds `MAX_PATCH_ENTRIES`,
      and for strided convs with kernels larger than 1x1 (strided slices are
      slow there).

    Per-example kernel gradients that were formed are kept for the clipped
    sum while they fit in `KEEP_PER_EXAMPLE_BYTES`; otherwise the sum is one
    more kernel gradient of the batch with reweighted output gradients.

    A kernel-transforming conv (`y = conv(a, T(kernel, gain))`, nfnet.WSConv2D)
    is handled through the transformed kernel: per-example gradients with
    respect to `T`'s output are pulled back through `T` (linear in them).
    """

    NORM_TRICK = "norm_trick"
    PATCHES = "patches"
    PER_EXAMPLE_CONV = "per_example_conv"
    # Measured on the 2-core CPU, 32 examples (ms, patches / per example):
    # 64x64x3 -> 16 (110k entries) 4.5 / 2.8; 64x64x16 -> 16 (590k) 18 / 6.2;
    # 32x32x32 -> 32 (295k) 8.6 / 6.5; 16x16x64 -> 64 (147k) 7.9 / 8.9;
    # 16x16x32 -> 64 (74k) 2.9 / 5.3; 32x32x3 -> 32 (28k) 2.1 / 4.6;
    # 3x3 stride 2, 64x64x16 -> 32 (147k) 25 / 6.4.
    MAX_PATCH_ENTRIES = 100_000

    def __init__(self, layer, m, views, keep_budget):
        self.layer = layer
        self.views = views
        kernel_shape = layer.kernel.shape
        self.k = math.prod(kernel_shape[:-1])
        self.o = kernel_shape[-1]
        self.is_conv = not _is_dense_like(layer)
        self.transformed = callable(getattr(layer, "standardized_kernel", None))
        positions = _static_prod(layer.output.shape[1:-1])
        positions = None if positions is None else positions * views
        if (not self.transformed and positions is not None
                and positions * (self.k + self.o) < self.k * self.o):
            self.method = self.NORM_TRICK
        elif self.is_conv and (
                positions is None or positions * self.k > self.MAX_PATCH_ENTRIES
                or (max(layer.strides) > 1 and max(layer.kernel_size) > 1)):
            self.method = self.PER_EXAMPLE_CONV
        else:
            self.method = self.PATCHES
        size = m * self.k * self.o * 4
        self.keep = self.method != self.NORM_TRICK and size <= keep_budget[0]
        if self.keep:
            keep_budget[0] -= size

    @property
    def norm_trick(self):
        return self.method == self.NORM_TRICK

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        self.a = tf.cast(a, tf.float32)                   # rows [m * views, ...]
        self.g = _pre_activation_grad(layer, y, g)        # rows [m * views, ..., O]
        g_rows = _per_example(self.g, m)                  # [m, P, O]
        sq = tf.zeros([m], tf.float32)
        if layer.bias is not None:
            self.bias_grads = tf.reduce_sum(g_rows, axis=1)  # [m, O]
            sq += _sq_sum(self.bias_grads)
        self.kernel_grads = None
        if self.method == self.PER_EXAMPLE_CONV:
            kernel_grads = self._per_example_conv(m)
        else:
            a_rows = _per_example(_patches(layer, self.a), m)  # [m, P, K]
            if self.method == self.NORM_TRICK:
                if a_rows.shape[1] == 1:
                    kernel_sq = _sq_sum(a_rows) * _sq_sum(g_rows)
                else:
                    kernel_sq = tf.reduce_sum(
                        tf.einsum("mpk,mqk->mpq", a_rows, a_rows)
                        * tf.einsum("mpo,mqo->mpq", g_rows, g_rows), axis=[1, 2])
                return sq + kernel_sq
            kernel_grads = tf.einsum("mpk,mpo->mko", a_rows, g_rows)
        if self.transformed:
            kernel_grads = self._pull_back_each(kernel_grads)
            for extra in kernel_grads[1:]:
                sq += _sq_sum(extra)
        else:
            kernel_grads = [kernel_grads]
        sq += _sq_sum(kernel_grads[0])
        if self.keep:
            self.kernel_grads = kernel_grads
        return sq

    def _per_example_conv(self, m):
        """[m, *kernel shape]: each example's (views summed) kernel gradient."""
        def example_rows(t):
            return tf.reshape(t, tf.concat([[m, self.views], tf.shape(t)[1:]], 0))

        return tf.map_fn(
            lambda rows: _conv_kernel_grad(self.layer, rows[0], rows[1]),
            (example_rows(self.a), example_rows(self.g)),
            fn_output_signature=tf.float32, parallel_iterations=m)

    def _pull_back(self, grad_t):
        """Gradients of (kernel, gain) given the gradient of `T`'s output."""
        layer = self.layer
        with tf.GradientTape() as tape:
            transformed = layer.standardized_kernel(layer.kernel)
        return tape.gradient(
            transformed, [layer.kernel, layer.gain],
            output_gradients=tf.reshape(grad_t, layer.kernel.shape))

    def _pull_back_each(self, grads_t):
        return list(tf.vectorized_map(self._pull_back, grads_t))

    def clipped_sum(self, scale, keep):
        layer = self.layer
        if self.kernel_grads is not None:
            kernels = [tf.reduce_sum(_scale_rows(t, scale, keep), axis=0)
                       for t in self.kernel_grads]
        else:
            # One kernel gradient of the whole micro-batch, each row's output
            # gradient scaled by its example's factor.
            row_scale = tf.repeat(scale, self.views)
            row_keep = tf.repeat(keep, self.views)
            a = _zero_rows(self.a, row_keep)
            g = _scale_rows(self.g, row_scale, row_keep)
            if self.is_conv:
                kernel = _conv_kernel_grad(layer, a, g)
            else:
                kernel = tf.matmul(tf.reshape(a, [-1, self.k]),
                                   tf.reshape(g, [-1, self.o]), transpose_a=True)
            kernels = (self._pull_back(kernel) if self.transformed
                       else [kernel])
        grads = {id(layer.kernel): tf.reshape(kernels[0], layer.kernel.shape)}
        if self.transformed:
            grads[id(layer.gain)] = kernels[1]
        if layer.bias is not None:
            grads[id(layer.bias)] = tf.reduce_sum(
                _scale_rows(self.bias_grads, scale, keep), axis=0)
        return grads


class _DepthwiseClip(_PerExampleClip):
    """DepthwiseConv2D: per channel, the kernel gradient is `A_ic^T G_ic`."""

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        kh, kw, channels, multiplier = layer.kernel.shape
        a = tf.cast(a, tf.float32)
        g = _pre_activation_grad(layer, y, g)
        patches = _image_patches(a, layer.kernel_size, layer.strides,
                                 layer.dilation_rate, layer.padding)
        patches = tf.reshape(patches, [m, -1, kh * kw, channels])
        g = tf.reshape(g, [m, -1, channels, multiplier])
        self.grads[id(layer.kernel)] = tf.reshape(
            tf.einsum("mpsc,mpcj->mscj", patches, g), [m, *layer.kernel.shape])
        if layer.use_bias:
            self.grads[id(layer.bias)] = tf.reshape(tf.reduce_sum(g, axis=1), [m, -1])
        return tf.add_n([_sq_sum(t) for t in self.grads.values()])


class _EmbeddingClip:
    """Embedding: rows of the table; positions with the same token share one."""

    def __init__(self, layer, m, views, keep_budget):
        self.layer = layer

    def sq_norms(self, a, y, g, m):
        self.ids = tf.reshape(tf.cast(a, tf.int32), [m, -1])
        self.g = tf.reshape(g, [m, tf.shape(self.ids)[1], -1])
        same = tf.cast(self.ids[:, :, tf.newaxis] == self.ids[:, tf.newaxis, :],
                       tf.float32)
        return tf.reduce_sum(
            same * tf.einsum("mpd,mqd->mpq", self.g, self.g), axis=[1, 2])

    def clipped_sum(self, scale, keep):
        table = self.layer.embeddings
        rows = _scale_rows(self.g, scale, keep)
        return {id(table): tf.math.unsorted_segment_sum(
            tf.reshape(rows, [-1, table.shape[-1]]),
            tf.reshape(self.ids, [-1]), table.shape[0])}


class _NormalizationClip(_PerExampleClip):
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
        return tf.add_n([_sq_sum(t) for t in self.grads.values()])


class _GenericClip(_PerExampleClip):
    """Any layer: its own per-example gradients, vectorized over examples."""

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
            grads = tape.gradient(
                dot, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return [tf.cast(tf.convert_to_tensor(gr), tf.float32) for gr in grads]

        self.grads = dict(zip([id(v) for v in variables],
                              tf.vectorized_map(one, (a, g))))
        return tf.add_n([_sq_sum(t) for t in self.grads.values()])


_CLIPPERS = {LINEAR: _LinearClip, DEPTHWISE: _DepthwiseClip,
             EMBEDDING: _EmbeddingClip, NORMALIZATION: _NormalizationClip,
             GENERIC: _GenericClip}


def clipped_gradient_sum(taps, probe, variables, loss_fn, inputs, targets,
                         weights, l2_norm_clip, views=1):
    """Sum of per-example clipped gradients by ghost clipping.

    Args:
      taps: `plan(model)`.
      probe: `tap_model(model, taps)`.
      variables: the model's trainable variables.
      loss_fn: `loss_fn(targets, y_pred) -> [rows]` unreduced per-row losses.
      inputs: [m, ...], or [m, K, ...] with `views` = K.
      targets: nest of [m, ...] targets (repeated over views here).
      weights: [m] weights in [0, 1]; m must be static.
      l2_norm_clip: C.
      views: augmentation multiplicity K.

    Returns:
      A `clipping.ClippedSum`.
    """
    m = weights.shape[0]
    if m is None:
        raise ValueError("Ghost clipping needs a static micro-batch size.")
    if views > 1:
        inputs = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), inputs)
        targets = tf.nest.map_structure(
            lambda t: tf.repeat(t, views, axis=0), targets)
    n_taps = len(taps)
    with tf.GradientTape() as tape:
        outs = probe(inputs, training=True)
        layer_inputs, layer_outputs = outs[:n_taps], outs[n_taps:2 * n_taps]
        y_pred = outs[-1]
        losses = tf.reduce_mean(tf.reshape(loss_fn(targets, y_pred), [m, views]),
                                axis=1)
        total = tf.reduce_sum(losses)
    out_grads = tape.gradient(total, layer_outputs,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    keep_budget = [KEEP_PER_EXAMPLE_BYTES]
    clippers = [_CLIPPERS[kind](layer, m, views, keep_budget)
                for layer, kind in taps]
    sq = tf.zeros([m], tf.float32)
    for clipper, a, y, g in zip(clippers, layer_inputs, layer_outputs, out_grads):
        sq += clipper.sq_norms(a, y, tf.cast(g, tf.float32), m)
    norms = tf.sqrt(sq)
    finite = tf.math.is_finite(norms)
    scale = tf.minimum(1.0, l2_norm_clip / norms) * weights
    scale = tf.where(finite, scale, tf.zeros_like(scale))
    keep = scale > 0
    sums = {}
    for clipper in clippers:
        sums.update(clipper.clipped_sum(scale, keep))
    gradient_sum = [sums[id(v)] for v in variables]
    predictions = tf.reduce_mean(
        tf.reshape(tf.cast(y_pred, tf.float32),
                   tf.concat([[m, views], tf.shape(y_pred)[1:]], 0)), axis=1)
    return clipping.ClippedSum(gradient_sum, losses, predictions, norms,
                               tf.logical_not(finite))
