"""Tests of tf_dpfair.fairness.curve against numpy and hand-worked numbers."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tf_dpfair.fairness import auc
from tf_dpfair.fairness import curve
from tf_dpfair.fairness import rates

OUT, IN = curve.OUTSIDE, curve.INSIDE


def _random_curve(rng, k):
    performance = np.sort(rng.uniform(0.5, 0.95, k))
    gap = rng.uniform(0.0, 0.3, k)
    return performance, gap


def test_interpolation_equals_numpy_inside_the_range():
    rng = np.random.default_rng(0)
    for k in (2, 3, 7, 40):
        performance, gap = _random_curve(rng, k)
        fitted = curve.build_curve(performance, gap)
        x = rng.uniform(performance[0], performance[-1], 500)
        values, status = curve.interpolated_gap(fitted, x)
        np.testing.assert_allclose(values, np.interp(x, performance, gap), rtol=0, atol=1e-12)
        assert (status == IN).all()
        assert fitted.range == (performance[0], performance[-1])


def test_outside_the_curve_at_both_ends_is_nan_with_status():
    fitted = curve.build_curve([0.7, 0.9], [0.3, 0.1])
    values, status = curve.interpolated_gap(fitted, np.array([0.6999, 0.7, 0.9, 0.9001]))
    assert math.isnan(values[0]) and math.isnan(values[3])
    assert values[1] == 0.3 and values[2] == 0.1
    assert status.tolist() == [OUT, IN, IN, OUT]
    low, low_status = curve.interpolated_gap(fitted, 0.5)
    high, high_status = curve.interpolated_gap(fitted, 0.95)
    assert isinstance(low, float) and math.isnan(low) and low_status == "outside the curve"
    assert math.isnan(high) and high_status == "outside the curve"
    middle, middle_status = curve.interpolated_gap(fitted, 0.8)
    assert middle == pytest.approx(0.2, abs=1e-15) and middle_status == "inside"


def test_exact_at_the_knots():
    rng = np.random.default_rng(1)
    performance, gap = _random_curve(rng, 25)
    values, status = curve.interpolated_gap(curve.build_curve(performance, gap), performance)
    assert np.array_equal(values, gap)
    assert (status == IN).all()


def test_ties_are_averaged_and_points_sorted():
    # Update order, performance not monotone; two checkpoints tie at 0.8.
    fitted = curve.build_curve([0.8, 0.7, 0.9, 0.8], [0.1, 0.3, 0.05, 0.2])
    assert fitted.performance.tolist() == [0.7, 0.8, 0.9]
    np.testing.assert_allclose(fitted.gap, [0.3, 0.15, 0.05], atol=1e-15)
    assert fitted.checkpoints == 4 and fitted.rule == "all"
    values, _ = curve.interpolated_gap(fitted, np.array([0.75, 0.8, 0.85]))
    np.testing.assert_allclose(values, [0.225, 0.15, 0.1], atol=1e-12)


def test_running_max_keeps_checkpoints_that_set_a_new_best():
    performance = [0.6, 0.8, 0.7, 0.8, 0.9]
    gap = [0.4, 0.2, 0.5, 0.9, 0.1]
    envelope = curve.build_curve(performance, gap, rule="running_max")
    assert envelope.performance.tolist() == [0.6, 0.8, 0.9]
    assert envelope.gap.tolist() == [0.4, 0.2, 0.1]
    assert curve.interpolated_gap(envelope, 0.7).gap == pytest.approx(0.3, abs=1e-12)
    every = curve.build_curve(performance, gap)
    assert every.performance.tolist() == [0.6, 0.7, 0.8, 0.9]
    np.testing.assert_allclose(every.gap, [0.4, 0.5, 0.55, 0.1], atol=1e-15)
    assert curve.interpolated_gap(every, 0.7).gap == 0.5


def test_running_max_knots_sit_above_their_true_performance():
    # A run that plateaus at 0.8, measured with noise (sd 0.01): the
    # checkpoints that set a new best are chosen partly for upward noise.
    rng = np.random.default_rng(8)
    truth = np.minimum(np.linspace(0.6, 0.9, 40), 0.8)
    measured = truth + rng.normal(0, 0.01, (300, 40))
    gap = np.zeros_like(measured)
    for rule in curve.RULES:
        knots = curve.build_curve_draws(measured, gap, rule=rule).performance
        kept = np.array([np.isin(row, knot_row) for row, knot_row in zip(measured, knots)])
        bias = (measured - truth)[kept].mean()
        if rule == "all":
            assert kept.all() and abs(bias) < 0.001  # sd of the mean: 0.01 / sqrt(12000)
        else:
            assert bias > 0.003  # 0.0049 at this seed; unbiased knots give 0 +- 0.0002


def test_curve_from_points_equals_build_curve():
    points = [(0.8, 0.1), (0.7, 0.3), (0.9, 0.05)]
    fitted = curve.curve_from_points(points)
    assert fitted.performance.tolist() == [0.7, 0.8, 0.9]
    assert fitted.gap.tolist() == [0.3, 0.1, 0.05]


def test_excess_gap_of_several_seeds_by_hand():
    fitted = curve.build_curve([0.7, 0.9], [0.3, 0.1])
    result = curve.excess_gap([0.65, 0.8, 0.9, 0.95], [0.5, 0.25, 0.1, 0.0], fitted)
    assert np.isnan(result.excess[[0, 3]]).all()
    np.testing.assert_allclose(result.excess[[1, 2]], [0.05, 0.0], atol=1e-12)
    np.testing.assert_allclose(result.non_private_gap[[1, 2]], [0.2, 0.1], atol=1e-12)
    assert result.status.tolist() == [OUT, IN, IN, OUT]
    single = curve.excess_gap(0.75, 0.4, fitted)
    assert single.excess == pytest.approx(0.15, abs=1e-12) and single.status == IN


def _loop_interp(performance, gap, x, rule):
    """Independent reference: knots by a dict, then np.interp, per draw."""
    if rule == "running_max":
        kept, best = [], -np.inf
        for p, g in zip(performance, gap):
            if p > best:
                kept.append((p, g))
                best = p
        performance, gap = [p for p, _ in kept], [g for _, g in kept]
    by_value = {}
    for p, g in zip(performance, gap):
        by_value.setdefault(p, []).append(g)
    knots = sorted(by_value)
    gaps = [np.mean(by_value[p]) for p in knots]
    if x < knots[0] or x > knots[-1]:
        return math.nan, OUT
    return float(np.interp(x, knots, gaps)), IN


@pytest.mark.parametrize("rule", curve.RULES)
def test_vectorised_draws_equal_a_python_loop(rule):
    rng = np.random.default_rng(2)
    draws, checkpoints, models = 60, 9, 3
    trend = np.linspace(0.6, 0.9, checkpoints)
    # Rounded to 0.01, like an accuracy on 100 examples: ties and dips occur.
    performance = np.round(trend + rng.normal(0, 0.03, (draws, checkpoints)), 2)
    gap = 0.5 - 0.4 * performance + rng.normal(0, 0.02, (draws, checkpoints))
    private_performance = rng.uniform(0.55, 0.95, (draws, models))
    private_gap = rng.uniform(0.0, 0.3, (draws, models))
    draws_curve = curve.build_curve_draws(performance, gap, rule=rule)
    assert len(draws_curve) == draws and draws_curve.checkpoints == checkpoints
    result = curve.excess_gap(private_performance, private_gap, draws_curve)
    assert result.excess.shape == (draws, models)
    statuses = set()
    for b in range(draws):
        for s in range(models):
            expected, status = _loop_interp(performance[b], gap[b],
                                            private_performance[b, s], rule)
            assert result.status[b, s] == status
            statuses.add(status)
            if status == IN:
                assert result.non_private_gap[b, s] == pytest.approx(expected, abs=1e-12)
                assert result.excess[b, s] == pytest.approx(
                    private_gap[b, s] - expected, abs=1e-12)
            else:
                assert math.isnan(result.excess[b, s])
    assert statuses == {IN, OUT}
    # One model: [B] draws give column 0 of the [B, S] result.
    one = curve.excess_gap(private_performance[:, 0], private_gap[:, 0], draws_curve)
    np.testing.assert_array_equal(one.excess, result.excess[:, 0])


def test_undefined_gap_replicate_gives_nan_excess_only_where_used():
    draws_curve = curve.build_curve_draws([[0.7, 0.8, 0.9], [0.7, 0.8, 0.9]],
                                          [[0.3, np.nan, 0.1], [0.3, 0.2, 0.1]])
    result = curve.excess_gap([0.75, 0.75], [0.3, 0.3], draws_curve)
    assert math.isnan(result.excess[0])
    assert result.excess[1] == pytest.approx(0.05, abs=1e-12)
    assert result.status.tolist() == [IN, IN]


def test_excess_interval_is_the_percentile_interval_when_all_draws_inside():
    rng = np.random.default_rng(3)
    draws_curve = curve.build_curve_draws(np.tile([0.6, 0.9], (400, 1)),
                                          rng.normal(0.2, 0.02, (400, 2)))
    private_gap = rng.normal(0.25, 0.02, (400, 2))
    result = curve.excess_gap(np.full((400, 2), 0.75), private_gap, draws_curve)
    low, high, status = curve.excess_interval(result, 0.9)
    expected = np.quantile(result.excess, [0.05, 0.95], axis=0)
    np.testing.assert_allclose(low, expected[0], atol=1e-15)
    np.testing.assert_allclose(high, expected[1], atol=1e-15)
    assert status.tolist() == [IN, IN]
    low1, high1, status1 = curve.excess_interval(
        curve.excess_gap(np.full(400, 0.75), private_gap[:, 0], draws_curve), 0.9)
    assert (low1, high1, status1) == (low[0], high[0], IN)


def test_excess_interval_refuses_when_some_draws_are_outside():
    draws_curve = curve.build_curve_draws([[0.6, 0.9]] * 4, [[0.3, 0.1]] * 4)
    performance = np.array([[0.7, 0.7], [0.95, 0.7], [0.5, 0.7], [0.7, 0.7]])
    result = curve.excess_gap(performance, np.full((4, 2), 0.2), draws_curve)
    low, high, status = curve.excess_interval(result)
    assert math.isnan(low[0]) and math.isnan(high[0])
    assert status[0] == "outside the curve in 2 of 4 draws"
    assert status[1] == IN and low[1] == pytest.approx(0.2 - (0.3 - 0.2 / 3), abs=1e-12)


def test_curve_draws_are_needed_for_coverage():
    # Gap linear in performance; the private model sits midway between two
    # checkpoints and has the same gap as non-private training (excess 0).
    # Gaussian draws around each estimate stand in for the bootstrap. The
    # excess has variance sp^2 + sc^2 / 2: with curve draws the 90 % interval
    # covers 0 about 90 % of the time; with the curve held fixed its width
    # reflects sp alone: P(|Z| < 1.645 * sp / sqrt(sp^2 + sc^2 / 2)) = 0.66.
    rng = np.random.default_rng(4)
    sp, sc, repeats, draws = 0.01, 0.02, 1000, 200
    knots = np.array([0.7, 0.8])
    covered = {"draws": 0, "fixed": 0}
    for _ in range(repeats):
        checkpoints = 0.4 - 0.3 * knots + rng.normal(0, sc, 2)
        private = 0.4 - 0.3 * 0.75 + rng.normal(0, sp)
        curve_draws = curve.build_curve_draws(np.tile(knots, (draws, 1)),
                                              checkpoints + rng.normal(0, sc, (draws, 2)))
        private_draws = private + rng.normal(0, sp, draws)
        fixed = curve.build_curve_draws(np.tile(knots, (draws, 1)),
                                        np.tile(checkpoints, (draws, 1)))
        for name, on in (("draws", curve_draws), ("fixed", fixed)):
            low, high, _ = curve.excess_interval(
                curve.excess_gap(np.full(draws, 0.75), private_draws, on), 0.9)
            covered[name] += low <= 0.0 <= high
    # Monte Carlo sd over 1000 repeats: 0.0095 near 0.9, 0.015 near 0.66;
    # the percentile interval of 200 draws adds a little.
    assert 0.86 <= covered["draws"] / repeats <= 0.94
    assert 0.60 <= covered["fixed"] / repeats <= 0.72


@pytest.mark.parametrize("performance, gap, message", [
    ([0.7], [0.1], "at least 2 checkpoints of distinct performance; got 1"),
    ([0.7, 0.7], [0.1, 0.2], "at least 2 checkpoints of distinct performance; got 1"),
    ([0.7, np.nan], [0.1, 0.2], r"performance of checkpoint\(s\) \[1\] is NaN"),
    ([0.7, 0.8], [np.nan, 0.2], r"gap of checkpoint\(s\) \[0\] is NaN"),
    ([0.7, 0.8, 0.9], [0.1, 0.2], r"differ in length \(3 and 2\)"),
    ([[0.7, 0.8]], [[0.1, 0.2]], "must be 1-D"),
])
def test_bad_curve_input_is_refused(performance, gap, message):
    with pytest.raises(ValueError, match=message):
        curve.build_curve(performance, gap)


def test_other_bad_input_is_refused():
    fitted = curve.build_curve([0.7, 0.9], [0.3, 0.1])
    with pytest.raises(ValueError, match="under rule running_max"):
        curve.build_curve([0.9, 0.7], [0.1, 0.3], rule="running_max")
    with pytest.raises(ValueError, match="rule must be one of"):
        curve.build_curve([0.7, 0.9], [0.3, 0.1], rule="envelope")
    with pytest.raises(ValueError, match="sequence of \\(performance, gap\\) pairs"):
        curve.curve_from_points([(0.7, 0.1, 3.0), (0.8, 0.2, 1.0)])
    with pytest.raises(ValueError, match="The performance contains NaN or infinite"):
        curve.interpolated_gap(fitted, [0.8, np.nan])
    with pytest.raises(ValueError, match="private_performance contains NaN"):
        curve.excess_gap([np.nan], [0.1], fitted)
    with pytest.raises(ValueError, match="private_performance contains NaN or infinite"):
        curve.excess_gap(np.inf, 0.1, fitted)
    with pytest.raises(ValueError, match=r"differ in shape \(\(2,\) and \(3,\)\)"):
        curve.excess_gap([0.8, 0.8], [0.1, 0.1, 0.1], fitted)
    with pytest.raises(ValueError, match="NonPrivateCurve or CurveDraws"):
        curve.excess_gap(0.8, 0.1, [(0.7, 0.3), (0.9, 0.1)])
    draws = curve.build_curve_draws([[0.7, 0.9]] * 3, [[0.3, 0.1]] * 3)
    with pytest.raises(ValueError, match=r"With 3 curve draws.*got \(2,\)"):
        curve.excess_gap([0.8, 0.8], [0.1, 0.1], draws)
    with pytest.raises(ValueError, match=r"shape \[draws, checkpoints\]"):
        curve.build_curve_draws([0.7, 0.9], [0.3, 0.1])
    with pytest.raises(ValueError, match="performance draws contain NaN"):
        curve.build_curve_draws([[0.7, np.nan]], [[0.3, 0.1]])
    with pytest.raises(ValueError, match="Each draw needs at least 2"):
        curve.build_curve_draws([[0.7, 0.9], [0.8, 0.8]], [[0.3, 0.1], [0.2, 0.2]])
    result = curve.excess_gap([0.8] * 3, [0.1] * 3, draws)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        curve.excess_interval(result, 1.0)


# Evaluations: three "checkpoints" whose scores carry more signal as they go.
def _data(n=300, seed=5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    sex = rng.integers(0, 2, n)
    noise = rng.normal(0, 1, (3, n))
    scores = [1 / (1 + np.exp(-(w * (2 * labels - 1) * (1 + 0.5 * sex) + noise[i])))
              for i, w in enumerate((0.3, 0.8, 1.5))]
    return labels, sex, scores


def test_evaluation_point_of_an_auc_evaluation():
    labels, sex, scores = _data()
    evaluation = auc.evaluate_auc(labels, scores[1], {"sex": sex}, n_bootstrap=0)
    performance, gap = curve.evaluation_point(evaluation, "sex")
    per_group = [roc_auc_score(labels[sex == g], scores[1][sex == g]) for g in (0, 1)]
    assert performance == pytest.approx(roc_auc_score(labels, scores[1]), abs=1e-12)
    assert gap == pytest.approx(max(per_group) - min(per_group), abs=1e-12)
    ratio = curve.evaluation_point(evaluation, "sex", disparity="ratio")[1]
    assert ratio == pytest.approx(min(per_group) / max(per_group), abs=1e-12)
    with pytest.raises(ValueError, match="no 'gap' for attribute 'age'.*attributes: \\['sex'\\]"):
        curve.evaluation_point(evaluation, "age")
    with pytest.raises(ValueError, match="GroupEvaluation or fairness.rates.RateEvaluation"):
        curve.evaluation_point({"auc": 0.8}, "sex")
    with pytest.raises(ValueError, match="no bootstrap replicates"):
        curve.evaluation_draws(evaluation, "sex")


def test_evaluation_point_of_rate_evaluations():
    labels, sex, scores = _data()
    evaluation = rates.evaluate_rates(labels, scores[2], {"sex": sex}, threshold=0.5,
                                      n_bootstrap=20)
    correct = (scores[2] >= 0.5) == labels
    per_group = [correct[sex == g].mean() for g in (0, 1)]
    performance, gap = curve.evaluation_point(evaluation, "sex")
    assert performance == pytest.approx(correct.mean(), abs=1e-12)
    assert gap == pytest.approx(abs(per_group[0] - per_group[1]), abs=1e-12)
    draw_performance, draw_gap = curve.evaluation_draws(evaluation, "sex")
    np.testing.assert_array_equal(
        draw_performance, 1.0 - evaluation.replicates[("overall", "label", "error")])
    np.testing.assert_array_equal(draw_gap, evaluation.replicates[("error_gap", "sex", "label")])
    assert draw_performance.shape == (20,) and np.ptp(draw_performance) > 0
    # Multi-class: top-1 accuracy and its gap.
    rng = np.random.default_rng(6)
    classes = rng.integers(0, 3, 300)
    probabilities = rng.dirichlet([1, 1, 1], 300)
    probabilities[np.arange(300), classes] += rng.uniform(0, 1, 300)
    probabilities /= probabilities.sum(1, keepdims=True)
    multi = rates.evaluate_rates(classes, probabilities, {"sex": sex}, multi_class=True,
                                 n_bootstrap=0)
    top1 = probabilities.argmax(1) == classes
    performance, gap = curve.evaluation_point(multi, "sex")
    assert performance == pytest.approx(top1.mean(), abs=1e-12)
    assert gap == pytest.approx(abs(top1[sex == 0].mean() - top1[sex == 1].mean()), abs=1e-12)


def test_curves_from_evaluations():
    labels, sex, scores = _data()
    evaluations = {f"step_{i}": auc.evaluate_auc(labels, s, {"sex": sex}, n_bootstrap=50,
                                                 seed=7)
                   for i, s in enumerate(scores)}
    points = [curve.evaluation_point(e, "sex") for e in evaluations.values()]
    fitted = curve.curve_from_evaluations(evaluations, "sex")
    expected = curve.curve_from_points(points)
    np.testing.assert_array_equal(fitted.performance, expected.performance)
    np.testing.assert_array_equal(fitted.gap, expected.gap)
    draws = curve.curve_draws_from_evaluations(list(evaluations.values()), "sex")
    assert len(draws) == 50 and draws.checkpoints == 3
    for b in (0, 17, 49):
        row = curve.build_curve(
            [e.replicates[("overall", "label")][b] for e in evaluations.values()],
            [e.replicates[("gap", "sex", "label")][b] for e in evaluations.values()])
        np.testing.assert_array_equal(draws.performance[b, :row.performance.size],
                                      row.performance)
        np.testing.assert_array_equal(draws.gap[b, :row.gap.size], row.gap)
    other = auc.evaluate_auc(labels, scores[0], {"sex": sex}, n_bootstrap=50, seed=8)
    with pytest.raises(ValueError, match="different resamples"):
        curve.curve_draws_from_evaluations([other] + list(evaluations.values()), "sex")
    with pytest.raises(ValueError, match="non-empty list or dict"):
        curve.curve_from_evaluations([], "sex")
