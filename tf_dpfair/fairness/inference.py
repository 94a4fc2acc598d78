"""Statistics behind a report's verdicts: holds, fails or inconclusive.

About 920 lines, half of them docstrings: the five steps from runs to a
verdict (bootstrap, Holm, equivalence and one-sided tests, plateau, verdict)
share their checks and conventions (the +1 p-value rule, `p <= alpha`), so
they stay in one module that a reader can check against its formulas in one
pass.

A claim such as "DP costs group g no more than accuracy alone explains" is a
statement about a difference d between two arms (e.g. the private gap minus
the non-private gap at matched accuracy). The functions here turn runs into a
verdict on it:

- `hierarchical_bootstrap`: the distribution of d over two levels of
  resampling. Per draw and per arm, R runs are drawn with replacement from the
  arm's R runs (seeds); each drawn copy, independently, has its test examples
  redrawn with replacement within each group (stratum), group sizes kept. The
  arm's value is the mean over its drawn copies of `statistic(run, weights)`;
  d = first arm - second arm. The point estimate uses every run once and
  every example once. Interval: the percentile interval of the draws.
  Variance: for a per-run statistic with between-seed variance tau^2 and
  within-run sampling variance s, the mean over R runs has variance
  (tau^2 + s) / R, and the two-level draws have about
  ((R - 1) / R * (tau^2 + s) + s) / R: exact when tau^2 = (R - 1) s, wider
  when examples dominate (conservative), narrower when seeds dominate and R
  is small (with 5 seeds and s = 0, 0.8 times the variance). Resampling runs
  only (`resample_examples=False`) gives (R - 1) / R (tau^2 + s) / R. Even
  with the variance right on average, few seeds estimate it poorly: in
  simulation (tau^2 = (R - 1) s) a 90% interval covers about as often as a
  t with 2 (R - 1) degrees of freedom predicts: 0.86 with 5 seeds per arm,
  0.89 with 20 (measured 0.86 and 0.87). So the draws are widened by
  `small_sample_factor`, t_df / z at the interval's level with df = the
  runs' degrees of freedom, which brings the coverage back to nominal.
- `hierarchical_copies`: the same two levels for one arm, returned copy by
  copy (`[B, R, ...]`, with which run each copy is), for a difference that
  is not a mean of per-run values (e.g. a private copy's accuracy read off
  a non-private copy's curve of checkpoints, the same example weights for
  all of that copy's checkpoints).
- `bootstrap_p_value`: two-sided p-value of "d = null" from draws:
  min(1, 2 min(1 + #{d* <= null}, 1 + #{d* >= null}) / (B + 1)), about the
  smallest alpha at which the (1 - alpha) percentile interval excludes null
  (up to the +1 rule, which keeps p >= 2 / (B + 1), and quantile interpolation).
- `holm`, `holm_reject`: Holm's step-down adjustment. With p-values sorted,
  p_(1) <= ... <= p_(m): adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)),
  returned in the input order; reject where adj <= alpha. The family-wise
  error rate is at most alpha for any dependence between the tests.
- `tost_bootstrap`, `tost_normal`: equivalence within (-margin, margin) by two
  one-sided tests. H0-: d <= -margin, H0+: d >= margin; p = max(p-, p+).
  Bootstrap: p- = (1 + #{d* <= -margin}) / (B + 1), p+ = (1 + #{d* >=
  margin}) / (B + 1). Normal: p- = 1 - Phi((est + margin) / se), p+ =
  Phi((est - margin) / se). Equivalence holds when p <= alpha, i.e. (exactly
  for the normal form, up to the +1 rule and interpolation for the bootstrap)
  when the (1 - 2 alpha) interval lies within [-margin, margin].
- `no_larger_than_bootstrap`, `no_larger_than_normal`: one-sided test of
  "d < margin" (H0: d >= margin): p = (1 + #{d* >= margin}) / (B + 1), or
  Phi((est - margin) / se).
- `plateaued`: whether a validation curve stopped improving (rule in its
  docstring).
- `verdicts` (and `verdict` for one claim): per claim, "inconclusive" when an
  arm had not plateaued; else "holds" when the Holm-adjusted p-value is
  <= alpha; else "fails" when the simultaneous (Bonferroni, 1 - 2 alpha / m
  for m claims) interval lies wholly on the wrong side of the margin; else
  "inconclusive".
- A claim of kind "differs" asks which way d lies, not whether it is
  negligible (e.g. "does a clipping mode narrow the gap?"): it has no
  margin, its p-value is the two-sided `bootstrap_p_value` of d = 0 (or
  2 (1 - Phi(|est| / se))), and its verdict is "lower" or "higher" (d < 0
  or d > 0, by the estimate's sign) when the Holm-adjusted p-value is
  <= alpha, else "no difference detected", which is not evidence of
  equality; "inconclusive" when an arm had not plateaued.

What a reader may conclude. "holds": the claim is supported at family-wise
level alpha across the report's claims, under the bootstrap's model (seeds
and test examples exchangeable; the statistic smooth enough for percentile
intervals). "fails": the data contradict the claim by more than its margin at
the same level. "inconclusive": neither; it is not evidence for the claim
("no significant difference" is not "about as fair"), nor against it. A
verdict never speaks beyond its margin, the arms compared, the test split and
the number of seeds; with few seeds the between-seed part of the variance is
itself poorly estimated (see the variance note above).
"""

