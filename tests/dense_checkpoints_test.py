"""Checkpoints every N updates and validation scores at every checkpoint
(`Settings.checkpoint_every_updates`, `evaluation_lib.EpochEvaluation`), on tiny runs."""

import os

import keras
import numpy as np
import pytest
from absl import flags

from experiment_fixtures import TINY
from tf_dpfair.experiments import flags_lib
from tf_dpfair.experiments import train  # noqa: F401 (defines the settings flags)
from tf_dpfair.experiments import train_lib

# 6 updates in 2 epochs of 3; a checkpoint every 2 updates: 2, 4, 6.
DENSE = {**TINY, "steps": 6, "steps_per_epoch": 3, "checkpoint_every_updates": 2,
         "validation_fraction": 0.2}


class _Killed(Exception):
    pass


def _checkpoint_files(directory):
    return sorted(name for name in os.listdir(directory) if name != "labels.npz")


def test_private_run_saves_a_checkpoint_every_n_updates_with_validation_scores(tmp_path):
    logged = {}

    class KeepLogs(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            logged.update(self.model.history.history)

    settings = train_lib.settings_from(None, {**DENSE, "epsilon": 4.0,
                                              "public_validation": True,
                                              "work_dir": str(tmp_path)})
    result = train_lib.run(settings, callbacks=[KeepLogs()], verbose=0)
    directory = tmp_path / "checkpoints"
    assert _checkpoint_files(directory) == [
        "epoch_001.npz", "epoch_002.npz", "update_000002.npz", "update_000004.npz",
        "update_000006.npz", "val_labels.npz"]
    # 200 training examples, 20% held out; the synthetic data has 5 labels.
    val_labels = np.load(directory / "val_labels.npz")
    assert val_labels["labels"].shape == (40, 5) and "group_sex" in val_labels
    for updates, epoch in ((2, 1), (4, 2), (6, 2)):
        saved = np.load(directory / f"update_{updates:06d}.npz")
        assert int(saved["updates"]) == updates and int(saved["epoch"]) == epoch
        assert saved["scores"].shape == saved["ema_scores"].shape == (120, 5)
        assert saved["val_scores"].shape == saved["ema_val_scores"].shape == (40, 5)
    # The last checkpoint is the final model: its scores are the final ones.
    final = np.load(tmp_path / "predictions.npz")
    last = np.load(directory / "update_000006.npz")
    np.testing.assert_allclose(last["scores"], final["scores_raw"], atol=1e-6)
    np.testing.assert_array_equal(np.load(directory / "epoch_002.npz")["scores"],
                                  last["scores"])
    assert result["privacy"]["steps"] == 6
    # Validation figures are logged at evaluated epochs, apart from Keras' val_ keys.
    for key in ("test_auc", "validation_auc", "ema_validation_auc"):
        assert len(logged[key]) == 2 and all(0 <= v <= 1 for v in logged[key])
    assert not any(key.startswith("val_") for key in logged)


@pytest.mark.slow  # two runs, about 40 s here
def test_a_resumed_run_rewrites_the_checkpoints_of_lost_updates(tmp_path):
    settings = train_lib.settings_from(None, {**DENSE, "non_private": True,
                                              "work_dir": str(tmp_path)})

    class KillInEpochTwo(keras.callbacks.Callback):
        # Before the standard callbacks' epoch-end writers: the backup
        # keeps epoch 1 (3 updates), the files of updates 4 and 6 exist.
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise _Killed()

    with pytest.raises(_Killed):
        train_lib.run(settings, callbacks=[KillInEpochTwo()], verbose=0)
    directory = tmp_path / "checkpoints"
    assert "update_000006.npz" in _checkpoint_files(directory)
    assert "epoch_002.npz" not in _checkpoint_files(directory)
    # Mark the lost update's file, and plant one of an update never reached.
    np.savez(directory / "update_000004.npz", scores=np.zeros((120, 5), np.float32),
             updates=4, epoch=2)
    np.savez(directory / "update_000008.npz", scores=np.zeros((120, 5), np.float32),
             updates=8, epoch=3)
    keras.backend.clear_session()
    train_lib.run(settings, verbose=0)
    assert _checkpoint_files(directory) == [
        "epoch_001.npz", "epoch_002.npz", "update_000002.npz", "update_000004.npz",
        "update_000006.npz", "val_labels.npz"]
    rewritten = np.load(directory / "update_000004.npz")
    assert np.abs(rewritten["scores"]).sum() > 0 and "val_scores" in rewritten
    final = np.load(tmp_path / "predictions.npz")["scores_raw"]
    np.testing.assert_allclose(np.load(directory / "update_000006.npz")["scores"], final,
                               atol=1e-6)


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_a_bad_checkpoint_period_is_refused_with_a_reason(value):
    with pytest.raises(ValueError, match="checkpoint_every_updates must be an integer >= 0"):
        train_lib.settings_from(None, {**TINY, "epsilon": 1.0,
                                       "checkpoint_every_updates": value})


def test_the_checkpoint_period_is_a_flag_of_train():
    flag = flags.FLAGS["checkpoint_every_updates"]
    assert flag.default == 0 and "every N" in flag.help
    flags.FLAGS(["train.py", "--checkpoint_every_updates=5"])
    try:
        assert flags_lib.given_settings(train_lib.Settings) == {"checkpoint_every_updates": 5}
    finally:
        flags.FLAGS.unparse_flags()
