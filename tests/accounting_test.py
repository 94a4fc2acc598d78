"""Tests of epsilon computation and noise calibration against published figures."""

import math

import dp_accounting
import pytest

from tf_dpfair.privacy import accounting
from tf_dpfair.privacy import sampling

# TF-Privacy's published MNIST figures: N=60000, batch 256, 60 epochs,
# sigma=1.1, delta=1e-5: Poisson 2.60, shuffled fixed batches 56.95.
Q = 256 / 60000
STEPS = round(60 * 60000 / 256)


def direct_gaussian_epsilon(sigma, count, delta):
    """A second route: dp_accounting's RDP accountant on `count` plain Gaussians."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), count)
    return accountant.get_epsilon(delta)


def test_poisson_rdp_reproduces_tf_privacy_figure():
    eps = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5, sampling="poisson")
    assert eps == pytest.approx(2.60, rel=0.01)


def test_shuffled_batches_get_no_amplification():
    eps = accounting.compute_epsilon(noise_multiplier=1.1, participations=60,
                                     steps=STEPS, delta=1e-5, sampling="shuffle")
    assert eps == pytest.approx(56.95, rel=0.01)


def test_shuffle_equals_one_gaussian_per_participation_composed():
    # Gaussian mechanisms compose exactly in RDP: 60 at sigma equal one at
    # sigma / sqrt(60).
    single = direct_gaussian_epsilon(1.1 / math.sqrt(60), 1, 1e-5)
    composed = accounting.compute_epsilon(noise_multiplier=1.1,
                                          participations=60, steps=STEPS,
                                          delta=1e-5, sampling="shuffle")
    assert composed == pytest.approx(single, rel=1e-6)


def test_epochs_started_by_hand():
    assert accounting.epochs_started(0, 3) == 0
    assert accounting.epochs_started(1, 3) == 1
    assert accounting.epochs_started(3, 3) == 1
    assert accounting.epochs_started(4, 3) == 2
    assert accounting.epochs_started(30, 3) == 10
    with pytest.raises(ValueError, match="steps_per_epoch must be an integer >= 1"):
        accounting.epochs_started(5, 0)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        accounting.epochs_started(-1, 3)


@pytest.mark.parametrize("num, batch, sigma, steps, participations", [
    (1000, 300, 1.0, 30, 10),    # 3 updates per epoch: 10 epochs, not ceil(30 * 0.3) = 9
    (1000, 600, 1.0, 10, 10),    # 1 update per epoch: every update is a new epoch
    (60000, 256, 1.1, 703, 4),   # 234 updates per epoch: 703 updates start 4 epochs
    (1000, 250, 1.0, 12, 3),     # B divides N: ceil(12 / 4)
])
def test_shuffle_spec_counts_started_epochs_when_batch_does_not_divide(
        num, batch, sigma, steps, participations):
    spec = sampling.make_sampling_spec("shuffle", num, batch)
    kwargs = spec.accountant_kwargs(steps)
    assert kwargs["participations"] == participations
    # Independently: steps_per_epoch = N // B, count by hand above.
    assert participations == -(-steps // (num // batch))
    eps = accounting.compute_epsilon(noise_multiplier=sigma, delta=1e-5, **kwargs)
    assert eps == pytest.approx(direct_gaussian_epsilon(sigma, participations, 1e-5),
                                rel=1e-9)


def test_issue_reproduction_figures():
    # N=1000, B=300, 30 updates: 19.05 (10 Gaussians), not 17.80 (9).
    spec = sampling.make_sampling_spec("shuffle", 1000, 300)
    eps = accounting.compute_epsilon(noise_multiplier=1.0, delta=1e-5,
                                     **spec.accountant_kwargs(30))
    assert eps == pytest.approx(19.05, abs=0.01)
    # N=60000, B=256, sigma 1.1, 703 updates: 9.55, not 8.04.
    spec = sampling.make_sampling_spec("shuffle", 60000, 256)
    eps = accounting.compute_epsilon(noise_multiplier=1.1, delta=1e-5,
                                     **spec.accountant_kwargs(703))
    assert eps == pytest.approx(9.55, abs=0.01)


def test_sampling_arguments_match_the_spec():
    for mode in ("poisson", "shuffle"):
        spec = sampling.make_sampling_spec(mode, 1000, 300)
        assert accounting.sampling_arguments(
            sampling=mode, num_examples=1000, batch_size=300,
            steps=31) == spec.accountant_kwargs(31)
    with pytest.raises(ValueError, match="batch_size=300 is larger than num_examples=100"):
        accounting.sampling_arguments(sampling="shuffle", num_examples=100,
                                      batch_size=300, steps=3)


def test_pld_is_a_tighter_second_opinion():
    rdp = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5, sampling="poisson")
    pld = accounting.compute_epsilon(noise_multiplier=1.1, sampling_probability=Q,
                                     steps=STEPS, delta=1e-5, accountant="pld",
                                     sampling="poisson")
    assert 0.8 * rdp < pld < rdp


def test_calibration_inverts_compute_epsilon():
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=2.60, sampling_probability=Q, steps=STEPS, delta=1e-5,
        sampling="poisson")
    assert sigma == pytest.approx(1.1, abs=0.01)
    eps = accounting.compute_epsilon(noise_multiplier=sigma,
                                     sampling_probability=Q, steps=STEPS,
                                     delta=1e-5, sampling="poisson")
    assert eps <= 2.60
    slightly_less = accounting.compute_epsilon(
        noise_multiplier=sigma - 0.002, sampling_probability=Q, steps=STEPS,
        delta=1e-5, sampling="poisson")
    assert slightly_less > 2.60


def test_shuffle_calibration_uses_participations():
    kwargs = sampling.make_sampling_spec("shuffle", 1000, 300).accountant_kwargs(30)
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=19.05, delta=1e-5,
                                                  **kwargs)
    assert sigma == pytest.approx(1.0, abs=0.002)
    assert direct_gaussian_epsilon(sigma, 10, 1e-5) <= 19.05


def test_statement_names_sampling_participations_and_accountant():
    text = str(accounting.privacy_statement(
        noise_multiplier=1.1, participations=4, steps=10, delta=1e-5,
        sampling="shuffle"))
    assert "each example in at most 4 of them" in text
    assert "no amplification" in text
    assert "zero-out" in text
    assert "RDP" in text
    text = str(accounting.privacy_statement(
        noise_multiplier=1.1, sampling_probability=Q, steps=10, delta=1e-5,
        sampling="poisson"))
    assert "amplification by subsampling applies" in text and "add/remove" in text


def test_zero_noise_is_infinite_epsilon_and_zero_steps_is_zero():
    assert accounting.compute_epsilon(noise_multiplier=0.0,
                                      sampling_probability=0.1, steps=5,
                                      delta=1e-5, sampling="poisson") == math.inf
    assert accounting.compute_epsilon(noise_multiplier=1.0,
                                      sampling_probability=0.1, steps=0,
                                      delta=1e-5, sampling="poisson") == 0.0
    assert accounting.compute_epsilon(noise_multiplier=1.0, participations=0,
                                      steps=0, delta=1e-5, sampling="shuffle") == 0.0


def test_sampling_has_no_default():
    with pytest.raises(TypeError, match="sampling"):
        accounting.compute_epsilon(noise_multiplier=1.0, sampling_probability=0.1,
                                   steps=5, delta=1e-5)
    with pytest.raises(TypeError, match="sampling"):
        accounting.calibrate_noise_multiplier(target_epsilon=1.0,
                                              sampling_probability=0.1, steps=5,
                                              delta=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampling="random"), "sampling must be one of"),
    (dict(accountant="gdp"), "accountant must be one of"),
    (dict(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
    (dict(sampling_probability=0.0), "sampling_probability must be in"),
    (dict(sampling_probability=1.5), "sampling_probability must be in"),
    (dict(sampling_probability=None), "sampling_probability must be in"),
    (dict(participations=3), "participations is for sampling='shuffle'"),
    (dict(steps=2.5), "steps must be a non-negative integer"),
    (dict(delta=0.0), "delta must be in"),
    (dict(sampling="shuffle", sampling_probability=None),
     "sampling='shuffle' needs participations"),
    (dict(sampling="shuffle", sampling_probability=None, participations=11),
     r"participations must be an integer in \[0, steps=10\]"),
    (dict(sampling="shuffle", sampling_probability=None, participations=0),
     "participations must be >= 1 after 10 updates"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_probability=0.01, steps=10,
                delta=1e-5, sampling="poisson")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        accounting.compute_epsilon(**args)


def test_calibration_refuses_impossible_targets():
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=0, sampling_probability=Q, steps=10, delta=1e-5,
            sampling="poisson")
    with pytest.raises(ValueError, match="No noise multiplier up to 1e4"):
        accounting.calibrate_noise_multiplier(
            target_epsilon=1e-9, sampling_probability=1.0, steps=10**6,
            delta=1e-5, sampling="poisson")
