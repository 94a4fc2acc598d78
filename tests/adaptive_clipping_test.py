"""Adaptive clipping thresholds: DPSGD-Global-Adapt and quantile (adaptive) clipping.

Each claim is checked against an independent computation: sensitivity on
random models and inputs, the update against numpy given the noise, the
statement against dp_accounting on the composed events, and the threshold's
update against its formula on a synthetic stream.
"""

import conftest
import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_accounting import rdp

import tf_dpfair as dpf
from tf_dpfair.data import pipeline
from tf_dpfair.data.source import ExampleSource
from tf_dpfair.dpsgd import adaptive
from tf_dpfair.dpsgd import noise

MODES = ("global_adapt", "quantile")


def adaptive_config(mode, **overrides):
    values = dict(l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=1,
                  microbatch_size=4, adaptive_clipping=mode, count_noise_multiplier=2.0,
                  seed=11)
    values.update(overrides)
    return dpf.DPConfig(**values)


def random_model(rng):
    """A small classifier of random kind, depth and width."""
    if rng.integers(2):
        shape = (5, 5, 2)
        x = keras.Input(shape)
        h = keras.layers.Conv2D(int(rng.integers(2, 5)), 3, activation="tanh")(x)
        h = keras.layers.Flatten()(h)
    else:
        shape = (int(rng.integers(3, 8)),)
        x = h = keras.Input(shape)
    for _ in range(int(rng.integers(0, 3))):
        h = keras.layers.Dense(int(rng.integers(2, 7)), activation="tanh")(h)
    return keras.Model(x, keras.layers.Dense(3)(h)), shape


def update_sum(base, config, x, y, w):
    """The clipped sum of one update (noise 0, SGD 1, B = 1: the weights move by -sum)."""
    model = dpf.make_private(base, config)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, sample_weight=w, batch_size=len(y), verbose=0)
    return np.concatenate([(b - v.numpy()).ravel()
                           for v, b in zip(model.trainable_variables, before)])


@pytest.mark.parametrize("mode", MODES)
def test_removing_any_example_moves_the_sum_by_at_most_the_clip_norm(mode):
    """Random models, inputs of wildly different scales, random thresholds."""
    rng = np.random.default_rng(30 + len(mode))
    worst = 0.0
    for trial in range(5):
        base, shape = random_model(rng)
        n = int(rng.integers(3, 9))
        x = rng.normal(size=(n, *shape)) * 10.0 ** rng.uniform(-2, 2, size=(n,) + (1,) * len(shape))
        x = x.astype(np.float32)
        y = rng.integers(0, 3, n)
        w = rng.uniform(0.1, 1.0, n).astype(np.float32)
        threshold = float(10.0 ** rng.uniform(-1.5, 1.5))
        clip = float(rng.uniform(0.3, 2.0))
        bound = threshold if mode == "quantile" else clip
        j = int(rng.integers(n))
        without = w.copy()
        without[j] = 0.0
        for clipping in ("vectorized", "ghost"):
            config = adaptive_config(mode, l2_norm_clip=clip, initial_threshold=threshold,
                                     microbatch_size=n, clipping=clipping)
            weights = base.get_weights()
            full = update_sum(base, config, x, y, w)
            base.set_weights(weights)
            rest = update_sum(base, config, x, y, without)
            base.set_weights(weights)
            moved = float(np.linalg.norm(full - rest))
            assert moved <= bound * (1 + 1e-4), (trial, clipping, moved, bound)
            worst = max(worst, moved / bound)
    assert worst > 0.05  # the examples did move the sum


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("mode", MODES)
def test_one_update_equals_the_papers_formula_given_the_noise(mode):
    rng = np.random.default_rng(5)
    n, d, k = 12, 4, 3
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 6.0, size=(n, 1))).astype(np.float32)
    y = rng.integers(0, k, n)
    kernel = rng.normal(size=(d, k)).astype(np.float32)
    bias = rng.normal(size=k).astype(np.float32)
    config = dpf.DPConfig(l2_norm_clip=0.8, noise_multiplier=0.9, expected_batch_size=10,
                          microbatch_size=4, adaptive_clipping=mode,
                          count_noise_multiplier=3.0, initial_threshold=1.7,
                          threshold_learning_rate=0.3, seed=4242)
    inputs = keras.Input((d,))
    outputs = keras.layers.Dense(k, kernel_initializer=keras.initializers.Constant(kernel),
                                 bias_initializer=keras.initializers.Constant(bias))(inputs)
    model = dpf.make_private(keras.Model(inputs, outputs), config)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=n, epochs=1, verbose=0)

    # By hand, in float64: per-example gradients of softmax cross-entropy.
    dz = softmax(x.astype(np.float64) @ kernel + bias) - np.eye(k)[y]
    gk = x[:, :, None].astype(np.float64) * dz[:, None, :]
    norms = np.sqrt((gk ** 2).sum(axis=(1, 2)) + (dz ** 2).sum(axis=1))
    threshold = 1.7
    if mode == "global_adapt":
        clip = 0.8
        factor = clip / np.maximum(norms, threshold)
    else:
        clip = threshold
        factor = np.minimum(1.0, clip / norms)
    sigma_g = (0.9 ** -2 - 3.0 ** -2) ** -0.5
    noise_k, noise_b = (z.numpy() for z in noise.gaussian_noise(
        [(d, k), (k,)], sigma_g * clip, 4242, tf.constant(0, tf.int64)))
    want_kernel = kernel - 0.5 * ((factor[:, None, None] * gk).sum(0) + noise_k) / 10
    want_bias = bias - 0.5 * ((factor[:, None] * dz).sum(0) + noise_b) / 10
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), want_kernel, atol=2e-5)
    np.testing.assert_allclose(model.trainable_variables[1].numpy(), want_bias, atol=2e-5)
    # The threshold follows the NOISY count of examples at or below it.
    count = float((norms <= threshold).sum())
    z = float(noise.count_noise(3.0, 4242, tf.constant(0, tf.int64)))
    assert abs(z) > 1e-3
    want = threshold * np.exp(-0.3 * ((count + z) / 10 - config.target_quantile))
    exact = threshold * np.exp(-0.3 * (count / 10 - config.target_quantile))
    got = float(model._clip_threshold.numpy())
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - exact) > 1e-4  # not the un-noised count


