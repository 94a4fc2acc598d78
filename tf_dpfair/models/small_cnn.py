"""A small GroupNorm CNN for tests, demos and quick DP runs on small images."""

import keras


def small_cnn(input_shape, num_classes, filters=(32, 64), groups=8, name="small_cnn"):
    """Builds Conv-GroupNorm-ReLU-MaxPool, Conv-GroupNorm-ReLU, GlobalAvgPool, Dense.

    Args:
      input_shape: `(H, W, C)`, e.g. `(28, 28, 1)`.
      num_classes: number of logits.
      filters: channels of the two convs.
      groups: GroupNorm groups; must divide both entries of `filters`.
      name: model name.

    Returns:
      A functional `keras.Model`: `[B, H, W, C]` -> logits `[B, num_classes]`,
      with no BatchNorm (safe for per-example clipping as is).

    Raises:
      ValueError: `filters` not two positive ints divisible by `groups`.
    """
    if len(filters) != 2 or any(f < 1 or f % groups for f in filters):
        raise ValueError(
            f"filters must be two positive multiples of groups={groups}; got {filters}.")
    inputs = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Conv2D(filters[0], 3, padding="same", name="conv0")(inputs)
    x = keras.layers.GroupNormalization(groups=groups, name="gn0")(x)
    x = keras.layers.ReLU(name="relu0")(x)
    x = keras.layers.MaxPooling2D(2, name="pool0")(x)
    x = keras.layers.Conv2D(filters[1], 3, padding="same", name="conv1")(x)
    x = keras.layers.GroupNormalization(groups=groups, name="gn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)