import dataclasses
import math
import numbers
from collections.abc import Mapping

import numpy as np
from scipy import stats

from tf_dpfair.fairness import engine

NO_LARGER_THAN = "no_larger_than"
EQUIVALENT = "equivalent"
DIFFERS = "differs"
CLAIM_KINDS = (NO_LARGER_THAN, EQUIVALENT, DIFFERS)
HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
# Verdicts of a "differs" claim (two-sided, no margin).
LOWER, HIGHER, NO_DIFFERENCE = "lower", "higher", "no difference detected"

# Resampling weights are built in chunks of at most this many entries.
_CHUNK_ENTRIES = 4_000_000
# Strata at least this large are counted row by row: measured twice as fast
# as one bincount over offset indices at 10k examples, slower for small ones.
_ROW_BY_ROW = 2048


def _check_unit(value, name):
    if not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {value!r}.")
    return float(value)


def _check_alpha(alpha):
    if not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5); got {alpha!r}.")
    return float(alpha)


def _check_margin(margin):
    if not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin <= 0:
        raise ValueError(f"margin must be a finite number > 0 (the difference treated "
                         f"as negligible); got {margin!r}.")
    return float(margin)


def _check_claim_margin(kind, margin):
    """A margin > 0, or exactly 0 for a "differs" claim (which has none)."""
    if kind == DIFFERS:
        if margin != 0:
            raise ValueError(f"a {DIFFERS!r} claim has no margin: give margin=0; "
                             f"got {margin!r}.")
        return 0.0
    return _check_margin(margin)


def _check_draws(draws):
    """Draws as a 1-D float array without NaNs (undefined replicates dropped)."""
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 1:
        raise ValueError(f"draws must be 1-D; got shape {draws.shape}.")
    draws = draws[~np.isnan(draws)]
    if draws.size == 0:
        raise ValueError("draws is empty (or all NaN): no bootstrap replicate to test.")
    return draws


def _check_normal(estimate, standard_error):
    if not isinstance(estimate, numbers.Real) or not math.isfinite(estimate):
        raise ValueError(f"estimate must be a finite number; got {estimate!r}.")
    if (not isinstance(standard_error, numbers.Real) or not math.isfinite(standard_error)
            or standard_error <= 0):
        raise ValueError(f"standard_error must be a finite number > 0; got {standard_error!r}.")
    return float(estimate), float(standard_error)


def _tail(draws, count):
    """Monte Carlo p-value (1 + count) / (B + 1): never 0 with finitely many draws."""
    return (1.0 + count) / (draws.size + 1.0)


@dataclasses.dataclass(frozen=True)
class BootstrapDifference:
    """A difference between two arms with its hierarchical bootstrap.

    Attributes:
        estimate: first arm's value minus second arm's, on all the data.
        first, second: each arm's value (mean over its runs of the statistic).
        draws: the bootstrap draws of the difference, shape `[n_bootstrap]`.
        interval: `(low, high)`, percentile interval of `draws` at `confidence`.
        confidence: the interval's level.
    """
    estimate: float
    first: float
    second: float
    draws: np.ndarray
    interval: tuple
    confidence: float


