"""Tests of `tf-dpfair-sweep` (tf_dpfair/experiments/sweep.py): grids, resume after an
interruption, the results table."""

import json
import math
import os

import keras
import numpy as np
import pandas as pd
import pytest

from experiment_fixtures import TINY, run_binary
from tf_dpfair.experiments import sweep_lib

GRID = {"epsilon": [2.0, math.inf]}
PRIVATE_RUN, NON_PRIVATE_RUN = "epsilon=2", "epsilon=inf"


class InterruptAt(keras.callbacks.Callback):
    """Raises once the model has applied `update` updates (a simulated crash)."""

    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.update:
            raise RuntimeError(f"simulated crash at update {self.update}")


class RefuseToTrain(keras.callbacks.Callback):
    """Fails the test if any run trains."""

    def on_train_begin(self, logs=None):
        raise AssertionError("a finished run was trained again")


def test_expand_grid_crosses_values_and_names_runs():
    runs = sweep_lib.expand_grid({"epsilon": [1.0, math.inf], "seed": [0, 1]})
    assert [name for name, _ in runs] == ["epsilon=1__seed=0", "epsilon=1__seed=1",
                                          "epsilon=inf__seed=0", "epsilon=inf__seed=1"]
    assert runs[3][1] == {"epsilon": math.inf, "seed": 1}
    union = sweep_lib.expand_grid([{"seed": [0, 1]}, {"seed": [1, 2]}])
    assert [name for name, _ in union] == ["seed=0", "seed=1", "seed=2"]
    with pytest.raises(ValueError, match="non-empty list"):
        sweep_lib.expand_grid({"seed": []})


def test_parse_assignments_reads_json_inf_and_text():
    assert sweep_lib.parse_assignments(["epsilon=1,4,inf"], many=True) == {
        "epsilon": [1, 4, math.inf]}
    assert sweep_lib.parse_assignments(['model_options={"depth": 14}', "dataset=mnist",
                                        "non_private=true"]) == {
        "model_options": {"depth": 14}, "dataset": "mnist", "non_private": True}
    with pytest.raises(ValueError, match="key=value"):
        sweep_lib.parse_assignments(["epsilon"])


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_the_uninterrupted_result_and_skips_finished(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    # Crash the first (private) run at update 5 of 6: the last backup is at
    # update 4 (end of the second 2-update epoch).
    with pytest.raises(RuntimeError, match="simulated crash at update 5"):
        sweep_lib.run_sweep(sweep_dir, base=TINY, grid=GRID, callbacks=[InterruptAt(5)],
                            verbose=0)
    private_dir = os.path.join(sweep_dir, PRIVATE_RUN)
    assert not os.path.exists(os.path.join(private_dir, "result.json"))
    with open(os.path.join(private_dir, "backup", "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 2

    table = sweep_lib.run_sweep(sweep_dir, base=TINY, grid=GRID, verbose=0)
    assert sorted(table["run"]) == [PRIVATE_RUN, NON_PRIVATE_RUN]
    resumed = table.set_index("run").loc[PRIVATE_RUN]
    assert resumed["privacy.steps"] == 6 and resumed["training.total_steps"] == 6
    assert sorted(os.listdir(os.path.join(private_dir, "checkpoints")))[:3] == [
        "epoch_001.npz", "epoch_002.npz", "epoch_003.npz"]

    # The same settings without interruption give the same model: the
    # pipeline restarted at update 4 with the same batches and noise.
    straight_dir = str(tmp_path / "straight")
    sweep_lib.run_sweep(straight_dir, base=TINY, grid={"epsilon": [2.0]}, verbose=0)
    want = np.load(os.path.join(straight_dir, PRIVATE_RUN, "predictions.npz"))
    got = np.load(os.path.join(private_dir, "predictions.npz"))
    for key in ("scores_raw", "scores_ema"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6)

    # Rerunning a finished sweep trains nothing and keeps the table.
    again = sweep_lib.run_sweep(sweep_dir, base=TINY, grid=GRID, callbacks=[RefuseToTrain()])
    assert sorted(again["run"]) == sorted(table["run"])


def test_collect_results_flattens_result_json_and_marks_non_private_epsilon(tmp_path):
    for name, private, epsilon in (("a", True, 1.5), ("b", False, None)):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "result.json").write_text(json.dumps({
            "privacy": {"private": private, "epsilon": epsilon},
            "metrics": {"raw": {"accuracy": 0.5}}}))
    os.makedirs(tmp_path / "unfinished")
    table = sweep_lib.collect_results(str(tmp_path))
    assert list(table["run"]) == ["a", "b"]
    assert list(table["epsilon"]) == [1.5, math.inf]
    assert list(table["metrics.raw.accuracy"]) == [0.5, 0.5]
    assert pd.read_csv(tmp_path / "results.csv")["run"].tolist() == ["a", "b"]


@pytest.mark.slow
def test_binary_runs_a_grid_from_flags(tmp_path):
    args = [f"--work_dir={tmp_path}", "--grid=epsilon=3,inf"]
    args += [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "steps": 2}.items()]
    code, output = run_binary("sweep", args)
    assert code == 0, output
    assert "2 finished runs" in output
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table["epsilon"].round(3).tolist())[1] == math.inf
    assert set(json.loads((tmp_path / "sweep.json").read_text())["runs"]) == {
        "epsilon=3", "epsilon=inf"}


@pytest.mark.parametrize("name", __import__("tf_dpfair.experiments.configs",
                                            fromlist=["NAMES"]).NAMES)
def test_every_config_and_every_run_of_its_grid_is_valid(name):
    """A study's config must not fail at run 40 of 75 on a setting refused at its start."""
    from tf_dpfair.experiments import settings_lib

    runs = sweep_lib.expand_grid(sweep_lib.sweep_grid(name))
    assert runs
    names = [run for run, _ in runs]
    assert len(set(names)) == len(names)
    for run, overrides in runs:
        settings = settings_lib.settings_from(name, {**overrides, "work_dir": "/tmp/unused"})
        for key, value in overrides.items():
            assert getattr(settings, key) == value or (
                isinstance(value, float) and math.isinf(value)
                and math.isinf(getattr(settings, key))), (run, key)


def test_the_final_probe_config_holds_the_choices_made_on_validation():
    """probe_study_final must run what docs/study2_redo/a1_r10_choices.csv chose."""
    from tf_dpfair.experiments.configs import probe_study_final

    choices = pd.read_csv(os.path.join(os.path.dirname(__file__), os.pardir, "docs",
                                       "study2_redo", "a1_r10_choices.csv"))
    wanted = set()
    for _, row in choices.iterrows():
        values = dict(part.split("=", 1) for part in row["run"].split("__"))
        decay = float(values["ema_decay"]) if row["weights"] == "ema" else 0.0
        wanted.add((float(values["epsilon"]), int(values["batch_size"]), decay,
                    float(values["learning_rate"])))
    got = {(float(p["epsilon"][0]), p["batch_size"][0], p["ema_decay"][0],
            p["learning_rate"][0]) for p in probe_study_final.SWEEP["grid"]}
    assert got == wanted and len(wanted) == 5
    assert all(p["seed"] == [0, 1, 2, 3, 4] for p in probe_study_final.SWEEP["grid"])
    assert probe_study_final.SETTINGS["checkpoint_every_updates"] == 4
