"""Exact evaluation of a run on its test split: predictions, per-group figures, reports.

It is about 490 lines because it is the one place where a run's predictions
become every figure reported for it (listed below), in one order, and where
its checkpoints are scored during training (`EpochEvaluation`, which
`evaluate_final` reuses for the final scores).

Figures reported for every run (raw weights, and EMA weights where kept):

- AUC: `tf_dpfair.fairness.auc.evaluate` with bootstrap intervals. For
  multi-label data (chest X-rays) the mean AUC over labels, as in the paper.
  For multi-class data (Fashion-MNIST, ImageNet) the macro mean of the
  one-vs-rest AUCs of the classes (each class's AUC in a group is defined
  when the group holds examples of that class and of others).
- Accuracy, for multi-class data only: top-1 accuracy overall and per group,
  with bootstrap intervals resampled within each group (the figure of the
  PAIR explorable's rotated-digit study, where the rare group's accuracy
  collapses while its AUC can stay far above chance).
- Error rates and calibration (`tf_dpfair.fairness.rates.evaluate`): per group
  TPR, FPR, selection rate, error, ECE (10 equal-width bins) and Brier
  score, equal-opportunity and equalized-odds differences. Multi-class data:
  the top-1 decision (classes one-vs-rest, and top-1 error and confidence
  calibration); multi-label data: the given threshold `THRESHOLD` on each
  label's probability (the runs have no validation split to choose one on).

Everything here is computed on held-out test data, except the validation
figures of `EpochEvaluation` (a run with `validation_fraction > 0`): at every
checkpoint it scores the validation split carved from the training data
(`selection_lib.carve_validation`) and saves and logs those scores. They are
exact figures on held-out private data, used by the sweep report for its
choices (learning rate) and its plateau check; like the test figures they
are outside the DP guarantee unless the run declares the split public
(`public_validation`). Keep them with the person training the model.
"""

import glob
import os

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tf_dpfair.data import pipeline as data_pipeline
from tf_dpfair.fairness import auc
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import predictions as predictions_lib
from tf_dpfair.fairness import report

NO_GROUPS = "all"
# Decision threshold of multi-label runs, given (stated in every report).
THRESHOLD = 0.5


def forward_fn(model):
    """A traced inference pass of `model` (reuse it: tracing is slow)."""
    return tf.function(lambda x: model(x, training=False))


def predict(forward, dataset, num_examples, multi_label):
    """Scores, labels and groups of every example of an evaluation dataset.

    Args:
        forward: `forward_fn(model)`, a model producing logits; EMA weights
            swapped into the model's variables are seen by the same function.
        dataset: from `tf_dpfair.data.make_eval_dataset` (with groups), in
            index order with weight-0 padding at the end.
        num_examples: real examples in the dataset (padding is dropped).
        multi_label: sigmoid scores per label instead of softmax scores.

    Returns:
        dict with "scores" float `[N, L]` (probabilities), "labels" (`[N]`
        class ids or `[N, L]` 0/1), "groups" {attribute: int ids `[N]`} and
        "label_mask" (`[N, L]`, 0 = label unknown; None when every label is
        known).
    """
    out = predictions_lib.predict(forward, dataset, num_examples=num_examples,
                                  activation="sigmoid" if multi_label else "softmax")
    out["scores"] = out["scores"].astype(np.float64)
    return out


def label_arrays(predictions):
    """The arrays saved beside scores: labels, label mask (if any), groups."""
    arrays = {"labels": predictions["labels"]}
    if predictions.get("label_mask") is not None:
        arrays["label_mask"] = predictions["label_mask"]
    arrays.update({"group_" + a: v for a, v in predictions["groups"].items()})
    return arrays


def _groups_and_names(predictions, group_spec):
    """Group ids and names for `auc.evaluate`; one group "all" when none."""
    groups = predictions["groups"]
    if not groups:
        count = len(predictions["labels"])
        return {NO_GROUPS: np.zeros(count, np.int64)}, {NO_GROUPS: [NO_GROUPS]}
    return groups, {a: list(group_spec.names(a)) for a in groups}


