"""TensorBoard dashboards of group disparity and privacy spend.

`FairnessDashboard` goes beside `keras.callbacks.TensorBoard(log_dir)` and
writes into the same `log_dir`: run `fairness` (held-out figures, current
weights), run `fairness_ema` (EMA weights) and, in `log_dir` itself, the
run's HParams. Scalars (step = optimizer updates so far):

- `auc`, `auc/<attribute>/<group>`, `auc_gap/<attribute>`,
  `auc_worst/<attribute>` (plus a multi-label model's per-label names):
  the `val_...` / `val_ema_...` epoch logs of `metrics.GroupedAUC` and
  `callbacks.EMAEvaluation`, under the metric's own names.
- `privacy/epsilon` (from `callbacks.PrivacyLogger`; not written while
  infinite) and `privacy/noise_multiplier`, run `fairness`.
- `privacy/auc_vs_epsilon_x1000`: overall AUC at step round(1000 * epsilon),
  so that TensorBoard draws AUC against epsilon.
- `ci/auc`, `ci/auc/<attribute>/<group>`, `ci/auc_gap/<attribute>`,
  `ci/auc_worst/<attribute>`, each with `/lower` and `/upper`: exact AUC
  with bootstrap intervals (`fairness.evaluate`) of `evaluation_data`.

Images `auc_by_group/<attribute>` (`reports.plot_attribute`) go with the
`ci/` scalars; a custom-scalars layout (`dashboard_layout`) is written once
per run. Group figures of training batches are not written unless asked
for: they are outside the DP guarantee. Asked for means the opt-in
`diagnostics.GroupDiagnostics` among `fit`'s callbacks (before this one);
then its `train_diagnostics/<attribute>/<group>/<figure>` epoch logs go to
their own run, `train_diagnostics`, and the layout gets a category "training
diagnostics by <attribute> (outside the DP guarantee)" per attribute.

Error rates and calibration have their own tags, listed in
`tf_dpfair.dashboards.rates`: the streaming `tpr/...`, `fpr/...`,
`equalized_odds/<attribute>`, ... of `rate_metrics.GroupedErrorRates` in the
epoch logs, and with `evaluation_data` plus a `threshold` (or
`multi_class`) the exact `ci/rates/...` bands and the images
`error_rates_by_group/<attribute>`; the layout then gets a category
"error rates by <attribute>" per attribute.
"""

import contextlib
import io
import os
import re
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary
from tensorboard.plugins.hparams import api as hp

from tf_dpfair.data import batch as batch_lib
from tf_dpfair import workers as cluster
from tf_dpfair.dashboards import rates as dashboard_rates
from tf_dpfair.training import diagnostics
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import auc as fairness
from tf_dpfair.fairness import auc_report as reports

FAIRNESS_RUN = "fairness"
EMA_RUN = "fairness_ema"
DIAGNOSTICS_RUN = "train_diagnostics"
VAL_PREFIX = "val_"
EPSILON_TAG = "privacy/epsilon"
NOISE_TAG = "privacy/noise_multiplier"
AUC_VS_EPSILON_TAG = "privacy/auc_vs_epsilon_x1000"
EPSILON_STEP_SCALE = 1000
CI_PREFIX = "ci/"
IMAGE_PREFIX = "auc_by_group/"
# Prefixes of the GroupedAUC names (besides `auc` itself) copied from the logs.
_AUC_PREFIXES = ("auc/", "auc_gap/", "auc_worst/")


