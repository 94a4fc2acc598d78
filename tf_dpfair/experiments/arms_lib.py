"""The arms of a sweep report's claims, and the learning rates chosen on validation.

An arm is the runs of one setting but their seeds (`find_arms`); a private
arm is compared with its non-private counterpart (`counterpart`). When the
grid varies `learning_rate` or `non_private_learning_rate`, arms equal but
for those compete and the best on validation is kept
(`choose_learning_rates`, on `validation_figure`): test figures never enter
a choice. `verdicts_lib` states the claims about the arms that remain.
"""

import dataclasses
import os

import numpy as np
import pandas as pd

from tf_dpfair.experiments import claims_lib

RATES = ("learning_rate", "non_private_learning_rate")
PRIVACY = ("epsilon", "non_private", "noise_multiplier")
# The clipping mode of a private arm: no meaning for non-private runs.
MECHANISM = ("adaptive_clipping", "count_noise_multiplier", "target_quantile",
             "threshold_learning_rate")
# What is measured, not what is trained: a non-private counterpart may be
# checkpointed more densely (or report otherwise) than its private arm.
MEASUREMENT = ("eval_every", "checkpoint_every_updates", "eval_batch_size", "n_bootstrap",
               "dashboard_every", "score_noise", "public_validation", "group_diagnostics",
               "diagnostics_alignment", "feature_cache_dir")
_NOT_ARM = ("seed", "work_dir")


@dataclasses.dataclass(frozen=True)
class Arm:
    """Runs of one setting but their seeds.

    Attributes:
        name: the grid settings that vary in the sweep (seed aside), as text.
        private: whether its runs are private.
        runs: the runs' folder names.
        settings: every setting but seed and work_dir, as text (the arm's key).
    """
    name: str
    private: bool
    runs: tuple
    settings: tuple

    def key(self, drop=()):
        """The settings but those named in `drop`, as a hashable tuple."""
        return tuple((k, v) for k, v in self.settings if k not in drop)


def find_arms(table, keys):
    """Groups a sweep's runs into arms (same settings but seed).

    Args:
        table, keys: from `report_lib.load_sweep`.

    Returns:
        A list of `Arm`s, in the table's order of first runs.
    """
    columns = [c for c in table.columns if c.startswith("settings.")
               and c[len("settings."):] not in _NOT_ARM]
    shown = [k for k in keys if k != "seed"]
    arms = {}
    for _, row in table.iterrows():
        settings = tuple((c[len("settings."):], str(row[c])) for c in columns)
        private = bool(row["privacy.private"])
        # Without the sweep's axes (no sweep.json), the first run's folder names it.
        name = ", ".join(f"{k}={row[f'settings.{k}']}" for k in shown) or row["run"]
        arm = arms.setdefault((private, settings), {"name": name, "runs": []})
        arm["runs"].append(row["run"])
    return [Arm(a["name"], private, tuple(a["runs"]), settings)
            for (private, settings), a in arms.items()]


def counterpart(arm, arms, tuned=()):
    """The non-private arm compared with a private one, or None with the reason.

    Candidates share every setting but the privacy settings (the clipping
    mode's included), the learning rates, the settings of what is measured
    (`MEASUREMENT`: checkpoints, evaluation, diagnostics) and those in
    `tuned`; several are narrowed to those with the same learning rates and
    tuned settings.

    Args:
        arm: a private `Arm`.
        arms: the `Arm`s still in the report (after the choices).
        tuned: settings chosen for each arm apart before the sweep (e.g. on a
            pilot's validation figures: `batch_size`, `ema_decay`), which may
            differ between an arm and its counterpart.

    Returns:
        `(Arm or None, reason)`.
    """
    loose = PRIVACY + MECHANISM + MEASUREMENT + RATES + tuple(tuned)
    strict = PRIVACY + MECHANISM + MEASUREMENT
    candidates = [a for a in arms if not a.private and a.key(loose) == arm.key(loose)]
    if len(candidates) > 1:
        candidates = [a for a in candidates if a.key(strict) == arm.key(strict)]
    if len(candidates) == 1:
        return candidates[0], ""
    if not candidates:
        return None, "no non-private runs with the same settings"
    return None, f"{len(candidates)} non-private arms match: {[a.name for a in candidates]}"


