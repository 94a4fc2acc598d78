r"""Writes the tables and figures of a sweep as Markdown, PNG and CSV.

Reads the finished runs of a sweep folder (`tf-dpfair-sweep`): accuracy/AUC
against epsilon, disparity against overall performance for private models and the
non-private checkpoints, private vs non-private at matched performance
(with and without EMA; AUC, accuracy, error rates and calibration), error
rates and calibration per run, per-group tables with confidence intervals,
and the PAIR explorable's figures where the sweep's axes allow (privacy
sensitivity of test examples, per-class accuracy against epsilon, the
subgroup heatmap).

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


def main(argv):
    """Writes the report of the sweep named by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP_DIR.value:
        raise app.UsageError("--sweep_dir is required.")
    explorable = {"facets": sweep_lib.parse_assignments(_SETTING.value) or None,
                  "projection": _PROJECTION.value, "count": _IMAGES.value}
    paths = report_lib.write_sweep_report(_SWEEP_DIR.value, _OUT_DIR.value, _BOOTSTRAP.value,
                                          explorable=explorable)
    print(f"Report: {paths['report']}")
    for name, path in sorted(paths.items()):
        if name != "report":
            print(f"  {name}: {path}")


def run():
    """The `tf-dpfair-report` console command."""
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
