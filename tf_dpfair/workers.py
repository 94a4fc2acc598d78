"""What a job on several workers needs: the chief, a shared secret, one state.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
program. For DP training three things must hold across workers:

- Only the chief writes files a run keeps (checkpoints, logs, reports); the
  other workers write nowhere shared. `is_chief` says which one this is.
- Every worker draws the same logical batch of each update and trains on its
  own slice of it, so all must use the same secret sampling seed; otherwise
  an update would combine slices of different Poisson samples, which is not
  the sampling the accountant is told about. `share_from_chief` gives every
  worker the chief's value through one collective all-reduce: the secret
  travels over the job's own collective channel and is written nowhere.
- A resumed job continues from the chief's checkpoint: `copy_from_chief`
  gives every worker the chief's variables, so the other workers need no
  access to the chief's files.
- Nothing above is taken on trust: `check_workers_agree`, run by
  `DPModel.fit` before the first update (a resumed fit included), makes
  the workers prove that they build the same logical batches (same seed,
  spec, start, data, DP settings) without any of them revealing its seed,
  and refuses the fit on every worker when they do not.

Under any other strategy (one process) these are no-ops: this process is
the chief and its values are the job's.
"""

import dataclasses
import hashlib

import tensorflow as tf


def is_multi_worker(strategy):
    """Whether `strategy` spans several worker processes.

    Args:
      strategy: a `tf.distribute.Strategy`.

    Returns:
      True for a `MultiWorkerMirroredStrategy` with more than one worker.
    """
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and num_workers(strategy) > 1)


