"""Operating thresholds chosen on validation data, with the rule that chose them.

A decision "score >= threshold" turns scores into the positives that
error-rate fairness measures (`rates.evaluate`) need. The threshold is
part of the model: choose it on validation data, never on the test data it
is then evaluated on, and report the rule (`Threshold.rule`).
"""

import dataclasses
import warnings

import numpy as np
from sklearn.metrics import roc_curve

from tf_dpfair.fairness import engine

RULES = ("youden", "max_fpr")


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Operating thresholds, one per label, and the rule that chose them.

    Attributes:
        values: tuple of floats; a score >= the value is a positive decision.
        rule: how they were chosen, e.g. "Youden's J (max TPR - FPR) on
            validation data".
    """

    values: tuple
    rule: str


def choose_threshold(labels, scores, *, rule="youden", max_fpr=None, label_mask=None,
                     split="validation"):
    """Chooses one threshold per label on held-out (validation) data.

    Candidates are the distinct scores (scikit-learn's `roc_curve`, a score
    >= the threshold is positive). Rules:

    - "youden": maximise TPR - FPR (Youden's J);
    - "max_fpr": maximise TPR subject to FPR <= `max_fpr`.

    Ties go to the largest threshold (fewest positives).

    Args:
        labels: `[N]` or `[N, L]` 0/1 labels of validation data.
        scores: scores of the same shape.
        rule: one of `RULES`.
        max_fpr: the FPR bound of rule "max_fpr", in [0, 1].
        label_mask: optional 0/1 of the labels' shape (0 = unknown label).
        split: where the data came from, recorded in the rule. Choosing on
            the data that is then evaluated biases the figures, so "test"
            warns.

    Returns:
        A `Threshold`.

    Raises:
        ValueError: unknown rule, a missing or bad `max_fpr`, bad labels or
            scores, or a label with only one class.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    if rule == "max_fpr" and (max_fpr is None or not 0.0 <= max_fpr <= 1.0):
        raise ValueError(f"rule 'max_fpr' needs max_fpr in [0, 1]; got {max_fpr!r}.")
    if split.lower() == "test":
        warnings.warn("Choosing the threshold on test data biases the figures evaluated "
                      "there; choose it on validation data.", stacklevel=2)
    labels, scores, label_names, _ = engine.prepare_inputs(
        labels, scores, {"all": np.zeros(len(np.asarray(labels)), int)}, None, None, None,
        label_mask)
    values = []
    for j, name in enumerate(label_names):
        known = ~np.isnan(labels[:, j])
        y, s = labels[known, j], scores[known, j]
        if y.size == 0 or y.min() == y.max():
            raise ValueError(f"Label {name!r} has a single class in the validation data: no "
                             "threshold can be chosen.")
        fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
        if rule == "youden":
            objective = tpr - fpr
        else:
            objective = np.where(fpr <= max_fpr, tpr, -np.inf)
        # roc_curve lists thresholds in decreasing order: argmax takes the
        # first best one, the largest threshold.
        best = int(np.argmax(objective))
        values.append(float(thresholds[best]))
    text = ("Youden's J (max TPR - FPR)" if rule == "youden"
            else f"max TPR with FPR <= {max_fpr:g}")
    return Threshold(values=tuple(values), rule=f"{text} on {split} data")


