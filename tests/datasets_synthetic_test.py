"""Tests of the synthetic CheXpert-shaped generator: proportions and planted gaps."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tf_dpfair.datasets import synthetic


def test_group_proportions_and_positive_rates():
    arrays = synthetic.generate(20000, image_size=8, seed=0)
    # Standard errors at n = 20000 are at most 0.0035; tolerance 0.01 (~3 of them).
    sex = np.bincount(arrays["groups"]["sex"], minlength=2) / 20000
    np.testing.assert_allclose(sex, [0.594, 0.406], atol=0.01)
    age = np.bincount(arrays["groups"]["age"], minlength=4) / 20000
    np.testing.assert_allclose(age, np.array([0.140, 0.310, 0.389, 0.160]) / 0.999, atol=0.01)
    rates = arrays["label"].mean(axis=0)
    np.testing.assert_allclose(rates, [0.149, 0.121, 0.066, 0.234, 0.386], atol=0.01)
    assert arrays["image"].shape == (20000, 8, 8, 1) and arrays["image"].dtype == np.uint8


def _matched_filter_auc(arrays, in_group):
    scores = np.einsum("nhw,lhw->nl", arrays["image"][..., 0].astype(np.float64),
                       synthetic.templates(arrays["image"].shape[1]))
    labels = arrays["label"]
    return np.mean([roc_auc_score(labels[in_group, l], scores[in_group, l])
                    for l in range(labels.shape[1])])


def test_planted_signal_gap_is_recovered():
    planted = synthetic.generate(4000, image_size=16, seed=1,
                                 group_signal={"age": {"80+": 0.2}})
    old = planted["groups"]["age"] == 3
    gap = _matched_filter_auc(planted, ~old) - _matched_filter_auc(planted, old)
    assert gap > 0.15
    fair = synthetic.generate(4000, image_size=16, seed=1)
    old = fair["groups"]["age"] == 3
    assert abs(_matched_filter_auc(fair, ~old) - _matched_filter_auc(fair, old)) < 0.05


def test_planted_label_noise():
    arrays = synthetic.generate(10000, image_size=8, seed=2,
                                group_label_noise={"sex": {"female": 0.2}})
    flipped = (arrays["label"] != arrays["clean_label"]).mean(axis=1)
    female = arrays["groups"]["sex"] == 1
    assert abs(flipped[female].mean() - 0.2) < 0.015
    assert flipped[~female].mean() == 0.0


def test_load_gives_sources_with_groups():
    sources = synthetic.load(num_train=50, num_test=20, image_size=32)
    assert (sources["train"].num_examples, sources["test"].num_examples) == (50, 20)
    spec = sources["train"].element_spec
    assert spec["image"].shape == (32, 32, 1) and spec["label"].shape == (5,)
    assert sources["train"].group_spec == synthetic.GROUP_SPEC


@pytest.mark.parametrize("kwargs, message", [
        ({"group_signal": {"race": {"white": 0.5}}}, "unknown attribute 'race'"),
        ({"group_signal": {"sex": {"other": 0.5}}}, "unknown group 'other' of 'sex'"),
        ({"group_label_noise": {"sex": {"male": 1.5}}}, "bad value 1.5 for sex=male"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
])
def test_generator_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic.generate(10, **kwargs)
    with pytest.raises(ValueError, match="num_examples must be a positive integer"):
        synthetic.generate(0)
