"""What a private hyperparameter search costs: repeat-and-select accounting.

Papernot & Steinke (ICLR 2022, "Hyperparameter Tuning with Renyi
Differential Privacy", arXiv 2110.03620): run a *random* number K of
trials, each a DP mechanism (a training run plus the private release of its
selection score), and release only the best one. If K is drawn from a
Poisson or a truncated negative binomial distribution, the whole search is
a small multiple of one trial's Renyi DP, far less than composing K trials.
`dp_accounting` has the event (`RepeatAndSelectDpEvent`) and its RDP
accountant analyses it; this module builds it from the package's own terms:

- `TrialCount`: the distribution of K (its mean and shape) and a secret draw
  of K. A fixed K, or "the best of a fixed grid", is not covered by the
  theorem and is refused.
- `score_event`: the selection score released privately, a count of correct
  predictions on validation examples with Gaussian noise (sensitivity 1: one
  example moves the count by at most 1).
- `search_statement`: one (epsilon, delta) for the whole search, beside what
  composing the expected number of trials naively and what the selected trial
  alone would claim, so the cost of tuning is visible.
- `calibrate_trial_noise`: the per-trial noise multiplier that keeps the
  whole search within a budget.

Plain Python and `dp_accounting`; no TensorFlow.
"""

import dataclasses
import math

import dp_accounting
import numpy as np

from tf_dpfair.privacy import accounting

POISSON = "poisson"
TRUNCATED_NEGATIVE_BINOMIAL = "truncated_negative_binomial"
DISTRIBUTIONS = (POISSON, TRUNCATED_NEGATIVE_BINOMIAL)

_NOT_COVERED = (
    "a fixed number of trials (or the best of a fixed grid) is not covered by "
    "Papernot & Steinke's theorem: releasing the best of K fixed trials costs "
    "as much as composing all K. Draw K at random: distribution='poisson' or "
    "'truncated_negative_binomial'")


@dataclasses.dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials K of a private search.

    Attributes:
      distribution: "poisson" (K may be 0: then nothing is released) or
        "truncated_negative_binomial" (K >= 1).
      mean: E[K], >= 1.
      shape: the truncated negative binomial's eta, >= 0 (0: logarithmic;
        1: geometric); None for Poisson. Small shapes have heavy tails (a
        cheaper guarantee, a less predictable compute bill); Poisson's K is
        concentrated around its mean and costs a little more epsilon.

    Raises:
      ValueError: a fixed K (distribution "fixed", or a mean with no
        randomness), an unknown distribution, a mean below 1 or a bad shape.
    """

    distribution: str
    mean: float
    shape: float | None = None

    def __post_init__(self):
        if self.distribution == "fixed":
            raise ValueError(f"distribution='fixed' is refused: {_NOT_COVERED}.")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got "
                             f"{self.distribution!r}.")
        if isinstance(self.mean, bool) or not isinstance(self.mean, (int, float)) \
                or not math.isfinite(self.mean) or self.mean < 1:
            raise ValueError(f"mean must be a finite number >= 1 (the expected "
                             f"number of trials), got {self.mean!r}.")
        if self.distribution == POISSON:
            if self.shape is not None:
                raise ValueError("shape is for the truncated negative binomial; "
                                 "leave it None for Poisson.")
        else:
            if self.shape is None or isinstance(self.shape, bool) or not (
                    isinstance(self.shape, (int, float)) and math.isfinite(self.shape)
                    and self.shape >= 0):
                raise ValueError(f"The truncated negative binomial needs a finite "
                                 f"shape >= 0 (0: logarithmic, 1: geometric), got "
                                 f"{self.shape!r}.")
            if self.mean == 1:
                raise ValueError(f"mean=1 with a truncated negative binomial is "
                                 f"K = 1 always: {_NOT_COVERED}.")

    @property
    def dp_shape(self):
        """The `shape` of `dp_accounting.RepeatAndSelectDpEvent` (inf: Poisson)."""
        return math.inf if self.distribution == POISSON else float(self.shape)

    def gamma(self):
        """The truncated negative binomial's gamma for this mean (bisection)."""
        if self.distribution == POISSON:
            raise ValueError("gamma is a parameter of the truncated negative binomial.")
        eta = float(self.shape)

        def mean_of(gamma):
            if eta == 0:
                return (1 - gamma) / (gamma * math.log(1 / gamma))
            return eta * (1 - gamma) / (gamma * (1 - gamma ** eta))

        low, high = 1e-12, 1 - 1e-12  # mean_of falls from ~inf to ~1
        for _ in range(200):
            middle = (low + high) / 2
            if mean_of(middle) > self.mean:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    def draw(self, seed):
        """K for one search, drawn from this distribution with a secret seed.

        Args:
          seed: the search's secret integer seed (e.g. `secrets.randbits(62)`;
            keep it with the search to resume it with the same K).

        Returns:
          An int: 0 or more (Poisson), 1 or more (truncated negative binomial).
        """
        rng = np.random.default_rng([int(seed), 0x5EA7C4])
        if self.distribution == POISSON:
            return int(rng.poisson(self.mean))
        gamma = self.gamma()
        while True:  # reject 0: the distribution is truncated at K >= 1
            if self.shape == 0:
                k = int(rng.logseries(1 - gamma))
            else:
                k = int(rng.negative_binomial(float(self.shape), gamma))
            if k >= 1:
                return k

    def describe(self):
        """One phrase: the distribution and its parameters."""
        if self.distribution == POISSON:
            return f"K ~ Poisson(mean {self.mean:g})"
        return (f"K ~ truncated negative binomial (shape {self.shape:g}, mean "
                f"{self.mean:g})")


