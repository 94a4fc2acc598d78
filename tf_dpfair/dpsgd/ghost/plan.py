"""Which layers ghost clipping taps, and how each one is handled.

No closed form lives here. This module walks a model's layer graph, descending
into nested functional and Sequential models (a backbone inside a fine-tuning
model is tapped layer by layer, as if the graph were flat), gives every layer
with trainable weights a kind (the module whose closed form applies, or the
generic per-layer fallback), and runs the forward pass that records each
tapped layer's input and output (`Probe`).

What cannot be tapped, and why:
- a top-level model without a functional graph (subclassed), or with several
  outputs;
- a layer with weights called more than once (shared weights: its gradient
  would be the sum over its call sites), including a nested model called
  twice;
- a layer with weights taking several inputs or giving several outputs.
A nested model that is not a plain graph (subclassed, or overriding `call`)
is tapped as one generic layer.
"""

import dataclasses

import keras
import tensorflow as tf
# Nested graphs are walked with Keras' own graph runner and call-argument
# injection, so the probe computes exactly what `model(x, training=True)`
# computes; neither has a public name.
from keras.src.models import functional as keras_functional

from tf_dpfair.dpsgd.ghost import dense_conv
from tf_dpfair.dpsgd.ghost import depthwise
from tf_dpfair.dpsgd.ghost import embedding
from tf_dpfair.dpsgd.ghost import norms

LINEAR = "linear"
DEPTHWISE = "depthwise"
EMBEDDING = "embedding"
NORMALIZATION = "normalization"
GENERIC = "generic"


@dataclasses.dataclass
class Tap:
    """One layer with trainable weights, at its one call in the model.

    Attributes:
      layer: the Keras layer.
      kind: LINEAR, DEPTHWISE, EMBEDDING, NORMALIZATION or GENERIC.
      input_shape: static shape of its input at that call, batch first.
      output_shape: static shape of its output at that call.
      path: names of the nested models it sits in, outermost first.
    """

    layer: keras.layers.Layer
    kind: str
    input_shape: tuple
    output_shape: tuple
    path: tuple = ()

    @property
    def name(self):
        return "/".join(self.path + (self.layer.name,))


def layer_kind(layer, input_shape):
    """How per-example norms and the clipped sum of `layer` are computed.

    Args:
      layer: a layer with trainable weights.
      input_shape: the static shape of its input at its call, batch first.

    Returns:
      One of LINEAR, DEPTHWISE, EMBEDDING, NORMALIZATION, GENERIC.
    """
    plain = not getattr(layer, "lora_enabled", False) and not getattr(
        layer, "quantization_mode", None)
    if not plain:
        return GENERIC
    if dense_conv.handles(layer):
        return LINEAR
    if depthwise.handles(layer):
        return DEPTHWISE
    if embedding.handles(layer, input_shape):
        return EMBEDDING
    if norms.handles(layer, input_shape):
        return NORMALIZATION
    return GENERIC


def nested_graph(layer):
    """The functional graph a nested model runs, or None if it has none.

    A Sequential model built on an input runs its inner functional model; a
    functional model runs itself. A subclass overriding `call` may compute
    something else than its graph, so it is not walked.
    """
    if isinstance(layer, keras.Sequential):
        inner = getattr(layer, "_functional", None)
        if type(layer).call is keras.Sequential.call and inner is not None:
            return inner
        return None
    if (isinstance(layer, keras_functional.Functional)
            and type(layer).call is keras_functional.Functional.call):
        return layer
    return None


def _graph_nodes(graph):
    """The nodes of a functional graph in the order Keras runs them."""
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                yield node


def _walk(graph, path, found, nested):
    """Appends `(layer, node, path)` to `found` for every call of a layer with
    trainable weights in `graph`, descending into the nested graphs that hold
    some; `nested` maps each such nested model's id to its graph."""
    for node in _graph_nodes(graph):
        layer = node.operation
        if not getattr(layer, "trainable_weights", None):
            continue  # also Keras ops on tensors, such as `x * 2`
        inner = nested_graph(layer)
        if inner is not None:
            nested[id(layer)] = inner
            _walk(inner, path + (layer.name,), found, nested)
        else:
            found.append((layer, node, path))


