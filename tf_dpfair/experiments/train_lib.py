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
  comparison (`reports.compare_matched`) picks among these.
- `report_raw/`, `report_ema/`: the exact fairness report of the final model
  (`fairness.evaluate` + `reports.write_report`, plus accuracy tables).
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
"""

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

import tf_dpfair as dpf
from tf_dpfair.data import pipeline as data_lib
from tf_dpfair.experiments import configs
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import selection_lib

RESULT_FILE = "result.json"
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
NO_TF_CONFIG = (
    "strategy='multi_worker' needs the TF_CONFIG environment variable on every "
    "worker (the cluster's addresses and this worker's index; see "
    "docs/training_and_privacy.md, 'Training on several machines'). Without it "
    "every machine would run a job of its own. For one machine use 'mirrored'.")
OPTIMIZERS = ("sgd", "adam")


def _field(default, help_text):
    kind = dict if isinstance(default, dict) else None
    if kind:
        return dataclasses.field(default_factory=dict, metadata={"help": help_text})
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of one run; `train.py` has one flag per field (see each help)."""

    dataset: str = _field("fashion_mnist", f"Dataset: {', '.join(inputs_lib.DATASETS)}.")
    data_dir: str = _field("", "Dataset folder (TFDS data_dir); '' = the dataset's default.")
    dataset_options: dict = _field({}, "JSON dict of extra loader arguments.")
    train_examples: int = _field(0, "Random subset of the training split (0 = all).")
    test_examples: int = _field(0, "Random subset of the test split (0 = all).")
    rotated_fraction: float = _field(0.0, "MNIST-like data: share of training images "
                                     "rotated 90 degrees (group 'orientation').")
    test_rotated_fraction: float = _field(None, "Share of rotated test images "
                                          "(default: rotated_fraction).")
    image_size: int = _field(0, "Image side for file/TFDS datasets (0 = 224).")
    model: str = _field("tiny_cnn", f"Model: {', '.join(inputs_lib.MODELS)}.")
    model_options: dict = _field({}, "JSON dict of model arguments (e.g. depth, "
                                 "image_size for efficientnet_lite0).")
    pretrained: str = _field("", "'imagenet' (efficientnet_lite0), a .keras/.weights.h5 "
                             "file, or '' for random initialisation.")
    finetune: str = _field("all", "Trainable layers: head, last_blocks, all.")
    finetune_blocks: int = _field(1, "Blocks trained by finetune=last_blocks.")
    non_private: bool = _field(False, "Train without DP (NonPrivateModel, epsilon = inf).")
    epsilon: float = _field(None, "Target epsilon; the noise multiplier is calibrated "
                            "to it. inf means non-private.")
    noise_multiplier: float = _field(None, "Noise multiplier (instead of epsilon).")
    delta: float = _field(None, "Target delta (default 1/N).")
    clip_norm: float = _field(1.0, "Per-example gradient clip norm C.")
    accountant: str = _field("rdp", "Accountant: rdp or pld.")
    sampling: str = _field("poisson", "Logical batches: poisson or shuffle.")
    batch_size: int = _field(256, "Logical (expected) batch size per update.")
    microbatch_size: int = _field(32, "Examples per vectorized per-example pass.")
    augmult: int = _field(1, "Augmentation multiplicity K.")
    ema_decay: float = _field(0.0, "EMA decay of the weights (0 = no EMA).")
    epochs: int = _field(1, "Epochs (ignored when steps > 0).")
    steps: int = _field(0, "Total updates (0 = use epochs).")
    steps_per_epoch: int = _field(0, "Updates per Keras epoch, the period of evaluation, "
                                  "checkpoints and logs (0 = N / batch_size).")
    optimizer: str = _field("sgd", "Optimizer: sgd or adam.")
    learning_rate: float = _field(0.5, "Learning rate.")
    momentum: float = _field(0.0, "SGD momentum.")
    non_private_optimizer: str = _field("", "Optimizer of non-private runs ('' = optimizer); "
                                        "their gradients are not clipped, so they often "
                                        "need other settings.")
    non_private_learning_rate: float = _field(0.0, "Learning rate of non-private runs "
                                              "(0 = learning_rate).")
    strategy: str = _field("default", f"tf.distribute strategy: {', '.join(STRATEGIES)}.")
    tpu: str = _field("", "TPU address for strategy=tpu.")
    work_dir: str = _field("", "Output folder of the run.")
    seed: int = _field(0, "Seed of initialisation, subsets and rotated images.")
    deterministic: bool = _field(False, "Derive noise and sampling seeds from seed "
                                 "(reproducible, NOT private: for tests).")
    eval_batch_size: int = _field(500, "Evaluation batch size.")
    eval_every: int = _field(1, "Evaluate on test every N epochs (0 = final only).")
    n_bootstrap: int = _field(200, "Bootstrap replicates of the report's intervals.")
    group_diagnostics: bool = _field(False, "Private runs: per-group training diagnostics "
                                     "(clip fraction, gradient norms, loss per group) in the "
                                     "epoch logs and dashboards; outside the DP guarantee.")
    diagnostics_alignment: bool = _field(False, "With group_diagnostics: each group's share "
                                         "of the clipped sum and the update's cosine with "
                                         "its gradient (extra backward passes).")
    validation_fraction: float = _field(0.0, "Share of the training data held out as a "
                                        "validation split for a selection score "
                                        "(result.json 'selection'; 0 = none). N, q and "
                                        "delta then count the rest only.")
    score_noise: float = _field(0.0, "Std of the Gaussian noise on the selection score, "
                                "a count of correct validation predictions (sensitivity "
                                "1); needed for a private run's score unless "
                                "public_validation.")
    public_validation: bool = _field(False, "Declare the validation split public: its "
                                     "exact score is released and the DP guarantee does "
                                     "not cover it.")

    @property
    def private(self):
        """False for non-private runs (flag, or epsilon = inf)."""
        return not (self.non_private or (self.epsilon is not None
                                         and math.isinf(self.epsilon)))

    def to_json(self):
        """The settings as a JSON-safe dict (inf becomes "inf").

        The selection fields are left out while no validation split is asked
        for, so runs without one write the same files as before they existed.
        """
        values = dataclasses.asdict(self)
        if not self.validation_fraction:
            for name in _SELECTION_FIELDS:
                if values[name] == _DEFAULTS[name]:
                    del values[name]
        return _json_safe(values)


