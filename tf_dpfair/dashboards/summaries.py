"""Every run and tag the dashboard writes, and the functions that write them.

`callback.FairnessDashboard` writes into the `log_dir` of
`keras.callbacks.TensorBoard`: run `fairness` (held-out figures, current
weights), run `fairness_ema` (EMA weights), run `train_diagnostics` (opt-in,
outside the DP guarantee) and, in `log_dir` itself, the run's HParams.
Step = optimizer updates so far.

AUC (`fairness.auc`, `fairness.streaming_auc`):

- `auc`, `auc/<attribute>/<group>`, `auc_gap/<attribute>`,
  `auc_worst/<attribute>` (plus a multi-label model's per-label names):
  the `val_...` / `val_ema_...` epoch logs of `GroupedAUC` and
  `EMAEvaluation`, under the metric's own names.
- `ci/auc`, `ci/auc/<attribute>/<group>`, `ci/auc_gap/<attribute>`,
  `ci/auc_worst/<attribute>`, each with `/lower` and `/upper`: exact AUC
  with bootstrap intervals (`fairness.auc.evaluate`) of held-out data.
- Images `auc_by_group/<attribute>` (`fairness.auc_report.plot_attribute`).

Error rates and calibration (`fairness.rates`, `fairness.streaming_rates`):

- `tpr`, `fpr`, `selection_rate`, `tpr/<attribute>/<group>`, `fpr/...`,
  `selection_rate/...`, `tpr_gap/<attribute>` (equal opportunity),
  `fpr_gap/<attribute>`, `selection_rate_gap/<attribute>`,
  `equalized_odds/<attribute>`, and for multi-class data `top1_error`,
  `top1_error/<attribute>/<group>`, `top1_error_gap/<attribute>` (plus the
  per-label names): the epoch logs of `GroupedErrorRates`.
- `ci/rates/<figure>/<attribute>/<group>` for figure tpr, fpr, error, ece
  and brier, and `ci/rates/<difference>/<attribute>` for
  equal_opportunity_difference, equalized_odds_difference, error_gap and
  ece_gap, each with `/lower` and `/upper`: exact, with bootstrap bands
  (`fairness.rates.evaluate`). TPR, FPR and the two differences are of the
  summary label (the mean over labels or classes); error, ECE and Brier
  score are top-1 for multi-class data.
- Images `error_rates_by_group/<attribute>`
  (`fairness.rates_report.plot_attribute`).

Privacy (run `fairness`): `privacy/epsilon` (from `PrivacyLogger`; not
written while infinite), `privacy/noise_multiplier`, with adaptive clipping
`privacy/clip_threshold` and `privacy/threshold_noisy_share` (functions of
noisy counts only), and
`privacy/auc_vs_epsilon_x1000`: overall AUC at step round(1000 * epsilon),
so that TensorBoard draws AUC against epsilon (also in `fairness_ema`).

Training diagnostics (run `train_diagnostics`):
`train_diagnostics/<attribute>/<group>/<figure>` of the opt-in
`training.diagnostics.GroupDiagnostics`. Figures of training batches are
written only then.
"""

import io

import tensorflow as tf

from tf_dpfair.fairness import auc_report
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import rates_report

# Runs (subdirectories of the log directory).
FAIRNESS_RUN = "fairness"
EMA_RUN = "fairness_ema"
DIAGNOSTICS_RUN = "train_diagnostics"
VAL_PREFIX = "val_"

# Privacy.
EPSILON_TAG = "privacy/epsilon"
NOISE_TAG = "privacy/noise_multiplier"
# Adaptive clipping: the threshold each update used, and the released share.
THRESHOLD_TAG = "privacy/clip_threshold"
THRESHOLD_SHARE_TAG = "privacy/threshold_noisy_share"
AUC_VS_EPSILON_TAG = "privacy/auc_vs_epsilon_x1000"
EPSILON_STEP_SCALE = 1000

# AUC.
CI_PREFIX = "ci/"
IMAGE_PREFIX = "auc_by_group/"
# Prefixes of the GroupedAUC names (besides `auc` itself) copied from the logs.
_AUC_PREFIXES = ("auc/", "auc_gap/", "auc_worst/")

# Error rates and calibration.
RATES_CI_PREFIX = CI_PREFIX + "rates/"
RATES_IMAGE_PREFIX = "error_rates_by_group/"
# Names of GroupedErrorRates results, whole or before a '/'.
_RATE_NAMES = ("tpr", "fpr", "selection_rate", "top1_error")
_RATE_PREFIXES = tuple(f"{n}/" for n in _RATE_NAMES) + tuple(
    f"{n}_gap/" for n in _RATE_NAMES) + ("equalized_odds/",)
