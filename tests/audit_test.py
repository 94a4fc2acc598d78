"""Tests of the one-run privacy audit: the bound, and real DP training."""

import dataclasses
import math

import keras
import numpy as np
import pytest

import tf_dpfair as dpf
from tf_dpfair import audit


def test_bound_matches_the_binomial_tail_worked_by_hand():
    # All 100 guesses right, delta 0: reject eps while p^100 < 0.05, with
    # p = e^eps / (1 + e^eps); so p = 0.05^(1/100) at the bound.
    p = 0.05 ** (1 / 100)
    want = math.log(p / (1 - p))  # 3.493
    got = audit.epsilon_lower_bound(100, 100, 100, confidence=0.95)
    assert got == pytest.approx(want, rel=1e-6)
    assert audit.p_value(got, 0.0, 100, 100, 100) == pytest.approx(0.05)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    assert audit.epsilon_lower_bound(200, 100, 50) == 0.0
    assert audit.epsilon_lower_bound(200, 100, 0) == 0.0
    bounds = [audit.epsilon_lower_bound(200, 100, v) for v in (70, 80, 90)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_delta_weakens_the_bound():
    pure = audit.epsilon_lower_bound(1000, 200, 190)
    approx = audit.epsilon_lower_bound(1000, 200, 190, delta=1e-4)
    assert 0 < approx < pure


def test_bound_holds_for_randomized_response_at_the_stated_confidence():
    # Each canary's score is its membership bit flipped with probability
    # 1 / (1 + e^eps0): an eps0-DP release. The 95% bound may exceed eps0 in
    # at most 5% of runs; over 200 runs, 10 expected at worst, 20 is > 3
    # standard deviations above that.
    eps0, m, k = 1.0, 400, 100
    rng = np.random.default_rng(7)
    exceed = 0
    for _ in range(200):
        included = rng.random(m) < 0.5
        flip = rng.random(m) < 1 / (1 + math.exp(eps0))
        scores = np.where(included ^ flip, 1.0, -1.0) + 1e-6 * rng.random(m)
        result = audit.audit_scores(scores, included, claimed_epsilon=eps0,
                                    delta=0.0, guess_counts=[k])
        exceed += result.epsilon_lower_bound > eps0
    assert exceed <= 20


def test_audit_scores_counts_guesses_on_both_sides():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, True, False, True, False, False])
    assert audit.count_correct(scores, included, 2) == (4, 4)
    assert audit.count_correct(scores, included, 3) == (6, 4)
    result = audit.audit_scores(scores, included, claimed_epsilon=2.0,
                                delta=1e-5, guess_counts=[1, 2])
    assert result.num_canaries == 6 and result.num_included == 3
    with pytest.raises(ValueError, match=r"guess counts must be in \[1, 3\]"):
        audit.audit_scores(scores, included, claimed_epsilon=1.0, delta=0.0,
                           guess_counts=[4])
    with pytest.raises(ValueError, match="Need 0 <= num_correct"):
        audit.p_value(1.0, 0.0, 10, 5, 6)


def test_str_puts_claim_and_measurement_side_by_side():
    result = audit.AuditResult(
        epsilon_lower_bound=0.79, claimed_epsilon=7.9, delta=1e-5,
        confidence=0.95, num_canaries=256, num_included=127, num_guesses=50,
        num_correct=42)
    assert str(result) == (
        "Privacy audit (one run, Steinke et al. 2023): claimed epsilon 7.9 "
        "(delta 1e-05); measured lower bound 0.79 at 95% confidence (42 of "
        "50 membership guesses right; 256 canaries, 127 included).")
    broken = dataclasses.replace(result, epsilon_lower_bound=9.0)
    assert not broken.consistent and "EXCEEDS the claim" in str(broken)




# ------------------------------------------------ end to end, real training

DIM, CLASSES, NUM_REAL, NUM_CANARIES = 256, 10, 512, 256
UPDATES, BATCH = 100, 64


def audit_setup():
    """Gaussian class clusters; far-out binary canaries, random labels."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.5, 0.15, size=(CLASSES, DIM))
    labels = rng.integers(0, CLASSES, NUM_REAL)
    images = centers[labels] + rng.normal(0, 0.1, size=(NUM_REAL, DIM))
    canaries = rng.integers(0, 2, size=(NUM_CANARIES, DIM))
    canary_labels = rng.integers(0, CLASSES, NUM_CANARIES)
    shape = (-1, 1, DIM)
    return (images.reshape(shape).astype(np.float32), labels,
            canaries.reshape(shape).astype(np.float32), canary_labels)


def linear_model(clip, noise):
    # A fixed noise seed keeps the figures reproducible (tests only).
    config = dpf.DPConfig(l2_norm_clip=clip, noise_multiplier=noise,
                          expected_batch_size=BATCH, microbatch_size=BATCH,
                          seed=123)
    inputs = keras.Input((1, DIM, 1))
    outputs = keras.layers.Dense(CLASSES, kernel_initializer="zeros")(
        keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def run(clip, noise):
    result = audit.run_audit(linear_model(clip, noise), *audit_setup(),
                             num_updates=UPDATES, delta=1e-5, seed=1)
    print(result)
    return result


def test_dp_run_stays_below_its_claim():
    result = run(clip=1.0, noise=1.0)
    assert math.isfinite(result.claimed_epsilon)
    assert result.consistent
    assert result.epsilon_lower_bound < result.claimed_epsilon
    assert result.num_canaries == NUM_CANARIES


def test_run_without_noise_or_clipping_is_caught():
    # The same setup with no noise and a clip that never binds: the included
    # canaries are memorised and the audit measures a clearly positive
    # epsilon; it would expose a run that claimed sigma = 3 but added none.
    result = run(clip=1e6, noise=0.0)
    assert result.claimed_epsilon == math.inf
    assert result.epsilon_lower_bound > 2.0
    q = BATCH / (NUM_REAL + result.num_included)
    false_claim = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=3.0, sampling_probability=q, steps=UPDATES,
        delta=1e-5, sampling="poisson")
    assert result.epsilon_lower_bound > false_claim
