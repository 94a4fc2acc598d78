"""Fast per-example clipping from layer activations ("ghost" clipping).

Instead of differentiating every example separately through the whole network
(`clipping.clipped_gradient_sum`), one batched forward pass records each
parameterised layer's input `a` and output `y`, and one backward pass of the
summed loss gives every example's output gradient `g = dL_i/dy_i` (example i's
loss depends on its own rows only: BatchNorm in training mode is refused).
`plan` finds the layers, walking into nested functional and Sequential
models as if the graph were flat, and `Probe` runs that forward pass.
Everything else is done layer by layer, from `a` and `g`:

1. Each layer's share of every example's squared gradient norm, by the closed
   form of its kind (one module each, the closed form stated at its top):
   `dense_conv` (Dense, EinsumDense of Dense form, Conv1D, Conv2D and
   kernel-transforming convs such as `nfnet.WSConv2D`), `depthwise`
   (DepthwiseConv2D), `embedding`, `norms` (Layer/GroupNormalization), and
   `generic` for any other layer (its own per-example gradients, vectorized
   over examples for that layer only). Where a kind has several methods,
   `cost` picks one per layer from their work for the actual shapes.

2. Each example's clip factor `s_i = weight_i * min(1, C / ||grad_i||)`.

3. The clipped sum, again per layer, with no second pass through the network:
   `sum_i s_i A_i^T G_i` is one matrix product of the patches with the
   reweighted output gradients (or, where the per-example gradients were
   formed and fit in memory, their reweighted sum).

It equals the vectorized path's sum (tested to 1e-5 relative). Whatever the
method, each layer's share of example i in the sum is `s_i` times the very
gradient whose norm entered `||grad_i||`, so example i contributes at most C.
An example whose gradient is not finite gets `s_i = 0`, and its rows are
zeroed before they are summed, so it contributes exactly nothing.
"""

import logging

import keras
import tensorflow as tf

from tf_dpfair.dpsgd import adaptive
from tf_dpfair.dpsgd import clipping
from tf_dpfair.dpsgd.ghost import dense_conv
from tf_dpfair.dpsgd.ghost import depthwise
from tf_dpfair.dpsgd.ghost import embedding
from tf_dpfair.dpsgd.ghost import generic
from tf_dpfair.dpsgd.ghost import norms
from tf_dpfair.dpsgd.ghost.plan import (DEPTHWISE, EMBEDDING, GENERIC, LINEAR,
                                  NORMALIZATION, Probe, Tap, layer_kind, plan,
                                  plan_with_reason)

_LOG = logging.getLogger(__name__)

# Per-example kernel gradients formed for a norm are kept for the clipped sum
# while their total size stays below this; beyond it they are recomputed as a
# product of patches and reweighted output gradients.
KEEP_PER_EXAMPLE_BYTES = 256 * 2**20

_CLIPPERS = {LINEAR: dense_conv.LinearClip, DEPTHWISE: depthwise.DepthwiseClip,
             EMBEDDING: embedding.EmbeddingClip,
             NORMALIZATION: norms.NormalizationClip, GENERIC: generic.GenericClip}

__all__ = ["prepare", "clipped_gradient_sum", "plan", "plan_with_reason",
           "layer_kind", "make_clipper", "Probe", "Tap",
           "LINEAR", "DEPTHWISE", "EMBEDDING", "NORMALIZATION", "GENERIC"]


def prepare(model, required):
    """The taps and probe of ghost clipping, with a one-line notice of
    what falls back to per-example gradients.

    Args:
      model: a built Keras model.
      required: True when the user asked for ghost clipping: a model it
        cannot handle is then an error rather than a notice, and nested
        models without a functional graph (subclassed) that hold trainable
        weights are handled as generic layers (in "auto" they send the whole
        model to the vectorized path, which is then the cheaper). Nested
        functional and Sequential models are tapped layer by layer.

    Returns:
      `(taps, probe)` (`plan(model)` and its `Probe`), or None for the
      vectorized path.

    Raises:
      ValueError: `required` and the model cannot use ghost clipping.
    """
    taps, reason = plan_with_reason(model)
    opaque = [tap.name for tap in taps or ()
              if tap.kind == GENERIC and isinstance(tap.layer, keras.Model)]
    if opaque and not required:
        # Its own per-example gradients would cost the vectorized path's
        # pass, on top of the tapped forward and backward passes.
        taps, reason = None, (f"model layer(s) {', '.join(opaque)} without a "
                              f"functional graph hold trainable weights")
    if taps is None:
        if required:
            raise ValueError(
                f"DPConfig(clipping='ghost') needs a functional model whose "
                f"layers with weights are each called once, but {reason}; use "
                f"clipping='vectorized' or 'auto' for this model.")
        _LOG.warning("tf_dpfair: ghost clipping does not apply (%s); the "
                     "whole model uses vectorized per-example gradients.", reason)
        return None
    generic_names = [tap.name for tap in taps if tap.kind == GENERIC]
    if generic_names:
        _LOG.warning("tf_dpfair: ghost clipping has no closed form for %s; "
                     "those layers use their own vectorized per-example "
                     "gradients.", ", ".join(generic_names))
    return taps, Probe(model, taps)


