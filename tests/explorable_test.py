"""Tests of tf_dpfair/experiments/explorable_lib.py: sensitivity, rankings, heatmap, on fake sweeps."""

import json
import math
import os

import keras
import numpy as np
import pandas as pd
import pytest

import tf_dpfair as dpf
from tf_dpfair.experiments import explorable_lib
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import report_lib
from tf_dpfair.experiments import sweep_lib
from tf_dpfair.experiments import train_lib


def test_privacy_sensitivity_by_hand():
    # Models at epsilon 1, 2 and non-private; five examples.
    correct = np.array([[1, 0, 1, 0, 1],
                        [1, 1, 0, 0, 1],
                        [1, 1, 1, 0, 0]], bool)
    sensitivity = explorable_lib.privacy_sensitivity(correct, [1.0, 2.0, math.inf])
    # 0: right everywhere -> 1. 1: right from 2 on -> 2. 2: right at 1 but
    # wrong at 2 -> only from inf on. 3, 4: wrong non-privately -> never.
    assert sensitivity[:3].tolist() == [1.0, 2.0, math.inf]
    assert np.isnan(sensitivity[3]) and np.isnan(sensitivity[4])
    assert [explorable_lib.sensitivity_label(v) for v in sensitivity] == [
        "1", "2", "inf", "never", "never"]


def test_models_at_one_epsilon_vote():
    # Two seeds at epsilon 1: one right is half, which counts as right.
    correct = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 1]], bool)
    sensitivity = explorable_lib.privacy_sensitivity(correct, [1.0, 1.0, 4.0])
    assert sensitivity.tolist() == [1.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="one epsilon per model"):
        explorable_lib.privacy_sensitivity(correct, [1.0, 4.0])


def test_rank_examples_orders_by_sensitivity_then_confidence():
    sensitivity = np.array([1.0, 8.0, math.inf, 8.0, np.nan, 1.0, 2.0])
    probability = np.array([0.9, 0.4, 0.3, 0.2, 0.1, 0.95, 0.5])
    labels = np.array([0, 0, 0, 0, 0, 0, 1])
    ranking = explorable_lib.rank_examples(sensitivity, probability, labels, count=3)
    most, least = ranking[0]
    # inf first; then the two at 8, the less confident (0.2) first. NaN never.
    assert most.tolist() == [2, 3, 1]
    # 1.0 first, the more confident (0.95) first; then 8.0 at 0.4 before 0.2.
    assert least.tolist() == [5, 0, 1]
    assert ranking[1][0].tolist() == [6] == ranking[1][1].tolist()


def test_per_class_accuracy_and_projection():
    scores = np.eye(3)[[0, 1, 1, 2, 0]]
    labels = np.array([0, 1, 2, 2, 1])
    assert explorable_lib.per_class_accuracy(scores, labels, 4)[:3].tolist() == [1.0, 0.5, 0.5]
    assert np.isnan(explorable_lib.per_class_accuracy(scores, labels, 4)[3])
    points, method = explorable_lib.project(np.random.default_rng(0).normal(size=(50, 8)),
                                            "pca")
    assert points.shape == (50, 2) and method == "PCA"
    with pytest.raises(ValueError, match="method must be one of"):
        explorable_lib.project(np.zeros((3, 2)), "mds")


# ------------------------------------------------------------- a fake sweep

TEST_SETTINGS = {"dataset": "mnist", "train_examples": 100, "test_examples": 40,
                 "test_rotated_fraction": 0.5, "model": "mlp",
                 "model_options": {"hidden": [8]}}
SIZES, EPSILONS, SHARES = (100, 400), (1.0, math.inf), (0.1, 0.3)


def _fake_run(run_dir, size, epsilon, share, labels, rotated, rng, seed=0):
    """A finished run without training: scores, result.json, settings.json."""
    os.makedirs(run_dir)
    settings = {**TEST_SETTINGS, "train_examples": size, "rotated_fraction": share,
                "epsilon": epsilon, "seed": seed, "work_dir": run_dir}
    with open(os.path.join(run_dir, "settings.json"), "w") as f:
        json.dump(train_lib.settings_from(None, settings).to_json(), f)
    # Accuracy rises with epsilon and size; rotated images are harder.
    skill = (0.9 if math.isinf(epsilon) else 0.5) * (1.0 if size == 400 else 0.8)
    right = rng.random(len(labels)) < np.where(rotated, skill * (0.5 + share), skill)
    predicted = np.where(right, labels, (labels + 1) % 10)
    scores = np.full((len(labels), 10), 0.02)
    scores[np.arange(len(labels)), predicted] = 0.82
    private = not math.isinf(epsilon)
    arrays = {"scores_raw": scores, "labels": labels, "group_orientation": rotated.astype(int)}
    use = "ema" if private else "raw"
    if private:
        arrays["scores_ema"] = scores
    np.savez(os.path.join(run_dir, "predictions.npz"), **arrays)
    figures = {"accuracy": float(right.mean()), "groups": {"orientation": {
        name: {"count": int(mask.sum()), "accuracy": float(right[mask].mean()),
               "accuracy_low": 0.0, "accuracy_high": 1.0}
        for name, mask in (("upright", ~rotated), ("rotated", rotated))}}}
    result = {"privacy": {"private": private, "epsilon": epsilon if private else None,
                          "statement": "fake"},
              "settings": train_lib.settings_from(None, settings).to_json(),
              "data": {"multi_label": False, "num_train": size,
                       "groups": {"orientation": ["upright", "rotated"]}},
              "metrics": {"raw": figures, "ema": figures if private else None}}
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(train_lib._json_safe(result), f)
    if not private:
        model = inputs_lib.mlp((28, 28, 1), 10, hidden=(8,))
        dpf.make_non_private(model).save(os.path.join(run_dir, "model.keras"))
    return use


