"""Privacy accounting: (epsilon, delta) of a DP-SGD run, and noise calibration.

Uses `dp-accounting`, the library behind TF-Privacy's own accountant. No
TensorFlow here: the functions take plain numbers.

One optimizer update of `DPModel` is a Gaussian mechanism with noise multiplier
sigma on the sum of clipped gradients (sensitivity `l2_norm_clip`). How the
examples of an update were chosen decides what the accountant may assume, so
`sampling` is a required argument everywhere; there is no default, because
the optimistic choice must never be made silently:

- `"poisson"`: every example is included in every update independently with
  probability q (`sampling_probability`). The accountant composes `steps`
  Poisson-subsampled Gaussian mechanisms; amplification by subsampling
  applies. Neighbouring datasets differ by adding or removing one example.
- `"shuffle"`: each pass over the data is a random partition into batches, so
  an example takes part in at most one update per pass. The accountant is told
  `participations`, the number of passes started, and composes that many
  unamplified Gaussian mechanisms (the figure TF-Privacy reports for shuffled
  batches). Because the batch layout is fixed by the permutation and not by
  the data, this is a proof for neighbouring datasets that differ in one
  example replaced by one that contributes nothing (zero-out).

`epochs_started` is the one definition of participations for a pipeline that
starts a new pass every `steps_per_epoch` updates; `SamplingSpec`, the
callbacks, the experiment binaries and the demo all use it.

The module is kept whole at about 400 lines: the statement, the DP event,
the argument checks and the calibration share one set of arguments, and a
reviewer checks what is claimed by reading this one file.
"""

import dataclasses
import math

import dp_accounting

SAMPLING_MODES = ("poisson", "shuffle")
ACCOUNTANTS = ("rdp", "pld")

_SAMPLING_TEXT = {
    "poisson": "Poisson subsampling (each example included independently with "
               "probability q per update; amplification by subsampling "
               "applies); add/remove-one-example neighbouring datasets",
    "shuffle": "shuffled batches (each example in at most one update per pass "
               "over the data; no amplification by subsampling is assumed); "
               "zero-out neighbouring datasets (one example replaced by one "
               "that contributes nothing)",
}


_ADD_REMOVE = "add/remove-one-example neighbouring datasets"
_ZERO_OUT = ("zero-out neighbouring datasets (one example replaced by one "
             "that contributes nothing), since some updates were shuffled "
             "passes")


