"""A run's selection score: a validation split of the training data, scored privately.

A private hyperparameter search (`search_lib`, Papernot & Steinke 2022)
picks its best trial by a score on data the trial did not train on. With
`Settings.validation_fraction > 0` a run carves that validation split out of
its own training data (a seeded permutation of the indices: which examples
go where depends on N, the fraction and the seed, never on the data), trains
on the rest, and scores the final model on the split:

- multi-class data: the number of validation examples whose top class is
  their label;
- multi-label data: the sum over validation examples of the share of their
  known labels decided correctly at `evaluation_lib.THRESHOLD` (an example
  with no known label adds 0).

Either way one example moves the score by at most 1 (sensitivity 1). The
released score is that count plus N(0, score_noise^2) noise drawn from the
operating system's secret source (`secrets`), never from the run's seed: this
is the Gaussian mechanism `search_privacy.score_event` accounts. With
`public_validation` the data is declared public and the exact count is the
score (the statement says the guarantee does not cover that data). EMA
weights score the model where the run keeps EMA, as its reports do.
"""

import dataclasses
import secrets

import numpy as np

from tf_dpfair.data import pipeline as data_lib
from tf_dpfair.experiments import evaluation_lib

SENSITIVITY = 1.0


def carve_validation(run_data, fraction, seed):
    """Splits `run_data.train` into a training part and a validation part.

    Args:
        run_data: the run's `inputs_lib.RunData`.
        fraction: share of the training examples held out, in (0, 1).
        seed: the run's seed (the permutation is seeded by it).

    Returns:
        `(run_data with train = the training part, validation ExampleSource)`.

    Raises:
        ValueError: a fraction outside (0, 1).
    """
    train, validation, _, _ = run_data.train.split(fraction, seed)
    description = (f"{run_data.description}; {validation.num_examples} of them held out "
                   f"for validation, {train.num_examples} trained on")
    return dataclasses.replace(run_data, train=train, description=description), validation


def correct_count(predictions, multi_label):
    """The exact selection score of predictions (see the module docstring).

    Args:
        predictions: `evaluation_lib.predict` output (scores `[N, L]`,
            labels `[N]` or `[N, L]`, label_mask `[N, L]` or None).
        multi_label: score label decisions instead of top classes.

    Returns:
        A float in [0, N]; one example changes it by at most 1.
    """
    scores, labels = predictions["scores"], predictions["labels"]
    if not multi_label:
        return float(np.sum(scores.argmax(1) == labels))
    mask = predictions.get("label_mask")
    mask = np.ones_like(scores) if mask is None else np.asarray(mask, np.float64)
    right = ((scores >= evaluation_lib.THRESHOLD) == (labels >= 0.5)) * mask
    known = mask.sum(1)
    return float(np.sum(np.where(known > 0, right.sum(1) / np.maximum(known, 1), 0.0)))


def selection_score(model, run_data, validation, settings):
    """Scores the trained model on the validation split and releases the score.

    Args:
        model: the trained model (EMA weights are used where it keeps them).
        run_data: the run's `RunData` (multi_label).
        validation: the validation `ExampleSource` (`carve_validation`).
        settings: the run's settings (score_noise, public_validation,
            eval_batch_size, private).

    Returns:
        The `"selection"` entry of result.json: "score" (noisy unless the
        data is public), "validation_examples", "score_noise", "sensitivity",
        "weights", "public_validation", "counted" (what the count counts) and
        "statement". The exact count appears only when the data is public or
        the run is not private.
    """
    dataset = data_lib.make_eval_dataset(validation, batch_size=settings.eval_batch_size,
                                         microbatch_size=1, num_replicas=1)
    forward = evaluation_lib.forward_fn(model)
    ema = getattr(model, "_ema_shadows", None) is not None
    if ema:
        with model.ema_weights():
            predictions = evaluation_lib.predict(forward, dataset, validation.num_examples,
                                                 run_data.multi_label)
    else:
        predictions = evaluation_lib.predict(forward, dataset, validation.num_examples,
                                             run_data.multi_label)
    exact = correct_count(predictions, run_data.multi_label)
    counted = ("per example, the share of its known labels decided correctly at "
               f"threshold {evaluation_lib.THRESHOLD}" if run_data.multi_label
               else "validation examples whose top class is their label")
    entry = {"validation_examples": validation.num_examples, "sensitivity": SENSITIVITY,
             "weights": "ema" if ema else "raw", "counted": counted,
             "public_validation": bool(settings.public_validation),
             "score_noise": float(settings.score_noise)}
    n = validation.num_examples
    if settings.score_noise > 0:
        # The OS's secret source: the run's seed (public in deterministic
        # runs) must not let anyone subtract this noise.
        noisy = exact + secrets.SystemRandom().gauss(0.0, settings.score_noise)
        entry["score"] = noisy
        entry["statement"] = (
            f"Selection score: correct predictions on {n} validation examples held out "
            f"of the training data, plus Gaussian noise of standard deviation "
            f"{settings.score_noise:g} (sensitivity 1; exact count not released).")
    else:
        entry["score"] = exact
        why = ("declared public (the DP guarantee does not cover it)"
               if settings.public_validation else "of a non-private run")
        entry["statement"] = (f"Selection score: exact count of correct predictions on "
                              f"{n} validation examples {why}.")
    return entry
