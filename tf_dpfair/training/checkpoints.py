"""Crash-safe checkpoints: resume DP training, privacy state intact.

A run killed at any point (between updates, inside one, while a checkpoint is
written) and started again with the same command continues from its last
checkpoint with the update count, optimizer state, EMA shadows and the data
position intact. `DPCheckpoint` saves and restores; `fit_resumable` restores,
builds the pipeline at `start_step` = the restored update count and fits.
Run the same code again after a crash and it continues:

>>> import tempfile
>>> import keras, numpy as np
>>> import tf_dpfair as dpf
>>> from tf_dpfair import data
>>> from tf_dpfair.training import checkpoints
>>> source = data.ExampleSource.from_arrays(
...     np.zeros((40, 4, 4, 1), np.uint8), np.arange(40) % 2)
>>> model = dpf.make_private(
...     keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
...                       keras.layers.Dense(2)]),
...     dpf.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0,
...                  expected_batch_size=8, microbatch_size=8))
>>> model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
...     from_logits=True))
>>> import secrets
>>> seed = secrets.randbits(62)  # keep it secret; store it with the checkpoint to resume
>>> def make_dataset(start_step):
...     return data.make_train_dataset(source, expected_batch_size=8, seed=seed,
...                                    microbatch_size=8, start_step=start_step)
>>> history = checkpoints.fit_resumable(model, make_dataset, directory=tempfile.mkdtemp(),
...                                     total_updates=10, steps_per_epoch=5, verbose=0)
DPCheckpoint: no checkpoint: starting at update 0.
>>> model.update_count
10

What is saved, and why it stays consistent:

- One `.weights.h5` file from `model.save_weights`: weights, optimizer slots
  and iteration count, EMA shadows and the privacy ledger's saved copy are
  all model or optimizer variables, so they always come from the same moment. It is
  written to a temporary file in the same directory, flushed to disk and
  moved over the old one with `os.replace`: a kill mid-write leaves the
  previous checkpoint whole, and `restore` deletes the partial file.
- The privacy ledger (`tf_dpfair.privacy.ledger`) is saved with the weights and
  merged back on restore: `PrivacyLogger` composes the restored ledger, so
  epsilon after a resume equals that of an uninterrupted run of the same
  length (Poisson; shuffle adds at most one participation for a pass resumed
  in its middle). A failed step writes nothing (see `DPTraining.train_step`),
  so no update is counted without being applied or applied without being
  counted. Restoring a checkpoint into a live model that has run further
  (an in-process retry) never shortens its ledger nor lowers its update
  count: the updates that ran stay accounted, and the next noise index
  follows the last one drawn.
- The data position: batches are a function of (sampling seed, update
  index), so `start_step=restore(...)` continues where the checkpoint was
  taken. Poisson sampling may also resume with a fresh sampling seed (each
  update draws independently). A shuffled pass resumed in its middle counts
  as a new pass in the model's ledger (`tf_dpfair.privacy.input_sampling`):
  the model cannot check that the permutation is the same.

Why not `keras.callbacks.BackupAndRestore` alone (Keras 3.15): it writes the
weights in place (a kill mid-write corrupts the only copy) and the epoch
number in a second file (a kill between the two re-runs a finished epoch, so
the run ends with more updates than an uninterrupted one); with `save_freq`
in batches it restores the weights of batch b but restarts the epoch at
batch 0, again adding updates; and it knows nothing of the pipeline position.

Noise after a resume. The noise of update t is a function of (noise seed,
t) (`tf_dpfair.dpsgd.noise`). Suppose updates c..t' were applied after the last
checkpoint c and lost in a crash, and the resumed run re-applies c.. with the
SAME seed:

- If update t sees the same data as before, the re-applied update is the
  lost one exactly: the same function of the same state (the checkpoint),
  the same batch and the same noise draw. Nothing new is released. This holds
  with the package pipeline given the same sampling seed and
  `start_step=restore(...)`: the Poisson sample of update t is a function of
  (sampling seed, t) (`tests/resume_test.py` shows the replay is exact).
- But nothing forces the data to be the same: a fresh sampling seed (the
  demo draws one per process), a changed dataset, a pipeline not restarted
  at `start_step`, Keras' own shuffling. Then one noise draw z covers two
  different sums, and anyone who saw both releases gets (S + z) - (S' + z) =
  S - S' with no noise at all (the test shows the difference is exact).

The default `DPConfig(seed=None)` draws a fresh secret seed in every process,
which rules this out across processes but not when a live model is rolled
back (an in-process retry) or when a seed is given. So `DPCheckpoint` keeps
a marker: before an update is applied it records (in `noise_lease.json`,
written atomically, a block of `every_n_updates` at a time) how far updates
may have gone under the current noise key, and releases it when training
ends cleanly. `restore` finds the marker beyond the checkpoint whenever
updates may have been applied and lost (as it runs ahead, also sometimes
when none were); it then gives the model a fresh secret noise seed, so no
draw of a lost update is ever reused, whatever data the resumed run sees. Lost updates are never written by this module, so the
re-done updates are the only ones released; a file another callback wrote
between the checkpoint and the kill would show updates that are re-done with
other noise (count them, or checkpoint only through this module).

Several workers (`MultiWorkerMirroredStrategy`): give every worker the
same `DPCheckpoint`. Only the chief reads and writes the directory (the
others write nothing and need no access to it); `restore` copies the
chief's restored state to every worker (`tf_dpfair.workers`), and all follow
the chief's decision to re-key. Noise is drawn on the chief's first replica
only (`DPTraining.train_step`), so its noise seed is the one that matters,
and the argument above holds for the job as for one process: all workers
are restarted together, since a job loses its collectives when any dies.
"""

