"""Console commands start quietly: no TensorFlow for the privacy calculator, no C++ logs.

Each command runs in a fresh Python process, as a user would run it: TensorFlow's
start-up logs are written by C++ to file descriptor 2 when it is first imported,
which an in-process test would not see.
"""

import os
import pathlib
import re
import subprocess
import sys

from tf_dpfair.cli import tf_startup

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 300

# Lines TensorFlow 2.21 prints on import and device initialisation.
SAMPLE_LOGS = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796658806.875361    7931 port.cc:153] oneDNN custom operations are on.",
    "I0000 00:00:1796658806.875755    7931 cudart_stub.cc:31] Could not find cuda drivers "
    "on your machine, GPU will not be used.",
    "E0000 00:00:1796658912.490650   10269 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
]


def env(**changes):
    """This environment with the checkout first on the path; None values unset."""
    out = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("TF_CPP_MIN_LOG_LEVEL", tf_startup.ENV_VAR):
        out.pop(name, None)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def python(code, **changes):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(**changes),
                          capture_output=True, text=True, timeout=TIMEOUT)


def tensorflow_lines(text):
    """Lines that look like TensorFlow's logging, by a looser rule than the module's."""
    return [line for line in text.splitlines()
            if re.match(r"[IWEF]\d{4} ", line)
            or any(word in line for word in ("absl::InitializeLog", "oneDNN", "cuda",
                                             "cuInit", "rebuild TensorFlow"))]


def test_tensorflow_log_lines_are_recognised_and_nothing_else():
    assert all(tf_startup.is_tensorflow_log(line) for line in SAMPLE_LOGS)
    for line in ("UserWarning: something", "I0000 is not a log line",
                 "Traceback (most recent call last):", ""):
        assert not tf_startup.is_tensorflow_log(line), line
    text = "\n".join(SAMPLE_LOGS[:2] + ["a Python warning"] + SAMPLE_LOGS[2:]) + "\n"
    assert tf_startup.without_tensorflow_logs(text) == "a Python warning\n"


def test_logs_wanted_reads_the_environment_variable():
    assert not tf_startup.logs_wanted({})
    for value in ("", "0", "false", "False"):
        assert not tf_startup.logs_wanted({tf_startup.ENV_VAR: value})
    for value in ("1", "true", "yes"):
        assert tf_startup.logs_wanted({tf_startup.ENV_VAR: value})


CAPTURE = """
import os, sys
from tf_dpfair.cli import tf_startup
try:
    with tf_startup.captured_stderr():
        os.write(2, b"I0000 00:00:1.5    7 port.cc:153] oneDNN custom operations are on.\\n")
        print("kept", file=sys.stderr)
        if sys.argv[1] == "fail":
            raise ImportError("no")
except ImportError:
    print("failed", file=sys.stderr)
print("after", file=sys.stderr)
"""


def test_captured_stderr_writes_back_all_but_tensorflow_logs():
    done = subprocess.run([sys.executable, "-c", CAPTURE, "ok"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "kept\nafter\n"


def test_captured_stderr_writes_back_everything_when_the_block_fails():
    done = subprocess.run([sys.executable, "-c", CAPTURE, "fail"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "I0000 00:00:1.5    7 port.cc:153] oneDNN custom operations are on.", "kept",
        "failed", "after"]


def test_privacy_command_computes_epsilon_without_tensorflow():
    done = python(
        "import sys\n"
        "from tf_dpfair.cli import privacy\n"
        "privacy.main(['--num_examples=60000', '--batch_size=256', '--epochs=60',\n"
        "              '--noise_multiplier=1.1', '--delta=1e-5', '--sampling=poisson'])\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "print('imported:', heavy)\n")
    assert done.returncode == 0, done.stderr
    assert "Privacy: " in done.stdout and "epsilon" in done.stdout
    assert done.stdout.splitlines()[-1] == "imported: []"
    assert not tensorflow_lines(done.stderr), done.stderr


def test_demo_help_prints_no_tensorflow_logs_unless_asked():
    quiet = subprocess.run([sys.executable, "-m", "tf_dpfair.experiments.demo", "--help"],
                           cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert quiet.stdout.startswith("`make demo`: private and non-private"), quiet.stderr
    assert f"{tf_startup.ENV_VAR}=1" in quiet.stdout  # --help tells how to see them
    assert not tensorflow_lines(quiet.stderr), quiet.stderr
    # The variable brings TensorFlow's own logs back.
    loud = subprocess.run([sys.executable, "-m", "tf_dpfair.experiments.demo", "--help"],
                          cwd=ROOT, env=env(**{tf_startup.ENV_VAR: "1"}),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert loud.stdout == quiet.stdout
    assert tensorflow_lines(loud.stderr), loud.stderr
