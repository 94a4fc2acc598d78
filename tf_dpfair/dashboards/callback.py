"""`FairnessDashboard`: the Keras callback that writes the TensorBoard dashboard.

It goes beside `keras.callbacks.TensorBoard(log_dir)` and writes into the
same `log_dir`. What it writes is listed in `summaries` (runs, tags and the
functions that write them); what TensorBoard shows of it, in `layout` (the
custom-scalars page and the HParams); `sweep` compares the runs of a sweep.
Group figures of training batches are not written unless asked for with the
opt-in `diagnostics.GroupDiagnostics` (outside the DP guarantee).
"""

import contextlib
import os
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hp

from tf_dpfair import workers
from tf_dpfair.dashboards import layout
from tf_dpfair.dashboards import summaries
from tf_dpfair.fairness import predictions
from tf_dpfair.training import diagnostics

# Names that were defined here before the layout and the summaries had
# modules of their own; kept importable from this module.
dashboard_layout = layout.dashboard_layout
run_hparams = layout.run_hparams
figure_to_image = summaries.figure_to_image
FAIRNESS_RUN = summaries.FAIRNESS_RUN
EMA_RUN = summaries.EMA_RUN
DIAGNOSTICS_RUN = summaries.DIAGNOSTICS_RUN
VAL_PREFIX = summaries.VAL_PREFIX
EPSILON_TAG = summaries.EPSILON_TAG
NOISE_TAG = summaries.NOISE_TAG
AUC_VS_EPSILON_TAG = summaries.AUC_VS_EPSILON_TAG
EPSILON_STEP_SCALE = summaries.EPSILON_STEP_SCALE
CI_PREFIX = summaries.CI_PREFIX
IMAGE_PREFIX = summaries.IMAGE_PREFIX


