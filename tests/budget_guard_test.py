"""BudgetGuard: stops before the budget, saves, says why; or refuses."""

import dp_accounting
import keras
import numpy as np
import pytest

import tf_dpfair as dpf

X = np.ones((50, 2), np.float32)
Y = np.zeros((50, 1), np.float32)


def make_model(noise=1.0):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=10, microbatch_size=5)
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1)(inputs)
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer="sgd", loss="mse")
    return model


def eps(steps):
    """Epsilon after `steps` updates on the arrays: Keras' shuffled batches of
    10 from 50 examples, a new pass every 5 updates, each pass one
    unamplified Gaussian mechanism (counted here by hand, composed directly)."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), -(-steps // 5))
    return accountant.get_epsilon(1e-3)


def test_guard_stops_before_the_budget_saves_and_says_why(tmp_path, capsys):
    path = tmp_path / "stopped.keras"
    target = (eps(10) + eps(11)) / 2  # 10 updates fit, the 11th starts pass 3
    guard = dpf.callbacks.BudgetGuard(target, path, delta=1e-3, verbose=0)
    model = make_model()
    model.fit(X, Y, batch_size=10, epochs=5, verbose=0, callbacks=[guard])
    assert model.update_count == 10
    assert guard.statement().epsilon <= target < eps(11)
    assert guard.stop_reason == capsys.readouterr().out.strip()
    assert guard.stop_reason.startswith(
        "Privacy budget reached: stopped after 10 updates at epsilon=")
    assert f"update 11 would take epsilon to {eps(11):.4g}" in guard.stop_reason
    assert str(path) in guard.stop_reason
    saved = keras.models.load_model(path)
    assert saved.update_count == 10
    for a, b in zip(saved.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["stopped.keras"]


@pytest.mark.parametrize("passes_that_fit", [1, 2, 4])
def test_guard_on_a_shuffled_pipeline_never_passes_the_target(tmp_path, passes_that_fit):
    # N=53, B=10: 5 updates per pass, 3 examples left out of each.
    n, per_pass = 53, 5
    images = np.random.default_rng(0).random((n, 2, 1, 1)).astype("float32")
    source = dpf.data.ExampleSource.from_arrays(images, np.zeros(n, int))
    train = dpf.data.make_train_dataset(source, expected_batch_size=10, seed=4,
                                        microbatch_size=5, mode="shuffle")
    target = (eps(passes_that_fit * per_pass) + eps(passes_that_fit * per_pass + 1)) / 2
    guard = dpf.callbacks.BudgetGuard(target, tmp_path / "m.keras", delta=1e-3,
                                      verbose=0)
    inputs = keras.Input((2, 1, 1))
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
        l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=10,
        microbatch_size=5))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(train, epochs=10, verbose=0, callbacks=[guard])
    assert model.update_count == passes_that_fit * per_pass
    assert guard.statement().epsilon <= target
    assert guard.statement(model.update_count + 1).epsilon > target
    # Poisson accounting of the same updates would have claimed much less.
    poisson = dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=1.0, sampling_probability=10 / n,
        steps=model.update_count, delta=1e-3, sampling="poisson")
    assert poisson < guard.statement().epsilon


def test_guard_refuses_to_start_when_no_update_fits(tmp_path):
    path = tmp_path / "never.keras"
    guard = dpf.callbacks.BudgetGuard(eps(1) / 2, path, delta=1e-3, verbose=0)
    model = make_model()
    with pytest.raises(ValueError, match="does not allow one more update.*"
                                         "Raise the noise multiplier"):
        model.fit(X, Y, batch_size=10, verbose=0, callbacks=[guard])
    assert model.update_count == 0
    assert not path.exists()


def test_guard_refuses_a_run_without_noise(tmp_path):
    guard = dpf.callbacks.BudgetGuard(8.0, tmp_path / "m.keras", delta=1e-3,
                                      verbose=0)
    model = make_model(noise=0.0)
    with pytest.raises(ValueError, match="noise_multiplier is 0.*cannot "
                                         "meet target_epsilon=8.0 and is not "
                                         "private"):
        model.fit(X, Y, batch_size=10, verbose=0, callbacks=[guard])
    assert model.update_count == 0


def test_guard_does_not_save_when_training_ends_within_budget(tmp_path):
    path = tmp_path / "m.keras"
    guard = dpf.callbacks.BudgetGuard(100.0, path, delta=1e-3, verbose=0)
    make_model().fit(X, Y, batch_size=10, verbose=0, callbacks=[guard])
    assert guard.stop_reason is None and not path.exists()


def test_guard_arguments():
    with pytest.raises(ValueError, match="save_path must end in .keras"):
        dpf.callbacks.BudgetGuard(1.0, "model.h5", delta=1e-3)
    with pytest.raises(ValueError, match="BudgetGuard needs a target_epsilon"):
        dpf.callbacks.BudgetGuard(None, "m.keras", delta=1e-3)
