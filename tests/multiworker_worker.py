"""Small training jobs that tests/multiworker_test.py runs on two workers and in one process.

    python tests/multiworker_worker.py OUT_DIR

With TF_CONFIG set the process is one worker of a
`MultiWorkerMirroredStrategy` job; without it, the same jobs run in one
process (default strategy, one replica), the reference. Results go to
OUT_DIR/<role>.json, role "worker<i>" or "single":

- "dp": a DPModel (convolution, ghost clipping, EMA, noise multiplier 1
  with a fixed seed, Adam) fed the package's Poisson pipeline for 4
  planned updates, stopped after 3 by a `BudgetGuard` whose budget lies
  between epsilon after 3 and after 4 updates; validation with
  `GroupedAUC`, `EMAEvaluation` and a `FairnessDashboard` writing to
  OUT_DIR/tensorboard_<role>; then `evaluate` and `predict`.
- "private": a subclassed model under `make_private` (vectorized clipping).
- "non_private": a `NonPrivateModel` on the same kind of pipeline; Keras's
  step averages the replicas' mean losses, so its one-process reference
  runs on two replicas (a MirroredStrategy over two logical CPUs).
- "jit": a DPModel compiled with `jit_compile=True`.
- "noise": one noise-only update of 20,000 weights (all inputs 0, so every
  clipped gradient is 0 and the update is -noise / B).
- "checkpoint": `resume.fit_resumable` for 2 updates into
  OUT_DIR/checkpoint_<role>, then `DPCheckpoint.restore` into a model with
  other weights, after a clean end and after a lease that says updates may
  have been lost.
- "cluster" (workers only): `share_from_chief`, `copy_from_chief`, and the
  error messages of input that fit refuses on several workers.

    python tests/multiworker_worker.py OUT_DIR agreement

runs only fits that the workers must refuse (workers only), worker 1
drawing other batches than the chief, and writes
OUT_DIR/agreement_<role>.json (see `run_agreement`).
"""

import json
import logging
import os
import secrets
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

MULTI_WORKER = "TF_CONFIG" in os.environ
STRATEGY = None  # set by make_strategies(), first thing in main()
NON_PRIVATE_STRATEGY = None


def make_strategies():
    """Creates the job's strategies; before any dataset or variable exists.

    A multi-worker job configures its collective ops here. Keras's own
    (non-private) step averages the replicas' mean losses, so its reference
    is one process with as many replicas as the job has.
    """
    global STRATEGY, NON_PRIVATE_STRATEGY
    if MULTI_WORKER:
        STRATEGY = NON_PRIVATE_STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
        return
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    STRATEGY = tf.distribute.get_strategy()
    NON_PRIVATE_STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_dpfair as dpf  # noqa: E402
from tf_dpfair import workers as cluster  # noqa: E402
from tf_dpfair.data import pipeline as data  # noqa: E402
from tf_dpfair.privacy import input_sampling as feeding  # noqa: E402

NUM_EXAMPLES = 48
BATCH = 8
MICRO = 4
DELTA = 1e-3
NOISE = 1.0
GROUPS = {"sex": ["female", "male"]}
LABELS = ["a", "b"]
NOISE_SHAPE = (10, 10, 10)  # 1000 inputs x 20 outputs = 20,000 weights
NOISE_MULTIPLIER, NOISE_CLIP = 1.5, 2.0


def source(zeros=False, num_examples=NUM_EXAMPLES):
    """48 4x4 images with 2 binary labels and a group attribute (or the first few)."""
    rng = np.random.default_rng(0)
    if zeros:
        images = np.zeros((NUM_EXAMPLES,) + NOISE_SHAPE, np.float32)
        labels = np.zeros((NUM_EXAMPLES, 20), np.float32)
        return data.ExampleSource.from_arrays(images, labels)
    images = rng.uniform(size=(NUM_EXAMPLES, 4, 4, 1)).astype(np.float32)
    labels = (rng.uniform(size=(NUM_EXAMPLES, 2)) < 0.4).astype(np.float32)
    sex = rng.integers(0, 2, size=NUM_EXAMPLES)
    return data.ExampleSource.from_arrays(
        images[:num_examples], labels[:num_examples],
        groups={"sex": sex[:num_examples]}, group_spec=GROUPS)


def train_data(examples, seed, strategy=None):
    return data.make_train_dataset(
        examples, expected_batch_size=BATCH, seed=seed, microbatch_size=MICRO,
        num_replicas=(strategy or STRATEGY).num_replicas_in_sync)


