"""Ghost clipping of Dense, Conv1D and Conv2D layers.

Closed form: example i's kernel gradient is `A_i^T G_i`, where `A_i` [P, K]
holds its input patches (input rows for Dense) at its P output positions and
`G_i` [P, O] its pre-activation output gradients; its bias gradient is
`sum_p G_i[p]`. Two ways to the squared norm of the kernel gradient:

- direct: form `A_i^T G_i` (P*K*O multiply-adds per example) and square it,
  from the patches, from the conv's own kernel gradient example by example,
  or from one grouped kernel gradient with the examples folded into
  channels (see `LinearClip`);
- norm trick: `||A_i^T G_i||^2 = sum((A_i A_i^T) * (G_i G_i^T))`
  (P^2*(K+O)), which wins when P is small: always for Dense on flat inputs
  (P = 1: `|a_i|^2 |g_i|^2`), never for large feature maps.

The clipped sum `sum_i s_i A_i^T G_i` is one kernel gradient of the whole
micro-batch with each row's output gradient scaled by its example's factor
`s_i`, or the reweighted sum of the per-example gradients where they were
formed and kept.

Covers Dense on any input rank, EinsumDense of Dense form ("...c,cd->...d"),
Conv1D and Conv2D (and their kernel-transforming subclasses such as
`nfnet.WSConv2D`), with a linear, ReLU, tanh or sigmoid activation.
"""

import functools
import math

import keras
import tensorflow as tf

from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import tensors


def is_conv(layer, cls):
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
            and tensors.activation_name(layer) is not None
            and (not transformed or hasattr(layer, "gain"))
            and tensors.weights_are(layer, "kernel", "bias", *extra))


def is_dense_like(layer):
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


def handles(layer):
    """True when this module's closed form applies to `layer`."""
    if (is_dense_like(layer) and tensors.activation_name(layer)
            and tensors.weights_are(layer, "kernel", "bias")):
        return True
    return is_conv(layer, keras.layers.Conv2D) or is_conv(layer, keras.layers.Conv1D)


def _patches(layer, a):
    """The input patches each output position of a Dense/Conv layer reads."""
    if is_dense_like(layer):
        return a
    if isinstance(layer, keras.layers.Conv1D):  # as a 1 x L image
        return tensors.image_patches(a[:, tf.newaxis], (1, layer.kernel_size[0]),
                                     (1, layer.strides[0]),
                                     (1, layer.dilation_rate[0]), layer.padding)
    return tensors.image_patches(a, layer.kernel_size, layer.strides,
                                 layer.dilation_rate, layer.padding)


def conv_kernel_grad(layer, a, g):
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


@functools.lru_cache(maxsize=None)
def grouped_kernel_gradient_supported():
    """Whether TensorFlow's conv kernel gradient op accepts groups here.

    Its oneDNN CPU kernels and cuDNN do; its own (Eigen) CPU kernel, which
    TensorFlow uses where oneDNN is off (see `cost.onednn_enabled`), refuses
    any kernel with fewer input channels than the input. Found out by trying
    it once, on the default device, rather than from a list of platforms.
    """
    with tf.init_scope():
        try:
            grads = tf.raw_ops.Conv2DBackpropFilter(
                input=tf.ones([1, 2, 2, 2]), filter_sizes=[1, 1, 1, 2],
                out_backprop=tf.ones([1, 2, 2, 2]), strides=[1, 1, 1, 1],
                padding="VALID")
            return bool(tf.reduce_all(tf.equal(grads, 4.0)))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError,
                tf.errors.InternalError):
            return False


NORM_TRICK = "norm_trick"
PATCHES = "patches"
PER_EXAMPLE_CONV = "per_example_conv"
FOLDED_CONV = "folded_conv"


