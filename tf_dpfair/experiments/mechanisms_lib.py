"""Verdicts of a sweep's clipping modes against standard DP-SGD at the same epsilon.

`write_mechanism_verdicts` (called by `report_lib.write_sweep_report` when
some private arm sets `adaptive_clipping`) writes `mechanisms.md` /
`mechanisms.csv`. Each private arm of another clipping mode (Global-Adapt,
quantile) is compared with the standard-clipping arm that shares every
other setting and its epsilon (`arms_lib.standard_counterpart`; learning
rates, what is measured and `VerdictOptions.tuned` may differ), on the test
split, with the final models (`--weights`):

- "accuracy cost": d = standard accuracy - the mode's accuracy (mean AUC
  for multi-label data); claim d < `mechanism_accuracy_margin`
  (one-sided, "no_larger_than"): the mode costs less than that.
- "excess disparity difference", per group attribute: d = the mode's
  excess disparity - the standard arm's, each excess being the arm's gap
  minus the non-private gap interpolated at the arm's own performance on
  the non-private checkpoint curves (`claims_lib.excess_from_copies`, the
  curves of the standard arm's non-private counterpart, the same bootstrap
  copies of them for both arms). Kind "differs" (two-sided, no margin):
  "lower" (the mode narrows the excess disparity), "higher" (widens) or
  "no difference detected", which is not "equally fair". A performance
  outside the curves (estimate or any draw) makes it "outside the curve".

The claims form their own family: Holm across them at `alpha`, apart from
`verdicts.md`'s private-vs-non-private claims. Every arm compared (the
mode's, the standard one and the non-private one) is checked for a plateau
on validation, as in `verdicts_lib`.
"""

import dataclasses
import math
import os

import numpy as np

from tf_dpfair.experiments import arms_lib
from tf_dpfair.experiments import claims_lib
from tf_dpfair.experiments import verdicts_lib
from tf_dpfair.fairness import inference
from tf_dpfair.fairness import report

COLUMNS = ["claim", "mode arm", "standard arm", "non-private arm", "seeds per arm", "split",
           "weights", "estimate", "interval", "p", "Holm p", "verdict", "reason"]


def _final_runs(sweep_dir, arm, attributes, multi_label, weights):
    finals = [claims_lib.final_run(os.path.join(sweep_dir, r), attributes, multi_label,
                                   weights) for r in arm.runs]
    return [run for run, _ in finals], {used for _, used in finals}


def accuracy_cost_claim(mode_runs, standard_runs, multi_label, options, seed):
    """d = standard - mode performance, claimed below `mechanism_accuracy_margin`.

    Args:
        mode_runs, standard_runs: `claims_lib.final_run` mappings of each arm.
        multi_label: mean AUC (True) or accuracy (False).
        options: `verdicts_lib.VerdictOptions`.
        seed: seed of the draws.

    Returns:
        An `inference.Claim` of kind "no_larger_than".
    """
    result = verdicts_lib.performance_difference(standard_runs, mode_runs, multi_label,
                                                 options, seed)
    return inference.Claim(f"{'AUC' if multi_label else 'accuracy'} cost",
                           inference.NO_LARGER_THAN, options.mechanism_accuracy_margin,
                           result.estimate, draws=result.draws)


