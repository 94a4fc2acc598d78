"""Error rates and calibration on the TensorBoard dashboards (event files read back)."""

import glob
import os

import fairlearn.metrics
import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import tf_dpfair as dpf
from tf_dpfair.dashboards import rates as dashboard_rates
from tf_dpfair.dashboards import callback as dashboards
from tf_dpfair.fairness import rates as error_rates
from tf_dpfair.fairness.streaming_auc import GroupedAUC
from tf_dpfair.fairness.streaming_rates import GroupedErrorRates

SEX = {"sex": ["male", "female"]}


def _read(run_dir):
    """(scalars {tag: [(step, value)]}, image tags, layout dict) of one run's events."""
    accumulator = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
    accumulator.Reload()
    scalars, images, layout = {}, set(), None
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        array = tf.make_ndarray(events[-1].tensor_proto)
        if tag == "custom_scalars__config__":
            proto = layout_pb2.Layout()
            proto.ParseFromString(array.item() if array.ndim == 0 else array[0])
            layout = json_format.MessageToDict(proto)
        elif array.ndim == 0:
            scalars[tag] = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events]
        else:
            images.add(tag)
    return scalars, images, layout


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    sex = rng.integers(0, 2, size=n).astype(np.int32)
    noise = np.where(sex == 1, 2.0, 0.3)
    y = ((x[:, 0] + noise * rng.normal(size=n)) > 0).astype(np.float32)[:, None]
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"label": y, "groups": {"sex": sex}})).batch(100)
    return x, y, sex, dataset


def _fixed_model(outputs, metrics, loss):
    """A DPModel whose first logit is x0 (learning rate 0: it never changes)."""
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=100,
                          microbatch_size=50)
    inputs = keras.Input((4,))
    kernel = np.zeros((4, outputs), np.float32)
    kernel[0, 0] = 1.0
    logits = keras.layers.Dense(outputs, kernel_initializer=keras.initializers.Constant(kernel),
                                bias_initializer="zeros")(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=logits, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss, metrics=metrics)
    return model


def test_layout_categories_pick_each_attributes_tags():
    categories = dashboard_rates.layout_categories({"sex": ["male", "female"]}, with_ci=True)
    assert [c.title for c in categories] == ["error rates by sex"]
    regexes = {c.title: c.multiline.tag[0] for c in categories[0].chart
               if c.HasField("multiline")}
    assert regexes["sex: TPR of each group"] == "^tpr/sex/[^/]+$"
    margins = [c for c in categories[0].chart if c.HasField("margin")]
    assert [s.value for s in margins[0].margin.series] == ["ci/rates/tpr/sex/male",
                                                           "ci/rates/tpr/sex/female"]
    assert margins[0].margin.series[0].upper == "ci/rates/tpr/sex/male/upper"
    for name in ("tpr", "tpr/sex/male", "tpr_gap/sex", "equalized_odds/sex", "top1_error",
                 "top1_error_gap/sex", "selection_rate/sex/male"):
        assert dashboard_rates.is_rate_log(name), name
    assert not dashboard_rates.is_rate_log("auc/sex/male")
    layout = dashboards.dashboard_layout({"sex": ["male", "female"]})
    assert "error rates by sex" not in [c.title for c in layout.category]


def test_binary_fit_writes_streaming_and_exact_rates(tmp_path):
    x, y, sex, dataset = _data()
    model = _fixed_model(1, [GroupedAUC(SEX, from_logits=True),
                             GroupedErrorRates(SEX, from_logits=True)],
                         keras.losses.BinaryCrossentropy(from_logits=True))
    dashboard = dashboards.FairnessDashboard(
        str(tmp_path), evaluation_data=dataset, group_names=SEX, threshold=0.5,
        from_logits=True, n_bootstrap=30)
    with pytest.warns(UserWarning, match="PrivacyLogger"):
        history = model.fit(dataset, epochs=2, verbose=0, validation_data=dataset,
                            callbacks=[dashboard])
    scalars, images, layout = _read(os.path.join(tmp_path, dashboards.FAIRNESS_RUN))
    # Streaming figures: the metric's epoch logs, at steps 4 and 8 (updates).
    for tag in ("tpr/sex/female", "fpr/sex/male", "equalized_odds/sex", "tpr_gap/sex"):
        assert [s for s, _ in scalars[tag]] == [4, 8]
        assert [v for _, v in scalars[tag]] == pytest.approx(history.history["val_" + tag])
    # Exact figures of the fixed model: decisions x0 >= 0 (sigmoid >= 0.5).
    decisions = (x[:, 0] >= 0).astype(int)
    female = sex == 1
    assert scalars["ci/rates/tpr/sex/female"][-1][1] == pytest.approx(
        fairlearn.metrics.true_positive_rate(y[female, 0], decisions[female]))
    assert scalars["ci/rates/equalized_odds_difference/sex"][-1][1] == pytest.approx(
        fairlearn.metrics.equalized_odds_difference(y[:, 0], decisions, sensitive_features=sex))
    probabilities = 1 / (1 + np.exp(-x[:, 0]))
    expected = error_rates.evaluate(y[:, 0], probabilities, {"sex": sex}, threshold=0.5,
                                    group_names=SEX, n_bootstrap=0)
    ece = expected.groups.set_index("group").loc["male", "ece"]
    assert scalars["ci/rates/ece/sex/male"][-1][1] == pytest.approx(ece, abs=1e-6)
    low, high = (scalars["ci/rates/ece/sex/male/lower"][-1][1],
                 scalars["ci/rates/ece/sex/male/upper"][-1][1])
    assert low < high
    assert "error_rates_by_group/sex" in images and "auc_by_group/sex" in images
    titles = [c["title"] for c in layout["category"]]
    assert titles == ["AUC by sex", "error rates by sex", "privacy"]


