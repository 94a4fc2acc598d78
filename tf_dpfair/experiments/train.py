r"""Trains one model (private or not) and writes its reports and result.json.

Every field of `train_lib.Settings` is a flag; `--config=NAME` starts from a
config in `tf_dpfair/experiments/configs/` and flags given on the command
line override it. Rerunning the same command resumes an interrupted run; a
finished run (result.json present) is not run again.

Examples (installed as `tf-dpfair-train`; from a checkout,
`python -m tf_dpfair.experiments.train` takes the same flags):
  tf-dpfair-train --dataset=fashion_mnist --epsilon=4 \
      --rotated_fraction=0.1 --work_dir=/tmp/runs/eps4
  tf-dpfair-train --config=chexpert --data_dir=/data/chexpert \
      --epsilon=8 --work_dir=/tmp/runs/chexpert_eps8

On several machines, run the same command on each with TF_CONFIG set and
--strategy=multi_worker (see docs/training_and_privacy.md, "Training on
several machines").

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

import os

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from tf_dpfair.experiments import flags_lib  # noqa: E402
from tf_dpfair.experiments import train_lib  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Named config in "
                              "tf_dpfair/experiments/configs/.")
flags_lib.define_settings_flags(train_lib.Settings)
# The settings flags belong to flags_lib, which defines them; adopting them
# makes `--help` list them with --config instead of only under --helpfull.
flags.adopt_module_key_flags(flags_lib)


def main(argv):
    """Runs the training job described by the flags."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    flags_lib.quiet_accountant()
    try:
        settings = train_lib.settings_from(_CONFIG.value,
                                           flags_lib.given_settings(train_lib.Settings))
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if not settings.work_dir:
        raise app.UsageError("--work_dir is required.")
    result = train_lib.run(settings)
    if not result.get("chief", True):
        statement = (result["privacy"] or {}).get("statement", "")
        print(f"\nWorker {result['worker']} of {result['num_workers']} done; the chief "
              f"writes the results to its work_dir. {statement}")
        return
    print(f"\n{result['privacy']['statement']}")
    for variant in ("raw", "ema"):
        metrics = result["metrics"][variant]
        if metrics:
            print(f"{variant:>3} weights: AUC {metrics['auc']:.4f}"
                  + (f", accuracy {metrics['accuracy']:.4f}" if metrics["accuracy"] is not None
                     else "") + f", gap {metrics['gap']}")
    print(f"Results in {settings.work_dir}; TensorBoard: tensorboard --logdir "
          f"{os.path.join(settings.work_dir, 'tensorboard')}")


def run():
    """The `tf-dpfair-train` console command."""
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
