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

Randomness is counter-based (Philox, stateless): the batch of update `step` is
a pure function of `(seed, step)`, so a run reproduces exactly and resumes from
any update index. The seed is not part of the spec: the guarantee assumes the
sampling randomness stays secret, so keep it out of logs.
"""

import dataclasses
import math
import sys

import numpy as np
import tensorflow as tf
from scipy import stats

from tf_dpfair import accounting

POISSON = "poisson"
SHUFFLE = "shuffle"
MODES = (POISSON, SHUFFLE)
ON_OVERFLOW = ("drop", "raise")
DEFAULT_MAX_OVERFLOW_PROBABILITY = 1e-12

# Distinct second seed words keep sampling, shuffling and augmentation draws
# independent even though they all derive from one user seed.
SAMPLING_STREAM = 1
SHUFFLE_STREAM = 2
AUGMENT_STREAM = 3
_ALG = "philox"  # explicit, so CPU and accelerators draw the same numbers


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
        """Keyword arguments for `tf_dpfair.accounting.compute_epsilon`.

        >>> from tf_dpfair import accounting
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


def _check_seed(seed):
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63); got {seed!r}.")
    return int(seed)


def stream_seed(seed, stream):
    """The base seed of one random stream (sampling, shuffling, augmentation).

    Args:
        seed: the run's integer seed, in [0, 2**63).
        stream: one of `SAMPLING_STREAM`, `SHUFFLE_STREAM`, `AUGMENT_STREAM`.

    Returns:
        int64 `[2]` tensor.

    Raises:
        ValueError: the seed is not an integer in range.
    """
    return tf.constant([_check_seed(seed), stream], tf.int64)


def fold_in(seed, data):
    """Derives a new stateless seed from `seed` and an integer (Philox).

    Args:
        seed: int64 `[2]` seed.
        data: integer scalar tensor (an update or example index).

    Returns:
        int64 `[2]` seed, distinct for distinct `data`.
    """
    return tf.random.experimental.stateless_fold_in(
            seed, tf.cast(data, tf.int64), alg=_ALG)


def step_indices(spec, seed, step):
    """The examples of update `step`, padded to `spec.padded_batch_size`.

    Poisson: one uniform draw per example, seeded by `(seed, step)`; examples
    with draw < q are in. If more than the cap are in, those with the smallest
    draws are kept, a uniformly random subset. Shuffle: positions
    `[j * B, (j + 1) * B)` of the permutation of epoch `step // steps_per_epoch`,
    where `j = step % steps_per_epoch`.

    Args:
        spec: a `SamplingSpec`.
        seed: the run's secret integer seed.
        step: int64 scalar tensor, the update index (>= 0).

    Returns:
        `(indices, num_valid, num_drawn)`: int64 `[padded_batch_size]` example
        indices (padding rows hold index 0), int32 scalar number of real rows
        (they come first), int64 scalar number of examples drawn before any
        truncation.
    """
    cap = spec.padded_batch_size
    step = tf.cast(step, tf.int64)
    if spec.mode == POISSON:
        draws = tf.random.stateless_uniform(
                [spec.num_examples], fold_in(stream_seed(seed, SAMPLING_STREAM), step),
                # float64, so P(draw < q) is q itself, not q rounded to float32's grid.
                dtype=tf.float64, alg=_ALG)
        chosen = tf.where(draws < spec.sampling_probability)[:, 0]
        num_drawn = tf.size(chosen, out_type=tf.int64)

        def truncate():
            _, keep = tf.math.top_k(-tf.gather(draws, chosen), k=cap)
            return tf.sort(tf.gather(chosen, keep))

        chosen = tf.cond(num_drawn > cap, truncate, lambda: chosen)
    else:
        epoch = step // spec.steps_per_epoch
        position = (step % spec.steps_per_epoch) * spec.expected_batch_size
        permutation = tf.random.experimental.stateless_shuffle(
                tf.range(spec.num_examples, dtype=tf.int64),
                fold_in(stream_seed(seed, SHUFFLE_STREAM), epoch), alg=_ALG)
        chosen = permutation[position:position + spec.expected_batch_size]
        num_drawn = tf.constant(spec.expected_batch_size, tf.int64)
    num_valid = tf.size(chosen)
    indices = tf.pad(chosen, [[0, cap - num_valid]])
    indices.set_shape([cap])
    return indices, num_valid, num_drawn