def _prepare_arm(runs, strata, name):
    """Validated runs: a list of `(columns, stratum codes, n)`."""
    if isinstance(runs, Mapping) or isinstance(runs, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of runs (one mapping of per-example "
                         f"arrays per seed); got a {type(runs).__name__}.")
    runs = list(runs)
    if not runs:
        raise ValueError(f"{name} has no runs; give at least one run (a mapping of "
                         f"per-example arrays, including {strata!r}).")
    prepared = []
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise ValueError(f"{name}[{i}] must be a mapping of per-example arrays; "
                             f"got {type(run).__name__}.")
        if strata not in run:
            raise ValueError(f"{name}[{i}] has no {strata!r} array to stratify by; "
                             f"its keys: {sorted(run)}.")
        columns = {key: np.asarray(value) for key, value in run.items()}
        n = len(columns[strata]) if columns[strata].ndim else 0
        if n == 0:
            raise ValueError(f"{name}[{i}] has no examples ({strata!r} is empty).")
        for key, value in columns.items():
            if value.ndim == 0 or len(value) != n:
                raise ValueError(f"{name}[{i}][{key!r}] has {value.shape} entries but "
                                 f"{strata!r} has {n}: every array of a run needs one "
                                 f"entry per example.")
        _, codes = np.unique(columns[strata], return_inverse=True)
        # Sorted by stratum, each stratum's examples are one block of columns.
        order = np.argsort(codes.ravel(), kind="stable")
        columns = {key: value[order] for key, value in columns.items()}
        prepared.append((columns, np.bincount(codes.ravel()), n))
    return prepared


def _stratified_weights(sizes, k, rng):
    """Counts `[k, n]`: each row redraws every stratum block with replacement."""
    out = np.empty((k, int(sizes.sum())))
    start = 0
    for size in sizes:
        draws = rng.integers(0, size, size=(k, size), dtype=np.int32)
        if size >= _ROW_BY_ROW:
            for row in range(k):
                out[row, start:start + size] = np.bincount(draws[row], minlength=size)
        else:
            flat = (np.arange(k)[:, None] * size + draws).ravel()
            out[:, start:start + size] = np.bincount(flat, minlength=k * size).reshape(k, size)
        start += size
    return out


def _apply(statistic, columns, weights):
    values = np.asarray(statistic(columns, weights), dtype=float)
    if values.shape != (weights.shape[0],):
        raise ValueError(f"statistic must return one value per row of weights: expected "
                         f"shape ({weights.shape[0]},), got {values.shape}.")
    return values


def _run_values(run, statistic, k, rng, resample_examples):
    """The statistic on k independent within-group resamples of one run."""
    columns, sizes, n = run
    if not resample_examples:
        return np.full(k, _apply(statistic, columns, np.ones((1, n)))[0])
    out = np.empty(k)
    chunk = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, k, chunk):
        b = min(chunk, k - start)
        out[start:start + b] = _apply(statistic, columns, _stratified_weights(sizes, b, rng))
    return out


def _arm_draws(runs, statistic, n_bootstrap, rng, resample_runs, resample_examples):
    r = len(runs)
    if resample_runs:
        picks = rng.integers(0, r, size=(n_bootstrap, r))
    else:
        picks = np.broadcast_to(np.arange(r), (n_bootstrap, r))
    totals = np.zeros(n_bootstrap)
    for i, run in enumerate(runs):
        # One row index per drawn copy: a run drawn twice gets two resamples.
        rows = np.nonzero(picks == i)[0]
        if rows.size:
            values = _run_values(run, statistic, rows.size, rng, resample_examples)
            totals += np.bincount(rows, weights=values, minlength=n_bootstrap)
    return totals / r


def _arm_value(runs, statistic):
    return float(np.mean([_apply(statistic, columns, np.ones((1, n)))[0]
                          for columns, _, n in runs]))


def small_sample_factor(runs_per_arm, confidence=0.95):
    """How much to widen bootstrap draws whose seed variance rests on few runs.

    With R_i runs (seeds) per arm, the between-seed part of the draws'
    variance is estimated from df = sum_i (R_i - 1) degrees of freedom, so a
    normal-theory interval should use t_df: the factor is
    t_df(0.5 + c / 2) / z(0.5 + c / 2) at confidence c (1.131 for 5 and 5
    runs at 90%, 1.177 at 95%). It is 1.0 when every arm has one run (no
    seed variance is estimated at all; the draws then cover test sampling
    only).

    Args:
        runs_per_arm: the number of runs of each arm.
        confidence: the level the widening is exact for (nearby levels are
            off by a few thousandths).

    Returns:
        A float >= 1.
    """
    df = sum(int(r) - 1 for r in runs_per_arm)
    if df < 1:
        return 1.0
    q = 0.5 + _check_unit(confidence, "confidence") / 2.0
    return float(stats.t.ppf(q, df) / stats.norm.ppf(q))


def widened(draws, factor):
    """Draws spread `factor` times further from their mean (see `small_sample_factor`)."""
    draws = np.asarray(draws, dtype=float)
    centre = draws.mean()
    return centre + factor * (draws - centre)