import dataclasses
import json
import math
import os

import keras

from tf_dpfair import workers

CHECKPOINT_NAME = "checkpoint.weights.h5"
LEASE_NAME = "noise_lease.json"
TMP_PREFIX = ".tmp-"


def atomic_write(path, write_fn):
    """Writes a file so that it is either the old or the new one, never half.

    `write_fn(temp_path)` writes the content to a temporary file in the same
    directory (its name ends like `path`, for writers that check suffixes);
    it is flushed to disk, then moved over `path` with `os.replace`.

    Args:
      path: the destination file.
      write_fn: callable taking the temporary path.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory,
                        f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}")
    write_fn(temp)
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)
    # The rename itself must reach the disk too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_model(model, path):
    """Saves `model` to a `.keras` file atomically (see `atomic_write`).

    Args:
      model: a Keras model.
      path: destination ending in `.keras`.

    Raises:
      ValueError: `path` does not end in `.keras`.
    """
    if not str(path).endswith(".keras"):
        raise ValueError(f"The model is saved as a .keras file; got {path!r}.")
    atomic_write(str(path), model.save)


def _write_json(path, value):
    def write(temp):
        with open(temp, "w") as f:
            json.dump(value, f)
    atomic_write(path, write)


def _refresh_noise_seed(model):
    """Gives `model` a fresh secret noise seed and forces a retrace.

    The seed is a Python constant of the traced step, so the cached train
    function must go. `DPConfig(seed=None)` draws a fresh secret seed.
    """
    model._dp_config = dataclasses.replace(model.dp_config, seed=None)
    model.train_function = None


class DPCheckpoint(keras.callbacks.Callback):
    """Saves the whole training state atomically every N updates; resumes it.

    Call `restore(model)` before every `fit` and build the data pipeline with
    `start_step` set to what it returns; pass this callback to `fit`, first in
    the list. See the module docstring for what is saved and why no noise
    draw is reused after a crash.

    Args:
      directory: folder of the checkpoint (created if missing). One run per
        folder; keep it private like the model itself.
      every_n_updates: save after this many updates (and at the end).
      total_updates: stop training once the update count reaches it (so a
        resumed run ends where an uninterrupted one would); None: never.
        With `steps_per_execution` k > 1 the count moves k at a time: make
        it a multiple of k.
      verbose: 1 prints what `restore` found.

    Raises:
      ValueError: `every_n_updates` or `total_updates` is not a positive
        integer.
    """

    def __init__(self, directory, every_n_updates=100, total_updates=None,
                 verbose=1):
        super().__init__()
        for name, value in (("every_n_updates", every_n_updates),
                            ("total_updates", total_updates)):
            if value is None and name == "total_updates":
                continue
            if (isinstance(value, bool) or not isinstance(value, int)
                    or value < 1):
                raise ValueError(f"{name} must be a positive integer, got "
                                 f"{value!r}.")
        self.directory = str(directory)
        self.every_n_updates = every_n_updates
        self.total_updates = total_updates
        self.verbose = verbose
        self.rekeyed = False
        self._restored = None  # (model, update count) of the last restore
        self._saved_at = None
        self._lease = 0
        self._chief = True  # set by restore() from the model's strategy

    @property
    def checkpoint_path(self):
        """Path of the checkpoint file."""
        return os.path.join(self.directory, CHECKPOINT_NAME)

    @property
    def lease_path(self):
        """Path of the noise lease (how far updates may have gone)."""
        return os.path.join(self.directory, LEASE_NAME)

    def restore(self, model):
        """Loads the last checkpoint into `model`, if any; returns its count.

        Deletes partial files of an interrupted write. If updates may have
        been applied after the checkpoint (and lost), the model gets a fresh
        secret noise seed, so their noise draws are never reused. On several
        workers call it on every worker: the chief reads the directory and
        every worker gets its state and decision.

        Args:
          model: the compiled DPModel, built, as the training command makes it.

        Returns:
          The update count to resume from (pass it as `start_step`).

        Raises:
          ValueError: `model` is not a compiled DPModel.
        """
        if getattr(model, "dp_config", None) is None:
            raise ValueError("DPCheckpoint needs a DPModel (see "
                             "tf_dpfair.make_private).")
        if model.optimizer is None:
            raise ValueError("Compile the model before restore(): the "
                             "checkpoint holds the optimizer state and EMA.")
        strategy = model.distribute_strategy
        self._chief = workers.is_chief(strategy)
        found = False
        if self._chief:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):
                if name.startswith(TMP_PREFIX):
                    os.remove(os.path.join(self.directory, name))
            found = os.path.exists(self.checkpoint_path)
        # On several workers every one follows the chief's files.
        found = bool(workers.share_from_chief(strategy, int(found)))
        if found:
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            if self._chief:
                model.load_weights(self.checkpoint_path)
            workers.copy_from_chief(strategy, model.variables
                                    + model.optimizer.variables)
        count = model.update_count
        rekey = False
        if self._chief:
            lease = self._read_lease()
            # No lease but a count: the history is unknown, so assume the worst.
            rekey = (count > 0) if lease is None else lease > count
        self.rekeyed = bool(workers.share_from_chief(strategy, int(rekey)))
        if self.rekeyed:
            _refresh_noise_seed(model)
        self._lease = count
        self._restored = (model, count)
        self._saved_at = count
        if self.verbose:
            where = (f"resuming at update {count} from {self.checkpoint_path}"
                     if found else "no checkpoint: starting at update "
                     f"{count}")
            print(f"DPCheckpoint: {where}."
                  + (" Updates after the checkpoint may have been applied "
                     "and lost: a fresh noise seed is drawn, so their noise "
                     "is never reused." if self.rekeyed else ""))
        return count

    def _read_lease(self):
        try:
            with open(self.lease_path) as f:
                return int(json.load(f)["reserved_through"])
        except FileNotFoundError:
            return None

    def _write_lease(self, value):
        if self._chief:
            _write_json(self.lease_path, {"reserved_through": int(value)})
        self._lease = value

    def save(self):
        """Writes the checkpoint of the current state now (atomically).

        On several workers only the chief writes; the others only note the
        update count, so that all keep the same schedule.
        """
        if self._chief:
            atomic_write(self.checkpoint_path, self.model.save_weights)
        self._saved_at = self.model.update_count

    def _updates_per_call(self):
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    def on_train_begin(self, logs=None):
        restored = self._restored
        if (restored is None or restored[0] is not self.model
                or restored[1] != self.model.update_count):
            raise ValueError(
                "Call DPCheckpoint.restore(model) before fit, and build the "
                "data pipeline with start_step set to what it returns; "
                "otherwise the run would not continue where it stopped.")

    def on_train_batch_begin(self, batch, logs=None):
        ahead = self.model.update_count + self._updates_per_call()
        if ahead > self._lease:
            # Recorded before the update runs: a crash from here on is seen
            # by restore() as possibly lost updates.
            self._write_lease(self.model.update_count
                              + max(self.every_n_updates,
                                    self._updates_per_call()))

    def on_train_batch_end(self, batch, logs=None):
        count = self.model.update_count
        if count - self._saved_at >= self.every_n_updates:
            self.save()
        if self.total_updates is not None and count >= self.total_updates:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.model.update_count != self._saved_at:
            self.save()
        # Clean end: nothing beyond the checkpoint was applied.
        self._write_lease(self.model.update_count)
        self._restored = None


def fit_resumable(model, make_dataset, *, directory, total_updates,
                  steps_per_epoch, every_n_updates=100, callbacks=None,
                  **fit_kwargs):
    """Runs `model.fit` to `total_updates`, resuming from `directory`.

    Running the same call again after a crash continues the run; after it
    has finished, it returns None without training.

    Args:
      model: the compiled DPModel.
      make_dataset: `fn(start_step)` returning the `TrainData` (or a
        `tf.data.Dataset`) of at least `total_updates - start_step` batches
        from update `start_step` on (e.g.
        `lambda s: data.make_train_dataset(..., start_step=s)`; on several
        workers with the seed of `workers.share_from_chief`).
      directory: the checkpoint folder.
      total_updates: the length of the run in updates.
      steps_per_epoch: updates per epoch (epochs only pace the logs).
      every_n_updates: checkpoint interval.
      callbacks: further callbacks (e.g. a PrivacyLogger).
      **fit_kwargs: passed to `fit` (e.g. `validation_data`, `verbose`).

    Returns:
      The `History` of `fit`, or None when the run was already complete.
    """
    checkpoint = DPCheckpoint(directory, every_n_updates, total_updates)
    start = checkpoint.restore(model)
    if start >= total_updates:
        print(f"DPCheckpoint: the run already has {start} of {total_updates} "
              f"updates; nothing to do.")
        return None
    epochs = math.ceil(total_updates / steps_per_epoch)
    return model.fit(make_dataset(start), steps_per_epoch=steps_per_epoch,
                     epochs=epochs, initial_epoch=start // steps_per_epoch,
                     callbacks=[checkpoint, *(callbacks or [])], **fit_kwargs)