@pytest.mark.parametrize("mode", MODES)
def test_statement_is_dp_accountings_on_the_composed_events(mode):
    n, batch, steps = 64, 16, 5
    rng = np.random.default_rng(1)
    source = ExampleSource.from_arrays(rng.normal(size=(n, 3, 3, 1)).astype(np.float32),
                                       rng.integers(0, 3, n))
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.1, expected_batch_size=batch,
                          microbatch_size=8, adaptive_clipping=mode,
                          count_noise_multiplier=batch / 4)
    inputs = keras.Input((3, 3, 1))
    model = dpf.make_private(keras.Model(inputs, keras.layers.Dense(3)(
        keras.layers.Flatten()(inputs))), config)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = pipeline.make_train_dataset(source, expected_batch_size=batch, seed=3,
                                       microbatch_size=8, num_steps=steps)
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    got = model.privacy_ledger.statement(1e-5).epsilon
    # Computed directly: the sum and the count of the same Poisson sample.
    sigma_g = config.gradient_noise_multiplier
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        batch / n, dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(sigma_g),
            dp_accounting.GaussianDpEvent(config.count_noise_multiplier)])), steps)
    accountant = rdp.RdpAccountant()
    accountant.compose(event)
    assert got == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    # The count's share is paid by the sum: it gets more noise than sigma.
    assert sigma_g > 1.1


@pytest.mark.parametrize("sigma, sigma_b", [(0.6, 1.0), (1.1, 8.0), (2.0, 50.0)])
def test_noise_split_is_one_gaussian_of_the_stated_multiplier(sigma, sigma_b):
    config = adaptive_config("quantile", noise_multiplier=sigma, count_noise_multiplier=sigma_b)
    sigma_g = config.gradient_noise_multiplier
    assert sigma_g ** -2 + sigma_b ** -2 == pytest.approx(sigma ** -2)
    both, one = rdp.RdpAccountant(), rdp.RdpAccountant()
    both.compose(dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_g),
                                                dp_accounting.GaussianDpEvent(sigma_b)]))
    one.compose(dp_accounting.GaussianDpEvent(sigma))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_threshold_converges_to_the_target_share_without_noise(quantile):
    rng = np.random.default_rng(7)
    config = adaptive_config("global_adapt", target_quantile=quantile,
                             threshold_learning_rate=0.2)
    threshold = tf.constant(0.05)
    for _ in range(400):
        norms = rng.lognormal(mean=1.0, sigma=0.8, size=256)
        share = np.mean(norms <= float(threshold))
        threshold = adaptive.next_threshold(threshold, tf.constant(share, tf.float32), config)
    norms = rng.lognormal(mean=1.0, sigma=0.8, size=200_000)
    assert np.mean(norms <= float(threshold)) == pytest.approx(quantile, abs=0.03)
    assert float(threshold) == pytest.approx(np.quantile(norms, quantile), rel=0.1)


