r"""Why a group pays under DP: per-group clipping and gradients against the accuracy gap.

Trains one small CNN per setting on Fashion-MNIST with a rotated subgroup,
with per-group training diagnostics on (see `mechanism_lib`), and writes
`summary.md`, `summary.json`, `curves.png` and `summary.png` into
`<work_dir>/report`. Finished settings are read back, so an interrupted
study resumes.

Example (installed as `tf-dpfair-mechanism`; from a checkout,
`python -m tf_dpfair.experiments.mechanism` takes the same flags):
  tf-dpfair-mechanism --work_dir=/tmp/mechanism \
      --rotated_fractions=0.05,0.2 --privacy=inf,sgd,clip,4,1

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

import os

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tf_dpfair.experiments import flags_lib  # noqa: E402
from tf_dpfair.experiments import mechanism_lib  # noqa: E402

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Output folder.")
_TRAIN = flags.DEFINE_list("train_examples", ["10000"], "Training-set sizes.")
_SHARES = flags.DEFINE_list("rotated_fractions", ["0.05", "0.2"], "Rotated shares.")
_PRIVACY = flags.DEFINE_list("privacy", ["inf", "sgd", "clip", "4", "1"],
                             "Privacy levels: inf (no clipping, no noise, Adam), sgd "
                             "(the same with SGD), clip (clipping only, SGD) or a "
                             "target epsilon.")
_SGD_RATE = flags.DEFINE_float("unclipped_sgd_learning_rate", 0.05,
                               "SGD learning rate of the sgd level.")
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Epochs of --steps_per_epoch updates.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", 10, "Updates between evaluations.")
_DATA_DIR = flags.DEFINE_string("data_dir", mechanism_lib.Recipe.data_dir,
                                "Fashion-MNIST IDX folder.")


def main(argv):
    """Runs the study described by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORK_DIR.value:
        raise app.UsageError("--work_dir is required.")
    for level in _PRIVACY.value:
        if level not in ("inf", "sgd", "clip"):
            try:
                if not float(level) > 0:
                    raise ValueError
            except ValueError:
                raise app.UsageError(f"--privacy: {level!r} is not inf, sgd, clip or "
                                     f"an epsilon > 0.") from None
    flags_lib.quiet_accountant()
    recipe = mechanism_lib.Recipe(data_dir=_DATA_DIR.value, epochs=_EPOCHS.value,
                                  steps_per_epoch=_STEPS.value,
                                  unclipped_sgd_learning_rate=_SGD_RATE.value)
    settings = [mechanism_lib.Setting(int(n), float(share), level)
                for n in _TRAIN.value for share in _SHARES.value
                for level in _PRIVACY.value]
    results = mechanism_lib.run_study(recipe, settings, _WORK_DIR.value)
    path = mechanism_lib.write_report(results, os.path.join(_WORK_DIR.value, "report"))
    print(f"Report: {path}")


def run():
    """The `tf-dpfair-mechanism` console command."""
    flags.mark_flag_as_required("work_dir")
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
