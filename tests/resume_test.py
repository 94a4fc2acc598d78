"""Kill-and-resume DP training: same count and epsilon, no noise reused.

The subprocess tests run tests/resume_worker.py, kill it (SIGKILL) at a
chosen or random point, run the same command again and compare with an
uninterrupted run. The in-process tests pin down the noise argument of
`tf_dpfair.training.checkpoints`: a same-seed replay on the same data is exact, the same
draw on other data cancels in a difference, and `DPCheckpoint.restore`
re-keys the noise after lost updates.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import resume_worker
import tf_dpfair as dpf
from tf_dpfair.data import pipeline as data
from tf_dpfair.training import checkpoints as resume

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds per subprocess


def worker(directory, *args):
    """Starts tests/resume_worker.py on `directory`; returns the Popen."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "resume_worker.py"),
         str(directory), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
    out, _ = process.communicate(timeout=TIMEOUT)
    return process.returncode, out


def updates(directory):
    with open(os.path.join(directory, "updates.jsonl")) as f:
        return [json.loads(line) for line in f]


def uninterrupted_epsilon():
    spec = data.make_train_dataset(
        resume_worker.source(), expected_batch_size=resume_worker.BATCH,
        seed=0, microbatch_size=4).spec
    return dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=resume_worker.NOISE, delta=resume_worker.DELTA,
        **spec.accountant_kwargs(resume_worker.TOTAL))


def kill_when(process, directory, num_updates, extra_delay):
    """SIGKILLs `process` `extra_delay` s after it logged `num_updates`."""
    path = os.path.join(directory, "updates.jsonl")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if os.path.exists(path) and len(updates(directory)) >= num_updates:
            time.sleep(extra_delay)
            process.send_signal(signal.SIGKILL)
            return
        time.sleep(0.01)
    process.kill()
    pytest.fail("the worker never reached the update to kill it at")


