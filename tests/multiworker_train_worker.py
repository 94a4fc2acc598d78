"""`tf-dpfair-train` with one extra flag: this worker kills itself before an update.

    python tests/multiworker_train_worker.py --kill_worker=1 --kill_at_update=3 \
        <tf-dpfair-train flags>

Worker `kill_worker` of the job (TF_CONFIG's task index) sends itself
SIGKILL when the model has applied `kill_at_update` updates, just before
the next one, as a machine lost mid-epoch would. Everything else is
tf_dpfair/experiments/train.py's `main`; tests/multiworker_test.py then
reruns the job with the real binary and checks that it resumes.
"""

import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402

from tf_dpfair.experiments import train  # noqa: E402 (defines its flags)
from tf_dpfair.experiments import train_lib  # noqa: E402

_KILL_WORKER = flags.DEFINE_integer("kill_worker", 1, "Task index of the worker to kill.")
_KILL_AT = flags.DEFINE_integer("kill_at_update", 3, "Updates applied before the kill.")


class KillAt(keras.callbacks.Callback):
    """SIGKILLs this process just before update `update` + 1 is applied."""

    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_train_batch_begin(self, batch, logs=None):
        if train_lib.updates_applied(self.model) == self.update:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv):
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    if index != _KILL_WORKER.value:
        return train.main(argv)
    original = train_lib.run

    def run(settings, **kwargs):
        return original(settings, callbacks=[KillAt(_KILL_AT.value)], **kwargs)

    train_lib.run = run
    return train.main(argv)


if __name__ == "__main__":
    app.run(main)
