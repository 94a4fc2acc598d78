"""Private vs non-private at the same performance, against a non-private curve.

The comparison: the private model's gap minus the non-private gap *at the
same performance* (overall accuracy or AUC), the non-private gap being read
off a curve through the non-private run's checkpoints by linear
interpolation. A positive excess gap says that DP costs the groups more than
its loss of accuracy alone explains (non-private training, stopped at the
same accuracy, has a smaller gap); a negative one, less.

Why not the nearest checkpoint (`matching.compare_matched`): with a few
checkpoints the nearest one can sit far from the private model's
performance, and always on the same side of it (all matches may pick one
checkpoint whose performance is at least every private model's). Since the
gap usually shrinks as performance rises, that biases the comparison
towards "private gap larger". Interpolating between the two checkpoints that
bracket the private model removes the first-order part of that bias; dense
checkpoints (every few updates) make the rest small.

"Outside the curve": when the private model's performance is below the
lowest or above the highest checkpoint's, there is no non-private gap at
that performance to compare with; nothing is extrapolated. The excess gap is
then NaN with status `OUTSIDE` and a report must say so (for instance: the
private model is less accurate than the earliest non-private checkpoint, so
checkpoint earlier), never count it either way.

The curve (`build_curve`, `curve_from_points`, `curve_from_evaluations`):
points are (performance, gap), one per checkpoint; the gap is any disparity
figure (max - min AUC, error gap, equalized-odds difference, ...). As
performance need not rise with every update, `rule` says which points are
used:

- `"all"` (default): every checkpoint, sorted by performance; checkpoints of
  equal performance (common for accuracy, a multiple of 1 / n) are replaced
  by one point with the mean of their gaps, so that the curve is a function
  of performance. Every checkpoint is an observation of the gap at its
  performance, whenever in training it was taken, and no order is needed.
- `"running_max"`: only the checkpoints, in update order, whose performance
  exceeds every earlier one's: the run's progress, "the first time training
  reached this performance". It drops checkpoints, and a new maximum is
  selected partly for favourable test noise, so its knots tend to sit at a
  performance above the checkpoint's true one; hence not the default.

Uncertainty (`build_curve_draws`, `curve_draws_from_evaluations`): an
interval of the excess gap must resample the curve as well as the private
point; holding the curve fixed ignores the noise of the non-private gaps,
of the same order as the private one's on a test set of the same size, and
the interval undercovers. For each bootstrap draw b, the private draw is
compared with the curve built from draw b of every checkpoint; draws of the
same test resample on both sides (evaluations with equal `resample_key`)
keep their correlation. `excess_interval` reports an
interval only when every draw is inside the curve: dropping the draws
outside it would keep those that fall on the curve's side and bias the
interval.

The module is about 520 lines: the curve, its bootstrap draws, the interval
and the readers of both evaluation families are one procedure, and the
readers are what keep a caller from pairing the wrong replicates.
"""

import collections
import dataclasses

import numpy as np

from tf_dpfair.fairness import auc
from tf_dpfair.fairness import engine
from tf_dpfair.fairness import rates

INSIDE = "inside"
OUTSIDE = "outside the curve"
RULES = ("all", "running_max")

Interpolated = collections.namedtuple("Interpolated", ["gap", "status"])
Interpolated.__doc__ = """Non-private gap at a performance, and `INSIDE` or `OUTSIDE`."""

Excess = collections.namedtuple("Excess", ["excess", "non_private_gap", "status"])
Excess.__doc__ = """Private gap minus the interpolated non-private gap, with its status."""


@dataclasses.dataclass(frozen=True, eq=False)
class NonPrivateCurve:
    """Non-private gap as a function of performance, through checkpoints.

    Attributes:
        performance: `[M]` strictly increasing knots (overall accuracy or AUC).
        gap: `[M]` the non-private gap at each knot.
        checkpoints: number of checkpoints it was built from (>= M).
        rule: how the knots were chosen (`RULES`).
    """

    performance: np.ndarray
    gap: np.ndarray
    checkpoints: int
    rule: str

    @property
    def range(self):
        """`(lowest, highest)` performance: where interpolation is defined."""
        return float(self.performance[0]), float(self.performance[-1])


