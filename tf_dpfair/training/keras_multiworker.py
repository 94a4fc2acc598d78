"""Keras 3 `fit`, `evaluate` and `predict` on several workers: the workaround.

Keras 3.15's TensorFlow trainer fails under
`tf.distribute.MultiWorkerMirroredStrategy` (MWMS) with more than one worker,
for any model, a plain `keras.Sequential` included: keras-team/keras#20585
(open; the maintainers' answer is that Keras 3 does not support MWMS) and
tensorflow/tensorflow#72388 (closed as stale). Two of its internals fail,
and `MultiWorkerFit`, mixed into the package's model classes, avoids both
from the model's side without patching Keras:

1. `TensorFlowTrainer._maybe_symbolic_build` reduces the first distributed
   batch with `strategy.reduce("MEAN", batch)` only to learn its shapes; the
   collective strategy refuses a nested `PerReplica` batch. Here the model is
   built from one local replica's share of that batch instead: only shapes
   and dtypes are read, and nothing crosses workers.
2. `reduce_per_replica` reduces every log of a step with
   `strategy.reduce("MEAN", value, axis=0)` in multi-worker mode, which fails
   for the usual rank-0 logs. Each step's logs get a leading axis of length
   1 here; that reduction then averages them over the replicas and hands
   Keras logs of their usual shape.

`check_keras_internals` lists what this relies on and fails loudly, naming
it, when a Keras release renames or changes it (tests/multiworker_test.py
runs it; `MultiWorkerFit` runs it before the first multi-worker build).

When Keras's `fit` runs under MWMS, delete this module and `MultiWorkerFit`
from the bases of `DPModel`, `PrivateModel` and `NonPrivateModel`.
Multi-worker support that does not work around Keras (which worker is the
chief, sharing the sampling seed, copying a restored checkpoint to every
worker) is in `tf_dpfair.workers` and stays.
"""

import inspect

import tensorflow as tf


UPSTREAM_ISSUES = ("keras-team/keras#20585", "tensorflow/tensorflow#72388")


def in_multi_worker_mode(strategy):
    """Whether Keras takes its (failing) multi-worker path under `strategy`.

    The predicate of Keras's own `reduce_per_replica`: an MWMS with more than
    one worker. A one-worker MWMS trains like a `MirroredStrategy`.

    Args:
      strategy: a `tf.distribute.Strategy`, or None.

    Returns:
      A bool.
    """
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())


def _keras_trainer_module():
    from keras.src.backend.tensorflow import trainer  # The internals patched around.
    return trainer


def check_keras_internals():
    """Checks that Keras still has the internals `MultiWorkerFit` relies on.

    They are: `TensorFlowTrainer._maybe_symbolic_build(iterator, data_batch)`,
    which `MultiWorkerFit` overrides; `Trainer._symbolic_build(data_batch=)`,
    which it calls; `reduce_per_replica`'s multi-worker reduction of logs
    along axis 0, which the leading log axis is shaped for; and TF's
    `_in_multi_worker_mode`, the predicate Keras uses. (The epoch iterator's
    `(begin, end, iterator)` steps, also read, are checked by the tests:
    checking them needs a dataset.)

    Raises:
      RuntimeError: one of them was renamed or changed; the message names it
        and the upstream issues, so the workaround can be re-examined (or
        deleted, if Keras now supports MWMS).
    """
    trainer = _keras_trainer_module()
    problems = []

    def params(owner, name):
        function = getattr(owner, name, None)
        if function is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            return ()
        return tuple(inspect.signature(function).parameters)

    if params(trainer.TensorFlowTrainer, "_maybe_symbolic_build") != (
            "self", "iterator", "data_batch"):
        problems.append("TensorFlowTrainer._maybe_symbolic_build(self, "
                        "iterator, data_batch) changed its signature")
    if "data_batch" not in params(trainer.TensorFlowTrainer, "_symbolic_build"):
        problems.append("_symbolic_build no longer takes data_batch")
    reduce_source = inspect.getsource(getattr(
        trainer, "reduce_per_replica", lambda: None))
    if ("_collective_all_reduce_multi_worker(strategy)" not in reduce_source
            or 'strategy.reduce("MEAN", v, axis=0)' not in reduce_source):
        problems.append("reduce_per_replica no longer reduces logs with "
                        "strategy.reduce(\"MEAN\", v, axis=0) in multi-worker "
                        "mode")
    from tensorflow.python.distribute import collective_all_reduce_strategy
    if not hasattr(collective_all_reduce_strategy.CollectiveAllReduceExtended,
                   "_in_multi_worker_mode"):
        problems.append("CollectiveAllReduceExtended._in_multi_worker_mode "
                        "is gone")
    if problems:
        raise RuntimeError(
            "tf_dpfair.training.keras_multiworker works around Keras internals that changed "
            f"({', '.join(UPSTREAM_ISSUES)}): " + "; ".join(problems) + ". "
            "Check whether Keras now trains under MultiWorkerMirroredStrategy "
            "(then delete tf_dpfair/multiworker.py) or adapt the workaround.")


def _with_leading_axis(logs):
    """Each log as a `[1, ...]` tensor, for Keras's reduction along axis 0."""
    return tf.nest.map_structure(
        lambda value: tf.expand_dims(tf.convert_to_tensor(value), 0), logs)


class MultiWorkerFit:
    """Mixin for `keras.Model` subclasses: `fit`/`evaluate` under multi-worker MWMS.

    Put it first among the bases, so its `train_step` and `test_step` wrap
    the model's own. Outside multi-worker mode it changes nothing.
    """

    _keras_internals_checked = False

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the model from one local replica's batch (see module doc)."""
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is None or not in_multi_worker_mode(strategy):
            return super()._maybe_symbolic_build(iterator=iterator,
                                                 data_batch=data_batch)
        if not MultiWorkerFit._keras_internals_checked:
            check_keras_internals()
            MultiWorkerFit._keras_internals_checked = True
        for _, _, distributed in iterator:
            batch = next(distributed)
            break
        else:
            return None  # No data: nothing to build from, as in Keras.
        local = tf.nest.map_structure(
            lambda value: strategy.experimental_local_results(value)[0], batch)
        with strategy.scope():
            self._symbolic_build(data_batch=local)
        return None

    def train_step(self, data):
        """The model's own step; its logs shaped for multi-worker reduction."""
        logs = super().train_step(data)
        if in_multi_worker_mode(self.distribute_strategy):
            return _with_leading_axis(logs)
        return logs

    def test_step(self, data):
        """The model's own evaluation step; logs shaped as in `train_step`."""
        logs = super().test_step(data)
        if in_multi_worker_mode(self.distribute_strategy):
            return _with_leading_axis(logs)
        return logs
