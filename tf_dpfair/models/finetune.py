"""Fine-tuning recipes: what to train, a fresh head, input adapters, loading.

Berrada et al. 2023 get their private accuracy by fine-tuning pre-trained,
BatchNorm-free or BatchNorm-frozen models. This module prepares any Keras
functional model for that; the result is a plain `keras.Model`, so it can be
wrapped by the DP model or trained with `fit` as is.

Blocks: layers named `block<i>_...` (the convention of every model in
`tf_dpfair.models`) form block i; "last N blocks" trains those and every layer
after them. BatchNorm layers stay frozen under every recipe unless asked.
"""

import os
import re

import keras

from tf_dpfair.models import efficientnet_lite
from tf_dpfair.models.batchnorm import freeze_batchnorm, replace_batchnorm

RECIPES = ("head", "last_blocks", "all")
NORMALIZATIONS = ("lite", "imagenet", None)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLOCK_NAME = re.compile(r"^(block\d+)_")


def leaf_layers(model):
    """Returns the non-model layers of `model` in call order, nested models flattened.

    Args:
      model: a Keras model.

    Returns:
      A list of layers (no `keras.Model` among them, no InputLayer).
    """
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(leaf_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            out.append(layer)
    return out


def model_blocks(model):
    """Groups the layers named `block<i>_*` by block, in call order.

    Args:
      model: a Keras model (nested models are searched).

    Returns:
      A list of `(block_name, [layers])`, e.g. `("block15", [...])`.
    """
    blocks = {}
    for layer in leaf_layers(model):
        match = _BLOCK_NAME.match(layer.name)
        if match:
            blocks.setdefault(match.group(1), []).append(layer)
    return list(blocks.items())


def set_trainable(model, recipe="head", num_blocks=1, train_batchnorm=False):
    """Chooses which layers fine-tuning updates, in place.

    Args:
      model: a Keras model; its last layer with weights is the head.
      recipe: `"head"` (linear probe: only the last layer with weights),
        `"last_blocks"` (the last `num_blocks` blocks and every layer after
        them) or `"all"`.
      num_blocks: blocks to train for `"last_blocks"`.
      train_batchnorm: let BatchNorm layers train too. Leave False for DP: a
        trainable BatchNorm normalises with batch statistics and mixes examples.

    Returns:
      `model`, for chaining.

    Raises:
      ValueError: unknown recipe, a model without weights, `num_blocks` < 1, or
        `"last_blocks"` on a model without `block<i>_` layers.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}; got {recipe!r}.")
    layers = leaf_layers(model)
    weighted = [i for i, layer in enumerate(layers) if layer.weights]
    if not weighted:
        raise ValueError(f"Model {model.name!r} has no layer with weights to train.")
    if recipe == "head":
        first = weighted[-1]
    elif recipe == "all":
        first = 0
    else:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int; got {num_blocks!r}.")
        blocks = model_blocks(model)
        if not blocks:
            raise ValueError(
                f"Model {model.name!r} has no layers named 'block<i>_...'; use recipe "
                "'head' or 'all', or name its blocks that way.")
        start = blocks[-min(num_blocks, len(blocks))][1][0]
        first = next(i for i, layer in enumerate(layers) if layer is start)
    model.trainable = True  # recursive: containers and leaves, fixed up below
    for i, layer in enumerate(layers):
        layer.trainable = i >= first
        if not train_batchnorm:
            # After the flag, which Keras copies down to every sublayer when
            # it changes: refreezes BatchNorm held by a custom layer or wrapper.
            freeze_batchnorm(layer)
    return model


def add_head(base, num_classes, dropout_rate=0.0, name="new_head"):
    """Puts a zero-initialised Dense classifier on a feature extractor.

    Zero weights make the first logits 0 for every input (uniform predictions),
    so no random head adds noise to early DP updates.

    Args:
      base: a built functional or Sequential model returning features
        `[B, F]` or a map `[B, H, W, F]` (global-average pooled first).
      num_classes: outputs of the new head.
      dropout_rate: dropout before the head.
      name: name of the new Dense layer.

    Returns:
      A functional model `base.inputs -> logits [B, num_classes]` sharing the
      base's layers (and weights).

    Raises:
      ValueError: bad `num_classes` or a base output of another rank.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    x = base.outputs[0]
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name=name + "_pool")(x)
    elif len(x.shape) != 2:
        raise ValueError(f"The base must output [B, F] or [B, H, W, F]; got {x.shape}.")
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name=name + "_dropout")(x)
    x = keras.layers.Dense(num_classes, kernel_initializer="zeros", name=name)(x)
    return keras.Model(base.inputs, x, name=base.name + "_finetune")