def test_count_noise_is_keyed_apart_from_the_gradient_noise():
    step = tf.constant(0, tf.int64)
    count = [float(noise.count_noise(1.0, seed, step)) for seed in (1, 2)]
    assert count[0] != count[1]  # depends on the secret seed
    later = float(noise.count_noise(1.0, 1, tf.constant(1, tf.int64)))
    assert later != count[0]  # never the same draw for two updates
    gradient = noise.gaussian_noise([(1,)], 1.0, 1, step)[0].numpy()[0]
    assert gradient != count[0]


def test_bad_settings_are_refused_with_reasons():
    with pytest.raises(ValueError, match="needs count_noise_multiplier"):
        dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8,
                     adaptive_clipping="global_adapt")
    with pytest.raises(ValueError, match="> noise_multiplier"):
        adaptive_config("quantile", noise_multiplier=2.0, count_noise_multiplier=1.5)
    with pytest.raises(ValueError, match="> 0 and > noise_multiplier"):
        adaptive_config("quantile", count_noise_multiplier=0.0)
    with pytest.raises(ValueError, match="one of"):
        adaptive_config("per_group")
    with pytest.raises(ValueError, match="need adaptive_clipping"):
        dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8,
                     count_noise_multiplier=3.0)
    with pytest.raises(ValueError, match="target_quantile"):
        adaptive_config("quantile", target_quantile=1.0)
    with pytest.raises(ValueError, match="initial_threshold"):
        adaptive_config("quantile", initial_threshold=-1.0)
    fixed = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=8)
    assert "adaptive" not in repr(fixed) and fixed.gradient_noise_multiplier == 1.0


def test_threshold_is_saved_and_restored_with_the_model(tmp_path):
    config = adaptive_config("global_adapt", expected_batch_size=8, microbatch_size=8)
    inputs = keras.Input((4,))
    model = dpf.make_private(keras.Model(inputs, keras.layers.Dense(3)(inputs)), config)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 4)).astype(np.float32), rng.integers(0, 3, 16),
              batch_size=8, verbose=0)
    trained = float(model._clip_threshold.numpy())
    assert trained != 1.0
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert float(loaded._clip_threshold.numpy()) == pytest.approx(trained)
    assert loaded.dp_config.adaptive_clipping == "global_adapt"