def estimates(tap, m, views, keep):
    """`{method: cost.Estimate}` of the per-example norms and the clipped sum.

    Args:
      tap: the layer's `plan.Tap`.
      m: examples in the micro-batch; views: augmented views per example.
      keep: whether per-example kernel gradients, where a method forms them,
        are kept for the clipped sum (else it is recomputed).
    """
    layer = tap.layer
    n = m * views
    k = math.prod(layer.kernel.shape[:-1])
    o = layer.kernel.shape[-1]
    rows = tensors.static_prod(tap.output_shape[1:-1])   # positions per row
    if rows is None:
        return {PER_EXAMPLE_CONV if not is_dense_like(layer) else PATCHES:
                cost.UNKNOWN_COST}
    p = rows * views                                      # per example
    conv = not is_dense_like(layer)
    transformed = callable(getattr(layer, "standardized_kernel", None))
    inputs = n * (tensors.static_prod(tap.input_shape[1:]) or 0)
    offsets = math.prod(layer.kernel_size) if conv else 1
    patch_entries = n * rows * k
    if offsets == 1 and (not conv or max(layer.strides) == 1):
        build = cost.Estimate()                           # patches = input rows
    else:
        # A strided conv reads the whole input: a 1x1 kernel through one
        # strided slice (~2.5 ns per input element measured, with oneDNN or
        # without), a larger one through one transpose (`kernel_views`).
        strided = conv and max(layer.strides) > 1
        through = (0 if not strided else 8 * inputs if offsets == 1
                   else 2 * inputs)
        build = cost.Estimate(
            elementwise=2 * patch_entries + through,
            calls=offsets + 2, peak_bytes=4 * patch_entries)
    # One kernel gradient of the batch with reweighted output gradients.
    recompute = cost.Estimate(elementwise=4 * n * rows * o + 2 * inputs, calls=4,
                              **({"conv": n * rows * k * o} if conv
                                 else {"blas": n * rows * k * o}))
    per_example = m * k * o
    reweigh = cost.Estimate(elementwise=2 * per_example, calls=3,
                            peak_bytes=4 * per_example)
    square = cost.Estimate(elementwise=2 * per_example, calls=2,
                           peak_bytes=4 * per_example)
    pull_back = (cost.Estimate(elementwise=20 * per_example, calls=20)
                 if transformed else cost.Estimate())
    found = {}
    if not transformed:
        if p == 1:
            trick = cost.Estimate(elementwise=2 * n * (k + o), calls=6)
        else:
            trick = build + cost.Estimate(
                blas=m * p * p * (k + o), elementwise=3 * m * p * p, calls=4,
                peak_bytes=4 * 2 * m * p * p)
        found[NORM_TRICK] = trick + recompute
    sum_ = reweigh if keep else recompute
    found[PATCHES] = (build + cost.Estimate(blas=n * rows * k * o, calls=2)
                      + square + pull_back + sum_)
    if conv:
        found[PER_EXAMPLE_CONV] = (cost.Estimate(
            conv=n * rows * k * o, example_calls=m, calls=2)
            + square + pull_back + sum_)
        if (len(layer.kernel_size) == 2 and max(layer.dilation_rate) == 1
                and grouped_kernel_gradient_supported()):
            outputs = n * rows * o
            found[FOLDED_CONV] = (cost.Estimate(
                grouped_conv=n * rows * k * o, calls=5,
                elementwise=2 * (inputs + outputs) + 2 * per_example * views,
                peak_bytes=4 * (inputs + outputs + per_example * views))
                + square + pull_back + sum_)
    return found


