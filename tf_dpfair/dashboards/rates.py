"""Old home of the dashboard's error rates and calibration; its names, kept.

The tags are listed and written in `summaries` (beside the AUC ones), the
"error rates by <attribute>" categories are made in `layout`. This module
keeps `tf_dpfair.dashboards.rates` (formerly `dashboard_rates`) importable
with its public names.
"""

from tf_dpfair.dashboards import layout
from tf_dpfair.dashboards import summaries

CI_PREFIX = summaries.RATES_CI_PREFIX
IMAGE_PREFIX = summaries.RATES_IMAGE_PREFIX
GROUP_FIGURES = summaries.RATE_GROUP_FIGURES
DIFFERENCES = summaries.RATE_DIFFERENCES
is_rate_log = summaries.is_rate_log
layout_categories = layout.rate_categories


def write_evaluation(rates, step, image_fn, name):
    """Writes an exact `RateEvaluation`; `summaries.write_rate_evaluation`.

    Args:
        rates: `fairness.rates.RateEvaluation` of held-out data.
        step: the step.
        image_fn: unused; images are rendered by `summaries.figure_to_image`
            (the only function ever passed here).
        name: legend name of the weights in the images.

    Returns:
        dict attribute -> group names written.

    Raises:
        ValueError: the evaluation is of training data.
    """
    del image_fn  # The old signature's; rendering no longer goes through it.
    return summaries.write_rate_evaluation(rates, step, name)