def _test_split(work_dir, seed=0):
    """(labels, rotated) of the test split that TEST_SETTINGS draw with `seed`."""
    run_data = inputs_lib.load_data(train_lib.settings_from(None, {
        **TEST_SETTINGS, "rotated_fraction": 0.1, "epsilon": 1.0, "seed": seed,
        "work_dir": work_dir}))
    elements = list(run_data.test.elements())
    labels = np.array([int(e["label"]) for e in elements])
    return labels, np.array([int(e["groups"]["orientation"]) == 1 for e in elements])


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory):
    sweep_dir = str(tmp_path_factory.mktemp("fake_sweep"))
    labels, rotated = _test_split(sweep_dir)
    rng = np.random.default_rng(0)
    grid = {"train_examples": list(SIZES), "epsilon": list(EPSILONS),
            "rotated_fraction": list(SHARES)}
    for name, values in sweep_lib.expand_grid(grid):
        _fake_run(os.path.join(sweep_dir, name), values["train_examples"],
                  values["epsilon"], values["rotated_fraction"], labels, rotated, rng)
    with open(os.path.join(sweep_dir, sweep_lib.SWEEP_FILE), "w") as f:
        json.dump({"axes": list(grid)}, f)
    return sweep_dir, labels, rotated


def test_heatmap_cells_links_and_run_pages(fake_sweep, tmp_path):
    sweep_dir, labels, rotated = fake_sweep
    table, keys = report_lib.load_sweep(sweep_dir)
    cells = explorable_lib.heatmap_cells(table).set_index("run")
    run = "train_examples=100__epsilon=1__rotated_fraction=0.3"
    saved = np.load(os.path.join(sweep_dir, run, "predictions.npz"))
    right = saved["scores_ema"].argmax(1) == labels
    assert cells.loc[run, "rare_accuracy"] == pytest.approx(right[rotated].mean())
    assert cells.loc[run, "gap"] == pytest.approx(right[~rotated].mean()
                                                  - right[rotated].mean())
    assert cells.loc[run, "epsilon"] == 1.0 and cells.loc[run, "weights"] == "ema"
    paths, lines = explorable_lib._heatmap_section(table, str(tmp_path),
                                                   ("orientation", "rotated", "upright"))
    text = "\n".join(lines)
    link = (f"[{right[rotated].mean():.3f} "
            f"({right[~rotated].mean() - right[rotated].mean():.3f})](runs/{run}.md)")
    assert link in text
    assert "**30% of training images rotated**" in text
    page = open(tmp_path / "runs" / f"{run}.md").read()
    assert f"| orientation | rotated | {rotated.sum()} | {right[rotated].mean():.3f}" in page
    assert os.path.getsize(paths["heatmap"]) > 10000


