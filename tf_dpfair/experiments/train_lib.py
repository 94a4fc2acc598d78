"""One training run: settings in, checkpoints, logs, fairness reports and result.json out.

`run(settings)` trains one model (private with DP-SGD, or the non-private
baseline on the same pipeline), evaluates it exactly on the test split and
writes into `settings.work_dir`:

- `backup/`: `keras.callbacks.BackupAndRestore` state, kept until the run is
  finished: rerunning the same settings resumes at the last finished epoch,
  and the data pipeline restarts at update `model.update_count`.
- `tensorboard/`: `keras.callbacks.TensorBoard` logs (loss, epsilon, test
  accuracy/AUC per epoch, with EMA weights too).
- `checkpoints/epoch_NNN.npz`: test-set scores after each evaluated epoch
  (raw and EMA weights) and `checkpoints/labels.npz`: the matched-accuracy
  comparison (`tf_dpfair.fairness.auc_report.compare_matched`) picks among
  these.
- `report_raw/`, `report_ema/`: the exact fairness report of the final model
  (`tf_dpfair.fairness.auc.evaluate` + `auc_report.write_report`, plus
  accuracy tables).
- `model.keras`, `predictions.npz` (final test scores), `settings.json`.
- `result.json`, written last: privacy statement, settings, data, metrics.
  A run whose result.json exists is finished; `run` returns it unchanged.
  A run whose backup holds all its updates, or as many as its privacy
  budget allows (stopped by the budget, then killed before result.json),
  says it is finished, trains nothing and writes its results.

Noise and sampling seeds are fresh secrets unless `deterministic` is set
(for tests: anyone who knows the seed can remove the noise).

With `strategy="multi_worker"` every worker runs the same command (TF_CONFIG
says which worker it is): the chief's sampling seed is shared with all, the
chief alone reads and writes `work_dir` (and restores the backup for all),
the others write nothing and `run` returns them a short result.

`run` is a sequence of named steps (`_plan_run`, `build_run_model`,
`restore_backup`, `_train`, `_write_result`); the settings are in
`settings_lib`, the backup in `backup_lib`, the model and its callbacks in
`run_model_lib`.
"""

import dataclasses
import json
import os
import secrets
import shutil
import time

import keras
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import pipeline
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import features_lib
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import selection_lib
# Importable from here, as before the settings, the backup and the model
# had modules of their own.
from tf_dpfair.experiments.backup_lib import (  # noqa: F401 (re-exported)
    nothing_left_to_train, restore_backup, updates_applied)
from tf_dpfair.experiments.run_model_lib import (  # noqa: F401 (re-exported)
    build_run_model, compile_model, extra_callbacks, last_diagnostics, metric_name)
from tf_dpfair.experiments.settings_lib import (  # noqa: F401 (re-exported)
    OPTIMIZERS, STRATEGIES, Settings, settings_from, write_json)
from tf_dpfair.experiments.settings_lib import json_safe as _json_safe  # noqa: F401

_restore = restore_backup
_compile = compile_model

RESULT_FILE = "result.json"
NO_TF_CONFIG = (
    "strategy='multi_worker' needs the TF_CONFIG environment variable on every "
    "worker (the cluster's addresses and this worker's index; see "
    "docs/training_and_privacy.md, 'Training on several machines'). Without it "
    "every machine would run a job of its own. For one machine use 'mirrored'.")