def hierarchical_bootstrap(first, second, statistic, *, n_bootstrap=1000, confidence=0.95,
                           seed=0, strata="groups", resample_runs=True,
                           resample_examples=True, small_sample=True):
    """Two-level bootstrap of a statistic's difference between two arms.

    Args:
        first, second: the arms, each a non-empty sequence of runs (seeds);
            a run is a mapping from names to per-example arrays of equal
            length n_run (e.g. `{"correct": [n], "groups": [n]}`), one of them
            named `strata`.
        statistic: `statistic(run, weights) -> [k]`: the per-run statistic
            under k resamples, where `run` is the run's mapping of numpy
            arrays, reordered by group (so the statistic must not depend on
            the order of examples), and `weights` is float `[k, n_run]`, how
            often each example was drawn (all ones for the point estimate).
            See `mean_gap` and `max_min_gap`.
        n_bootstrap: number of draws (integer >= 1).
        confidence: level of the percentile interval, in (0, 1).
        seed: an integer >= 0 or a `numpy.random.Generator` (consumed in
            order: first arm, then second).
        strata: the key of the per-example group ids that examples are
            resampled within.
        resample_runs, resample_examples: the two levels; turning one off
            keeps that level fixed (see the module docstring for the
            variance each choice gives).
        small_sample: widen the draws by `small_sample_factor` of the arms'
            run counts at `confidence` when runs are resampled, so that
            intervals and the p-values read off the draws keep their level
            with few seeds (without it a 90% interval covers about 0.86 of
            the time with 5 seeds per arm).

    Returns:
        A `BootstrapDifference` (first minus second).

    Raises:
        ValueError: an empty arm or run, arrays of a run with different
            lengths, a missing `strata` key, a bad setting, or a statistic
            that does not return one value per resample.
    """
    if not isinstance(n_bootstrap, numbers.Integral) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1; got {n_bootstrap!r}.")
    confidence = _check_unit(confidence, "confidence")
    if isinstance(seed, np.random.Generator):
        rng = seed
    elif isinstance(seed, numbers.Integral) and seed >= 0:
        rng = np.random.default_rng(int(seed))
    else:
        raise ValueError(f"seed must be an integer >= 0 or a numpy Generator; got {seed!r}.")
    if not callable(statistic):
        raise ValueError(f"statistic must be callable as statistic(run, weights); "
                         f"got {statistic!r}.")
    arms = [_prepare_arm(first, strata, "first"), _prepare_arm(second, strata, "second")]
    values = [_arm_value(runs, statistic) for runs in arms]
    a, b = (_arm_draws(runs, statistic, int(n_bootstrap), rng, resample_runs,
                       resample_examples) for runs in arms)
    draws = a - b
    if small_sample and resample_runs:
        draws = widened(draws, small_sample_factor([len(arms[0]), len(arms[1])], confidence))
    return BootstrapDifference(estimate=values[0] - values[1], first=values[0],
                               second=values[1], draws=draws,
                               interval=engine.percentile_interval(draws, confidence),
                               confidence=confidence)


@dataclasses.dataclass(frozen=True)
class Copies:
    """One arm's statistic on every run, and on every drawn copy of a bootstrap.

    Attributes:
        point: `[R, ...]` the statistic of each run on all its examples.
        draws: `[B, R, ...]` draw b's copy c: the statistic of run
            `picks[b, c]` with its examples redrawn within groups.
        picks: `[B, R]` int, which run each copy is.
    """
    point: np.ndarray
    draws: np.ndarray
    picks: np.ndarray


def _seeded(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, numbers.Integral) and seed >= 0:
        return np.random.default_rng(int(seed))
    raise ValueError(f"seed must be an integer >= 0 or a numpy Generator; got {seed!r}.")


def _apply_any(statistic, columns, weights):
    values = np.asarray(statistic(columns, weights), dtype=float)
    if values.ndim == 0 or values.shape[0] != weights.shape[0]:
        raise ValueError(f"statistic must return one entry per row of weights: expected "
                         f"a leading dimension {weights.shape[0]}, got shape {values.shape}.")
    return values