def eval_data(examples, strategy=None):
    return data.make_eval_dataset(examples, batch_size=16,
                                  num_replicas=(strategy or STRATEGY).num_replicas_in_sync)


def flat(variables):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(v))
                           for v in variables]).tolist()


def bce():
    return keras.losses.BinaryCrossentropy(from_logits=True)


def functional(seed, conv=False):
    inputs = keras.Input((4, 4, 1))
    hidden = inputs
    if conv:
        hidden = keras.layers.Conv2D(
            2, 3, padding="same",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(hidden)
    outputs = keras.layers.Dense(
        2, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(
        keras.layers.Flatten()(hidden))
    return inputs, outputs


def budget_between_3_and_4_updates(spec):
    """A target epsilon that 3 updates meet and 4 exceed."""
    three, four = (dpf.privacy.accounting.compute_epsilon(
        noise_multiplier=NOISE, delta=DELTA, **spec.accountant_kwargs(steps))
        for steps in (3, 4))
    return (three + four) / 2


def run_dp(out_dir, role):
    examples = source()
    train = train_data(examples, seed=11)
    val = eval_data(examples)
    with STRATEGY.scope():
        inputs, outputs = functional(0, conv=True)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
            l2_norm_clip=1.0, noise_multiplier=NOISE, expected_batch_size=BATCH,
            microbatch_size=MICRO, ema_decay=0.9, seed=7, clipping="ghost"))
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss=bce(),
                      metrics=[dpf.fairness.streaming_auc.GroupedAUC(GROUPS, label_names=LABELS,
                                                      from_logits=True)])
    guard = dpf.callbacks.BudgetGuard(
        budget_between_3_and_4_updates(train.spec),
        os.path.join(out_dir, f"budget_{role}.keras"), delta=DELTA, verbose=0)
    dashboard = dpf.dashboards.FairnessDashboard(
        os.path.join(out_dir, f"tensorboard_{role}"), privacy_logger=guard,
        evaluation_data=val, group_names=GROUPS, n_bootstrap=5)
    history = model.fit(train, epochs=2, steps_per_epoch=2, validation_data=val,
                        callbacks=[guard, dpf.callbacks.EMAEvaluation(val), dashboard],
                        verbose=0)
    result = {"update_count": model.update_count,
              "participations": model.participations,
              "non_poisson_updates": model.non_poisson_updates,
              "nonfinite_examples": model.nonfinite_examples,
              "epsilon": guard.statement().epsilon,
              "stop_reason": guard.stop_reason,
              "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
              "weights": flat(model.trainable_variables),
              "optimizer": flat(model.optimizer.variables),
              "evaluate": model.evaluate(val, verbose=0, return_dict=True),
              "predict": np.asarray(model.predict(val, verbose=0)).tolist()}
    with model.ema_weights():
        result["ema"] = flat(model.trainable_variables)
    return result


class Subclassed(keras.Model):
    """A model without a functional graph, for `make_private`."""

    def __init__(self):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(
            2, kernel_initializer=keras.initializers.GlorotUniform(seed=3))

    def call(self, inputs):
        return self.dense(self.flatten(inputs))


def run_private():
    train = train_data(source(), seed=12)
    with STRATEGY.scope():
        base = Subclassed()
        base(np.zeros((1, 4, 4, 1), np.float32))
        model = dpf.make_private(base, dpf.DPConfig(
            l2_norm_clip=0.5, noise_multiplier=0.0, expected_batch_size=BATCH,
            microbatch_size=MICRO, clipping="vectorized"))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=bce())
    model.fit(train, epochs=1, steps_per_epoch=2, verbose=0)
    return {"type": type(model).__name__, "update_count": model.update_count,
            "weights": flat(model.trainable_variables)}


def run_non_private():
    examples = source()
    train = train_data(examples, seed=13, strategy=NON_PRIVATE_STRATEGY)
    val = eval_data(examples, strategy=NON_PRIVATE_STRATEGY)
    with NON_PRIVATE_STRATEGY.scope():
        inputs, outputs = functional(5)
        model = dpf.make_non_private(keras.Model(inputs, outputs))
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.BinaryCrossentropy(
                          from_logits=True, reduction="mean_with_sample_weight"),
                      metrics=[dpf.fairness.streaming_auc.GroupedAUC(GROUPS, label_names=LABELS,
                                                      from_logits=True)])
    model.fit(train.dataset, epochs=1, steps_per_epoch=2, verbose=0)
    return {"iterations": int(model.optimizer.iterations.numpy()),
            "weights": flat(model.trainable_variables),
            "evaluate": model.evaluate(val, verbose=0, return_dict=True),
            "predict": np.asarray(model.predict(val, verbose=0)).tolist()}


