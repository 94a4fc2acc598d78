"""A private hyperparameter search: random trials, the best one released, its cost counted.

After Papernot & Steinke (ICLR 2022): `run_private_search` draws the number
of trials K from a `search_privacy.TrialCount` with a secret seed, draws each
trial's hyperparameters at random from a search space, trains every trial
as an ordinary private run (`train_lib.run`) that also releases a noisy
selection score on a validation split of its training data
(`selection_lib`), and releases only the trial with the best noisy score,
with one (epsilon, delta) for the whole search.

Folders under `work_dir`:

- `private/`: the curator's, never to be published: `search_seed.json` (the
  secret seed; a rerun resumes with the same K and trials), `plan.json` (the
  search it belongs to) and `trials/trial_NNN/` (every trial's full run
  folder: backups, checkpoints, TensorBoard logs, reports).
- `released/`: what may be published: the selected trial's `model.keras`,
  `result.json`, `settings.json`, `predictions.npz`, `report_raw/`,
  `report_ema/` (its work_dir rewritten to `released/`), and `search.json`
  (the search's statement, K's distribution, the space, the selected
  hyperparameters and noisy score). K itself and the selected trial's
  index are not released: the theorem bounds the best trial's release with K
  hidden, and revealing K (or a lower bound on it) could cost more.

Rerunning the same search skips finished trials (result.json present) and
resumes an interrupted one from its backup.
"""

import json
import math
import os
import secrets
import shutil

import keras
import numpy as np

from tf_dpfair.privacy import input_sampling
from tf_dpfair.privacy import sampling
from tf_dpfair.privacy import search as search_privacy
from tf_dpfair.experiments import configs
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import selection_lib
from tf_dpfair.experiments import train_lib

PRIVATE_DIR = "private"
RELEASED_DIR = "released"
SEED_FILE = "search_seed.json"
PLAN_FILE = "plan.json"
SEARCH_FILE = "search.json"
DEFAULT_VALIDATION_FRACTION = 0.1
# What is copied from the selected trial; the rest of its folder (backup/,
# checkpoints/, tensorboard/ with training-data figures) stays private.
RELEASED_FILES = ("model.keras", "result.json", "settings.json", "predictions.npz")
RELEASED_FOLDERS = ("report_raw", "report_ema")
# Settings that change a trial's DP event, the data it sees or the privacy
# of its noise: every trial must satisfy the one RDP bound the accounting
# uses, so none of these may vary.
FIXED_SETTINGS = frozenset((
    "batch_size", "epochs", "steps", "steps_per_epoch", "noise_multiplier", "epsilon",
    "delta", "sampling", "train_examples", "validation_fraction", "non_private",
    "augmult", "accountant", "microbatch_size", "strategy", "tpu", "dataset", "data_dir",
    "dataset_options", "rotated_fraction", "deterministic", "score_noise",
    "public_validation", "work_dir", "group_diagnostics", "diagnostics_alignment"))
RANGES = ("uniform", "log_uniform")


def check_space(space):
    """Refuses a search space the accounting does not cover.

    Args:
        space: dict setting -> list of values (drawn uniformly), or
            `{"uniform": [lo, hi]}` / `{"log_uniform": [lo, hi]}`.

    Raises:
        ValueError: an empty space, an empty list, a bad range, or a setting
            that changes the trials' DP event.
    """
    if not space:
        raise ValueError("The search space is empty: give at least one setting to draw "
                         "(e.g. {'learning_rate': {'log_uniform': [0.01, 1]}}).")
    fixed = sorted(set(space) & FIXED_SETTINGS)
    if fixed:
        raise ValueError(
            f"The search space may not vary {fixed}: they change a trial's DP event (or "
            f"its data or noise), and Papernot & Steinke's bound needs every trial to "
            f"satisfy the one RDP bound the search is accounted with. Fix them in the "
            f"base settings.")
    for key, values in space.items():
        if isinstance(values, dict):
            kinds = sorted(values)
            bounds = values.get(kinds[0]) if len(kinds) == 1 else None
            if kinds[0] not in RANGES or len(kinds) != 1 or not (
                    isinstance(bounds, (list, tuple)) and len(bounds) == 2
                    and all(isinstance(b, (int, float)) for b in bounds)
                    and bounds[0] <= bounds[1]):
                raise ValueError(f"Range of {key!r} must be {{'uniform' or 'log_uniform': "
                                 f"[lo, hi]}} with lo <= hi; got {values!r}.")
            if kinds[0] == "log_uniform" and bounds[0] <= 0:
                raise ValueError(f"log_uniform range of {key!r} needs lo > 0; got {bounds}.")
        elif not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"Values of {key!r} must be a non-empty list or a range; "
                             f"got {values!r}.")