def score_event(noise_multiplier):
    """The DP event of releasing one trial's selection score.

    The score is a count of correct predictions on validation examples, with
    N(0, noise_multiplier^2) noise: one example moves the count by at most 1,
    so this is a Gaussian mechanism with that noise multiplier.

    Raises:
      ValueError: the noise multiplier is not > 0 (an exact score is not
        private; declare the validation data public instead).
    """
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0
            and math.isfinite(noise_multiplier)):
        raise ValueError(
            f"The selection score needs noise > 0 to be private, got "
            f"{noise_multiplier!r}. An exact score on private validation data "
            f"would leak it; declare the validation data public instead (then "
            f"the score costs nothing and the statement says so).")
    return dp_accounting.GaussianDpEvent(float(noise_multiplier))


@dataclasses.dataclass(frozen=True)
class SearchStatement:
    """The privacy of a whole private search, beside two figures it is not.

    Attributes:
      epsilon: the search's epsilon at `delta` (repeat-and-select of trials).
      delta: the delta of the guarantee.
      trials: the distribution of K.
      trial_epsilon: one trial alone (what "the selected run alone" claims).
      naive_epsilon: composing ceil(E[K]) trials (what counting every trial
        naively claims). For realistic training runs it is above `epsilon`;
        for very private trials (epsilon ~1-2) and few expected trials it can
        be below it, but it holds only for a fixed number of trials, which a
        random K gives up.
      public_validation: the selection score was computed on data declared
        public, so it costs nothing.
    """

    epsilon: float
    delta: float
    trials: TrialCount
    trial_epsilon: float
    naive_epsilon: float
    public_validation: bool = False

    def __str__(self):
        score = ("selection scores on validation data declared public (they "
                 "cost nothing; the guarantee does not cover that data)"
                 if self.public_validation else
                 "selection scores released with Gaussian noise")
        return (f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g})-DP for the "
                f"whole search ({self.trials.describe()}; only the best trial "
                f"released; {score}); one trial alone claims epsilon="
                f"{self.trial_epsilon:.4g}, composing {math.ceil(self.trials.mean)} "
                f"trials naively {self.naive_epsilon:.4g}. RDP accountant "
                f"(Papernot & Steinke 2022).")