def test_write_explorable_on_a_fake_sweep(fake_sweep, tmp_path):
    sweep_dir, labels, rotated = fake_sweep
    table, keys = report_lib.load_sweep(sweep_dir)
    paths, lines = explorable_lib.write_explorable(
        sweep_dir, table, keys, str(tmp_path), projection="pca", count=2,
        facets={"train_examples": 100, "rotated_fraction": 0.3})
    text = "\n".join(lines)
    assert "Setting shown: **train_examples=100, rotated_fraction=0.3**" in text
    assert "held-out test images (not training data)" in text
    for name in ("sensitivity_grid", "sensitivity_projection", "per_class", "heatmap"):
        assert os.path.getsize(paths[name]) > 5000, name
    # The per-example sensitivity of the shown setting, worked out again.
    frame = pd.read_csv(paths["sensitivity"])
    right = {}
    for epsilon in ("1", "inf"):
        run = f"train_examples=100__epsilon={epsilon}__rotated_fraction=0.3"
        saved = np.load(os.path.join(sweep_dir, run, "predictions.npz"))
        right[epsilon] = saved["scores_raw"].argmax(1) == labels
    expected = np.where(right["inf"] & right["1"], "1",
                        np.where(right["inf"], "inf", "never"))
    column = "sensitivity (train_examples=100, rotated_fraction=0.3)"
    assert frame[column].astype(str).tolist() == expected.tolist()
    # Per-class accuracy: one panel per training-set size at the shown share.
    per_class = pd.read_csv(paths["per_class_csv"])
    assert sorted(per_class["train_examples"].unique()) == list(SIZES)
    saved = np.load(os.path.join(
        sweep_dir, "train_examples=400__epsilon=inf__rotated_fraction=0.3",
        "predictions.npz"))
    row = per_class[(per_class["train_examples"] == 400)
                    & (per_class["epsilon"] == "non-private")].iloc[0]
    seven = labels == 7
    assert row["7"] == pytest.approx(np.mean(saved["scores_raw"][seven].argmax(1) == 7))


def test_no_explorable_figures_without_an_epsilon_axis(fake_sweep, tmp_path):
    sweep_dir, _, _ = fake_sweep
    table, keys = report_lib.load_sweep(sweep_dir)
    one_epsilon = table[table["privacy.private"].astype(bool)]
    assert explorable_lib.write_explorable(sweep_dir, one_epsilon, keys,
                                           str(tmp_path)) == ({}, [])
    with pytest.raises(ValueError, match="No runs with"):
        explorable_lib.write_explorable(sweep_dir, table, keys, str(tmp_path),
                                        projection="pca", facets={"train_examples": 7})


# ------------------------------------------- runs on different test splits

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    """Runs at two seeds, each scoring its own test split: with test_examples=40
    and test_rotated_fraction=0.5, the seed draws other digits and rotates
    others."""
    sweep_dir = str(tmp_path_factory.mktemp("seed_sweep"))
    splits = {seed: _test_split(sweep_dir, seed) for seed in SEEDS}
    rng = np.random.default_rng(1)
    grid = {"epsilon": list(EPSILONS), "seed": list(SEEDS), "rotated_fraction": list(SHARES)}
    for name, values in sweep_lib.expand_grid(grid):
        _fake_run(os.path.join(sweep_dir, name), 100, values["epsilon"],
                  values["rotated_fraction"], *splits[values["seed"]], rng,
                  seed=values["seed"])
    with open(os.path.join(sweep_dir, sweep_lib.SWEEP_FILE), "w") as f:
        json.dump({"axes": list(grid)}, f)
    return sweep_dir, splits


def _right(sweep_dir, run, labels):
    saved = np.load(os.path.join(sweep_dir, run, "predictions.npz"))
    return saved["scores_raw"].argmax(1) == labels


def test_write_explorable_with_a_test_split_per_seed(seed_sweep, tmp_path):
    # Failed before with "evaluated on other test examples than the first run".
    sweep_dir, splits = seed_sweep
    assert not np.array_equal(splits[0][0], splits[1][0])  # Two test splits indeed.
    table, keys = report_lib.load_sweep(sweep_dir)
    paths, lines = explorable_lib.write_explorable(
        sweep_dir, table, keys, str(tmp_path), projection="pca", count=2,
        facets={"rotated_fraction": 0.3})
    text = "\n".join(lines)
    assert "The runs scored 2 different test splits (seed=0; seed=1)" in text
    assert "of the split **seed=0** only" in text
    for name in ("sensitivity_grid", "sensitivity_projection", "per_class", "heatmap"):
        assert os.path.getsize(paths[name]) > 5000, name
    # Each split's sensitivity from its own runs only, by hand.
    frame = pd.read_csv(paths["sensitivity"], keep_default_na=False)
    for seed, (labels, rotated) in splits.items():
        rows = frame[frame["test_split"] == f"seed={seed}"]
        assert rows["test_index"].tolist() == list(range(len(labels)))
        assert rows["label"].tolist() == labels.tolist()
        assert rows["group_orientation"].tolist() == rotated.astype(int).tolist()
        right = {e: _right(sweep_dir, f"epsilon={e}__seed={seed}__rotated_fraction=0.3",
                           labels) for e in ("1", "inf")}
        expected = np.where(right["inf"] & right["1"], "1",
                            np.where(right["inf"], "inf", "never"))
        assert rows["sensitivity (rotated_fraction=0.3)"].tolist() == expected.tolist()
    # Per-class accuracy: every run, each on the labels it scored.
    per_class = pd.read_csv(paths["per_class_csv"]).set_index("run")
    run = "epsilon=inf__seed=1__rotated_fraction=0.3"
    labels = splits[1][0]
    common = int(np.bincount(labels).argmax())
    assert per_class.loc[run, str(common)] == pytest.approx(
        _right(sweep_dir, run, labels)[labels == common].mean())
    assert len(per_class) == len(table)
    # The heatmap cell of the two seeds: the mean of their figures, both linked.
    cells = explorable_lib.heatmap_cells(table)
    cell = cells[(cells["epsilon"] == 1.0) & (cells["rotated_fraction"] == 0.3)]
    assert sorted(cell["seed"]) == list(SEEDS)
    assert (f"{cell['rare_accuracy'].mean():.3f} ({cell['gap'].mean():.3f}): "
            "[seed 0](runs/epsilon=1__seed=0__rotated_fraction=0.3.md), "
            "[seed 1](runs/epsilon=1__seed=1__rotated_fraction=0.3.md)") in text


