"""Private vs non-private at matched accuracy: the comparison every family shares.

Following Berrada et al. (2023), a private model is compared with the
non-private checkpoint whose overall figure (AUC for `auc`, accuracy for
`rates`) is closest to its own, so that a difference in disparity is not
merely a difference in accuracy. `compare_matched` is that procedure once:

1. evaluate the private model (unless given as an evaluation);
2. score every checkpoint cheaply on the matched figure and choose the
   closest (the first one on equal distance);
3. evaluate the chosen checkpoint in full and check that both evaluations
   saw the same data and settings;
4. set both models' tables side by side (a `Family` says how), with paired
   bootstrap intervals of private - non-private when both evaluations drew
   the same resamples (equal `resample_key`).

`auc_report.compare_matched_auc` and `rates_report.compare_matched_rates`
are its two families.
"""

import dataclasses
import math
import os
from typing import Callable

import pandas as pd

from tf_dpfair.fairness import engine


@dataclasses.dataclass(frozen=True, eq=False)
class Comparison:
    """A private model and its matched non-private checkpoint, side by side.

    Attributes:
        private: evaluation of the private model.
        non_private: evaluation of the matched non-private checkpoint.
        checkpoint: name of that checkpoint.
        candidates: DataFrame, one row per checkpoint: the matched figure
            (`auc` or `accuracy`), its `distance` to the private model's,
            `chosen`.
        groups: DataFrame, per (attribute, group, label): both models'
            figures with intervals.
        disparities: DataFrame, per (attribute, label): both models'
            disparities with intervals and their differences private -
            non-private (paired intervals, or NaN when not paired).
        paired: whether the difference intervals are paired bootstrap
            intervals (else they are NaN).
    """

    private: object
    non_private: object
    checkpoint: str
    candidates: pd.DataFrame
    groups: pd.DataFrame
    disparities: pd.DataFrame
    paired: bool

    @property
    def split(self):
        """Where the data came from."""
        return self.private.split

    @property
    def outside_dp_guarantee(self):
        """True when the figures come from training data."""
        return self.private.outside_dp_guarantee


@dataclasses.dataclass(frozen=True)
class Family:
    """How `compare_matched` handles one metric family.

    Attributes:
        evaluation_type: the family's evaluation class (`GroupEvaluation`,
            `RateEvaluation`).
        source: where such an evaluation comes from, for error messages.
        evaluate: `(labels, scores, groups, **kwargs) -> evaluation`.
        figure: the matched figure in words ("AUC", "accuracy").
        column: its column in `candidates`.
        overall: `evaluation -> float`, the matched figure.
        quick: `(scores, labels, groups, kwargs) -> float`, the matched
            figure of a checkpoint given as scores, cheaply.
        same_data: `(private, non_private) -> bool`: both evaluated on the
            same data with the same settings.
        settings: what `same_data` compares, in words, for its error.
        side_by_side: `(private, non_private, paired) -> (groups,
            disparities)` tables of the comparison.
        comparison: the `Comparison` subclass to return.
    """

    evaluation_type: type
    source: str
    evaluate: Callable
    figure: str
    column: str
    overall: Callable
    quick: Callable
    same_data: Callable
    settings: str
    side_by_side: Callable
    comparison: type


def paired_intervals(private, non_private, keys, paired):
    """Intervals of private - non-private over paired replicates (or NaN).

    Args:
        private, non_private: evaluations with `replicates` and `confidence`.
        keys: replicate keys, one per interval.
        paired: whether both drew the same resamples; else NaN intervals.

    Returns:
        `(lows, highs)`, lists of floats.
    """
    if not paired:
        return [math.nan] * len(keys), [math.nan] * len(keys)
    bounds = [engine.percentile_interval(
        private.replicates[key] - non_private.replicates[key], private.confidence)
        for key in keys]
    return [low for low, _ in bounds], [high for _, high in bounds]


def _evaluated(family, scores_or_evaluation, what, labels, groups, kwargs):
    if isinstance(scores_or_evaluation, family.evaluation_type):
        return scores_or_evaluation
    if labels is None or groups is None:
        raise ValueError(f"{what} is given as scores: pass `labels` and `groups` too (or "
                         f"a {family.source}).")
    return family.evaluate(labels, scores_or_evaluation, groups, **kwargs)


