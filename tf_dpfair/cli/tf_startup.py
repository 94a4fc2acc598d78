"""A quiet TensorFlow start-up for the console commands.

While TensorFlow is imported and finds its devices, its C++ code writes about
ten lines straight to file descriptor 2, before absl logging is set up:
"WARNING: All log messages before absl::InitializeLog() is called are
written to STDERR", "oneDNN custom operations are on", "Could not find cuda
drivers", "failed call to cuInit", the CPU feature guard. Neither
`TF_CPP_MIN_LOG_LEVEL` nor Python's `logging` reaches them, so
`quiet_tensorflow` points descriptor 2 at a temporary file for that time,
then restores it and writes back every captured line that is not one of
TensorFlow's (a Python warning, say), or everything when the import fails.
Later logs keep `TF_CPP_MIN_LOG_LEVEL` (2, errors only, unless set).

Set the environment variable `TF_DPFAIR_TF_LOGS=1` to see TensorFlow's logs:
nothing is captured and `TF_CPP_MIN_LOG_LEVEL` is left to TensorFlow.

Every console command that imports TensorFlow calls `quiet_tensorflow()`
first thing; `tf-dpfair-privacy` needs no TensorFlow at all.
"""

import contextlib
import os
import re
import sys
import tempfile

ENV_VAR = "TF_DPFAIR_TF_LOGS"
HELP = (f"TensorFlow's start-up logs are hidden; set {ENV_VAR}=1 to see "
        f"them.")

# An absl/glog line: severity and date, time, thread id, file:line].
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_CPP_PROSE = (
    "WARNING: All log messages before absl::InitializeLog() is called",
    # The second line of cpu_feature_guard's message.
    "To enable the following instructions:",
)


def logs_wanted(environ=None):
    """Whether the user asked for TensorFlow's logs (`TF_DPFAIR_TF_LOGS`).

    Args:
      environ: the environment (default `os.environ`).

    Returns:
      True when the variable is set to anything but "", "0" or "false".
    """
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return value.strip().lower() not in ("", "0", "false")


def is_tensorflow_log(line):
    """Whether `line` (one line of stderr) is TensorFlow's C++ logging."""
    return bool(_CPP_LOG.match(line)) or line.startswith(_CPP_PROSE)


def without_tensorflow_logs(text):
    """`text` less its lines of TensorFlow C++ logging.

    Args:
      text: what was written to stderr.

    Returns:
      The other lines, each with its newline.
    """
    return "".join(line for line in text.splitlines(keepends=True)
                   if not is_tensorflow_log(line))


@contextlib.contextmanager
def captured_stderr():
    """Points file descriptor 2 at a temporary file; writes back what belongs.

    On leaving, descriptor 2 is restored and what was written meanwhile is
    written to it again: without TensorFlow's log lines, or all of it when
    the block raised. Where descriptor 2 cannot be duplicated (closed),
    nothing is captured.

    Yields:
      Nothing.
    """
    _flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    failed = True
    with tempfile.TemporaryFile(mode="w+b") as capture:
        try:
            os.dup2(capture.fileno(), 2)
            yield
            failed = False
        finally:
            _flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            if not failed:
                text = without_tensorflow_logs(text)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


def quiet_tensorflow():
    """Imports TensorFlow and Keras and finds the devices, without their logs.

    With `TF_DPFAIR_TF_LOGS` set, only imports them. The devices are not
    initialised when `TF_CONFIG` is set: a multi-worker strategy must
    configure its collective ops before that (its workers may then print
    the device lines).

    Raises:
      ImportError: TensorFlow or Keras cannot be imported (what they wrote
        to stderr is shown first).
    """
    if logs_wanted():
        import keras  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with captured_stderr():
        import keras  # noqa: F401
        import tensorflow as tf

        if not os.environ.get("TF_CONFIG"):
            tf.config.list_logical_devices()
