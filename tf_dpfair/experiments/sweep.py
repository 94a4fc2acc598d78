r"""Runs a grid of training runs one after another, resumably, into one table.

Finished runs (result.json present) are skipped and interrupted ones resume
from their backup, so rerunning the same command completes a sweep. Every
run's result.json is collected into <work_dir>/results.csv.

Examples (installed as `tf-dpfair-sweep`; from a checkout,
`python -m tf_dpfair.experiments.sweep` takes the same flags):
  tf-dpfair-sweep --config=rotated_study --work_dir=/tmp/rotated
  tf-dpfair-sweep --config=chexpert --set=data_dir=/data/chexpert \
      --grid=epsilon=1,8,inf --grid=seed=0,1 --work_dir=/tmp/chexpert_sweep

With --selection=private it runs a private hyperparameter search instead
(`search_lib`, Papernot & Steinke 2022): a random number of trials (K drawn
from --search_trials with --search_mean/--search_shape and a secret seed),
each with settings drawn from --space, scored with noise on a validation
split of the training data; only the best trial is released, to
<work_dir>/released/, with one epsilon for the whole search:
  tf-dpfair-sweep --selection=private --work_dir=/tmp/search \
      --set=dataset=fashion_mnist --set=epsilon=4 \
      --search_trials=truncated_negative_binomial --search_mean=10 \
      --search_shape=1 --score_noise=20 \
      --space_json='{"learning_rate": {"log_uniform": [0.05, 2]}}'

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

import json
import os

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tf_dpfair.privacy import search  # noqa: E402
from tf_dpfair.experiments import flags_lib  # noqa: E402
from tf_dpfair.experiments import search_lib  # noqa: E402
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
_SELECTION = flags.DEFINE_enum(
    "selection", "grid", ["grid", "private"],
    "grid: run every combination of --grid (each run states its own epsilon; "
    "picking among them is not counted). private: a private hyperparameter search "
    "over --space whose whole cost is counted; only the best trial is released.")
_SEARCH_TRIALS = flags.DEFINE_enum(
    "search_trials", None, list(search.DISTRIBUTIONS),
    "--selection=private: the distribution of the number of trials K (a fixed K "
    "is not covered by the theorem).")
_SEARCH_MEAN = flags.DEFINE_float("search_mean", None, "E[K], the expected number of trials.")
_SEARCH_SHAPE = flags.DEFINE_float("search_shape", None, "The truncated negative "
                                   "binomial's shape (0: logarithmic, 1: geometric).")
_SCORE_NOISE = flags.DEFINE_float("score_noise", None, "Std of the Gaussian noise on each "
                                  "trial's selection score (a count of correct "
                                  "validation predictions, sensitivity 1).")
_PUBLIC_VALIDATION = flags.DEFINE_boolean(
    "public_validation", False, "Declare the validation split public: exact scores, "
    "and the statement says the guarantee does not cover it.")
_SPACE = flags.DEFINE_multi_string("space", [], "setting=v1,v2,...: values a trial's "
                                   "setting is drawn from, uniformly.")
_SPACE_JSON = flags.DEFINE_string("space_json", None, "The search space as JSON: setting "
                                  "-> list of values, or {\"uniform\"|\"log_uniform\": "
                                  "[lo, hi]}.")
_SEED = flags.DEFINE_integer("search_seed", None, "The search's secret seed (default: "
                             "drawn, and saved under <work_dir>/private/).")
_SEARCH_FLAGS = ("search_trials", "search_mean", "search_shape", "score_noise",
                 "public_validation", "space", "space_json", "search_seed")


def _private_search():
    """Runs the private search of `--selection=private`."""
    if _DRY_RUN.value:
        raise app.UsageError("--dry_run lists a grid's runs; a private search's trials "
                             "are drawn from a secret seed and are not listed.")
    if _GRID.value:
        raise app.UsageError("--grid belongs to --selection=grid; a private search "
                             "draws its trials from --space or --space_json.")
    if _SEARCH_TRIALS.value is None or _SEARCH_MEAN.value is None:
        raise app.UsageError("--selection=private needs --search_trials and --search_mean "
                             "(K must be random: a fixed K is not covered).")
    space = json.loads(_SPACE_JSON.value) if _SPACE_JSON.value else {}
    space.update(sweep_lib.parse_assignments(_SPACE.value, many=True))
    try:
        trials = search.TrialCount(_SEARCH_TRIALS.value, _SEARCH_MEAN.value,
                                           _SEARCH_SHAPE.value)
        out = search_lib.run_private_search(
            _WORK_DIR.value, config=_CONFIG.value,
            base=sweep_lib.parse_assignments(_SET.value), space=space, trials=trials,
            score_noise=_SCORE_NOISE.value, public_validation=_PUBLIC_VALIDATION.value,
            seed=_SEED.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    print(out["search"]["statement"])
    print(f"Released: {out['released_dir']} (the curator's trials stay in "
          f"{os.path.join(_WORK_DIR.value, search_lib.PRIVATE_DIR)}: do not publish it).")


def main(argv):
    """Runs (or lists) the sweep described by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORK_DIR.value:
        raise app.UsageError("--work_dir is required.")
    flags_lib.quiet_accountant()
    if _SELECTION.value == "private":
        _private_search()
        return
    given = [name for name in _SEARCH_FLAGS if flags.FLAGS[name].present]
    if given:
        raise app.UsageError(f"--{given[0]} belongs to --selection=private.")
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