def auc_evaluation(predictions, group_spec, class_names, multi_label, *, n_bootstrap,
                   seed=0):
    """Per-group AUC with intervals (`auc.evaluate`) of one model's predictions.

    Args:
        predictions: output of `predict`.
        group_spec: `GroupSpec` naming the group ids.
        class_names: names of the classes (multi-class) or labels.
        multi_label: whether labels are `[N, L]` 0/1 targets.
        n_bootstrap: bootstrap replicates.
        seed: bootstrap seed; equal seeds give paired intervals in
            `auc_report.compare_matched_auc`.

    Returns:
        A `auc.GroupEvaluation` (one-vs-rest per class for multi-class
        data; its summary label "mean" is the macro mean).
    """
    labels = predictions["labels"]
    if not multi_label:
        labels = np.eye(len(class_names))[labels]
    groups, names = _groups_and_names(predictions, group_spec)
    return auc.evaluate(labels, predictions["scores"], groups, label_names=class_names,
                             group_names=names, n_bootstrap=n_bootstrap, seed=seed,
                             split="test", label_mask=predictions.get("label_mask"))


def rate_kwargs(multi_label, label_mask=None):
    """The decision arguments of `error_rates.evaluate` for a run's data."""
    if multi_label:
        return {"threshold": THRESHOLD, "label_mask": label_mask}
    return {"multi_class": True}


def rate_evaluation(predictions, group_spec, class_names, multi_label, *, n_bootstrap,
                    seed=0):
    """Per-group error rates and calibration (`error_rates.evaluate`) of predictions.

    Args:
        predictions: output of `predict` (probabilities).
        group_spec: `GroupSpec` naming the group ids.
        class_names: names of the classes or labels.
        multi_label: multi-label data (threshold `THRESHOLD`) or multi-class
            (top-1 decision).
        n_bootstrap: bootstrap replicates.
        seed: bootstrap seed (equal seeds pair two models' intervals).

    Returns:
        An `error_rates.RateEvaluation`.
    """
    groups, names = _groups_and_names(predictions, group_spec)
    return error_rates.evaluate(
        predictions["labels"], predictions["scores"], groups, label_names=list(class_names),
        group_names=names, n_bootstrap=n_bootstrap, seed=seed, split="test",
        **rate_kwargs(multi_label, predictions.get("label_mask")))


def evaluate_both(predictions, group_spec, class_names, multi_label, *, n_bootstrap, seed=0):
    """`auc_evaluation` and `rate_evaluation` of the same predictions, in one call.

    Args:
        predictions, group_spec, class_names, multi_label, n_bootstrap, seed:
            as in `auc_evaluation`.

    Returns:
        `(auc.GroupEvaluation, rates.RateEvaluation)`
        (`tf_dpfair.fairness.predictions.evaluate_predictions`).
    """
    groups, names = _groups_and_names(predictions, group_spec)
    return predictions_lib.evaluate_predictions(
        {**predictions, "groups": groups}, multi_class=not multi_label,
        threshold=THRESHOLD if multi_label else None, label_names=list(class_names),
        group_names=names, n_bootstrap=n_bootstrap, seed=seed, split="test")


