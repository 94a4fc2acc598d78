"""Tests of the TensorBoard dashboards, down to a real TensorBoard server."""

import re
import urllib.parse

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.dashboards import sweep as dashboard_sweep
from tf_dpfair.dashboards import callback as dashboards
from tf_dpfair.fairness import auc as fairness
from tf_dpfair.datasets import synthetic

from tf_dpfair.experiments import dashboard_lib

GROUPS = synthetic.GROUP_SPEC.to_dict()  # sex: male, female; age: 4 bands
TINY = dict(epochs=2, steps_per_epoch=2, num_train=256, num_eval=128, batch_size=64,
            n_bootstrap=20)


def _multiline_regexes(category):
    return {chart["title"]: chart["multiline"]["tag"][0]
            for chart in category["chart"] if "multiline" in chart}


# ------------------------------------------------------------- pure functions

def test_layout_has_a_category_per_attribute_whose_regexes_pick_its_groups():
    layout = dashboards.dashboard_layout({"sex": ["male", "female"], "age": ["0-39", "80+"]},
                                         with_ci=True)
    titles = [category.title for category in layout.category]
    assert titles == ["AUC by sex", "AUC by age", "privacy"]
    age = layout.category[1]
    groups, spread = (chart.multiline.tag[0] for chart in age.chart[:2])
    assert re.match(groups, "auc/age/80+") and re.match(groups, "auc/age/0-39")
    for other in ("auc/sex/male", "auc/Edema/age/80+", "ci/auc/age/80+", "auc/age/80+/x"):
        assert not re.match(groups, other), other
    assert re.match(spread, "auc_gap/age") and re.match(spread, "auc_worst/age")
    assert not re.match(spread, "auc_gap/Edema/age")
    bands = age.chart[2].margin.series
    assert [(s.value, s.lower, s.upper) for s in bands][1] == (
        "ci/auc/age/80+", "ci/auc/age/80+/lower", "ci/auc/age/80+/upper")
    assert "95% bootstrap band" in age.chart[2].title


def test_layout_without_intervals_has_no_margin_charts():
    layout = dashboards.dashboard_layout({"sex": ["male", "female"]})
    assert not any(chart.HasField("margin") for c in layout.category for chart in c.chart)


def test_layout_refuses_empty_groups():
    with pytest.raises(ValueError, match="must map each attribute"):
        dashboards.dashboard_layout({"sex": []})


def test_run_hparams_records_the_privacy_and_training_settings():
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=1.5, expected_batch_size=64,
                          augmult=2, ema_decay=0.999)
    inputs = keras.Input((3,))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs), dp_config=config)
    logger = dpf.callbacks.PrivacyLogger(num_examples=1000, delta=1e-4, target_epsilon=4.0)
    values = dashboards.run_hparams(model, logger, {"learning_rate": 0.1})
    assert values == {"private": True, "noise_multiplier": 1.5, "l2_norm_clip": 0.5,
                      "expected_batch_size": 64, "augmult": 2, "ema_decay": 0.999,
                      "delta": 1e-4, "target_epsilon": 4.0, "learning_rate": 0.1}
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert dashboards.run_hparams(plain) == {"private": False, "noise_multiplier": 0.0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(evaluation_data=tf.data.Dataset.range(1)), "evaluation_data needs group_names"),
    (dict(n_bootstrap=0), "n_bootstrap must be an integer >= 1"),
    (dict(confidence=1.0), r"confidence must lie in \(0, 1\)"),
    (dict(evaluate_every=0), "evaluate_every must be an integer >= 1"),
])
def test_bad_dashboard_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dashboards.FairnessDashboard(str(tmp_path), **kwargs)


def test_exact_evaluations_every_few_epochs_and_at_the_last(tmp_path, monkeypatch):
    board = dashboards.FairnessDashboard(
        str(tmp_path), evaluation_data=tf.data.Dataset.range(1),
        group_names={"g": ["a", "b"]}, evaluate_every=3)
    board.set_params({"epochs": 7})
    seen = []
    monkeypatch.setattr(board, "_writes", lambda: True)
    monkeypatch.setattr(board, "_step", lambda: 0)
    monkeypatch.setattr(board, "_evaluate", lambda ema: seen.append(ema) or (None, None))
    monkeypatch.setattr(board, "write_evaluation", lambda *a, **k: None)
    monkeypatch.setattr(board, "_write_layout", lambda *a, **k: None)
    monkeypatch.setattr(board, "_ema_on", lambda: False)
    evaluated = []
    for epoch in range(7):
        before = len(seen)
        board.on_epoch_end(epoch, {})
        if len(seen) > before:
            evaluated.append(epoch + 1)
    assert evaluated == [3, 6, 7]