def disparity_difference_claim(mode_runs, standard_runs, curve_runs, attribute, multi_label,
                               options, seed):
    """d = the mode's excess disparity - the standard arm's, or why not tested.

    Args:
        mode_runs, standard_runs: `claims_lib.final_run` mappings.
        curve_runs: `claims_lib.checkpoint_runs` mappings of the non-private arm.
        attribute: the group attribute of the gaps.
        multi_label: mean AUC (True) or accuracy (False).
        options: `verdicts_lib.VerdictOptions`.
        seed: seed of the draws.

    Returns:
        `(Claim or None, estimate, reason)`.
    """
    def statistic(run, weights):
        return claims_lib.figures(run, weights, attribute, multi_label)

    rng = np.random.default_rng(seed)
    mode, standard, curves = (
        inference.hierarchical_copies(runs, statistic, n_bootstrap=options.n_bootstrap,
                                      seed=rng, strata=claims_lib.STRATA)
        for runs in (mode_runs, standard_runs, curve_runs))
    try:
        excess = [claims_lib.excess_from_copies(copies, curves) for copies in (mode, standard)]
    except ValueError as error:
        return None, math.nan, f"No curve to read: {error}"
    estimate = excess[0]["estimate"] - excess[1]["estimate"]
    outside = [(name, e) for name, e in zip(("mode", "standard"), excess)
               if e["estimate_outside"] or e["below"] or e["above"]]
    if outside:
        where = "; ".join(
            f"the {name} arm's models lie {e['estimate_outside']} the curves' range"
            if e["estimate_outside"] else
            f"the {name} arm lies outside a curve in {e['below'] + e['above']} of "
            f"{options.n_bootstrap} draws" for name, e in outside)
        return None, estimate, (f"{verdicts_lib.OUTSIDE}: {where}; nothing extrapolated "
                                f"(checkpoint the non-private runs over a wider range).")
    factor = inference.small_sample_factor(
        [len(mode_runs), len(standard_runs), len(curve_runs)],
        confidence=1.0 - 2.0 * options.alpha)
    draws = inference.widened(excess[0]["draws"] - excess[1]["draws"], factor)
    name = (f"excess disparity difference at matched {'AUC' if multi_label else 'accuracy'}"
            f" ({attribute})")
    return inference.Claim(name, inference.DIFFERS, 0.0, estimate, draws=draws), estimate, ""


def _comparison_claims(sweep_dir, arms3, attributes, multi_label, options, index):
    """The entries of one mode arm against its standard and non-private arms."""
    mode, standard, non_private = arms3
    mode_runs, used_mode = _final_runs(sweep_dir, mode, attributes, multi_label,
                                       options.weights)
    standard_runs, used_standard = _final_runs(sweep_dir, standard, attributes, multi_label,
                                               options.weights)
    plateaued, note = verdicts_lib.arms_plateau(sweep_dir, arms3, multi_label, options)
    common = {"mode arm": mode.name, "standard arm": standard.name,
              "non-private arm": non_private.name if non_private else "",
              "seeds per arm": " / ".join(str(len(a.runs)) for a in arms3 if a),
              "split": "test", "note": note,
              "weights": f"mode {'/'.join(sorted(used_mode))}, standard "
                         f"{'/'.join(sorted(used_standard))}"}
    rng = np.random.default_rng([options.seed, 7919, index])
    results = [("accuracy cost", verdicts_lib.guarded(
        accuracy_cost_claim, mode_runs, standard_runs, multi_label, options, rng))]
    curves, updates = claims_lib.checkpoint_runs(
        [os.path.join(sweep_dir, r) for r in non_private.runs], attributes, multi_label)
    for attribute in attributes:
        result = (None, math.nan, f"Not tested: the non-private runs share {len(updates)} "
                  f"checkpoint(s); a curve needs 2 or more.")
        if len(updates) >= 2:
            result = verdicts_lib.guarded(disparity_difference_claim, mode_runs,
                                          standard_runs, curves, attribute, multi_label,
                                          options, rng)
        results.append((f"excess disparity difference ({attribute})", result))
    return [{**common, "name": name, "estimate": estimate, "reason": reason,
             "claim": claim and dataclasses.replace(claim, plateaued=plateaued)}
            for name, (claim, estimate, reason) in results]


