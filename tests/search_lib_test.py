"""Tests of the private hyperparameter search (tf_dpfair/experiments/search_lib.py)
and the validation split it scores on (ExampleSource.split, selection_lib)."""

import json
import math
import os

import dp_accounting
import keras
import numpy as np
import pytest

from experiment_fixtures import TINY, run_binary
from tf_dpfair.data import pipeline as data_lib
from tf_dpfair.privacy import search as search_privacy
from tf_dpfair.experiments import search_lib
from tf_dpfair.experiments import selection_lib
from tf_dpfair.experiments import train_lib

POISSON_2 = search_privacy.TrialCount("poisson", 2)
# Long seeds, so that the test can look for their digits in released files.
SEED_K2 = 7340173959106341  # POISSON_2.draw(SEED_K2) == 2
SEED_K0 = 7340173959106337  # POISSON_2.draw(SEED_K0) == 0
# Private, not deterministic (a search refuses a seed-derived noise), 4 updates.
BASE = {**TINY, "deterministic": False, "noise_multiplier": 1.0, "steps": 4,
        "validation_fraction": 0.2, "n_bootstrap": 5}
SPACE = {"learning_rate": {"log_uniform": [0.05, 1.0]}, "momentum": [0.0, 0.5]}
SCORE_NOISE = 2.0


class RefuseToTrain(keras.callbacks.Callback):
    """Fails the test if any run trains."""

    def on_train_begin(self, logs=None):
        raise AssertionError("a finished trial was trained again")


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def test_split_gives_disjoint_parts_that_cover_the_data():
    source = data_lib.ExampleSource.from_arrays(
        np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1) / 50, np.arange(50) % 3)
    train, validation, first, second = source.split(0.2, seed=7)
    assert (train.num_examples, validation.num_examples) == (40, 10)
    assert set(first).isdisjoint(second)
    assert sorted(np.concatenate([first, second])) == list(range(50))
    # Each part reads the examples at its indices.
    assert float(validation.load(np.int64(3))["image"][0, 0, 0]) == pytest.approx(
        second[3] / 50)
    again = source.split(0.2, seed=7)[3]
    np.testing.assert_array_equal(again, second)
    assert not np.array_equal(source.split(0.2, seed=8)[3], second)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        source.split(1.0, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        source.subset([1, 1])


def test_correct_count_has_sensitivity_one_for_multi_label():
    predictions = {"scores": np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.7]]),
                   "labels": np.array([[1, 0], [1, 1], [0, 0]]),
                   "label_mask": np.array([[1, 1], [1, 1], [1, 0]])}
    # Example 0: 2/2 right; example 1: 1/2; example 2: its one known label wrong.
    assert selection_lib.correct_count(predictions, True) == pytest.approx(1.5)
    multi_class = {"scores": np.array([[0.9, 0.1], [0.2, 0.8]]), "labels": np.array([0, 0])}
    assert selection_lib.correct_count(multi_class, False) == 1.0


def test_selection_settings_are_checked_and_absent_by_default():
    plain = train_lib.settings_from(None, {**TINY, "epsilon": 2.0})
    assert "validation_fraction" not in plain.to_json()
    with pytest.raises(ValueError, match="would leak"):
        train_lib.settings_from(None, {**TINY, "epsilon": 2.0, "validation_fraction": 0.1})
    with pytest.raises(ValueError, match="need validation_fraction > 0"):
        train_lib.settings_from(None, {**TINY, "epsilon": 2.0, "score_noise": 1.0})
    with pytest.raises(ValueError, match="not both"):
        train_lib.settings_from(None, {**TINY, "epsilon": 2.0, "validation_fraction": 0.1,
                                       "score_noise": 1.0, "public_validation": True})
    kept = train_lib.settings_from(None, {**TINY, "epsilon": 2.0, "validation_fraction": 0.1,
                                          "score_noise": 1})
    assert kept.to_json()["score_noise"] == 1.0