def dashboard_layout(groups, *, with_ci=False, confidence=0.95, rates=False,
                     rates_ci=False, diagnostics_groups=None):
    """The custom-scalars layout: one category per attribute, then privacy.

    Each attribute's category has a multiline chart of every group's AUC
    (tag regex `^auc/<attribute>/[^/]+$`), one of the worst group and the
    gap, and with `with_ci` margin charts of the `ci/` tags with their
    bootstrap bands. Regexes match in every run, so live and EMA weights
    show as separate lines.

    Args:
        groups: dict attribute -> list of group names.
        with_ci: add the margin charts of the `ci/` tags.
        confidence: confidence level named in the margin charts' titles.
        rates: add the "error rates by <attribute>" categories
            (`dashboard_rates.layout_categories`).
        rates_ci: with `rates`, their margin charts of the `ci/rates/` tags.
        diagnostics_groups: dict attribute -> group names of the opt-in
            training diagnostics, for their categories; None for none.

    Returns:
        A `layout_pb2.Layout`.

    Raises:
        ValueError: `groups` (and `diagnostics_groups`) are empty, or an
            attribute has no groups.
    """
    groups = groups or {}
    if not (groups or diagnostics_groups) or not all(groups.values()):
        raise ValueError(f"groups must map each attribute to its group names; got {groups!r}.")
    level = f"{100 * confidence:g}%"
    categories = []
    for attribute, names in groups.items():
        a = re.escape(attribute)
        charts = [
            _multiline(f"{attribute}: AUC of each group", rf"^auc/{a}/[^/]+$"),
            _multiline(f"{attribute}: worst-group AUC and gap (max - min)",
                       rf"^auc_(worst|gap)/{a}$"),
        ]
        if with_ci:
            series = [_band(f"{CI_PREFIX}auc/{attribute}/{g}") for g in names]
            charts.append(layout_pb2.Chart(
                title=f"{attribute}: exact AUC of each group, {level} bootstrap band",
                margin=layout_pb2.MarginChartContent(series=series)))
            series = [_band(f"{CI_PREFIX}{name}/{attribute}") for name in ("auc_gap", "auc_worst")]
            charts.append(layout_pb2.Chart(
                title=f"{attribute}: gap and worst group, {level} bootstrap band",
                margin=layout_pb2.MarginChartContent(series=series)))
        categories.append(layout_pb2.Category(title=f"AUC by {attribute}", chart=charts))
    if rates:
        categories += dashboard_rates.layout_categories(groups, with_ci=rates_ci,
                                                        confidence=confidence)
    for attribute in diagnostics_groups or {}:
        a = re.escape(attribute)
        tag = rf"^{re.escape(diagnostics.PREFIX)}{a}/[^/]+/"
        categories.append(layout_pb2.Category(
            title=f"training diagnostics by {attribute} (outside the DP guarantee)",
            chart=[
                _multiline(f"{attribute}: clip fraction of each group", tag + "clip_fraction$"),
                _multiline(f"{attribute}: median pre-clip gradient norm",
                           tag + "grad_norm_p50$"),
                _multiline(f"{attribute}: share of the clipped sum and of the examples",
                           tag + "(clipped_sum_share|example_share)$"),
                _multiline(f"{attribute}: cosine of the update with the group's gradient",
                           tag + "update_cosine$"),
                _multiline(f"{attribute}: training loss of each group", tag + "loss$"),
            ]))
    categories.append(layout_pb2.Category(title="privacy", chart=[
        _multiline("epsilon spent vs step (optimizer updates)", f"^{EPSILON_TAG}$"),
        _multiline("overall AUC vs epsilon (x axis: epsilon x 1000)", f"^{AUC_VS_EPSILON_TAG}$"),
        _multiline("overall AUC vs step", "^auc$"),
        _multiline("noise multiplier", f"^{NOISE_TAG}$"),
    ]))
    return layout_pb2.Layout(category=categories)


def _multiline(title, regex):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))


def _band(tag):
    return layout_pb2.MarginChartContent.Series(value=tag, lower=tag + "/lower",
                                                upper=tag + "/upper")


