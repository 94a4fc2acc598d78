"""Tests of DPConfig validation and serialization."""

import dataclasses
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
    (dict(ema_warmup=0.5), r"^ema_warmup must be None, 0 \(no warm-up\) or a finite number "
                           r">= 1, got 0\.5\.$"),
    (dict(ema_warmup=-10), r"^ema_warmup must be None, 0 \(no warm-up\) or a finite number "
                           r">= 1, got -10\.0\.$"),
    (dict(ema_warmup=float("inf")), r"^ema_warmup must be .* >= 1, got inf\.$"),
    (dict(ema_warmup=True), r"^ema_warmup must be .* >= 1, got True \(bool\)\.$"),
    (dict(ema_warmup="10"), r"^ema_warmup must be .* >= 1, got '10' \(str\)\.$"),
    # A refused seed is named by its type, never its value (it may be a secret).
    (dict(seed=-1), r"seed must be None or an integer in \[0, 2\*\*62\); got an integer "
                    r"outside that range \(the value is not shown: a seed is secret\)\.$"),
    (dict(seed=2**62 + 918273645), r"^seed must be None or an integer in \[0, 2\*\*62\); got an "
                                   r"integer outside that range \(the value is not shown: a "
                                   r"seed is secret\)\.$"),
    (dict(seed=0.5), r"seed must be None or an integer in \[0, 2\*\*62\); got a number that is "
                     r"not whole \(the value is not shown: a seed is secret\)\.$"),
    (dict(seed=np.float64("nan")), r"seed must be None or an integer in \[0, 2\*\*62\); got a "
                                   r"number that is not whole \(the value"),
    (dict(seed="918273645"), r"seed must be None or an integer in \[0, 2\*\*62\); got a str "
                             r"\(the value is not shown: a seed is secret\)\.$"),
    (dict(seed=True), r"seed must be None or an integer in \[0, 2\*\*62\); got a bool "),
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


# Many distinct digits, so a leak of any part of it is visible.
SECRET_SEED = 4_718_293_605_172_839


def _digit_runs(seed, length=6):
    """Every run of `length` consecutive digits of `seed` (a leak of part of it)."""
    digits = str(seed)
    return {digits[i:i + length] for i in range(len(digits) - length + 1)}


@pytest.mark.parametrize("seed", [SECRET_SEED, None], ids=["explicit", "default"])
def test_repr_and_str_hide_the_seed(seed):
    config = good(seed=seed, ema_decay=0.99)
    assert config.seed == (seed if seed is not None else config.seed) and config.seed > 0
    shown = {"repr": repr(config), "str": str(config), "format": f"{config}",
             "format_r": f"{config!r}", "percent": "%s %r" % (config, config),
             "in_a_list": str([config]), "in_a_dict": repr({"config": config})}
    for how, text in shown.items():
        assert "seed=<secret>" in text, (how, text)
        assert str(config.seed) not in text, (how, text)
        leaked = [run for run in _digit_runs(config.seed) if run in text]
        assert not leaked, (how, leaked, text)
    # The other fields stay readable.
    assert shown["repr"] == (
        "DPConfig(l2_norm_clip=1.0, noise_multiplier=1.1, expected_batch_size=256, "
        "microbatch_size=32, augmult=1, ema_decay=0.99, ema_warmup=10.0, clipping='auto', "
        "seed=<secret>)")


def test_pprint_and_replace_hide_the_seed():
    import dataclasses
    import pprint
    config = good(seed=SECRET_SEED)
    assert str(SECRET_SEED) not in pprint.pformat(config)
    assert str(SECRET_SEED) not in pprint.pformat([config, {"c": config}], width=20)
    replaced = dataclasses.replace(config, noise_multiplier=2.0)
    assert replaced.seed == SECRET_SEED and str(SECRET_SEED) not in repr(replaced)


def test_hash_does_not_depend_on_the_seed():
    # hash(int) is the int mod 2**61 - 1 and a tuple's hash can be unwound
    # given the other fields, so a hash over the seed would print it.
    assert hash(good(seed=SECRET_SEED)) == hash(good(seed=7)) == hash(good())
    assert good(seed=7) == good(seed=7) and good(seed=7) != good(seed=8)


def test_a_model_repr_and_its_config_hide_the_seed():
    keras = pytest.importorskip("keras")
    model = dpf.make_private(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
                             good(seed=SECRET_SEED))
    assert model.dp_config.seed == SECRET_SEED
    assert str(SECRET_SEED) not in repr(model.dp_config) + str(model.dp_config)
    assert str(SECRET_SEED) not in json.dumps(model.get_config(), default=str)


def test_ema_warmup_default_off_and_other_horizons():
    assert good().ema_warmup == 10.0  # the warm-up the package always had
    assert good(ema_warmup=None).ema_warmup is None
    assert good(ema_warmup=0).ema_warmup is None  # 0 means off, stored as None
    assert good(ema_warmup=0, seed=7) == good(ema_warmup=None, seed=7)
    assert hash(good(ema_warmup=0)) == hash(good(ema_warmup=None))
    assert hash(good(ema_warmup=50)) != hash(good())
    assert good(ema_warmup=np.int64(1000)).ema_warmup == 1000.0
    assert type(good(ema_warmup=np.int64(1000)).ema_warmup) is float
    assert good(ema_warmup=1).ema_warmup == 1.0  # allowed: same as off
    assert good(ema_warmup=50, seed=7) != good(seed=7)
    assert "ema_warmup=None" in repr(good(ema_warmup=0, seed=SECRET_SEED))
    assert str(SECRET_SEED) not in repr(good(ema_warmup=50, seed=SECRET_SEED))


@pytest.mark.parametrize("warmup", [10.0, None, 250.0])
def test_ema_warmup_survives_serialization(warmup):
    config = good(ema_decay=0.999, ema_warmup=warmup)
    saved = json.loads(json.dumps(config.get_config()))
    assert saved["ema_warmup"] == warmup
    restored = dpf.DPConfig.from_config(saved)
    assert restored.ema_warmup == warmup
    assert restored == dataclasses.replace(config, seed=restored.seed)


def test_a_config_saved_before_ema_warmup_loads_with_horizon_ten():
    old = {"l2_norm_clip": 1.0, "noise_multiplier": 1.1, "expected_batch_size": 256,
           "microbatch_size": 32, "augmult": 1, "ema_decay": 0.99, "clipping": "auto",
           "seed": None}
    restored = dpf.DPConfig.from_config(old)
    assert restored.ema_warmup == 10.0 and restored.ema_decay == 0.99