def accuracy_table(predictions, group_spec, *, n_bootstrap, seed=0, confidence=0.95):
    """Top-1 accuracy overall and per group, with bootstrap intervals.

    The bootstrap resamples within each group, so each replicate of a group's
    accuracy is Binomial(n, accuracy) / n; worst group and gap get intervals
    from the same replicates.

    Args:
        predictions: output of `predict` for multi-class data.
        group_spec: `GroupSpec` naming the group ids.
        n_bootstrap: bootstrap replicates (0: NaN bounds).
        seed: bootstrap seed.
        confidence: confidence level of the intervals.

    Returns:
        `(groups, disparities)` DataFrames: one row per attribute and group
        (attribute "overall" holds all examples) with count, accuracy,
        accuracy_low, accuracy_high; and one row per attribute with
        worst_group, worst_accuracy and gap (max - min) with intervals.
    """
    correct = (predictions["scores"].argmax(axis=1) == predictions["labels"]).astype(float)
    groups, names = _groups_and_names(predictions, group_spec)
    rng = np.random.default_rng([seed, 7])
    rows, disparities = [], []

    def row(attribute, group, hits):
        accuracy = float(hits.mean()) if hits.size else np.nan
        draws = (rng.binomial(hits.size, accuracy, n_bootstrap) / hits.size
                 if hits.size else np.full(n_bootstrap, np.nan))
        low, high = auc.percentile_interval(draws, confidence)
        rows.append({"attribute": attribute, "group": group, "count": int(hits.size),
                     "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high})
        return accuracy, draws

    row("overall", "all", correct)
    for attribute, ids in groups.items():
        values, draws = zip(*(row(attribute, name, correct[ids == g])
                              for g, name in enumerate(names[attribute])))
        values, draws = np.array(values), np.array(draws)
        present = ~np.isnan(values)
        worst = int(np.nanargmin(values))
        gap_draws = np.nanmax(draws[present], 0) - np.nanmin(draws[present], 0)
        worst_low, worst_high = auc.percentile_interval(
            np.nanmin(draws[present], 0), confidence)
        gap_low, gap_high = auc.percentile_interval(gap_draws, confidence)
        disparities.append({
            "attribute": attribute, "worst_group": names[attribute][worst],
            "worst_accuracy": values[worst], "worst_accuracy_low": worst_low,
            "worst_accuracy_high": worst_high,
            "gap": float(np.nanmax(values) - np.nanmin(values)),
            "gap_low": gap_low, "gap_high": gap_high})
    return pd.DataFrame(rows), pd.DataFrame(disparities)


def summarize_rates(rates):
    """The error-rate figures of one model that go into result.json.

    Multi-class data: top-1 error, ECE and Brier score, and the mean over
    classes of TPR, FPR and the equal-opportunity and equalized-odds
    differences; multi-label: the means over labels.

    Args:
        rates: the model's `error_rates.RateEvaluation`.

    Returns:
        dict with "decision", "n_bins", and per attribute "groups" {group:
        {tpr, fpr, error, ece, brier}} and "disparities"
        {equal_opportunity_difference, equalized_odds_difference, error_gap,
        ece_gap, each with _low and _high}.
    """
    def number(value):
        return None if pd.isna(value) else float(value)

    calibrated = error_rates.TOP1_LABEL if rates.multi_class else rates.summary_label
    out = {"decision": rates.threshold_rule, "n_bins": rates.n_bins, "groups": {},
           "disparities": {}}
    for r in rates.groups.itertuples():
        if r.label not in (rates.summary_label, calibrated):
            continue
        entry = out["groups"].setdefault(r.attribute, {}).setdefault(r.group, {})
        names = ("tpr", "fpr") if r.label == rates.summary_label else ()
        names += ("error", "ece", "brier") if r.label == calibrated else ()
        entry.update({name: number(getattr(r, name)) for name in names})
    for r in rates.disparities.itertuples():
        names = ("equal_opportunity_difference", "equalized_odds_difference")
        if r.label not in (rates.summary_label, calibrated):
            continue
        entry = out["disparities"].setdefault(r.attribute, {})
        chosen = (names if r.label == rates.summary_label else ()) + (
            ("error_gap", "ece_gap") if r.label == calibrated else ())
        for name in chosen:
            for suffix in ("", "_low", "_high"):
                entry[name + suffix] = number(getattr(r, name + suffix))
    return out


def summarize(evaluation, accuracy=None, rates=None):
    """The figures of one model that go into result.json (plain floats).

    Args:
        evaluation: the model's `auc.GroupEvaluation`.
        accuracy: `accuracy_table` output, or None (multi-label data).
        rates: the model's `error_rates.RateEvaluation`, or None.

    Returns:
        dict with "auc", "accuracy" (or None), and per attribute "groups"
        {group: {count, auc, auc_low, auc_high, accuracy, ...}}, "worst" and
        "gap" {"auc", "accuracy"} and "worst_group"; with `rates`, "rates"
        (`summarize_rates`).
    """
    label = evaluation.summary_label

    def number(value):
        return None if pd.isna(value) else float(value)

    out = {"auc": number(evaluation.overall_auc), "accuracy": None, "groups": {},
           "worst_group": {}, "worst": {}, "gap": {}}
    table = evaluation.groups[evaluation.groups["label"] == label]
    for r in table.itertuples():
        out["groups"].setdefault(r.attribute, {})[r.group] = {
            "count": int(r.count), "auc": number(r.auc), "auc_low": number(r.auc_low),
            "auc_high": number(r.auc_high)}
    disparities = evaluation.disparities[evaluation.disparities["label"] == label]
    for r in disparities.itertuples():
        out["worst_group"][r.attribute] = r.worst_group
        out["worst"][r.attribute] = {"auc": number(r.worst_auc)}
        out["gap"][r.attribute] = {"auc": number(r.gap), "auc_low": number(r.gap_low),
                                   "auc_high": number(r.gap_high)}
    if accuracy is not None:
        groups, accuracy_disparities = accuracy
        out["accuracy"] = number(groups.loc[groups["attribute"] == "overall",
                                            "accuracy"].iloc[0])
        for r in groups[groups["attribute"] != "overall"].itertuples():
            out["groups"][r.attribute][r.group].update(
                accuracy=number(r.accuracy), accuracy_low=number(r.accuracy_low),
                accuracy_high=number(r.accuracy_high))
        for r in accuracy_disparities.itertuples():
            # The accuracy's worst group can differ from the AUC's.
            out["worst"][r.attribute].update(accuracy=number(r.worst_accuracy),
                                             accuracy_group=r.worst_group)
            out["gap"][r.attribute].update(accuracy=number(r.gap),
                                           accuracy_low=number(r.gap_low),
                                           accuracy_high=number(r.gap_high))
    if rates is not None:
        out["rates"] = summarize_rates(rates)
    return out


def write_run_report(evaluation, accuracy, directory, title, rates=None):
    """Writes the exact fairness report of one model (CSV, Markdown, PNG).

    `tf_dpfair.fairness.report.write_report` writes the AUC sections, the
    error-rate and calibration sections (with `rates`) and the accuracy
    tables (multi-class data) into one report.md.

    Args:
        evaluation: `auc.GroupEvaluation`.
        accuracy: `accuracy_table` output, or None.
        directory: output folder.
        title: report title.
        rates: `rates.RateEvaluation`, or None.

    Returns:
        dict name -> path, as `report.write_report`.
    """
    return report.write_report(directory, auc=evaluation, rates=rates, accuracy=accuracy,
                               title=title)


class EpochEvaluation(keras.callbacks.Callback):
    """Scores the test (and validation) split at checkpoints: logs and saved scores.

    A checkpoint is taken every `every` epochs (`checkpoints/epoch_NNN.npz`)
    and, with `every_updates` N > 0, every N optimizer updates
    (`checkpoints/update_NNNNNN.npz`, from `on_train_batch_end`: one Keras
    step is one update, counted by `model.optimizer.iterations`). Every file
    holds "scores" (test, raw weights, float32 `[N_test, L]`), "ema_scores"
    (where the model keeps EMA), "updates" and "epoch" (the 1-based epoch
    the checkpoint was taken in), and with a validation split "val_scores"
    (and "ema_val_scores"). Labels and groups are saved once, in
    `labels.npz` and `val_labels.npz`. Evaluated epochs add `test_accuracy`
    / `test_auc`, `validation_accuracy` / `validation_auc` (named so as not
    to clash with Keras' own `val_` keys) and their `ema_` forms to the
    epoch logs. At the start of training (a resumed run included), files of
    checkpoints beyond the model's update count are deleted: they belong to
    updates the backup lost, and the resumed run writes them anew.
    """

    def __init__(self, dataset, run_data, directory, every, *, every_updates=0,
                 validation=None, validation_batch_size=500):
        super().__init__()
        self.dataset, self.run_data = dataset, run_data
        self.directory, self.every, self.every_updates = directory, every, every_updates
        self.validation = None
        if validation is not None:
            self.validation = (data_pipeline.make_eval_dataset(
                validation, batch_size=validation_batch_size), validation.num_examples)
        self._epoch, self._period, self._last = 0, 0, None

    def set_model(self, model):
        super().set_model(model)
        self._forward = forward_fn(model)

    def _predict(self, dataset, num_examples, ema):
        multi_label = self.run_data.multi_label
        if ema:
            with self.model.ema_weights():
                return predict(self._forward, dataset, num_examples, multi_label)
        return predict(self._forward, dataset, num_examples, multi_label)

    def scores(self, ema):
        """Test predictions (see `predict`), EMA weights if `ema`."""
        return self._predict(self.dataset, self.run_data.test.num_examples, ema)

    def _updates(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _figures(self, predictions, name, with_auc=True):
        """`{name}_auc` (and `{name}_accuracy` for multi-class data) of predictions.

        Without `with_auc` (checkpoints between epochs), multi-class data
        gets its accuracy only: per-group AUCs cost far more than a small
        model's few updates, and the report reads the saved scores anyway.
        """
        data = self.run_data
        figures = {}
        if with_auc or data.multi_label:
            figures[f"{name}_auc"] = auc_evaluation(
                predictions, data.group_spec, data.class_names, data.multi_label,
                n_bootstrap=0).overall_auc
        if not data.multi_label:
            correct = predictions["scores"].argmax(1) == predictions["labels"]
            figures[f"{name}_accuracy"] = float(correct.mean())
        return figures

    def _evaluate(self, with_auc=True):
        """`(arrays to save, figures to log)` of the model now; writes the label files."""
        saved, figures = {"epoch": self._epoch + 1, "updates": self._updates()}, {}
        splits = [("", "test", self.dataset, self.run_data.test.num_examples, "labels")]
        if self.validation is not None:
            splits.append(("val_", "validation", *self.validation, "val_labels"))
        for key, name, dataset, count, labels_name in splits:
            for prefix, ema in (("", False), ("ema_", True)):
                if ema and getattr(self.model, "_ema_shadows", None) is None:
                    continue
                predictions = self._predict(dataset, count, ema)
                saved[f"{prefix}{key}scores"] = predictions["scores"].astype(np.float32)
                figures.update({prefix + k: v
                                for k, v in self._figures(predictions, name,
                                                          with_auc).items()})
            labels_path = os.path.join(self.directory, f"{labels_name}.npz")
            if not os.path.exists(labels_path):
                os.makedirs(self.directory, exist_ok=True)
                np.savez(labels_path, **label_arrays(predictions))
        return saved, figures

    def on_train_begin(self, logs=None):
        updates = self._updates()
        self._period = updates // self.every_updates if self.every_updates else 0
        if not self.directory:
            return
        for path in glob.glob(os.path.join(self.directory, "*_*.npz")):
            name = os.path.basename(path)
            if name.startswith(("epoch_", "update_")):
                with np.load(path) as saved:
                    stale = int(saved["updates"]) > updates
                if stale:
                    os.remove(path)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_updates:
            return
        updates = self._updates()
        if updates // self.every_updates <= self._period:
            return
        self._period = updates // self.every_updates
        self._last = (updates, *self._evaluate(with_auc=False))
        np.savez(os.path.join(self.directory, f"update_{updates:06d}.npz"), **self._last[1])

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch + 1) % self.every:
            return
        if self._last is not None and self._last[0] == self._updates() and (
                self.run_data.multi_label):
            saved, figures = self._last[1:]  # Scored at this update by on_train_batch_end.
        else:
            saved, figures = self._evaluate()
        if logs is not None:
            logs.update(figures)
        np.savez(os.path.join(self.directory, f"epoch_{epoch + 1:03d}.npz"), **saved)


def evaluate_final(model, run_data, test, work_dir, n_bootstrap):
    """Writes the final reports and predictions of a trained model.

    Args:
        model: the trained model (a DPModel with EMA gets both reports).
        run_data: the run's `inputs_lib.RunData`.
        test: the test split's evaluation dataset.
        work_dir: the run's folder: `report_raw/`, `report_ema/` and
            `predictions.npz` go there.
        n_bootstrap: bootstrap replicates of the intervals.

    Returns:
        dict "raw", "ema" -> `summarize` output (None without EMA).
    """
    variants = {"raw": False}
    if getattr(model, "_ema_shadows", None) is not None:
        variants["ema"] = True
    metrics, arrays = {"raw": None, "ema": None}, {}
    callback = EpochEvaluation(test, run_data, None, 0)
    callback.set_model(model)
    for name, ema in variants.items():
        predictions = callback.scores(ema)
        evaluation, rates = evaluate_both(predictions, run_data.group_spec,
                                          run_data.class_names, run_data.multi_label,
                                          n_bootstrap=n_bootstrap)
        accuracy = None if run_data.multi_label else accuracy_table(
            predictions, run_data.group_spec, n_bootstrap=n_bootstrap)
        weights = "EMA" if ema else "raw"
        write_run_report(
            evaluation, accuracy, os.path.join(work_dir, f"report_{name}"),
            title=f"Test split, {weights} weights: {run_data.description}", rates=rates)
        metrics[name] = summarize(evaluation, accuracy, rates)
        arrays[f"scores_{name}"] = predictions["scores"].astype(np.float32)
    np.savez(os.path.join(work_dir, "predictions.npz"), **arrays,
             **label_arrays(predictions))
    return metrics
