"""Calibration of probabilities: equal-width bins and expected calibration error.

Binning: `n_bins` equal-width bins of [0, 1], exactly as scikit-learn's
`calibration_curve(strategy="uniform")` draws them: bin 0 is [0, 1/M] and
bin k > 0 is (k/M, (k+1)/M]. The expected calibration error (ECE, Guo et al.
2017) is the sum over bins of (n_b / n) * |observed positive rate of the
bin - mean probability of the bin|: 0 for perfectly calibrated scores, at
most 1. It depends on the binning, so reports state `n_bins`.
"""

import math

import numpy as np
from sklearn.calibration import calibration_curve

DEFAULT_BINS = 10


def calibration_bins(scores, n_bins=DEFAULT_BINS):
    """The calibration bin of each score (see the module docstring for the edges).

    Args:
        scores: probabilities `[n]`.
        n_bins: number of equal-width bins of [0, 1].

    Returns:
        int array `[n]` in [0, n_bins).
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(scores, dtype=float))


def expected_calibration_error(y_true, y_prob, n_bins=DEFAULT_BINS):
    """ECE of probabilities against 0/1 outcomes, over equal-width bins.

    Args:
        y_true: 0/1 outcomes `[n]`.
        y_prob: probabilities in [0, 1] `[n]`.
        n_bins: number of bins.

    Returns:
        sum_b (n_b / n) |mean outcome in b - mean probability in b|; NaN
        when n = 0.
    """
    y_true = np.asarray(y_true, dtype=float)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.size == 0:
        return math.nan
    prob_true, prob_pred = calibration_curve(y_true, y_prob, n_bins=n_bins, strategy="uniform")
    counts = np.bincount(calibration_bins(y_prob, n_bins), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / y_true.size * np.abs(prob_true - prob_pred)))


