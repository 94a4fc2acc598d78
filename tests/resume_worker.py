"""A tiny DP training run that tests/resume_test.py kills and restarts.

    python tests/resume_worker.py DIR --mode noise|state [--seed S]
        [--kill-at-update K] [--kill-in-save N] [--pause SECONDS]

The same command, run again after a kill, resumes from DIR with
`resume.fit_resumable` (Poisson pipeline with `start_step`, checkpoints
every `EVERY` updates, `TOTAL` updates in all).

- `--mode noise`: all sample weights 0, noise on, SGD with learning rate 1,
  so each update's weight change is exactly -noise / B.
- `--mode state`: real data, noise 0, Adam and EMA, so the final weights
  depend on the optimizer state, the EMA, the update count and which batch
  each update saw.

Every applied update appends a JSON line to DIR/updates.jsonl: the process
id, the update's index and its weight change. At the end DIR/result.json
holds the update count, epsilon and the final weights, EMA and optimizer
variables.
"""

import argparse
import json
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_dpfair as dpf  # noqa: E402
from tf_dpfair.data import pipeline as data  # noqa: E402
from tf_dpfair.training import checkpoints as resume  # noqa: E402

NUM_EXAMPLES = 48
BATCH = 8
STEPS_PER_EPOCH = 6
TOTAL = 12
EVERY = 4
DATA_SEED = 1234
DELTA = 1e-3
NOISE = 1.0


def source():
    """48 random 2x2 'images' with 3 classes."""
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(NUM_EXAMPLES, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=NUM_EXAMPLES)
    return data.ExampleSource.from_arrays(images, labels)


def build(mode, seed):
    """The compiled DPModel of `mode` ("noise" or "state")."""
    noisy = mode == "noise"
    config = dpf.DPConfig(l2_norm_clip=1.0,
                          noise_multiplier=NOISE if noisy else 0.0,
                          expected_batch_size=BATCH, microbatch_size=4,
                          ema_decay=None if noisy else 0.9, seed=seed)
    inputs = keras.Input((2, 2, 1))
    outputs = keras.layers.Dense(
        3, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(
        keras.layers.Flatten()(inputs))
    model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=config)
    optimizer = (keras.optimizers.SGD(1.0) if noisy
                 else keras.optimizers.Adam(0.05))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    return model


def flat(variables):
    return np.concatenate([np.ravel(v.numpy()) for v in variables])


class Recorder(keras.callbacks.Callback):
    """Appends each applied update's index and weight change to a file."""

    def __init__(self, path, pause=0.0):
        super().__init__()
        self.path = path
        self.pause = pause
        self.before = None

    def on_train_batch_begin(self, batch, logs=None):
        self.before = flat(self.model.trainable_variables)

    def on_train_batch_end(self, batch, logs=None):
        delta = flat(self.model.trainable_variables) - self.before
        line = {"pid": os.getpid(), "update": self.model.update_count - 1,
                "delta": delta.tolist()}
        # One append per update, so a kill cannot leave half a line.
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        time.sleep(self.pause)


class KillAt(keras.callbacks.Callback):
    """SIGKILLs this process just before update `update` is applied."""

    def __init__(self, update):
        super().__init__()
        self.update = update

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.update_count == self.update:
            os.kill(os.getpid(), signal.SIGKILL)


def die_in_save(model, call):
    """Makes the `call`-th checkpoint write stop half-way, then SIGKILL."""
    original = model.save_weights
    calls = [0]

    def save_weights(path, *args, **kwargs):
        calls[0] += 1
        original(path, *args, **kwargs)
        if calls[0] == call:
            with open(path, "r+b") as f:  # the temp file, not yet moved
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    object.__setattr__(model, "save_weights", save_weights)


def run(directory, mode, seed=None, kill_at_update=None, kill_in_save=None,
        pause=0.0):
    """Trains (or resumes) the run in `directory`; returns the result dict."""
    os.makedirs(directory, exist_ok=True)
    model = build(mode, seed)
    examples = source()

    def make_dataset(start):
        train = data.make_train_dataset(
            examples, expected_batch_size=BATCH, seed=DATA_SEED,
            microbatch_size=4, start_step=start)
        dataset = train.dataset
        if mode == "noise":
            dataset = dataset.map(lambda x, y, w: (x, y, 0.0 * w))
        return dataset

    spec = data.make_train_dataset(examples, expected_batch_size=BATCH,
                                   seed=DATA_SEED, microbatch_size=4).spec
    logger = dpf.callbacks.PrivacyLogger(delta=DELTA, sampling_spec=spec,
                                         verbose=0)
    callbacks = [Recorder(os.path.join(directory, "updates.jsonl"), pause),
                 logger]
    if kill_at_update is not None:
        callbacks.append(KillAt(kill_at_update))
    if kill_in_save is not None:
        die_in_save(model, kill_in_save)
    resume.fit_resumable(model, make_dataset, directory=directory,
                         total_updates=TOTAL, steps_per_epoch=STEPS_PER_EPOCH,
                         every_n_updates=EVERY, callbacks=callbacks,
                         verbose=0)
    result = {"update_count": model.update_count,
              "epsilon": logger.statement().epsilon,
              "weights": flat(model.trainable_variables).tolist(),
              "optimizer": flat(model.optimizer.variables).tolist()}
    if model.dp_config.ema_decay is not None:
        with model.ema_weights():
            result["ema"] = flat(model.trainable_variables).tolist()
    with open(os.path.join(directory, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--mode", choices=("noise", "state"), required=True)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kill-at-update", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to wait after each update")
    args = parser.parse_args(argv)
    tf.config.set_visible_devices([], "GPU")
    run(args.directory, args.mode, args.seed, args.kill_at_update,
        args.kill_in_save, args.pause)


if __name__ == "__main__":
    main(sys.argv[1:])
