r"""Runs a grid of training runs one after another, resumably, into one table.

Finished runs (result.json present) are skipped and interrupted ones resume
from their backup, so rerunning the same command completes a sweep. Every
run's result.json is collected into <work_dir>/results.csv.

Examples (installed as `tf-dpfair-sweep`; from a checkout,
`python -m tf_dpfair.experiments.sweep` takes the same flags):
  tf-dpfair-sweep --config=rotated_study --work_dir=/tmp/rotated
  tf-dpfair-sweep --config=chexpert --set=data_dir=/data/chexpert \
      --grid=epsilon=1,8,inf --grid=seed=0,1 --work_dir=/tmp/chexpert_sweep
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tf_dpfair.experiments import flags_lib  # noqa: E402
from tf_dpfair.experiments import sweep_lib  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Named config in "
                              "tf_dpfair/experiments/configs/ "
                              "(its SETTINGS are the base of every run, its SWEEP the grid).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Folder of the sweep (required).")
_GRID = flags.DEFINE_multi_string("grid", [], "setting=v1,v2,...: a grid axis (replaces "
                                  "the config's axis of that name).")
_SET = flags.DEFINE_multi_string("set", [], "setting=value for every run (JSON values; "
                                 "inf for infinity).")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "List the runs and stop.")


def main(argv):
    """Runs (or lists) the sweep described by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORK_DIR.value:
        raise app.UsageError("--work_dir is required.")
    flags_lib.quiet_accountant()
    grid = sweep_lib.sweep_grid(_CONFIG.value, sweep_lib.parse_assignments(_GRID.value,
                                                                            many=True))
    base = sweep_lib.parse_assignments(_SET.value)
    if _DRY_RUN.value:
        for name, _ in sweep_lib.expand_grid(grid):
            print(name)
        return
    table = sweep_lib.run_sweep(_WORK_DIR.value, config=_CONFIG.value, base=base, grid=grid)
    print(f"{len(table)} finished runs in {os.path.join(_WORK_DIR.value, sweep_lib.RESULTS_FILE)}")
    print(f"Report: tf-dpfair-report --sweep_dir={_WORK_DIR.value}")


def run():
    """The `tf-dpfair-sweep` console command."""
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
