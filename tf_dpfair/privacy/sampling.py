"""Which examples enter each optimizer update, and what the accountant is told.

The privacy statement is only as true as the sampling, so both sides read the
same `SamplingSpec`: the pipeline draws batches from it and the accountant
gets `spec.accountant_kwargs(steps)`.

Two modes:

- `"poisson"`: for every update each of the N examples is included
    independently with probability q = expected_batch_size / N. The realised
    batch (Binomial(N, q) examples) is padded with weight-0 rows to a static
    `padded_batch_size`, chosen so that more than that many examples are drawn
    with probability at most `max_overflow_probability` per update. On overflow
    a uniformly random subset of `padded_batch_size` examples is kept (or the
    pipeline raises, `on_overflow="raise"`). Truncation is not Poisson sampling:
    following Chua et al. 2024 ("Scalable DP-SGD: Shuffling vs. Poisson
    Subsampling", arXiv 2411.04205), if the Poisson mechanism is
    (eps, delta)-DP then the truncated one is (eps, delta + e^eps * eta)-DP,
    where eta bounds the probability that any of the T updates overflows;
    `SamplingSpec.delta_overhead` computes e^eps * eta with the union bound.
- `"shuffle"`: every epoch is a fresh random permutation cut into fixed
    batches of `expected_batch_size` (the last partial batch is dropped).
    Poisson amplification does not apply to this; the spec says so and the
    accountant is told `sampling="shuffle"` unless the user passes
    `accept_shuffle_as_poisson=True`, a weaker, heuristic statement that the
    spec records.

The spec is data (no TensorFlow): `tf_dpfair.data.sampler` draws the batches
it describes. The seed is not part of the spec: the guarantee assumes the
sampling randomness stays secret, so keep it out of logs.
"""

import dataclasses
import math

from scipy import stats

from tf_dpfair.privacy import accounting

POISSON = "poisson"
SHUFFLE = "shuffle"
MODES = (POISSON, SHUFFLE)
ON_OVERFLOW = ("drop", "raise")
DEFAULT_MAX_OVERFLOW_PROBABILITY = 1e-12



