"""Test set-up: two logical CPU devices, so MirroredStrategy has two replicas."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # devices already initialised by another conftest import
    pass


_MIRRORED = []


def mirrored_strategy():
    """One 2-replica MirroredStrategy per process.

    Several MirroredStrategy objects in one process can reuse collective
    instance keys and abort each other's all-reduces, so tests share one.
    """
    if not _MIRRORED:
        _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _MIRRORED[0]
