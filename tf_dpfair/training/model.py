"""DPModel: a Keras model whose `fit` runs DP-SGD.

`DPTraining.train_step` is one DP-SGD update on one logical batch: a short
orchestration of the functions of `tf_dpfair.dpsgd.step`, whose docstring
states the update's steps 1-6 and exactly where noise enters, and of the
checks of `tf_dpfair.dpsgd.checks`, which refuse a bad model or batch before
anything is written. What surrounds the step in `fit` (how the input is
recorded for the accountant, diagnostics, XLA and multi-step refusals) is in
`tf_dpfair.training.fitting`; the privacy ledger, whose counter gives every
update its noise index, in `tf_dpfair.training.ledger_state`.

Before the first update after each `compile` (at the first trace of
`train_step`), the model is checked: trainable BatchNormalization anywhere in
it is refused, and so is any model whose training-mode output, loss or loss
gradient for one example depends on another example of a micro-batch
(`checks.check_separable`, at the training micro-batch size), since both
clipping paths bound one example's influence only when it does not.

The module is about 450 lines: the step's orchestration, its parts (the
clipped sum over micro-batches, ghost state, the clip norm or adaptive
threshold of each update), EMA and serialization of the one mixin, and the
two thin model classes that carry it; everything else it needs already lives
in the modules named above.
"""

import contextlib

import keras
import tensorflow as tf

from tf_dpfair.config import DPConfig
from tf_dpfair.data import batch
from tf_dpfair.dpsgd import adaptive
from tf_dpfair.dpsgd import checks
from tf_dpfair.dpsgd import ghost
from tf_dpfair.dpsgd import step
from tf_dpfair.training import diagnostics
from tf_dpfair.training import ema
from tf_dpfair.training import fitting
from tf_dpfair.training import keras_multiworker
from tf_dpfair.training import progress
from tf_dpfair.training import ledger_state
from tf_dpfair.training.non_private import GroupedEvaluation