@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How batches are sampled: the one record the pipeline and accountant share.

    Attributes:
        mode: `"poisson"` or `"shuffle"`.
        num_examples: N, the number of training examples.
        expected_batch_size: B; the DP sum is divided by this (fixed) number.
        sampling_probability: q = B / N.
        steps_per_epoch: updates per epoch: round(N / B) (at least 1) for
            Poisson, floor(N / B) for shuffle.
        padded_batch_size: the static number of rows of every batch; a
            multiple of `microbatch_size * num_replicas`.
        overflow_probability: per update, the probability that Poisson sampling
            draws more than `padded_batch_size` examples, computed exactly
            (binomial tail) for N + 1 examples so that it also bounds the
            neighbouring dataset. 0 for shuffle.
        microbatch_size: rows per micro-batch.
        num_replicas: number of replicas the batch is split over.
        on_overflow: `"drop"` (keep a random subset of `padded_batch_size`
            examples, print a warning) or `"raise"`.
        accept_shuffle_as_poisson: shuffle mode only; the user accepts that
            the accountant treats shuffled batches as Poisson (heuristic).
    """

    mode: str
    num_examples: int
    expected_batch_size: int
    sampling_probability: float
    steps_per_epoch: int
    padded_batch_size: int
    overflow_probability: float
    microbatch_size: int = 1
    num_replicas: int = 1
    on_overflow: str = "drop"
    accept_shuffle_as_poisson: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}.")
        if self.on_overflow not in ON_OVERFLOW:
            raise ValueError(
                    f"on_overflow must be one of {ON_OVERFLOW}; got {self.on_overflow!r}.")
        if self.accept_shuffle_as_poisson and self.mode != SHUFFLE:
            raise ValueError(
                    "accept_shuffle_as_poisson=True only makes sense with mode='shuffle'.")
        if self.padded_batch_size % (self.microbatch_size * self.num_replicas):
            raise ValueError(
                    f"padded_batch_size={self.padded_batch_size} is not a multiple of "
                    f"microbatch_size * num_replicas = "
                    f"{self.microbatch_size * self.num_replicas}.")

    @property
    def accounting_sampling(self):
        """The `sampling` argument the accountant must get: "poisson" or "shuffle"."""
        if self.mode == POISSON or self.accept_shuffle_as_poisson:
            return POISSON
        return SHUFFLE

    def accountant_kwargs(self, steps):
        """Keyword arguments for `tf_dpfair.privacy.accounting.compute_epsilon`.

        >>> from tf_dpfair.privacy import accounting
        >>> spec = make_sampling_spec("shuffle", 1000, 300)
        >>> spec.accountant_kwargs(30)
        {'sampling': 'shuffle', 'steps': 30, 'participations': 10}
        >>> round(accounting.compute_epsilon(
        ...     noise_multiplier=1.0, delta=1e-5, **spec.accountant_kwargs(30)), 2)
        19.05

        Poisson: the sampling probability.
        Shuffle: the passes over the data started within `steps` updates
        (`accounting.epochs_started(steps, steps_per_epoch)`), which bounds
        how many updates any one example took part in, whether or not the
        batch size divides N.

        Args:
            steps: number of optimizer updates, counted from update 0 of the
                pipeline (the pipeline is indexed by update, so a resumed run
                continues the same passes).

        Returns:
            A dict with `sampling`, `steps`, and `sampling_probability`
            (Poisson) or `participations` (shuffle).

        Raises:
            ValueError: `steps` is negative.
        """
        if int(steps) != steps or int(steps) < 0:
            raise ValueError(f"steps must be >= 0 (an integer); got {steps}.")
        if self.accounting_sampling == POISSON:
            return {"sampling": POISSON, "steps": int(steps),
                    "sampling_probability": self.sampling_probability}
        return {"sampling": SHUFFLE, "steps": int(steps),
                "participations": accounting.epochs_started(
                        int(steps), self.steps_per_epoch)}

    def delta_overhead(self, steps, epsilon):
        """The delta to add because overflowing batches are truncated.

        e^epsilon * eta, where eta = 1 - (1 - overflow_probability)^steps
        bounds the probability that any of `steps` updates overflows
        (Chua et al. 2024). Zero in shuffle mode, where nothing is truncated.

        Args:
            steps: number of optimizer updates.
            epsilon: the epsilon of the untruncated (Poisson) guarantee.

        Returns:
            A float; the run is (epsilon, delta + this)-DP.
        """
        if self.overflow_probability == 0.0 or steps <= 0:
            return 0.0
        eta = -math.expm1(steps * math.log1p(-self.overflow_probability))
        return math.exp(epsilon) * eta

    def statement(self):
        """One paragraph that says how batches were sampled and accounted.

        Returns:
            A human-readable string naming the sampling mode.
        """
        n, b, q = self.num_examples, self.expected_batch_size, self.sampling_probability
        if self.mode == POISSON:
            return (
                    f"Sampling: poisson. Each of N={n} examples enters each update "
                    f"independently with q={q:.6g} (expected batch {b}); batches are "
                    f"padded to {self.padded_batch_size} rows with weight 0. More than "
                    f"{self.padded_batch_size} examples are drawn with probability "
                    f"{self.overflow_probability:.3g} per update; then "
                    + ("a random subset is kept (add delta_overhead to delta)."
                       if self.on_overflow == "drop" else "the run stops."))
        text = (f"Sampling: shuffle. Fixed batches of {b} from a fresh permutation "
                f"of N={n} examples each epoch ({self.steps_per_epoch} updates).")
        if self.accept_shuffle_as_poisson:
            return text + (
                    " Accounted AS IF Poisson with q={:.6g}, at the user's request: "
                    "a heuristic, not a proof; shuffling can be much less private."
                    .format(q))
        return text + " Poisson amplification does not apply; accounted as shuffle."

    def to_dict(self):
        """Returns the fields as a plain dict (for logs and configs)."""
        return dataclasses.asdict(self)


def make_sampling_spec(mode, num_examples, expected_batch_size, *, microbatch_size=1,
                       num_replicas=1,
                       max_overflow_probability=DEFAULT_MAX_OVERFLOW_PROBABILITY,
                       on_overflow="drop", accept_shuffle_as_poisson=False):
    """Builds the `SamplingSpec` for a dataset of `num_examples`.

    In Poisson mode the padded batch size is the smallest multiple of
    `microbatch_size * num_replicas` whose binomial overflow probability is at
    most `max_overflow_probability`; in shuffle mode it is
    `expected_batch_size` rounded up to that multiple.

    Args:
        mode: `"poisson"` or `"shuffle"`.
        num_examples: N > 0.
        expected_batch_size: B, 0 < B <= N.
        microbatch_size: rows per micro-batch (> 0).
        num_replicas: replicas the batch is split over (> 0).
        max_overflow_probability: per-update bound on the overflow probability,
            in (0, 1).
        on_overflow: `"drop"` or `"raise"`.
        accept_shuffle_as_poisson: see `SamplingSpec`.

    Returns:
        A `SamplingSpec`.

    Raises:
        ValueError: an argument is out of range.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
    for name, value in (("num_examples", num_examples),
                        ("expected_batch_size", expected_batch_size),
                        ("microbatch_size", microbatch_size),
                        ("num_replicas", num_replicas)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if expected_batch_size > num_examples:
        raise ValueError(
                f"expected_batch_size={expected_batch_size} exceeds num_examples="
                f"{num_examples}.")
    if not 0.0 < max_overflow_probability < 1.0:
        raise ValueError(
                f"max_overflow_probability must be in (0, 1); got {max_overflow_probability}.")
    granule = microbatch_size * num_replicas
    q = expected_batch_size / num_examples
    if mode == POISSON:
        cap, overflow = poisson_cap(num_examples, q, granule, max_overflow_probability)
        steps_per_epoch = max(1, round(num_examples / expected_batch_size))
    else:
        cap, overflow = _round_up(expected_batch_size, granule), 0.0
        steps_per_epoch = num_examples // expected_batch_size
    return SamplingSpec(
            mode=mode, num_examples=int(num_examples),
            expected_batch_size=int(expected_batch_size), sampling_probability=q,
            steps_per_epoch=int(steps_per_epoch), padded_batch_size=int(cap),
            overflow_probability=float(overflow), microbatch_size=int(microbatch_size),
            num_replicas=int(num_replicas), on_overflow=on_overflow,
            accept_shuffle_as_poisson=bool(accept_shuffle_as_poisson))


def _round_up(value, multiple):
    return -(-int(value) // multiple) * multiple


def poisson_cap(num_examples, q, granule, max_overflow_probability):
    """The smallest multiple of `granule` that a Poisson sample exceeds rarely.

    Returns:
        `(cap, probability)`: the cap, and the probability that Poisson
        sampling at rate q from N + 1 examples draws more than it (at most
        `max_overflow_probability`).
    """
    # N + 1 trials: the neighbouring dataset with one more example has the
    # larger tail, and the DP bound needs it for both datasets.
    trials = num_examples + 1
    cap = _round_up(max(stats.binom.isf(max_overflow_probability, trials, q), 1), granule)
    while stats.binom.sf(cap, trials, q) > max_overflow_probability:
        cap += granule
    return cap, float(stats.binom.sf(cap, trials, q))
