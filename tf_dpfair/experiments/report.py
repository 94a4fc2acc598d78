r"""Writes the tables and figures of a sweep as Markdown, PNG and CSV.

Reads the finished runs of a sweep folder (`tf-dpfair-sweep`): accuracy/AUC
against epsilon, disparity against overall performance for private models and the
non-private checkpoints, private vs non-private at matched performance
(with and without EMA; AUC, accuracy, error rates and calibration), error
rates and calibration per run, per-group tables with confidence intervals,
and the PAIR explorable's figures where the sweep's axes allow (privacy
sensitivity of test examples, per-class accuracy against epsilon, the
subgroup heatmap), and the verdicts (`verdicts.md`: holds / fails /
inconclusive per claim, Holm-corrected; learning rates chosen on validation
in `choices.md`).

Example (installed as `tf-dpfair-report`; from a checkout,
`python -m tf_dpfair.experiments.report` takes the same flags):
  tf-dpfair-report --sweep_dir=/tmp/rotated_study \
      --out_dir=docs/rotated_study

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tf_dpfair.experiments import flags_lib  # noqa: E402
from tf_dpfair.experiments import report_lib  # noqa: E402
from tf_dpfair.experiments import sweep_lib  # noqa: E402
from tf_dpfair.experiments import verdicts_lib  # noqa: E402

# Not `required=True`: a required flag fails the parsing of every binary that
# shares the flag registry (tests import several binaries into one process).
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the sweep (required).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Report folder (default <sweep_dir>/report).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200,
                                  "Bootstrap replicates of the matched comparisons.")
_SETTING = flags.DEFINE_multi_string(
    "explorable_setting", [], "setting=value choosing the runs of the privacy-sensitivity "
    "figures (default: the largest value of every setting but epsilon and seed).")
_PROJECTION = flags.DEFINE_enum("projection", None, ["umap", "pca", "tsne"],
                                "2-D projection of the embeddings (default: umap where "
                                "umap-learn is installed, else pca).")
_IMAGES = flags.DEFINE_integer("grid_images", 6, "Images per class in each grid of "
                               "privacy-sensitive examples.")
_ACCURACY_MARGIN = flags.DEFINE_float(
    "accuracy_margin", 0.03, "Verdicts: equivalence margin of the accuracy gap "
    "(non-private - private; mean AUC for multi-label data), TOST.")
_DISPARITY_MARGIN = flags.DEFINE_float(
    "disparity_margin", 0.02, "Verdicts: margin of the excess disparity at matched "
    "accuracy (private gap - interpolated non-private gap); the claim is that it is smaller.")
_ALPHA = flags.DEFINE_float("alpha", 0.05, "Verdicts: family-wise level; Holm across every "
                            "tested claim of the report.")
_PLATEAU_WINDOW = flags.DEFINE_float(
    "plateau_window", 3, "Verdicts: the last segment of each seed's validation curve "
    "checked for a plateau: a number of checkpoints (>= 1), or a share of them in (0, 1), "
    "e.g. 0.25 for the last quarter.")
_PLATEAU_TOLERANCE = flags.DEFINE_float(
    "plateau_tolerance", 0.005, "Verdicts: the last segment must gain less than this over "
    "the best validation figure before it for the arm to count as plateaued.")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", ["raw", "ema"], "Verdicts: weights of the "
                             "private final models (ema where a run kept EMA; non-private "
                             "runs have none).")
_TUNED = flags.DEFINE_list(
    "tuned_settings", [], "Verdicts: settings chosen for each arm apart before the sweep "
    "(e.g. batch_size,ema_decay from a pilot on validation), which may differ between "
    "the arms a claim compares.")
_MECHANISM_MARGIN = flags.DEFINE_float(
    "mechanism_accuracy_margin", 0.01, "Verdicts of clipping modes (mechanisms.md): the "
    "claimed bound on a mode's accuracy cost against standard clipping.")
_VERDICT_BOOTSTRAP = flags.DEFINE_integer("verdict_bootstrap", 1000, "Verdicts: hierarchical "
                                          "bootstrap draws per claim.")


def main(argv):
    """Writes the report of the sweep named by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP_DIR.value:
        raise app.UsageError("--sweep_dir is required.")
    try:
        verdicts = verdicts_lib.VerdictOptions(
            accuracy_margin=_ACCURACY_MARGIN.value, disparity_margin=_DISPARITY_MARGIN.value,
            alpha=_ALPHA.value, plateau_window=_PLATEAU_WINDOW.value,
            plateau_tolerance=_PLATEAU_TOLERANCE.value, weights=_WEIGHTS.value,
            n_bootstrap=_VERDICT_BOOTSTRAP.value, tuned=tuple(_TUNED.value),
            mechanism_accuracy_margin=_MECHANISM_MARGIN.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    explorable = {"facets": sweep_lib.parse_assignments(_SETTING.value) or None,
                  "projection": _PROJECTION.value, "count": _IMAGES.value}
    paths = report_lib.write_sweep_report(_SWEEP_DIR.value, _OUT_DIR.value, _BOOTSTRAP.value,
                                          explorable=explorable, verdicts=verdicts)
    print(f"Report: {paths['report']}")
    for name, path in sorted(paths.items()):
        if name != "report":
            print(f"  {name}: {path}")


def run():
    """The `tf-dpfair-report` console command."""
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