def test_write_evaluation_refuses_training_data(tmp_path):
    with pytest.warns(UserWarning, match="outside the differential privacy guarantee"):
        evaluation = fairness.evaluate([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8],
                                       {"sex": [0, 0, 1, 1]}, n_bootstrap=0, split="train")
    with pytest.raises(ValueError, match="held-out data only"):
        dashboards.FairnessDashboard(str(tmp_path)).write_evaluation(evaluation, step=0)


def test_missing_sources_of_figures_are_reported_once(tmp_path):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4,
                          microbatch_size=4, ema_decay=0.9)
    inputs = keras.Input((2,))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(1)(inputs), dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((8, 2), np.float32), np.zeros((8, 1), np.float32)
    with pytest.warns(UserWarning) as caught:
        model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                  callbacks=[dashboards.FairnessDashboard(str(tmp_path))])
    messages = [str(w.message) for w in caught if "FairnessDashboard" in str(w.message)]
    assert len(messages) == 3
    assert any("GroupedAUC" in m for m in messages)
    assert any("EMAEvaluation before FairnessDashboard" in m for m in messages)
    assert any("PrivacyLogger before FairnessDashboard" in m for m in messages)


def test_plot_sweep_refuses_empty_or_incomplete_results():
    with pytest.raises(ValueError, match="results is empty"):
        dashboard_sweep.plot_sweep([], "sex")
    with pytest.raises(ValueError, match=r"lacks \['gap'\]"):
        dashboard_sweep.plot_sweep([{"private": True, "epsilon": 1.0, "auc": 0.8}], "sex")


def test_write_hparams_config_needs_dashboard_runs(tmp_path):
    with pytest.raises(ValueError, match="No FairnessDashboard runs"):
        dashboard_sweep.write_hparams_config(str(tmp_path))