_SELECTION_FIELDS = ("validation_fraction", "score_noise", "public_validation")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


def settings_from(config=None, overrides=None):
    """Builds `Settings`: defaults, then a named config, then overrides.

    Args:
        config: name of a module in `configs` (its `SETTINGS`), or None.
        overrides: dict field -> value applied last (e.g. flags given).

    Returns:
        A validated `Settings`.

    Raises:
        ValueError: unknown fields or config, or inconsistent values.
    """
    values = dict(configs.load(config).SETTINGS) if config else {}
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown settings {unknown}; known: {sorted(known)}.")
    # Whole numbers given for float fields (a sweep's "--grid=learning_rate=1,2",
    # a JSON flag) become floats: Keras refuses an int learning rate.
    for field in dataclasses.fields(Settings):
        value = values.get(field.name)
        if field.type in (float, "float") and isinstance(value, int) and not isinstance(
                value, bool):
            values[field.name] = float(value)
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s):
    if s.private and s.epsilon is None and s.noise_multiplier is None:
        raise ValueError("A private run needs epsilon or noise_multiplier "
                         "(or non_private=True).")
    if s.private and s.epsilon is not None and s.noise_multiplier is not None:
        raise ValueError("Give epsilon or noise_multiplier, not both.")
    if s.non_private_optimizer not in ("",) + OPTIMIZERS:
        raise ValueError(f"non_private_optimizer must be '' or one of {OPTIMIZERS}.")
    for name, allowed in (("strategy", STRATEGIES), ("optimizer", OPTIMIZERS),
                          ("sampling", ("poisson", "shuffle")),
                          ("accountant", ("rdp", "pld"))):
        if getattr(s, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {getattr(s, name)!r}.")
    if s.epochs < 1 and s.steps < 1:
        raise ValueError("epochs or steps must be >= 1.")
    _validate_selection(s)


def _validate_selection(s):
    if not 0 <= s.validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got "
                         f"{s.validation_fraction!r}.")
    if not (s.score_noise >= 0 and math.isfinite(s.score_noise)):
        raise ValueError(f"score_noise must be a finite number >= 0; got {s.score_noise!r}.")
    if not s.validation_fraction:
        if s.score_noise or s.public_validation:
            raise ValueError("score_noise and public_validation describe the selection "
                             "score; they need validation_fraction > 0.")
        return
    if s.score_noise and s.public_validation:
        raise ValueError("Give score_noise or public_validation, not both: a score on "
                         "data declared public needs no noise.")
    if s.private and not s.score_noise and not s.public_validation:
        raise ValueError(
            "A private run's selection score needs score_noise > 0 (a Gaussian noisy "
            "count) or public_validation=True: the exact count of correct predictions "
            "on private validation data would leak it.")


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return "inf" if math.isinf(value) else (None if math.isnan(value) else float(value))
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def write_json(path, value):
    """Writes JSON atomically (a reader never sees half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(_json_safe(value), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


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


def extra_callbacks(settings, work_dir, *, privacy_logger, run_data, test):
    """The TensorBoard fairness dashboard of a run (and its diagnostics).

    With group attributes, the dashboard evaluates the test split exactly
    each epoch: per-group AUC and error rates with bootstrap bands
    (`tf_dpfair.dashboards.callback`), at the top-1 class for multi-class data and at
    `evaluation_lib.THRESHOLD` for multi-label data. Private runs with
    `group_diagnostics` also get `diagnostics.GroupDiagnostics` first, so the
    dashboard shows the training-set figures in their own category.
    """
    grouped = bool(run_data.group_spec.attributes)
    multi_class = not run_data.multi_label
    found = []
    if settings.group_diagnostics and settings.private and grouped:
        found.append(dpf.training.diagnostics.GroupDiagnostics(
            run_data.group_spec, alignment=settings.diagnostics_alignment))
    found.append(dpf.dashboards.FairnessDashboard(
        os.path.join(work_dir, "tensorboard"), privacy_logger=privacy_logger,
        hparams={"dataset": settings.dataset, "model": settings.model},
        evaluation_data=test if grouped else None,
        group_names=run_data.group_spec if grouped else None,
        n_bootstrap=max(1, settings.n_bootstrap // 5),
        threshold=None if multi_class else evaluation_lib.THRESHOLD,
        multi_class=multi_class and grouped, from_logits=True))
    return found


def _compile(model, settings, run_data):
    multi_label = run_data.multi_label
    loss_class = (keras.losses.BinaryCrossentropy if multi_label
                  else keras.losses.SparseCategoricalCrossentropy)
    # Mean over real rows: weight-0 padding of Poisson batches must not dilute
    # the non-private loss (the DP step divides by the expected batch itself).
    loss = loss_class(from_logits=True, reduction="mean_with_sample_weight")
    rate, name = settings.learning_rate, settings.optimizer
    if not settings.private:
        rate = settings.non_private_learning_rate or rate
        name = settings.non_private_optimizer or name
    if name == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=settings.momentum)
    else:
        optimizer = keras.optimizers.Adam(rate)
    metrics = [] if multi_label else ["accuracy"]
    if run_data.group_spec.attributes:
        # Streaming per-group error rates on validation data (never training).
        metrics.append(dpf.fairness.streaming_rates.GroupedErrorRates(
            run_data.group_spec.to_dict(), from_logits=True,
            threshold=evaluation_lib.THRESHOLD if multi_label else None,
            multi_class=not multi_label,
            label_names=[metric_name(n) for n in run_data.class_names]))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics or None)


def metric_name(class_name):
    """A class name as a part of a metric's name: no spaces, no '/'.

    Fashion-MNIST's "T-shirt/top" becomes "T-shirt_top": metric names are
    '/'-separated keys, and the metrics refuse a '/' inside a part.
    """
    return re.sub(r"[\s/]+", "_", str(class_name))


def updates_applied(model):
    """Optimizer updates applied so far (saved with the model and its backups)."""
    if isinstance(model, dpf.DPTraining):
        return model.update_count
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _restore(model, backup_dir, steps_per_epoch, strategy):
    """Loads the backup (if any) and returns the updates already applied.

    BackupAndRestore would load it too, but only inside `fit`; the pipeline
    has to know the update count before `fit` to restart at the right batch.
    On several workers the chief alone reads the backup and every worker
    gets its state (`cluster.copy_from_chief`): the others need no access
    to the work dir.
    """
    chief = dpf.workers.is_chief(strategy)
    weights = os.path.join(backup_dir, "latest.weights.h5")
    found = chief and os.path.exists(weights)
    if not dpf.workers.share_from_chief(strategy, int(found)):
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    problem = None
    if chief:
        model.load_weights(weights)
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            epoch = json.load(f)["epoch"]
        done = updates_applied(model)
        if done != epoch * steps_per_epoch:
            problem = (f"The backup in {backup_dir} holds {done} updates after {epoch} "
                       f"epochs of {steps_per_epoch}: it belongs to other settings. "
                       f"Remove it or use another work_dir.")
    # Every worker stops on the chief's finding, rather than wait for it.
    if dpf.workers.share_from_chief(strategy, int(problem is not None)):
        raise ValueError(problem or "The chief found a backup of other settings "
                         "in its work_dir (see its output).")
    dpf.workers.copy_from_chief(strategy, model.variables + model.optimizer.variables)
    return updates_applied(model)


def nothing_left_to_train(model, logger, total_steps):
    """Says why a restored run has no update left to train, or None.

    A private run with a target epsilon is finished once it has updates and
    one more would take epsilon above the target (the budget stopped it,
    possibly at its last planned update); any run is finished once it has
    `total_steps` updates.

    Args:
        model: the model, with its restored update count.
        logger: the run's `PrivacyLogger` (None for non-private runs), with
            its model set.
        total_steps: the updates the run plans.

    Returns:
        The message to print, or None when updates are left.
    """
    done = updates_applied(model)
    # With no update yet, a budget that fits none is the logger's refusal.
    if done and logger is not None and logger.target_epsilon is not None:
        now, after = logger.statement(done), logger.statement(done + 1)
        if after.epsilon > logger.target_epsilon:
            return (f"The run is finished: the privacy budget epsilon="
                    f"{logger.target_epsilon} was reached after {done} updates "
                    f"(epsilon {now.epsilon:.4g}, delta {now.delta:.3g}; one more "
                    f"update would take epsilon to {after.epsilon:.4g}). Nothing "
                    f"left to train.")
    if done >= total_steps:
        spent = "" if logger is None else f" (epsilon {logger.statement(done).epsilon:.4g})"
        return (f"The run is finished: all {total_steps} updates were applied"
                f"{spent}. Nothing left to train.")
    return None


def last_diagnostics(history):
    """The last epoch's per-group training diagnostics, nested by attribute and group.

    Args:
        history: `History.history` of `fit` (log name -> list of values).

    Returns:
        dict attribute -> group -> figure -> value (empty without
        `diagnostics.GroupDiagnostics`); figures of training data, outside
        the DP guarantee.
    """
    nested = {}
    for key, values in history.items():
        parts = key[len(dpf.training.diagnostics.PREFIX):].split("/")
        if key.startswith(dpf.training.diagnostics.PREFIX) and len(parts) == 3 and values:
            attribute, group, figure = parts
            nested.setdefault(attribute, {}).setdefault(group, {})[figure] = values[-1]
    return nested


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
    return {"private": True, "epsilon": statement.epsilon,
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
    work_dir = settings.work_dir
    result_path = os.path.join(work_dir, RESULT_FILE)
    finished = chief and os.path.exists(result_path)
    if dpf.workers.share_from_chief(strategy, int(finished)):
        if not chief:
            return _worker_result(strategy, None)
        with open(result_path) as f:
            return json.load(f)
    if chief:  # The other workers write nowhere.
        os.makedirs(work_dir, exist_ok=True)
        write_json(os.path.join(work_dir, "settings.json"), settings.to_json())
    keras.utils.set_random_seed(settings.seed)
    run_data = inputs_lib.load_data(settings)
    validation = None
    if settings.validation_fraction:
        run_data, validation = selection_lib.carve_validation(
            run_data, settings.validation_fraction, settings.seed)
    replicas = strategy.num_replicas_in_sync
    num_train = run_data.train.num_examples
    delta = settings.delta or 1.0 / num_train
    sampling_seed, noise_seed = _seeds(settings, strategy)

    def pipeline(start_step):
        return data_lib.make_train_dataset(
            run_data.train, expected_batch_size=settings.batch_size, seed=sampling_seed,
            mode=settings.sampling, microbatch_size=settings.microbatch_size,
            num_replicas=replicas, augmult=settings.augmult, start_step=start_step,
            # Groups reach training batches only for the opt-in diagnostics.
            with_groups=settings.group_diagnostics and settings.private)

    spec = pipeline(0).spec
    period, epochs, total_steps, sigma = plan_updates(settings, spec, delta)
    print(f"{run_data.description}; {total_steps} updates of expected batch "
          f"{settings.batch_size}; "
          + (f"noise multiplier {sigma:.4g}" if settings.private else "non-private"))

    with strategy.scope():
        base = inputs_lib.build_model(settings, run_data)
        if settings.private:
            config = dpf.DPConfig(
                l2_norm_clip=settings.clip_norm, noise_multiplier=sigma,
                expected_batch_size=settings.batch_size,
                microbatch_size=settings.microbatch_size, augmult=settings.augmult,
                ema_decay=settings.ema_decay or None, seed=noise_seed)
            model = dpf.make_private(base, config)
        else:
            if settings.augmult > 1:
                raise ValueError("augmult > 1 is implemented by DPModel only.")
            model = dpf.make_non_private(base)
        _compile(model, settings, run_data)
    backup_dir = os.path.join(work_dir, "backup")
    # Outside the scope: there Keras's load_weights runs collective ops, which
    # the other workers (not loading) would never join.
    start = _restore(model, backup_dir, period, strategy)

    test = data_lib.make_eval_dataset(run_data.test, batch_size=settings.eval_batch_size,
                                      microbatch_size=1, num_replicas=1)
    logger = None
    if settings.private:
        # On every worker: a budget stop must end every worker's fit at the
        # same update, and each states the job's epsilon.
        logger = dpf.callbacks.PrivacyLogger(
            delta=delta, sampling_spec=spec, accountant=settings.accountant,
            target_epsilon=settings.epsilon, verbose=int(chief))
        # Its statement reads the model's update count, with or without fit.
        logger.set_model(model)
    standard = [logger] if logger else []
    if chief:  # Writers: the chief's alone.
        standard += [evaluation_lib.EpochEvaluation(
            test, run_data, os.path.join(work_dir, "checkpoints"), settings.eval_every)]
        standard += extra_callbacks(settings, work_dir, privacy_logger=logger,
                                    run_data=run_data, test=test)
        standard += [keras.callbacks.TensorBoard(os.path.join(work_dir, "tensorboard"),
                                                 write_graph=False, profile_batch=0),
                     # Last, so an epoch's checkpoint files exist before its backup.
                     keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)]
    started = time.time()
    # A run stopped by its budget (or complete) but killed before result.json
    # is finished: fit would only refuse to start.
    finished = nothing_left_to_train(model, logger, total_steps)
    diagnostics = {}
    if finished:
        print(finished)
    else:
        print(f"Training from update {start} of {total_steps}.")
        # initial_epoch is given, not left to BackupAndRestore: only the
        # chief has that callback, and every worker must run the same epochs.
        history = model.fit(pipeline(start).dataset, epochs=epochs,
                            initial_epoch=start // period, steps_per_epoch=period,
                            callbacks=list(callbacks) + standard,
                            verbose=verbose if chief else 0)
        diagnostics = last_diagnostics(history.history)
    train_seconds = time.time() - started
    if not chief:
        return _worker_result(strategy, _privacy(settings, model, logger, sigma, spec,
                                                 delta, total_steps))
    result = {
        "finished": True, "settings": settings.to_json(),
        "privacy": _privacy(settings, model, logger, sigma, spec, delta, total_steps),
        "data": {"description": run_data.description, "num_train": num_train,
                 "num_test": run_data.test.num_examples,
                 "multi_label": run_data.multi_label,
                 "groups": {a: list(run_data.group_spec.names(a))
                            for a in run_data.group_spec.attributes}},
        "training": {"epochs": epochs, "steps_per_epoch": period,
                     "total_steps": total_steps, "replicas": replicas,
                     "workers": dpf.workers.num_workers(strategy),
                     "seconds_this_session": train_seconds,
                     # Training data, outside the DP guarantee (last epoch).
                     "diagnostics": diagnostics},
        "metrics": evaluation_lib.evaluate_final(model, run_data, test, work_dir,
                                                  settings.n_bootstrap),
    }
    if validation is not None:
        result["selection"] = selection_lib.selection_score(model, run_data, validation,
                                                            settings)
    model.save(os.path.join(work_dir, "model.keras"))
    write_json(result_path, result)
    shutil.rmtree(backup_dir, ignore_errors=True)
    with open(result_path) as f:
        return json.load(f)
