"""Error rates and calibration on the TensorBoard dashboards.

`dashboards.FairnessDashboard` writes these beside its AUC figures, into the
same runs (`fairness`, and `fairness_ema` for EMA weights; step = optimizer
updates):

- Streaming, from `rate_metrics.GroupedErrorRates` in the epoch logs
  (`val_...`, `val_ema_...`), under the metric's own names: `tpr`, `fpr`,
  `selection_rate`, `tpr/<attribute>/<group>`, `fpr/...`,
  `selection_rate/...`, `tpr_gap/<attribute>` (equal opportunity),
  `fpr_gap/<attribute>`, `selection_rate_gap/<attribute>`,
  `equalized_odds/<attribute>`, and for multi-class data `top1_error`,
  `top1_error/<attribute>/<group>`, `top1_error_gap/<attribute>` (plus the
  per-label names).
- Exact, with bootstrap bands (`error_rates.evaluate` of the dashboard's
  `evaluation_data`), each tag with `/lower` and `/upper`:
  `ci/rates/<figure>/<attribute>/<group>` for figure tpr, fpr, error, ece
  and brier, and `ci/rates/<difference>/<attribute>` for
  equal_opportunity_difference, equalized_odds_difference, error_gap and
  ece_gap. TPR, FPR and the two differences are of the summary label (the
  mean over labels or classes); error, ECE and Brier score are top-1 for
  multi-class data.
- Images `error_rates_by_group/<attribute>` (`rate_reports.plot_attribute`).

The custom-scalars layout gets a category "error rates by <attribute>" per
attribute when such figures exist. Figures of training batches are never
written.
"""

import re

from tensorboard.plugins.custom_scalar import layout_pb2
import tensorflow as tf

from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness import rates_report as rate_reports

CI_PREFIX = "ci/rates/"
IMAGE_PREFIX = "error_rates_by_group/"
# Names of GroupedErrorRates results, whole or before a '/'.
_NAMES = ("tpr", "fpr", "selection_rate", "top1_error")
_PREFIXES = tuple(f"{n}/" for n in _NAMES) + tuple(
    f"{n}_gap/" for n in _NAMES) + ("equalized_odds/",)
GROUP_FIGURES = ("tpr", "fpr", "error", "ece", "brier")
DIFFERENCES = ("equal_opportunity_difference", "equalized_odds_difference", "error_gap",
               "ece_gap")


def is_rate_log(name):
    """Whether a log name (without `val_`) is a `GroupedErrorRates` result."""
    return name in _NAMES or name.startswith(_PREFIXES)


def layout_categories(groups, *, with_ci=False, confidence=0.95):
    """Custom-scalars categories "error rates by <attribute>".

    Args:
        groups: dict attribute -> list of group names.
        with_ci: add margin charts of the exact `ci/rates/` tags.
        confidence: confidence level named in their titles.

    Returns:
        A list of `layout_pb2.Category`.
    """
    level = f"{100 * confidence:g}%"
    categories = []
    for attribute, names in groups.items():
        a = re.escape(attribute)
        charts = [
            _multiline(f"{attribute}: TPR of each group", rf"^tpr/{a}/[^/]+$"),
            _multiline(f"{attribute}: FPR of each group", rf"^fpr/{a}/[^/]+$"),
            _multiline(f"{attribute}: equal opportunity (TPR gap), FPR gap, equalized odds",
                       rf"^(tpr_gap|fpr_gap|equalized_odds)/{a}$"),
            _multiline(f"{attribute}: top-1 error of each group", rf"^top1_error/{a}/[^/]+$"),
        ]
        if with_ci:
            for figure, title in (("tpr", "TPR"), ("ece", "ECE")):
                charts.append(layout_pb2.Chart(
                    title=f"{attribute}: exact {title} of each group, {level} bootstrap band",
                    margin=layout_pb2.MarginChartContent(series=[
                        _band(f"{CI_PREFIX}{figure}/{attribute}/{g}") for g in names])))
            charts.append(layout_pb2.Chart(
                title=f"{attribute}: equal opportunity, equalized odds and ECE gap, "
                      f"{level} bootstrap band",
                margin=layout_pb2.MarginChartContent(series=[
                    _band(f"{CI_PREFIX}{d}/{attribute}") for d in DIFFERENCES
                    if d != "error_gap"])))
        categories.append(layout_pb2.Category(title=f"error rates by {attribute}", chart=charts))
    return categories


def _multiline(title, regex):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))


def _band(tag):
    return layout_pb2.MarginChartContent.Series(value=tag, lower=tag + "/lower",
                                                upper=tag + "/upper")


def _write_band(tag, row, column, step):
    for suffix, key in (("", column), ("/lower", column + "_low"), ("/upper", column + "_high")):
        tf.summary.scalar(tag + suffix, float(row[key]), step=step)


def write_evaluation(rates, step, image_fn, name):
    """Writes an exact `RateEvaluation` into the current default summary writer.

    Args:
        rates: `error_rates.RateEvaluation` of held-out data.
        step: the step.
        image_fn: `figure -> [1, H, W, 4]` tensor (`dashboards.figure_to_image`).
        name: legend name of the weights in the images.

    Returns:
        dict attribute -> group names written.

    Raises:
        ValueError: the evaluation is of training data.
    """
    if rates.outside_dp_guarantee:
        raise ValueError("The dashboard shows held-out data only; this evaluation is of "
                         f"split {rates.split!r}.")
    summary = rates.summary_label
    calibrated = error_rates.TOP1_LABEL if rates.multi_class else summary
    groups = {}
    for row in rates.groups.to_dict("records"):
        wanted = (("tpr", "fpr") if row["label"] == summary else ()) + (
            ("error", "ece", "brier") if row["label"] == calibrated else ())
        for figure in wanted:
            _write_band(f"{CI_PREFIX}{figure}/{row['attribute']}/{row['group']}", row, figure,
                        step)
        if wanted and row["group"] not in groups.setdefault(row["attribute"], []):
            groups[row["attribute"]].append(row["group"])
    for row in rates.disparities.to_dict("records"):
        wanted = (DIFFERENCES[:2] if row["label"] == summary else ()) + (
            DIFFERENCES[2:] if row["label"] == calibrated else ())
        for difference in wanted:
            _write_band(f"{CI_PREFIX}{difference}/{row['attribute']}", row, difference, step)
    for attribute in groups:
        figure = rate_reports.plot_attribute(rates, attribute, label=calibrated,
                                             private_name=name)
        tf.summary.image(IMAGE_PREFIX + attribute, image_fn(figure), step=step)
    return groups