@dataclasses.dataclass(frozen=True)
class PrivacyStatement:
    """An (epsilon, delta) guarantee together with the assumptions it rests on.

    Attributes:
      epsilon: the epsilon of the guarantee (`math.inf` for a non-private run).
      delta: the delta of the guarantee.
      noise_multiplier: sigma, noise stddev divided by the clip norm.
      sampling_probability: q, expected logical batch size / dataset size
        (Poisson); None for shuffle, where the accountant does not use it.
      steps: optimizer updates accounted for.
      sampling: "poisson" or "shuffle".
      accountant: "rdp" or "pld".
      participations: shuffle only: the Gaussian mechanisms composed, i.e. the
        most updates any one example can have taken part in; None for Poisson.
      segments: "mixed" only: one line per run of updates composed (see
        `tf_dpfair.privacy.ledger`).
      zero_out: "mixed" only: some updates were shuffled passes, so the
        guarantee is for zero-out neighbouring datasets.
      user_stated: lines describing updates whose sampling rests on the
        user's word (or on nobody's), said in the statement's own sentence.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_probability: float | None
    steps: int
    sampling: str
    accountant: str
    participations: int | None = None
    segments: tuple = ()
    zero_out: bool = False
    user_stated: tuple = ()

    def __str__(self):
        # An infinite epsilon is no guarantee; never let it read like one.
        prefix = "NOT private: " if math.isinf(self.epsilon) else ""
        caveat = ""
        if self.user_stated:
            caveat = (" The sampling of these updates rests on the user's "
                      "statement, not on the package's pipeline: "
                      + "; ".join(self.user_stated) + ".")
        if self.sampling == "mixed":
            neighbours = (_ZERO_OUT if self.zero_out else _ADD_REMOVE)
            return (prefix +
                    f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g})-DP for "
                    f"{self.steps} updates composed as they ran ("
                    + "; ".join(self.segments) + f"); "
                    f"{self.accountant.upper()} accountant; {neighbours}."
                    + caveat)
        if self.sampling == "poisson":
            how = f"q={self.sampling_probability:.4g}"
        else:
            how = (f"each example in at most {self.participations} of them "
                   f"(one per pass started)")
        return (prefix +
                f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g})-DP for "
                f"{self.steps} updates at noise multiplier "
                f"{self.noise_multiplier:.4g}, {how}; "
                f"{self.accountant.upper()} accountant; sampling: "
                f"{_SAMPLING_TEXT[self.sampling]}" + caveat)


def epochs_started(steps, steps_per_epoch):
    """Passes over the data begun within `steps` updates: ceil(steps / steps_per_epoch).

    In a pipeline that starts a fresh pass (a new permutation) every
    `steps_per_epoch` updates, this bounds how many of the `steps` updates any
    one example took part in, whether or not the batch size divides N.

    Args:
      steps: updates applied, >= 0.
      steps_per_epoch: updates per pass, >= 1.

    Returns:
      An int.

    Raises:
      ValueError: an argument is not an integer in range.
    """
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    if not _is_int(steps_per_epoch) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got "
                         f"{steps_per_epoch!r}.")
    return -(-int(steps) // int(steps_per_epoch))


def _is_int(value):
    try:
        return not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        return False


def _check(noise_multiplier, steps, delta, sampling, accountant,
           sampling_probability, participations):
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got "
                         f"{sampling!r}; it must describe how the data "
                         f"pipeline drew each update's examples.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got "
                         f"{accountant!r}.")
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got "
                         f"{noise_multiplier}.")
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if sampling == "poisson":
        if participations is not None:
            raise ValueError(
                "participations is for sampling='shuffle'; Poisson sampling "
                "is accounted from sampling_probability and steps.")
        if sampling_probability is None or not 0 < sampling_probability <= 1:
            raise ValueError(
                f"sampling_probability must be in (0, 1], got "
                f"{sampling_probability}; it is the expected logical batch "
                f"size divided by the number of examples.")
    else:
        if participations is None:
            raise ValueError(
                "sampling='shuffle' needs participations: the number of "
                "passes over the data started during the run (see "
                "accounting.epochs_started), not a sampling probability.")
        if not _is_int(participations) or not 0 <= participations <= steps:
            raise ValueError(
                f"participations must be an integer in [0, steps={steps}], "
                f"got {participations!r}.")
        if steps > 0 and participations == 0:
            raise ValueError(f"participations must be >= 1 after {steps} "
                             f"updates.")


def dp_event(*, noise_multiplier, steps, sampling, sampling_probability=None,
             participations=None):
    """Returns the `dp_accounting.DpEvent` of a DP-SGD run.

    Args:
      noise_multiplier: sigma of each update's Gaussian mechanism.
      steps: number of optimizer updates.
      sampling: "poisson" or "shuffle" (see the module docstring).
      sampling_probability: Poisson only: q = expected batch size / N.
      participations: shuffle only: passes over the data started.

    Returns:
      A `dp_accounting.DpEvent`.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_probability, gaussian),
            int(steps))
    # One unamplified Gaussian mechanism per update an example can be in.
    return dp_accounting.SelfComposedDpEvent(gaussian, int(participations))


def _make_accountant(accountant):
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant()


