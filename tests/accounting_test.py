"""Tests of epsilon computation and noise calibration against published figures."""

import math

import pytest

from tf_dpfair import accounting

# TF-Privacy's published MNIST figures: N=60000, batch 256, 60 epochs,
# sigma=1.1, delta=1e-5: Poisson 2.60, shuffled fixed batches 56.95.
Q = 256 / 60000
STEPS = round(60 * 60000 / 256)


def test_poisson_rdp_reproduces_tf_privacy_figure():
    eps = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5)
    assert eps == pytest.approx(2.60, rel=0.01)


def test_shuffled_batches_get_no_amplification():
    eps = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5, sampling="shuffle")
    assert eps == pytest.approx(56.95, rel=0.01)


def test_shuffle_equals_one_gaussian_per_epoch_composed():
    # A second route: 60 compositions of the plain Gaussian mechanism.
    single = accounting.compute_epsilon(noise_multiplier=1.1 / math.sqrt(60),
                                        sampling_probability=1.0, steps=1,
                                        delta=1e-5, sampling="poisson")
    composed = accounting.compute_epsilon(noise_multiplier=1.1,
                                          sampling_probability=Q, steps=STEPS,
                                          delta=1e-5, sampling="shuffle")
    # Gaussian mechanisms compose exactly in RDP: 60 at sigma equal one at
    # sigma / sqrt(60).
    assert composed == pytest.approx(single, rel=1e-6)


def test_pld_is_a_tighter_second_opinion():
    rdp = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5)
    pld = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5, accountant="pld")
    assert 0.8 * rdp < pld < rdp


def test_calibration_inverts_compute_epsilon():
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=2.60, sampling_probability=Q, steps=STEPS, delta=1e-5)
    assert sigma == pytest.approx(1.1, abs=0.01)
    eps = accounting.compute_epsilon(noise_multiplier=sigma,
                                     sampling_probability=Q, steps=STEPS,
                                     delta=1e-5)
    assert eps <= 2.60
    slightly_less = accounting.compute_epsilon(
        noise_multiplier=sigma - 0.002, sampling_probability=Q, steps=STEPS,
        delta=1e-5)
    assert slightly_less > 2.60


def test_statement_names_sampling_and_accountant():
    text = str(accounting.privacy_statement(
        noise_multiplier=1.1, sampling_probability=Q, steps=10, delta=1e-5,
        sampling="shuffle"))
    assert "shuffled fixed-size batches" in text
    assert "no amplification" in text
    assert "RDP" in text


def test_zero_noise_is_infinite_epsilon_and_zero_steps_is_zero():
    assert accounting.compute_epsilon(noise_multiplier=0.0,
                                      sampling_probability=0.1, steps=5,
                                      delta=1e-5) == math.inf
    assert accounting.compute_epsilon(noise_multiplier=1.0,
                                      sampling_probability=0.1, steps=0,
                                      delta=1e-5) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampling="random"), "sampling must be one of"),
    (dict(accountant="gdp"), "accountant must be one of"),
    (dict(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
    (dict(sampling_probability=0.0), "sampling_probability must be in"),
    (dict(sampling_probability=1.5), "sampling_probability must be in"),
    (dict(steps=2.5), "steps must be a non-negative integer"),
    (dict(delta=0.0), "delta must be in"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_probability=0.01, steps=10,
                delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        accounting.compute_epsilon(**args)


def test_calibration_refuses_impossible_targets():
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=0, sampling_probability=Q, steps=10, delta=1e-5)
    with pytest.raises(ValueError, match="No noise multiplier up to 1e4"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=1e-9, sampling_probability=1.0, steps=10**6,
            delta=1e-5)