def run_hparams(model, privacy_logger=None, extra=None):
    """The HParams values of a run: privacy and training settings.

    Args:
        model: the Keras model; a DPModel contributes its `DPConfig`.
        privacy_logger: optional `callbacks.PrivacyLogger`, for `delta` and
            `target_epsilon`.
        extra: optional dict of further values (bool, int, float or str),
            e.g. `{"learning_rate": 0.5}`; they override the ones above.

    Returns:
        dict name -> value: `private` (DP training with noise > 0),
        `noise_multiplier`, and for a DPModel `l2_norm_clip`,
        `expected_batch_size` (the logical batch), `augmult`, `ema_decay`
        (0.0 when EMA is off); with a logger, `delta` and `target_epsilon`
        (when set). Unknown settings are left out rather than invented.
    """
    config = getattr(model, "dp_config", None)
    values = {"private": bool(config is not None and config.noise_multiplier > 0),
              "noise_multiplier": float(config.noise_multiplier) if config else 0.0}
    if config is not None:
        values.update(l2_norm_clip=float(config.l2_norm_clip),
                      expected_batch_size=int(config.expected_batch_size),
                      augmult=int(config.augmult),
                      ema_decay=float(config.ema_decay or 0.0))
    if privacy_logger is not None:
        values["delta"] = float(privacy_logger.delta)
        if privacy_logger.target_epsilon is not None:
            values["target_epsilon"] = float(privacy_logger.target_epsilon)
    values.update(extra or {})
    return values


