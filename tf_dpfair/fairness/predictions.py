"""Predict on held-out data, then evaluate both metric families.

`predict` runs a model over an evaluation dataset and gathers every
example's scores, labels, label mask and group ids; `evaluate_predictions`
turns them into the AUC evaluation (`auc.evaluate_auc`) and the error-rate
evaluation (`rates.evaluate_rates`) of the same examples;
`predict_and_evaluate` does both.

Multi-class data: the AUC is one-vs-rest per class on the given scores, the
error rates use the top-1 class on probabilities. Binary and multi-label
data: the AUC per label, the error rates at `threshold` (none without one).
"""

import keras
import numpy as np
import tensorflow as tf

from tf_dpfair.data import batch as batch_lib
from tf_dpfair.fairness import auc
from tf_dpfair.fairness import rates

ACTIVATIONS = (None, "sigmoid", "softmax")


def predict(forward, dataset, *, activation=None, num_examples=None, attributes=None):
    """Scores, labels and groups of every example of an evaluation dataset.

    Args:
        forward: callable `x -> outputs` (e.g. a traced `model(x,
            training=False)`).
        dataset: iterable of `(x, y)` or `(x, y, sample_weight)`, `y` a
            label array or the dict of `tf_dpfair.data.batch` (`label`,
            `groups`, `label_mask`).
        activation: applied to the outputs: None, "sigmoid" or "softmax".
        num_examples: keep the first `num_examples` examples (the rest is
            padding); None keeps the rows of nonzero weight instead.
        attributes: the group attributes to keep; each batch must carry
            group ids then. None keeps every attribute there is.

    Returns:
        dict with "scores" (outputs `[N, ...]`, after `activation`),
        "labels", "groups" {attribute: ids `[N]`} and "label_mask" (0 =
        label unknown; ones for batches without one; None when no batch has
        one).

    Raises:
        ValueError: an unknown activation, or no group ids with `attributes`.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}.")
    scores, labels, masks, keeps, groups = [], [], [], [], {}
    any_mask = False
    for element in dataset:
        x, y, weights = keras.utils.unpack_x_y_sample_weight(element)
        label, ids = batch_lib.split_labels(y)
        if attributes is not None and ids is None:
            raise ValueError("evaluation_data must give y = {'label': ..., 'groups': "
                             "...} (exact AUC needs each example's groups).")
        outputs = forward(x)
        if activation == "sigmoid":
            outputs = tf.sigmoid(outputs)
        elif activation == "softmax":
            outputs = tf.nn.softmax(outputs)
        scores.append(np.asarray(outputs))
        labels.append(np.asarray(label))
        keeps.append(np.ones(len(scores[-1]), bool) if weights is None
                     else np.asarray(weights).reshape(-1) > 0)
        mask = batch_lib.label_mask_of(y)
        any_mask = any_mask or mask is not None
        masks.append(None if mask is None else np.asarray(mask))
        for attribute in (ids or {}) if attributes is None else attributes:
            groups.setdefault(attribute, []).append(np.asarray(ids[attribute]).reshape(-1))
    keep = (slice(0, num_examples) if num_examples is not None
            else np.concatenate(keeps))
    if any_mask:
        masks = [np.ones(np.shape(lab), float) if m is None else m
                 for m, lab in zip(masks, labels)]
    return {"scores": np.concatenate(scores)[keep],
            "labels": np.concatenate(labels)[keep],
            "label_mask": np.concatenate(masks)[keep] if any_mask else None,
            "groups": {a: np.concatenate(v)[keep] for a, v in groups.items()}}


def evaluate_predictions(predictions, *, multi_class, threshold=None, from_logits=False,
                         label_names=None, group_names=None, n_bootstrap=1000,
                         confidence=0.95, seed=0, split="test"):
    """The AUC and error-rate evaluations of one model's predictions.

    Args:
        predictions: from `predict`: "scores", "labels", "groups" and
            optionally "label_mask".
        multi_class: labels are class ids `[N]` and scores `[N, K]`.
        threshold: decision threshold(s) of binary and multi-label data (see
            `rates.evaluate_rates`); None skips the error rates there.
        from_logits: scores are logits; the error rates then see their
            softmax (multi-class) or sigmoid. The AUC takes them as given.
        label_names: names of the labels or classes (default: class ids as
            strings for multi-class data, else `auc.evaluate_auc`'s).
        group_names: dict attribute -> group names (index = id).
        n_bootstrap, confidence, seed, split: as in `auc.evaluate_auc`.

    Returns:
        `(auc.GroupEvaluation, rates.RateEvaluation or None)`.
    """
    labels, scores = predictions["labels"], predictions["scores"]
    groups, mask = predictions["groups"], predictions.get("label_mask")
    common = {"group_names": group_names, "n_bootstrap": n_bootstrap,
              "confidence": confidence, "seed": seed, "split": split}
    if multi_class:
        classes = np.asarray(labels).reshape(-1).astype(np.int64)
        num_classes = np.shape(scores)[1]
        names = ([str(k) for k in range(num_classes)] if label_names is None
                 else list(label_names))
        evaluation = auc.evaluate_auc(np.eye(num_classes)[classes], scores, groups,
                                      label_names=names, **common)
        if from_logits:
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        return evaluation, rates.evaluate_rates(classes, scores, groups, multi_class=True,
                                                label_names=names, **common)
    names = None if label_names is None else list(label_names)
    # Unknown labels (mask 0) are left out of the AUCs, as of the loss.
    evaluation = auc.evaluate_auc(labels, scores, groups, label_names=names,
                                  label_mask=mask, **common)
    if threshold is None:
        return evaluation, None
    if from_logits:
        scores = 1.0 / (1.0 + np.exp(-scores))
    if mask is not None:
        labels = np.where(mask == 1, labels, 0.0)  # placeholders of unknown labels
    return evaluation, rates.evaluate_rates(labels, scores, groups, threshold=threshold,
                                            label_names=names, label_mask=mask, **common)


def predict_and_evaluate(forward, dataset, *, multi_class, activation=None,
                         num_examples=None, attributes=None, **evaluate_kwargs):
    """`predict`, then `evaluate_predictions`.

    Args:
        forward, dataset, activation, num_examples, attributes: as in
            `predict`.
        multi_class: as in `evaluate_predictions`.
        **evaluate_kwargs: the other arguments of `evaluate_predictions`.

    Returns:
        `(predictions, auc.GroupEvaluation, rates.RateEvaluation or None)`.
    """
    predictions = predict(forward, dataset, activation=activation,
                          num_examples=num_examples, attributes=attributes)
    evaluation, rate_evaluation = evaluate_predictions(predictions, multi_class=multi_class,
                                                       **evaluate_kwargs)
    return predictions, evaluation, rate_evaluation
