"""End-to-end tests of `tf-dpfair-train` (tf_dpfair/experiments/train.py) and its
helpers, on tiny synthetic data."""

import json
import math
import os

import keras
import numpy as np
import pandas as pd
import pytest
from absl import app
from absl import flags

from experiment_fixtures import TINY, run_binary, tiny_fashion, tiny_flags
import tf_dpfair as dpf
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import train
from tf_dpfair.experiments import train_lib
from tf_dpfair.data.groups import GroupSpec

FLAGS = flags.FLAGS


@pytest.fixture
def parsed_flags():
    """Parses train.py's flags for one test and restores them afterwards."""
    def parse(args):
        FLAGS(["train.py", *args])
    yield parse
    FLAGS.unparse_flags()


def test_main_writes_a_private_run_with_reports_and_privacy_statement(tmp_path, parsed_flags,
                                                                      capsys):
    work_dir = str(tmp_path / "run")
    parsed_flags(tiny_flags(epsilon=3.0, work_dir=work_dir))
    train.main(["train.py"])
    assert "tensorboard --logdir" in capsys.readouterr().out
    with open(os.path.join(work_dir, "result.json")) as f:
        result = json.load(f)
    privacy = result["privacy"]
    assert privacy["private"] is True
    # Calibrated to the target over the 6 updates actually made; delta = 1/N.
    assert 2.5 < privacy["epsilon"] <= 3.0
    assert privacy["steps"] == 6 and privacy["sampling"] == "poisson"
    assert privacy["target_delta"] == pytest.approx(1 / 200)
    assert privacy["noise_multiplier"] > 0 and privacy["accountant"] == "rdp"
    assert "Poisson subsampling" in privacy["statement"]
    assert result["training"] == {**result["training"], "epochs": 3, "total_steps": 6}
    # Raw and EMA metrics, per group of both attributes, with intervals.
    for variant in ("raw", "ema"):
        metrics = result["metrics"][variant]
        assert 0 <= metrics["auc"] <= 1 and metrics["accuracy"] is None  # multi-label
        assert set(metrics["groups"]) == {"sex", "age"}
        female = metrics["groups"]["sex"]["female"]
        assert female["auc_low"] <= female["auc"] <= female["auc_high"]
        assert metrics["gap"]["sex"]["auc"] >= 0
    assert result["metrics"]["raw"]["auc"] != result["metrics"]["ema"]["auc"]
    for report in ("report_raw", "report_ema"):
        assert os.path.exists(os.path.join(work_dir, report, "report.md"))
        assert os.path.getsize(os.path.join(work_dir, report, "auc_sex.png")) > 1000
    assert sorted(os.listdir(os.path.join(work_dir, "checkpoints"))) == [
        "epoch_001.npz", "epoch_002.npz", "epoch_003.npz", "labels.npz"]
    assert any(name.startswith("events.out.tfevents")
               for _, _, files in os.walk(os.path.join(work_dir, "tensorboard"))
               for name in files)
    assert not os.path.exists(os.path.join(work_dir, "backup"))  # Removed when finished.
    loaded = keras.models.load_model(os.path.join(work_dir, "model.keras"))
    assert isinstance(loaded, dpf.DPModel) and loaded.update_count == 6
    scores = np.load(os.path.join(work_dir, "predictions.npz"))
    assert scores["scores_raw"].shape == scores["scores_ema"].shape == (120, 5)


def test_non_private_run_keeps_checkpoint_scores_and_says_epsilon_is_infinite(tmp_path):
    settings = train_lib.settings_from(None, {**TINY, "epsilon": math.inf,
                                              "work_dir": str(tmp_path)})
    result = train_lib.run(settings, verbose=0)
    assert result["privacy"]["private"] is False
    assert result["privacy"]["epsilon"] is None and result["privacy"]["epsilon_label"] == "inf"
    assert result["privacy"]["steps"] == 6
    assert result["metrics"]["ema"] is None  # No EMA without DPModel.
    checkpoint = np.load(tmp_path / "checkpoints" / "epoch_002.npz")
    assert checkpoint["updates"] == 4 and checkpoint["scores"].shape == (120, 5)
    assert "ema_scores" not in checkpoint
    model = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(model, dpf.NonPrivateModel)


def test_fashion_mnist_class_names_with_a_slash_name_the_streaming_metrics(tmp_path):
    # "T-shirt/top": a '/' inside a metric name's part is refused by the
    # metrics, so the run names its classes without one.
    data_dir = tmp_path / "fashion"
    data_dir.mkdir()
    tiny_fashion(str(data_dir), n_train=200, n_test=60)
    settings = train_lib.settings_from(None, {
        **TINY, "dataset": "fashion_mnist", "dataset_options": {},
        "data_dir": str(data_dir),
        "rotated_fraction": 0.2, "test_rotated_fraction": 0.5, "steps": 2, "epsilon": 8.0,
        "work_dir": str(tmp_path / "run")})
    result = train_lib.run(settings, verbose=0)
    assert result["privacy"]["steps"] == 2
    assert train_lib.metric_name("T-shirt/top") == "T-shirt_top"
    assert train_lib.metric_name("Ankle boot") == "Ankle_boot"


