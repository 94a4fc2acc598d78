"""DPModel: a Keras model whose `fit` runs DP-SGD.

The DP step, one `train_step` call = one optimizer update = one logical batch
(each replica gets its share of the batch):

1. Walk the share in micro-batches of `microbatch_size` (rows past the end of
   the last one get weight 0); for each micro-batch compute every example's
   gradient in one vectorized pass (`clipping.clipped_gradient_sum`), or
   (ghost clipping, the default where the model allows) every example's
   gradient norm and the clipped sum layer by layer from one batched forward
   and backward pass (`ghost.clipped_gradient_sum`; same sum). With augmult K
   an example's loss is the mean over its K views.
2. Clip each example's gradient to global L2 norm C, multiply by its weight in
   [0, 1], and add it to a running sum.
3. Noise enters here, once per update for the whole job: replica 0 adds
   N(0, (sigma * C)^2) drawn statelessly from (secret seed, update index);
   the other replicas add nothing (replica ids are global: on several
   workers, replica 0 is the chief's first). Keras' `optimizer.apply` then sums the
   replicas' shares, so the total carries exactly one noise draw whatever the
   replica count.
4. Divide by `expected_batch_size` (never the realised size), add the gradient
   of data-independent weight regularizers (replica 0 only), apply the
   optimizer, count the update, update the EMA shadows.

What surrounds the step in `fit` (how the input is recorded for the
accountant, the privacy ledger, diagnostics, XLA and multi-step
refusals) is in `tf_dpfair/fitting.py`.

Before the first update after each `compile` (at the first trace of
`train_step`), the model is checked: trainable BatchNormalization anywhere in
it is refused, and so is any model whose training-mode output, loss or loss
gradient for one example depends on another example of a micro-batch
(`separability.check_separability`, at the training micro-batch size), since
both clipping paths bound one example's influence only when it does not.
"""

import contextlib

import keras
import tensorflow as tf

from tf_dpfair.data import batch
from tf_dpfair.dpsgd import checks
from tf_dpfair.dpsgd import clipping
from tf_dpfair.training import diagnostics
from tf_dpfair.training import ema
from tf_dpfair.training import fitting
from tf_dpfair.dpsgd import ghost
from tf_dpfair.training import ledger_state
from tf_dpfair.training import keras_multiworker as multiworker
from tf_dpfair.dpsgd import noise
from tf_dpfair.dpsgd import separability
from tf_dpfair.config import DPConfig
from tf_dpfair.training.non_private import GroupedEvaluation
from tf_dpfair.models import batchnorm