def sampling_arguments(*, sampling, num_examples, batch_size, steps):
    """The accountant's arguments for `steps` updates of batch B from N examples.

    >>> kwargs = sampling_arguments(sampling="shuffle", num_examples=1000,
    ...                             batch_size=300, steps=30)
    >>> kwargs["participations"]  # 3 updates per pass: 10 passes started
    10
    >>> round(compute_epsilon(noise_multiplier=1.0, delta=1e-5, **kwargs), 2)
    19.05

    Args:
      sampling: "poisson" (each example enters each update independently
        with q = B / N) or "shuffle" (passes over a random permutation).
      num_examples: N, >= 1.
      batch_size: B, the expected (Poisson) or fixed (shuffle) logical batch,
        1 <= B <= N.
      steps: updates, >= 0.

    Returns:
      A dict with `sampling`, `steps`, and `sampling_probability` (Poisson) or
      `participations` (shuffle). Shuffle counts a new pass every N // B
      updates: the package's pipeline drops the last partial batch, and a
      pipeline that keeps it has more updates per pass, so this never
      undercounts.

    Raises:
      ValueError: an argument is out of range.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got "
                         f"{sampling!r}.")
    for name, value in (("num_examples", num_examples),
                        ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got "
                             f"{value!r}.")
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} is larger than "
                         f"num_examples={num_examples}.")
    if sampling == "poisson":
        return {"sampling": sampling, "steps": int(steps),
                "sampling_probability": batch_size / num_examples}
    return {"sampling": sampling, "steps": int(steps),
            "participations": epochs_started(steps, num_examples // batch_size)}


def privacy_statement(*, noise_multiplier, steps, delta, sampling,
                      sampling_probability=None, participations=None,
                      accountant="rdp"):
    """Returns the `PrivacyStatement` of a DP-SGD run.

    `sampling` is required: there is no safe default, since Poisson's figure
    is far smaller than shuffle's and only the data pipeline knows which one
    holds. `SamplingSpec.accountant_kwargs` and `sampling_arguments` give the
    sampling arguments for a pipeline.

    Args:
      noise_multiplier: sigma (noise stddev / clip norm) of every update.
      steps: number of optimizer updates applied.
      delta: target delta.
      sampling: "poisson" or "shuffle"; must describe the real data pipeline.
      sampling_probability: Poisson: q = expected logical batch size / N.
      participations: shuffle: passes over the data started during the run
        (`epochs_started`), at most `steps`.
      accountant: "rdp" (the accountant TF-Privacy uses) or "pld".

    Returns:
      A `PrivacyStatement`; epsilon is `math.inf` when noise_multiplier is 0
      and steps > 0.

    Raises:
      ValueError: an argument is missing or out of range, or a mode is
        unknown.
    """
    _check(noise_multiplier, steps, delta, sampling, accountant,
           sampling_probability, participations)
    if steps == 0:
        epsilon = 0.0
    elif noise_multiplier == 0:
        epsilon = math.inf
    else:
        acc = _make_accountant(accountant)
        acc.compose(dp_event(noise_multiplier=noise_multiplier, steps=steps,
                             sampling=sampling,
                             sampling_probability=sampling_probability,
                             participations=participations))
        epsilon = float(acc.get_epsilon(delta))
    poisson = sampling == "poisson"
    return PrivacyStatement(
        epsilon=epsilon, delta=delta, noise_multiplier=float(noise_multiplier),
        sampling_probability=float(sampling_probability) if poisson else None,
        steps=int(steps), sampling=sampling, accountant=accountant,
        participations=None if poisson else int(participations))


def epsilon_of_event(event, delta, accountant="rdp", noise_multiplier=1.0):
    """Epsilon at `delta` of any `dp_accounting.DpEvent` (e.g. a composition).

    Args:
      event: the `DpEvent`.
      delta: target delta, in (0, 1).
      accountant: "rdp" or "pld".
      noise_multiplier: the smallest noise multiplier in the event; 0 gives
        `math.inf` (no guarantee).

    Returns:
      A float.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got "
                         f"{accountant!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if noise_multiplier == 0:
        return math.inf
    acc = _make_accountant(accountant)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(*, noise_multiplier, steps, delta, sampling,
                    sampling_probability=None, participations=None,
                    accountant="rdp"):
    """Returns epsilon of a DP-SGD run at the given delta.

    See `privacy_statement` for the arguments; this returns its `epsilon`.
    """
    return privacy_statement(
        noise_multiplier=noise_multiplier, steps=steps, delta=delta,
        sampling=sampling, sampling_probability=sampling_probability,
        participations=participations, accountant=accountant).epsilon


def calibrate_noise_multiplier(*, target_epsilon, steps, delta, sampling,
                               sampling_probability=None, participations=None,
                               accountant="rdp", tolerance=1e-3):
    """Returns the smallest noise multiplier whose epsilon is <= target_epsilon.

    Bisection on sigma (epsilon decreases as sigma grows).

    Args:
      target_epsilon: the epsilon to meet, > 0.
      steps, delta, sampling, sampling_probability, participations,
        accountant: as in `privacy_statement` (`sampling` is required).
      tolerance: the returned sigma is within this of the smallest feasible one.

    Returns:
      sigma such that `compute_epsilon(sigma, ...) <= target_epsilon`.

    Raises:
      ValueError: bad arguments, or no sigma up to 1e4 meets the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
    _check(1.0, steps, delta, sampling, accountant, sampling_probability,
           participations)

    def eps(sigma):
        return compute_epsilon(noise_multiplier=sigma, steps=steps,
                               delta=delta, sampling=sampling,
                               sampling_probability=sampling_probability,
                               participations=participations,
                               accountant=accountant)

    return smallest_noise(
        eps, target_epsilon, tolerance,
        f"with sampling={sampling!r}, q={sampling_probability}, "
        f"participations={participations}, steps={steps}, delta={delta}")


def smallest_noise(epsilon_of, target_epsilon, tolerance, what):
    """The smallest sigma with `epsilon_of(sigma) <= target_epsilon` (bisection).

    Epsilon falls as sigma grows. The result is within `tolerance` of the
    smallest feasible sigma, and always feasible.

    Args:
      epsilon_of: `fn(sigma) -> epsilon`.
      target_epsilon: the budget, > 0.
      tolerance: bisection precision.
      what: words naming the mechanism, for the error message.

    Raises:
      ValueError: no sigma up to 1e4 meets the budget.
    """
    low, high = 0.0, 1.0
    while epsilon_of(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"No noise multiplier up to 1e4 reaches epsilon "
                             f"{target_epsilon} {what}.")
    while high - low > tolerance:
        middle = (low + high) / 2
        if epsilon_of(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