@pytest.mark.parametrize("mode", MODES)
def test_two_replicas_make_the_update_and_threshold_of_one(mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    kernel = rng.normal(size=(4, 3)).astype(np.float32)
    results = []
    for strategy in (None, conftest.mirrored_strategy()):
        scope = strategy.scope() if strategy else tf.init_scope()
        with scope:
            config = adaptive_config(mode, noise_multiplier=0.7, expected_batch_size=16,
                                     microbatch_size=4, count_noise_multiplier=4.0)
            inputs = keras.Input((4,))
            layer = keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(kernel))
            model = dpf.make_private(keras.Model(inputs, layer(inputs)), config)
            model.compile(optimizer=keras.optimizers.SGD(0.3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        results.append((model.trainable_variables[0].numpy(),
                         float(model._clip_threshold.numpy())))
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_train_runs_global_adapt_from_its_flags(tmp_path):
    """`tf-dpfair-train --adaptive_clipping=global_adapt`: the threshold is logged and
    the statement is that of the calibrated noise multiplier."""
    from experiment_fixtures import TINY
    from tf_dpfair.experiments import settings_lib, train_lib

    settings = settings_lib.settings_from(overrides={
        **TINY, "epsilon": 3.0, "adaptive_clipping": "global_adapt",
        "count_noise_multiplier": 25.0, "work_dir": str(tmp_path / "run")})
    result = train_lib.run(settings, verbose=0)
    assert 2.5 < result["privacy"]["epsilon"] <= 3.0
    split = result["privacy"]["adaptive_clipping"]
    sigma = result["privacy"]["noise_multiplier"]
    assert split["sum_noise_multiplier"] ** -2 + 25.0 ** -2 == pytest.approx(sigma ** -2)
    assert split["final_threshold"] > 0 and split["target_quantile"] == 0.9
    with open(tmp_path / "run" / "settings.json") as f:
        assert '"adaptive_clipping": "global_adapt"' in f.read()
    with pytest.raises(ValueError, match="clips nothing"):
        settings_lib.settings_from(overrides={**TINY, "non_private": True,
                                              "adaptive_clipping": "quantile"})
    with pytest.raises(ValueError, match="need adaptive_clipping"):
        settings_lib.settings_from(overrides={**TINY, "epsilon": 1.0,
                                              "count_noise_multiplier": 3.0})


@pytest.mark.parametrize("trial", range(4))
def test_group_diagnostics_use_the_updates_threshold(trial):
    """Per-group clip fractions count the examples above T_t, not above C."""
    from tf_dpfair.training import diagnostics

    rng = np.random.default_rng(8 + trial)
    keras.utils.set_random_seed(trial)
    n = 16
    x = (rng.normal(size=(n, 4)) * rng.uniform(0.05, 8.0, size=(n, 1))).astype(np.float32)
    y = rng.integers(0, 3, n)
    groups = rng.integers(0, 2, n).astype(np.int32)
    config = adaptive_config("global_adapt", expected_batch_size=n, microbatch_size=8,
                             initial_threshold=2.5, l2_norm_clip=0.5)
    inputs = keras.Input((4,))
    model = dpf.make_private(keras.Model(inputs, keras.layers.Dense(3)(inputs)), config)
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    spec = {"g": ("a", "b")}
    data = tf.data.Dataset.from_tensors((x, {"label": y, "groups": {"g": groups}}))
    history = model.fit(data, epochs=1, verbose=0,
                        callbacks=[diagnostics.GroupDiagnostics(spec, alignment=True)])
    logs = {k: v[-1] for k, v in history.history.items()}
    # By hand: softmax cross-entropy gradient norms of a linear model.
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    dz = softmax(x @ kernel + bias) - np.eye(3)[y]
    norms = np.sqrt((x ** 2).sum(1) * (dz ** 2).sum(1) + (dz ** 2).sum(1))
    for g, name in enumerate(spec["g"]):
        key = next(k for k in logs if k.endswith(f"g/{name}/clip_fraction"))
        assert logs[key] == pytest.approx(np.mean(norms[groups == g] > 2.5), abs=1e-6)


def test_dashboard_writes_the_threshold_over_training(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tf_dpfair.dashboards import layout, summaries

    config = adaptive_config("quantile", expected_batch_size=8, microbatch_size=8)
    inputs = keras.Input((4,))
    model = dpf.make_private(keras.Model(inputs, keras.layers.Dense(3)(inputs)), config)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    board = dpf.dashboards.FairnessDashboard(str(tmp_path))
    history = model.fit(rng.normal(size=(16, 4)).astype(np.float32), rng.integers(0, 3, 16),
                        batch_size=8, epochs=3, verbose=0, callbacks=[board])
    run = tmp_path / summaries.FAIRNESS_RUN
    events = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    written = [float(tf.make_ndarray(e.tensor_proto))
               for e in events.Tensors(summaries.THRESHOLD_TAG)]
    np.testing.assert_allclose(written, history.history["clip_threshold"], rtol=1e-6)
    charts = [c for c in layout.privacy_category().chart
              if summaries.THRESHOLD_TAG in c.multiline.tag[0]]
    assert len(charts) == 1


def test_a_crashed_run_resumes_to_the_uninterrupted_threshold_and_model(tmp_path):
    """Backups carry T: the resumed run ends where the uninterrupted one does."""
    import json
    import os

    from experiment_fixtures import TINY
    from sweep_test import InterruptAt
    from tf_dpfair.experiments import sweep_lib

    base = {**TINY, "adaptive_clipping": "global_adapt", "count_noise_multiplier": 25.0}
    grid = {"epsilon": [2.0]}
    crashed = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash at update 5"):
        sweep_lib.run_sweep(crashed, base=base, grid=grid, callbacks=[InterruptAt(5)],
                            verbose=0)
    sweep_lib.run_sweep(crashed, base=base, grid=grid, verbose=0)
    straight = str(tmp_path / "straight")
    sweep_lib.run_sweep(straight, base=base, grid=grid, verbose=0)
    results = []
    for folder in (crashed, straight):
        with open(os.path.join(folder, "epsilon=2", "result.json")) as f:
            results.append(json.load(f)["privacy"])
        with np.load(os.path.join(folder, "epsilon=2", "predictions.npz")) as saved:
            results.append(saved["scores_raw"])
    got, got_scores, want, want_scores = results
    assert got["adaptive_clipping"]["final_threshold"] == pytest.approx(
        want["adaptive_clipping"]["final_threshold"], rel=1e-5)
    assert got["adaptive_clipping"]["final_threshold"] != 1.0
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-6)
    assert got["steps"] == want["steps"] == 6
