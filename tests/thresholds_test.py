"""Tests for tf_dpfair.fairness.thresholds.choose_threshold."""

import numpy as np
import pytest

from tf_dpfair.fairness import thresholds


def test_youden_and_max_fpr_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.3, 0.35, 0.6, 0.7, 0.8])
    # TPR - FPR at each candidate: 0.1 -> 0, 0.3 -> 1/3, 0.35 -> 2/3,
    # 0.6 -> 1/3, 0.7 -> 1/3, 0.8 -> 1/3.
    chosen = thresholds.choose_threshold(y, s)
    assert chosen.values == (0.35,)
    assert chosen.rule == "Youden's J (max TPR - FPR) on validation data"
    # FPR 0 allows only 0.8 (TPR 1/3); FPR <= 0.34 allows 0.35 (TPR 1).
    assert thresholds.choose_threshold(y, s, rule="max_fpr", max_fpr=0.0).values == (0.8,)
    strict = thresholds.choose_threshold(y, s, rule="max_fpr", max_fpr=0.34)
    assert strict.values == (0.35,)
    assert strict.rule == "max TPR with FPR <= 0.34 on validation data"


def test_ties_go_to_the_largest_threshold_and_labels_are_separate():
    # J = 0.5 at 0.9 (TPR 1/2, FPR 0) and at 0.4 (TPR 1, FPR 1/2).
    y = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    s = np.array([[0.1, 0.2], [0.4, 0.3], [0.5, 0.6], [0.9, 0.7]])
    assert thresholds.choose_threshold(y, s).values == (0.9, 0.6)


def test_masked_labels_are_left_out():
    y = np.array([0, 1, 1, 0])
    s = np.array([0.2, 0.6, 0.7, 0.9])
    # Without the last example the threshold 0.6 separates perfectly.
    chosen = thresholds.choose_threshold(y, s, label_mask=[1, 1, 1, 0])
    assert chosen.values == (0.6,)


def test_bad_inputs_and_test_data_warning():
    y, s = np.array([0, 1]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="rule must be one of"):
        thresholds.choose_threshold(y, s, rule="f1")
    with pytest.raises(ValueError, match=r"needs max_fpr in \[0, 1\]"):
        thresholds.choose_threshold(y, s, rule="max_fpr")
    with pytest.raises(ValueError, match="single class"):
        thresholds.choose_threshold(np.zeros(2), s)
    with pytest.warns(UserWarning, match="on test data biases"):
        thresholds.choose_threshold(y, s, split="test")