class LinearClip:
    """Dense / Conv1D / Conv2D: kernel gradient `A_i^T G_i`, bias `sum_p G_i`.

    Three ways to the per-example kernel norms, picked per layer by the cost
    model (`estimates`, `cost.cheapest`) from its static shapes (P output
    positions per example, views included; K = patch size; O = filters):

    - NORM_TRICK: `P^2 (K + O)` multiply-adds per example (Gram matrices of
      patches and of output gradients); for Dense on flat inputs (P = 1)
      just two squared norms;
    - PATCHES, one batched product of the input patches and output
      gradients (`P K O` per example), the patches built from
      `tensors.kernel_views`;
    - PER_EXAMPLE_CONV, the convolution's own kernel gradient example by
      example (`tf.map_fn`), no patch tensor;
    - FOLDED_CONV (Conv2D), one grouped kernel gradient with the examples
      folded into the channel axis ([n, H, W, C] -> [1, H, W, n*C], one group
      per example): every example's kernel gradient from one op; offered
      only where TensorFlow's kernels take groups
      (`grouped_kernel_gradient_supported`).

    Per-example kernel gradients that were formed are kept for the clipped
    sum while they fit in the keep budget; otherwise the sum is one
    more kernel gradient of the batch with reweighted output gradients.

    A kernel-transforming conv (`y = conv(a, T(kernel, gain))`, nfnet.WSConv2D)
    is handled through the transformed kernel: per-example gradients with
    respect to `T`'s output are pulled back through `T` (linear in them).
    """

    NORM_TRICK = NORM_TRICK
    PATCHES = PATCHES
    PER_EXAMPLE_CONV = PER_EXAMPLE_CONV
    FOLDED_CONV = FOLDED_CONV

    def __init__(self, tap, m, views, keep_budget, method=None):
        self.layer = layer = tap.layer
        self.views = views
        kernel_shape = layer.kernel.shape
        self.k = math.prod(kernel_shape[:-1])
        self.o = kernel_shape[-1]
        self.is_conv = not is_dense_like(layer)
        self.transformed = callable(getattr(layer, "standardized_kernel", None))
        size = m * self.k * self.o * 4
        fits = size <= keep_budget[0]
        self.estimates = estimates(tap, m, views, fits)
        if method is not None and method not in self.estimates:
            raise ValueError(f"{layer.name}: no method {method!r} here; it has "
                             f"{', '.join(self.estimates)}.")
        self.method = method or cost.cheapest(self.estimates)
        self.keep = self.method != NORM_TRICK and fits
        if self.keep:
            keep_budget[0] -= size

    @property
    def norm_trick(self):
        return self.method == self.NORM_TRICK

    def sq_norms(self, a, y, g, m):
        layer = self.layer
        self.a = tf.cast(a, tf.float32)                   # rows [m * views, ...]
        self.g = tensors.pre_activation_grad(layer, y, g)  # rows [m * views, ..., O]
        g_rows = tensors.per_example(self.g, m)            # [m, P, O]
        sq = tf.zeros([m], tf.float32)
        if layer.bias is not None:
            self.bias_grads = tf.reduce_sum(g_rows, axis=1)  # [m, O]
            sq += tensors.sq_sum(self.bias_grads)
        self.kernel_grads = None
        if self.method == self.PER_EXAMPLE_CONV:
            kernel_grads = self._per_example_conv(m)
        elif self.method == self.FOLDED_CONV:
            kernel_grads = self._folded_conv(m)
        else:
            a_rows = tensors.per_example(_patches(layer, self.a), m)  # [m, P, K]
            if self.method == self.NORM_TRICK:
                if a_rows.shape[1] == 1:
                    kernel_sq = tensors.sq_sum(a_rows) * tensors.sq_sum(g_rows)
                else:
                    kernel_sq = tf.reduce_sum(
                        tf.einsum("mpk,mqk->mpq", a_rows, a_rows)
                        * tf.einsum("mpo,mqo->mpq", g_rows, g_rows), axis=[1, 2])
                return sq + kernel_sq
            kernel_grads = tf.einsum("mpk,mpo->mko", a_rows, g_rows)
        if self.transformed:
            kernel_grads = self._pull_back_each(kernel_grads)
            for extra in kernel_grads[1:]:
                sq += tensors.sq_sum(extra)
        else:
            kernel_grads = [kernel_grads]
        sq += tensors.sq_sum(kernel_grads[0])
        if self.keep:
            self.kernel_grads = kernel_grads
        return sq

    def _per_example_conv(self, m):
        """[m, *kernel shape]: each example's (views summed) kernel gradient."""
        def example_rows(t):
            return tf.reshape(t, tf.concat([[m, self.views], tf.shape(t)[1:]], 0))

        return tf.map_fn(
            lambda rows: conv_kernel_grad(self.layer, rows[0], rows[1]),
            (example_rows(self.a), example_rows(self.g)),
            fn_output_signature=tf.float32, parallel_iterations=m)

    def _folded_conv(self, m):
        """[m, *kernel shape] from one grouped kernel gradient: with example
        j's channels at j*C .. j*C+C-1 of the input and j*O .. j*O+O-1 of the
        output gradients, group j of the kernel gradient is example j's."""
        layer = self.layer
        kh, kw, channels, filters = layer.kernel.shape

        def fold(t):
            """[n, H, W, D] -> [1, H, W, n * D], example-major channels."""
            return tf.reshape(tf.transpose(t, [1, 2, 0, 3]),
                              [1, t.shape[1], t.shape[2], -1])

        n = self.a.shape[0] or m * self.views
        grads = tf.raw_ops.Conv2DBackpropFilter(
            input=fold(self.a), filter_sizes=[kh, kw, channels, n * filters],
            out_backprop=fold(self.g), strides=[1, *layer.strides, 1],
            padding=layer.padding.upper())
        grads = tf.reshape(grads, [kh, kw, channels, m, self.views, filters])
        return tf.transpose(tf.reduce_sum(grads, axis=4), [3, 0, 1, 2, 4])

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
            kernels = [tf.reduce_sum(tensors.scale_rows(t, scale, keep), axis=0)
                       for t in self.kernel_grads]
        else:
            # One kernel gradient of the whole micro-batch, each row's output
            # gradient scaled by its example's factor.
            row_scale = tf.repeat(scale, self.views)
            row_keep = tf.repeat(keep, self.views)
            a = tensors.zero_rows(self.a, row_keep)
            g = tensors.scale_rows(self.g, row_scale, row_keep)
            if self.is_conv:
                kernel = conv_kernel_grad(layer, a, g)
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
                tensors.scale_rows(self.bias_grads, scale, keep), axis=0)
        return grads
