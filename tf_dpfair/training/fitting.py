"""How a DP model plugs into Keras' `fit`: its input, its ledger, XLA, workers.

`KerasFitting` is mixed into `tf_dpfair.training.model.DPTraining`. The DP
step itself is in `tf_dpfair.dpsgd.step`; this module holds what surrounds
it in `fit`:

- how each `fit` call is fed (`tf_dpfair.privacy.input_sampling.resolve`;
  which input is arrays, and its N, are worked out here), the segment of the
  privacy ledger its updates go to (`tf_dpfair.training.ledger_state`, recorded by
  the step itself and synced by `ledger_state.LedgerCallback`), and
  refusals of input that would break the accounting (a replayed pipeline;
  arrays or unchecked input on several workers);
- opt-in per-group training diagnostics (`diagnostics.GroupDiagnostics`);
- `train_on_batch`, whose batch nobody describes;
- Keras internals: the optimizer built before tracing, XLA limited to the
  per-example pass, and `steps_per_execution` refused where Keras fails.
"""

import math

import keras
import tensorflow as tf

from tf_dpfair import workers as cluster
from tf_dpfair.data import pipeline
from tf_dpfair.training import diagnostics
from tf_dpfair.privacy import input_sampling
from tf_dpfair.privacy import ledger
from tf_dpfair.training import ledger_state