def num_workers(strategy):
    """The number of worker processes of the job (1 for one process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or (
            resolver is None):
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("chief", [])) + len(spec.get("worker", [])))


def is_chief(strategy):
    """Whether this process is the one that writes the run's files.

    The chief task, or worker 0 of a cluster without one; the only process
    of any other strategy.

    Args:
      strategy: a `tf.distribute.Strategy`.

    Returns:
      A bool.
    """
    return bool(strategy.extended.should_checkpoint)


def _from_first_replica(strategy, tensors):
    """The values of replica 0 (the chief's first replica), on every worker."""

    # One all-reduce per dtype: a batched all-reduce packs its tensors into
    # one buffer, which needs a single dtype.
    by_dtype = {}
    for position, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(position)

    @tf.function(autograph=False)
    def pull():
        def on_replica():
            context = tf.distribute.get_replica_context()
            first = tf.equal(context.replica_id_in_sync_group, 0)
            summed = [None] * len(tensors)
            for positions in by_dtype.values():
                # Everyone else adds zeros: the sum is the chief's value, exactly.
                own = [tf.where(first, tensors[p], tf.zeros_like(tensors[p]))
                       for p in positions]
                for p, value in zip(positions, context.all_reduce(
                        tf.distribute.ReduceOp.SUM, own)):
                    summed[p] = value
            return summed

        return strategy.run(on_replica)

    return [strategy.experimental_local_results(value)[0] for value in pull()]


def share_from_chief(strategy, value):
    """The chief's value of an integer, on every worker (one all-reduce).

    Use it for a secret every worker must share, such as the sampling seed:
    each worker draws its own, and all continue with the chief's. It is sent
    over the collective channel only, never written.

    Args:
      strategy: the job's `tf.distribute.Strategy`.
      value: this worker's integer, in [0, 2**63).

    Returns:
      The chief's integer (this process's `value` outside a multi-worker job).

    Raises:
      ValueError: `value` is not an integer in [0, 2**63).
    """
    if isinstance(value, bool) or int(value) != value or not 0 <= value < 2**63:
        raise ValueError(f"share_from_chief needs an integer in [0, 2**63); "
                         f"got {value!r}.")
    if not is_multi_worker(strategy):
        return int(value)
    shared, = _from_first_replica(strategy, [tf.constant(int(value), tf.int64)])
    return int(shared.numpy())


def copy_from_chief(strategy, variables):
    """Gives every worker the chief's values of `variables`.

    Call it on every worker after the chief alone loaded a checkpoint (a
    collective op: all workers must call it, in the same order).

    Args:
      strategy: the job's `tf.distribute.Strategy`.
      variables: Keras (or TF) variables created under `strategy`, e.g.
        `model.variables + model.optimizer.variables`.
    """
    variables = list(variables)
    if not is_multi_worker(strategy) or not variables:
        return
    with strategy.scope():
        values = _from_first_replica(
            strategy, [tf.convert_to_tensor(v.value) for v in variables])
    for variable, value in zip(variables, values):
        variable.assign(value)


# ----------------------------------------- the workers agree on the batches

# Each item is compared as a 64-bit blake2b digest. The key is a public
# constant: it keeps these digests apart from any other use of blake2b, it
# hides nothing. What keeps the sampling seed secret is its entropy: a seed of
# `secrets.randbits(62)` takes about 2**61 trials to find from its digest,
# so a plain (fast) hash is enough. A small hand-picked seed (`seed=11` in a
# test) can be found from its digest, as it could be guessed anyway. The
# digests travel only over the job's collective channel, which
# `share_from_chief` already trusts with the seed itself.
DIGEST_BITS = 64
_DIGEST_KEY = b"tf_dpfair.workers.check_workers_agree"
_SEED = "the sampling seed"

# What to do about each kind of disagreement, in the order of the message.
_FIXES = {
    "seed": ("give every worker the chief's sampling seed: seed = "
             "tf_dpfair.workers.share_from_chief(strategy, "
             "secrets.randbits(62)), then make_train_dataset(..., seed=seed)"),
    "pipeline": ("build the pipeline on every worker with the same "
                 "tf_dpfair.data.make_train_dataset arguments (the same "
                 "ExampleSource, expected_batch_size, mode, microbatch_size, "
                 "augmult, with_groups, and num_replicas="
                 "strategy.num_replicas_in_sync, the replicas of the whole "
                 "job)"),
    "start": ("build it on every worker with start_step=model.update_count "
              "and the same num_steps (tf_dpfair.training.checkpoints.fit_resumable does both)"),
    "dp": ("give every worker the same DPConfig (its noise seed may differ: "
           "only the chief's first replica adds noise)"),
}


@dataclasses.dataclass(frozen=True)
class AgreementItem:
    """One thing the workers must agree on, as this worker has it.

    Attributes:
      what: what it is, for the message (e.g. "the sampling spec").
      detail: which part of it (e.g. "num_examples"), or "".
      fix: the kind of fix, a key of `_FIXES`.
      digest: its `digest`, 16 hex digits; never the value.
    """

    what: str
    detail: str
    fix: str
    digest: str


def digest(item, value):
    """The 64-bit keyed blake2b digest of `repr(value)` under the name `item`.

    Args:
      item: the item's name (separates equal values of different items).
      value: a value with a deterministic `repr` (ints, floats, strings,
        tuples of them).

    Returns:
      16 hex digits.
    """
    hashed = hashlib.blake2b(digest_size=DIGEST_BITS // 8, key=_DIGEST_KEY)
    hashed.update(f"{item}\0{value!r}".encode())
    return hashed.hexdigest()


def seed_digest(seed):
    """The digest of a sampling seed that workers compare (never the seed).

    Args:
      seed: the secret integer sampling seed of `data.make_train_dataset`.

    Returns:
      16 hex digits.
    """
    return digest(_SEED, int(seed))


def agreement_items(tag, element_spec, dp_config):
    """Everything that decides the logical batches of a fit, digested.

    The sampling seed (as the pipeline's digest of it), every field of the
    `SamplingSpec`, the pipeline's start step and length, a fingerprint of
    the data (N and the shapes and dtypes of the batches: the package's
    `ExampleSource` has no content digest, and hashing every image would
    cost a pass over the data), and the `DPConfig` apart from its noise
    seed. The noise seed is left out on purpose: only replica 0, the chief's
    first, adds noise (`DPTraining.train_step` multiplies every other
    replica's draw by 0), so other workers' noise seeds never reach an
    update; `DPConfig(seed=None)` draws a fresh one in every process (as
    `tf-dpfair-train` does on purpose), and a resume's re-keying follows the
    chief. Comparing it would refuse every such job for nothing.

    Args:
      tag: the pipeline's `tf_dpfair.privacy.pipeline_tag.PipelineTag`.
      element_spec: the `element_spec` of the dataset given to `fit`.
      dp_config: the model's `DPConfig`.

    Returns:
      A list of `AgreementItem`, in the same order on every worker.
    """
    spec = tag.spec
    seed = tag.seed_digest if tag.seed_digest is not None else digest(_SEED, None)
    items = [AgreementItem(_SEED, "", "seed", seed)]
    fields = (dataclasses.asdict(spec) if dataclasses.is_dataclass(spec)
              else {"repr": repr(spec)})
    for name, value in fields.items():
        items.append(AgreementItem("the sampling spec", name, "pipeline",
                                   digest(f"spec.{name}", value)))
    config = dict(dp_config.get_config(), seed=None)  # never the noise seed
    items += [
        AgreementItem("the pipeline's start", "start_step", "start",
                      digest("start_step", tag.start_step)),
        AgreementItem("the pipeline's start", "num_steps", "start",
                      digest("num_steps", tag.num_steps)),
        AgreementItem("the training data (N and the shapes and dtypes of "
                      "its batches)", "", "pipeline",
                      digest("data", (spec.num_examples,
                                      _structure(element_spec)))),
        AgreementItem("the DPConfig (apart from its noise seed)", "", "dp",
                      digest("dp_config", tuple(sorted(config.items())))),
    ]
    return items


def refusal(items, low, high, workers):
    """The message every worker raises, or None when the workers agree.

    Pure: it sees this worker's items and the reduction of all workers'
    digests, so it gives the same answer on every worker.

    Args:
      items: this worker's `AgreementItem`s (same order on every worker).
      low, high: per item, two ints that are equal exactly when every
        worker has the same digest: the bitwise AND and OR of the workers'
        digests (what `check_workers_agree` reduces), or their min and max.
      workers: the number of workers, for the message.

    Returns:
      A str, or None.

    Raises:
      ValueError: `items`, `low` and `high` differ in length.
    """
    if not len(items) == len(low) == len(high):
        raise ValueError(f"{len(items)} items but {len(low)} and {len(high)} "
                         f"reduced digests.")
    differ = [item for item, lo, hi in zip(items, low, high) if lo != hi]
    if not differ:
        if items and items[0].digest == digest(_SEED, None):
            return ("The training pipeline records no digest of its sampling "
                    "seed, so the workers cannot check that they draw the "
                    "same logical batches. Build it with "
                    "tf_dpfair.data.make_train_dataset on every worker.")
        return None
    named = {}
    for item in differ:
        named.setdefault(item.what, [])
        if item.detail:
            named[item.what].append(item.detail)
    what = "; ".join(f"{name} ({', '.join(details)})" if details else name
                     for name, details in named.items())
    fixes = [text for kind, text in _FIXES.items()
             if any(item.fix == kind for item in differ)]
    return (f"The {workers} workers of this job do not agree on what decides "
            f"the logical batches: they differ in {what}. An update would "
            f"join slices of different batches (or slices clipped and scaled "
            f"differently): one example could be in two workers' shares of "
            f"one update (sensitivity up to 2C where the noise and the "
            f"accountant assume C), and the batches would not be the sample "
            f"that is accounted. Fix: "
            f"{'; '.join(fixes)}. Refused on every worker before the first "
            f"update; nothing was trained or written.")


def check_workers_agree(strategy, tag, dp_config, element_spec):
    """Refuses, on every worker, a fit whose workers would draw other batches.

    Every worker digests the items of `agreement_items`; one all-reduce sums
    their bits over all replicas of the job, which gives every worker the
    bitwise AND and OR of all workers' digests (the meet and join: equal
    exactly when all digests are), and `refusal` compares them. No worker
    sends a seed, only digests. A collective op: every worker must call it,
    as `DPModel.fit` does before the first update (after a restore too, so
    `tf_dpfair.training.checkpoints.fit_resumable` is covered). No-op outside a multi-worker job.

    Args:
      strategy: the model's `tf.distribute.Strategy`.
      tag: the `tf_dpfair.privacy.pipeline_tag.PipelineTag` of the dataset given to `fit`.
      dp_config: the model's `DPConfig`.
      element_spec: that dataset's `element_spec`.

    Raises:
      ValueError: the workers differ in any item (the message names the
        items and the fix, the same on every worker), or the pipeline has
        no seed digest.
    """
    if not is_multi_worker(strategy):
        return
    items = agreement_items(tag, element_spec, dp_config)
    low, high = and_or_over_replicas(strategy,
                                     [int(item.digest, 16) for item in items])
    message = refusal(items, low, high, num_workers(strategy))
    if message is not None:
        raise ValueError(message)


def and_or_over_replicas(strategy, values):
    """The bitwise AND and OR of every replica's `DIGEST_BITS`-bit integers.

    Collectives only sum, so each value goes as its bits: summed over the R
    replicas of the job, a bit is in the AND where the sum is R and in the
    OR where it is above 0.

    Args:
      strategy: a `tf.distribute.Strategy`.
      values: this process's ints in [0, 2**DIGEST_BITS).

    Returns:
      Two lists of ints, the AND and the OR, one per value.
    """
    bits = tf.constant([[(value >> i) & 1 for i in range(DIGEST_BITS)]
                        for value in values], tf.int64)

    @tf.function(autograph=False)
    def total():
        def on_replica():
            # A copy per replica: given the same tensor by every replica,
            # MirroredStrategy takes it for one mirrored value and returns
            # it unsummed (measured), so every AND would equal the OR.
            return tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, tf.identity(bits))

        return strategy.run(on_replica)

    counts = strategy.experimental_local_results(total())[0].numpy()
    replicas = strategy.num_replicas_in_sync

    def join(row, keep):
        return sum(1 << i for i, count in enumerate(row) if keep(count))

    return ([join(row, lambda c: c == replicas) for row in counts],
            [join(row, lambda c: c > 0) for row in counts])


def _structure(spec):
    """A nested tuple of a dataset's element spec: types, shapes, dtypes."""
    if isinstance(spec, dict):
        return tuple((str(key), _structure(spec[key])) for key in sorted(spec))
    if isinstance(spec, (list, tuple)):
        return tuple(_structure(part) for part in spec)
    return (type(spec).__name__, str(getattr(spec, "shape", "")),
            str(getattr(spec, "dtype", "")))
