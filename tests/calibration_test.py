"""Tests for tf_dpfair.fairness.calibration: bins and expected calibration error."""

import math

import numpy as np
import pytest

from tf_dpfair.fairness import calibration


def test_bins_follow_scikit_learn_edges():
    # Bin 0 is [0, 0.1]; bin k is (k/10, (k+1)/10]: an edge belongs to the bin below.
    scores = np.array([0.0, 0.05, 0.1, 0.1000001, 0.55, 0.9999, 1.0])
    assert calibration.calibration_bins(scores, 10).tolist() == [0, 0, 0, 1, 5, 9, 9]
    assert calibration.calibration_bins([0.3, 0.7], 2).tolist() == [0, 1]


def test_ece_by_hand():
    # Bins of 10: 0.15 -> 1, 0.45 -> 4, 0.65 -> 6, 0.85 -> 8: one example each,
    # gaps 0.15, 0.55, 0.65, 0.15, each weighing 1/4.
    y = [0, 1, 0, 1]
    p = [0.15, 0.45, 0.65, 0.85]
    assert calibration.expected_calibration_error(y, p) == pytest.approx(1.5 / 4)
    # Two examples share bin 7 (0.72, 0.75): outcome rate 0.5, mean score
    # 0.735, weight 2/4; plus 0.35 (bin 3) and 0.25 (bin 2), negatives.
    y = [1, 0, 0, 0]
    p = [0.75, 0.35, 0.25, 0.72]
    assert calibration.expected_calibration_error(y, p) == pytest.approx(
        0.5 * 0.235 + 0.25 * 0.35 + 0.25 * 0.25)


def test_ece_is_zero_when_each_bin_matches_its_outcome_rate():
    # 0.25 on four examples with one positive; 0.75 on four with three.
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25] * 4 + [0.75] * 4
    assert calibration.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    # The same scores with outcomes swapped: both bins off by 0.5.
    assert calibration.expected_calibration_error(1 - np.array(y), p) == pytest.approx(0.5)
    # One bin holding everything: only the overall mean matters.
    assert calibration.expected_calibration_error(y, p, n_bins=1) == pytest.approx(0.0)


def test_ece_matches_an_independent_histogram_on_random_scores():
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    y = (rng.random(5000) < p ** 2).astype(float)  # overconfident scores
    # Right-closed bins, written with np.digitize (bin 0 also takes 0).
    edges = np.linspace(0, 1, 16)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, 14)
    expected = sum(abs(y[index == b].mean() - p[index == b].mean()) * (index == b).mean()
                   for b in range(15) if (index == b).any())
    assert calibration.expected_calibration_error(y, p, n_bins=15) == pytest.approx(
        expected, abs=1e-12)
    assert math.isnan(calibration.expected_calibration_error([], []))
