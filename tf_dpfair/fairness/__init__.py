"""Per-group evaluation: AUC, error rates and calibration, with intervals.

- `auc`, `rates`, `calibration`: the metric families, exact, with bootstrap
  intervals resampled within groups.
- `thresholds`: operating thresholds chosen on validation data.
- `auc_report`, `rates_report`: matching private to non-private models and
  the written report.
- `streaming_auc`, `streaming_rates`: Keras metrics for `fit` / `evaluate`.
"""

from tf_dpfair import _lazy
from tf_dpfair import _old_paths

_public_getattr, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("auc", "auc_report", "calibration", "rates", "rates_report",
                    "streaming_auc", "streaming_rates", "thresholds"),
        names={
            "GroupedAUC": "streaming_auc",
            "GroupedErrorRates": "streaming_rates",
            "Threshold": "thresholds",
            "choose_threshold": "thresholds",
        })

# Names of the former module `tf_dpfair.fairness` (AUC only), now in `auc`.
_FORMER = ("GroupEvaluation", "bootstrap_weights", "percentile_interval",
           "prepare_inputs", "add_intersections", "evaluate", "resample_key")


def __getattr__(name):
    if name in _FORMER:
        _old_paths.warn_once(f"tf_dpfair.fairness.{name}", f"tf_dpfair.fairness.auc.{name}")
        from tf_dpfair.fairness import auc
        return getattr(auc, name)
    return _public_getattr(name)
