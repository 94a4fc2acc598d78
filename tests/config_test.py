"""Tests of DPConfig validation and serialization."""

import pytest

import tf_dpfair as dpf


def good(**overrides):
    args = dict(l2_norm_clip=1.0, noise_multiplier=1.1, expected_batch_size=256)
    args.update(overrides)
    return dpf.DPConfig(**args)


@pytest.mark.parametrize("overrides, message", [
    (dict(l2_norm_clip=0.0), "l2_norm_clip must be a finite number > 0"),
    (dict(l2_norm_clip=float("inf")), "l2_norm_clip must be a finite number"),
    (dict(noise_multiplier=-0.1), "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=float("nan")), "noise_multiplier must be a finite"),
    (dict(expected_batch_size=0), "expected_batch_size must be an integer >= 1"),
    (dict(expected_batch_size=2.0), "expected_batch_size must be an integer"),
    (dict(microbatch_size=0), "microbatch_size must be an integer >= 1"),
    (dict(augmult=0), "augmult must be an integer >= 1"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(seed=-1), "seed must be None or an integer"),
    (dict(l2_norm_clip=True), "l2_norm_clip must be a finite number"),
])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        good(**overrides)


def test_seed_is_secret_fresh_and_never_serialized():
    a, b = good(), good()
    assert a.seed != b.seed
    assert a.get_config()["seed"] is None
    restored = dpf.DPConfig.from_config(good(seed=42).get_config())
    assert restored.seed != 42
    assert restored.l2_norm_clip == 1.0 and restored.expected_batch_size == 256


def test_config_is_frozen_and_keyword_only():
    config = good()
    with pytest.raises(Exception):
        config.l2_norm_clip = 2.0
    with pytest.raises(TypeError):
        dpf.DPConfig(1.0, 1.1, 256)  # pylint: disable=too-many-function-args
    assert config.noise_stddev == pytest.approx(1.1)