class GhostState:
    """Taps and probe model of ghost clipping (deliberately not trackable).

    A plain holder, so that Keras does not track the probe model as a
    layer of the model it probes. `taps` is None where the model trains on
    the vectorized path.
    """

    def __init__(self, taps, probe):
        self.taps = taps
        self.probe = probe


def prepare_state(model, clipping_mode):
    """The `GhostState` of `model` under `DPConfig.clipping = clipping_mode`.

    "ghost" requires taps (`prepare` raises where the model allows none);
    "auto" uses them where the model allows (a functional graph whose
    weighted layers are each called once) and otherwise falls back to the
    vectorized path with a one-line notice; "vectorized" never uses them.
    """
    prepared = None
    if clipping_mode in ("ghost", "auto"):
        prepared = prepare(model, required=clipping_mode == "ghost")
    return GhostState(*(prepared or (None, None)))


def make_clipper(tap, m, views=1, keep_budget=None, method=None):
    """The object that computes one tapped layer's share of ghost clipping.

    Args:
      tap: a `Tap` of `plan(model)`.
      m: examples per micro-batch; views: augmented views per example.
      keep_budget: `[bytes]` left for keeping per-example gradients, reduced
        by what this layer keeps; default `[KEEP_PER_EXAMPLE_BYTES]`.
      method: one of the clipper's `estimates` to use instead of the cost
        model's choice.

    Returns:
      An object with `method`, `estimates` (`{method: cost.Estimate}`),
      `sq_norms(a, y, g, m) -> [m]` (the layer's share of each example's
      squared gradient norm, from its input rows a, output rows y and output
      gradients g) and then `clipped_sum(scale, keep) -> {id(variable): sum}`.
    """
    if keep_budget is None:
        keep_budget = [KEEP_PER_EXAMPLE_BYTES]
    return _CLIPPERS[tap.kind](tap, m, views, keep_budget, method)


def clipped_gradient_sum(taps, probe, variables, loss_fn, inputs, targets,
                         weights, l2_norm_clip, views=1, threshold=None):
    """Sum of per-example clipped gradients by ghost clipping.

    Args:
      taps: `plan(model)`.
      probe: `Probe(model, taps)`.
      variables: the model's trainable variables.
      loss_fn: `loss_fn(targets, y_pred) -> [rows]` unreduced per-row losses.
      inputs: [m, ...], or [m, K, ...] with `views` = K.
      targets: nest of [m, ...] targets (repeated over views here).
      weights: [m] weights in [0, 1]; m must be static.
      l2_norm_clip: C.
      views: augmentation multiplicity K.
      threshold: None, or the "global_adapt" threshold (see
        `adaptive.clip_factors`).

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
    with tf.GradientTape() as tape:
        layer_inputs, layer_outputs, y_pred = probe(inputs, training=True)
        losses = tf.reduce_mean(tf.reshape(loss_fn(targets, y_pred), [m, views]),
                                axis=1)
        total = tf.reduce_sum(losses)
    out_grads = tape.gradient(total, layer_outputs,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    keep_budget = [KEEP_PER_EXAMPLE_BYTES]
    clippers = [make_clipper(tap, m, views, keep_budget) for tap in taps]
    sq = tf.zeros([m], tf.float32)
    for clipper, a, y, g in zip(clippers, layer_inputs, layer_outputs, out_grads):
        sq += clipper.sq_norms(a, y, tf.cast(g, tf.float32), m)
    norms_ = tf.sqrt(sq)
    finite = tf.math.is_finite(norms_)
    scale = adaptive.clip_factors(norms_, l2_norm_clip, threshold) * weights
    scale = tf.where(finite, scale, tf.zeros_like(scale))
    keep = scale > 0
    sums = {}
    for clipper in clippers:
        sums.update(clipper.clipped_sum(scale, keep))
    gradient_sum = [sums[id(v)] for v in variables]
    predictions = tf.reduce_mean(
        tf.reshape(tf.cast(y_pred, tf.float32),
                   tf.concat([[m, views], tf.shape(y_pred)[1:]], 0)), axis=1)
    return clipping.ClippedSum(gradient_sum, losses, predictions, norms_,
                               tf.logical_not(finite))