class KerasFitting:
    """`fit`, `train_on_batch` and the train function of a DP model (a mixin).

    Expects the model to hold `_dp_config`, `_feeding` and `_diagnostics`
    (created by `DPTraining._init_dp`) and the ledger of
    `ledger_state.LedgerState`.
    """

    @property
    def feeding(self):
        """The `input_sampling.Feeding` of the latest `fit` call, or None before any."""
        return self._feeding

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto",
            callbacks=None, validation_split=0.0, validation_data=None,
            shuffle=True, class_weight=None, sample_weight=None,
            initial_epoch=0, steps_per_epoch=None, validation_steps=None,
            validation_batch_size=None, validation_freq=1):
        """Like `keras.Model.fit`; also records how the batches are drawn.

        `x` may be the `TrainData` of `pipeline.make_train_dataset` (or its
        dataset): the model then knows the pipeline's `SamplingSpec`, and
        `steps_per_epoch` defaults to the spec's. Every call records its
        `input_sampling.Feeding` (`model.feeding`) and opens a segment of the privacy
        ledger (`model.privacy_ledger`) that the step itself counts every
        applied update into, so `PrivacyLogger` composes what really ran.
        A batch with more rows of weight > 0 than this call's accounting
        allows is refused before it is applied (ValueError).

        Under `MultiWorkerMirroredStrategy` with several workers, `x` must
        be the package's pipeline (see `tf_dpfair.workers`): every worker
        builds it with the same secret seed and trains on its own slice.

        Raises:
          ValueError: the input would break the accounting (see
            `input_sampling.resolve`): a pipeline not started at `update_count`, a
            finite pipeline Keras would replay, arrays stated as Poisson; on
            several workers, input other than the package's pipeline, or
            workers whose pipelines would draw different logical batches
            (`cluster.check_workers_agree`); during training, a batch with
            more rows of weight > 0 than this call's accounting allows.
        """
        if isinstance(x, pipeline.TrainData):
            x = x.dataset
        tag = input_sampling.pipeline_tag(x)
        if cluster.is_multi_worker(self.distribute_strategy):
            refuse_unsliced_input_on_workers(x, tag, self.distribute_strategy)
            cluster.check_workers_agree(self.distribute_strategy, tag, self._dp_config, x.element_spec)
        if tag is not None and tag.num_steps is None and steps_per_epoch is None:
            steps_per_epoch = tag.spec.steps_per_epoch  # else endless epochs
        if isinstance(callbacks, keras.callbacks.CallbackList):
            callbacks = callbacks.callbacks
        callbacks = list(callbacks or [])
        fed = input_sampling.resolve(
            x=x, batch_size=batch_size,
            epochs=epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            expected_batch_size=self._dp_config.expected_batch_size,
            update_count=self.update_count,
            array_examples=(infer_num_examples(x, validation_split)
                            if is_array_input(x) else None),
            stated=[c.stated_sampling for c in callbacks
                    if isinstance(getattr(c, "stated_sampling", None),
                                  input_sampling.StatedSampling)])
        self._attach_diagnostics(callbacks)
        if cluster.is_multi_worker(self.distribute_strategy):
            self._share_ledger_root()
        self._feeding = fed
        # Every update of this call is recorded in this segment of the
        # ledger, by the step itself; `finally` records what ran, whatever
        # stopped the call.
        fields, row_limit, reason = fed.segment(self._dp_config.noise_multiplier)
        self._open_segment(fields, row_limit=row_limit, reason=reason,
                           pipeline=fed.kind == input_sampling.PIPELINE)
        self._last_segment_id = self._open.segment_id
        # First, so checkpoints written at a step's end hold the ledger of
        # that step.
        callbacks.insert(0, ledger_state.LedgerCallback())
        try:
            return super().fit(
                x=x, y=y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                callbacks=callbacks, validation_split=validation_split,
                validation_data=validation_data, shuffle=shuffle,
                class_weight=class_weight, sample_weight=sample_weight,
                initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                validation_steps=validation_steps,
                validation_batch_size=validation_batch_size,
                validation_freq=validation_freq)
        except tf.errors.InvalidArgumentError as error:
            if ledger_state.ROW_LIMIT_MARKER in str(error):
                raise self._row_limit_error(error) from error
            raise
        finally:
            self._close_segment()

    def _attach_diagnostics(self, callbacks):
        """Turns `diagnostics.GroupDiagnostics` on for this fit, or off."""
        found = [c for c in callbacks
                 if isinstance(c, diagnostics.GroupDiagnostics)]
        if len(found) > 1:
            raise ValueError("Give fit one GroupDiagnostics callback.")
        wanted = found[0] if found else None
        if wanted is not self._diagnostics:
            self.train_function = None  # traced with the other setting
            self._diagnostics = wanted
        if wanted is not None:
            wanted.attach(self)

    def train_on_batch(self, x, y=None, sample_weight=None, class_weight=None,
                       return_dict=False):
        """Like `keras.Model.train_on_batch`: one DP update on one batch.

        Nothing says how such a batch was drawn, so the ledger records it
        as an update any example may have joined (an unamplified Gaussian
        mechanism), and `feeding` is cleared.

        Raises:
          ValueError: the model's strategy has several replicas. Keras hands
            every replica the whole batch here, so each example would enter
            the sum once per replica: its influence would be R times the
            clip norm the noise is calibrated to. Use `fit`, which splits
            the batch.
        """
        replicas = self.distribute_strategy.num_replicas_in_sync
        if replicas > 1:
            raise ValueError(
                f"DPModel.train_on_batch under a strategy with {replicas} "
                f"replicas would give every replica the whole batch, so each "
                f"example would count {replicas} times in the update, above "
                f"the clip norm the noise is calibrated to. Use fit (one "
                f"batch = one update), which splits the batch over replicas.")
        self._feeding = None
        self._open_segment(
            {"sampling": ledger.PASSES, "source": ledger.SINGLE_BATCH,
             "noise_multiplier": self._dp_config.noise_multiplier,
             "updates_per_pass": 1}, row_limit=None, reason="")
        self._last_segment_id = self._open.segment_id
        try:
            return super().train_on_batch(x, y, sample_weight=sample_weight,
                                          class_weight=class_weight,
                                          return_dict=return_dict)
        finally:
            self._close_segment()

    def _build_optimizer(self):
        """Creates the optimizer's slots for the trainable variables, once."""
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        """Keras' train function, with XLA limited to the per-example pass.

        Keras compiles the whole `train_step` with XLA under `jit_compile`;
        XLA drops `tf.debugging` assertions, so the class-id and sample-weight
        checks would pass bad batches. The step is traced as a plain graph
        instead, and `train_step` compiles its per-example pass with XLA.

        Raises:
          ValueError: `steps_per_execution` > 1 under a `tf.distribute`
            strategy with several replicas.
        """
        refuse_multi_step_under_strategy(self.steps_per_execution,
                                          self.distribute_strategy)
        if self.train_function is not None and not force:
            return self.train_function
        jit_compile = self.jit_compile
        self.jit_compile = False
        try:
            super().make_train_function(force=force)
        finally:
            self.jit_compile = jit_compile
        return self.train_function