def test_number_of_trials_varies_with_the_secret_seed():
    counts = {POISSON_2.draw(seed) for seed in range(20)}
    assert len(counts) >= 3 and 0 in counts
    assert POISSON_2.draw(SEED_K2) == 2 and POISSON_2.draw(SEED_K0) == 0
    first = search_lib.draw_trial(SPACE, SEED_K2, 0)
    assert first == search_lib.draw_trial(SPACE, SEED_K2, 0)
    assert first != search_lib.draw_trial(SPACE, SEED_K2, 1)
    assert 0.05 <= first["learning_rate"] <= 1.0 and first["momentum"] in (0.0, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(space={}), "space is empty"),
    (dict(space={"batch_size": [10, 20]}), r"may not vary \['batch_size'\]"),
    (dict(space={"noise_multiplier": [1, 2]}), "DP event"),
    (dict(space={"learning_rate": []}), "non-empty list"),
    (dict(score_noise=None), "must be private"),
    (dict(base={**BASE, "non_private": True}), "non-private"),
    (dict(base={**BASE, "deterministic": True}), "deterministic"),
    (dict(trials=3), "TrialCount"),
])
def test_bad_searches_are_refused(tmp_path, kwargs, message):
    args = dict(base=BASE, space=SPACE, trials=POISSON_2, score_noise=SCORE_NOISE,
                seed=SEED_K2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        search_lib.run_private_search(str(tmp_path), **args)
    assert not os.path.exists(tmp_path / "released")


def test_fixed_number_of_trials_is_refused():
    with pytest.raises(ValueError, match="not covered"):
        search_privacy.TrialCount("fixed", 3)


def test_no_trial_releases_only_the_statement(tmp_path):
    out = search_lib.run_private_search(str(tmp_path), base=BASE, space=SPACE,
                                        trials=POISSON_2, score_noise=SCORE_NOISE,
                                        seed=SEED_K0)
    assert _files(tmp_path / "released") == ["search.json"]
    assert out["search"]["selected"] is None and out["trial_dirs"] == []


@pytest.mark.slow
def test_search_releases_only_the_best_trial_and_resumes(tmp_path):
    work_dir = str(tmp_path)
    out = search_lib.run_private_search(work_dir, base=BASE, space=SPACE, trials=POISSON_2,
                                        score_noise=SCORE_NOISE, seed=SEED_K2, verbose=0)
    trial_dirs = out["trial_dirs"]
    assert len(trial_dirs) == 2
    results = []
    for trial_dir in trial_dirs:
        with open(os.path.join(trial_dir, "result.json")) as f:
            results.append(json.load(f))
    scores = [r["selection"]["score"] for r in results]
    best = int(np.argmax(scores))
    released = tmp_path / "released"
    search = json.loads((released / "search.json").read_text())
    assert search["selected"]["score"] == scores[best]
    assert search["selected"]["hyperparameters"] == search_lib.draw_trial(
        SPACE, SEED_K2, best)
    # The released model is the best trial's: same predictions, same score.
    np.testing.assert_array_equal(
        np.load(released / "predictions.npz")["scores_ema"],
        np.load(os.path.join(trial_dirs[best], "predictions.npz"))["scores_ema"])
    released_result = json.loads((released / "result.json").read_text())
    assert released_result["selection"]["score"] == scores[best]
    assert "exact" not in json.dumps(released_result["selection"]).replace(
        "exact count not released", "")
    # Nothing of the other trial, no backups, checkpoints or logs, no seed.
    files = _files(released)
    assert not any(f.startswith(("backup", "checkpoints", "tensorboard")) for f in files)
    assert {"model.keras", "result.json", "search.json", "predictions.npz"} <= set(files)
    for name in files:
        content = (released / name).read_bytes()
        assert str(SEED_K2).encode() not in content
        # No trial folder name (it would reveal a lower bound on K).
        assert b"trial_0" not in content and (os.sep + "private").encode() not in content
    other = trial_dirs[1 - best]
    other_scores = np.load(os.path.join(other, "predictions.npz"))["scores_ema"]
    assert not np.array_equal(np.load(released / "predictions.npz")["scores_ema"],
                              other_scores)
    assert not os.path.exists(os.path.join(work_dir, "released", "search_seed.json"))
    assert json.loads((tmp_path / "private" / "search_seed.json").read_text()) == {
        "seed": SEED_K2}

    # The statement is dp_accounting's repeat-and-select of (training + score).
    plan = search["trial_plan"]
    q, steps, sigma = plan["sampling_probability"], plan["steps"], plan["noise_multiplier"]
    assert (q, steps, sigma) == (50 / 160, 4, 1.0)
    training = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    trial = dp_accounting.ComposedDpEvent([training,
                                           dp_accounting.GaussianDpEvent(SCORE_NOISE)])
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.dp_event.RepeatAndSelectDpEvent(trial, 2.0, math.inf))
    assert search["epsilon"] == pytest.approx(accountant.get_epsilon(1 / 160), rel=1e-6)
    assert search["trial_epsilon"] < search["epsilon"]
    assert "whole search" in search["statement"]
    assert search["trials"]["realised_count"] == "not released"

    # A rerun (no seed given: read back) gives the same K and trials, trains nothing.
    again = search_lib.run_private_search(work_dir, base=BASE, space=SPACE,
                                          trials=POISSON_2, score_noise=SCORE_NOISE,
                                          callbacks=[RefuseToTrain()], verbose=0)
    assert again["trial_dirs"] == trial_dirs
    assert again["search"]["selected"] == search["selected"]
    # A changed search in the same folder is refused.
    with pytest.raises(ValueError, match="another search"):
        search_lib.run_private_search(work_dir, base=BASE, space={"momentum": [0.9]},
                                      trials=POISSON_2, score_noise=SCORE_NOISE)