@pytest.mark.parametrize("how, seed", [
    ("before update 7", 5),          # mid-epoch, between updates
    ("in checkpoint write 2", 5),    # the write at update 8 stops half-way
    # Fresh noise seed in each process; slow because the two above already
    # cover a kill between updates and inside a checkpoint write.
    pytest.param("at a random moment", None, marks=pytest.mark.slow),
])
def test_killed_run_resumes_to_the_same_count_epsilon_and_distinct_noise(
        tmp_path, how, seed):
    seed_args = [] if seed is None else ["--seed", seed]
    command = ["--mode", "noise", *seed_args]
    if how.startswith("before"):
        killed = worker(tmp_path, *command, "--kill-at-update", 7)
    elif how.startswith("in checkpoint"):
        killed = worker(tmp_path, *command, "--kill-in-save", 2)
    else:
        killed = worker(tmp_path, *command, "--pause", 0.1)
        delay = np.random.default_rng(0).uniform(0, 0.1)
        kill_when(killed, tmp_path, 5, delay)
    code, out = finish(killed)
    assert code == -signal.SIGKILL, out
    assert not (tmp_path / "result.json").exists()
    first = updates(tmp_path)
    if how.startswith("in checkpoint"):
        assert any(p.name.startswith(resume.TMP_PREFIX)
                   for p in tmp_path.iterdir())  # the half-written file

    code, out = finish(worker(tmp_path, *command))  # the same command again
    assert code == 0, out
    assert not any(p.name.startswith(resume.TMP_PREFIX)
                   for p in tmp_path.iterdir())
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["update_count"] == resume_worker.TOTAL
    assert result["epsilon"] == pytest.approx(uninterrupted_epsilon(),
                                              rel=1e-12)

    records = updates(tmp_path)
    resumed = records[len(first):]
    start = resumed[0]["update"]
    assert start % resume_worker.EVERY == 0 and start <= first[-1]["update"]
    # The resumed process applies exactly the updates after its checkpoint.
    assert [r["update"] for r in resumed] == list(
        range(start, resume_worker.TOTAL))
    lost = [r for r in first if r["update"] >= start]
    assert lost, "the kill should have lost some applied updates"
    # Every applied update, lost or kept, carried its own noise draw: with
    # zero sample weights and SGD(1) the weight change is -noise / B.
    deltas = np.array([r["delta"] for r in records])
    scale = 1.0 / resume_worker.BATCH  # noise stddev sigma * C / B
    assert np.all(np.linalg.norm(deltas, axis=1) > 0.1 * scale)
    distances = np.linalg.norm(deltas[:, None] - deltas[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert distances.min() > 0.1 * scale


def test_killed_run_keeps_optimizer_state_ema_and_data_position(tmp_path):
    # Noise 0, Adam, EMA: the final weights are a function of every piece of
    # state and of which batch each update saw, so they must match exactly.
    want = resume_worker.run(str(tmp_path / "uninterrupted"), "state")
    killed = tmp_path / "killed"
    code, out = finish(worker(killed, "--mode", "state",
                              "--kill-at-update", 7))
    assert code == -signal.SIGKILL, out
    code, out = finish(worker(killed, "--mode", "state"))
    assert code == 0, out
    assert "resuming at update 4" in out
    got = json.loads((killed / "result.json").read_text())
    assert got["update_count"] == want["update_count"] == resume_worker.TOTAL
    for key in ("weights", "ema", "optimizer"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7,
                                   err_msg=key)


# ------------------------------------------------------- in-process, noise


def noise_model(seed, noise=1.0):
    config = dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=noise,
                          expected_batch_size=8, microbatch_size=4, seed=seed)
    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Dense(
        3, kernel_initializer=keras.initializers.Constant(0.1))(
            keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def train(model, start, steps, data_seed=11, zero_weights=False):
    dataset = data.make_train_dataset(
        resume_worker.source(), expected_batch_size=8, seed=data_seed,
        microbatch_size=4, start_step=start, num_steps=steps).dataset
    if zero_weights:
        dataset = dataset.map(lambda x, y, w: (x, y, 0.0 * w))
    model.fit(dataset, verbose=0)
    return resume_worker.flat(model.trainable_variables)


def test_same_seeds_replay_lost_updates_exactly(tmp_path):
    # Same noise seed, same sampling seed, start_step = checkpoint: in a new
    # process the re-applied updates are the lost ones, bit for bit (nothing
    # new leaks).
    model = noise_model(seed=5)
    train(model, 0, 2)
    path = str(tmp_path / "at2.weights.h5")
    model.save_weights(path)
    lost = train(model, 2, 3)
    fresh = noise_model(seed=5)  # a new process would start like this
    fresh.load_weights(path)
    assert fresh.update_count == 2
    np.testing.assert_array_equal(train(fresh, 2, 3), lost)
    # In the same process a restore never rolls the ledger back: the three
    # lost updates stay accounted and the next noise index follows them.
    model.load_weights(path)  # plain Keras restore
    assert model.update_count == 5


def test_same_noise_on_other_data_cancels_in_a_difference():
    # Why a draw must never be reused on different data: two releases with
    # the same noise z give (S + z) - (S' + z) = S - S', noise-free.
    noisy = [noise_model(seed=5) for _ in range(2)]
    exact = [noise_model(seed=5, noise=0.0) for _ in range(2)]
    w_a, w_b = (train(m, 0, 1, data_seed=s) for m, s in zip(noisy, (1, 2)))
    e_a, e_b = (train(m, 0, 1, data_seed=s) for m, s in zip(exact, (1, 2)))
    assert np.abs(w_a - e_a).max() > 0.05  # each release is well noised...
    # ...but not their difference:
    np.testing.assert_allclose(w_a - w_b, e_a - e_b, atol=1e-6)


class FailAt(keras.callbacks.Callback):
    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.update_count == self.update:
            raise RuntimeError("simulated crash")


def test_restore_after_lost_updates_draws_a_fresh_noise_seed(tmp_path):
    model = noise_model(seed=5)
    checkpoint = resume.DPCheckpoint(tmp_path, every_n_updates=2, verbose=0)
    assert checkpoint.restore(model) == 0 and not checkpoint.rekeyed
    with pytest.raises(RuntimeError, match="simulated crash"):
        model.fit(x=np.zeros((32, 2, 2, 1), np.float32), y=np.zeros(32),
                  sample_weight=np.zeros(32), batch_size=8, verbose=0,
                  callbacks=[checkpoint, FailAt(3)])
    lost = resume_worker.flat(model.trainable_variables)  # after update 2
    seed = model.dp_config.seed

    # An in-process retry: the weights go back to the checkpoint of update 2,
    # but the three updates that ran stay in the ledger.
    assert checkpoint.restore(model) == 3
    assert checkpoint.rekeyed and model.dp_config.seed != seed
    # Zero weights again, so the two versions of update 2 differ by noise only.
    redone = train(model, 3, 1, zero_weights=True)
    assert np.abs(redone - lost).max() > 0.01  # update 2 got a new draw

    # A clean end releases the lease: the next restore keeps the seed.
    checkpoint.restore(model)
    model.fit(np.zeros((8, 2, 2, 1), np.float32), np.zeros(8), verbose=0,
              sample_weight=np.zeros(8), batch_size=8,
              callbacks=[checkpoint])
    assert checkpoint.restore(model) == model.update_count
    assert not checkpoint.rekeyed


def test_fit_without_restore_is_refused(tmp_path):
    model = noise_model(seed=None)
    checkpoint = resume.DPCheckpoint(tmp_path)
    with pytest.raises(ValueError, match=r"Call DPCheckpoint.restore\(model\)"
                                         r" before fit.*start_step"):
        model.fit(np.zeros((8, 2, 2, 1), np.float32), np.zeros(8),
                  batch_size=8, verbose=0, callbacks=[checkpoint])
    assert model.update_count == 0


def test_fit_resumable_does_nothing_when_the_run_is_complete(tmp_path,
                                                             capsys):
    model = noise_model(seed=None)

    def make_dataset(start):
        return data.make_train_dataset(
            resume_worker.source(), expected_batch_size=8, seed=3,
            microbatch_size=4, start_step=start).dataset

    kwargs = dict(directory=tmp_path, total_updates=3, steps_per_epoch=2,
                  every_n_updates=2, verbose=0)
    resume.fit_resumable(model, make_dataset, **kwargs)
    assert model.update_count == 3
    again = noise_model(seed=None)
    assert resume.fit_resumable(again, make_dataset, **kwargs) is None
    assert again.update_count == 3
    assert "nothing to do" in capsys.readouterr().out


def test_bad_checkpoint_arguments():
    with pytest.raises(ValueError, match="every_n_updates must be a positive"):
        resume.DPCheckpoint("/tmp/x", every_n_updates=0)
    with pytest.raises(ValueError, match="needs a DPModel"):
        resume.DPCheckpoint("/tmp/x").restore(keras.Sequential())
    with pytest.raises(ValueError, match="saved as a .keras file"):
        resume.atomic_save_model(noise_model(seed=None), "/tmp/x.h5")
