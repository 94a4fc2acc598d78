"""Normalizer-free ResNets (NF-ResNets) in Keras 3, after Brock et al. 2021.

Berrada et al. 2023 fine-tune NFNets because they have no BatchNorm: each
example's output depends on that example alone, which per-example clipping
needs. Instead of normalising activations, an NF-ResNet keeps their scale
under control analytically:

- `WSConv2D`: scaled weight standardisation. Each output channel's kernel is
  standardised (zero mean, unit variance over its fan-in), scaled by
  1/sqrt(fan_in) and by a learnable gain, so a conv maps unit-variance inputs
  to unit-variance outputs at any width.
- Activations are scaled by gamma (1.7139 for ReLU) so that
  gamma * relu(z) has unit variance for z ~ N(0, 1).
- Each residual block computes `x + alpha * skip_gain * f(x / beta)`, where
  beta is the expected std of x (tracked analytically: the variance grows by
  alpha^2 per block and resets to 1 + alpha^2 at a transition block, whose
  shortcut is a conv of the normalised input), alpha = 0.2, and `skip_gain` is
  a learnable scalar initialised to zero (SkipInit), so at initialisation every
  block is the identity on its residual path.
"""

import math

import keras
from keras import ops

# Var of relu(z), z ~ N(0, 1), is (1 - 1/pi) / 2; gamma rescales it to 1.
RELU_GAMMA = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))