class DPTraining(fitting.KerasFitting, ledger_state.LedgerState,
                 GroupedEvaluation):
    """The DP-SGD `train_step` and its bookkeeping, mixed into Keras models.

    `DPModel` (functional models) and `PrivateModel` (any other model) use it;
    `isinstance(model, DPTraining)` tells whether a model trains privately.
    Each batch given to `fit` is one logical batch and one optimizer update.
    Training-set loss, metrics and `clip_fraction` in the logs are computed on
    training data without noise: they are outside the DP guarantee. With EMA
    on, `ema_decay` in the logs is the decay d_t the update applied (see
    `ema_decay_reached`); it depends on the update count and the config only,
    never on data, so it costs no privacy.
    """

    def _init_dp(self, dp_config):
        if not isinstance(dp_config, DPConfig):
            raise TypeError(
                f"DPModel needs dp_config=DPConfig(...), got {dp_config!r}.")
        self._dp_config = dp_config
        self._ghost = None  # resolved at the first trace of train_step
        # Set once the separability probe passed; compile clears it.
        self._separable = False
        self._ema_shadows = None
        # The privacy ledger, its step counter and row limit, and its saved
        # copy (`tf_dpfair.training.ledger_state`); created first, so the saved copy
        # is the model's own weight 0.
        self._init_ledger()
        # Examples whose gradient had a NaN or Inf (they contributed zero),
        # counted in the step itself so that no update is missed when
        # `steps_per_execution` > 1 (Keras shows the last step's logs only).
        self._nonfinite_count = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            name="dp_nonfinite_examples", aggregation="only_first_replica")
        # The adaptive clipping threshold T_t of the next update
        # (`tf_dpfair.dpsgd.adaptive`); saved and restored with the weights.
        self._clip_threshold = adaptive.create_threshold(self, dp_config)
        self._feeding = None
        self._last_segment_id = None  # the ledger segment of the latest fit
        self._diagnostics = None  # a diagnostics.GroupDiagnostics during fit

    @property
    def dp_config(self):
        """The `DPConfig` of this model."""
        return self._dp_config

    @property
    def nonfinite_examples(self):
        """Training examples so far whose gradient had a NaN or Inf (int).

        They contributed zero to their update. A diagnostic on training
        data, outside the DP guarantee; saved with the model like
        the weights.
        """
        return int(self._nonfinite_count.numpy())

    # ----------------------------------------------------------- compile

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None,
                metrics=None, jit_compile=False, **kwargs):
        """Like `keras.Model.compile`; also sets up EMA shadows and group metrics.

        `jit_compile` defaults to False (Keras' "auto" turns XLA on where a GPU
        is present): XLA made the vectorized per-example pass slower where it
        was measured. With `jit_compile=True` only the per-example pass (the
        clipped gradient sum over micro-batches) is compiled with XLA; the
        step's input checks, the noise and the optimizer update run outside
        it, because XLA drops assertions and a bad batch must still be
        refused. Evaluation and prediction are compiled whole, as in Keras.

        The optimizer's state is built here when the model is built (as
        Keras does when it restores a compiled model), so that no variable
        is created inside the traced step.

        Metrics with `needs_groups = True` (such as `GroupedAUC`) are fed the
        group ids of `y = {"label": ..., "groups": ...}` during evaluation and
        are never updated on training batches.

        Raises:
          ValueError: the model is not built yet (with `ema_decay`), `loss`
            is missing, or `steps_per_execution` > 1 under a
            `tf.distribute` strategy with several replicas.
        """
        if loss is None:
            raise ValueError("DPModel.compile needs a loss: per-example "
                             "gradients are gradients of the per-example loss.")
        fitting.refuse_multi_step_under_strategy(
            kwargs.get("steps_per_execution", 1), self.distribute_strategy)
        super().compile(optimizer=optimizer, loss=loss,
                        loss_weights=loss_weights, metrics=metrics,
                        jit_compile=jit_compile, **kwargs)
        if self.built:
            self._build_optimizer()
        # The model may have changed since it was last checked.
        self._separable = False
        if self._dp_config.ema_decay is not None and self._ema_shadows is None:
            if not self.built:
                raise ValueError(
                    "Build the model before compile when ema_decay is set "
                    "(call it on a batch, or build it with an input shape), "
                    "so that EMA shadows can be created for its weights.")
            self._ema_shadows = ema.create_shadows(self,
                                                   self.trainable_variables)

    # ----------------------------------------------------------- the DP step

    def train_step(self, data):
        """One DP-SGD update on one logical batch (see `tf_dpfair.dpsgd.step`).

        Checks, steps 1-6 of `step` in order, then the training-set logs.
        """
        config = self._dp_config
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Groups never touch the update; only opt-in diagnostics read them.
        labels, groups = batch.split_labels(y)
        targets = {"label": labels}
        if batch.label_mask_of(y) is not None:
            targets["mask"] = batch.label_mask_of(y)

        # Checks: every write of the update waits for them.
        weights, targets = checks.checked_inputs(self, x, targets, sample_weight)
        variables = self.trainable_variables
        diagnosed = self._diagnostics
        if diagnosed is not None:
            diagnosed.check_groups(groups)

        # 1-3. Clipped per-example gradients, summed over micro-batches.
        clip_norm, threshold = self._clip_norm_and_threshold()
        sums, losses, y_pred, norms, nonfinite, aligned = self._per_example_pass()(
            x, targets, weights, groups if diagnosed is not None else None,
            clip_norm, threshold)
        context, on_first_replica = step.replica()
        # The ledger's counter: this update's noise index, never lowered by
        # a restore, so no noise draw is ever reused (`ledger_state`).
        counter = self._step_counter()
        index = counter.read_value()
        # Rows above the threshold are the clipped ones; with adaptive
        # clipping the count at or below it adapts the next threshold.
        adapted = clip_norm if threshold is None else threshold
        counts = step.all_reduced_counts(
            context, weights, norms, nonfinite, adapted,
            count_threshold=None if self._clip_threshold is None else adapted)
        rows_checked, within_limit = checks.check_rows(
            counts[1], self._step_row_limit().read_value(),
            ledger_state.ROW_LIMIT_MARKER)
        # 4. Noise, once for the job. 5-6. Normalise, regularize, apply.
        noised = step.add_noise(sums, variables, config, index, on_first_replica,
                                l2_norm_clip=clip_norm)
        grads = step.normalise(noised, config.expected_batch_size)
        grads, reg_loss = step.add_regularizer_gradients(grads, variables,
                                                         on_first_replica)
        shadows, decay = self._ema_shadows, None
        if shadows is not None:  # d_t of update `index` (`ema.warmup_decay`)
            decay = ema.warmup_decay(config.ema_decay, index, config.ema_warmup)
        share = None
        if self._clip_threshold is not None:  # released from the NOISY count only
            share = adaptive.noisy_share(counts[3], config, index)

        def after_apply():
            if shadows is not None:
                ema.apply_decay(shadows, variables, decay)
            if share is not None:
                adaptive.adapt_threshold(self._clip_threshold, adapted, share, config,
                                         within_limit)

        step.apply_update(
            self.optimizer, grads, variables, within_limit=within_limit,
            waits=[rows_checked], counter=counter, after_apply=after_apply)

        # Diagnostics on training data: outside the DP guarantee.
        count = tf.reduce_sum(weights)
        mean_loss = tf.math.divide_no_nan(tf.reduce_sum(weights * losses), count)
        if self._loss_tracker is not None:
            self._loss_tracker.update_state(mean_loss + reg_loss,
                                            sample_weight=count)
        with tf.control_dependencies([counter.read_value()]):
            # After the update's checks: a refused batch adds nothing.
            self._nonfinite_count.assign_add(tf.cast(counts[2], tf.int64))
            if diagnosed is not None:
                diagnosed.update_examples(norms, losses, weights, nonfinite,
                                          groups, adapted)
                if aligned is not None:
                    if context is not None:
                        aligned = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                     aligned)
                        noised = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                    noised)
                    diagnosed.update_alignment(aligned, noised)
        logs = self.training_logs(x, labels, y_pred, weights)
        logs["clip_fraction"] = tf.math.divide_no_nan(counts[0], counts[1])
        logs["nonfinite_examples"] = tf.cast(self._nonfinite_count.value, tf.float32)
        if decay is not None:  # From the count and config only: no privacy cost.
            logs["ema_decay"] = decay
        if self._clip_threshold is not None:
            # This update's threshold and its released noisy share: functions
            # of noisy counts only (post-processing, no further privacy cost).
            logs["clip_threshold"] = tf.cast(adapted, tf.float32)
            logs["threshold_noisy_share"] = share
        return logs

    # ----------------------------------------------------------- its parts

    # Refuses a model whose examples are not independent, once per compile.
    _check_separable = checks.check_separable

    def _separability_target(self):
        """The model whose training-mode calls the probe checks (self)."""
        return self

    def _per_example_losses(self, labels, y_pred, label_mask=None):
        """Unreduced, unscaled loss of each row: [n] (`step.per_example_losses`)."""
        return step.per_example_losses(self.loss, labels, y_pred, label_mask)

    def _example_loss(self, example):
        """Loss and prediction of ONE example (K views averaged)."""
        return step.example_loss(self, example, self._dp_config.augmult,
                                 self._per_example_losses)

    def _per_example_pass(self):
        """`_clipped_sum_over_microbatches`, compiled with XLA under `jit_compile`.

        Only the per-example pass goes to XLA: the step's checks stay in the
        plain graph, where assertions run (see `make_train_function`).
        """
        if not self.jit_compile:
            return self._clipped_sum_over_microbatches
        self._ghost_state()  # Prepared outside the compiled function.
        return tf.function(self._clipped_sum_over_microbatches,
                           jit_compile=True, autograph=False)

    def _clipped_sum_over_microbatches(self, x, targets, weights, groups, clip_norm,
                                       threshold):
        """Steps 1-3 of the update: `step.clipped_sum_over_microbatches`.

        Each micro-batch is clipped by ghost clipping where the model allows
        (`_ghost_state`), else by the vectorized path. `groups` (attribute ->
        [n] ids) is read only by the alignment sums of
        `diagnostics.GroupDiagnostics`, never by the update.

        Returns:
          (gradient sums, per-row losses [n], predictions [n, ...], norms [n],
          non-finite flags [n], alignment sums: a list of [K, *var.shape] or
          None).
        """
        config = self._dp_config
        variables = self.trainable_variables
        clip = step.microbatch_clipper(
            variables, clip_norm, config.augmult,
            example_loss=self._example_loss, losses_fn=self._per_example_losses,
            ghost_state=self._ghost_state(), threshold=threshold)
        alignment = None
        diagnosed = self._diagnostics
        if diagnosed is not None and diagnosed.alignment:
            def extra(micro, micro_weights, index, result):
                micro_groups = tf.nest.map_structure(
                    lambda t: tf.gather(t, index), groups)
                return diagnostics.weighted_gradient_sums(
                    lambda: step.inference_losses(
                        self, micro, config.augmult, self._per_example_losses),
                    variables,
                    diagnosed.coefficients(result.norms, micro_weights,
                                           result.nonfinite, micro_groups,
                                           clip_norm, threshold))
            alignment = (diagnosed.num_coefficients, extra)
        return step.clipped_sum_over_microbatches(
            x, targets, weights, variables, config.microbatch_size, clip,
            alignment)

    def _clip_norm_and_threshold(self):
        """(clip norm, threshold) of this update (`adaptive.clip_norm_and_threshold`)."""
        return adaptive.clip_norm_and_threshold(self._dp_config, self._clip_threshold)

    def _ghost_state(self):
        """The ghost-clipping taps of this model, or None for vectorized.

        Resolved once, at the first trace (`ghost.prepare_state`).
        """
        if self._ghost is None:
            self._ghost = ghost.prepare_state(self, self._dp_config.clipping)
        return self._ghost if self._ghost.taps else None

    # ----------------------------------------------------------- EMA

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: inside it the model's weights are the EMA weights.

        Raises:
          ValueError: the model has no EMA (ema_decay None, or not compiled).
        """
        if self._ema_shadows is None:
            raise ValueError("This DPModel keeps no EMA weights: set "
                             "DPConfig(ema_decay=...) and compile the model.")
        with ema.swapped(self.trainable_variables, self._ema_shadows):
            yield

    @property
    def ema_decay_reached(self):
        """The EMA decay the latest update applied (`ema.effective_decay`).

        From `update_count` and the config, as the step computes it; None
        without EMA or before the first update. Report it (and
        `ema.effective_averaging_horizon` of it) rather than `ema_decay`.
        """
        config, updates = self._dp_config, self.update_count
        if config.ema_decay is None or updates == 0:
            return None
        return ema.effective_decay(config.ema_decay, updates, config.ema_warmup)


@keras.saving.register_keras_serializable(package="tf_dpfair")
class DPModel(keras_multiworker.MultiWorkerFit, progress.HeadlineProgress,
              DPTraining, keras.Model):
    """A functional Keras model trained with DP-SGD by `fit`.

    `DPModel(inputs=..., outputs=..., dp_config=cfg)`. For any other model
    (Sequential, subclassed), use `make_private`.

    Args:
      dp_config: the `DPConfig` of the run.
      *args, **kwargs: as for a functional `keras.Model`.

    Raises:
      TypeError: `dp_config` is not a `DPConfig`.
    """

    def __init__(self, *args, dp_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_dp(dp_config)

    def get_config(self):
        config = super().get_config()
        config["dp_config"] = self._dp_config.get_config()
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        dp_config = DPConfig.from_config(config.pop("dp_config"))
        functional = keras.Model.from_config(config,
                                             custom_objects=custom_objects)
        return cls(inputs=functional.inputs, outputs=functional.outputs,
                   name=functional.name, dp_config=dp_config)


@keras.saving.register_keras_serializable(package="tf_dpfair")
class PrivateModel(keras_multiworker.MultiWorkerFit, progress.HeadlineProgress,
                   DPTraining, keras.Model):
    """A DPModel that wraps a model without a functional graph (subclassed).

    Args:
      model: the Keras model to train privately; its weights are shared.
      dp_config: the `DPConfig`.
    """

    def __init__(self, model, dp_config=None, **kwargs):
        super().__init__(**kwargs)
        self._init_dp(dp_config)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def _separability_target(self):
        # Same calls as self; a graph model here lets the probe name a layer.
        return self.model

    def get_config(self):
        return {"name": self.name,
                "model": keras.saving.serialize_keras_object(self.model),
                "dp_config": self._dp_config.get_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects)
        dp_config = DPConfig.from_config(config.pop("dp_config"))
        return cls(model, dp_config=dp_config, **config)


def make_private(model, dp_config):
    """Returns a DPModel that trains `model`'s weights with DP-SGD.

    The weights are shared, not copied: training the returned model trains
    `model`.

    Args:
      model: any Keras model (functional, Sequential or subclassed).
      dp_config: the `DPConfig`.

    Returns:
      A `DPModel`.

    Raises:
      TypeError: `model` is not a Keras model or is already a DPModel.
    """
    if isinstance(model, DPTraining):
        raise TypeError("The model is already a DPModel.")
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private needs a keras.Model, got {type(model)}.")
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if model.built and inputs and outputs:
        return DPModel(inputs=inputs, outputs=outputs, dp_config=dp_config,
                       name=f"private_{model.name}")
    wrapped = PrivateModel(model, dp_config=dp_config,
                           name=f"private_{model.name}")
    if model.built:
        wrapped.built = True
    return wrapped
