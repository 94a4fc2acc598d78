"""Per-group training diagnostics: exact against numpy, and no effect on the update."""

import collections
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.training import diagnostics

from conftest import mirrored_strategy

GROUPS = {"sex": ["female", "male"], "age": ["young", "middle", "old"]}
N, D, C = 12, 3, 1.0


def batch_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype("float32") * np.linspace(0.2, 3, N)[:, None]
    y = rng.normal(size=(N, 1)).astype("float32")
    groups = {"sex": np.array([0, 1] * 6, np.int32),
              "age": np.array([0, 1, 2, 2] * 3, np.int32)}
    weights = np.ones(N, np.float32)
    weights[-1] = 0.0  # padding row: outside every figure
    return x, y, groups, weights


def dataset(x, y, groups, weights):
    return tf.data.Dataset.from_tensors(
        (x, {"label": y, "groups": groups}, weights)).repeat()


def linear_model(noise=0.0, clipping="vectorized", microbatch=4, seed=0):
    config = dpf.DPConfig(l2_norm_clip=C, noise_multiplier=noise,
                          expected_batch_size=N, microbatch_size=microbatch,
                          clipping=clipping, seed=seed)
    inputs = keras.Input((D,))
    dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.RandomNormal(seed=1),
                               bias_initializer=keras.initializers.Constant(0.3))
    model = dpf.DPModel(inputs=inputs, outputs=dense(inputs), dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    return model


def numpy_figures(model, x, y, groups, weights):
    """Per-example gradients of the squared error of a linear model, by hand."""
    w = model.trainable_variables[0].numpy()[:, 0]
    b = float(model.trainable_variables[1].numpy()[0])
    residual = x @ w + b - y[:, 0]
    grads = np.concatenate([2 * residual[:, None] * x, 2 * residual[:, None]], 1)
    norms = np.linalg.norm(grads, axis=1)
    factor = np.minimum(1.0, C / norms)
    real = weights > 0
    return grads, norms, factor, residual ** 2, real


def test_per_group_figures_are_exact(capsys):
    x, y, groups, weights = batch_data()
    model = linear_model()
    grads, norms, factor, losses, real = numpy_figures(model, x, y, groups, weights)
    diag = diagnostics.GroupDiagnostics(GROUPS, alignment=True)
    history = model.fit(dataset(x, y, groups, weights), steps_per_epoch=1,
                        epochs=1, verbose=0, callbacks=[diag])
    logs = {k: v[-1] for k, v in history.history.items()}
    clipped_sum = (weights * factor)[:, None] * grads
    total = clipped_sum.sum(0)
    for attribute, names in GROUPS.items():
        for gid, name in enumerate(names):
            member = real & (groups[attribute] == gid)
            key = f"train_diagnostics/{attribute}/{name}/"
            assert logs[key + "examples"] == member.sum()
            assert logs[key + "example_share"] == pytest.approx(member.sum() / real.sum())
            assert logs[key + "clip_fraction"] == pytest.approx(
                np.mean(norms[member] > C))
            assert logs[key + "grad_norm_mean"] == pytest.approx(
                norms[member].mean(), rel=1e-5)
            assert logs[key + "loss"] == pytest.approx(losses[member].mean(), rel=1e-5)
            # A histogram quantile is exact to within one bin.
            step = 10 ** (1 / diagnostics.BINS_PER_DECADE)
            median = np.quantile(norms[member], 0.5, method="inverted_cdf")
            assert median / step <= logs[key + "grad_norm_p50"] <= median * step
            part = clipped_sum[member].sum(0)
            assert logs[key + "clipped_sum_share"] == pytest.approx(
                part @ total / (total @ total), rel=1e-4)
            unclipped = (weights[member, None] * grads[member]).sum(0)
            cosine = unclipped @ total / (np.linalg.norm(unclipped) * np.linalg.norm(total))
            assert logs[key + "update_cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-6)
        shares = [logs[f"train_diagnostics/{attribute}/{n}/clipped_sum_share"]
                  for n in names]
        assert sum(shares) == pytest.approx(1.0, rel=1e-5)
    assert logs["train_diagnostics/clip_fraction"] == pytest.approx(np.mean(norms[real] > C))
    unclipped = (weights[:, None] * grads).sum(0)
    assert logs["train_diagnostics/update_cosine"] == pytest.approx(
        unclipped @ total / (np.linalg.norm(unclipped) * np.linalg.norm(total)), rel=1e-4)


def dropout_cnn(clipping, seed=0):
    config = dpf.DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0,
                          expected_batch_size=N, microbatch_size=4,
                          clipping=clipping, seed=7)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.Dropout(0.3, seed=3)(keras.layers.Flatten()(h))
    model = dpf.DPModel(inputs=inputs, outputs=keras.layers.Dense(3)(h),
                        dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def image_data():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(N, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, N)
    _, _, groups, weights = batch_data()
    return x, y, groups, weights


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
def test_diagnostics_and_group_ids_never_change_the_update(clipping):
    x, y, groups, weights = image_data()
    permuted = {k: np.random.default_rng(5).permutation(v) for k, v in groups.items()}
    results = []
    for diag, ids in ((None, groups), (diagnostics.GroupDiagnostics(GROUPS), groups),
                      (diagnostics.GroupDiagnostics(GROUPS, alignment=True), groups),
                      (diagnostics.GroupDiagnostics(GROUPS, alignment=True), permuted)):
        model = dropout_cnn(clipping)
        model.fit(dataset(x, y, ids, weights), steps_per_epoch=3, epochs=1, verbose=0,
                  callbacks=[diag] if diag else [])
        results.append([v.numpy() for v in model.weights])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_two_replicas_sum_like_one():
    x, y, groups, weights = batch_data()
    one = diagnostics.GroupDiagnostics(GROUPS, alignment=True)
    history = linear_model(microbatch=2).fit(dataset(x, y, groups, weights),
                                             steps_per_epoch=1, verbose=0, callbacks=[one])
    with mirrored_strategy().scope():
        model = linear_model(microbatch=2)
    two = diagnostics.GroupDiagnostics(GROUPS, alignment=True)
    history2 = model.fit(dataset(x, y, groups, weights), steps_per_epoch=1, verbose=0,
                         callbacks=[two])
    for key, value in history.history.items():
        if key.startswith("train_diagnostics/"):
            got = history2.history[key][-1]
            if math.isnan(value[-1]):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(value[-1], rel=1e-4, abs=1e-6), key


def test_epochs_are_reset_and_figures_named_as_training_diagnostics():
    x, y, groups, weights = batch_data()
    diag = diagnostics.GroupDiagnostics(GROUPS)
    history = linear_model().fit(dataset(x, y, groups, weights), steps_per_epoch=2,
                                 epochs=2, verbose=0, callbacks=[diag])
    assert history.history["train_diagnostics/sex/female/examples"] == [12.0, 12.0]
    assert not any(k.startswith("train_diagnostics/") and "update_cosine" in k
                   for k in history.history)


def test_batches_without_groups_are_refused_with_the_fix():
    x, y, _, weights = batch_data()
    data = tf.data.Dataset.from_tensors((x, y, weights)).repeat()
    with pytest.raises(ValueError, match=r"with_groups=True"):
        linear_model().fit(data, steps_per_epoch=1, verbose=0,
                           callbacks=[diagnostics.GroupDiagnostics(GROUPS)])


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one group attribute"):
        diagnostics.GroupDiagnostics({})
    x, y, groups, weights = batch_data()
    with pytest.raises(ValueError, match="one GroupDiagnostics callback"):
        linear_model().fit(dataset(x, y, groups, weights), steps_per_epoch=1, verbose=0,
                           callbacks=[diagnostics.GroupDiagnostics(GROUPS),
                                      diagnostics.GroupDiagnostics(GROUPS)])


def test_histogram_quantiles_by_hand():
    counts = np.zeros(diagnostics.NUM_BINS)
    # bin of norm == C: log10(1) = 0 -> index (0 - LOW_DECADE) * BINS_PER_DECADE
    index = -diagnostics.LOW_DECADE * diagnostics.BINS_PER_DECADE
    counts[index] = 4
    assert diagnostics.histogram_quantile(counts, 0.5, 2.0) == pytest.approx(
        2.0 * 10 ** (0.5 / diagnostics.BINS_PER_DECADE))
    assert math.isnan(diagnostics.histogram_quantile(np.zeros(3), 0.5, 1.0))
    bins = diagnostics.histogram_bins(tf.constant([0.0, 1.0, 1e9]), 1.0).numpy()
    assert bins.tolist() == [0, index, diagnostics.NUM_BINS - 1]


def test_dashboard_writes_diagnostics_to_their_own_run_with_a_category(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tf_dpfair.dashboards import callback as dashboards

    x, y, groups, weights = batch_data()
    history = linear_model().fit(
        dataset(x, y, groups, weights), steps_per_epoch=1, epochs=2, verbose=0,
        callbacks=[diagnostics.GroupDiagnostics(GROUPS),
                   dashboards.FairnessDashboard(str(tmp_path))])
    run = event_accumulator.EventAccumulator(
        str(tmp_path / dashboards.DIAGNOSTICS_RUN), size_guidance={"tensors": 0})
    run.Reload()
    tag = "train_diagnostics/sex/female/clip_fraction"
    written = [float(tf.make_ndarray(e.tensor_proto)) for e in run.Tensors(tag)]
    assert written == pytest.approx(history.history[tag])
    assert [e.step for e in run.Tensors(tag)] == [1, 2]  # updates so far
    fairness = event_accumulator.EventAccumulator(
        str(tmp_path / dashboards.FAIRNESS_RUN), size_guidance={"tensors": 0})
    fairness.Reload()
    raw = fairness.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = [c.title for c in layout.category]
    assert "training diagnostics by sex (outside the DP guarantee)" in titles
    assert "training diagnostics by age (outside the DP guarantee)" in titles


def test_dashboard_writes_no_training_group_figures_without_diagnostics(tmp_path):
    from tf_dpfair.dashboards import callback as dashboards

    x, y, groups, weights = batch_data()
    linear_model().fit(dataset(x, y, groups, weights), steps_per_epoch=1, verbose=0,
                       callbacks=[dashboards.FairnessDashboard(str(tmp_path))])
    assert not (tmp_path / dashboards.DIAGNOSTICS_RUN).exists()


def _recorded_steps(model):
    """Makes `model` record each trace of its `train_step`: (graph, group ids).

    `fit` traces `train_step` inside the train function it runs, so the last
    record after a `fit` is the step that `fit` trained with.
    """
    records = []
    step = model.train_step

    def recording(data):
        groups = data[1]["groups"]
        records.append((tf.compat.v1.get_default_graph(), tf.nest.flatten(groups)))
        return step(data)

    model.train_step = recording
    return records


def _op_types(graph):
    """The multiset of op types in `graph` and the functions it calls
    (the micro-batch while loop's body among them)."""
    definition = graph.as_graph_def()
    types = collections.Counter(node.op for node in definition.node)
    for function in definition.library.function:
        types.update(node.op for node in function.node_def)
    return types


def _captures(graph, diag):
    """How many of `diag`'s accumulators `graph` captures."""
    handles = {id(v.handle) for v in diag._state.values()}
    return sum(id(t) in handles for t in graph.external_captures)


def _read(ids):
    """Whether any op of the step reads the group ids."""
    return any(t.consumers() for t in ids)


@pytest.mark.parametrize("clipping", ["vectorized", "ghost"])
@pytest.mark.parametrize("alignment", [False, True])
def test_diagnostics_leave_nothing_in_the_step_when_off(clipping, alignment,
                                                        monkeypatch):
    # Free when off, without timing. A step traced without diagnostics calls
    # no diagnostics code and never reads the group ids; after a fit with
    # them, the next fit without them runs a step with exactly the ops of one
    # never given them (nothing left behind, not even a dead branch); the
    # step with them has more.
    calls = collections.Counter()
    for owner, name in ((diagnostics, "histogram_bins"),
                        (diagnostics, "weighted_gradient_sums"),
                        *((diagnostics.GroupDiagnostics, method) for method in (
                            "check_groups", "update_examples", "coefficients",
                            "update_alignment"))):
        def counted(*args, _fn=getattr(owner, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    x, y, groups, weights = image_data()
    data = dataset(x, y, groups, weights)
    never = dropout_cnn(clipping)
    never_steps = _recorded_steps(never)
    never.fit(data, steps_per_epoch=1, verbose=0)
    assert not calls
    model = dropout_cnn(clipping)
    steps = _recorded_steps(model)
    diag = diagnostics.GroupDiagnostics(GROUPS, alignment=alignment)
    model.fit(data, steps_per_epoch=1, verbose=0, callbacks=[diag])
    on, on_ids = steps[-1]
    assert calls["update_examples"] and bool(calls["coefficients"]) == alignment
    calls.clear()
    model.fit(data, steps_per_epoch=1, verbose=0)
    off, off_ids = steps[-1]
    assert off is not on  # retraced without them
    assert not calls
    assert not _read(off_ids) and not _read(never_steps[-1][1]) and _read(on_ids)
    baseline = _op_types(never_steps[-1][0])
    assert _op_types(off) == baseline
    assert _captures(off, diag) == 0
    with_diag = _op_types(on)
    assert not baseline - with_diag
    assert with_diag["UnsortedSegmentSum"] > baseline["UnsortedSegmentSum"]
    assert _captures(on, diag) == len(diag._state)
    if alignment:
        # The alignment sums' own inference-mode forward pass.
        assert with_diag["Conv2D"] > baseline["Conv2D"]


def test_weighted_gradient_sums_give_zeros_for_an_unused_weight():
    used = keras.Variable(np.array([1.0, 2.0], np.float32))
    unused = keras.Variable(np.ones((3, 2), np.float32))
    x = tf.constant([[1.0, 0.0], [0.5, -1.0]])
    coefficients = tf.constant([[1.0, 0.0], [0.5, 0.5]])
    sums = diagnostics.weighted_gradient_sums(
        lambda: tf.linalg.matvec(x, used.value) ** 2, [used, unused], coefficients)
    # d/dw (x_i . w)^2 = 2 (x_i . w) x_i: example 0 gives [2, 0], example 1
    # gives 2 * (-1.5) * [0.5, -1] = [-1.5, 3].
    np.testing.assert_allclose(sums[0].numpy(), [[2.0, 0.0], [0.25, 1.5]], atol=1e-6)
    assert sums[1].shape == (2, 3, 2) and not np.any(sums[1].numpy())