def mechanism(arm):
    """A private arm's clipping mode: "" for standard clipping (a fixed clip norm)."""
    value = dict(arm.settings).get("adaptive_clipping", "")
    return "" if value in ("", "None", "nan") else value


def standard_counterpart(arm, arms, tuned=()):
    """The standard-clipping arm a private arm of another clipping mode is compared with.

    Candidates are private, clip with a fixed norm, and share every setting
    but the clipping mode's, the learning rates, what is measured and
    `tuned` (the epsilon included: the same budget).

    Args:
        arm: a private `Arm` whose `mechanism` is not "".
        arms: the `Arm`s still in the report.
        tuned: as in `counterpart`.

    Returns:
        `(Arm or None, reason)`.
    """
    loose = MECHANISM + MEASUREMENT + RATES + tuple(tuned)
    candidates = [a for a in arms if a.private and not mechanism(a)
                  and a.key(loose) == arm.key(loose)]
    if len(candidates) == 1:
        return candidates[0], ""
    if not candidates:
        return None, "no standard-clipping arm with the same settings and epsilon"
    return None, f"{len(candidates)} standard-clipping arms match: {[a.name for a in candidates]}"


def validation_figure(sweep_dir, row, multi_label, weights="raw"):
    """A run's validation figure for choices: `(value, source)` or None.

    Args:
        sweep_dir: the sweep folder.
        row: the run's row of the results table.
        multi_label: the data's kind.
        weights: "raw" or "ema" (for checkpoint scores).

    Returns:
        The released selection score over the validation examples (result.json
        "selection"), else the last checkpoint's validation performance;
        None without either.
    """
    score, count = row.get("selection.score"), row.get("selection.validation_examples")
    if score is not None and not pd.isna(score) and count:
        return float(score) / float(count), "selection score / validation examples"
    values = claims_lib.validation_curve(os.path.join(sweep_dir, row["run"]), multi_label,
                                         weights)
    if not values:
        return None
    return values[-1], "last checkpoint, " + ("mean AUC" if multi_label else "accuracy")


def choose_learning_rates(arms, figures):
    """Keeps, among arms equal but for their learning rates, the best on validation.

    Args:
        arms: the sweep's `Arm`s.
        figures: run name -> `(validation figure, source)` or None.

    Returns:
        `(kept arms, choices DataFrame, chosen on validation everywhere)`;
        the DataFrame has one row per candidate (empty when no arm has
        rivals). A group where some run lacks a validation figure keeps every
        candidate (chosen column False) and makes the last value False.
    """
    groups = {}
    for arm in arms:
        groups.setdefault((arm.private, arm.key(RATES)), []).append(arm)
    kept, rows, everywhere = [], [], True
    for candidates in groups.values():
        if len(candidates) == 1:
            kept += candidates
            continue
        means = {}
        for arm in candidates:
            found = [figures.get(run) for run in arm.runs]
            means[arm.runs] = (None if any(f is None for f in found) else
                               (float(np.mean([f[0] for f in found])), found[0][1]))
        complete = all(m is not None for m in means.values())
        everywhere &= complete
        best = max(candidates, key=lambda a: means[a.runs][0]) if complete else None
        kept += [best] if complete else candidates
        for arm in candidates:
            figure, source = means[arm.runs] or (None, "no validation figure: not chosen")
            rows.append({"arm": arm.name, "private": arm.private,
                         **{r: dict(arm.settings).get(r) for r in RATES},
                         "seeds": len(arm.runs), "validation figure": figure,
                         "source": source, "split": "validation", "chosen": arm is best})
    return [a for a in arms if a in kept], pd.DataFrame(rows), everywhere
