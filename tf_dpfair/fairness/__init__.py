"""Per-group fairness evaluation: one engine, three metric families, one report.

- `engine`: what every family shares: input preparation and validation,
  the bootstrap within groups, NaN-aware summaries over groups, the table
  layout.
- `auc`, `rates` (with `calibration`): the metric families, exact, with
  bootstrap intervals (`evaluate_auc`, `evaluate_rates`).
- `thresholds`: operating thresholds chosen on validation data.
- `matching`: private vs non-private at matched accuracy, once for both
  families; `auc_report` and `rates_report` hold each family's comparison
  (`compare_matched_auc`, `compare_matched_rates`), figures and CSV tables.
- `curve`: private gap minus the non-private gap interpolated at the same
  performance on a curve of checkpoints (`build_curve`, `excess_gap`).
- `report`: the one writer of report.md (AUC, error rates, accuracy).
- `predictions`: predict on held-out data, then evaluate both families.
- `inference`: the statistics behind a report's verdicts: the hierarchical
  bootstrap (seeds, then examples within groups), Holm, TOST and one-sided
  tests with a margin, the plateau check, holds / fails / inconclusive.
- `streaming` (shared base), `streaming_auc`, `streaming_rates`: Keras
  metrics for `fit` / `evaluate`.
"""

from tf_dpfair import _lazy
from tf_dpfair import _old_paths

_public_getattr, __dir__, __all__ = _lazy.attach(
        __name__,
        submodules=("auc", "auc_report", "calibration", "curve", "engine", "inference",
                    "matching", "predictions", "rates", "rates_report", "report", "streaming",
                    "streaming_auc", "streaming_rates", "thresholds"),
        names={
            "GroupedAUC": "streaming_auc",
            "GroupedErrorRates": "streaming_rates",
            "Threshold": "thresholds",
            "choose_threshold": "thresholds",
            "evaluate_auc": "auc",
            "evaluate_rates": "rates",
            "compare_matched_auc": "auc_report",
            "compare_matched_rates": "rates_report",
            "NonPrivateCurve": "curve",
            "build_curve": "curve",
            "curve_from_evaluations": "curve",
            "interpolated_gap": "curve",
            "excess_gap": "curve",
            "write_report": "report",
            "predict_and_evaluate": "predictions",
            "hierarchical_bootstrap": "inference",
            "hierarchical_copies": "inference",
            "holm": "inference",
            "tost_bootstrap": "inference",
            "tost_normal": "inference",
            "plateaued": "inference",
            "Claim": "inference",
            "verdicts": "inference",
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