def replica_order(spec):
    """Row order that deals real rows round-robin over replicas.

    `tf.distribute` gives replica r the contiguous rows
    `[r * P / R, (r + 1) * P / R)` of a global batch of P rows. Sampled rows
    come first, so without reordering the first replica would get nearly all
    real rows. Row `p` of the reordered batch is row `slot * R + r` of the
    sampled one (r = p // (P / R), slot = p % (P / R)): every replica gets a
    near-equal share of real rows, packed first within its share, so trailing
    micro-batches of each share are all padding.

    Args:
        spec: a `SamplingSpec`.

    Returns:
        int32 numpy `[padded_batch_size]`, a permutation to gather rows with.
    """
    replicas = spec.num_replicas
    share = spec.padded_batch_size // replicas
    position = np.arange(spec.padded_batch_size)
    return ((position % share) * replicas + position // share).astype(np.int32)


def index_dataset(spec, seed, *, start_step=0, num_steps=None):
    """A dataset of `(step, indices, valid)`, one element per update.

    Honours `spec.on_overflow`: `"drop"` prints a warning naming the update to
    stderr, `"raise"` fails the pipeline with `InvalidArgumentError`. With
    several replicas the rows are in `replica_order`; otherwise real rows
    come first.

    Args:
        spec: a `SamplingSpec`.
        seed: the run's secret integer seed.
        start_step: index of the first update (to resume a run).
        num_steps: number of updates, or None for an endless dataset.

    Returns:
        A `tf.data.Dataset` of int64 scalar `step`, int64 `[padded_batch_size]`
        `indices` and bool `[padded_batch_size]` `valid`.

    Raises:
        ValueError: `start_step` or `num_steps` is negative, or the seed is bad.
    """
    _check_seed(seed)
    if int(start_step) != start_step or start_step < 0:
        raise ValueError(f"start_step must be an integer >= 0; got {start_step!r}.")
    if num_steps is not None and (int(num_steps) != num_steps or num_steps < 0):
        raise ValueError(f"num_steps must be None or an integer >= 0; got {num_steps!r}.")
    cap = spec.padded_batch_size
    order = tf.constant(replica_order(spec))

    def sample(step):
        indices, num_valid, num_drawn = step_indices(spec, seed, step)
        overflow = num_drawn > cap
        if spec.on_overflow == "raise":
            check = tf.debugging.Assert(
                    tf.logical_not(overflow),
                    ["Poisson sampling drew", num_drawn, "examples at update", step,
                     "but padded_batch_size is", cap, "(on_overflow='raise')."])
        else:
            def warn():
                with tf.control_dependencies([tf.print(
                        "WARNING: Poisson sampling drew", num_drawn, "examples at update",
                        step, "; kept a random", cap,
                        "(see SamplingSpec.delta_overhead).",
                        output_stream=sys.stderr)]):
                    return tf.constant(True)

            check = tf.cond(overflow, warn, lambda: tf.constant(False))
        with tf.control_dependencies([check]):
            valid = tf.range(cap) < num_valid
        if spec.num_replicas > 1:
            indices, valid = tf.gather(indices, order), tf.gather(valid, order)
        return step, indices, valid

    steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
    if num_steps is not None:
        steps = steps.take(num_steps)
    # Each update's draw depends on (seed, step) only, so parallel calls keep
    # the result deterministic; deterministic=True keeps the order.
    return steps.map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def drawn_batch_sizes(spec, seed, *, start_step=0, num_steps):
    """Audits sampling: how many examples each update drew, before truncation.

    Sampling depends on the seed and update index only, never on the data, so
    overflow events can be counted after the fact:
    `np.sum(drawn_batch_sizes(...) > spec.padded_batch_size)`.

    Args:
        spec: a `SamplingSpec`.
        seed: the run's secret integer seed.
        start_step: first update index.
        num_steps: number of updates.

    Returns:
        int64 numpy array `[num_steps]`.
    """
    _check_seed(seed)
    steps = tf.data.Dataset.range(start_step, start_step + num_steps)
    sizes = steps.map(lambda step: step_indices(spec, seed, step)[2],
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.fromiter(sizes.as_numpy_iterator(), dtype=np.int64, count=num_steps)