class DPTraining(fitting.KerasFitting, ledger_state.LedgerState,
                 GroupedEvaluation):
    """The DP-SGD `train_step` and its bookkeeping, mixed into Keras models.

    `DPModel` (functional models) and `PrivateModel` (any other model) use it;
    `isinstance(model, DPTraining)` tells whether a model trains privately.
    Each batch given to `fit` is one logical batch and one optimizer update.
    Training-set loss, metrics and `clip_fraction` in the logs are computed on
    training data without noise: they are outside the DP guarantee.
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

    def _check_model(self):
        # Paths below this model, e.g. "block/bn" for a BatchNorm held by
        # the custom layer "block".
        offending = [finding.path.split("/", 1)[-1]
                     for finding in batchnorm.check_batchnorm(self)
                     if finding.status == batchnorm.TRAINING_MODE]
        if offending:
            names = ", ".join(offending)
            raise ValueError(
                f"BatchNormalization in training mode mixes examples, so "
                f"per-example clipping would not bound one example's "
                f"influence. Offending layers: {names}. Freeze them "
                f"(tf_dpfair.models.freeze_batchnorm, or layer.trainable = "
                f"False, which runs them in inference mode) or replace them "
                f"with GroupNormalization.")
        with_activity = [layer.name for layer in self._flatten_layers()
                         if getattr(layer, "activity_regularizer", None)]
        if with_activity:
            raise ValueError(
                f"Activity regularizers depend on the data and are not "
                f"clipped; remove them from: {', '.join(with_activity)}.")
        if len(getattr(self, "outputs", None) or [None]) != 1:
            raise ValueError("DPModel supports models with a single output.")

    def _check_separable(self, one_view, targets=None):
        """Refuses a model whose examples are not independent (once per compile).

        Both clipping paths rest on example i's loss depending on row i
        alone; `separability.check_separability` tests that on the model
        itself in training mode, whatever its layers, so that mixing the
        BatchNorm check cannot see (a custom layer's batch statistics) is
        refused too. It checks the batch the step's batched pass really
        sees: `microbatch_size` examples (at least 2) of `augmult` views,
        as ghost clipping feeds them, with probe labels and the compiled
        loss, so that the per-example losses and their gradient are checked
        as well as the outputs. A layer that mixes examples only at some
        batch sizes is seen at the one training uses. It runs eagerly
        (lifted out of the `train_step` trace), on random data shaped like
        `one_view` (one view per example) and the labels, before anything is
        applied; it draws nothing from the training random streams.

        Args:
          one_view: the traced inputs of this step, one view per example.
          targets: the traced targets of this step (`{"label": [n, ...]}`,
            plus `"mask"`), whose dtypes and inner shapes the probe labels
            take; None to derive them from the model's output and the loss.

        Raises:
          ValueError: from `check_separability`.
        """
        if self._separable:
            return
        config = self._dp_config
        examples = max(config.microbatch_size, 2)
        with tf.init_scope():
            inputs = separability.probe_batch(
                one_view, rows=examples * config.augmult)
            labels = self._separability_labels(inputs, targets, examples)
            separability.check_separability(
                self._separability_target(), inputs, targets=labels,
                loss_fn=None if labels is None else (
                    lambda t, p: self._per_example_losses(t["label"], p,
                                                          t.get("mask"))),
                views=config.augmult)
        self._separable = True

    def _separability_labels(self, inputs, targets, examples):
        """Probe targets `{"label": [examples, ...]}` for the separability check.

        Shaped like `targets` where given; otherwise the first form the loss
        accepts of: class ids (the output's shape less its last axis), then
        floats shaped like the output (class ids first for a sparse
        categorical loss). None, with a warning, where neither fits: the
        check then covers the model's outputs only.
        """
        if targets is not None:
            return separability.probe_batch(dict(targets), rows=examples, seed=2)
        problems = []
        try:
            output = tf.nest.flatten(self.compute_output_spec(
                tf.nest.map_structure(
                    lambda t: keras.KerasTensor(t.shape, t.dtype), inputs)))[0]
            forms = [tf.TensorSpec(output.shape[:-1], tf.int32),
                     tf.TensorSpec(output.shape, tf.float32)]
            prediction = tf.zeros([examples, *output.shape[1:]], output.dtype)
        except Exception as error:  # an output shape Keras cannot infer
            forms = []
            problems.append(f"{type(error).__name__}: {error}")
        if not _is_sparse_categorical(self.loss):
            forms.reverse()
        for form in forms:
            try:
                labels = {"label": separability.probe_batch(form, rows=examples,
                                                            seed=2)}
                self._per_example_losses(labels["label"], prediction)
                return labels
            except Exception as error:  # a loss that wants labels of another form
                problems.append(f"{type(error).__name__}: {error}")
        import logging  # noqa: PLC0415 (only on this rare path)
        logging.getLogger(__name__).warning(
            "tf_dpfair: the separability check could not build probe labels "
            "for the loss (%s); it checks the model's outputs only.",
            "; ".join(problems))
        return None

    def _separability_target(self):
        """The model whose training-mode calls the probe checks (self)."""
        return self

    def _per_example_losses(self, labels, y_pred, label_mask=None):
        """Unreduced, unscaled loss of each row: [n].

        With `label_mask` ([n, L]), each label's loss is computed on its own
        and the row's loss is the mean over the labels the mask keeps.
        """
        loss = self.loss
        # `call`, not `__call__`: Keras loss objects divide by the replica
        # count under tf.distribute, which would shrink every gradient.
        loss_fn = (loss.call if isinstance(loss, keras.losses.Loss)
                   else keras.losses.get(loss))
        if label_mask is not None:
            per_label = tf.cast(loss_fn(labels[..., tf.newaxis],
                                        y_pred[..., tf.newaxis]), tf.float32)
            mask = tf.cast(label_mask, tf.float32)
            return tf.math.divide_no_nan(tf.reduce_sum(per_label * mask, -1),
                                         tf.reduce_sum(mask, -1))
        values = tf.cast(loss_fn(labels, y_pred), tf.float32)
        return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]),
                              axis=1)

    def _example_loss(self, example):
        """Loss and prediction of ONE example (K views averaged)."""
        x, targets = example
        label, label_mask = targets["label"], targets.get("mask")
        if self._dp_config.augmult > 1:
            views = self._dp_config.augmult
            x_views = x
            repeat = lambda t: tf.repeat(t[tf.newaxis], views, axis=0)
        else:
            x_views = tf.nest.map_structure(lambda t: t[tf.newaxis], x)
            repeat = lambda t: t[tf.newaxis]
        y_pred = self(x_views, training=True)
        mask = None if label_mask is None else repeat(label_mask)
        loss = tf.reduce_mean(
            self._per_example_losses(repeat(label), y_pred, mask))
        return loss, tf.reduce_mean(tf.cast(y_pred, tf.float32), axis=0)

    def _clipped_sum_over_microbatches(self, x, targets, weights, groups=None):
        """Runs `clipped_gradient_sum` over micro-batches with a while loop.

        `targets` is `{"label": [n, ...]}`, plus `"mask"` ([n, L]) when labels
        may be unknown. `groups` (attribute -> [n] ids) is read only by the
        alignment sums of `diagnostics.GroupDiagnostics`, never by the update.

        Returns:
          (gradient sums, per-row losses [n], predictions [n, ...], norms [n],
          non-finite flags [n], alignment sums: a list of [K, *var.shape] or
          None).
        """
        m = self._dp_config.microbatch_size
        variables = self.trainable_variables
        n = tf.shape(weights)[0]
        num_micro = (n + m - 1) // m

        def microbatch(i):
            """Rows i*m .. i*m+m-1; rows past the end repeat the last row and
            get weight 0. Gathering per micro-batch keeps memory independent
            of the logical batch (no padded copy of the whole batch)."""
            index = i * m + tf.range(m)
            valid = index < n
            index = tf.minimum(index, n - 1)
            rows = tf.nest.map_structure(lambda t: tf.gather(t, index),
                                         (x, targets))
            return rows, tf.where(valid, tf.gather(weights, index), 0.0), index

        use_ghost = self._ghost_state() is not None

        def vectorized(micro, micro_weights):
            return clipping.clipped_gradient_sum(
                self._example_loss, variables, micro, micro_weights,
                self._dp_config.l2_norm_clip)

        def fast(micro, micro_weights):
            state = self._ghost_state()
            return ghost.clipped_gradient_sum(
                state.taps, state.probe, variables,
                lambda t, p: self._per_example_losses(t["label"], p,
                                                      t.get("mask")),
                micro[0], micro[1], micro_weights,
                self._dp_config.l2_norm_clip, self._dp_config.augmult)

        align = self._diagnostics is not None and self._diagnostics.alignment

        def body(i, sums, losses, outputs, norms, nonfinite, aligned):
            micro, micro_weights, index = microbatch(i)
            r = (fast if use_ghost else vectorized)(micro, micro_weights)
            sums = [s + tf.cast(g, tf.float32)
                    for s, g in zip(sums, r.gradient_sum)]
            if align:
                # Training-set diagnostics: separate passes the update never reads.
                micro_groups = tf.nest.map_structure(
                    lambda t: tf.gather(t, index), groups)
                extra = diagnostics.weighted_gradient_sums(
                    lambda: self._inference_losses(micro), variables,
                    self._diagnostics.coefficients(
                        r.norms, micro_weights, r.nonfinite, micro_groups,
                        self._dp_config.l2_norm_clip))
                aligned = [a + e for a, e in zip(aligned, extra)]
            return (i + 1, sums, losses.write(i, r.losses),
                    outputs.write(i, r.outputs), norms.write(i, r.norms),
                    nonfinite.write(i, r.nonfinite), aligned)

        def array(dtype):
            return tf.TensorArray(dtype, size=num_micro, infer_shape=True)

        zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
        aligned = []
        if align:
            rows_k = self._diagnostics.num_coefficients
            aligned = [tf.zeros([rows_k, *v.shape], tf.float32) for v in variables]
        _, sums, losses, outputs, norms, nonfinite, aligned = tf.while_loop(
            lambda i, *_: i < num_micro, body,
            (tf.constant(0), zeros, array(tf.float32), array(tf.float32),
             array(tf.float32), array(tf.bool), aligned))

        def rows(ta):
            stacked = ta.stack()
            flat = tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))
            return flat[:n]

        return (sums, rows(losses), rows(outputs), rows(norms),
                rows(nonfinite), aligned if align else None)

    def _inference_losses(self, micro):
        """Per-example losses [m] of a micro-batch in inference mode.

        Used only by the alignment diagnostics: inference mode draws no
        dropout masks, so the training step's random stream is untouched.
        """
        x, targets = micro
        label, mask = targets["label"], targets.get("mask")
        views = self._dp_config.augmult
        if views > 1:
            flat = tf.nest.map_structure(
                lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), x)
            label = tf.repeat(label, views, axis=0)
            mask = None if mask is None else tf.repeat(mask, views, axis=0)
            losses = self._per_example_losses(label, self(flat, training=False), mask)
            return tf.reduce_mean(tf.reshape(losses, [-1, views]), axis=1)
        return self._per_example_losses(label, self(x, training=False), mask)

    def _ghost_state(self):
        """The ghost-clipping taps of this model, or None for vectorized.

        "ghost" requires them; "auto" uses them where the model allows (a
        functional graph whose weighted layers are each called once) and
        otherwise falls back to the vectorized path with a one-line notice.
        """
        if self._ghost is None:
            prepared = None
            if self._dp_config.clipping in ("ghost", "auto"):
                prepared = ghost.prepare(
                    self, required=self._dp_config.clipping == "ghost")
            # A plain holder, so Keras does not track the probe model.
            self._ghost = _GhostState(*(prepared or (None, None)))
        return self._ghost if self._ghost.taps else None

    def _sample_weights(self, sample_weight, n):
        """The batch's sample weights `[n]`, gated on lying in [0, 1].

        Raises:
          tf.errors.InvalidArgumentError: at run time, a weight is NaN or
            Inf, above 1 or below 0.
        """
        if sample_weight is None:
            return tf.ones([n], tf.float32)
        weights = tf.reshape(tf.cast(sample_weight, tf.float32), [n])
        # One condition per problem, each failing on its own values only, so
        # that the message names the problem (a NaN also fails `w <= 1`).
        finite = tf.math.is_finite(weights)

        def refuse_any(bad, message):
            return tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)),
                                       [message])

        weight_checks = [
            refuse_any(tf.logical_not(finite), (
                "DPModel: sample weights must be finite numbers in [0, 1] "
                "(0 = padding); got NaN or Inf. Check how the weights are "
                "computed.")),
            refuse_any(tf.logical_and(finite, weights > 1.0), (
                "DPModel: sample weights above 1 would raise the "
                "sensitivity above l2_norm_clip; use weights in [0, 1] "
                "(0 = padding).")),
            refuse_any(tf.logical_and(finite, weights < 0.0),
                       "DPModel: sample weights must be >= 0."),
        ]
        # The update depends on the checks, so a failing batch writes nothing.
        # Should a check ever be skipped (XLA drops assertions: on TPU the
        # whole step is compiled), clamping keeps each contribution within C
        # and a NaN or Inf weight counts as 0 rather than poisoning the sum.
        with tf.control_dependencies(weight_checks):
            return tf.clip_by_value(tf.where(finite, weights, 0.0), 0.0, 1.0)

    def _check_rows(self, rows):
        """Refuses a batch with more real rows than the accounting assumes.

        Args:
          rows: float32 scalar, the rows of weight > 0 over all replicas
            (what the update really holds), compared with the running
            segment's row limit (`ledger_state`).

        Returns:
          `(check, within)`: the assertion the update waits for, and a
          float32 1.0 / 0.0 that the update is multiplied by. Should the
          assertion be dropped (XLA drops assertions: on TPU the whole step is
          compiled), an oversized batch then moves nothing, noise included,
          and is still counted, so its noise index is never drawn again.
        """
        limit = self._step_row_limit().read_value()
        within = tf.cast(rows, tf.int64) <= limit
        check = tf.debugging.Assert(
            within, [ledger_state.ROW_LIMIT_MARKER, tf.cast(rows, tf.int64),
                     "rows >", limit, "allowed"])
        return check, tf.cast(within, tf.float32)

    def train_step(self, data):
        """One DP-SGD update on one logical batch (see the module docstring)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # Groups never touch the update; only opt-in diagnostics read them.
        labels, groups = batch.split_labels(y)
        targets = {"label": labels}
        if batch.label_mask_of(y) is not None:
            targets["mask"] = batch.label_mask_of(y)
        config = self._dp_config
        first = tf.nest.flatten(x)[0]
        if config.augmult > 1 and (first.shape.rank < 2
                                   or first.shape[1] != config.augmult):
            raise ValueError(
                f"DPConfig.augmult={config.augmult} needs inputs shaped "
                f"[batch, {config.augmult}, ...]; got {first.shape}.")
        self._check_model()
        n = tf.shape(first)[0]
        weights = self._sample_weights(sample_weight, n)
        one_view = (tf.nest.map_structure(lambda t: t[:, 0], x)
                    if config.augmult > 1 else x)
        if not all(layer.built for layer in self._flatten_layers()):
            # Create variables outside the vectorized per-example pass.
            self(one_view, training=False)
        self._check_separable(one_view, targets)
        sparse = _is_sparse_categorical(self.loss)
        if labels.dtype.is_integer or (sparse and labels.dtype.is_floating):
            output_spec = self.compute_output_spec(tf.nest.map_structure(
                lambda t: keras.KerasTensor(t.shape, t.dtype), one_view))
            targets["label"] = checks.checked_class_ids(
                labels, output_spec, sparse_loss=sparse)
        variables = self.trainable_variables

        clipped_sum = self._clipped_sum_over_microbatches
        if self.jit_compile:
            # Only the per-example pass goes to XLA: the checks above stay
            # in the plain graph, where assertions run (see
            # `make_train_function`).
            self._ghost_state()  # Prepared outside the compiled function.
            clipped_sum = tf.function(clipped_sum, jit_compile=True,
                                      autograph=False)
        diagnosed = self._diagnostics
        if diagnosed is not None:
            diagnosed.check_groups(groups)
        sums, losses, y_pred, norms, nonfinite, aligned = clipped_sum(
            x, targets, weights, groups if diagnosed is not None else None)

        context = tf.distribute.get_replica_context()
        replica_id = context.replica_id_in_sync_group if context else 0
        on_first_replica = tf.cast(tf.equal(replica_id, 0), tf.float32)
        # The ledger's counter: this update's noise index, never lowered by
        # a restore, so no noise draw is ever reused (`ledger_state`).
        counter = self._step_counter()
        step = counter.read_value()
        # Clipped, real (weight > 0) and non-finite rows over all replicas, in
        # one all-reduce: the real rows are checked against the accounting
        # before the update; the others are training-set diagnostics.
        real = weights > 0
        counts = tf.stack([
            tf.reduce_sum(tf.cast(tf.logical_and(
                real, norms > config.l2_norm_clip), tf.float32)),
            tf.reduce_sum(tf.cast(real, tf.float32)),
            tf.reduce_sum(tf.cast(tf.logical_and(real, nonfinite), tf.float32)),
        ])
        if context is not None:
            counts = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
        rows_checked, within_limit = self._check_rows(counts[1])
        if config.noise_multiplier > 0:
            noises = noise.gaussian_noise(
                [v.shape for v in variables], config.noise_stddev, config.seed,
                step)
            sums = [s + on_first_replica * z for s, z in zip(sums, noises)]
        grads = [s / float(config.expected_batch_size) for s in sums]

        regularized = [(i, v) for i, v in enumerate(variables)
                       if getattr(v, "regularizer", None) is not None]
        reg_loss = tf.constant(0.0)
        if regularized:
            # Data-independent: added after clipping, once for the job.
            with tf.GradientTape() as tape:
                reg_loss = tf.add_n([tf.cast(v.regularizer(v), tf.float32)
                                     for _, v in regularized])
            reg_grads = tape.gradient(reg_loss, [v for _, v in regularized])
            for (i, _), g in zip(regularized, reg_grads):
                grads[i] = grads[i] + on_first_replica * tf.cast(g, tf.float32)

        grads = [tf.cast(g * within_limit, v.dtype) for g, v in zip(grads, variables)]
        # Every write waits for the whole step (input checks included), so a
        # failing batch leaves weights, optimizer, EMA and the count as they
        # were: no update is applied without being counted, or vice versa.
        with tf.control_dependencies(grads + [rows_checked]):
            self.optimizer.apply(grads, variables)
            if self._ema_shadows is not None:
                ema.update_shadows(self._ema_shadows, variables,
                                   config.ema_decay, step)
            counter.assign_add(1)

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
                                          groups, config.l2_norm_clip)
                if aligned is not None:
                    noised = sums
                    if context is not None:
                        aligned = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                     aligned)
                        noised = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                    sums)
                    diagnosed.update_alignment(aligned, noised)
        logs = self.training_logs(x, labels, y_pred, weights)
        logs["clip_fraction"] = tf.math.divide_no_nan(counts[0], counts[1])
        logs["nonfinite_examples"] = tf.cast(self._nonfinite_count.value, tf.float32)
        return logs

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


def _is_sparse_categorical(loss):
    """Whether `loss` (as given to `compile`) reads labels as class ids."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    return getattr(loss, "fn", loss) is keras.losses.sparse_categorical_crossentropy


class _GhostState:
    """Taps and probe model of ghost clipping (deliberately not trackable)."""

    def __init__(self, taps, probe):
        self.taps = taps
        self.probe = probe


@keras.saving.register_keras_serializable(package="tf_dpfair")
class DPModel(multiworker.MultiWorkerFit, DPTraining, keras.Model):
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
class PrivateModel(multiworker.MultiWorkerFit, DPTraining, keras.Model):
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
