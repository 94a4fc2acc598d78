"""Which layers ghost clipping taps, and how each one is handled.

No closed form lives here: this module walks a model's layer graph, gives
every layer with trainable weights a kind (the module whose closed form
applies, or the generic per-layer fallback) and builds the model that returns
each tapped layer's input and output.
"""

import keras

from tf_dpfair.ghost import dense_conv
from tf_dpfair.ghost import depthwise
from tf_dpfair.ghost import embedding
from tf_dpfair.ghost import norms

LINEAR = "linear"
DEPTHWISE = "depthwise"
EMBEDDING = "embedding"
NORMALIZATION = "normalization"
GENERIC = "generic"


def layer_kind(layer):
    """How per-example norms and the clipped sum of `layer` are computed."""
    plain = not getattr(layer, "lora_enabled", False) and not getattr(
        layer, "quantization_mode", None)
    if not plain:
        return GENERIC
    if dense_conv.handles(layer):
        return LINEAR
    if depthwise.handles(layer):
        return DEPTHWISE
    if embedding.handles(layer, layer.input.shape):
        return EMBEDDING
    if norms.handles(layer, layer.input.shape):
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


def tap_model(model, taps):
    """A model returning every tapped layer's input and output, then the output.

    The tensors are those of each layer's call in `model`'s graph (for a
    nested model, `layer.input` would be its own inner input instead).
    """
    nodes = [layer._inbound_nodes[0] for layer, _ in taps]
    outputs = ([node.input_tensors[0] for node in nodes]
               + [node.output_tensors[0] for node in nodes] + [model.outputs[0]])
    return keras.Model(model.inputs, outputs)