def make_strategy(name, tpu=""):
    """Returns the `tf.distribute` strategy called `name` (see `STRATEGIES`).

    Create it before any dataset: a multi-worker job configures its
    collective ops at start-up and fails once a `tf.data` dataset exists.

    Args:
        name: one of `STRATEGIES`.
        tpu: the TPU address, for "tpu".

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: an unknown name, or "multi_worker" without TF_CONFIG.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(NO_TF_CONFIG)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {name!r}.")


def _seeds(settings, strategy):
    """(sampling seed, noise seed): secret unless `deterministic`.

    On several workers every worker uses the chief's sampling seed, so all
    draw the same logical batches; the noise seed stays each worker's own
    (only the chief's first replica adds noise, see `DPTraining.train_step`).
    """
    if settings.deterministic:
        return settings.seed + 1, settings.seed + 2
    # DPConfig(seed=None) draws its own secret noise seed.
    return dpf.workers.share_from_chief(strategy, secrets.randbits(62)), None


def _privacy(settings, model, logger, sigma, spec, delta, total_steps):
    if logger is None:
        return {"private": False, "epsilon": None, "epsilon_label": "inf", "delta": None,
                "noise_multiplier": 0.0, "steps": updates_applied(model),
                "sampling": spec.accounting_sampling, "accountant": None,
                "statement": "Not private (trained without DP-SGD): epsilon = inf."}
    statement = logger.statement()
    config = model.dp_config
    split = None
    if config.adaptive_clipping:
        split = {"mode": config.adaptive_clipping,
                 "sum_noise_multiplier": config.gradient_noise_multiplier,
                 "count_noise_multiplier": config.count_noise_multiplier,
                 "target_quantile": config.target_quantile,
                 "final_threshold": float(keras.ops.convert_to_numpy(model._clip_threshold)),
                 "note": "sum and count of each update are one Gaussian mechanism of "
                         "multiplier noise_multiplier: 1/sigma^2 = 1/sigma_sum^2 + "
                         "1/sigma_count^2."}
    return {"private": True, "epsilon": statement.epsilon, "adaptive_clipping": split,
            "epsilon_label": f"{statement.epsilon:.3g}", "target_epsilon": settings.epsilon,
            "delta": statement.delta, "target_delta": delta, "noise_multiplier": sigma,
            "sampling_probability": statement.sampling_probability,
            "participations": statement.participations,
            "steps": statement.steps, "sampling": statement.sampling,
            "accountant": statement.accountant, "clip_norm": settings.clip_norm,
            "statement": str(statement), "pipeline": spec.statement(),
            # The guard also stops after the planned last update; only an
            # earlier stop means the budget cut the run short.
            "stopped_for_budget": statement.steps < total_steps}


def plan_updates(settings, spec, delta):
    """How many updates a run applies, and with which noise.

    Args:
        settings: the run's `Settings`.
        spec: its pipeline's `sampling.SamplingSpec`.
        delta: its target delta.

    Returns:
        `(period, epochs, total_steps, sigma)`: updates per Keras epoch,
        epochs, total updates (whole periods) and the noise multiplier
        (calibrated to `settings.epsilon` when given; 0 for non-private runs).
    """
    wanted = settings.steps or settings.epochs * spec.steps_per_epoch
    period = min(settings.steps_per_epoch or spec.steps_per_epoch, wanted)
    epochs = -(-wanted // period)  # Rounded up to whole periods.
    total_steps = epochs * period
    sigma = 0.0
    if settings.private:
        sigma = settings.noise_multiplier
        if sigma is None:
            sigma = dpf.privacy.accounting.calibrate_noise_multiplier(
                target_epsilon=settings.epsilon, delta=delta, accountant=settings.accountant,
                **spec.accountant_kwargs(total_steps))
    return period, epochs, total_steps, sigma


def _worker_result(strategy, privacy):
    """What `run` returns on a worker that is not the chief (it writes nothing)."""
    return {"finished": True, "chief": False,
            "worker": strategy.cluster_resolver.task_id,
            "num_workers": dpf.workers.num_workers(strategy), "privacy": privacy}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one run trains on and how long: data, seeds, sampling, updates, noise."""

    run_data: object
    validation: object
    replicas: int
    delta: float
    sampling_seed: int
    noise_seed: int | None
    spec: object
    period: int
    epochs: int
    total_steps: int
    sigma: float

    def pipeline(self, settings, start_step):
        """The run's `TrainData`, starting at update `start_step`."""
        return _train_data(settings, self.run_data, self.sampling_seed, self.replicas,
                           start_step)


def _train_data(settings, run_data, sampling_seed, replicas, start_step):
    return pipeline.make_train_dataset(
        run_data.train, expected_batch_size=settings.batch_size, seed=sampling_seed,
        mode=settings.sampling, microbatch_size=settings.microbatch_size,
        num_replicas=replicas, start_step=start_step,
        # Cached features hold their views already (`features_lib`).
        augmult=1 if run_data.train.features else settings.augmult,
        # Groups reach training batches only for the opt-in diagnostics.
        with_groups=settings.group_diagnostics and settings.private)


def _finished_result(settings, strategy):
    """The result of a run whose result.json exists (the chief reads it), else None."""
    chief = dpf.workers.is_chief(strategy)
    result_path = os.path.join(settings.work_dir, RESULT_FILE)
    finished = chief and os.path.exists(result_path)
    if not dpf.workers.share_from_chief(strategy, int(finished)):
        return None
    if not chief:
        return _worker_result(strategy, None)
    with open(result_path) as f:
        return json.load(f)


def _plan_run(settings, strategy):
    """Loads the data, draws the seeds and plans the updates and noise of a run."""
    run_data = inputs_lib.load_data(settings)
    validation = None
    if settings.validation_fraction:
        run_data, validation = selection_lib.carve_validation(
            run_data, settings.validation_fraction, settings.seed)
    delta = settings.delta or 1.0 / run_data.train.num_examples
    replicas = strategy.num_replicas_in_sync
    sampling_seed, noise_seed = _seeds(settings, strategy)
    spec = _train_data(settings, run_data, sampling_seed, replicas, 0).spec
    period, epochs, total_steps, sigma = plan_updates(settings, spec, delta)
    print(f"{run_data.description}; {total_steps} updates of expected batch "
          f"{settings.batch_size}; "
          + (f"noise multiplier {sigma:.4g}" if settings.private else "non-private"))
    return _Plan(run_data=run_data, validation=validation, replicas=replicas,
                 delta=delta, sampling_seed=sampling_seed, noise_seed=noise_seed,
                 spec=spec, period=period, epochs=epochs, total_steps=total_steps,
                 sigma=sigma)


def _cached_plan(settings, plan, strategy, chief):
    """The plan on the frozen backbone's features: (plan, head to train, what to record)."""
    with strategy.scope():
        model = inputs_lib.build_model(settings, plan.run_data)
    cached = features_lib.cached_run(settings, plan.run_data, plan.validation, model,
                                     write=chief)
    record = {"views_per_training_example": settings.augmult,
              "views_drawn": "once per example (not per update)",
              "files": cached.files}
    return (dataclasses.replace(plan, run_data=cached.run_data, validation=cached.validation),
            cached.head, record)


def _privacy_logger(settings, model, plan, chief):
    """The `PrivacyLogger` of a private run, its model set; None when non-private."""
    if not settings.private:
        return None
    # On every worker: a budget stop must end every worker's fit at the
    # same update, and each states the job's epsilon.
    logger = dpf.callbacks.PrivacyLogger(
        delta=plan.delta, sampling_spec=plan.spec, accountant=settings.accountant,
        target_epsilon=settings.epsilon, verbose=int(chief))
    # Its statement reads the model's update count, with or without fit.
    logger.set_model(model)
    return logger


def _standard_callbacks(settings, plan, test, logger, backup_dir, chief):
    """The run's own callbacks: the logger, and the chief's writers."""
    standard = [logger] if logger else []
    if not chief:  # Writers: the chief's alone.
        return standard
    work_dir = settings.work_dir
    standard += [evaluation_lib.EpochEvaluation(
        test, plan.run_data, os.path.join(work_dir, "checkpoints"), settings.eval_every,
        every_updates=settings.checkpoint_every_updates, validation=plan.validation,
        validation_batch_size=settings.eval_batch_size)]
    standard += extra_callbacks(settings, work_dir, privacy_logger=logger,
                                run_data=plan.run_data, test=test)
    standard += [keras.callbacks.TensorBoard(os.path.join(work_dir, "tensorboard"),
                                             write_graph=False, profile_batch=0),
                 # Last, so an epoch's checkpoint files exist before its backup.
                 keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)]
    return standard


