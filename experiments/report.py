"""Writes the tables and figures of a sweep as Markdown, PNG and CSV.

Reads the finished runs of a sweep folder (`sweep.py`): accuracy/AUC against
epsilon, disparity against overall performance for private models and the
non-private checkpoints, private vs non-private at matched performance
(with and without EMA), and per-group tables with confidence intervals.

Example:
  python experiments/report.py --sweep_dir=/tmp/rotated_study \
      --out_dir=docs/rotated_study
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import report_lib  # noqa: E402

# Not `required=True`: a required flag fails the parsing of every binary that
# shares the flag registry (tests import several binaries into one process).
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the sweep (required).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Report folder (default <sweep_dir>/report).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 200,
                                  "Bootstrap replicates of the matched comparisons.")


def main(argv):
    """Writes the report of the sweep named by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP_DIR.value:
        raise app.UsageError("--sweep_dir is required.")
    paths = report_lib.write_sweep_report(_SWEEP_DIR.value, _OUT_DIR.value, _BOOTSTRAP.value)
    print(f"Report: {paths['report']}")
    for name, path in sorted(paths.items()):
        if name != "report":
            print(f"  {name}: {path}")


if __name__ == "__main__":
    app.run(main)
