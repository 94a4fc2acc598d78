"""Privacy accounting: (epsilon, delta) of a DP-SGD run, and noise calibration.

Uses `dp-accounting`, the library behind TF-Privacy's own accountant. No
TensorFlow here: the functions take plain numbers.

One optimizer update of `DPModel` is a Gaussian mechanism with noise multiplier
sigma on the sum of clipped gradients (sensitivity `l2_norm_clip` under adding
or removing one example). How the examples of an update were chosen decides
what the accountant may assume:

- `"poisson"`: every example is included in every update independently with
  probability q. The accountant composes `steps` Poisson-subsampled Gaussian
  mechanisms; privacy amplification by subsampling applies.
- `"shuffle"`: each epoch is a shuffled partition into fixed-size batches, so
  each example takes part in exactly one update per epoch. Poisson's
  amplification does not follow from this pipeline; the statement composes one
  unamplified Gaussian mechanism per epoch the example takes part in (the
  figure TF-Privacy reports for shuffled batches).
"""

import dataclasses
import math

import dp_accounting

SAMPLING_MODES = ("poisson", "shuffle")
ACCOUNTANTS = ("rdp", "pld")

_SAMPLING_TEXT = {
    "poisson": "Poisson subsampling (each example included independently with "
               "probability q per update; amplification by subsampling applies)",
    "shuffle": "shuffled fixed-size batches (each example in one update per "
               "epoch; no amplification by subsampling is assumed)",
}


@dataclasses.dataclass(frozen=True)
class PrivacyStatement:
    """An (epsilon, delta) guarantee together with the assumptions it rests on.

    Attributes:
      epsilon: the epsilon of the guarantee (`math.inf` for a non-private run).
      delta: the delta of the guarantee.
      noise_multiplier: sigma, noise stddev divided by the clip norm.
      sampling_probability: q, expected logical batch size / dataset size.
      steps: optimizer updates accounted for.
      sampling: "poisson" or "shuffle".
      accountant: "rdp" or "pld".
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_probability: float
    steps: int
    sampling: str
    accountant: str

    def __str__(self):
        # An infinite epsilon is no guarantee; never let it read like one.
        prefix = "NOT private: " if math.isinf(self.epsilon) else ""
        return (prefix +
                f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g})-DP for "
                f"{self.steps} updates at noise multiplier "
                f"{self.noise_multiplier:.4g}, q={self.sampling_probability:.4g}; "
                f"{self.accountant.upper()} accountant; sampling: "
                f"{_SAMPLING_TEXT[self.sampling]}; add/remove-one-example "
                f"neighbouring datasets")


def _check(noise_multiplier, sampling_probability, steps, delta, sampling,
           accountant):
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got "
                         f"{sampling!r}.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got "
                         f"{accountant!r}.")
    if noise_multiplier is not None and not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got "
                         f"{noise_multiplier}.")
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling_probability must be in (0, 1], got "
                         f"{sampling_probability}; it is the expected logical "
                         f"batch size divided by the number of examples.")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


def dp_event(noise_multiplier, sampling_probability, steps, sampling="poisson"):
    """Returns the `dp_accounting.DpEvent` of a DP-SGD run.

    Args:
      noise_multiplier: sigma of each update's Gaussian mechanism.
      sampling_probability: q = expected logical batch size / dataset size.
      steps: number of optimizer updates.
      sampling: "poisson" or "shuffle" (see the module docstring).

    Returns:
      A `dp_accounting.DpEvent`.
    """
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_probability, gaussian),
            int(steps))
    # Shuffled partitions: an example takes part in one update per (started)
    # epoch, each time as an unamplified Gaussian mechanism.
    participations = math.ceil(steps * sampling_probability - 1e-9)
    return dp_accounting.SelfComposedDpEvent(gaussian, participations)


def _make_accountant(accountant):
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant()


def privacy_statement(*, noise_multiplier, sampling_probability, steps, delta,
                      sampling="poisson", accountant="rdp"):
    """Returns the `PrivacyStatement` of a DP-SGD run.

    Args:
      noise_multiplier: sigma (noise stddev / clip norm) of every update.
      sampling_probability: q = expected logical batch size / dataset size.
      steps: number of optimizer updates applied.
      delta: target delta.
      sampling: "poisson" or "shuffle"; must describe the real data pipeline.
      accountant: "rdp" (the accountant TF-Privacy uses) or "pld".

    Returns:
      A `PrivacyStatement`; epsilon is `math.inf` when noise_multiplier is 0
      and steps > 0.

    Raises:
      ValueError: an argument is out of range or a mode is unknown.
    """
    _check(noise_multiplier, sampling_probability, steps, delta, sampling,
           accountant)
    if steps == 0:
        epsilon = 0.0
    elif noise_multiplier == 0:
        epsilon = math.inf
    else:
        acc = _make_accountant(accountant)
        acc.compose(dp_event(noise_multiplier, sampling_probability, steps,
                             sampling))
        epsilon = float(acc.get_epsilon(delta))
    return PrivacyStatement(epsilon=epsilon, delta=delta,
                            noise_multiplier=float(noise_multiplier),
                            sampling_probability=float(sampling_probability),
                            steps=int(steps), sampling=sampling,
                            accountant=accountant)


def compute_epsilon(*, noise_multiplier, sampling_probability, steps, delta,
                    sampling="poisson", accountant="rdp"):
    """Returns epsilon of a DP-SGD run at the given delta.

    See `privacy_statement` for the arguments; this returns its `epsilon`.
    """
    return privacy_statement(
        noise_multiplier=noise_multiplier,
        sampling_probability=sampling_probability, steps=steps, delta=delta,
        sampling=sampling, accountant=accountant).epsilon


def calibrate_noise_multiplier(*, target_epsilon, sampling_probability, steps,
                               delta, sampling="poisson", accountant="rdp",
                               tolerance=1e-3):
    """Returns the smallest noise multiplier whose epsilon is <= target_epsilon.

    Bisection on sigma (epsilon decreases as sigma grows).

    Args:
      target_epsilon: the epsilon to meet, > 0.
      sampling_probability, steps, delta, sampling, accountant: as in
        `privacy_statement`.
      tolerance: the returned sigma is within this of the smallest feasible one.

    Returns:
      sigma such that `compute_epsilon(sigma, ...) <= target_epsilon`.

    Raises:
      ValueError: bad arguments, or no sigma up to 1e4 meets the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
    _check(1.0, sampling_probability, steps, delta, sampling, accountant)

    def eps(sigma):
        return compute_epsilon(noise_multiplier=sigma,
                               sampling_probability=sampling_probability,
                               steps=steps, delta=delta, sampling=sampling,
                               accountant=accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(
                f"No noise multiplier up to 1e4 reaches epsilon "
                f"{target_epsilon} with q={sampling_probability}, "
                f"steps={steps}, delta={delta}.")
    while high - low > tolerance:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