@keras.saving.register_keras_serializable(package="tf_dpfair")
class GrayscaleToRGB(keras.layers.Layer):
    """Repeats a single channel three times; 3-channel inputs pass unchanged.

    Input shape `[B, H, W, 1]` or `[B, H, W, 3]`; output `[B, H, W, 3]`.
    """

    def call(self, inputs):
        if inputs.shape[-1] == 3:
            return inputs
        return keras.ops.repeat(inputs, 3, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)


def input_adapter(input_shape, image_size, pixel_range=255.0, normalization="lite"):
    """Layers that turn the dataset's images into what a pretrained model expects.

    Args:
      input_shape: `(H, W, C)` of the data, C in {1, 3}, e.g. `(28, 28, 1)`.
      image_size: int or `(h, w)` the model takes, e.g. 64 or 224.
      pixel_range: the data's largest pixel value (255.0 for uint8, 1.0 for
        images already in [0, 1]).
      normalization: `"lite"` for EfficientNet-Lite, `(x - 127) / 128` on
        0..255 pixels; `"imagenet"` for the usual ImageNet mean/std on 0..1
        pixels; None to keep 0..255.

    Returns:
      A `keras.Sequential` mapping `[B, H, W, C]` to `[B, h, w, 3]`: rescale to
      0..255, grayscale to RGB, bilinear resize (antialiased), normalise.

    Raises:
      ValueError: bad channels, size, range or normalization.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, 1) or (H, W, 3); got {input_shape}.")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (h, w); got {image_size!r}.")
    if pixel_range <= 0:
        raise ValueError(f"pixel_range must be positive; got {pixel_range}.")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}.")
    layers = [keras.Input(input_shape)]
    if pixel_range != 255.0:
        layers.append(keras.layers.Rescaling(255.0 / pixel_range, name="to_0_255"))
    layers.append(GrayscaleToRGB(name="to_rgb"))
    if size != input_shape[:2]:
        layers.append(keras.layers.Resizing(*size, interpolation="bilinear", antialias=True,
                                            name="resize"))
    if normalization == "lite":
        layers.append(keras.layers.Rescaling(
            1.0 / efficientnet_lite.PIXEL_STD,
            offset=-efficientnet_lite.PIXEL_MEAN / efficientnet_lite.PIXEL_STD,
            name="lite_normalize"))
    elif normalization == "imagenet":
        layers.append(keras.layers.Normalization(
            mean=[255.0 * m for m in IMAGENET_MEAN],
            variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name="imagenet_normalize"))
    return keras.Sequential(layers, name="input_adapter")


def adapt_inputs(model, input_shape, pixel_range=255.0, normalization="lite"):
    """Prepends `input_adapter` to `model`, so it takes the dataset's images.

    Args:
      model: a model taking `[B, h, w, 3]`, with a static input size.
      input_shape, pixel_range, normalization: as in `input_adapter`.

    Returns:
      A functional model `[B, H, W, C] -> model's output`; `model` is nested
      in it unchanged (same weights and trainable flags).
    """
    size = tuple(model.inputs[0].shape[1:3])
    if None in size:
        raise ValueError(f"Model {model.name!r} has no static input size; got {size}.")
    adapter = input_adapter(input_shape, size, pixel_range, normalization)
    inputs = keras.Input(tuple(input_shape), name="image")
    return keras.Model(inputs, model(adapter(inputs)), name=model.name + "_adapted")


def efficientnet_lite0_finetune(num_classes, input_shape=(28, 28, 1), image_size=64,
                                weights_path="imagenet", recipe="all", num_blocks=1,
                                pixel_range=255.0, dropout_rate=0.0, batchnorm="auto",
                                group_norm_groups=8):
    """EfficientNet-Lite0 ready for (DP) fine-tuning on a small image dataset.

    Args:
      num_classes: classes of the new zero-initialised head.
      input_shape: the data's `(H, W, C)`, e.g. Fashion-MNIST's `(28, 28, 1)`.
      image_size: size the network runs at; 64 or 96 keep CPU cost low.
      weights_path: `"imagenet"`, a `.pth`/`.weights.h5` path, or None for
        random initialisation (the baseline to compare against).
      recipe, num_blocks: see `set_trainable`. BatchNorm stays frozen.
      pixel_range: the data's largest pixel value.
      dropout_rate: dropout before the new head.
      batchnorm: `"freeze"` (inference mode with the loaded statistics),
        `"groupnorm"` (`replace_batchnorm`), or `"auto"`: freeze pretrained
        weights, GroupNorm for random initialisation. Frozen BatchNorm at its
        initial statistics (mean 0, variance 1) normalises nothing, and the
        signal of a random EfficientNet then vanishes with depth (pooled
        features of std ~1e-12 at 64x64), so that is no fair baseline.
      group_norm_groups: largest group count when BatchNorm is replaced.

    Returns:
      A functional model: `[B, H, W, C]` pixels -> logits `[B, num_classes]`.

    Raises:
      ValueError: unknown `batchnorm`.
    """
    if batchnorm == "auto":
        batchnorm = "freeze" if weights_path is not None else "groupnorm"
    if batchnorm not in ("freeze", "groupnorm"):
        raise ValueError(f"batchnorm must be 'auto', 'freeze' or 'groupnorm'; got {batchnorm!r}.")
    base = efficientnet_lite.efficientnet_lite0(
        weights_path, include_top=False, input_shape=(image_size, image_size, 3))
    if batchnorm == "groupnorm":
        base = replace_batchnorm(base, group_norm_groups)
    model = add_head(base, num_classes, dropout_rate)
    set_trainable(model, recipe, num_blocks)
    return adapt_inputs(model, input_shape, pixel_range, normalization="lite")


def load_pretrained(path, model=None):
    """Loads a starting point for fine-tuning from a local file (nothing is fetched).

    Args:
      path: a `.keras` model file, a `.weights.h5` file (loaded into `model`),
        or a PyTorch EfficientNet-Lite0 `.pth` (loaded into `model`, default a
        new `efficientnet_lite0()`).
      model: the architecture for weights-only files.

    Returns:
      The loaded `keras.Model` (uncompiled for `.keras` files).

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: `.weights.h5` without `model`, or an unknown file type.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model file at {path!r}.")
    if path.endswith(".keras"):
        return keras.saving.load_model(path, compile=False)
    if path.endswith(".weights.h5"):
        if model is None:
            raise ValueError(f"{path!r} holds weights only: pass the model to load them into.")
        model.load_weights(path)
        return model
    if path.endswith(".pth"):
        if model is None:
            return efficientnet_lite.efficientnet_lite0(path)
        weights = efficientnet_lite.torch_to_keras_weights(
            efficientnet_lite.load_torch_state_dict(path))
        efficientnet_lite.assign_weights(model, weights, path)
        return model
    raise ValueError(f"Unsupported file {path!r}: expected .keras, .weights.h5 or .pth.")
