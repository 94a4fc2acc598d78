"""Wide ResNet with GroupNorm, the usual from-scratch DP baseline on 32x32 images.

WRN-16-4 (Zagoruyko & Komodakis 2016) with every BatchNorm replaced by
GroupNorm (16 groups), as in De et al. 2022 and Berrada et al. 2023: GroupNorm
normalises each example over its own channels, so examples never mix.
"""

import keras


def _gn(groups, name):
    return keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, name=name)


def _wide_block(x, index, channels, stride, groups, dropout_rate):
    """A pre-activation wide basic block; layers named `block{index}_*`."""
    prefix = f"block{index}_"
    out = _gn(groups, prefix + "gn0")(x)
    out = keras.layers.ReLU(name=prefix + "relu0")(out)
    if stride != 1 or x.shape[-1] != channels:
        shortcut = keras.layers.Conv2D(channels, 1, strides=stride, use_bias=False,
                                       kernel_initializer="he_normal",
                                       name=prefix + "shortcut")(out)
    else:
        shortcut = x
    out = keras.layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False,
                              kernel_initializer="he_normal", name=prefix + "conv0")(out)
    out = _gn(groups, prefix + "gn1")(out)
    out = keras.layers.ReLU(name=prefix + "relu1")(out)
    if dropout_rate:
        out = keras.layers.Dropout(dropout_rate, name=prefix + "dropout")(out)
    out = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                              kernel_initializer="he_normal", name=prefix + "conv1")(out)
    return keras.layers.Add(name=prefix + "add")([shortcut, out])


def wide_resnet(input_shape, num_classes, depth=16, width=4, groups=16, dropout_rate=0.0,
                name=None):
    """Builds a WRN-depth-width with GroupNorm.

    Args:
      input_shape: `(H, W, C)`, e.g. `(32, 32, 3)`.
      num_classes: number of logits.
      depth: `6 * n + 4`, n blocks per stage (10, 16, 22, 28, ...).
      width: widening factor k; stages have `(16k, 32k, 64k)` channels.
      groups: GroupNorm groups; must divide 16 (the stem's channels) and every
        stage's channels.
      dropout_rate: dropout between the two convs of a block.
      name: model name; default `wrn{depth}_{width}_gn`.

    Returns:
      A functional `keras.Model`: images `[B, H, W, C]` -> logits
      `[B, num_classes]`. Block outputs are the layers `block{i}_add`.

    Raises:
      ValueError: depth not of the form 6n + 4, or groups that do not divide
        the channel counts.
    """
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6 * n + 4 with n >= 1 (10, 16, 22, ...); got {depth!r}.")
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be positive; got {width}, {num_classes}.")
    if groups < 1 or 16 % groups:
        raise ValueError(f"groups must divide 16 (the stem's channels); got {groups}.")
    blocks_per_stage = (depth - 4) // 6
    inputs = keras.Input(tuple(input_shape), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
                            kernel_initializer="he_normal", name="stem_conv")(inputs)
    index = 0
    for stage, channels in enumerate((16 * width, 32 * width, 64 * width)):
        for b in range(blocks_per_stage):
            stride = 2 if stage > 0 and b == 0 else 1
            x = _wide_block(x, index, channels, stride, groups, dropout_rate)
            index += 1
    x = _gn(groups, "final_gn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name or f"wrn{depth}_{width}_gn")