@dataclasses.dataclass(frozen=True, eq=False)
class CurveDraws:
    """One curve per bootstrap draw, padded to a common number of knots.

    Attributes:
        performance: `[B, M]` each row's knots, increasing, NaN after its last.
        gap: `[B, M]` the gaps at the knots (NaN where a replicate was
            undefined, and after the row's last knot).
        checkpoints: number of checkpoints each draw was built from.
        rule: how the knots were chosen (`RULES`).
    """

    performance: np.ndarray
    gap: np.ndarray
    checkpoints: int
    rule: str

    def __len__(self):
        return self.performance.shape[0]


def _knots(performance, gap, rule):
    """Knots of each row: `(performance [B, M], gap [B, M], sizes [B])`.

    Rows of `[B, K]` inputs are sorted by performance (after dropping, under
    `running_max`, checkpoints that set no new best); equal performances
    become one knot with the mean gap; rows shorter than M end in NaN.
    """
    keep = np.ones(performance.shape, dtype=bool)
    if rule == "running_max":
        keep[:, 1:] = performance[:, 1:] > np.maximum.accumulate(performance, axis=1)[:, :-1]
    kept = np.where(keep, performance, np.nan)
    order = np.argsort(kept, axis=1)  # dropped (NaN) last
    x = np.take_along_axis(kept, order, 1)
    y = np.take_along_axis(gap, order, 1)
    valid = ~np.isnan(x)
    first = valid.copy()
    first[:, 1:] &= x[:, 1:] != x[:, :-1]
    knot = np.cumsum(first, axis=1) - 1
    rows = np.broadcast_to(np.arange(len(x))[:, None], x.shape)
    sums, counts = np.zeros(x.shape), np.zeros(x.shape)
    np.add.at(sums, (rows[valid], knot[valid]), y[valid])
    np.add.at(counts, (rows[valid], knot[valid]), 1.0)
    sizes = first.sum(axis=1)
    width = max(int(sizes.max(initial=0)), 1)
    knots = np.full(x.shape, np.nan)
    knots[rows[first], knot[first]] = x[first]
    gaps = np.divide(sums, counts, out=np.full(x.shape, np.nan), where=counts > 0)
    return knots[:, :width], gaps[:, :width], sizes


def _checked_rule(rule):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    return rule


