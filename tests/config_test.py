"""Tests of DPConfig validation and serialization."""

import json

import numpy as np
import pytest

import tf_dpfair as dpf


def good(**overrides):
    args = dict(l2_norm_clip=1.0, noise_multiplier=1.1, expected_batch_size=256)
    args.update(overrides)
    return dpf.DPConfig(**args)


@pytest.mark.parametrize("overrides, message", [
    (dict(l2_norm_clip=0.0), r"l2_norm_clip must be a finite number > 0, got 0\.0\.$"),
    (dict(l2_norm_clip=-1), r"l2_norm_clip must be a finite number > 0, got -1\.0\.$"),
    (dict(l2_norm_clip=float("inf")), r"l2_norm_clip must be a finite number > 0, got inf\.$"),
    (dict(l2_norm_clip=np.float32("nan")),
     r"l2_norm_clip must be a finite number > 0, got nan\.$"),
    (dict(l2_norm_clip=True), r"l2_norm_clip must be a finite number > 0, got True \(bool\)\.$"),
    (dict(l2_norm_clip="1.0"), r"l2_norm_clip must be a finite number > 0, got '1\.0' \(str\)\.$"),
    (dict(noise_multiplier=-0.1), r"noise_multiplier must be a finite number >= 0, got -0\.1\.$"),
    (dict(noise_multiplier=np.float64(-0.5)),
     r"noise_multiplier must be a finite number >= 0, got -0\.5\.$"),
    (dict(noise_multiplier=float("nan")), r"noise_multiplier must be a finite number >= 0, "
                                          r"got nan\.$"),
    (dict(expected_batch_size=0), r"expected_batch_size must be an integer >= 1, got 0\.$"),
    (dict(expected_batch_size=np.int64(-8)),
     r"expected_batch_size must be an integer >= 1, got -8\.$"),
    (dict(expected_batch_size=2.5), r"expected_batch_size must be an integer >= 1; got 2\.5, "
                                    r"which is not a whole number\.$"),
    (dict(expected_batch_size=np.float32("nan")),
     r"expected_batch_size must be an integer >= 1; got nan, which is not a whole number\.$"),
    (dict(expected_batch_size=True), r"expected_batch_size must be an integer >= 1, got True "
                                     r"\(bool\)\.$"),
    (dict(expected_batch_size=np.bool_(True)),
     r"expected_batch_size must be an integer >= 1, got (np\.)?True_? \(bool_?\)\.$"),
    (dict(expected_batch_size="8"), r"expected_batch_size must be an integer >= 1, got '8' "
                                    r"\(str\)\.$"),
    (dict(microbatch_size=0), r"microbatch_size must be an integer >= 1, got 0\.$"),
    (dict(augmult=0), r"augmult must be an integer >= 1, got 0\.$"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\) or None, got 1\.0\.$"),
    (dict(ema_decay=False), r"ema_decay must be in \[0, 1\) or None, got False \(bool\)\.$"),
    (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*62\), got -1\.$"),
    (dict(seed=0.5), r"seed must be None or an integer in \[0, 2\*\*62\); got 0\.5, which is "
                     r"not a whole number\.$"),
])
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        good(**overrides)


def test_numpy_scalars_and_whole_floats_become_python_numbers():
    config = good(l2_norm_clip=np.float32(0.5), noise_multiplier=np.float64(1.25),
                  expected_batch_size=np.int64(8), microbatch_size=np.int32(4),
                  augmult=np.uint8(2), ema_decay=np.float32(0.5), seed=np.int64(7))
    values = {name: getattr(config, name) for name in (
        "l2_norm_clip", "noise_multiplier", "expected_batch_size", "microbatch_size",
        "augmult", "ema_decay", "seed")}
    # 0.5 and 1.25 are exact in float32, so the conversion loses nothing.
    assert values == dict(l2_norm_clip=0.5, noise_multiplier=1.25, expected_batch_size=8,
                          microbatch_size=4, augmult=2, ema_decay=0.5, seed=7)
    assert [type(v) for v in values.values()] == [float, float, int, int, int, float, int]
    assert config.noise_stddev == 0.625
    json.dumps(config.get_config())  # np.int64 would not serialize
    # A float that is a whole number is a valid count (e.g. N * q computed in floats).
    whole = good(expected_batch_size=256.0, microbatch_size=np.float64(32.0))
    assert (whole.expected_batch_size, whole.microbatch_size) == (256, 32)
    assert type(whole.expected_batch_size) is int


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