def trial_event(training_event, score_noise_multiplier=None, *,
                public_validation=False):
    """One trial: its training run's event, then its score's release.

    Args:
      training_event: the `DpEvent` of one training run (e.g. a ledger's
        `dp_event()`, or `accounting.dp_event(...)` for a planned run).
      score_noise_multiplier: the Gaussian noise of the score (see
        `score_event`); None only with `public_validation`.
      public_validation: the validation data is declared public.

    Raises:
      ValueError: neither a private score nor a public declaration.
    """
    if public_validation:
        if score_noise_multiplier is not None:
            raise ValueError("Give score_noise_multiplier or declare the "
                             "validation data public, not both.")
        return training_event
    if score_noise_multiplier is None:
        raise ValueError(
            "The selection score must be private (score_noise_multiplier > 0) "
            "or computed on validation data declared public "
            "(public_validation=True): an exact score on private data leaks.")
    return dp_accounting.ComposedDpEvent(
        [training_event, score_event(score_noise_multiplier)])


def search_statement(trial, trials, delta, *, public_validation=False,
                     truncation_probability=0.0):
    """The `SearchStatement` of a search of `trials` repetitions of `trial`.

    Args:
      trial: the `DpEvent` of one trial (`trial_event`).
      trials: a `TrialCount`.
      delta: target delta, in (0, 1).
      public_validation: the trials' scores came from validation data
        declared public (said in the statement).
      truncation_probability: per trial, the probability that the package's
        Poisson pipeline truncated any batch; the statement's delta adds
        e^epsilon * min(1, E[K] * it) (a union bound over the expected
        trials, K being independent of the data), as a single run's does.

    Returns:
      A `SearchStatement`.

    Raises:
      ValueError: bad delta or trials.
    """
    if not isinstance(trials, TrialCount):
        raise ValueError(f"trials must be a TrialCount, got {trials!r}.")
    search = dp_accounting.dp_event.RepeatAndSelectDpEvent(trial, float(trials.mean),
                                                  trials.dp_shape)
    naive = dp_accounting.SelfComposedDpEvent(trial, math.ceil(trials.mean))
    epsilon = accounting.epsilon_of_event(search, delta, "rdp")
    overhead = (0.0 if truncation_probability <= 0 or math.isinf(epsilon) else
                math.exp(epsilon) * min(1.0, trials.mean * truncation_probability))
    return SearchStatement(
        epsilon=epsilon, delta=delta + overhead, trials=trials,
        trial_epsilon=accounting.epsilon_of_event(trial, delta, "rdp"),
        naive_epsilon=accounting.epsilon_of_event(naive, delta, "rdp"),
        public_validation=bool(public_validation))


def calibrate_trial_noise(*, target_epsilon, trials, delta, make_training_event,
                          score_noise_multiplier=None, public_validation=False,
                          tolerance=1e-3):
    """The smallest per-trial noise multiplier that keeps the search within budget.

    Args:
      target_epsilon: the budget of the whole search, > 0.
      trials: a `TrialCount`.
      delta: target delta.
      make_training_event: `fn(noise_multiplier) -> DpEvent` of one training
        run (e.g. `lambda s: accounting.dp_event(noise_multiplier=s, ...)`).
      score_noise_multiplier, public_validation: as in `trial_event`.
      tolerance: the result is within this of the smallest feasible sigma.

    Returns:
      sigma such that the search's epsilon is <= target_epsilon.

    Raises:
      ValueError: bad arguments, or the score alone exceeds the budget, or no
        sigma up to 1e4 meets it.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}.")

    def epsilon(sigma):
        trial = trial_event(make_training_event(sigma), score_noise_multiplier,
                            public_validation=public_validation)
        return search_statement(trial, trials, delta,
                                public_validation=public_validation).epsilon

    return accounting.smallest_noise(
        epsilon, target_epsilon, tolerance,
        f"for the whole search ({trials.describe()}): the score's own noise "
        f"or the number of trials may take the whole budget")