def build_curve(performance, gap, *, rule="all"):
    """The non-private curve through checkpoints' (performance, gap) points.

    Args:
        performance: `[K]` each checkpoint's overall performance (accuracy or
            AUC), in update order (needed by `rule="running_max"` only).
        gap: `[K]` each checkpoint's gap.
        rule: `"all"` or `"running_max"` (see the module docstring).

    Returns:
        A `NonPrivateCurve`.

    Raises:
        ValueError: mismatched or non-1-D inputs, NaN or infinite values, an
            unknown rule, or fewer than 2 distinct performances.
    """
    rule = _checked_rule(rule)
    performance = np.asarray(performance, dtype=float)
    gap = np.asarray(gap, dtype=float)
    if performance.ndim != 1 or gap.ndim != 1:
        raise ValueError("performance and gap must be 1-D, one entry per checkpoint; got "
                         f"shapes {performance.shape} and {gap.shape}.")
    if performance.size != gap.size:
        raise ValueError(f"performance and gap differ in length ({performance.size} and "
                         f"{gap.size}): one (performance, gap) point per checkpoint.")
    for name, values in (("performance", performance), ("gap", gap)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(f"The {name} of checkpoint(s) {bad.tolist()} is NaN or "
                             "infinite: drop those checkpoints or fix their evaluation.")
    knots, gaps, sizes = _knots(performance[None, :], gap[None, :], rule)
    if sizes[0] < 2:
        raise ValueError(f"A curve needs at least 2 checkpoints of distinct performance; "
                         f"got {sizes[0]} from {performance.size} checkpoint(s)"
                         f"{' under rule running_max' if rule == 'running_max' else ''}.")
    return NonPrivateCurve(performance=knots[0, :sizes[0]], gap=gaps[0, :sizes[0]],
                           checkpoints=int(performance.size), rule=rule)


def curve_from_points(points, *, rule="all"):
    """`build_curve` from a list of `(performance, gap)` pairs (update order).

    Args:
        points: sequence of `(performance, gap)` pairs, one per checkpoint, as
            `experiments.report_lib` computes them from saved checkpoints.
        rule: as in `build_curve`.

    Returns:
        A `NonPrivateCurve`.

    Raises:
        ValueError: points that are not pairs, and as `build_curve`.
    """
    points = np.asarray(list(points), dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError("points must be a sequence of (performance, gap) pairs; got an "
                         f"array of shape {points.shape}.")
    return build_curve(points[:, 0], points[:, 1], rule=rule)


def build_curve_draws(performance, gap, *, rule="all"):
    """One curve per bootstrap draw of every checkpoint.

    Args:
        performance: `[B, K]` draw b of checkpoint k's performance.
        gap: `[B, K]` draw b of checkpoint k's gap (NaN allowed: an undefined
            replicate makes the excess gaps that use it NaN).
        rule: as in `build_curve`, applied to each draw.

    Returns:
        A `CurveDraws` of B curves.

    Raises:
        ValueError: mismatched or non-2-D inputs, NaN performance, an unknown
            rule, or a draw with fewer than 2 distinct performances.
    """
    rule = _checked_rule(rule)
    performance = np.asarray(performance, dtype=float)
    gap = np.asarray(gap, dtype=float)
    if performance.ndim != 2 or performance.shape != gap.shape:
        raise ValueError("performance and gap must both have shape [draws, checkpoints]; "
                         f"got {performance.shape} and {gap.shape}.")
    if not np.isfinite(performance).all():
        raise ValueError("The performance draws contain NaN or infinite values.")
    knots, gaps, sizes = _knots(performance, gap, rule)
    if sizes.size == 0 or sizes.min() < 2:
        raise ValueError("Each draw needs at least 2 checkpoints of distinct performance; "
                         f"got {sizes.min(initial=0)} in some draw.")
    return CurveDraws(performance=knots, gap=gaps,
                      checkpoints=int(performance.shape[1]), rule=rule)


def _interpolate_rows(knots_x, knots_y, x):
    """Row-wise linear interpolation: knots `[B, M]` (NaN-padded), x `[B, S]`.

    Returns `(values [B, S], inside [B, S])`; NaN values outside a row's range.
    """
    sizes = (~np.isnan(knots_x)).sum(axis=1)
    low = knots_x[:, 0]
    high = knots_x[np.arange(len(knots_x)), sizes - 1]
    inside = (x >= low[:, None]) & (x <= high[:, None])
    # Segment j of x: knots j and j + 1 with knots_x[j] <= x (NaN padding never counts).
    count = (knots_x[:, None, :] <= x[:, :, None]).sum(axis=-1)
    j = np.clip(count - 1, 0, (sizes - 2)[:, None])
    x0, x1 = np.take_along_axis(knots_x, j, 1), np.take_along_axis(knots_x, j + 1, 1)
    y0, y1 = np.take_along_axis(knots_y, j, 1), np.take_along_axis(knots_y, j + 1, 1)
    t = (x - x0) / (x1 - x0)
    # (1 - t) y0 + t y1 is exact at both knots of a segment.
    values = (1.0 - t) * y0 + t * y1
    return np.where(inside, values, np.nan), inside


def _private_array(values, name):
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values: a model without a "
                         "defined performance cannot be placed on the curve.")
    return values


def _as_rows(curve, performance):
    """Knots `[B, M]` and performance `[B, S]` for a curve or curve draws."""
    if isinstance(curve, NonPrivateCurve):
        flat = performance.reshape(1, -1)
        return curve.performance[None, :], curve.gap[None, :], flat
    if isinstance(curve, CurveDraws):
        if performance.ndim not in (1, 2) or performance.shape[0] != len(curve):
            raise ValueError(f"With {len(curve)} curve draws, the private performance must "
                             f"have shape [{len(curve)}] or [{len(curve)}, models]; got "
                             f"{performance.shape}.")
        return curve.performance, curve.gap, performance.reshape(len(curve), -1)
    raise ValueError("curve must be a NonPrivateCurve or CurveDraws (see build_curve and "
                     f"build_curve_draws); got {type(curve).__name__}.")


def _shaped(values, inside, shape):
    status = np.where(inside, INSIDE, OUTSIDE).reshape(shape)
    values = values.reshape(shape)
    if not shape:
        return float(values), str(status)
    return values, status


def interpolated_gap(curve, performance):
    """The non-private gap at `performance`, read off the curve (no extrapolation).

    Args:
        curve: a `NonPrivateCurve`, or `CurveDraws` (then `performance` has
            shape `[B]` or `[B, S]`, row b read off draw b's curve).
        performance: a float or an array of performances.

    Returns:
        `Interpolated(gap, status)` of `performance`'s shape (a float and a
        string for a scalar): the linearly interpolated gap and `INSIDE`, or
        NaN and `OUTSIDE` below the curve's lowest or above its highest
        performance. The ends themselves are inside.

    Raises:
        ValueError: NaN or infinite performance, a shape that does not fit the
            draws, or a `curve` of another type.
    """
    performance = _private_array(performance, "The performance")
    knots_x, knots_y, x = _as_rows(curve, performance)
    values, inside = _interpolate_rows(knots_x, knots_y, x)
    return Interpolated(*_shaped(values, inside, performance.shape))


def excess_gap(private_performance, private_gap, curve):
    """Private gap minus the non-private gap at the same performance.

    Args:
        private_performance: the private model's overall performance: a
            float, `[S]` (S models, e.g. seeds), or with `CurveDraws` `[B]` /
            `[B, S]` bootstrap draws (draw b compared with curve draw b).
        private_gap: the private model's gap, of the same shape.
        curve: a `NonPrivateCurve`, or `CurveDraws` for an interval: each
            draw of the private point needs its own draw of the curve.

    Returns:
        `Excess(excess, non_private_gap, status)` of the input's shape:
        NaN excess and `OUTSIDE` where the private performance is outside
        the curve's range.

    Raises:
        ValueError: NaN or infinite performance, mismatched shapes, and as
            `interpolated_gap`.
    """
    performance = _private_array(private_performance, "private_performance")
    gap = np.asarray(private_gap, dtype=float)
    if gap.shape != performance.shape:
        raise ValueError(f"private_performance and private_gap differ in shape "
                         f"({performance.shape} and {gap.shape}).")
    non_private, status = interpolated_gap(curve, performance)
    return Excess(gap - non_private, non_private, status)


def excess_interval(draws, confidence=0.95):
    """Percentile interval of the excess gap over bootstrap draws, per model.

    Args:
        draws: the `Excess` of `excess_gap` on `CurveDraws`, shape `[B]` or
            `[B, S]`.
        confidence: confidence level in (0, 1).

    Returns:
        `(low, high, status)`, floats and a string for `[B]` draws, arrays
        `[S]` for `[B, S]`. Status is `INSIDE` when every draw is inside the
        curve (undefined draws are ignored, as `engine.percentile_interval`
        does), else "outside the curve in k of B draws" with NaN bounds.

    Raises:
        ValueError: a confidence outside (0, 1), or draws that are not 1-D or
            2-D.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    excess, status = np.asarray(draws.excess, dtype=float), np.asarray(draws.status)
    if excess.ndim not in (1, 2):
        raise ValueError(f"draws must have shape [B] or [B, S]; got {excess.shape}.")
    columns = excess.reshape(len(excess), -1)
    outside = (status.reshape(columns.shape) != INSIDE).sum(axis=0)
    lows, highs, states = [], [], []
    for column, k in zip(columns.T, outside):
        low, high = engine.percentile_interval(column, confidence) if k == 0 else (np.nan,) * 2
        lows.append(low)
        highs.append(high)
        states.append(INSIDE if k == 0 else f"{OUTSIDE} in {k} of {len(columns)} draws")
    if excess.ndim == 1:
        return lows[0], highs[0], states[0]
    return np.array(lows), np.array(highs), np.array(states)


def _keys(evaluation, attribute, disparity, label):
    """Replicate / table keys of an evaluation's performance and gap."""
    if isinstance(evaluation, auc.GroupEvaluation):
        label = evaluation.summary_label if label is None else label
        return "auc", label, disparity or "gap"
    if isinstance(evaluation, rates.RateEvaluation):
        if label is None:
            label = rates.TOP1_LABEL if evaluation.multi_class else evaluation.summary_label
        return "accuracy", label, disparity or "error_gap"
    raise ValueError("Expected a fairness.auc.GroupEvaluation or fairness.rates."
                     f"RateEvaluation; got {type(evaluation).__name__}.")


def evaluation_point(evaluation, attribute, *, disparity=None, label=None):
    """`(performance, gap)` of one evaluation.

    Args:
        evaluation: a `GroupEvaluation` (performance: overall AUC; default
            disparity `"gap"`, max - min AUC) or a `RateEvaluation`
            (performance: accuracy, 1 - error; default `"error_gap"`, the
            max - min accuracy).
        attribute: the group attribute whose gap is read.
        disparity: a column of `evaluation.disparities` instead.
        label: the label (default: the one `matching` matches on,
            `summary_label`, or top-1 for multi-class rates).

    Returns:
        `(performance, gap)`, floats.

    Raises:
        ValueError: another type, or an attribute, label or disparity the
            evaluation lacks.
    """
    figure, label, disparity = _keys(evaluation, attribute, disparity, label)
    overall = evaluation.overall.set_index("label")
    rows = evaluation.disparities
    rows = rows[(rows["attribute"] == attribute) & (rows["label"] == label)]
    if label not in overall.index or rows.empty or disparity not in rows:
        raise ValueError(f"The evaluation has no {disparity!r} for attribute {attribute!r} "
                         f"and label {label!r}; attributes: "
                         f"{sorted(set(evaluation.disparities['attribute']))}.")
    value = overall.loc[label, "auc" if figure == "auc" else "error"]
    performance = float(value) if figure == "auc" else 1.0 - float(value)
    return performance, float(rows[disparity].iloc[0])


def evaluation_draws(evaluation, attribute, *, disparity=None, label=None):
    """Bootstrap draws of `(performance, gap)` of one evaluation, `[B]` each.

    Args:
        evaluation, attribute, disparity, label: as in `evaluation_point`.

    Returns:
        `(performance [B], gap [B])` from `evaluation.replicates`.

    Raises:
        ValueError: as `evaluation_point`, or no replicates (n_bootstrap 0).
    """
    figure, label, disparity = _keys(evaluation, attribute, disparity, label)
    evaluation_point(evaluation, attribute, disparity=disparity, label=label)
    if figure == "auc":
        performance = np.asarray(evaluation.replicates[("overall", label)], dtype=float)
    else:
        performance = 1.0 - np.asarray(evaluation.replicates[("overall", label, "error")],
                                       dtype=float)
    gap = np.asarray(evaluation.replicates[(disparity, attribute, label)], dtype=float)
    if performance.size == 0:
        raise ValueError("The evaluation has no bootstrap replicates (n_bootstrap=0).")
    return performance, gap


def _ordered(evaluations):
    values = list(evaluations.values() if isinstance(evaluations, dict) else evaluations)
    if not values:
        raise ValueError("evaluations must be a non-empty list or dict of checkpoint "
                         "evaluations, in update order.")
    return values


def curve_from_evaluations(evaluations, attribute, *, disparity=None, label=None, rule="all"):
    """The non-private curve through checkpoints' evaluations.

    Args:
        evaluations: list (or dict name -> evaluation) of the non-private
            checkpoints' evaluations, in update order.
        attribute, disparity, label: as in `evaluation_point`.
        rule: as in `build_curve`.

    Returns:
        A `NonPrivateCurve`.

    Raises:
        ValueError: no evaluations, and as `evaluation_point` and
            `build_curve`.
    """
    points = [evaluation_point(e, attribute, disparity=disparity, label=label)
              for e in _ordered(evaluations)]
    return curve_from_points(points, rule=rule)


def curve_draws_from_evaluations(evaluations, attribute, *, disparity=None, label=None,
                                 rule="all"):
    """Bootstrap draws of the non-private curve, from its checkpoints' replicates.

    All checkpoints must share one `resample_key` (the same labels, groups,
    seed and replicate count), so that draw b of every checkpoint is the same
    resample of the test set; evaluate the private model with it too, so
    that its draws pair with the curve's.

    Args:
        evaluations, attribute, disparity, label, rule: as in
            `curve_from_evaluations`.

    Returns:
        A `CurveDraws` of B curves.

    Raises:
        ValueError: evaluations of different resamples, and as
            `evaluation_draws` and `build_curve_draws`.
    """
    values = _ordered(evaluations)
    if len({e.resample_key for e in values}) > 1:
        raise ValueError("The checkpoints were evaluated on different resamples "
                         "(resample_key): evaluate all with the same labels, groups, "
                         "seed and n_bootstrap.")
    draws = [evaluation_draws(e, attribute, disparity=disparity, label=label)
             for e in values]
    return build_curve_draws(np.stack([p for p, _ in draws], axis=1),
                             np.stack([g for _, g in draws], axis=1), rule=rule)