def refuse_unsliced_input_on_workers(x, tag, strategy):
    """Raises unless every worker will train on its slice of one batch.

    Under several workers Keras splits each batch of the dataset by
    `tf.data` auto-sharding: every worker builds the same stream and keeps
    its replicas' rows (policy DATA). That is the logical batch only if all
    workers build the same batches: the package's pipeline does (same
    secret seed everywhere, see `tf_dpfair.workers.share_from_chief`). Keras
    shuffles arrays differently on each worker, and a user pipeline shuffled
    without a seed would put one example in two workers' slices of one
    update, counting it twice; with sharding OFF every worker trains on the
    same rows.

    Args:
      x: the input given to `fit`.
      tag: its `input_sampling.PipelineTag`, or None.
      strategy: the model's multi-worker strategy.

    Raises:
      ValueError: `x` is not the package's pipeline, or its auto-shard
        policy is not DATA.
    """
    workers = cluster.num_workers(strategy)
    if tag is None:
        raise ValueError(
            f"On {workers} workers DPModel.fit needs the TrainData of "
            f"tf_dpfair.data.make_train_dataset (built on every worker with "
            f"the same secret seed, shared with "
            f"tf_dpfair.workers.share_from_chief): each worker must train on "
            f"its own slice of the same logical batch, which the package "
            f"cannot check for arrays or other pipelines (Keras shuffles "
            f"arrays differently on each worker; an unseeded shuffle would "
            f"put one example in two workers' slices and count it twice).")
    policy = x.options().experimental_distribute.auto_shard_policy
    if policy != tf.data.experimental.AutoShardPolicy.DATA:
        raise ValueError(
            f"On {workers} workers the training dataset must be sharded by "
            f"data (tf.data AutoShardPolicy.DATA: each worker keeps its "
            f"replicas' rows of every batch); it has {policy!r}. With OFF "
            f"every worker trains on the same rows, so each example would "
            f"count once per worker. tf_dpfair.data.make_train_dataset sets DATA.")


def refuse_multi_step_under_strategy(steps_per_execution, strategy):
    """Raises where Keras' `fit` would fail with several steps per call.

    Keras 3.15's `fit` with `steps_per_execution` > 1 fails inside its step
    loop ("You must feed a value for placeholder tensor") under a strategy
    with several replicas, even for a plain Sequential model
    (keras-team/keras#19246, open). One replica (OneDeviceStrategy, or
    MirroredStrategy on one device) works and is let through.

    Args:
      steps_per_execution: the model's `steps_per_execution`.
      strategy: the model's `distribute_strategy` (the one it was created
        under, else the one in scope).

    Raises:
      ValueError: more than one step per call with more than one replica.
    """
    if not isinstance(steps_per_execution, int) or steps_per_execution <= 1:
        return
    if strategy.num_replicas_in_sync <= 1:
        return
    raise ValueError(
        f"steps_per_execution={steps_per_execution} is not supported under "
        f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} "
        f"replicas: Keras 3's fit fails with more than one step per call "
        f"under a tf.distribute strategy with several replicas "
        f"(keras-team/keras#19246). Use steps_per_execution=1.")


def infer_num_examples(x, validation_split=0.0):
    """N of array input as Keras will train on it (after `validation_split`).

    Args:
      x: arrays, tensors, or a (nested) structure of them.
      validation_split: `fit`'s fraction of the data held out.

    Returns:
      An int.
    """
    first = tf.nest.flatten(x)[0]
    total = int(first.shape[0]) if hasattr(first, "shape") else len(first)
    if validation_split:
        # Keras' own split (keras/src/trainers/data_adapters/array_slicing.py).
        return int(math.floor(total * (1.0 - validation_split)))
    return total


def is_array_input(x):
    """True for input that Keras batches itself (arrays, tensors, lists)."""
    if x is None or isinstance(x, tf.data.Dataset):
        return False
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(
        hasattr(leaf, "shape") and hasattr(leaf, "dtype") and len(leaf.shape) > 0
        or isinstance(leaf, (list, tuple)) for leaf in leaves)