RATE_GROUP_FIGURES = ("tpr", "fpr", "error", "ece", "brier")
RATE_DIFFERENCES = ("equal_opportunity_difference", "equalized_odds_difference", "error_gap",
                    "ece_gap")


def is_rate_log(name):
    """Whether a log name (without `val_`) is a `GroupedErrorRates` result."""
    return name in _RATE_NAMES or name.startswith(_RATE_PREFIXES)


def is_logged_figure(name):
    """Whether a log name (without its prefix) is copied to the dashboard.

    True for the results of `GroupedAUC` and `GroupedErrorRates`.
    """
    return name == "auc" or name.startswith(_AUC_PREFIXES) or is_rate_log(name)


def groups_in_logs(logs):
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


def check_held_out(evaluation):
    """Raises ValueError unless `evaluation` (of either family) is of held-out data."""
    if evaluation.outside_dp_guarantee:
        raise ValueError("The dashboard shows held-out data only; this evaluation is of "
                         f"split {evaluation.split!r}.")


def write_band(tag, row, column, step):
    """Writes `row[column]` and its interval as `tag`, `tag/lower`, `tag/upper`.

    The interval is `row[column + "_low"]`, `row[column + "_high"]`.
    """
    for suffix, key in (("", column), ("/lower", column + "_low"), ("/upper", column + "_high")):
        tf.summary.scalar(tag + suffix, float(row[key]), step=step)


def write_auc_evaluation(evaluation, step, name):
    """Writes an exact `GroupEvaluation` into the current default summary writer.

    The `ci/auc...` bands of its summary label and an `auc_by_group/`
    image per attribute.

    Args:
        evaluation: `fairness.auc.GroupEvaluation` of held-out data.
        step: the step.
        name: legend name of the weights in the images.

    Returns:
        dict attribute -> group names written.

    Raises:
        ValueError: the evaluation is of training data.
    """
    check_held_out(evaluation)
    label = evaluation.summary_label
    group_rows = evaluation.groups[evaluation.groups["label"] == label]
    disparities = evaluation.disparities[evaluation.disparities["label"] == label]
    overall = evaluation.overall.set_index("label").loc[label]
    groups = {}
    write_band(CI_PREFIX + "auc", overall, "auc", step)
    for row in group_rows.to_dict("records"):
        groups.setdefault(row["attribute"], []).append(row["group"])
        write_band(f"{CI_PREFIX}auc/{row['attribute']}/{row['group']}", row, "auc", step)
    for row in disparities.to_dict("records"):
        for tag, column in (("auc_gap", "gap"), ("auc_worst", "worst_auc")):
            write_band(f"{CI_PREFIX}{tag}/{row['attribute']}", row, column, step)
    for attribute in groups:
        figure = auc_report.plot_attribute(evaluation, attribute, private_name=name)
        tf.summary.image(IMAGE_PREFIX + attribute, figure_to_image(figure), step=step)
    return groups


def write_rate_evaluation(rates, step, name):
    """`write_auc_evaluation` of a `fairness.rates.RateEvaluation` (`rates`).

    Writes the `ci/rates/...` bands (see the module docstring for which
    label each figure is of) and an `error_rates_by_group/` image per
    attribute; returns dict attribute -> group names written, and raises
    ValueError for an evaluation of training data.
    """
    check_held_out(rates)
    summary = rates.summary_label
    calibrated = error_rates.TOP1_LABEL if rates.multi_class else summary
    groups = {}
    for row in rates.groups.to_dict("records"):
        wanted = (("tpr", "fpr") if row["label"] == summary else ()) + (
            ("error", "ece", "brier") if row["label"] == calibrated else ())
        for figure in wanted:
            write_band(f"{RATES_CI_PREFIX}{figure}/{row['attribute']}/{row['group']}", row,
                       figure, step)
        if wanted and row["group"] not in groups.setdefault(row["attribute"], []):
            groups[row["attribute"]].append(row["group"])
    for row in rates.disparities.to_dict("records"):
        wanted = (RATE_DIFFERENCES[:2] if row["label"] == summary else ()) + (
            RATE_DIFFERENCES[2:] if row["label"] == calibrated else ())
        for difference in wanted:
            write_band(f"{RATES_CI_PREFIX}{difference}/{row['attribute']}", row, difference,
                       step)
    for attribute in groups:
        figure = rates_report.plot_attribute(rates, attribute, label=calibrated,
                                             private_name=name)
        tf.summary.image(RATES_IMAGE_PREFIX + attribute, figure_to_image(figure), step=step)
    return groups