def _search_flags(work_dir, seed):
    flags = [f"--work_dir={work_dir}", "--selection=private", "--search_trials=poisson",
             "--search_mean=2", "--score_noise=2", f"--search_seed={seed}",
             "--space=momentum=0,0.5", '--space_json={"learning_rate": [0.1, 0.5]}']
    return flags + [f"--set={k}={json.dumps(v)}" for k, v in BASE.items()]


def test_binary_private_search_refuses_grid_and_releases_statement(tmp_path):
    code, output = run_binary("sweep", _search_flags(tmp_path, SEED_K0) + ["--grid=seed=0,1"])
    assert code != 0 and "--grid belongs to --selection=grid" in output
    code, output = run_binary("sweep", [f"--work_dir={tmp_path}", "--score_noise=2"])
    assert code != 0 and "--score_noise belongs to --selection=private" in output
    code, output = run_binary("sweep", _search_flags(tmp_path, SEED_K0))
    assert code == 0, output
    assert "whole search" in output
    search = json.loads((tmp_path / "released" / "search.json").read_text())
    assert search["space"] == {"learning_rate": [0.1, 0.5], "momentum": [0, 0.5]}
    assert search["selected"] is None


@pytest.mark.slow
def test_run_with_public_validation_trains_on_the_rest_and_scores_exactly(tmp_path):
    settings = train_lib.settings_from(None, {**BASE, "steps": 2, "public_validation": True,
                                              "work_dir": str(tmp_path)})
    result = train_lib.run(settings, verbose=0)
    selection = result["selection"]
    assert result["data"]["num_train"] == 160 and selection["validation_examples"] == 40
    assert result["privacy"]["target_delta"] == pytest.approx(1 / 160)
    assert result["privacy"]["sampling_probability"] == pytest.approx(50 / 160)
    assert selection["score_noise"] == 0 and selection["public_validation"] is True
    assert "declared public" in selection["statement"] and selection["weights"] == "ema"
    assert 0 <= selection["score"] <= 40
