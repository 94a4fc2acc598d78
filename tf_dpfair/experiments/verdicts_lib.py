"""Verdicts of a sweep report: holds / fails / inconclusive per claim, Holm-corrected.

`write_verdicts` (called by `report_lib.write_sweep_report`) writes
`verdicts.md` / `verdicts.csv` and, when the grid varies a learning rate,
`choices.md` / `choices.csv`.

Arms (`arms_lib`). A private arm is the runs that share every setting but
`seed` (and their work dirs) and are private; its non-private counterpart
is the non-private runs that share every setting but seed, epsilon,
non_private and noise_multiplier, and those of what is measured
(checkpoints, evaluation, diagnostics: `arms_lib.MEASUREMENT`), and the
learning rates where those were chosen on validation for each arm apart. Two claims per private arm, on the test
split, with the final models (raw weights, or EMA weights where
`weights="ema"` and the run kept them; non-private runs keep no EMA):

- "accuracy gap": d = non-private minus private performance (top-1 accuracy;
  mean AUC over labels for multi-label data), claimed equivalent to 0
  within `accuracy_margin` (TOST).
- "excess disparity at matched accuracy", per group attribute: d = the
  private gap (max - min over the attribute's groups) minus the non-private
  gap interpolated, on each non-private seed's curve of checkpoints, at the
  private model's performance (`claims_lib.excess_from_copies`), claimed
  smaller than `disparity_margin` (one-sided). When the private performance
  (on all data, or in any bootstrap draw) lies outside a curve, nothing is
  extrapolated: the claim is "outside the curve" and enters no test.

Draws: `inference.hierarchical_bootstrap` / `hierarchical_copies` (seeds,
then test examples within the joint groups of every attribute). Every claim
that could be tested goes through `inference.verdicts`: Holm across them at
`alpha`, "fails" read off simultaneous (1 - 2 alpha / m) intervals. An arm
is checked for a plateau on its validation curve (`inference.plateaued` on
every seed's validation performance over its checkpoints; the arm has
plateaued when every seed has); an arm that has not makes its claims
inconclusive; without validation scores nothing is checked and the table
says so.

Choices. When the grid varies `learning_rate` or `non_private_learning_rate`,
arms equal but for those are candidates, and the one of best mean
validation figure over its seeds is kept (`arms_lib.choose_learning_rates`):
the run's released selection score where result.json has one (noisy for a
private run with `score_noise`), else its last checkpoint's validation
scores. Test figures never enter a choice. Groups without validation
figures keep every candidate, each compared separately.

The module is about 490 lines: its options, the two claims, the plateau
check, the judging of a sweep's arms (choices, clip-only arms, counterparts)
and the tables are one procedure from a sweep folder to `verdicts.md`; the
readers of saved runs and the arms already live apart (`claims_lib`,
`arms_lib`).
"""

import dataclasses
import math
import numbers
import os

import numpy as np
import pandas as pd

from tf_dpfair.experiments import arms_lib
from tf_dpfair.experiments import claims_lib
from tf_dpfair.fairness import inference
from tf_dpfair.fairness import report

WEIGHTS = ("raw", "ema")
OUTSIDE = "outside the curve"
NOT_TESTED = "not tested"
NO_PLATEAU_CHECK = "Plateau not checked (no validation split)."
COLUMNS = ["claim", "private arm", "counterpart", "seeds per arm", "split", "weights",
           "estimate", "interval", "p", "Holm p", "verdict", "reason"]