def _top_graph(model):
    """The graph the model runs, or None (subclassed, or overriding `call`)."""
    if not (getattr(model, "inputs", None) and getattr(model, "outputs", None)):
        return None
    return nested_graph(model)


def plan_with_reason(model):
    """`(plan(model), None)`, or `(None, reason)` when ghost clipping cannot
    apply, the reason a phrase such as "layer 'dense' is called more than
    once"."""
    graph = _top_graph(model)
    if graph is None:
        return None, "it is not a functional model"
    if len(model.outputs) != 1:
        return None, "it has several outputs"
    found = []
    _walk(graph, (), found, {})
    taps = []
    seen = set()
    owners = {}
    for layer, node, path in found:
        if id(layer) in seen:
            return None, f"layer {layer.name!r} is called more than once"
        seen.add(id(layer))
        if len(node.input_tensors) != 1 or len(node.output_tensors) != 1:
            return None, f"layer {layer.name!r} has several inputs or outputs"
        for v in layer.trainable_weights:
            if id(v) in owners:
                return None, (f"layers {owners[id(v)]!r} and {layer.name!r} "
                              f"share the weight {v.name!r}")
            owners[id(v)] = layer.name
        input_shape = tuple(node.input_tensors[0].shape)
        taps.append(Tap(layer, layer_kind(layer, input_shape), input_shape,
                        tuple(node.output_tensors[0].shape), path))
    if set(owners) != {id(v) for v in model.trainable_weights}:
        return None, "some trainable weights are not owned by its layers"
    return taps, None


def plan(model):
    """Returns the layers whose weights ghost clipping handles, or None.

    None means the model cannot use ghost clipping (it is not a functional
    graph, a layer with weights is used more than once, or trainable weights
    live outside its layers); use the vectorized path.

    Args:
      model: a built functional (or Sequential) Keras model; nested
        functional and Sequential models are walked into.

    Returns:
      A list of `Tap`s in the order the forward pass calls them, or None.
    """
    return plan_with_reason(model)[0]


class _Intercept:
    """Stands in for a layer in Keras' call-argument injection, so that
    `training` reaches the call exactly as Keras would pass it."""

    def __init__(self, layer, call):
        self._call_context_args = getattr(layer, "_call_context_args", set())
        self._call = call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


class Probe:
    """The model's forward pass, recording each tapped layer's input and output.

    `probe(inputs, training=True)` returns `(layer_inputs, layer_outputs,
    outputs)`: lists in the order of `taps`, then the model's output. Nested
    graphs that hold taps are run node by node, the rest are called as the
    model calls them.

    Args:
      model: the model `plan` was made for.
      taps: `plan(model)`.
    """

    def __init__(self, model, taps):
        self._graph = _top_graph(model)
        self._index = {id(tap.layer): i for i, tap in enumerate(taps)}
        self._nested = {}
        _walk(self._graph, (), [], self._nested)
        self._count = len(taps)

    def __call__(self, inputs, training=True):
        layer_inputs = [None] * self._count
        layer_outputs = [None] * self._count
        out = self._run(self._graph, inputs, training, layer_inputs, layer_outputs)
        return layer_inputs, layer_outputs, out

    def _run(self, graph, inputs, training, layer_inputs, layer_outputs):
        def operation_fn(layer):
            def call(*args, **kwargs):
                index = self._index.get(id(layer))
                if index is not None:
                    out = layer(*args, **kwargs)
                    layer_inputs[index] = tf.nest.flatten((args, kwargs))[0]
                    layer_outputs[index] = out
                    return out
                inner = self._nested.get(id(layer))
                if inner is not None:
                    return self._run(inner, args[0], kwargs.get("training"),
                                     layer_inputs, layer_outputs)
                return layer(*args, **kwargs)
            return keras_functional.operation_fn(_Intercept(layer, call),
                                                 training=training)

        outputs = graph._run_through_graph(graph._standardize_inputs(inputs),
                                           operation_fn=operation_fn)
        return keras_functional.unpack_singleton(outputs)