def _predictions(labels, rotated):
    labels = np.asarray(labels)
    return explorable_lib.RunPredictions(np.eye(3)[labels], labels,
                                         {"orientation": np.asarray(rotated)})


def test_runs_share_a_test_split_when_examples_and_drawing_settings_agree():
    same, other = ([0, 1, 2, 1], [0, 0, 1, 1]), ([0, 1, 2, 2], [0, 0, 1, 1])
    table = pd.DataFrame({
        "run": ["a", "b", "c", "d", "e", "f"],
        "settings.seed": [0, 1, 0, 1, 0, 0],
        "settings.test_examples": [0, 0, 4, 4, 0, 0],
        "settings.rotated_fraction": [0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
        "settings.test_rotated_fraction": [None, None, None, None, None, None]})
    predictions = {run: _predictions(*same) for run in "abcdf"}
    predictions["e"] = _predictions(*other)
    splits = explorable_lib.group_by_test_split(table, predictions)
    # a, b: the whole test split, unrotated: the seed draws nothing. c, d: the
    # seed draws a subset (same arrays by chance). e: other labels. f: the
    # training share rotates test images too (test_rotated_fraction unset).
    assert [runs for _, runs in splits] == [["a", "b"], ["c"], ["d"], ["e"], ["f"]]
    assert len({name for name, _ in splits}) == 5
    one = explorable_lib.group_by_test_split(table.iloc[:2], predictions)
    assert one == [("", ["a", "b"])]


def test_test_images_must_be_the_split_the_run_scored(fake_sweep):
    sweep_dir, labels, _ = fake_sweep
    run_dir = os.path.join(sweep_dir, "train_examples=100__epsilon=inf__rotated_fraction=0.1")
    images, _ = explorable_lib.load_test_images(run_dir, expected_labels=labels)
    assert len(images) == len(labels)
    with pytest.raises(ValueError, match="is not the one its predictions.npz scored"):
        explorable_lib.load_test_images(run_dir, expected_labels=labels[::-1])


@pytest.mark.slow
def test_umap_projection_of_separated_clusters():
    pytest.importorskip("umap")  # the optional extra "explorable"
    rng = np.random.default_rng(1)
    centres = np.repeat(np.eye(2, 16) * 20, 100, axis=0)
    points, method = explorable_lib.project(centres + rng.normal(size=(200, 16)), "umap")
    assert method.startswith("UMAP")
    # The two clusters stay apart: their centroids are farther apart than
    # either cluster is wide.
    a, b = points[:100], points[100:]
    spread = max(a.std(0).max(), b.std(0).max())
    assert np.linalg.norm(a.mean(0) - b.mean(0)) > 3 * spread


def test_embeddings_of_a_fine_tuning_model_come_from_its_nested_head(tmp_path):
    # The shape of models.efficientnet_lite0_finetune: an input adapter and a
    # nested backbone whose own input is named like the outer one, the head
    # at the end of the nested model. Cutting the outer graph at the head's
    # input failed in Keras ('The name "image" is used 2 times').
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4, 4, 1), name="image")
    features = keras.layers.Dense(3, activation="relu", name="features")(
        keras.layers.Flatten()(inner_in))
    backbone = keras.Model(inner_in, keras.layers.Dense(2, name="head")(features))
    outer_in = keras.Input((4, 4, 1), name="image")
    adapter = keras.Sequential([keras.layers.Rescaling(2.0)], name="adapter")
    model = keras.Model(outer_in, backbone(adapter(outer_in)))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 1)).astype(np.uint8)
    got = explorable_lib.penultimate_embeddings(str(run_dir), images, batch_size=2)
    flat = (images.astype(np.float32) / 255.0 * 2.0).reshape(5, 16)
    layer = backbone.get_layer("features")
    kernel, bias = (np.asarray(w) for w in layer.weights)
    np.testing.assert_allclose(got, np.maximum(flat @ kernel + bias, 0.0), rtol=1e-5, atol=1e-6)
    assert "call" not in vars(backbone.get_layer("head"))  # The class's call again.
