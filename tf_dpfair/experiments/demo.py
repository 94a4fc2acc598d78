"""`make demo`: private and non-private training with TensorBoard logs and a report.

Installed as `tf-dpfair-demo` (what `make demo` runs); from a checkout,
`python -m tf_dpfair.experiments.demo`.

Trains a small CNN on Fashion-MNIST (10% of it rotated, a rare group) at
epsilon 3 and without privacy, evaluates both exactly per group, and writes
a Markdown report. Prints the summary, where everything is, and the command
that opens TensorBoard. Rerunning resumes or skips finished runs; delete
the work dir to start over.

TensorFlow's start-up logs are hidden; set TF_DPFAIR_TF_LOGS=1 to see them.
"""

from tf_dpfair.cli import tf_startup

# Before anything imports TensorFlow.
tf_startup.quiet_tensorflow()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import pandas as pd  # noqa: E402

from tf_dpfair.fairness import auc_report  # noqa: E402
from tf_dpfair.datasets import fashion_mnist  # noqa: E402
from tf_dpfair.experiments import demo_lib  # noqa: E402
from tf_dpfair.experiments import flags_lib  # noqa: E402

_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/tf_dpfair_demo", "Output folder.")
_EPSILON = flags.DEFINE_float("epsilon", 3.0, "Epsilon of the private run.")
_DATA_DIR = flags.DEFINE_string("data_dir", fashion_mnist.DEFAULT_ROOT, "Fashion-MNIST folder.")


def main(argv):
    """Runs the demo and prints where to look."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    flags_lib.quiet_accountant()
    table, paths, description = demo_lib.run_demo(
        _WORK_DIR.value, epsilon=_EPSILON.value, data_dir=_DATA_DIR.value)
    print(f"\nData: {description}")
    for statement in table["privacy.statement"]:
        print(f"- {statement}")
    print("\n" + auc_report.to_markdown(pd.read_csv(paths["summary_ema"], dtype={"epsilon": str})))
    print(f"Markdown report: {paths['report']}")
    print(f"Per-run fairness reports: {_WORK_DIR.value}/<run>/report_raw|report_ema/report.md")
    print(f"TensorBoard: tensorboard --logdir {_WORK_DIR.value}")


def run():
    """The `tf-dpfair-demo` console command."""
    flags_lib.run_binary(main, __name__)


if __name__ == "__main__":
    run()
