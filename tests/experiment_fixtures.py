"""Tiny settings and data shared by the experiment binaries' tests, and a way to run one.

Settings small enough that a run takes seconds on synthetic CheXpert-shaped
data; `tiny_fashion` writes Fashion-MNIST-named IDX files of a learnable toy
task; `run_binary` runs a binary of `tf_dpfair.experiments` in a subprocess
with this checkout's code.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

from tf_dpfair.datasets import fashion_mnist

ROOT = pathlib.Path(__file__).resolve().parent.parent

# 200 training examples, logical batch 50 (q = 0.25), 2 updates per Keras
# epoch: a run is a handful of updates of a small CNN on 16x16 images.
TINY = {
    "dataset": "synthetic",
    "dataset_options": {"image_size": 16, "signal": 0.5},
    "train_examples": 200,
    "test_examples": 120,
    "model": "tiny_cnn",
    "model_options": {"filters": [4, 8], "groups": 2},
    "batch_size": 50,
    "microbatch_size": 25,
    "steps_per_epoch": 2,
    "epochs": 1,
    "steps": 6,
    "learning_rate": 0.5,
    "ema_decay": 0.9,
    "eval_batch_size": 60,
    "n_bootstrap": 20,
    "deterministic": True,
}


def tiny_flags(**overrides):
    """TINY (plus overrides) as command-line flags of `tf-dpfair-train`."""
    import json

    values = {**TINY, **overrides}
    return [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items()]


def run_binary(name, args, timeout=300):
    """Runs `python -m tf_dpfair.experiments.<name> <args>` in a subprocess.

    PYTHONPATH puts this checkout first, so its code runs even where the
    virtualenv has the package installed from elsewhere.

    Args:
        name: the binary's module name, e.g. "train".
        args: its command-line arguments.
        timeout: seconds before the subprocess is killed.

    Returns:
        `(returncode, stdout + stderr)`.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-m", f"tf_dpfair.experiments.{name}", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_fashion(root, n_train=300, n_test=200):
    """Class c is a bright bar in row band c: learnable, and rotation moves it."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 3:2 * c + 5, 4:24] = 250
        image_name, label_name = fashion_mnist.FILES[split]
        write_idx(os.path.join(root, image_name), images)
        write_idx(os.path.join(root, label_name), labels)
