"""A grid of runs, one after another, resumable, collected into one table.

`run_sweep` crosses the grid's values, runs each combination with
`train_lib.run` in `work_dir/<run name>` and writes `work_dir/results.csv`
(one row per run: every field of its result.json, flattened with
`pandas.json_normalize`) and `work_dir/sweep.json` (the grid, for
`report_lib`). Rerunning the same sweep skips finished runs (result.json
present) and resumes an interrupted one from its last backup.
"""

import dataclasses
import itertools
import json
import math
import os

import keras
import numpy as np
import pandas as pd

from tf_dpfair.experiments import configs
from tf_dpfair.experiments import train_lib

RESULTS_FILE = "results.csv"
SWEEP_FILE = "sweep.json"


def parse_value(text):
    """Parses a command-line value: JSON where it parses, "inf" as infinity, else text.

    Args:
        text: e.g. "0.1", "true", "inf", '{"depth": 14}' or "fashion_mnist".

    Returns:
        The value.
    """
    if text.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(items, many=False):
    """Parses ["key=value", ...] (or "key=v1,v2" lists when `many`) into a dict.

    Args:
        items: strings of the form key=value.
        many: split values at commas into lists.

    Returns:
        dict key -> value (or list of values).

    Raises:
        ValueError: an item without "=".
    """
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Expected key=value, got {item!r}.")
        out[key.strip()] = ([parse_value(v) for v in value.split(",")] if many
                            else parse_value(value))
    return out


def _label(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace(os.sep, "_")


def expand_grid(grid):
    """All combinations of the grid, with a folder name for each.

    Args:
        grid: dict setting -> list of values (crossed in key order), or a
            list of such dicts (their runs one after another, duplicates
            dropped).

    Returns:
        A list of `(name, overrides)`, name like "epsilon=1__seed=0".

    Raises:
        ValueError: a grid entry is not a non-empty list.
    """
    if isinstance(grid, (list, tuple)):
        runs = {}
        for part in grid:
            runs.update(dict(expand_grid(part)))
        return list(runs.items())
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"Grid values of {key!r} must be a non-empty list; got {values!r}.")
    runs = []
    for combination in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combination))
        name = "__".join(f"{k}={_label(v)}" for k, v in overrides.items()) or "run"
        runs.append((name, overrides))
    return runs


def sweep_grid(config=None, grid_overrides=None):
    """The grid of a sweep: the config's `SWEEP["grid"]`, axes replaced by overrides.

    Args:
        config: named config, or None.
        grid_overrides: dict setting -> list of values; replaces that axis in
            every part of a config grid that is a list of grids.

    Returns:
        A dict, or a list of dicts (see `expand_grid`).
    """
    grid = getattr(configs.load(config), "SWEEP", {}).get("grid", {}) if config else {}
    parts = [dict(part, **(grid_overrides or {}))
             for part in (grid if isinstance(grid, (list, tuple)) else [grid])]
    return parts if isinstance(grid, (list, tuple)) else parts[0]


def run_sweep(work_dir, *, config=None, base=None, grid=None, callbacks=(), verbose=2):
    """Runs every combination of the grid that has not finished yet.

    Args:
        work_dir: the sweep's folder; each run gets a subfolder.
        config: named config (its `SETTINGS` are the base of every run).
        base: settings overrides applied to every run.
        grid: dict setting -> list of values.
        callbacks: extra Keras callbacks for every run's `fit` (tests).
        verbose: `fit` verbosity.

    Returns:
        The results table (as `collect_results`).

    Raises:
        ValueError: bad settings (checked for every run before any trains).
    """
    runs = expand_grid(grid or {})
    plan = [(name, _shared_cache(work_dir, train_lib.settings_from(config, {
        **(base or {}), **overrides, "work_dir": os.path.join(work_dir, name)})))
        for name, overrides in runs]
    os.makedirs(work_dir, exist_ok=True)
    parts = grid if isinstance(grid, (list, tuple)) else [grid or {}]
    train_lib.write_json(os.path.join(work_dir, SWEEP_FILE), {
        "config": config, "base": base or {}, "grid": grid or {},
        # JSON objects come back with sorted keys; the axes keep grid order.
        "axes": list(dict.fromkeys(key for part in parts for key in part)),
        "runs": [name for name, _ in runs]})
    for index, (name, settings) in enumerate(plan):
        done = os.path.exists(os.path.join(settings.work_dir, train_lib.RESULT_FILE))
        print(f"[{index + 1}/{len(plan)}] {name}: {'finished, skipped' if done else 'running'}",
              flush=True)
        if not done:
            train_lib.run(settings, callbacks=callbacks, verbose=verbose)
            keras.backend.clear_session()  # Free the last run's graphs.
        collect_results(work_dir)
    return collect_results(work_dir)


def _shared_cache(work_dir, settings):
    """Runs of a sweep with cached features share `<sweep>/features` unless given a folder.

    Each split's file is keyed by everything its features depend on, so
    sharing never mixes data (`features_lib`).
    """
    if not settings.cache_features or settings.feature_cache_dir:
        return settings
    return dataclasses.replace(settings,
                               feature_cache_dir=os.path.join(work_dir, "features"))


def collect_results(work_dir):
    """Reads every `<run>/result.json` under `work_dir` into one table.

    Writes it to `work_dir/results.csv` too. Columns: "run", then the
    flattened result (e.g. "settings.epsilon", "privacy.epsilon",
    "metrics.ema.groups.orientation.rotated.accuracy"); "epsilon" is the
    accounted epsilon, inf for non-private runs.

    Args:
        work_dir: the sweep's folder.

    Returns:
        A `pandas.DataFrame`, one row per finished run (empty if none).
    """
    rows = []
    for name in sorted(os.listdir(work_dir)):
        path = os.path.join(work_dir, name, train_lib.RESULT_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                rows.append({"run": name, **json.load(f)})
    table = pd.json_normalize(rows) if rows else pd.DataFrame(columns=["run"])
    if rows:
        private = table["privacy.private"].astype(bool)
        table.insert(1, "epsilon", np.where(private, pd.to_numeric(
            table["privacy.epsilon"], errors="coerce"), np.inf))
    table.to_csv(os.path.join(work_dir, RESULTS_FILE), index=False)
    return table
