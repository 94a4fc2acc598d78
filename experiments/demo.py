"""`make demo`: trains a small CNN privately on Fashion-MNIST and reports.

Prints test accuracy (raw and EMA weights) and the (epsilon, delta) statement.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import demo_lib  # noqa: E402

_EPSILON = flags.DEFINE_float("epsilon", 3.0, "Target epsilon.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs over the training set.")


def main(argv):
    del argv
    result = demo_lib.run(target_epsilon=_EPSILON.value, epochs=_EPOCHS.value)
    print(f"\nTest accuracy: {result['test_accuracy']:.4f} "
          f"(EMA weights: {result['ema_test_accuracy']:.4f}) on {result['source']}")
    print(f"Privacy: {result['statement']}")
    print(f"Training took {result['seconds']:.0f} s.")


if __name__ == "__main__":
    app.run(main)