# ------------------------------------------------------------- a real sweep in TensorBoard

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A private run (EMA on) and a non-private run (no EMA), compared."""
    root = tmp_path_factory.mktemp("sweep")
    private, _, _ = dashboard_lib.train_demo_run(str(root / "dp"), noise_multiplier=1.0, **TINY)
    public, _, _ = dashboard_lib.train_demo_run(str(root / "non_private"), noise_multiplier=0.0,
                                                ema_decay=None, **TINY)
    dashboard_sweep.write_hparams_config(str(root))
    results = dashboard_sweep.read_sweep(str(root), "sex")
    dashboard_sweep.write_sweep_comparison(str(root), results, "sex")
    return root, private.history, public.history, results


def test_read_sweep_gives_each_runs_final_figures(sweep):
    _, private, public, results = sweep
    by_name = {r["name"]: r for r in results}
    dp, non_private = by_name["dp"], by_name["non_private"]
    assert dp["private"] and dp["weights"] == "ema"
    assert dp["epsilon"] == pytest.approx(private["epsilon"][-1], rel=1e-6)
    assert dp["gap"] == pytest.approx(private["val_ema_auc_gap/sex"][-1], rel=1e-6)
    assert not non_private["private"] and non_private["epsilon"] == float("inf")
    assert non_private["weights"] == "current"
    assert non_private["auc"] == pytest.approx(public["val_auc"][-1], rel=1e-6)
    assert non_private["hparams"]["noise_multiplier"] == 0.0


def _scalars(url, run, tag):
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return dashboard_lib.fetch(f"{url}/data/plugin/scalars/scalars?{query}")


def _expected_tags(history, prefix):
    """GroupedAUC's names in the logs (per label too), as the dashboard's tags."""
    return {key[len(prefix):] for key in history if key.startswith(prefix + "auc")}


def _everything_loaded(url, wanted):
    """Whether TensorBoard has read every wanted tag and the HParams config."""
    tags = dashboard_lib.fetch(url + "/data/plugin/scalars/tags")
    images = dashboard_lib.fetch(url + "/data/plugin/images/tags")
    experiment = dashboard_lib.fetch(url + "/data/plugin/hparams/experiment",
                                     {"experimentName": ""})
    return (all(tag_set <= set(tags.get(run, {})) for run, tag_set in wanted.items())
            and "gap_vs_auc/sex" in images.get("sweep_comparison", {})
            and experiment.get("hparamInfos"))


def test_tensorboard_serves_layout_scalars_hparams_and_images(sweep):
    root, private, public, _ = sweep
    runs = (("dp/fairness", "val_", private), ("dp/fairness_ema", "val_ema_", private),
            ("non_private/fairness", "val_", public))
    wanted = {run: _expected_tags(history, prefix) for run, prefix, history in runs}
    with dashboard_lib.tensorboard_server(str(root)) as url:
        dashboard_lib.wait_for(lambda: _everything_loaded(url, wanted),
                               what="TensorBoard to load the sweep")

        layout = dashboard_lib.fetch(url + "/data/plugin/custom_scalars/layout")
        categories = {c["title"]: c for c in layout["category"]}
        assert set(categories) == {"AUC by sex", "AUC by age", "privacy"}
        assert _multiline_regexes(categories["AUC by sex"])["sex: AUC of each group"] == (
            "^auc/sex/[^/]+$")
        margins = [c["margin"]["series"] for c in categories["AUC by age"]["chart"]
                   if "margin" in c]
        assert {s["value"] for s in margins[0]} == {f"ci/auc/age/{g}" for g in GROUPS["age"]}
        assert "^privacy/auc_vs_epsilon_x1000$" in _multiline_regexes(
            categories["privacy"]).values()

        tags = dashboard_lib.fetch(url + "/data/plugin/scalars/tags")
        steps = [2, 4]  # optimizer updates at each epoch end
        for run, prefix, history in runs:
            group_tags = [f"auc/{a}/{g}" for a, names in GROUPS.items() for g in names]
            summaries = [f"auc_{kind}/{a}" for kind in ("gap", "worst") for a in GROUPS]
            assert set(group_tags + summaries) <= wanted[run]
            for tag in sorted(wanted[run]):
                points = _scalars(url, run, tag)
                assert [p[1] for p in points] == steps, (run, tag)
                # An undefined AUC (a group without positives) is NaN, served as "NaN".
                assert [float(p[2]) for p in points] == pytest.approx(
                    history[prefix + tag], rel=1e-6, nan_ok=True), (run, tag)
            for tag in group_tags + summaries:
                bands = {"ci/" + tag + suffix for suffix in ("", "/lower", "/upper")}
                assert bands <= set(tags[run]), (run, tag)
        epsilon = _scalars(url, "dp/fairness", dashboards.EPSILON_TAG)
        assert [p[2] for p in epsilon] == pytest.approx(private["epsilon"], rel=1e-6)
        versus = _scalars(url, "dp/fairness", dashboards.AUC_VS_EPSILON_TAG)
        assert [p[1] for p in versus] == [round(1000 * e) for e in private["epsilon"]]
        assert [p[2] for p in versus] == pytest.approx(private["val_auc"], rel=1e-6)
        assert dashboards.EPSILON_TAG not in tags["non_private/fairness"]
        assert [p[2] for p in _scalars(url, "non_private/fairness", dashboards.NOISE_TAG)] == [0, 0]

        experiment = dashboard_lib.fetch(url + "/data/plugin/hparams/experiment",
                                         {"experimentName": ""})
        hparam_names = {info["name"] for info in experiment["hparamInfos"]}
        assert {"private", "target_epsilon", "delta", "noise_multiplier", "l2_norm_clip",
                "expected_batch_size", "augmult", "ema_decay"} <= hparam_names
        groups = dashboard_lib.fetch(url + "/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"]})["sessionGroups"]
        sessions = {group["name"]: group for group in groups}
        assert set(sessions) == {"dp", "non_private"}
        dp = sessions["dp"]
        assert dp["hparams"]["private"] is True and dp["hparams"]["noise_multiplier"] == 1.0
        assert dp["hparams"]["target_epsilon"] == 20.0
        assert sessions["non_private"]["hparams"]["private"] is False
        metrics = {(m["name"]["group"], m["name"]["tag"]): m["value"] for m in dp["metricValues"]}
        for tag in ("auc", "auc_worst/sex", "auc_gap/sex", "auc_gap/age"):
            assert metrics[("fairness", tag)] == pytest.approx(private["val_" + tag][-1],
                                                                rel=1e-6)
            assert metrics[("fairness_ema", tag)] == pytest.approx(
                private["val_ema_" + tag][-1], rel=1e-6)
        assert metrics[("fairness", "privacy/epsilon")] == pytest.approx(private["epsilon"][-1])

        images = dashboard_lib.fetch(url + "/data/plugin/images/tags")
        for run in ("dp/fairness", "dp/fairness_ema", "non_private/fairness"):
            assert set(images[run]) == {"auc_by_group/sex", "auc_by_group/age"}, run
        assert "gap_vs_auc/sex" in images["sweep_comparison"]
        query = urllib.parse.urlencode({"run": "dp/fairness", "tag": "auc_by_group/sex"})
        samples = dashboard_lib.fetch(f"{url}/data/plugin/images/images?{query}")
        assert [sample["step"] for sample in samples] == steps