def judge_mechanisms(sweep_dir, table, keys, options):
    """Every clipping-mode claim of a sweep, with its verdict.

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        options: `verdicts_lib.VerdictOptions`.

    Returns:
        `(entries, notes)`: one dict per claim (its `COLUMNS` and "claim")
        and lines about the arms.
    """
    multi_label = bool(table["data.multi_label"].iloc[0])
    arms, _, notes = verdicts_lib.chosen_arms(sweep_dir, table, keys, options)
    entries = []
    for arm in [a for a in arms if a.private and arms_lib.mechanism(a)]:
        standard, reason = arms_lib.standard_counterpart(arm, arms, options.tuned)
        non_private = None
        if standard is not None:
            non_private, reason = arms_lib.counterpart(standard, arms, options.tuned)
        if standard is None or non_private is None:
            notes.append(f"Arm {arm.name}: no claim ({reason}).")
            continue
        entries += _comparison_claims(sweep_dir, (arm, standard, non_private),
                                      verdicts_lib.group_attributes(table), multi_label,
                                      options, len(entries))
    testable = [e for e in entries if e["claim"] is not None]
    if testable:
        for entry, verdict in zip(testable, inference.verdicts(
                [e["claim"] for e in testable], alpha=options.alpha)):
            entry["verdict"] = verdict
    return entries, notes


def mechanism_table(entries):
    """One row per claim: `COLUMNS` plus kind, margin and the interval's bounds."""
    frame = verdicts_lib.verdict_table(entries)
    for column in ("mode arm", "standard arm", "non-private arm"):
        frame[column] = [e[column] for e in entries]
    return frame[COLUMNS + ["kind", "margin", "interval_low", "interval_high"]]


def write_mechanism_verdicts(sweep_dir, table, keys, out_dir, options=None):
    """Writes mechanisms.md/.csv when a private arm sets another clipping mode.

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        out_dir: the report folder.
        options: `verdicts_lib.VerdictOptions` (default: its defaults).

    Returns:
        `(paths, lines)`: dict name -> path written (empty when no arm sets
        a clipping mode), and the lines of report.md's section.
    """
    options = options or verdicts_lib.VerdictOptions()
    arms = arms_lib.find_arms(table, keys)
    if not any(a.private and arms_lib.mechanism(a) for a in arms):
        return {}, []
    entries, notes = judge_mechanisms(sweep_dir, table, keys, options)
    frame = mechanism_table(entries)
    paths = {"mechanisms": os.path.join(out_dir, "mechanisms.csv"),
             "mechanisms_md": os.path.join(out_dir, "mechanisms.md")}
    frame.to_csv(paths["mechanisms"], index=False)
    tested = sum(e.get("verdict") is not None for e in entries)
    body = (report.to_markdown(frame[COLUMNS], digits=4) if not frame.empty else
            "No claims: no clipping-mode arm has a standard-clipping and a non-private "
            "counterpart.")
    header = [
        "# Verdicts: clipping modes against standard DP-SGD", "",
        "Split: test (every estimate, interval and p-value); validation (choices and the "
        "plateau check).", "",
        f"Claims, per arm of another clipping mode against the standard-clipping arm of the "
        f"same epsilon: the accuracy cost (standard - mode; below "
        f"{options.mechanism_accuracy_margin:g}, one-sided) and, per group attribute, the "
        f"difference of excess disparities at matched accuracy (mode - standard, each "
        f"against the non-private checkpoint curve; two-sided: \"lower\" = the mode "
        f"narrows it, \"higher\" = widens it, \"no difference detected\" is not evidence "
        f"of equality). Hierarchical bootstrap ({options.n_bootstrap} draws). Holm across "
        f"these {tested} tested claims at alpha = {options.alpha:g}, a family apart from "
        f"verdicts.md.", ""] + [f"- {n}" for n in notes] + [""]
    with open(paths["mechanisms_md"], "w") as f:
        f.write("\n".join(header + [body, ""]))
    lines = ["## Clipping modes against standard DP-SGD", "",
             "Split: test (estimates); validation (choices, plateau). Claims and notes: "
             "`mechanisms.md`.", "", body, ""]
    return paths, lines
