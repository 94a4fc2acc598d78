"""Fast per-example clipping from layer activations ("ghost" clipping).

Instead of differentiating every example separately through the whole network
(`clipping.clipped_gradient_sum`), one batched forward pass records each
parameterised layer's input `a` and output `y`, and one backward pass of the
summed loss gives every example's output gradient `g = dL_i/dy_i` (example i's
loss depends on its own rows only: BatchNorm in training mode is refused).
Per-example gradient norms then come layer by layer:

- Dense (2-D input) and Conv2D with a linear or ReLU activation: the kernel
  gradient of example i is `patches_i^T g_i` (for Dense the patches are the
  input rows), formed with one einsum; the bias gradient is `sum_p g_ip`. For
  ReLU, the pre-activation gradient is `g * (y > 0)`.
- Any other layer: its own per-example gradient, vectorized over examples for
  that layer only (`d(y_i . g_i)/d theta` with `a_i` and `g_i` fixed).

The clipped sum is one more backward pass over the same tape: the gradient of
the per-example losses weighted by `weight_i * min(1, C / ||g_i||)`. It equals
the vectorized path's sum (tested to 1e-5), at a fraction of its cost.
"""

import keras
import tensorflow as tf

from tf_dpfair import clipping

_DIRECT = "direct"
_GENERIC = "generic"


def _activation_kind(layer):
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    return {"linear": "linear", "relu": "relu"}.get(name)


def _layer_kind(layer):
    """How per-example norms of `layer`'s weights are computed."""
    if isinstance(layer, keras.layers.Conv2D) and not isinstance(
            layer, (keras.layers.Conv2DTranspose, keras.layers.DepthwiseConv2D,
                    keras.layers.SeparableConv2D)):
        if (layer.groups == 1 and layer.data_format == "channels_last"
                and _activation_kind(layer) and type(layer) is keras.layers.Conv2D):
            return _DIRECT
        return _GENERIC
    if (type(layer) is keras.layers.Dense and _activation_kind(layer)
            and len(layer.input.shape) == 2):
        return _DIRECT
    return _GENERIC


def plan(model):
    """Returns the layers whose weights ghost clipping handles, or None.

    None means the model cannot use ghost clipping (it is not a functional
    graph, a layer with weights is used more than once, or trainable weights
    live outside the model's top-level layers); use the vectorized path.

    Args:
      model: a built functional Keras model.

    Returns:
      A list of `(layer, kind)` pairs, or None.
    """
    if not (getattr(model, "inputs", None) and getattr(model, "outputs", None)):
        return None
    if len(model.outputs) != 1:
        return None
    taps = []
    covered = set()
    try:
        for layer in model.layers:
            if not layer.trainable_weights:
                continue
            if len(layer._inbound_nodes) != 1:  # shared layer: several inputs
                return None
            layer.input  # raises for layers with several call sites
            taps.append((layer, _layer_kind(layer)))
            covered.update(id(v) for v in layer.trainable_weights)
    except (AttributeError, ValueError):
        return None
    if covered != {id(v) for v in model.trainable_weights}:
        return None
    return taps


def tap_model(model, taps):
    """A model returning every tapped layer's input and output, then the output."""
    outputs = ([layer.input for layer, _ in taps]
               + [layer.output for layer, _ in taps] + [model.outputs[0]])
    return keras.Model(model.inputs, outputs)


def _per_example(t, m):
    """[m * K * ..., C] -> [m, positions, C]: views and positions of one example."""
    return tf.reshape(t, [m, -1, tf.shape(t)[-1]])


def _direct_sq_norm(layer, a, y, g, m):
    """Squared per-example gradient norm of a Dense/Conv2D (kernel and bias)."""
    if _activation_kind(layer) == "relu":
        g = g * tf.cast(y > 0, g.dtype)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        sh, sw = layer.strides
        dh, dw = layer.dilation_rate
        a = tf.image.extract_patches(
            a, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
            rates=[1, dh, dw, 1], padding=layer.padding.upper())
    a, g = _per_example(a, m), _per_example(g, m)
    kernel_grads = tf.einsum("mpk,mpo->mko", a, g)
    sq = tf.reduce_sum(tf.square(kernel_grads), axis=[1, 2])
    if layer.use_bias:
        sq += tf.reduce_sum(tf.square(tf.reduce_sum(g, axis=1)), axis=1)
    return sq


def _generic_sq_norm(layer, a, g, m):
    """Squared per-example gradient norm of any layer, vectorized over examples."""
    variables = layer.trainable_weights
    a = tf.nest.map_structure(
        lambda t: tf.reshape(t, tf.concat([[m, -1], tf.shape(t)[1:]], 0)), a)
    g = tf.reshape(g, tf.concat([[m, -1], tf.shape(g)[1:]], 0))

    def one(example):
        inputs, out_grad = example
        with tf.GradientTape() as tape:
            y = layer(inputs, training=True)
            dot = tf.reduce_sum(tf.cast(y, tf.float32) * out_grad)
        grads = tape.gradient(dot, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.add_n([tf.reduce_sum(tf.square(tf.convert_to_tensor(gr)))
                         for gr in grads])

    return tf.vectorized_map(one, (a, g))


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
      weights: [m] weights in [0, 1].
      l2_norm_clip: C.
      views: augmentation multiplicity K.

    Returns:
      A `clipping.ClippedSum`.
    """
    m = tf.shape(weights)[0]
    if views > 1:
        inputs = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), inputs)
        targets = tf.nest.map_structure(
            lambda t: tf.repeat(t, views, axis=0), targets)
    n_taps = len(taps)
    with tf.GradientTape(persistent=True) as tape:
        outs = probe(inputs, training=True)
        layer_inputs, layer_outputs = outs[:n_taps], outs[n_taps:2 * n_taps]
        y_pred = outs[-1]
        losses = tf.reduce_mean(tf.reshape(loss_fn(targets, y_pred), [m, views]),
                                axis=1)
        total = tf.reduce_sum(losses)
    out_grads = tape.gradient(total, layer_outputs)
    sq = tf.zeros([m], tf.float32)
    for (layer, kind), a, y, g in zip(taps, layer_inputs, layer_outputs, out_grads):
        g = tf.cast(g, tf.float32)
        if kind == _DIRECT:
            sq += _direct_sq_norm(layer, tf.cast(a, tf.float32), y, g, m)
        else:
            sq += _generic_sq_norm(layer, a, g, m)
    norms = tf.sqrt(sq)
    finite = tf.math.is_finite(norms)
    scale = tf.minimum(1.0, l2_norm_clip / norms) * weights
    scale = tf.where(finite, scale, tf.zeros_like(scale))
    gradient_sum = tape.gradient(
        losses, variables, output_gradients=scale,
        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    del tape
    # Embedding gradients arrive as IndexedSlices; the sum is kept dense.
    gradient_sum = [tf.convert_to_tensor(g) for g in gradient_sum]
    predictions = tf.reduce_mean(
        tf.reshape(tf.cast(y_pred, tf.float32),
                   tf.concat([[m, views], tf.shape(y_pred)[1:]], 0)), axis=1)
    return clipping.ClippedSum(gradient_sum, losses, predictions, norms,
                               tf.logical_not(finite))
