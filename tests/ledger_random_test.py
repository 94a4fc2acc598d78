"""The ledger's invariants under random sequences of ordinary Keras habits.

A hook on the DP step records, for every update it really applied, the ids
of the examples of weight > 0 it held and the (noise seed, noise index) it
drew with. Random sequences of fits (arrays, Poisson and shuffled
pipelines, a stated pipeline of the user's), EarlyStopping restores,
set_weights to an old snapshot, save and load, recompiles, re-wraps and
refused batches then run, and after every event:

- the stated epsilon is never below the epsilon of what ran: for every
  example, one Poisson-subsampled Gaussian per Poisson update of a source
  holding it (the package's sampler is the trusted part) and one
  unamplified Gaussian per other update that held it, composed by
  dp_accounting; the worst example is the reference;
- no two applied updates share a noise draw;
- the update count never goes down.
"""

import os

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_dpfair as dpf

DELTA = 1e-5
SIGMA = 2.0
BATCH = 8
APPLIED = []  # (ids of weight > 0, noise seed, noise index) per applied update
MAX_UPDATES, MAX_ROWS = 2000, 64


class _Log:
    """Variables the hooked step writes, in the graph, after each update."""

    def __init__(self):
        self.position = tf.Variable(0, dtype=tf.int64)
        self.ids = tf.Variable(tf.fill([MAX_UPDATES, MAX_ROWS], tf.constant(-1, tf.int64)))
        self.draws = tf.Variable(tf.zeros([MAX_UPDATES, 2], tf.int64))

    def read(self, start):
        """Refills APPLIED from the variables, from entry `start` on."""
        count = int(self.position.numpy())
        ids, draws = self.ids.numpy()[start:count], self.draws.numpy()[start:count]
        APPLIED[:] = [({int(i) for i in row if i >= 0}, int(seed), int(index))
                      for row, (seed, index) in zip(ids, draws)]


LOG = None


@pytest.fixture
def traced(monkeypatch):
    global LOG
    original = dpf.training.model.DPTraining.train_step
    LOG = _Log()

    def train_step(self, data):
        logs = original(self, data)
        x, _, weights = keras.utils.unpack_x_y_sample_weight(data)
        ids = tf.cast(tf.round(tf.reshape(x, [tf.shape(x)[0], -1])[:, 0] * 255), tf.int64)
        if weights is not None:
            ids = tf.where(tf.reshape(weights, [-1]) > 0, ids, -1)
        ids = tf.pad(ids, [[0, MAX_ROWS - tf.shape(ids)[0]]], constant_values=-1)
        # After the update: the logs read the step's counts, which wait for
        # it, so a refused batch writes nothing here either.
        with tf.control_dependencies(tf.nest.flatten(logs)):
            index = self._step_counter().read_value() - 1
            at = LOG.position.read_value()
            written = [LOG.ids.scatter_nd_update([[at]], [ids]),
                       LOG.draws.scatter_nd_update([[at]], [tf.stack(
                           [tf.constant(self.dp_config.seed, tf.int64), index])])]
        with tf.control_dependencies(written):
            LOG.position.assign_add(1)
        return logs

    monkeypatch.setattr(dpf.training.model.DPTraining, "train_step", train_step)
    APPLIED.clear()
    yield
    APPLIED.clear()


def images(n):
    """Example i has i in its first pixel (uint8, read back as i / 255)."""
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 256, size=(n, 4, 1, 1)).astype(np.uint8)
    pixels[:, 0, 0, 0] = np.arange(n)
    return pixels


def arrays(n=24):
    return (images(n).astype("float32") / 255.0,
            np.random.default_rng(1).normal(size=(n, 1)).astype("float32"))


def source(n):
    return dpf.data.ExampleSource.from_arrays(images(n), np.zeros(n, int))


def compile_(model):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def new_model():
    base = keras.Sequential([keras.Input((4, 1, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1)])
    return compile_(dpf.make_private(base, config()))


def config():
    return dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=SIGMA,
                        expected_batch_size=BATCH, microbatch_size=4)


class Worse(keras.callbacks.Callback):
    """A score that gets worse every epoch: EarlyStopping restores epoch 1."""

    def on_epoch_end(self, epoch, logs=None):
        logs["score"] = -float(epoch)