def _train(model, settings, plan, start, logger, callbacks, verbose):
    """Fits the updates left after `start`; returns the last epoch's diagnostics."""
    # A run stopped by its budget (or complete) but killed before result.json
    # is finished: fit would only refuse to start.
    finished = nothing_left_to_train(model, logger, plan.total_steps)
    if finished:
        print(finished)
        return {}
    print(f"Training from update {start} of {plan.total_steps}.")
    # initial_epoch is given, not left to BackupAndRestore: only the
    # chief has that callback, and every worker must run the same epochs.
    history = model.fit(plan.pipeline(settings, start).dataset, epochs=plan.epochs,
                        initial_epoch=start // plan.period, steps_per_epoch=plan.period,
                        callbacks=callbacks, verbose=verbose)
    return last_diagnostics(history.history)


def _write_result(settings, model, plan, test, privacy, training, backup_dir):
    """Evaluates the final model, writes model.keras and result.json; returns the result."""
    run_data, work_dir = plan.run_data, settings.work_dir
    result = {
        "finished": True, "settings": settings.to_json(), "privacy": privacy,
        "data": {"description": run_data.description,
                 "num_train": run_data.train.num_examples,
                 "num_test": run_data.test.num_examples,
                 "multi_label": run_data.multi_label,
                 "groups": {a: list(run_data.group_spec.names(a))
                            for a in run_data.group_spec.attributes}},
        "training": training,
        "metrics": evaluation_lib.evaluate_final(model, run_data, test, work_dir,
                                                  settings.n_bootstrap),
    }
    if plan.validation is not None:
        result["selection"] = selection_lib.selection_score(model, run_data,
                                                            plan.validation, settings)
    result_path = os.path.join(work_dir, RESULT_FILE)
    model.save(os.path.join(work_dir, "model.keras"))
    write_json(result_path, result)
    shutil.rmtree(backup_dir, ignore_errors=True)
    with open(result_path) as f:
        return json.load(f)