@keras.saving.register_keras_serializable(package="tf_dpfair")
class WSConv2D(keras.layers.Conv2D):
    """Conv2D with scaled weight standardisation and a learnable per-channel gain.

    The kernel used is `gain * (W - mean) / sqrt(var * fan_in + eps)`, with mean
    and var taken per output channel over the `kh * kw * in` fan-in. The
    standardisation is part of the forward pass, so gradients flow through it.

    Args:
      filters, kernel_size, ...: as `keras.layers.Conv2D`.
      eps: floor on `var * fan_in`, for kernels that are (nearly) constant.

    Input shape: `[B, H, W, C_in]`. Output shape: `[B, H', W', filters]`.
    """

    def __init__(self, filters, kernel_size, eps=1e-4, **kwargs):
        kwargs.setdefault("kernel_initializer", "he_normal")
        super().__init__(filters, kernel_size, **kwargs)
        self.eps = eps

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="ones")

    def standardized_kernel(self, kernel=None):
        """Returns the kernel actually convolved, `[kh, kw, C_in, filters]`."""
        kernel = self.kernel if kernel is None else kernel
        fan_in = math.prod(kernel.shape[:-1])
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
        scale = ops.rsqrt(ops.maximum(var * fan_in, self.eps)) * self.gain
        return (kernel - mean) * scale

    def convolution_op(self, inputs, kernel):
        # Conv2D.call passes the raw kernel here; bias and activation stay its job.
        return super().convolution_op(inputs, self.standardized_kernel(kernel))

    # Conv2D saves only kernel and bias by position; the gain goes after them.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built:
            store[str(2 if self.use_bias else 1)] = self.gain

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built:
            self.gain.assign(store[str(2 if self.use_bias else 1)])

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package="tf_dpfair")
class ScaledActivation(keras.layers.Layer):
    """`gamma * activation(inputs / beta)`: a variance-preserving activation.

    Args:
      activation: a Keras activation name; only "relu" has a built-in gamma.
      beta: the expected std of the input, divided out first.
      gamma: output scale; default `RELU_GAMMA` for ReLU.

    Raises:
      ValueError: an activation other than relu without an explicit gamma.
    """

    def __init__(self, activation="relu", beta=1.0, gamma=None, **kwargs):
        super().__init__(**kwargs)
        if gamma is None:
            if activation != "relu":
                raise ValueError(
                    f"Give gamma for activation {activation!r}; only relu has a default.")
            gamma = RELU_GAMMA
        self.activation_name = activation
        self.activation = keras.activations.get(activation)
        self.beta = float(beta)
        self.gamma = float(gamma)

    def call(self, inputs):
        return self.activation(inputs / self.beta) * self.gamma

    def get_config(self):
        return {**super().get_config(), "activation": self.activation_name,
                "beta": self.beta, "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="tf_dpfair")
class SkipGain(keras.layers.Layer):
    """Multiplies the residual branch by `alpha * g`, g a learnable scalar (init 0).

    Args:
      alpha: fixed rate at which a block adds variance (alpha^2 per block).
      initial_value: initial g; 0 (SkipInit) makes the block the identity.
    """

    def __init__(self, alpha=0.2, initial_value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.initial_value = float(initial_value)

    def build(self, input_shape):
        self.skip_gain = self.add_weight(
            name="skip_gain", shape=(),
            initializer=keras.initializers.Constant(self.initial_value))

    def call(self, inputs):
        return inputs * (self.alpha * self.skip_gain)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "initial_value": self.initial_value}


def _nf_block(x, index, channels, stride, beta, alpha, activation):
    """A pre-activation basic block; layers named `block{index}_*`."""
    prefix = f"block{index}_"
    out = ScaledActivation(activation, beta=beta, name=prefix + "act0")(x)
    transition = stride != 1 or x.shape[-1] != channels
    if transition:
        # The shortcut sees the normalised input, so the variance resets here.
        shortcut = WSConv2D(channels, 1, strides=stride, name=prefix + "shortcut")(out)
    else:
        shortcut = x
    out = WSConv2D(channels, 3, strides=stride, padding="same", name=prefix + "conv0")(out)
    out = ScaledActivation(activation, name=prefix + "act1")(out)
    out = WSConv2D(channels, 3, padding="same", name=prefix + "conv1")(out)
    out = SkipGain(alpha, name=prefix + "skip_gain")(out)
    return keras.layers.Add(name=prefix + "add")([shortcut, out]), transition


def nf_resnet(input_shape, num_classes, depth=26, width=1, alpha=0.2, base_channels=16,
              activation="relu", dropout_rate=0.0, stem_stride=1, name=None):
    """Builds a normalizer-free ResNet (basic pre-activation blocks, 3 stages).

    Args:
      input_shape: `(H, W, C)` of the images, e.g. `(32, 32, 3)`.
      num_classes: number of logits.
      depth: layers as in CIFAR ResNets: `6 * n + 2`, n blocks per stage
        (8, 14, 20, 26, ...).
      width: channel multiplier; stages have `base_channels * width * (1, 2, 4)`.
      alpha: variance added per block (0.2 as in NF-ResNets).
      base_channels: channels of the first stage at width 1.
      activation: "relu" (its gamma is known).
      dropout_rate: dropout before the classifier.
      stem_stride: stride of the 3x3 stem; use 2 for large inputs.
      name: model name; default `nf_resnet{depth}_{width}`.

    Returns:
      A functional `keras.Model`: images `[B, H, W, C]` -> logits
      `[B, num_classes]`. The classifier starts at zero, as in NFNets. Block
      outputs are the layers `block{i}_add`.

    Raises:
      ValueError: depth not of the form 6n + 2, or non-positive sizes.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6 * n + 2 with n >= 1 (8, 14, 20, ...); got {depth!r}.")
    if width < 1 or base_channels < 1 or num_classes < 1:
        raise ValueError(f"width, base_channels and num_classes must be positive; got "
                         f"{width}, {base_channels}, {num_classes}.")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive; got {alpha}.")
    blocks_per_stage = (depth - 2) // 6
    inputs = keras.Input(tuple(input_shape), name="image")
    x = WSConv2D(base_channels * width, 3, strides=stem_stride, padding="same",
                 name="stem_conv")(inputs)
    expected_var = 1.0  # the stem maps unit-variance inputs to unit variance
    index = 0
    for stage, multiplier in enumerate((1, 2, 4)):
        for b in range(blocks_per_stage):
            stride = 2 if stage > 0 and b == 0 else 1
            x, transition = _nf_block(x, index, base_channels * width * multiplier, stride,
                                      math.sqrt(expected_var), alpha, activation)
            expected_var = (1.0 if transition else expected_var) + alpha ** 2
            index += 1
    x = ScaledActivation(activation, beta=math.sqrt(expected_var), name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout_rate:
        x = keras.layers.Dropout(dropout_rate, name="top_dropout")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name or f"nf_resnet{depth}_{width}")