def reference_epsilon(poisson_updates):
    """The worst example's epsilon for what the step applied.

    Args:
      poisson_updates: {applied index: (q, N)} of updates drawn by the
        package's Poisson sampler from examples 0..N-1.
    """
    per_example = {}
    for position, (ids, _, _) in enumerate(APPLIED):
        if position in poisson_updates:
            q, n = poisson_updates[position]
            holders = range(n)
            kind = ("poisson", q)
        else:
            holders = ids
            kind = ("gaussian", None)
        for i in holders:
            counts = per_example.setdefault(i, {})
            counts[kind] = counts.get(kind, 0) + 1
    worst = 0.0
    for counts in {tuple(sorted(c.items())) for c in per_example.values()}:
        gaussian = dp_accounting.GaussianDpEvent(SIGMA)
        events = [dp_accounting.SelfComposedDpEvent(
            gaussian if kind == "gaussian"
            else dp_accounting.PoissonSampledDpEvent(q, gaussian), count)
            for (kind, q), count in counts]
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.ComposedDpEvent(events))
        worst = max(worst, accountant.get_epsilon(DELTA))
    return worst


def run_sequence(rng, tmp_path, events):
    """Runs `events` random habits on one set of weights; checks after each."""
    model = new_model()
    snapshots, poisson_updates, seen = [], {}, []
    x, y = arrays()
    last_count = 0
    start = int(LOG.position.numpy())  # this sequence's first entry
    for step in range(events):
        event = rng.choice(["arrays", "arrays_steps", "poisson", "shuffle",
                            "stated", "early_stopping", "set_weights",
                            "save_load", "recompile", "rewrap", "refused"])
        seen.append(event)
        LOG.read(start)
        before = len(APPLIED)
        if event == "arrays":
            model.fit(x, y, batch_size=int(rng.choice([4, 6, 8])),
                      epochs=int(rng.integers(1, 3)), verbose=0)
        elif event == "arrays_steps":  # no batch_size: Keras picks ceil(N/steps)
            model.fit(x, y, steps_per_epoch=int(rng.choice([3, 4, 6])),
                      epochs=1, verbose=0)
        elif event in ("poisson", "shuffle"):
            n = int(rng.choice([24, 48])) if event == "poisson" else 24
            train = dpf.data.make_train_dataset(
                source(n), expected_batch_size=BATCH, seed=int(rng.integers(1 << 30)),
                microbatch_size=4, mode=event, start_step=model.update_count)
            model.fit(train, epochs=1, steps_per_epoch=int(rng.integers(1, 5)),
                      verbose=0)
            if event == "poisson":
                LOG.read(start)
                for position in range(before, len(APPLIED)):
                    poisson_updates[position] = (BATCH / n, n)
        elif event == "stated":
            batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(24).batch(BATCH)
            model.fit(batches, epochs=int(rng.integers(1, 3)), verbose=0,
                      callbacks=[dpf.callbacks.PrivacyLogger(
                          delta=DELTA, sampling="shuffle", num_examples=24,
                          verbose=0)])
        elif event == "early_stopping":
            model.fit(x, y, batch_size=6, epochs=3, verbose=0, callbacks=[
                Worse(), keras.callbacks.EarlyStopping(
                    monitor="score", mode="max", patience=5,
                    restore_best_weights=True)])
        elif event == "set_weights" and snapshots:
            model.set_weights(snapshots[int(rng.integers(len(snapshots)))])
        elif event == "save_load":
            path = os.path.join(tmp_path, f"m{step}.keras")
            model.save(path)
            model = keras.models.load_model(path)
        elif event == "recompile":
            compile_(model)
        elif event == "rewrap":
            base = keras.Model(model.inputs, model.outputs)
            model = compile_(dpf.make_private(base, config()))
        elif event == "refused":
            weights = np.ones(24, np.float32)
            weights[int(rng.integers(8, 24))] = 2.0
            with pytest.raises(Exception, match="above 1"):
                model.fit(x, y, sample_weight=weights, batch_size=8, shuffle=False,
                          epochs=1, verbose=0)
        snapshots.append(model.get_weights())
        LOG.read(start)
        stated = model.privacy_ledger.statement(DELTA).epsilon
        want = reference_epsilon(poisson_updates)
        assert stated >= want * (1 - 1e-9), (seen, stated, want)
        draws = [(seed, index) for _, seed, index in APPLIED]
        assert len(set(draws)) == len(draws), (seen, "a noise draw was reused")
        assert model.update_count == len(APPLIED) >= last_count, seen
        last_count = model.update_count
    return seen


def test_random_sequences_never_understate_epsilon_or_reuse_noise(traced, tmp_path):
    rng = np.random.default_rng(20261207)
    kinds = []
    for _ in range(4):
        kinds += run_sequence(rng, tmp_path, events=10)
    assert len(set(kinds)) >= 8, kinds  # most kinds of event were exercised


@pytest.mark.slow
def test_many_random_sequences(traced, tmp_path):
    rng = np.random.default_rng(7)
    kinds = []
    for _ in range(12):
        kinds += run_sequence(rng, tmp_path, events=10)
    assert all(kinds.count(k) >= 5 for k in set(kinds)), kinds