def test_a_finished_run_is_not_run_again(tmp_path):
    settings = train_lib.settings_from(None, {**TINY, "non_private": True, "steps": 2,
                                              "work_dir": str(tmp_path)})
    first = train_lib.run(settings, verbose=0)

    class Refuse(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise AssertionError("a finished run trained again")

    assert train_lib.run(settings, callbacks=[Refuse()]) == first


def test_mirrored_strategy_splits_each_logical_batch_over_replicas(tmp_path):
    import conftest

    settings = train_lib.settings_from(None, {**TINY, "noise_multiplier": 1.0, "steps": 2,
                                              "work_dir": str(tmp_path)})
    result = train_lib.run(settings, strategy=conftest.mirrored_strategy(), verbose=0)
    assert result["training"]["replicas"] == 2
    assert result["privacy"]["steps"] == 2 and result["privacy"]["noise_multiplier"] == 1.0


def test_config_values_are_overridden_by_given_settings():
    settings = train_lib.settings_from("chexpert", {"epsilon": 1.0, "work_dir": "/tmp/x"})
    assert settings.clip_norm == 0.001 and settings.ema_decay == 0.9999
    assert settings.batch_size >= 4096 and settings.epsilon == 1.0
    assert settings.delta is None  # 1/N, set when N is known.
    imagenet = train_lib.settings_from("imagenet", {"epsilon": 8.0})
    assert imagenet.delta == 8e-7 and imagenet.clip_norm == 1.0


def test_whole_numbers_given_for_float_settings_become_floats():
    # A sweep's --grid=learning_rate=0.5,1,2 parses 1 as an int, which Keras'
    # optimizers refuse.
    settings = train_lib.settings_from(None, {**TINY, "learning_rate": 1, "epsilon": 8,
                                              "clip_norm": 2, "seed": 3})
    assert type(settings.learning_rate) is float and settings.learning_rate == 1.0
    assert type(settings.epsilon) is float and type(settings.clip_norm) is float
    assert type(settings.seed) is int  # Integer fields stay integers.
    optimizer = keras.optimizers.SGD(settings.learning_rate)
    assert float(optimizer.learning_rate) == 1.0


def test_bad_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="needs epsilon or noise_multiplier"):
        train_lib.settings_from(None, {})
    with pytest.raises(ValueError, match="Unknown settings \\['epsilonn'\\]"):
        train_lib.settings_from(None, {"epsilonn": 1.0})
    with pytest.raises(ValueError, match="not both"):
        train_lib.settings_from(None, {"epsilon": 1.0, "noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="Unknown config"):
        train_lib.settings_from("nope", {})
    with pytest.raises(ValueError, match="strategy must be one of"):
        train_lib.make_strategy("parameter_server")


@pytest.mark.parametrize("args, argv, message", [
    (["--epsilon=1"], ["train.py", "extra"], "Unexpected arguments: ['extra']"),
    (["--epsilon=1"], ["train.py"], "--work_dir is required."),
    (["--config=nope", "--work_dir=/tmp/x"], ["train.py"],
     "Unknown config 'nope'; choose from ('chexpert',"),
    (["--epsilon=1", "--work_dir=/tmp/x", "--dataset_options=[1]"], ["train.py"],
     "--dataset_options must be a JSON object; got '[1]'."),
])
def test_main_refuses_bad_command_lines_before_training(args, argv, message, parsed_flags):
    parsed_flags(args)
    with pytest.raises(app.UsageError) as error:
        train.main(argv)
    assert str(error.value).startswith(message)


def test_multi_worker_strategy_needs_tf_config(monkeypatch):
    settings = train_lib.settings_from(None, {"epsilon": 1.0, "strategy": "multi_worker"})
    assert settings.strategy == "multi_worker"
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=r"strategy='multi_worker' needs the TF_CONFIG "
                       r"environment variable on every worker"):
        train_lib.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "")
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        train_lib.make_strategy("multi_worker")


def test_accuracy_table_counts_hits_per_group_by_hand():
    # Group 0: 3 of 4 right; group 1: 1 of 2 right.
    scores = np.eye(3)[[0, 1, 2, 0, 1, 1]]
    labels = np.array([0, 1, 2, 1, 1, 0])
    predictions = {"scores": scores, "labels": labels,
                   "groups": {"orientation": np.array([0, 0, 0, 0, 1, 1])}}
    spec = GroupSpec({"orientation": ("upright", "rotated")})
    groups, disparities = evaluation_lib.accuracy_table(predictions, spec, n_bootstrap=50)
    table = groups.set_index("group")["accuracy"]
    assert table["all"] == pytest.approx(4 / 6)
    assert table["upright"] == pytest.approx(0.75) and table["rotated"] == pytest.approx(0.5)
    row = disparities.iloc[0]
    assert row["worst_group"] == "rotated" and row["gap"] == pytest.approx(0.25)
    assert row["gap_low"] <= row["gap_high"]