def run_jit():
    train = train_data(source(), seed=14)
    with STRATEGY.scope():
        inputs, outputs = functional(8)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
            l2_norm_clip=1.0, noise_multiplier=0.5, expected_batch_size=BATCH,
            microbatch_size=MICRO, seed=3, clipping="vectorized"))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=bce(),
                      jit_compile=True)
    model.fit(train, epochs=1, steps_per_epoch=2, verbose=0)
    return {"update_count": model.update_count,
            "weights": flat(model.trainable_variables)}


def run_noise():
    train = train_data(source(zeros=True), seed=15)
    with STRATEGY.scope():
        inputs = keras.Input(NOISE_SHAPE)
        outputs = keras.layers.Dense(20, kernel_initializer="zeros", use_bias=False)(
            keras.layers.Flatten()(inputs))
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
            l2_norm_clip=NOISE_CLIP, noise_multiplier=NOISE_MULTIPLIER,
            expected_batch_size=BATCH, microbatch_size=MICRO, seed=123))
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=bce())
    model.fit(train, epochs=1, steps_per_epoch=1, verbose=0)
    return {"update_count": model.update_count,
            "nonfinite_examples": model.nonfinite_examples,
            "update": flat(model.trainable_variables)}


def run_checkpoint(out_dir, role):
    """`resume.fit_resumable` and `DPCheckpoint.restore` on every worker."""
    directory = os.path.join(out_dir, f"checkpoint_{role}")
    examples = source()

    def build(seed):
        with STRATEGY.scope():
            inputs, outputs = functional(seed)
            model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
                l2_norm_clip=1.0, noise_multiplier=NOISE, expected_batch_size=BATCH,
                microbatch_size=MICRO, ema_decay=0.5, seed=9))
            model.compile(optimizer=keras.optimizers.Adam(0.05), loss=bce())
        return model

    trained = build(20)
    dpf.training.checkpoints.fit_resumable(
        trained, lambda start: data.make_train_dataset(
            examples, expected_batch_size=BATCH, seed=17, microbatch_size=MICRO,
            num_replicas=STRATEGY.num_replicas_in_sync, start_step=start),
        directory=directory, total_updates=2, steps_per_epoch=2, every_n_updates=1,
        verbose=0)
    restored = build(21)  # other initial weights, replaced by the checkpoint's
    checkpoint = dpf.training.checkpoints.DPCheckpoint(directory, verbose=0)
    def state(model):
        # The ledger's ids are random per run: compare its counts instead.
        weights = [v for v in model.variables if "dp_ledger" not in v.path]
        return flat(weights + model.optimizer.variables) + [
            s.updates for s in model.privacy_ledger.segments]

    out = {"trained": state(trained),
           "restored_count": checkpoint.restore(restored),
           "restored": state(restored),
           "rekeyed_after_clean_end": checkpoint.rekeyed}
    if cluster.is_chief(STRATEGY):
        # As after a crash: updates up to 5 may have been applied and lost.
        with open(checkpoint.lease_path, "w") as f:
            json.dump({"reserved_through": 5}, f)
    seed_before = restored.dp_config.seed
    again = dpf.training.checkpoints.DPCheckpoint(directory, verbose=0)
    out["count_after_lost_updates"] = again.restore(restored)
    out["rekeyed_after_lost_updates"] = again.rekeyed
    out["noise_seed_changed"] = restored.dp_config.seed != seed_before
    return out