def run(settings, *, callbacks=(), strategy=None, verbose=2):
    """Trains, evaluates and writes one run (see the module docstring).

    Args:
        settings: a `Settings` with a `work_dir`.
        callbacks: more Keras callbacks for `fit` (run before the standard
            ones' epoch-end writers; tests use this to interrupt a run).
        strategy: a `tf.distribute.Strategy` to use instead of
            `settings.strategy`.
        verbose: `fit` verbosity.

    On several workers (`strategy="multi_worker"`), run it on every worker
    with the same settings: only the chief reads and writes `work_dir`; the
    others train their share of every logical batch and write nothing.

    Returns:
        The result dict, as written to result.json (read back unchanged when
        the run had finished before). On a worker other than the chief:
        `{"finished", "chief": False, "worker", "num_workers", "privacy"}`
        (privacy None when the chief found the run finished).

    Raises:
        ValueError: no work_dir, bad settings, or a backup of other settings.
    """
    if not settings.work_dir:
        raise ValueError("settings.work_dir is required.")
    # First: a multi-worker job must configure its collective ops before any
    # dataset exists (loading the data builds some).
    strategy = strategy or make_strategy(settings.strategy, settings.tpu)
    chief = dpf.workers.is_chief(strategy)
    finished = _finished_result(settings, strategy)
    if finished is not None:
        return finished
    if chief:  # The other workers write nowhere.
        os.makedirs(settings.work_dir, exist_ok=True)
        write_json(os.path.join(settings.work_dir, "settings.json"), settings.to_json())
    keras.utils.set_random_seed(settings.seed)
    plan = _plan_run(settings, strategy)
    base, features = None, None
    if settings.cache_features:
        plan, base, features = _cached_plan(settings, plan, strategy, chief)
    model = build_run_model(settings, plan.run_data, plan.sigma, plan.noise_seed,
                            strategy, base=base)
    backup_dir = os.path.join(settings.work_dir, "backup")
    # Outside the scope: there Keras's load_weights runs collective ops, which
    # the other workers (not loading) would never join.
    start = restore_backup(model, backup_dir, plan.period, strategy)
    test = pipeline.make_eval_dataset(plan.run_data.test,
                                      batch_size=settings.eval_batch_size,
                                      microbatch_size=1, num_replicas=1)
    logger = _privacy_logger(settings, model, plan, chief)
    standard = _standard_callbacks(settings, plan, test, logger, backup_dir, chief)
    started = time.time()
    diagnostics = _train(model, settings, plan, start, logger,
                         list(callbacks) + standard, verbose if chief else 0)
    train_seconds = time.time() - started
    privacy = _privacy(settings, model, logger, plan.sigma, plan.spec, plan.delta,
                       plan.total_steps)
    if not chief:
        return _worker_result(strategy, privacy)
    training = {"epochs": plan.epochs, "steps_per_epoch": plan.period,
                "total_steps": plan.total_steps, "replicas": plan.replicas,
                "workers": dpf.workers.num_workers(strategy),
                "seconds_this_session": train_seconds,
                "cached_features": features,
                # Training data, outside the DP guarantee (last epoch).
                "diagnostics": diagnostics}
    return _write_result(settings, model, plan, test, privacy, training, backup_dir)
