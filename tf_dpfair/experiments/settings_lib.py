"""The settings of one training run (`Settings`), and the JSON they and results are written as.

`train.py` has one flag per `Settings` field (`flags_lib`); `settings_from`
builds them from defaults, a named config (`configs`) and overrides, and
refuses inconsistent values. `train_lib.run` trains one run from them.
"""

import dataclasses
import json
import math
import os

import numpy as np

from tf_dpfair.config import ADAPTIVE_CLIPPING
from tf_dpfair.experiments import configs
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.privacy import sampling

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
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
    cache_features: bool = _field(False, "finetune=head: compute the frozen backbone's "
                                  "features once (augmult views per training example, "
                                  "drawn once, not per update) and train the head on them; "
                                  "the DP step, sampling and accounting are unchanged.")
    feature_cache_dir: str = _field("", "Folder of cached features, shared by runs with "
                                    "the same data and backbone ('' = <work_dir>/features).")
    non_private: bool = _field(False, "Train without DP (NonPrivateModel, epsilon = inf).")
    epsilon: float = _field(None, "Target epsilon; the noise multiplier is calibrated "
                            "to it. inf means non-private.")
    noise_multiplier: float = _field(None, "Noise multiplier (instead of epsilon).")
    delta: float = _field(None, "Target delta (default 1/N).")
    clip_norm: float = _field(1.0, "Per-example gradient clip norm C.")
    adaptive_clipping: str = _field("", "'' (fixed clip norm), 'quantile' (the clip norm "
                                    "follows a private quantile of the gradient norms) or "
                                    "'global_adapt' (DPSGD-Global-Adapt: gradients below an "
                                    "adapted threshold Z scaled by C / Z, above it clipped "
                                    "to C); see DPConfig.")
    count_noise_multiplier: float = _field(0.0, "Adaptive clipping: noise stddev of the "
                                           "count that adapts the threshold (0 = "
                                           "batch_size / 20); must exceed the noise "
                                           "multiplier, whose budget it shares.")
    target_quantile: float = _field(0.0, "Adaptive clipping: share of examples whose "
                                    "gradient norm should be at most the threshold "
                                    "(0 = 0.5 for quantile, 0.9 for global_adapt).")
    threshold_learning_rate: float = _field(0.2, "Adaptive clipping: learning rate of "
                                            "the threshold's geometric update.")
    accountant: str = _field("rdp", "Accountant: rdp or pld.")
    sampling: str = _field("poisson", "Logical batches: poisson or shuffle.")
    batch_size: int = _field(256, "Logical (expected) batch size per update.")
    microbatch_size: int = _field(32, "Examples per vectorized per-example pass.")
    augmult: int = _field(1, "Augmentation multiplicity K.")
    ema_decay: float = _field(0.0, "EMA decay of the weights (0 = no EMA).")
    ema_warmup: float = _field(10.0, "Horizon h of the EMA warm-up: update t uses the decay "
                               "min(ema_decay, (1 + t) / (h + t)); 0 = no warm-up.")
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
    checkpoint_every_updates: int = _field(0, "Also score and save a checkpoint every N "
                                           "optimizer updates (checkpoints/update_NNNNNN"
                                           ".npz), for a dense non-private curve and "
                                           "validation curve; 0 = evaluated epochs only.")
    n_bootstrap: int = _field(200, "Bootstrap replicates of the report's intervals.")
    dashboard_every: int = _field(1, "Epochs between the TensorBoard dashboard's exact "
                                  "evaluations of the test split (0 = none; the logged "
                                  "figures are still written).")
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
        for name in _OMITTED_AT_DEFAULT:  # newer fields, as before they existed
            if values[name] == _DEFAULTS[name]:
                del values[name]
        if not self.validation_fraction:
            for name in _SELECTION_FIELDS:
                if values[name] == _DEFAULTS[name]:
                    del values[name]
        return json_safe(values)


_SELECTION_FIELDS = ("validation_fraction", "score_noise", "public_validation")
_OMITTED_AT_DEFAULT = ("cache_features", "feature_cache_dir", "dashboard_every",
                 "adaptive_clipping", "count_noise_multiplier", "target_quantile",
                 "threshold_learning_rate")
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
                          ("sampling", sampling.MODES),
                          ("accountant", ("rdp", "pld"))):
        if getattr(s, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {getattr(s, name)!r}.")
    if s.epochs < 1 and s.steps < 1:
        raise ValueError("epochs or steps must be >= 1.")
    _validate_checkpoints(s)
    _validate_selection(s)
    _validate_cache(s)
    _validate_dashboard(s)
    _validate_adaptive(s)


def _validate_adaptive(s):
    if s.adaptive_clipping not in ("",) + ADAPTIVE_CLIPPING:
        raise ValueError(f"adaptive_clipping must be '' or one of {ADAPTIVE_CLIPPING}; got "
                         f"{s.adaptive_clipping!r}.")
    if not s.adaptive_clipping and (s.count_noise_multiplier or s.target_quantile):
        raise ValueError("count_noise_multiplier and target_quantile set the adaptive "
                         "threshold; they need adaptive_clipping.")
    if s.adaptive_clipping and not s.private:
        raise ValueError("adaptive_clipping is a clipping mode of private runs; a "
                         "non-private run clips nothing.")


def _validate_dashboard(s):
    value = s.dashboard_every
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"dashboard_every must be an integer >= 0 (epochs; 0 = no exact "
                         f"evaluation on the dashboard); got {value!r}.")


def _validate_cache(s):
    if not s.cache_features:
        if s.feature_cache_dir:
            raise ValueError("feature_cache_dir is the folder of cache_features; it needs "
                             "cache_features=True.")
        return
    if s.finetune != "head":
        raise ValueError(f"cache_features needs a frozen backbone (finetune='head'); got "
                         f"finetune={s.finetune!r}, whose backbone changes as it trains.")
    if s.strategy in ("multi_worker", "tpu"):
        raise ValueError(f"cache_features runs on one machine (strategy 'default' or "
                         f"'mirrored'); got {s.strategy!r}.")


def _validate_checkpoints(s):
    value = s.checkpoint_every_updates
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"checkpoint_every_updates must be an integer >= 0 (a period in "
                         f"optimizer updates; 0 = checkpoints at evaluated epochs only); "
                         f"got {value!r}.")


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


def json_safe(value):
    """`value` with JSON-safe leaves: inf becomes "inf", NaN None, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return "inf" if math.isinf(value) else (None if math.isnan(value) else float(value))
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def write_json(path, value):
    """Writes JSON atomically (a reader never sees half a file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(json_safe(value), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