def _copy_values(run, statistic, k, rng, resample_examples):
    """The statistic on k independent within-group resamples of one run: `[k, ...]`."""
    columns, sizes, n = run
    if not resample_examples:
        value = _apply_any(statistic, columns, np.ones((1, n)))[0]
        return np.broadcast_to(value, (k,) + value.shape)
    chunk = max(1, _CHUNK_ENTRIES // n)
    parts = [_apply_any(statistic, columns, _stratified_weights(sizes, min(chunk, k - start),
                                                                rng))
             for start in range(0, k, chunk)]
    return np.concatenate(parts)


def hierarchical_copies(runs, statistic, *, n_bootstrap=1000, seed=0, strata="groups",
                        resample_runs=True, resample_examples=True):
    """The two-level bootstrap of one arm, copy by copy, for statistics across arms.

    `hierarchical_bootstrap` averages a per-run statistic over each draw's
    copies; a comparison that needs the copies themselves (e.g. a private
    copy's accuracy read off a non-private copy's curve of checkpoints)
    takes them from here. Draw b picks R runs with replacement (copy c is
    run `picks[b, c]`) and redraws each copy's examples with replacement
    within each group, independently; the same example weights enter every
    value the statistic returns for that copy (e.g. all checkpoints of the
    run). Call it once per arm with one Generator to draw the arms
    independently.

    Args:
        runs: a non-empty sequence of runs, each a mapping of per-example
            arrays (leading dimension n_run), one of them named `strata`.
        statistic: `statistic(run, weights) -> [k, ...]`, as in
            `hierarchical_bootstrap` but with any trailing shape, the same
            for every run.
        n_bootstrap: number of draws B (integer >= 1).
        seed: an integer >= 0 or a `numpy.random.Generator`.
        strata: the key of the per-example group ids.
        resample_runs, resample_examples: the two levels (see
            `hierarchical_bootstrap`).

    Returns:
        A `Copies`.

    Raises:
        ValueError: as `hierarchical_bootstrap`, or a statistic whose
            trailing shape differs between runs.
    """
    if not isinstance(n_bootstrap, numbers.Integral) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1; got {n_bootstrap!r}.")
    rng = _seeded(seed)
    if not callable(statistic):
        raise ValueError(f"statistic must be callable as statistic(run, weights); "
                         f"got {statistic!r}.")
    prepared = _prepare_arm(runs, strata, "runs")
    r = len(prepared)
    point = [_apply_any(statistic, columns, np.ones((1, n)))[0] for columns, _, n in prepared]
    if len({value.shape for value in point}) > 1:
        raise ValueError(f"statistic must return the same shape for every run; got "
                         f"{[value.shape for value in point]}.")
    picks = (rng.integers(0, r, size=(n_bootstrap, r)) if resample_runs
             else np.tile(np.arange(r), (n_bootstrap, 1)))
    draws = np.empty((n_bootstrap, r) + point[0].shape)
    for i, run in enumerate(prepared):
        rows, slots = np.nonzero(picks == i)
        if rows.size:
            draws[rows, slots] = _copy_values(run, statistic, rows.size, rng, resample_examples)
    return Copies(point=np.stack(point), draws=draws, picks=picks)


def _group_means(run, weights, column, strata):
    values = np.asarray(run[column], dtype=float)
    ids, codes = np.unique(run[strata], return_inverse=True)
    onehot = np.zeros((values.size, ids.size))
    onehot[np.arange(values.size), codes.ravel()] = 1.0
    return ids, (weights @ (onehot * values[:, None])) / (weights @ onehot)


def mean_gap(column, first_group, second_group, *, strata="groups"):
    """A statistic: weighted mean of `column` in one group minus in another.

    E.g. `mean_gap("correct", 0, 1)` is group 0's accuracy minus group 1's.

    Args:
        column: key of the per-example values (e.g. 0/1 correct flags).
        first_group, second_group: group ids, as in the `strata` array.
        strata: key of the group ids.

    Returns:
        `statistic(run, weights) -> [k]`, for `hierarchical_bootstrap`; it
        raises ValueError when a run lacks one of the groups.
    """
    def statistic(run, weights):
        ids, means = _group_means(run, weights, column, strata)
        where = {g: np.nonzero(ids == g)[0] for g in (first_group, second_group)}
        missing = [g for g, idx in where.items() if idx.size == 0]
        if missing:
            raise ValueError(f"group(s) {missing} absent from a run; its groups: "
                             f"{ids.tolist()}.")
        return means[:, where[first_group][0]] - means[:, where[second_group][0]]
    return statistic


def max_min_gap(column, *, strata="groups"):
    """A statistic: largest minus smallest weighted group mean of `column`.

    Args:
        column: key of the per-example values.
        strata: key of the group ids.

    Returns:
        `statistic(run, weights) -> [k]`, for `hierarchical_bootstrap`.
    """
    def statistic(run, weights):
        _, means = _group_means(run, weights, column, strata)
        return means.max(axis=1) - means.min(axis=1)
    return statistic


def bootstrap_p_value(draws, null=0.0):
    """Two-sided bootstrap p-value of "difference = null".

    p = min(1, 2 min(1 + #{d* <= null}, 1 + #{d* >= null}) / (B + 1)): about
    the smallest alpha at which the (1 - alpha) percentile interval of the
    draws excludes `null` (never below 2 / (B + 1)).

    Args:
        draws: bootstrap draws of the difference (NaNs are dropped).
        null: the value tested.

    Returns:
        The p-value, a float in (0, 1].

    Raises:
        ValueError: draws empty, all NaN or not 1-D.
    """
    draws = _check_draws(draws)
    low, high = np.count_nonzero(draws <= null), np.count_nonzero(draws >= null)
    return min(1.0, 2.0 * min(_tail(draws, low), _tail(draws, high)))


def _check_p_values(p_values):
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p_values must be a non-empty 1-D sequence; got shape {p.shape}.")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must lie in [0, 1] (no NaN); got {p.tolist()}.")
    return p