def test_exact_evaluation_needs_no_streaming_metric_and_says_nothing_of_one(tmp_path):
    # With evaluation_data the dashboard computes per-group figures itself;
    # the advice to compile GroupedAUC and pass validation_data does not apply.
    _, _, _, dataset = _data()
    model = _fixed_model(1, None, keras.losses.BinaryCrossentropy(from_logits=True))
    dashboard = dashboards.FairnessDashboard(
        str(tmp_path), evaluation_data=dataset, group_names=SEX, threshold=0.5,
        from_logits=True, n_bootstrap=5)
    with pytest.warns(UserWarning) as caught:
        model.fit(dataset, epochs=1, verbose=0, callbacks=[dashboard])
    messages = [str(w.message) for w in caught if "FairnessDashboard" in str(w.message)]
    assert any("PrivacyLogger" in m for m in messages)  # The other checks still speak.
    assert not any("GroupedAUC" in m for m in messages), messages
    scalars, _, _ = _read(os.path.join(tmp_path, dashboards.FAIRNESS_RUN))
    assert "ci/rates/tpr/sex/female" in scalars


def test_multi_class_dashboard_writes_top1_figures(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    classes = rng.integers(0, 3, 300).astype(np.int32)
    x[:, 0] += (classes == 0) * 1.0  # class 0's logit is x0
    sex = rng.integers(0, 2, 300).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, {"label": classes, "groups": {"sex": sex}})).batch(100)
    model = _fixed_model(3, [GroupedErrorRates(SEX, threshold=None, label_names=["a", "b", "c"],
                                               multi_class=True)],
                         keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dashboard = dashboards.FairnessDashboard(
        str(tmp_path), evaluation_data=dataset, group_names=SEX, multi_class=True,
        from_logits=True, n_bootstrap=20)
    with pytest.warns(UserWarning):
        history = model.fit(dataset, epochs=1, verbose=0, validation_data=dataset,
                            callbacks=[dashboard])
    scalars, images, _ = _read(os.path.join(tmp_path, dashboards.FAIRNESS_RUN))
    # Logits (x0, 0, 0): the top-1 class is 0 when x0 > 0, else class 1 (first maximum).
    predicted = np.where(x[:, 0] > 0, 0, 1)
    for gid, name in enumerate(SEX["sex"]):
        rows = sex == gid
        error = np.mean(predicted[rows] != classes[rows])
        assert scalars[f"ci/rates/error/sex/{name}"][-1][1] == pytest.approx(error)
        assert scalars[f"top1_error/sex/{name}"][-1][1] == pytest.approx(error, abs=1e-6)
        assert history.history[f"val_top1_error/sex/{name}"][0] == pytest.approx(error,
                                                                                abs=1e-6)
    assert "ci/auc/sex/male" in scalars  # one-vs-rest AUC of class ids
    assert "error_rates_by_group/sex" in images


def test_bad_rate_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pass no threshold"):
        dashboards.FairnessDashboard(str(tmp_path), multi_class=True, threshold=0.5)
    with pytest.warns(UserWarning):
        rates = error_rates.evaluate([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8],
                                     {"sex": [0, 0, 1, 1]}, threshold=0.5, n_bootstrap=0,
                                     split="train")
    evaluation = dpf.fairness.auc.evaluate([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8],
                                       {"sex": [0, 0, 1, 1]}, n_bootstrap=0)
    with pytest.raises(ValueError, match="held-out data only"):
        dashboards.FairnessDashboard(str(tmp_path)).write_evaluation(evaluation, step=0,
                                                                     rates=rates)
    assert not glob.glob(os.path.join(tmp_path, "**", "*.tfevents*"), recursive=True)