def run_cluster():
    """Sharing from the chief, and the input fit refuses on several workers."""
    index = STRATEGY.cluster_resolver.task_id
    out = {"is_chief": cluster.is_chief(STRATEGY),
           "num_workers": cluster.num_workers(STRATEGY),
           "shared": cluster.share_from_chief(STRATEGY, 1000 + index)}
    with STRATEGY.scope():
        variable = keras.Variable(np.zeros(3, np.float32))
        count = keras.Variable(0, dtype="int64")
    variable.assign(np.full(3, 5.0 + index, np.float32))  # this worker's copies only
    count.assign(40 + index)
    out["before_copy"] = [flat([variable]), int(count.numpy())]
    cluster.copy_from_chief(STRATEGY, [variable, count])
    out["after_copy"] = [flat([variable]), int(count.numpy())]

    examples = source()
    train = train_data(examples, seed=16)
    with STRATEGY.scope():
        inputs, outputs = functional(9)
        model = dpf.DPModel(inputs=inputs, outputs=outputs, dp_config=dpf.DPConfig(
            l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=BATCH,
            microbatch_size=MICRO))
        model.compile(optimizer="sgd", loss=bce())
    images = np.zeros((16, 4, 4, 1), np.float32)
    labels = np.zeros((16, 2), np.float32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    unsharded = feeding.tag_pipeline(train.dataset.with_options(options),
                                     train.spec, 0, None)
    refused = {}
    for name, call in (
            ("arrays", lambda: model.fit(images, labels, batch_size=8, verbose=0)),
            ("own_pipeline", lambda: model.fit(train.dataset.map(lambda *e: e),
                                               steps_per_epoch=1, verbose=0)),
            ("sharding_off", lambda: model.fit(unsharded, steps_per_epoch=1,
                                               verbose=0)),
            ("train_on_batch", lambda: model.train_on_batch(images, labels))):
        try:
            call()
            refused[name] = None
        except ValueError as error:
            refused[name] = str(error)
    out["refused"] = refused
    out["update_count_after_refusals"] = model.update_count
    return out


def run_agreement(out_dir, role):
    """`fit_resumable` where worker 1 builds other batches than the chief.

    Cases: "seed" (each worker its own secret seed, no `share_from_chief`),
    "num_examples" (worker 1 has 47 examples), "batch" (worker 1 samples
    batches of 12, its DPConfig too), and "resume" (2 updates with a shared
    seed, then a resumed fit to 4 where worker 1 has its own seed). Each
    records the error, the update count after it, and the files in its
    checkpoint directory with their modification times (None where the
    directory does not exist).
    """
    index = STRATEGY.cluster_resolver.task_id
    own_seed = secrets.randbits(62)  # what each worker would draw unshared
    out = {"own_seed": own_seed}

    def pipeline(seed=17, num_examples=NUM_EXAMPLES, batch=BATCH):
        return lambda start: data.make_train_dataset(
            source(num_examples=num_examples), expected_batch_size=batch,
            seed=seed, microbatch_size=MICRO,
            num_replicas=STRATEGY.num_replicas_in_sync, start_step=start)

    def fit(name, make_dataset, batch=BATCH, model=None, total_updates=2):
        directory = os.path.join(out_dir, f"agreement_{name}_{role}")
        if model is None:
            with STRATEGY.scope():
                inputs, outputs = functional(30)
                model = dpf.DPModel(inputs=inputs, outputs=outputs,
                                    dp_config=dpf.DPConfig(
                                        l2_norm_clip=1.0, noise_multiplier=NOISE,
                                        expected_batch_size=batch,
                                        microbatch_size=MICRO))
                model.compile(optimizer=keras.optimizers.SGD(0.5), loss=bce())
        try:
            dpf.training.checkpoints.fit_resumable(model, make_dataset, directory=directory,
                                     total_updates=total_updates,
                                     steps_per_epoch=2, every_n_updates=1,
                                     verbose=0)
            error = None
        except ValueError as refused:
            error = str(refused)
        files = None
        if os.path.isdir(directory):  # each file and when it was written
            files = {f: os.stat(os.path.join(directory, f)).st_mtime_ns
                     for f in sorted(os.listdir(directory))}
        out[name] = {"error": error, "update_count": model.update_count,
                     "files": files}
        return model

    fit("seed", pipeline(seed=own_seed))
    fit("num_examples", pipeline(num_examples=NUM_EXAMPLES - index))
    batch = BATCH + 4 * index
    fit("batch", pipeline(batch=batch), batch=batch)
    trained = fit("resume", pipeline())
    out["resume_first"] = out["resume"]
    fit("resume", pipeline(seed=17 if index == 0 else own_seed), model=trained,
        total_updates=4)
    return out


def main(argv):
    make_strategies()
    # dp_accounting warns once per excluded RDP order; nothing to see here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    out_dir = argv[0]
    role = (f"worker{STRATEGY.cluster_resolver.task_id}" if MULTI_WORKER
            else "single")
    if argv[1:] == ["agreement"]:
        with open(os.path.join(out_dir, f"agreement_{role}.json"), "w") as f:
            json.dump(run_agreement(out_dir, role), f)
        return
    result = {"replicas": STRATEGY.num_replicas_in_sync,
              "dp": run_dp(out_dir, role), "private": run_private(),
              "non_private": run_non_private(), "jit": run_jit(),
              "noise": run_noise(), "checkpoint": run_checkpoint(out_dir, role)}
    if MULTI_WORKER:
        result["cluster"] = run_cluster()
    with open(os.path.join(out_dir, f"{role}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