def holm(p_values):
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1).

    Args:
        p_values: the m unadjusted p-values, each in [0, 1].

    Returns:
        float array `[m]` in the input order: adj_(i) = min(1, max_{j <= i}
        (m - j + 1) p_(j)) over the p-values sorted ascending.

    Raises:
        ValueError: empty, not 1-D, NaN or outside [0, 1].
    """
    p = _check_p_values(p_values)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def holm_reject(p_values, alpha=0.05):
    """Which hypotheses Holm's procedure rejects at family-wise level alpha.

    Args:
        p_values: the unadjusted p-values.
        alpha: family-wise error rate, in (0, 1).

    Returns:
        bool array, True where the adjusted p-value is <= alpha.

    Raises:
        ValueError: bad p-values or alpha.
    """
    return holm(p_values) <= _check_unit(alpha, "alpha")


@dataclasses.dataclass(frozen=True)
class Equivalence:
    """The result of two one-sided tests (TOST) of |d| < margin.

    Attributes:
        p_value: max(p_lower, p_upper), the p-value of equivalence.
        p_lower: p-value against H0 d <= -margin.
        p_upper: p-value against H0 d >= margin.
        holds: p_value <= alpha.
        interval: the (1 - 2 alpha) interval of d.
        margin, alpha: as given.
        method: "bootstrap" or "normal".
    """
    p_value: float
    p_lower: float
    p_upper: float
    holds: bool
    interval: tuple
    margin: float
    alpha: float
    method: str


def tost_bootstrap(draws, margin, *, alpha=0.05):
    """Equivalence within (-margin, margin) from bootstrap draws of d.

    Args:
        draws: bootstrap draws of the difference (NaNs dropped).
        margin: the equivalence margin, > 0.
        alpha: level of each one-sided test, in (0, 0.5).

    Returns:
        An `Equivalence` (formulas in the module docstring); its interval is
        the percentile interval at 1 - 2 alpha.

    Raises:
        ValueError: empty draws, margin <= 0, alpha outside (0, 0.5).
    """
    draws, margin, alpha = _check_draws(draws), _check_margin(margin), _check_alpha(alpha)
    p_lower = _tail(draws, np.count_nonzero(draws <= -margin))
    p_upper = _tail(draws, np.count_nonzero(draws >= margin))
    p = max(p_lower, p_upper)
    return Equivalence(p, p_lower, p_upper, p <= alpha,
                       engine.percentile_interval(draws, 1.0 - 2.0 * alpha),
                       margin, alpha, "bootstrap")


def tost_normal(estimate, standard_error, margin, *, alpha=0.05):
    """Equivalence within (-margin, margin) from a normal approximation of d.

    Args:
        estimate: the estimated difference.
        standard_error: its standard error, > 0.
        margin: the equivalence margin, > 0.
        alpha: level of each one-sided test, in (0, 0.5).

    Returns:
        An `Equivalence`; its interval is estimate -/+ z_(1 - alpha) se.

    Raises:
        ValueError: a non-finite estimate, se <= 0, margin <= 0, bad alpha.
    """
    estimate, se = _check_normal(estimate, standard_error)
    margin, alpha = _check_margin(margin), _check_alpha(alpha)
    p_lower = float(stats.norm.sf((estimate + margin) / se))
    p_upper = float(stats.norm.cdf((estimate - margin) / se))
    p = max(p_lower, p_upper)
    z = float(stats.norm.ppf(1.0 - alpha))
    return Equivalence(p, p_lower, p_upper, p <= alpha, (estimate - z * se, estimate + z * se),
                       margin, alpha, "normal")


def no_larger_than_bootstrap(draws, margin):
    """One-sided p-value of "d < margin" (H0: d >= margin) from bootstrap draws.

    Args:
        draws: bootstrap draws of the difference (NaNs dropped).
        margin: the largest difference treated as negligible, > 0.

    Returns:
        (1 + #{d* >= margin}) / (B + 1).

    Raises:
        ValueError: empty draws or margin <= 0.
    """
    draws, margin = _check_draws(draws), _check_margin(margin)
    return _tail(draws, np.count_nonzero(draws >= margin))


def no_larger_than_normal(estimate, standard_error, margin):
    """One-sided p-value of "d < margin" (H0: d >= margin), normal approximation.

    Args:
        estimate: the estimated difference.
        standard_error: its standard error, > 0.
        margin: the largest difference treated as negligible, > 0.

    Returns:
        Phi((estimate - margin) / standard_error).

    Raises:
        ValueError: a non-finite estimate, se <= 0 or margin <= 0.
    """
    estimate, se = _check_normal(estimate, standard_error)
    return float(stats.norm.cdf((estimate - _check_margin(margin)) / se))


def plateaued(values, *, window, tolerance, higher_is_better=True):
    """Whether a validation curve's last `window` points stopped improving.

    Rule: with v the curve (negated when lower is better), the improvement is
    max(v[-window:]) - max(v[:-window]), the gain of the best of the last
    `window` points over the best point before them; the curve has plateaued
    when the improvement is < `tolerance` (a decline counts as plateaued). A
    curve of at most `window` points has no "before" and has not plateaued.

    Args:
        values: the curve, in order of evaluation (1-D, finite, non-empty).
        window: how many trailing points form the last segment (>= 1).
        tolerance: the smallest improvement that counts (> 0), in the
            curve's units (e.g. 0.005 for half a point of accuracy).
        higher_is_better: False for losses.

    Returns:
        bool.

    Raises:
        ValueError: empty or non-finite values, window < 1, tolerance <= 0.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D curve; got shape {v.shape}.")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite (no NaN or inf).")
    if not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be an integer >= 1; got {window!r}.")
    if not isinstance(tolerance, numbers.Real) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0; got {tolerance!r}.")
    if v.size <= window:
        return False
    if not higher_is_better:
        v = -v
    return bool(v[-window:].max() - v[:-window].max() < tolerance)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim about a difference d between two arms, with its evidence.

    Give either bootstrap `draws` or a `standard_error` (normal approximation).

    Attributes:
        name: how the report names the claim.
        kind: "no_larger_than" (d < margin, one-sided), "equivalent"
            (|d| < margin, TOST) or "differs" (d != 0, two-sided: which way).
        margin: the difference treated as negligible, > 0 (0 for "differs").
        estimate: the estimated difference.
        draws: bootstrap draws of d, or None.
        standard_error: the standard error of `estimate`, or None.
        plateaued: arm name -> whether its validation curve had plateaued.
    """
    name: str
    kind: str
    margin: float
    estimate: float
    draws: np.ndarray = None
    standard_error: float = None
    plateaued: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_kind(self.kind)
        _check_claim_margin(self.kind, self.margin)
        if (self.draws is None) == (self.standard_error is None):
            raise ValueError(f"claim {self.name!r}: give exactly one of draws (bootstrap) "
                             f"and standard_error (normal approximation).")
        if self.draws is None:
            _check_normal(self.estimate, self.standard_error)
        else:
            _check_draws(self.draws)

    def p_value(self):
        """The claim's unadjusted p-value (module docstring)."""
        if self.kind == DIFFERS:
            if self.draws is None:
                estimate, se = _check_normal(self.estimate, self.standard_error)
                return float(2.0 * stats.norm.sf(abs(estimate) / se))
            return bootstrap_p_value(self.draws)
        if self.kind == NO_LARGER_THAN:
            if self.draws is None:
                return no_larger_than_normal(self.estimate, self.standard_error, self.margin)
            return no_larger_than_bootstrap(self.draws, self.margin)
        if self.draws is None:
            return tost_normal(self.estimate, self.standard_error, self.margin).p_value
        return tost_bootstrap(self.draws, self.margin).p_value

    def interval(self, confidence):
        """Two-sided interval of d at `confidence` (percentile or normal)."""
        if self.draws is None:
            z = float(stats.norm.ppf(0.5 + confidence / 2.0))
            return (self.estimate - z * self.standard_error,
                    self.estimate + z * self.standard_error)
        return engine.percentile_interval(self.draws, confidence)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verdict on one claim.

    Attributes:
        name, kind, margin: the claim's.
        verdict: "holds", "fails" or "inconclusive"; for a "differs"
            claim "lower", "higher", "no difference detected" or
            "inconclusive".
        reason: one sentence saying why.
        estimate: the estimated difference.
        interval: the interval used for "fails" (`verdicts`: simultaneous,
            1 - 2 alpha / m).
        p_value: the claim's unadjusted p-value.
        adjusted_p_value: its Holm-adjusted p-value across the report's claims.
        alpha: the family-wise level.
    """
    name: str
    kind: str
    margin: float
    verdict: str
    reason: str
    estimate: float
    interval: tuple
    p_value: float
    adjusted_p_value: float
    alpha: float


def _check_kind(kind):
    if kind not in CLAIM_KINDS:
        raise ValueError(f"kind must be one of {CLAIM_KINDS}; got {kind!r}.")


def verdict(kind, *, margin, estimate, interval, p_value, adjusted_p_value, alpha=0.05,
            plateaued=None, name="claim"):
    """The verdict on one claim, from its tests (see `verdicts` for a report's).

    In order: "inconclusive" when an arm had not plateaued; "holds" when
    `adjusted_p_value <= alpha`; "fails" when `interval` lies wholly beyond
    the margin (no_larger_than: low > margin; equivalent: low > margin or
    high < -margin); otherwise "inconclusive". A "differs" claim: after the
    plateau, "lower" / "higher" (the estimate's sign) when
    `adjusted_p_value <= alpha`, else "no difference detected".

    Args:
        kind: "no_larger_than", "equivalent" or "differs".
        margin: the claim's margin, > 0 (0 for "differs").
        estimate: the estimated difference.
        interval: `(low, high)`, the interval deciding "fails" (reported
            for "differs").
        p_value, adjusted_p_value: the claim's p-value, unadjusted and
            Holm-adjusted.
        alpha: the family-wise level, in (0, 0.5).
        plateaued: arm name -> bool, or None when not checked.
        name: the claim's name.

    Returns:
        A `Verdict`.

    Raises:
        ValueError: a bad kind, margin, alpha, p-value or interval.
    """
    _check_kind(kind)
    margin, alpha = _check_claim_margin(kind, margin), _check_alpha(alpha)
    _check_p_values([p_value, adjusted_p_value])
    low, high = (float(x) for x in interval)
    if not low <= high:
        raise ValueError(f"interval must be (low, high) with low <= high; got {interval!r}.")
    flat = sorted(str(arm) for arm, ok in (plateaued or {}).items() if not ok)
    target = {NO_LARGER_THAN: f"d < {margin:g}", EQUIVALENT: f"|d| < {margin:g}",
              DIFFERS: "d != 0"}[kind]
    where = f"[{low:.4g}, {high:.4g}]"
    if flat:
        outcome, reason = INCONCLUSIVE, (
                f"Arm(s) {', '.join(flat)} had not plateaued on validation, so longer "
                f"training could change the estimate.")
    elif kind == DIFFERS and adjusted_p_value <= alpha:
        outcome = LOWER if estimate < 0 else HIGHER
        reason = (f"d {'<' if estimate < 0 else '>'} 0 is supported: Holm-adjusted p = "
                  f"{adjusted_p_value:.3g} <= {alpha:g}.")
    elif kind == DIFFERS:
        outcome, reason = NO_DIFFERENCE, (
                f"Neither direction shown: Holm-adjusted p = {adjusted_p_value:.3g} > "
                f"{alpha:g} (interval {where}); this is not evidence that d = 0.")
    elif adjusted_p_value <= alpha:
        outcome, reason = HOLDS, (
                f"{target} is supported: Holm-adjusted p = {adjusted_p_value:.3g} "
                f"<= {alpha:g}.")
    elif low > margin or (kind == EQUIVALENT and high < -margin):
        outcome, reason = FAILS, (
                f"The interval {where} lies wholly outside the margin, contradicting "
                f"{target}.")
    else:
        outcome, reason = INCONCLUSIVE, (
                f"Neither shown nor contradicted: Holm-adjusted p = "
                f"{adjusted_p_value:.3g} > {alpha:g} and the interval {where} reaches "
                f"inside the margin.")
    return Verdict(name, kind, margin, outcome, reason, float(estimate), (low, high),
                   float(p_value), float(adjusted_p_value), alpha)


def verdicts(claims, *, alpha=0.05):
    """The verdicts on a report's claims, Holm-corrected across them.

    Each claim's p-value (`Claim.p_value`) is Holm-adjusted across all m
    claims; "fails" uses the simultaneous (Bonferroni) interval at
    1 - 2 alpha / m, so that both "holds" and "fails" keep the family-wise
    level alpha. Holm may say "holds" where that interval still touches the
    margin: it is more powerful than Bonferroni.

    Args:
        claims: a non-empty sequence of `Claim`s.
        alpha: the family-wise level, in (0, 0.5).

    Returns:
        A list of `Verdict`s, in the order of `claims`.

    Raises:
        ValueError: no claims, a non-`Claim`, or a bad alpha.
    """
    alpha = _check_alpha(alpha)
    claims = list(claims)
    if not claims:
        raise ValueError("claims is empty: a report needs at least one claim to judge.")
    for claim in claims:
        if not isinstance(claim, Claim):
            raise ValueError(f"claims must be Claim objects; got {type(claim).__name__}.")
    p = [claim.p_value() for claim in claims]
    adjusted = holm(p)
    confidence = 1.0 - 2.0 * alpha / len(claims)
    return [verdict(c.kind, margin=c.margin, estimate=c.estimate,
                    interval=c.interval(confidence), p_value=pi, adjusted_p_value=float(ai),
                    alpha=alpha, plateaued=c.plateaued, name=c.name)
            for c, pi, ai in zip(claims, p, adjusted)]