def figure_to_image(figure, dpi=80):
    """Renders a matplotlib figure as a `[1, H, W, 4]` uint8 tensor.

    Args:
        figure: a `matplotlib.figure.Figure` with a canvas.
        dpi: resolution of the rendering.

    Returns:
        A uint8 tensor ready for `tf.summary.image`.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return tf.image.decode_png(buffer.getvalue(), channels=4)[tf.newaxis]


class FairnessDashboard(keras.callbacks.Callback):
    """Writes per-group AUC, disparity and privacy spend to TensorBoard.

    Put it in `fit`'s callbacks after `PrivacyLogger` and `EMAEvaluation`
    (their logs are read at epoch end), beside
    `keras.callbacks.TensorBoard(log_dir)`; compile the model with a
    `metrics.GroupedAUC` and pass `validation_data` with groups. Tag names
    and runs are in the module docstring; it warns once about each missing
    source of figures. On several workers only the chief writes (and
    evaluates); give it to every worker.

    With `evaluation_data`, each epoch it also computes exact per-group AUC
    with bootstrap intervals (`fairness.evaluate`) on that held-out data,
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

    Raises:
        ValueError: `evaluation_data` without `group_names`, a threshold
            with `multi_class`, or bad settings.
    """

    def __init__(self, log_dir, *, privacy_logger=None, hparams=None, evaluation_data=None,
                 group_names=None, n_bootstrap=200, confidence=0.95, ema_prefix="val_ema_",
                 threshold=None, multi_class=False, from_logits=False):
        super().__init__()
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
        return cluster.is_chief(self.model.distribute_strategy)

    def on_train_begin(self, logs=None):
        if not self._writes():
            return
        if not self._hparams_written:
            values = run_hparams(self.model, self.privacy_logger, self.hparams)
            with self._writer("").as_default():
                hp.hparams(values, trial_id=os.path.basename(os.path.normpath(self.log_dir)))
            self._hparams_written = True

    def on_epoch_end(self, epoch, logs=None):
        if not self._writes():
            return
        logs = logs or {}
        step = self._step()
        groups = self._write_logged_figures(logs, step)
        new_diagnostics = self._write_training_diagnostics(logs, step)
        logged_rates = any(dashboard_rates.is_rate_log(k[len(VAL_PREFIX):])
                           for k in logs if k.startswith(VAL_PREFIX))
        if self.evaluation_data is not None:
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
        sources = [(FAIRNESS_RUN, VAL_PREFIX), (EMA_RUN, self.ema_prefix)]
        if self.evaluation_data is None and not any(
                key.startswith((VAL_PREFIX + "auc_gap/", VAL_PREFIX + "equalized_odds/"))
                for key in logs):
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
                       if name == "auc" or name.startswith(_AUC_PREFIXES)
                       or dashboard_rates.is_rate_log(name)}
            if not figures:
                continue
            with self._writer(run).as_default():
                for tag, value in figures.items():
                    tf.summary.scalar(tag, float(value), step=step)
                self._write_auc_vs_epsilon(run, figures.get("auc"), epsilon)
        config = getattr(self.model, "dp_config", None)
        with self._writer(FAIRNESS_RUN).as_default():
            if epsilon is not None and np.isfinite(epsilon):
                tf.summary.scalar(EPSILON_TAG, float(epsilon), step=step)
            tf.summary.scalar(NOISE_TAG, float(config.noise_multiplier) if config else 0.0,
                              step=step)
        return _groups_in_logs(logs)

    def _write_auc_vs_epsilon(self, run, auc, epsilon):
        if auc is None or epsilon is None or not np.isfinite(epsilon):
            return
        step = int(round(EPSILON_STEP_SCALE * float(epsilon)))
        # TensorBoard treats a step that does not increase as a restart.
        if step > self._last_epsilon_step.get(run, -1):
            tf.summary.scalar(AUC_VS_EPSILON_TAG, float(auc), step=step)
            self._last_epsilon_step[run] = step

    def _write_training_diagnostics(self, logs, step):
        """Writes the opt-in per-group training diagnostics; True if new attributes."""
        before = set(self._diagnostics_groups)
        figures = {k: v for k, v in logs.items() if k.startswith(diagnostics.PREFIX)}
        if not figures:
            return False
        with self._writer(DIAGNOSTICS_RUN).as_default():
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
        layout = dashboard_layout(groups, with_ci=with_ci, confidence=self.confidence,
                                  rates=rates[0], rates_ci=rates[1],
                                  diagnostics_groups=self._diagnostics_groups)
        with self._writer(FAIRNESS_RUN).as_default():
            # The plugin reads the latest layout of a run, so a rewrite replaces it.
            tf.summary.experimental.write_raw_pb(
                custom_scalar_summary.pb(layout).SerializeToString(), step=0)
        self._layout_has_ci = with_ci
        self._layout_rates = tuple(rates)

    # ------------------------------------------------------------- exact evaluation

    def _evaluate(self, ema):
        """Exact grouped evaluation of `evaluation_data` (EMA weights if `ema`).

        Returns:
            `(fairness.GroupEvaluation, error_rates.RateEvaluation or None)`.
        """
        labels, scores, masks, groups = [], [], [], {a: [] for a in self.group_names}
        with self.model.ema_weights() if ema else contextlib.nullcontext():
            for element in self.evaluation_data:
                x, y, weights = keras.utils.unpack_x_y_sample_weight(element)
                label, ids = batch_lib.split_labels(y)
                if ids is None:
                    raise ValueError("evaluation_data must give y = {'label': ..., 'groups': "
                                     "...} (exact AUC needs each example's groups).")
                mask = batch_lib.label_mask_of(y)
                # A direct call: under MirroredStrategy, predict_on_batch of a
                # plain tensor returns every replica's copy of the batch.
                predicted = np.asarray(self.model(x, training=False))
                keep = (np.ones(len(predicted), bool) if weights is None
                        else np.asarray(weights).reshape(-1) > 0)
                labels.append(np.asarray(label).reshape(len(keep), -1)[keep])
                scores.append(predicted.reshape(len(keep), -1)[keep])
                masks.append(np.ones_like(labels[-1], dtype=float) if mask is None
                             else np.asarray(mask).reshape(len(keep), -1)[keep])
                for attribute in groups:
                    groups[attribute].append(np.asarray(ids[attribute]).reshape(-1)[keep])
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        groups = {a: np.concatenate(v) for a, v in groups.items()}
        common = {"group_names": self.group_names, "n_bootstrap": self.n_bootstrap,
                  "confidence": self.confidence, "split": "validation"}
        if self.multi_class:
            classes = labels.reshape(-1).astype(np.int64)
            names = [str(k) for k in range(scores.shape[1])]
            evaluation = fairness.evaluate(np.eye(scores.shape[1])[classes], scores, groups,
                                           label_names=names, **common)
            if self.from_logits:
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                scores /= scores.sum(axis=1, keepdims=True)
            return evaluation, error_rates.evaluate(classes, scores, groups, multi_class=True,
                                                    label_names=names, **common)
        # Unknown labels (mask 0) are left out of the AUCs, as of the loss.
        masks = np.concatenate(masks)
        evaluation = fairness.evaluate(labels, scores, groups, label_mask=masks, **common)
        if self.threshold is None:
            return evaluation, None
        if self.from_logits:
            scores = 1.0 / (1.0 + np.exp(-scores))
        labels = np.where(masks == 1, labels, 0.0)  # placeholders of unknown labels
        return evaluation, error_rates.evaluate(labels, scores, groups, threshold=self.threshold,
                                                label_mask=masks, **common)

    def write_evaluation(self, evaluation, *, step=None, ema=False, rates=None):
        """Writes an exact evaluation: `ci/` scalars and per-attribute images.

        Use it for an end-of-run evaluation on a test set, e.g.
        `dashboard.write_evaluation(fairness.evaluate(...))`; the layout is
        rewritten with its margin charts if it had none.

        Args:
            evaluation: a `fairness.GroupEvaluation` of held-out data.
            step: the step to write at (default: the update count of the
                model the callback was given by `fit`).
            ema: whether the figures are of the EMA weights (run `fairness_ema`).
            rates: optional `error_rates.RateEvaluation` of the same data:
                its `ci/rates/` scalars and `error_rates_by_group/` images
                (`dashboard_rates`) are written too.

        Raises:
            ValueError: an evaluation is of training data.
        """
        if rates is not None and rates.outside_dp_guarantee:
            raise ValueError("The dashboard shows held-out data only; this evaluation is of "
                             f"split {rates.split!r}.")
        if evaluation.outside_dp_guarantee:
            raise ValueError("The dashboard shows held-out data only; this evaluation is of "
                             f"split {evaluation.split!r}.")
        step = self._step() if step is None else step
        label = evaluation.summary_label
        group_rows = evaluation.groups[evaluation.groups["label"] == label]
        disparities = evaluation.disparities[evaluation.disparities["label"] == label]
        overall = evaluation.overall.set_index("label").loc[label]
        groups = {}
        with self._writer(EMA_RUN if ema else FAIRNESS_RUN).as_default():
            _write_band(CI_PREFIX + "auc", overall, "auc", step)
            for row in group_rows.to_dict("records"):
                groups.setdefault(row["attribute"], []).append(row["group"])
                _write_band(f"{CI_PREFIX}auc/{row['attribute']}/{row['group']}", row, "auc",
                            step)
            for row in disparities.to_dict("records"):
                for name, column in (("auc_gap", "gap"), ("auc_worst", "worst_auc")):
                    _write_band(f"{CI_PREFIX}{name}/{row['attribute']}", row, column, step)
            for attribute in groups:
                figure = reports.plot_attribute(
                    evaluation, attribute, private_name="EMA weights" if ema else "current weights")
                tf.summary.image(IMAGE_PREFIX + attribute, figure_to_image(figure), step=step)
            if rates is not None:
                dashboard_rates.write_evaluation(
                    rates, step, figure_to_image, "EMA weights" if ema else "current weights")
        if not self._layout_has_ci or (rates is not None and not self._layout_rates[1]):
            self._write_layout(groups, with_ci=True,
                               rates=(True, True) if rates is not None else self._layout_rates)


def _write_band(tag, row, column, step):
    """Writes `row[column]` and its interval as `tag`, `tag/lower`, `tag/upper`."""
    for suffix, key in (("", column), ("/lower", column + "_low"), ("/upper", column + "_high")):
        tf.summary.scalar(tag + suffix, float(row[key]), step=step)


def _groups_in_logs(logs):
    """Attribute -> group names found in the group logs, in order.

    From `val_auc/<attribute>/<group>` (GroupedAUC) or, without those,
    `val_tpr/<attribute>/<group>` (GroupedErrorRates).
    """
    for gap, figure in (("auc_gap", "auc"), ("equalized_odds", "tpr")):
        attributes = [key.split("/")[1] for key in logs
                      if key.startswith(f"{VAL_PREFIX}{gap}/") and key.count("/") == 1]
        groups = {attribute: [] for attribute in attributes}
        for key in logs:
            parts = key.split("/")
            if parts[0] == VAL_PREFIX + figure and len(parts) == 3 and parts[1] in groups:
                groups[parts[1]].append(parts[2])
        found = {attribute: names for attribute, names in groups.items() if names}
        if found:
            return found
    return {}