def draw_trial(space, seed, index):
    """Trial `index`'s hyperparameters, drawn from `space` by (seed, index).

    Returns:
        dict setting -> value (JSON-safe: lists give their own values,
        ranges floats).
    """
    rng = np.random.default_rng([int(seed), int(index), 0x7121A1])
    values = {}
    for key in sorted(space):
        spec = space[key]
        if isinstance(spec, dict):
            (kind, (low, high)), = spec.items()
            u = rng.uniform()
            values[key] = (float(low + u * (high - low)) if kind == "uniform" else
                           float(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
        else:
            values[key] = spec[int(rng.integers(len(spec)))]
    return values


def _base_settings(config, base, score_noise, public_validation):
    overrides = dict(base or {})
    from_config = dict(configs.load(config).SETTINGS) if config else {}
    if "validation_fraction" not in overrides and "validation_fraction" not in from_config:
        overrides["validation_fraction"] = DEFAULT_VALIDATION_FRACTION
    if not overrides.get("validation_fraction", from_config.get("validation_fraction")):
        raise ValueError("A private search needs validation_fraction > 0: the selection "
                         "score is computed on a split of the training data.")
    if public_validation:
        if score_noise:
            raise ValueError("Give score_noise or public_validation, not both.")
        overrides.update(score_noise=0.0, public_validation=True)
    else:
        if not score_noise or score_noise <= 0:
            raise ValueError(
                "The selection score must be private: give score_noise > 0 (Gaussian "
                "noise on the count of correct validation predictions) or declare the "
                "validation data public (public_validation=True). An exact score on "
                "private data leaks it, and the search's statement would not hold.")
        overrides.update(score_noise=float(score_noise), public_validation=False)
    overrides["work_dir"] = "unused"
    settings = train_lib.settings_from(config, overrides)
    if not settings.private:
        raise ValueError("A private search needs private trials: the base settings are "
                         "non-private (non_private or epsilon=inf). A non-private grid "
                         "is tf-dpfair-sweep --selection=grid.")
    if settings.deterministic:
        raise ValueError("A private search refuses deterministic=True: its noise would "
                         "follow from the public seed, and nothing would be private.")
    if settings.strategy == "multi_worker":
        raise ValueError("A private search runs its trials on one machine "
                         "(strategy default, mirrored or tpu), not multi_worker.")
    return settings


def _load_seed(private_dir, seed, fingerprint):
    """The search's secret seed: saved on the first run, read back on reruns."""
    seed_path = os.path.join(private_dir, SEED_FILE)
    plan_path = os.path.join(private_dir, PLAN_FILE)
    if os.path.exists(seed_path):
        with open(seed_path) as f:
            saved = json.load(f)["seed"]
        if seed is not None and int(seed) != saved:
            raise ValueError(f"{seed_path} holds another seed: this folder is another "
                             f"search. Use another work_dir.")
        with open(plan_path) as f:
            planned = json.load(f)
        if planned != json.loads(json.dumps(train_lib._json_safe(fingerprint))):
            raise ValueError(
                f"{plan_path} describes another search (base settings, space or K's "
                f"distribution differ). Changing a search after seeing its trials is "
                f"not covered by its statement; use another work_dir.")
        return saved
    seed = secrets.randbits(62) if seed is None else int(seed)
    os.makedirs(private_dir, exist_ok=True)
    train_lib.write_json(plan_path, fingerprint)
    train_lib.write_json(seed_path, {"seed": seed})
    return seed


def planned_trial(settings):
    """The training plan every trial of a search must follow.

    Builds the sampling spec exactly as `train_lib.run` does for these
    settings (the training part of the data, after the validation split).

    Returns:
        `(spec, total_steps, sigma, delta)`.
    """
    run_data = inputs_lib.load_data(settings)
    run_data, _ = selection_lib.carve_validation(run_data, settings.validation_fraction,
                                                 settings.seed)
    num_train = run_data.train.num_examples
    replicas = 1 if settings.strategy == "default" else train_lib.make_strategy(
        settings.strategy, settings.tpu).num_replicas_in_sync
    spec = sampling.make_sampling_spec(settings.sampling, num_train, settings.batch_size,
                                       microbatch_size=settings.microbatch_size,
                                       num_replicas=replicas)
    delta = settings.delta or 1.0 / num_train
    _, _, total_steps, sigma = train_lib.plan_updates(settings, spec, delta)
    return spec, total_steps, sigma, delta


def _check_trial(name, result, planned, accountant):
    """Refuses a trial whose own statement is not the planned one."""
    spec, total_steps, sigma, delta = planned
    privacy = result["privacy"]
    want = input_sampling.planned_ledger(spec, total_steps, sigma).statement(delta, accountant)
    same = (privacy["private"] and math.isclose(privacy["noise_multiplier"], sigma,
                                                rel_tol=1e-9)
            and privacy["steps"] == total_steps
            and math.isclose(privacy["epsilon"], want.epsilon, rel_tol=1e-6)
            and math.isclose(privacy["delta"], want.delta, rel_tol=1e-6))
    if not same:
        raise ValueError(
            f"Trial {name} states {privacy.get('statement')!r}, not the planned run's "
            f"{str(want)!r}: the search's statement would not cover it.")


def _release(trial_dir, released_dir):
    """Copies the selected trial's released artifacts, its work_dir rewritten."""
    if os.path.exists(released_dir):
        shutil.rmtree(released_dir)
    os.makedirs(released_dir)
    for name in RELEASED_FILES:
        source = os.path.join(trial_dir, name)
        if not os.path.exists(source):
            continue
        if name.endswith(".json"):
            # The trial's folder name would reveal a lower bound on K.
            with open(source) as f:
                value = json.load(f)
            settings = value.get("settings", value)
            settings["work_dir"] = released_dir
            train_lib.write_json(os.path.join(released_dir, name), value)
        else:
            shutil.copy2(source, os.path.join(released_dir, name))
    for name in RELEASED_FOLDERS:
        if os.path.isdir(os.path.join(trial_dir, name)):
            shutil.copytree(os.path.join(trial_dir, name), os.path.join(released_dir, name))


def run_private_search(work_dir, *, config=None, base=None, space, trials,
                       score_noise=None, public_validation=False, seed=None,
                       callbacks=(), verbose=2):
    """Runs (or resumes) a private search and releases its best trial.

    Args:
        work_dir: the search's folder (see the module docstring).
        config: named config (its `SETTINGS` are the base of every trial).
        base: settings overrides for every trial; `validation_fraction`
            defaults to 0.1.
        space: dict setting -> list of values or range (see `check_space`).
        trials: a `search_privacy.TrialCount` (K's distribution).
        score_noise: std of the Gaussian noise on each trial's selection
            score (sensitivity 1); required unless `public_validation`.
        public_validation: declare the validation split public (exact
            scores; the statement says so).
        seed: the secret seed of K and the trials; None draws one
            (`secrets.randbits(62)`), saved under `private/`.
        callbacks: extra Keras callbacks for every trial's `fit` (tests).
        verbose: `fit` verbosity.

    Returns:
        dict: "search" (the content of released/search.json),
        "released_dir", and "trial_dirs" (the curator's private folders).

    Raises:
        ValueError: a fixed K, an empty or DP-event-changing space, a score
            neither noisy nor public, a non-private or deterministic base, a
            folder of another search, or a trial not stated as planned.
    """
    if not isinstance(trials, search_privacy.TrialCount):
        raise ValueError(f"trials must be a search_privacy.TrialCount (a random K: Poisson "
                         f"or truncated negative binomial); got {trials!r}.")
    check_space(space)
    settings = _base_settings(config, base, score_noise, public_validation)
    fingerprint = {"config": config, "base": dict(base or {}), "space": space,
                   "trials": {"distribution": trials.distribution, "mean": trials.mean,
                              "shape": trials.shape},
                   "score_noise": score_noise, "public_validation": bool(public_validation)}
    private_dir = os.path.join(work_dir, PRIVATE_DIR)
    seed = _load_seed(private_dir, seed, fingerprint)
    count = trials.draw(seed)
    planned = planned_trial(settings)
    base_values = dict(base or {})
    base_values.update(validation_fraction=settings.validation_fraction,
                       score_noise=settings.score_noise,
                       public_validation=settings.public_validation)
    trial_dirs, results = [], []
    for index in range(count):
        name = f"trial_{index:03d}"
        trial_dir = os.path.join(private_dir, "trials", name)
        values = draw_trial(space, seed, index)
        trial_settings = train_lib.settings_from(config, {**base_values, **values,
                                                          "work_dir": trial_dir})
        done = os.path.exists(os.path.join(trial_dir, train_lib.RESULT_FILE))
        print(f"[private search] {name}: {'finished, skipped' if done else 'running'} "
              f"{values}", flush=True)
        result = train_lib.run(trial_settings, callbacks=callbacks, verbose=verbose)
        if not done:
            keras.backend.clear_session()
        _check_trial(name, result, planned, settings.accountant)
        trial_dirs.append(trial_dir)
        results.append((values, result))

    spec, total_steps, sigma, delta = planned
    trial_event = search_privacy.trial_event(
        input_sampling.planned_ledger(spec, total_steps, sigma).dp_event(),
        None if public_validation else float(score_noise),
        public_validation=public_validation)
    truncated = -math.expm1(total_steps * math.log1p(-spec.overflow_probability))
    statement = search_privacy.search_statement(
        trial_event, trials, delta, public_validation=public_validation,
        truncation_probability=truncated)
    search = {
        "statement": str(statement), "epsilon": statement.epsilon,
        "delta": statement.delta, "trial_epsilon": statement.trial_epsilon,
        "naive_epsilon": statement.naive_epsilon,
        "trials": {"distribution": trials.distribution, "mean": trials.mean,
                   "shape": trials.shape, "description": trials.describe(),
                   # K and the selected trial's index stay private: the
                   # theorem bounds the best trial's release with K hidden.
                   "realised_count": "not released"},
        "space": space, "public_validation": bool(public_validation),
        "score_noise": None if public_validation else float(score_noise),
        "trial_plan": {"noise_multiplier": sigma, "steps": total_steps,
                       "sampling_probability": spec.expected_batch_size / spec.num_examples,
                       "training_examples": spec.num_examples,
                       "validation_fraction": settings.validation_fraction},
        "selected": None}
    released_dir = os.path.join(work_dir, RELEASED_DIR)
    if os.path.exists(released_dir):
        shutil.rmtree(released_dir)
    if results:
        scores = [result["selection"]["score"] for _, result in results]
        best = int(np.argmax(scores))  # The first of equal scores.
        _release(trial_dirs[best], released_dir)
        values, result = results[best]
        search["selected"] = {"hyperparameters": values,
                              "score": result["selection"]["score"],
                              "validation_examples": result["selection"][
                                  "validation_examples"]}
    else:
        os.makedirs(released_dir)
        search["note"] = ("The search drew no trial (K = 0 is possible under Poisson): "
                          "nothing is released but this file.")
    train_lib.write_json(os.path.join(released_dir, SEARCH_FILE), search)
    print(f"[private search] {statement}", flush=True)
    return {"search": search, "released_dir": released_dir, "trial_dirs": trial_dirs}