@dataclasses.dataclass(frozen=True)
class VerdictOptions:
    """The settings of a report's claims (each validated; see the module docstring).

    Attributes:
        accuracy_margin: TOST margin of the accuracy gap (> 0).
        disparity_margin: margin of the excess disparity (> 0).
        alpha: family-wise level across the claims, in (0, 0.5).
        plateau_window: the last segment of a validation curve: a number of
            checkpoints (an integer >= 1), or a share of each run's
            checkpoints in (0, 1) (at least one), e.g. 0.25 for "the last
            quarter" when runs are checkpointed densely.
        plateau_tolerance: the smallest validation gain that counts (> 0).
        weights: "raw", or "ema" (private runs' EMA weights where kept).
        n_bootstrap: bootstrap draws per claim (>= 1).
        seed: seed of the draws (>= 0).
        tuned: settings chosen for each arm apart before the sweep (e.g.
            `("batch_size", "ema_decay")` from a pre-registered pilot), which
            may differ between the arms a claim compares.
        mechanism_accuracy_margin: margin of "a clipping mode costs less than
            this much accuracy against standard clipping" (> 0;
            `mechanisms_lib`).
    """
    accuracy_margin: float = 0.03
    disparity_margin: float = 0.02
    alpha: float = 0.05
    plateau_window: int = 3
    plateau_tolerance: float = 0.005
    weights: str = "raw"
    n_bootstrap: int = 1000
    seed: int = 0
    tuned: tuple = ()
    mechanism_accuracy_margin: float = 0.01

    def __post_init__(self):
        def number(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and math.isfinite(value)

        def integer(value):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        checks = [
            ("accuracy_margin", number(self.accuracy_margin) and self.accuracy_margin > 0,
             "a number > 0 (a difference of accuracy, e.g. 0.03)"),
            ("disparity_margin", number(self.disparity_margin) and self.disparity_margin > 0,
             "a number > 0 (a difference of gaps, e.g. 0.02)"),
            ("alpha", number(self.alpha) and 0 < self.alpha < 0.5, "in (0, 0.5)"),
            ("plateau_window", number(self.plateau_window) and (
                (self.plateau_window >= 1 and float(self.plateau_window).is_integer())
                or 0 < self.plateau_window < 1),
             "an integer >= 1 (checkpoints) or a share in (0, 1)"),
            ("plateau_tolerance", number(self.plateau_tolerance) and self.plateau_tolerance > 0,
             "a number > 0"),
            ("weights", self.weights in WEIGHTS, f"one of {WEIGHTS}"),
            ("n_bootstrap", integer(self.n_bootstrap) and self.n_bootstrap >= 1,
             "an integer >= 1"),
            ("seed", integer(self.seed) and self.seed >= 0, "an integer >= 0"),
            ("tuned", isinstance(self.tuned, tuple) and all(
                isinstance(t, str) and t for t in self.tuned), "a tuple of setting names"),
            ("mechanism_accuracy_margin", number(self.mechanism_accuracy_margin)
             and self.mechanism_accuracy_margin > 0, "a number > 0 (e.g. 0.01)")]
        for name, ok, wanted in checks:
            if not ok:
                raise ValueError(f"{name} must be {wanted}; got {getattr(self, name)!r}.")


def arm_plateaued(sweep_dir, arm, multi_label, options):
    """Whether every seed of an arm plateaued on validation; None when not checked.

    Args:
        sweep_dir: the sweep folder.
        arm: an `Arm`.
        multi_label: the data's kind.
        options: `VerdictOptions` (window, tolerance, weights).

    Returns:
        True, False, or None when some run saved no validation scores.
    """
    flat = []
    for run in arm.runs:
        values = claims_lib.validation_curve(os.path.join(sweep_dir, run), multi_label,
                                             options.weights if arm.private else "raw")
        if values is None:
            return None
        flat.append(inference.plateaued(values, window=plateau_checkpoints(
            options.plateau_window, len(values)), tolerance=options.plateau_tolerance))
    return all(flat)


def _window_words(window):
    return f"{window:g}" if window >= 1 else f"{100 * window:g}% of the"


def without_noise(table, arm):
    """Whether an arm's runs added no noise (a clip-only baseline: epsilon infinite)."""
    runs = table[table["run"].isin(arm.runs)]
    epsilons = pd.to_numeric(runs["epsilon"], errors="coerce")
    return bool(np.isinf(epsilons).all())


def plateau_checkpoints(window, count):
    """The checkpoints of a curve's last segment: `window` itself, or a share of `count`."""
    if window >= 1:
        return int(window)
    return max(1, int(math.ceil(window * count)))


def group_attributes(table):
    """The group attributes of a sweep's data (those with a list of group names)."""
    row = table.iloc[0]
    return [c.split(".")[-1] for c in table.columns
            if c.startswith("data.groups.") and isinstance(row[c], list)]


def performance_difference(first_runs, second_runs, multi_label, options, seed):
    """The first arm's performance minus the second's, under hierarchical bootstrap draws.

    Args:
        first_runs, second_runs: `claims_lib.final_run` mappings of each arm.
        multi_label: mean AUC (True) or accuracy (False).
        options: `VerdictOptions` (draws, alpha).
        seed: seed of the draws.

    Returns:
        An `inference.BootstrapDifference`, its draws widened for few seeds
        at the level the claims' tests work at (1 - 2 alpha).
    """
    def statistic(run, weights):
        return claims_lib.figures(run, weights, None, multi_label)[:, 0, 0]

    return inference.hierarchical_bootstrap(
        first_runs, second_runs, statistic, n_bootstrap=options.n_bootstrap, seed=seed,
        strata=claims_lib.STRATA, confidence=1.0 - 2.0 * options.alpha)


def accuracy_claim(private_runs, non_private_runs, multi_label, options, seed):
    """The accuracy-gap claim's `inference.Claim` (name, draws, no plateau yet).

    Args:
        private_runs, non_private_runs: `claims_lib.final_run` mappings.
        multi_label: mean AUC (True) or accuracy (False).
        options: `VerdictOptions`.
        seed: seed of the draws.

    Returns:
        An `inference.Claim` of kind "equivalent": d = non-private - private.
    """
    result = performance_difference(non_private_runs, private_runs, multi_label, options, seed)
    name = "AUC gap" if multi_label else "accuracy gap"
    return inference.Claim(name, inference.EQUIVALENT, options.accuracy_margin,
                           result.estimate, draws=result.draws)


def disparity_claim(private_runs, checkpoint_runs, attribute, multi_label, options, seed):
    """The excess disparity at matched performance, or why it cannot be tested.

    Args:
        private_runs: `claims_lib.final_run` mappings of the private arm.
        checkpoint_runs: `claims_lib.checkpoint_runs` mappings of the
            counterpart.
        attribute: the group attribute of the gaps.
        multi_label: mean AUC (True) or accuracy (False).
        options: `VerdictOptions`.
        seed: seed of the draws.

    Returns:
        `(Claim or None, estimate, reason)`: no claim when the private
        performance is outside a curve or a curve cannot be built.
    """
    def statistic(run, weights):
        return claims_lib.figures(run, weights, attribute, multi_label)

    rng = np.random.default_rng(seed)
    copies = [inference.hierarchical_copies(runs, statistic, n_bootstrap=options.n_bootstrap,
                                            seed=rng, strata=claims_lib.STRATA)
              for runs in (private_runs, checkpoint_runs)]
    try:
        excess = claims_lib.excess_from_copies(*copies)
    except ValueError as error:
        return None, math.nan, f"No curve to read: {error}"
    below = excess["estimate_outside"] == "below" or excess["below"]
    above = excess["estimate_outside"] == "above" or excess["above"]
    if below or above:
        where = (f"on all their data the private models lie {excess['estimate_outside']} "
                 f"the non-private checkpoints' range" if excess["estimate_outside"] else
                 f"in {excess['below']} (below) and {excess['above']} (above) of "
                 f"{options.n_bootstrap} bootstrap draws a private model lies outside a "
                 f"non-private curve")
        advice = " and ".join(w for w, on in (("earlier", below), ("later", above)) if on)
        return None, excess["estimate"], (
            f"{OUTSIDE}: {where}; nothing extrapolated. Checkpoint the non-private runs "
            f"{advice} (--checkpoint_every_updates; --eval_every).")
    name = (f"excess disparity at matched {'AUC' if multi_label else 'accuracy'} "
            f"({attribute})")
    # Few seeds estimate the seed variance poorly: widen as for the accuracy claim.
    factor = inference.small_sample_factor([len(private_runs), len(checkpoint_runs)],
                                           confidence=1.0 - 2.0 * options.alpha)
    return inference.Claim(name, inference.NO_LARGER_THAN, options.disparity_margin,
                           excess["estimate"], draws=inference.widened(excess["draws"], factor)
                           ), excess["estimate"], ""


def arms_plateau(sweep_dir, arms, multi_label, options):
    """`(plateaued mapping for the Claim, note)` of the arms a claim compares."""
    checked, missing = {}, []
    for arm in arms:
        value = arm_plateaued(sweep_dir, arm, multi_label, options)
        if value is None:
            missing.append(arm.name)
        else:
            checked[arm.name] = value
    if not missing:
        return checked, ""
    if not checked:
        return checked, NO_PLATEAU_CHECK
    return checked, f"Plateau of {', '.join(missing)} not checked (no validation split)."


def guarded(function, *args):
    """`(claim or None, estimate, reason)` of a claim builder; a ValueError says why not."""
    try:
        result = function(*args)
    except ValueError as error:  # e.g. every draw undefined
        return None, math.nan, f"Not tested: {error}"
    return (result, result.estimate, "") if isinstance(result, inference.Claim) else result


def _pair_claims(sweep_dir, pair, attributes, multi_label, options, index):
    """The claims (entries) of one private arm and its counterpart."""
    arm, other = pair
    finals = [claims_lib.final_run(os.path.join(sweep_dir, r), attributes, multi_label,
                                   options.weights) for r in arm.runs]
    private_runs = [run for run, _ in finals]
    counterpart_runs = [claims_lib.final_run(os.path.join(sweep_dir, r), attributes,
                                             multi_label)[0] for r in other.runs]
    plateaued, note = arms_plateau(sweep_dir, (arm, other), multi_label, options)
    common = {"private arm": arm.name, "counterpart": other.name,
              "seeds per arm": f"{len(arm.runs)} / {len(other.runs)}", "split": "test",
              "weights": f"private {'/'.join(sorted({u for _, u in finals}))}, "
                         f"non-private raw", "note": note}
    rng = np.random.default_rng([options.seed, index])
    figure = "AUC" if multi_label else "accuracy"
    results = [(f"{figure} gap", guarded(accuracy_claim, private_runs, counterpart_runs,
                                          multi_label, options, rng))]
    curves, updates = claims_lib.checkpoint_runs(
        [os.path.join(sweep_dir, r) for r in other.runs], attributes, multi_label)
    for attribute in attributes:
        result = (None, math.nan, f"Not tested: the non-private runs share {len(updates)} "
                  f"checkpoint(s); a curve needs 2 or more (--eval_every, "
                  f"--checkpoint_every_updates).")
        if len(updates) >= 2:
            result = guarded(disparity_claim, private_runs, curves, attribute, multi_label,
                              options, rng)
        results.append((f"excess disparity at matched {figure} ({attribute})", result))
    return [{**common, "name": name, "estimate": estimate, "reason": reason,
             "claim": claim and dataclasses.replace(claim, plateaued=plateaued)}
            for name, (claim, estimate, reason) in results]


def chosen_arms(sweep_dir, table, keys, options):
    """The arms a report compares, after the learning-rate choices on validation.

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        options: `VerdictOptions`.

    Returns:
        `(arms, choices DataFrame, notes)` (`arms_lib.choose_learning_rates`).
    """
    multi_label = bool(table["data.multi_label"].iloc[0])
    arms, notes, choices = arms_lib.find_arms(table, keys), [], pd.DataFrame()
    if any(k in arms_lib.RATES for k in keys):
        rows = {r["run"]: r for _, r in table.iterrows()}
        figures = {run: arms_lib.validation_figure(
                   sweep_dir, rows[run], multi_label, options.weights if arm.private else "raw")
                   for arm in arms for run in arm.runs}
        arms, choices, everywhere = arms_lib.choose_learning_rates(arms, figures)
        notes.append("Learning rates chosen on the validation split (`choices.md`); only the "
                     "chosen runs are compared." if everywhere else
                     "Some learning rates could NOT be chosen on validation (no validation "
                     "figures): those arms are compared separately per learning rate, "
                     "and reading the best of them would choose on the test split.")
    if options.tuned:
        notes.append(f"Settings tuned for each arm apart before the sweep, which may differ "
                     f"between compared arms: {', '.join(options.tuned)}.")
    return arms, choices, notes


def judge(sweep_dir, table, keys, options):
    """Every claim of a sweep, with its verdict.

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        options: `VerdictOptions`.

    Returns:
        `(entries, choices, notes)`: one dict per claim (its `COLUMNS` and
        "claim", the `inference.Claim` or None), the choices DataFrame
        (`choose_learning_rates`) and lines about the arms and choices.
    """
    multi_label = bool(table["data.multi_label"].iloc[0])
    arms, choices, notes = chosen_arms(sweep_dir, table, keys, options)
    entries = []
    for arm in [a for a in arms if a.private]:
        if without_noise(table, arm):
            notes.append(f"Arm {arm.name}: clipped without noise (no DP guarantee); "
                         f"described in the other tables, not judged here.")
            continue
        other, reason = arms_lib.counterpart(arm, arms, options.tuned)
        if other is None:
            notes.append(f"Private arm {arm.name}: no claim ({reason}).")
            continue
        entries += _pair_claims(sweep_dir, (arm, other), group_attributes(table), multi_label,
                                options, len(entries))
    testable = [e for e in entries if e["claim"] is not None]
    if testable:
        for entry, verdict in zip(testable, inference.verdicts(
                [e["claim"] for e in testable], alpha=options.alpha)):
            entry["verdict"] = verdict
    return entries, choices, notes


def verdict_table(entries):
    """The verdict table: one row per claim, `COLUMNS` plus kind, margin, bounds.

    Args:
        entries: from `judge`.

    Returns:
        A DataFrame; claims never tested (outside the curve, no curve) have
        NaN p-values and the verdict "outside the curve" or "not tested".
    """
    rows = []
    for e in entries:
        row = {k: e.get(k) for k in ("private arm", "counterpart", "seeds per arm", "split",
                                     "weights")}
        row["claim"] = e["name"]
        verdict = e.get("verdict")
        if verdict is None:
            row.update(estimate=e["estimate"], interval="", p=math.nan, **{"Holm p": math.nan},
                       verdict=OUTSIDE if e["reason"].startswith(OUTSIDE) else NOT_TESTED,
                       reason=e["reason"], kind="", margin=math.nan,
                       interval_low=math.nan, interval_high=math.nan)
        else:
            low, high = verdict.interval
            row.update(estimate=verdict.estimate, interval=f"[{low:.4f}, {high:.4f}]",
                       p=verdict.p_value, **{"Holm p": verdict.adjusted_p_value},
                       verdict=verdict.verdict,
                       reason=" ".join(filter(None, (verdict.reason, e["note"]))),
                       kind=verdict.kind, margin=verdict.margin,
                       interval_low=low, interval_high=high)
        rows.append(row)
    extra = ["kind", "margin", "interval_low", "interval_high"]
    return pd.DataFrame(rows, columns=COLUMNS + extra)


def _header(entries, options, notes, multi_label):
    tested = sum(e.get("verdict") is not None for e in entries)
    figure = "mean AUC" if multi_label else "accuracy"
    return [
        "# Verdicts: private vs non-private", "",
        "Split: test (every estimate, interval and p-value); validation (learning-rate "
        "choices and the plateau check).", "",
        f"Claims: the {figure} gap (non-private - private, equivalent to 0 within "
        f"{options.accuracy_margin:g}: TOST) and, per group attribute, the excess "
        f"disparity at matched {figure} (private gap - non-private gap interpolated on "
        f"the non-private checkpoints' curve at the private {figure}; below "
        f"{options.disparity_margin:g}: one-sided). Hierarchical bootstrap "
        f"({options.n_bootstrap} draws: seeds, then test examples within groups). Holm "
        f"across the {tested} tested claims at alpha = {options.alpha:g}; the interval "
        f"is simultaneous (1 - 2 alpha / {max(tested, 1)}). \"inconclusive\" is not "
        f"evidence either way; \"{OUTSIDE}\" claims are not tested and count neither "
        f"way. Plateau: the last "
        f"{_window_words(options.plateau_window)} validation checkpoints gain "
        f"less than {options.plateau_tolerance:g} over the best before them, for every "
        f"seed.", ""] + ([f"- {n}" for n in notes] + [""] if notes else [])


def write_verdicts(sweep_dir, table, keys, out_dir, options=None):
    """Writes verdicts.md/.csv (and choices.md/.csv when learning rates were chosen).

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        out_dir: the report folder.
        options: `VerdictOptions` (default: its defaults).

    Returns:
        `(paths, lines)`: dict name -> path written, and the lines of
        report.md's section.
    """
    options = options or VerdictOptions()
    entries, choices, notes = judge(sweep_dir, table, keys, options)
    frame = verdict_table(entries)
    multi_label = bool(table["data.multi_label"].iloc[0])
    paths = {"verdicts": os.path.join(out_dir, "verdicts.csv"),
             "verdicts_md": os.path.join(out_dir, "verdicts.md")}
    frame.to_csv(paths["verdicts"], index=False)
    body = (report.to_markdown(frame[COLUMNS], digits=4) if not frame.empty else
            "No claims: no private arm has a non-private counterpart in this sweep.")
    with open(paths["verdicts_md"], "w") as f:
        f.write("\n".join(_header(entries, options, notes, multi_label) + [body, ""]))
    lines = ["## Verdicts", "", "Split: test (estimates); validation (choices, plateau). "
             "The claims, their tests and every note are in `verdicts.md`.", "", body, ""]
    if not choices.empty:
        paths["choices"] = os.path.join(out_dir, "choices.csv")
        paths["choices_md"] = os.path.join(out_dir, "choices.md")
        choices.to_csv(paths["choices"], index=False)
        with open(paths["choices_md"], "w") as f:
            f.write("\n".join([
                "# Learning-rate choices", "", "Split: validation (no test figure enters a "
                "choice). Per arm, the mean over its seeds of the validation figure named "
                "in `source`; the chosen arm is the best of its group.", "",
                report.to_markdown(choices), ""]))
        lines[4:4] = ["Learning rates chosen on validation: `choices.md`.", ""]
    return paths, lines
