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

Under any other strategy (one process) these are no-ops: this process is
the chief and its values are the job's.
"""

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
