"""Depthwise convolutions' per-example norms and sums by every method equal
the vectorized path's; the cost model picks among methods by their estimates."""

import itertools

import keras
import numpy as np
import pytest

from ghost_fixtures import assert_same_norms_and_sums, assert_same_update, one_update
from tf_dpfair.dpsgd import ghost
from tf_dpfair.dpsgd.ghost import cost
from tf_dpfair.dpsgd.ghost import depthwise


def depthwise_model(kernel, strides, padding, dilation=1, multiplier=1,
                    size=(11, 10), seed=0):
    """A conv, then the depthwise conv under test (bias, ReLU), then a head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(size + (3,))
    h = keras.layers.Conv2D(4, 1)(inputs)
    h = keras.layers.DepthwiseConv2D(
        kernel, strides=strides, padding=padding, dilation_rate=dilation,
        depth_multiplier=multiplier, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(5)(h))


def data(n, size=(11, 10), augmult=1, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, augmult) + size + (3,) if augmult > 1 else (n,) + size + (3,)
    x = rng.normal(size=shape).astype(np.float32)
    y = rng.integers(0, 5, size=n)
    weights = rng.choice([0.5, 1.0], size=n).astype(np.float32)
    return x, y, weights


def use(monkeypatch, method):
    """Makes every depthwise layer that allows it use `method`."""
    real = cost.cheapest
    monkeypatch.setattr(cost, "cheapest", lambda estimates: (
        method if method in estimates else real(estimates)))


CASES = [(k, s, p, 1, 1) for k, s, p in itertools.product(
    (3, 5), (1, 2), ("same", "valid"))] + [
    (3, 1, "same", 2, 1),    # dilation
    (5, 1, "valid", 2, 1),
    (3, 2, "same", 1, 2),    # two output channels per input channel
    (2, 3, "same", 1, 1),    # an even kernel and a stride of 3
]


METHODS = [depthwise.SHIFTED, depthwise.FOLDED_KERNEL_GRAD,
           depthwise.FOLDED_CORRELATION]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernel, strides, padding, dilation, multiplier", CASES)
def test_depthwise_norms_and_sums_equal_vectorized(
        monkeypatch, method, kernel, strides, padding, dilation, multiplier):
    use(monkeypatch, method)
    model = depthwise_model(kernel, strides, padding, dilation, multiplier)
    tap = ghost.plan(model)[1]
    assert tap.kind == "depthwise"
    clipper = ghost.make_clipper(tap, 6)
    if dilation > 1:  # TensorFlow's depthwise kernel gradient takes no dilation
        assert list(clipper.estimates) == [depthwise.SHIFTED]
    assert clipper.method == (method if method in clipper.estimates
                              else depthwise.SHIFTED)
    x, y, weights = data(6)
    assert_same_norms_and_sums(model, x, y, weights, l2_norm_clip=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_depthwise_update_equals_vectorized_with_augmult(monkeypatch, method):
    use(monkeypatch, method)
    x, y, weights = data(7, augmult=3)

    def build():
        return depthwise_model(3, 2, "same", multiplier=2)

    fast = one_update("ghost", x, y, weights, build, augmult=3, microbatch=4)
    slow = one_update("vectorized", x, y, weights, build, augmult=3, microbatch=4)
    assert_same_update(fast, slow)


def test_unknown_spatial_size_takes_the_shifted_method():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    h = keras.layers.DepthwiseConv2D(5, strides=2, padding="same")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(5)(h))
    taps = ghost.plan(model)
    assert [ghost.make_clipper(tap, 6).method for tap in taps[:2]] == [
        "per_example_conv", depthwise.SHIFTED]
    x, y, weights = data(6)
    assert_same_norms_and_sums(model, x, y, weights, l2_norm_clip=0.05)


def test_cost_model_picks_the_cheapest_method_that_fits(monkeypatch):
    small = cost.Estimate(elementwise=1e6, peak_bytes=1e3)
    fast_but_big = cost.Estimate(blas=1e6, peak_bytes=2 * cost.MAX_TEMPORARY_BYTES)
    slow = cost.Estimate(elementwise=1e9, peak_bytes=1e3)
    assert cost.cheapest({"small": small, "slow": slow}) == "small"
    assert cost.cheapest({"big": fast_but_big, "slow": slow}) == "slow"
    assert cost.cheapest({"big": fast_but_big}) == "big"
    assert (small + slow).elementwise == 1e6 + 1e9
    assert cost.UNKNOWN_COST.seconds() == float("inf")


def test_depthwise_methods_are_chosen_by_kernel_size(monkeypatch):
    """With oneDNN, TensorFlow's depthwise kernel gradient is fast for 3x3
    kernels only: it is picked there, the correlation for 5x5; without
    oneDNN its estimate for 5x5 is no longer penalised."""
    def clipper(kernel, size=32):
        inputs = keras.Input((size, size, 96))
        tap = ghost.plan(keras.Model(
            inputs, keras.layers.DepthwiseConv2D(kernel, padding="same")(inputs)))[0]
        return ghost.make_clipper(tap, 32)

    monkeypatch.setattr(cost, "onednn_enabled", lambda: True)
    assert clipper(3).method == depthwise.FOLDED_KERNEL_GRAD
    assert clipper(5).method == depthwise.FOLDED_CORRELATION
    onednn = clipper(5).estimates[depthwise.FOLDED_KERNEL_GRAD].seconds()
    monkeypatch.setattr(cost, "onednn_enabled", lambda: False)
    assert clipper(5).estimates[depthwise.FOLDED_KERNEL_GRAD].seconds() < onednn / 10


def test_onednn_enabled_is_tensorflows_own_answer():
    """The cost model's oneDNN flag follows what TensorFlow runs, whichever
    way TF_ENABLE_ONEDNN_OPTS sets it (unset, TensorFlow decides by CPU)."""
    import os
    import subprocess
    import sys
    code = ("from tf_dpfair.dpsgd.ghost import cost\n"
            "from tensorflow.python.util import _pywrap_util_port as port\n"
            "print(cost.onednn_enabled(), port.IsMklEnabled())")
    for setting, expected in (("1", "True"), ("0", "False")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == [expected, expected], done.stdout