@pytest.mark.slow
def test_binary_runs_from_the_command_line_and_reads_a_json_flag(tmp_path):
    code, output = run_binary("train", tiny_flags(
        non_private=True, steps=2, work_dir=str(tmp_path)))
    assert code == 0, output
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["settings"]["dataset_options"] == TINY["dataset_options"]
    assert pd.isna(result["privacy"]["delta"])


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_rerun_of_a_run_stopped_by_its_budget_says_it_is_finished(tmp_path, capsys):
    # The budget guard stops after update 6; the process dies before
    # result.json. The rerun used to fail (the logger had no model; with
    # updates left, fit refused: "does not allow one more update").
    settings = train_lib.settings_from(None, {**TINY, "epsilon": 3.0,
                                              "work_dir": str(tmp_path)})

    class KillAfterTraining(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            raise _Killed()

    with pytest.raises(_Killed):
        train_lib.run(settings, callbacks=[KillAfterTraining()], verbose=0)
    assert not (tmp_path / "result.json").exists()
    capsys.readouterr()

    class Refuse(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise AssertionError("a finished run trained again")

    result = train_lib.run(settings, callbacks=[Refuse()], verbose=0)
    sigma = result["privacy"]["noise_multiplier"]

    def epsilon(steps):  # Poisson, q = 50 / 200, delta = 1/N
        return dpf.privacy.accounting.compute_epsilon(noise_multiplier=sigma, sampling="poisson",
                                              sampling_probability=0.25, steps=steps,
                                              delta=1 / 200)

    assert epsilon(6) <= 3.0 < epsilon(7)  # the budget, not only the plan, ends it
    out = capsys.readouterr().out
    assert (f"The run is finished: the privacy budget epsilon=3.0 was reached after 6 "
            f"updates (epsilon {epsilon(6):.4g}, delta 0.005; one more update would take "
            f"epsilon to {epsilon(7):.4g}). Nothing left to train.") in out
    assert "Training from update" not in out
    assert result["privacy"]["steps"] == 6
    assert result["privacy"]["epsilon"] == pytest.approx(epsilon(6), rel=1e-9)
    assert result["privacy"]["stopped_for_budget"] is False  # it ran its full plan
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert not (tmp_path / "backup").exists()


def test_budget_reached_before_the_planned_updates_leaves_nothing_to_train():
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=10,
                          microbatch_size=5)
    inputs = keras.Input((2,))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs),
                        dp_config=config)
    model.compile(optimizer="sgd", loss="mse")

    def epsilon(steps):
        # fit below gets 70 array rows in batches of 10, which Keras shuffles
        # into fixed batches: accounted as shuffled, one pass per 7 updates.
        return dpf.privacy.accounting.compute_epsilon(noise_multiplier=1.0, sampling="shuffle",
                                              participations=math.ceil(steps / 7),
                                              steps=steps, delta=1e-3)

    target = (epsilon(7) + epsilon(8)) / 2  # 7 updates fit, the 8th starts pass 2
    logger = dpf.callbacks.PrivacyLogger(delta=1e-3, target_epsilon=target, verbose=0)
    logger.set_model(model)
    assert train_lib.nothing_left_to_train(model, logger, total_steps=20) is None
    model.fit(np.ones((70, 2)), np.zeros((70, 1)), batch_size=10, verbose=0)
    assert model.update_count == 7
    message = train_lib.nothing_left_to_train(model, logger, total_steps=20)
    assert message.startswith(f"The run is finished: the privacy budget epsilon={target} was "
                              f"reached after 7 updates (epsilon {epsilon(7):.4g}")
    # Without a budget only the plan ends a run.
    plain = dpf.callbacks.PrivacyLogger(delta=1e-3, verbose=0)
    plain.set_model(model)
    assert train_lib.nothing_left_to_train(model, plain, total_steps=20) is None
    assert train_lib.nothing_left_to_train(model, plain, total_steps=7) == (
        f"The run is finished: all 7 updates were applied (epsilon {epsilon(7):.4g}). "
        f"Nothing left to train.")


@pytest.mark.parametrize("warmup, expected", [(10.0, 10.0), (0.0, None), (3.0, 3.0)])
def test_the_ema_warmup_setting_reaches_the_dp_config(tmp_path, warmup, expected):
    from tf_dpfair.experiments import inputs_lib
    from tf_dpfair.experiments import run_model_lib
    import tensorflow as tf

    settings = train_lib.settings_from(None, {**TINY, "noise_multiplier": 1.0, "ema_decay": 0.9,
                                              "ema_warmup": warmup, "work_dir": str(tmp_path)})
    run_data = inputs_lib.load_data(settings)
    model = run_model_lib.build_run_model(settings, run_data, 1.0, None,
                                          tf.distribute.get_strategy())
    assert model.dp_config.ema_warmup == expected