def _candidates(family, checkpoints, target, labels, groups, kwargs):
    """One row per checkpoint: its matched figure and distance to `target`."""
    rows = []
    for name, candidate in checkpoints.items():
        if isinstance(candidate, family.evaluation_type):
            value = family.overall(candidate)
        elif labels is None or groups is None:
            raise ValueError(f"Checkpoint {name!r} is given as scores: pass `labels` and "
                             f"`groups` too (or a {family.source}).")
        else:
            value = family.quick(candidate, labels, groups, kwargs)
        rows.append({"checkpoint": str(name), family.column: value,
                     "distance": abs(value - target)})
    candidates = pd.DataFrame(rows)
    if candidates["distance"].isna().all():
        raise ValueError(f"No checkpoint has a defined overall {family.figure}.")
    candidates["chosen"] = candidates.index == int(candidates["distance"].idxmin())
    return candidates


def compare_matched(family, private, checkpoints, *, labels=None, groups=None,
                    evaluate_kwargs=None):
    """Compares a private model with the non-private checkpoint of closest figure.

    Args:
        family: the `Family` compared.
        private: evaluation of the private model, or its scores (then
            `labels` and `groups` are needed).
        checkpoints: non-empty dict name -> evaluation or scores; on equal
            distance the first one wins. Only the chosen checkpoint is
            evaluated in full.
        labels, groups: as in the family's `evaluate`, needed for scores.
        evaluate_kwargs: passed to the family's `evaluate` for scores (the
            same `seed` and `n_bootstrap` for both models give paired
            intervals of the differences).

    Returns:
        An instance of `family.comparison`.

    Raises:
        ValueError: no checkpoints, scores without labels or groups, an
            undefined overall figure, or evaluations that differ in data,
            settings or confidence level.
    """
    if not isinstance(checkpoints, dict) or not checkpoints:
        raise ValueError("checkpoints must be a non-empty dict name -> "
                         f"{family.evaluation_type.__name__} or scores.")
    kwargs = dict(evaluate_kwargs or {})
    private = _evaluated(family, private, "The private model", labels, groups, kwargs)
    target = family.overall(private)
    if math.isnan(target):
        raise ValueError(f"The private model's overall {family.figure} is undefined (NaN).")
    candidates = _candidates(family, checkpoints, target, labels, groups, kwargs)
    name = list(checkpoints)[int(candidates["chosen"].to_numpy().argmax())]
    non_private = _evaluated(family, checkpoints[name], f"Checkpoint {name!r}", labels,
                             groups, kwargs)
    if not family.same_data(private, non_private):
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated on "
                         f"different data or settings {family.settings}")
    if private.confidence != non_private.confidence:
        raise ValueError(f"The private model and checkpoint {name!r} were evaluated at "
                         f"different confidence levels ({private.confidence} and "
                         f"{non_private.confidence}).")
    # Same labels, groups, seed and replicate count: the same resamples.
    paired = private.resample_key == non_private.resample_key
    side, disparities = family.side_by_side(private, non_private, paired)
    return family.comparison(private=private, non_private=non_private, checkpoint=str(name),
                             candidates=candidates, groups=side, disparities=disparities,
                             paired=paired)


def write_tables(result, directory, prefix=""):
    """Writes the tables of an evaluation or a comparison as CSV files.

    Args:
        result: a `Comparison`, or an evaluation of either family
            (`auc.GroupEvaluation`, `rates.RateEvaluation`).
        directory: output directory (created if missing).
        prefix: file name prefix.

    Returns:
        dict table name -> path: `groups`, `disparities`, and `overall`
        (evaluation) or `candidates` (comparison), each `<prefix><name>.csv`.
    """
    os.makedirs(directory, exist_ok=True)
    names = ["groups", "disparities"]
    names.append("candidates" if isinstance(result, Comparison) else "overall")
    paths = {}
    for name in names:
        paths[name] = os.path.join(directory, f"{prefix}{name}.csv")
        getattr(result, name).to_csv(paths[name], index=False)
    return paths