class FairnessDashboard(keras.callbacks.Callback):
    """Writes per-group AUC, disparity and privacy spend to TensorBoard.

    Put it in `fit`'s callbacks after `PrivacyLogger` and `EMAEvaluation`
    (their logs are read at epoch end), beside
    `keras.callbacks.TensorBoard(log_dir)`; compile the model with a
    `metrics.GroupedAUC` and pass `validation_data` with groups. Tag names
    and runs are listed in `summaries`; it warns once about each missing
    source of figures. On several workers only the chief writes (and
    evaluates); give it to every worker.

    With `evaluation_data`, each epoch it also computes exact per-group AUC
    with bootstrap intervals (`fairness.auc.evaluate`) on that held-out data,
    with the current and, when EMA is on, the EMA weights, and writes the
    `ci/` tags and `auc_by_group/<attribute>` images. That costs one
    prediction pass per weight set and `n_bootstrap` resamples per group.

    Args:
        log_dir: the run's log directory (that of `keras.callbacks.TensorBoard`).
            For HParams, point TensorBoard at its parent (the sweep directory).
        privacy_logger: the run's `callbacks.PrivacyLogger`, for the HParams
            `delta` and `target_epsilon`.
        hparams: extra HParams values (see `run_hparams`).
        evaluation_data: optional `tf.data.Dataset` of held-out batches
            `(x, {"label": ..., "groups": {...}}, sample_weight)` (as from
            `data.make_eval_dataset`); rows of weight 0 are padding.
        group_names: with `evaluation_data`, the names of the group ids: a dict
            attribute -> names or a `GroupSpec` (`source.group_spec`).
        n_bootstrap: bootstrap replicates of the exact evaluation.
        confidence: confidence level of its intervals.
        ema_prefix: prefix of the EMA logs (`EMAEvaluation`'s `prefix`).
        threshold: with `evaluation_data` of binary or multi-label targets,
            the decision threshold on probabilities at which exact error
            rates and calibration are written too (None: not written); a
            number, one per label, or a `thresholds.Threshold`.
        multi_class: `evaluation_data` holds class ids and the model one
            output per class: AUC is one-vs-rest per class (macro mean), and
            exact error rates are written for the top-1 decision.
        from_logits: the model outputs logits; a sigmoid (softmax with
            `multi_class`) gives the probabilities that thresholds and
            calibration need (AUC does not change).
        evaluate_every: with `evaluation_data`, epochs between exact
            evaluations (1 = every epoch; the last epoch of `fit` is always
            evaluated). Each one predicts the whole split and bootstraps;
            on a long sweep of fast epochs it can cost more than training.

    Raises:
        ValueError: `evaluation_data` without `group_names`, a threshold
            with `multi_class`, or bad settings.
    """

    def __init__(self, log_dir, *, privacy_logger=None, hparams=None, evaluation_data=None,
                 group_names=None, n_bootstrap=200, confidence=0.95, ema_prefix="val_ema_",
                 threshold=None, multi_class=False, from_logits=False, evaluate_every=1):
        super().__init__()
        if isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int) \
                or evaluate_every < 1:
            raise ValueError(f"evaluate_every must be an integer >= 1; got {evaluate_every!r}.")
        self.evaluate_every = evaluate_every
        if evaluation_data is not None and group_names is None:
            raise ValueError("evaluation_data needs group_names (a dict attribute -> names, "
                             "or the source's GroupSpec) to name the group ids.")
        if not isinstance(n_bootstrap, int) or n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be an integer >= 1; got {n_bootstrap!r}.")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1); got {confidence!r}.")
        if multi_class and threshold is not None:
            raise ValueError("multi_class decides by the top-1 class: pass no threshold.")
        self.threshold = threshold
        self.multi_class = bool(multi_class)
        self.from_logits = bool(from_logits)
        self.log_dir = str(log_dir)
        self.privacy_logger = privacy_logger
        self.hparams = dict(hparams or {})
        self.evaluation_data = evaluation_data
        if hasattr(group_names, "to_dict"):
            group_names = group_names.to_dict()
        self.group_names = None if group_names is None else {
            str(a): [str(n) for n in names] for a, names in group_names.items()}
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.ema_prefix = ema_prefix
        self._writers = {}
        self._hparams_written = False
        self._layout_has_ci = None  # None: no layout written yet.
        self._layout_rates = (False, False)  # (categories, bands) in the written layout
        self._groups_seen = None  # groups of the written layout
        self._diagnostics_groups = {}  # attribute -> groups of training diagnostics
        self._last_epsilon_step = {}
        self._warned = set()

    # ------------------------------------------------------------- writers

    def _writer(self, run):
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self._writers[run]

    def close(self):
        """Flushes and closes the event files (reopened when written again)."""
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def _step(self):
        if hasattr(self.model, "update_count"):
            return int(self.model.update_count)
        return int(self.model.optimizer.iterations.numpy())

    def _ema_on(self):
        config = getattr(self.model, "dp_config", None)
        return config is not None and config.ema_decay is not None

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"FairnessDashboard: {message}", stacklevel=3)

    # ------------------------------------------------------------- callbacks

    def _writes(self):
        # On several workers only the chief writes; the others' figures are
        # the same (their logs and weights equal the chief's).
        return workers.is_chief(self.model.distribute_strategy)

    def on_train_begin(self, logs=None):
        if not self._writes():
            return
        if not self._hparams_written:
            values = layout.run_hparams(self.model, self.privacy_logger, self.hparams)
            with self._writer("").as_default():
                hp.hparams(values, trial_id=os.path.basename(os.path.normpath(self.log_dir)))
            self._hparams_written = True

    def _evaluates(self, epoch):
        """Whether epoch `epoch` (0-based) gets an exact evaluation."""
        last = (self.params or {}).get("epochs")
        return (epoch + 1) % self.evaluate_every == 0 or (last is not None
                                                           and epoch + 1 == last)

    def on_epoch_end(self, epoch, logs=None):
        if not self._writes():
            return
        logs = logs or {}
        step = self._step()
        groups = self._write_logged_figures(logs, step)
        new_diagnostics = self._write_training_diagnostics(logs, step)
        prefix = summaries.VAL_PREFIX
        logged_rates = any(summaries.is_rate_log(k[len(prefix):])
                           for k in logs if k.startswith(prefix))
        if self.evaluation_data is not None and self._evaluates(epoch):
            groups = self.group_names
            for ema in (False, True) if self._ema_on() else (False,):
                evaluation, rates = self._evaluate(ema=ema)
                self.write_evaluation(evaluation, step=step, ema=ema, rates=rates)
        if groups and self._layout_has_ci is None:
            self._write_layout(groups, with_ci=self.evaluation_data is not None,
                               rates=(logged_rates or self._exact_rates(),
                                      self._exact_rates()))
        elif groups and logged_rates and not self._layout_rates[0]:
            self._write_layout(groups, with_ci=bool(self._layout_has_ci),
                               rates=(True, self._layout_rates[1]))
        elif new_diagnostics:
            self._write_layout(self._groups_seen, with_ci=bool(self._layout_has_ci),
                               rates=self._layout_rates)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        self.close()

    def _exact_rates(self):
        """Whether exact error rates are computed on `evaluation_data`."""
        return self.evaluation_data is not None and (self.multi_class
                                                     or self.threshold is not None)

    # ------------------------------------------------------------- scalars

    def _write_logged_figures(self, logs, step):
        """Writes the GroupedAUC, EMA and privacy logs; returns the groups seen."""
        val = summaries.VAL_PREFIX
        sources = [(summaries.FAIRNESS_RUN, val), (summaries.EMA_RUN, self.ema_prefix)]
        if self.evaluation_data is None and not any(
                key.startswith((val + "auc_gap/", val + "equalized_odds/")) for key in logs):
            self._warn_once("groups", "no `val_auc_gap/<attribute>` in the epoch logs: compile "
                            "the model with metrics=[GroupedAUC(...)] (or GroupedErrorRates) "
                            "and pass validation_data with groups (on epochs without "
                            "validation, nothing is written).")
        if self._ema_on() and self.evaluation_data is None and not any(
                key.startswith(self.ema_prefix) for key in logs):
            self._warn_once("ema", f"EMA is on but no `{self.ema_prefix}...` logs: put "
                            "EMAEvaluation before FairnessDashboard in the callbacks.")
        epsilon = logs.get("epsilon")
        if hasattr(self.model, "dp_config") and epsilon is None:
            self._warn_once("epsilon", "no `epsilon` in the epoch logs: put PrivacyLogger "
                            "before FairnessDashboard in the callbacks.")
        for run, prefix in sources:
            names = {key[len(prefix):]: key for key in logs if key.startswith(prefix)}
            figures = {name: logs[key] for name, key in names.items()
                       if summaries.is_logged_figure(name)}
            if not figures:
                continue
            with self._writer(run).as_default():
                for tag, value in figures.items():
                    tf.summary.scalar(tag, float(value), step=step)
                self._write_auc_vs_epsilon(run, figures.get("auc"), epsilon)
        config = getattr(self.model, "dp_config", None)
        with self._writer(summaries.FAIRNESS_RUN).as_default():
            if epsilon is not None and np.isfinite(epsilon):
                tf.summary.scalar(summaries.EPSILON_TAG, float(epsilon), step=step)
            tf.summary.scalar(summaries.NOISE_TAG,
                              float(config.noise_multiplier) if config else 0.0, step=step)
            for key, tag in (("clip_threshold", summaries.THRESHOLD_TAG),
                             ("threshold_noisy_share", summaries.THRESHOLD_SHARE_TAG)):
                if key in logs:
                    tf.summary.scalar(tag, float(logs[key]), step=step)
        return summaries.groups_in_logs(logs)

    def _write_auc_vs_epsilon(self, run, auc, epsilon):
        if auc is None or epsilon is None or not np.isfinite(epsilon):
            return
        step = int(round(summaries.EPSILON_STEP_SCALE * float(epsilon)))
        # TensorBoard treats a step that does not increase as a restart.
        if step > self._last_epsilon_step.get(run, -1):
            tf.summary.scalar(summaries.AUC_VS_EPSILON_TAG, float(auc), step=step)
            self._last_epsilon_step[run] = step

    def _write_training_diagnostics(self, logs, step):
        """Writes the opt-in per-group training diagnostics; True if new attributes."""
        before = set(self._diagnostics_groups)
        figures = {k: v for k, v in logs.items() if k.startswith(diagnostics.PREFIX)}
        if not figures:
            return False
        with self._writer(summaries.DIAGNOSTICS_RUN).as_default():
            for tag, value in figures.items():
                parts = tag[len(diagnostics.PREFIX):].split("/")
                if len(parts) == 3:
                    names = self._diagnostics_groups.setdefault(parts[0], [])
                    if parts[1] not in names:
                        names.append(parts[1])
                if value is not None and np.isfinite(value):
                    tf.summary.scalar(tag, float(value), step=step)
        return set(self._diagnostics_groups) != before

    def _write_layout(self, groups, with_ci, rates=(False, False)):
        self._groups_seen = groups
        page = layout.dashboard_layout(groups, with_ci=with_ci, confidence=self.confidence,
                                       rates=rates[0], rates_ci=rates[1],
                                       diagnostics_groups=self._diagnostics_groups)
        with self._writer(summaries.FAIRNESS_RUN).as_default():
            # The plugin reads the latest layout of a run, so a rewrite replaces it.
            tf.summary.experimental.write_raw_pb(
                custom_scalar_summary.pb(page).SerializeToString(), step=0)
        self._layout_has_ci = with_ci
        self._layout_rates = tuple(rates)

    # ------------------------------------------------------------- exact evaluation

    def _evaluate(self, ema):
        """Exact grouped evaluation of `evaluation_data` (EMA weights if `ema`).

        Predicts (padding, weight 0, left out), then evaluates both families
        of figures on the predictions (`fairness.predictions`): AUC, and
        error rates when a threshold (or `multi_class`) decides.

        Returns:
            `(fairness.auc.GroupEvaluation, fairness.rates.RateEvaluation or None)`.
        """
        # A direct call: under MirroredStrategy, predict_on_batch of a plain
        # tensor returns every replica's copy of the batch.
        with self.model.ema_weights() if ema else contextlib.nullcontext():
            predicted = predictions.predict(lambda x: self.model(x, training=False),
                                            self.evaluation_data,
                                            attributes=self.group_names)
        # One row per example and one column per label, a mask of ones where
        # the data has none: the shapes the evaluations were always given.
        rows = len(predicted["scores"])
        predicted["labels"] = predicted["labels"].reshape(rows, -1)
        predicted["scores"] = predicted["scores"].reshape(rows, -1)
        if predicted["label_mask"] is None:
            predicted["label_mask"] = np.ones_like(predicted["labels"], dtype=float)
        predicted["label_mask"] = predicted["label_mask"].reshape(rows, -1)
        return predictions.evaluate_predictions(
                predicted, multi_class=self.multi_class, threshold=self.threshold,
                from_logits=self.from_logits, group_names=self.group_names,
                n_bootstrap=self.n_bootstrap, confidence=self.confidence, split="validation")

    def write_evaluation(self, evaluation, *, step=None, ema=False, rates=None):
        """Writes an exact evaluation: `ci/` scalars and per-attribute images.

        Use it for an end-of-run evaluation on a test set, e.g.
        `dashboard.write_evaluation(fairness.auc.evaluate(...))`; the layout is
        rewritten with its margin charts if it had none.

        Args:
            evaluation: a `fairness.auc.GroupEvaluation` of held-out data.
            step: the step to write at (default: the update count of the
                model the callback was given by `fit`).
            ema: whether the figures are of the EMA weights (run `fairness_ema`).
            rates: optional `fairness.rates.RateEvaluation` of the same data:
                its `ci/rates/` scalars and `error_rates_by_group/` images
                are written too.

        Raises:
            ValueError: an evaluation is of training data.
        """
        # Both are checked before anything is written.
        if rates is not None:
            summaries.check_held_out(rates)
        summaries.check_held_out(evaluation)
        step = self._step() if step is None else step
        name = "EMA weights" if ema else "current weights"
        with self._writer(summaries.EMA_RUN if ema else summaries.FAIRNESS_RUN).as_default():
            groups = summaries.write_auc_evaluation(evaluation, step, name)
            if rates is not None:
                summaries.write_rate_evaluation(rates, step, name)
        if not self._layout_has_ci or (rates is not None and not self._layout_rates[1]):
            self._write_layout(groups, with_ci=True,
                               rates=(True, True) if rates is not None else self._layout_rates)
