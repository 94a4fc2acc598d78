"""Finds BatchNormalization layers that would mix examples under DP training."""

import keras


def _all_layers(model):
    """Yields every layer of `model`, nested models included, once each."""
    seen = set()
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        yield layer
        stack.extend(getattr(layer, "layers", []))


def training_batchnorm_layers(model):
    """Returns the BatchNormalization layers of `model` that train their statistics.

    A trainable Keras 3 BatchNormalization layer normalises with the statistics of
    the current batch when called with `training=True`, so one example's output
    depends on the others and per-example clipping no longer bounds its
    influence. A non-trainable one runs in inference mode (moving statistics)
    and is safe.

    Args:
      model: a Keras model or layer.

    Returns:
      A list of the offending layers, in model order.
    """
    return [
        layer for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
