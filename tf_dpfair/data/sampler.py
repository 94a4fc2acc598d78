"""The logical batch of each update, drawn as a `SamplingSpec` says.

Randomness is counter-based (Philox, stateless): the batch of update `step` is
a pure function of `(seed, step)`, so a run reproduces exactly and resumes from
any update index. What the accountant is told about this sampling is the
spec's (`tf_dpfair.privacy.sampling`); this module only draws it.
"""

import sys

import numpy as np
import tensorflow as tf

from tf_dpfair.privacy.sampling import POISSON

# Distinct second seed words keep sampling, shuffling and augmentation draws
# independent even though they all derive from one user seed.
SAMPLING_STREAM = 1
SHUFFLE_STREAM = 2
AUGMENT_STREAM = 3
_ALG = "philox"  # explicit, so CPU and accelerators draw the same numbers


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
