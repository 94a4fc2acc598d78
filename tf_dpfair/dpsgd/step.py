"""One DP-SGD update, as functions a privacy reviewer reads top to bottom.

One `train_step` call = one optimizer update = one logical batch, split over
the replicas (each replica gets its share). `DPTraining.train_step` calls
these functions in this order. First, before anything is written, the model
and the batch are checked (`tf_dpfair.dpsgd.checks`: no trainable
BatchNorm, examples independent by the separability probe, sample weights in
[0, 1], class ids in range); every write below waits for those checks. Then,
for each real example i (padding examples carry weight 0):

1. g_i = gradient of the example's own loss: `per_example_losses` (unscaled:
   Keras' loss objects would divide by the replica count), with augmult K
   `example_loss` (the mean loss over its K views, then one gradient).
   `clipped_sum_over_microbatches` walks this replica's share in
   micro-batches of `microbatch_size` (rows past the end of the last one get
   weight 0) and, per micro-batch, computes every g_i in one vectorized pass
   (`clipping.clipped_gradient_sum`), or (ghost clipping, the default where
   the model allows) every example's gradient norm and the clipped sum layer
   by layer from one batched forward and backward pass
   (`ghost.clipped_gradient_sum`; same sum).
2. Clip, inside that call: g_i * min(1, C / ||g_i||), global L2 norm over
   all trainable variables, times the example's weight in [0, 1]; an example
   whose gradient has a NaN or Inf adds zero.
3. Sum the clipped gradients over the logical batch: over micro-batches in
   the while loop, over replicas in Keras' `optimizer.apply` (step 5).
   Per-example gradients never leave the replica. `all_reduced_counts`
   all-reduces the real rows (weight > 0), which `checks.check_rows` checks
   against the accounting: a batch over the ledger's row limit moves
   nothing.
4. `add_noise`: NOISE ENTERS HERE, and only here, once per update for the
   whole job. Replica 0 adds N(0, (sigma * C)^2) per coordinate, drawn
   statelessly from (secret run seed, update index) by
   `noise.gaussian_noise`; the other replicas add nothing (replica ids are
   global: on several workers, replica 0 is the chief's first). The
   optimizer then sums the replicas' shares, so the total carries exactly
   one draw whatever the replica count. The update index is the ledger's
   counter, never lowered by a restore, so no draw is ever reused.
5. `normalise`: divide by `expected_batch_size` (fixed under Poisson
   sampling, never the realised size); `apply_update`: apply the optimizer
   (which sums the replicas' shares), update the EMA shadows, count the
   update.
6. `add_regularizer_gradients` (between 5's two calls): the gradient of the
   variables' weight regularizers, data-independent, is added after
   clipping and noise, on replica 0 only, so once for the job. Activity
   regularizers (data-dependent) and trainable BatchNorm (mixes examples)
   are refused by `checks.check_model`; frozen BatchNorm is fine.

Sensitivity of the noised sum to adding or removing one example is C, so
the accountant sees a Gaussian mechanism with multiplier sigma per update.

Adaptive clipping (`DPConfig.adaptive_clipping`, `tf_dpfair.dpsgd.adaptive`)
changes step 2's factor (the clip norm is this update's threshold T_t, or
each example is scaled by C / max(||g||, T_t)), adds to step 3's all-reduce
the count of examples at or below T_t, and after the update sets T_{t+1}
from that count plus its own Gaussian noise (`adaptive.noisy_share`,
`adaptive.adapt_threshold`); the sum then gets the noise sigma_g of `DPConfig.gradient_noise_multiplier`, so that
sum and count together are one Gaussian mechanism of multiplier sigma.
Anything else the step computes (training loss, `clip_fraction`, non-finite
counts, per-group diagnostics) is on training data without noise, outside
the guarantee, and never feeds the update.
"""

import keras
import tensorflow as tf

from tf_dpfair.dpsgd import adaptive
from tf_dpfair.dpsgd import clipping
from tf_dpfair.dpsgd import ghost
from tf_dpfair.dpsgd import noise


# -------------------------------------------------- 1. per-example losses


def per_example_losses(loss, labels, y_pred, label_mask=None):
    """Unreduced, unscaled loss of each row: [n].

    Args:
      loss: the loss given to `compile` (a `keras.losses.Loss` or a name or
        function `keras.losses.get` accepts).
      labels: [n, ...] labels.
      y_pred: [n, ...] predictions.
      label_mask: None, or [n, L]: each label's loss is then computed on its
        own and the row's loss is the mean over the labels the mask keeps.

    Returns:
      float32 [n].
    """
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


def example_loss(model, example, augmult, losses_fn):
    """Loss and prediction of ONE example (its K = `augmult` views averaged).

    Args:
      model: the Keras model, called in training mode.
      example: `(x, targets)` of one example, without a batch axis (with
        augmult > 1, x has the views axis first: [K, ...]).
      augmult: views per example.
      losses_fn: `losses_fn(labels, y_pred, label_mask) -> [n]`.

    Returns:
      `(loss, prediction)`: a scalar and the mean prediction over the views.
    """
    x, targets = example
    label, label_mask = targets["label"], targets.get("mask")
    if augmult > 1:
        x_views = x
        repeat = lambda t: tf.repeat(t[tf.newaxis], augmult, axis=0)
    else:
        x_views = tf.nest.map_structure(lambda t: t[tf.newaxis], x)
        repeat = lambda t: t[tf.newaxis]
    y_pred = model(x_views, training=True)
    mask = None if label_mask is None else repeat(label_mask)
    loss = tf.reduce_mean(losses_fn(repeat(label), y_pred, mask))
    return loss, tf.reduce_mean(tf.cast(y_pred, tf.float32), axis=0)

def inference_losses(model, micro, augmult, losses_fn):
    """Per-example losses [m] of a micro-batch in inference mode.

    Not part of the update: used only by the alignment diagnostics
    (training-set figures, outside the guarantee). Inference mode draws no
    dropout masks, so the training step's random stream is untouched.

    Args:
      model: the Keras model, called in inference mode.
      micro: `(x, targets)` of m examples (x [m, K, ...] with augmult K).
      augmult: views per example; an example's loss is its views' mean.
      losses_fn: `losses_fn(labels, y_pred, label_mask) -> [n]`.
    """
    x, targets = micro
    label, mask = targets["label"], targets.get("mask")
    if augmult > 1:
        flat = tf.nest.map_structure(
            lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), x)
        label = tf.repeat(label, augmult, axis=0)
        mask = None if mask is None else tf.repeat(mask, augmult, axis=0)
        losses = losses_fn(label, model(flat, training=False), mask)
        return tf.reduce_mean(tf.reshape(losses, [-1, augmult]), axis=1)
    return losses_fn(label, model(x, training=False), mask)


# -------------------------------------------------- 1-2. clipped sum


def microbatch_clipper(variables, l2_norm_clip, augmult, *, example_loss,
                       losses_fn, ghost_state=None, threshold=None):
    """The clipping of one micro-batch: ghost where prepared, else vectorized.

    Args:
      variables: the trainable variables.
      l2_norm_clip: C (with adaptive_clipping="quantile", this update's
        threshold).
      threshold: None, or this update's "global_adapt" threshold T
        (`adaptive.clip_factors`: each example scaled by C / max(||g||, T)).
      augmult: views per example.
      example_loss: `example_loss(example) -> (loss, prediction)` for ONE
        example (`example_loss` above, bound to the model); vectorized path.
      losses_fn: `losses_fn(labels, y_pred, label_mask) -> [n]`; ghost path.
      ghost_state: the model's `ghost.GhostState` with taps, or None for
        the vectorized path.

    Returns:
      `clip((x_rows, target_rows), weights_rows) -> clipping.ClippedSum`:
      the sum of weight_i * g_i * min(1, C / ||g_i||) over the rows.
    """
    if ghost_state is not None:
        def clip(micro, micro_weights):
            return ghost.clipped_gradient_sum(
                ghost_state.taps, ghost_state.probe, variables,
                lambda t, p: losses_fn(t["label"], p, t.get("mask")),
                micro[0], micro[1], micro_weights, l2_norm_clip, augmult,
                threshold=threshold)
        return clip

    def clip(micro, micro_weights):
        return clipping.clipped_gradient_sum(
            example_loss, variables, micro, micro_weights, l2_norm_clip,
            threshold=threshold)
    return clip



def clipped_sum_over_microbatches(x, targets, weights, variables,
                                  microbatch_size, clip_microbatch,
                                  alignment=None):
    """Sums clipped per-example gradients over micro-batches (a while loop).

    Keras traces `train_step` without AutoGraph, so the loop is a
    `tf.while_loop`; one `train_step` stays one update.

    Args:
      x: nest of [n, ...] inputs ([n, K, ...] with augmult K).
      targets: `{"label": [n, ...]}`, plus `"mask"` ([n, L]).
      weights: [n] float32 in [0, 1] (checked), 0 = padding.
      variables: the trainable variables.
      microbatch_size: m, the rows of one batched pass.
      clip_microbatch: `clip_microbatch((x_rows, target_rows), weights_rows)
        -> clipping.ClippedSum` over m rows (vectorized or ghost clipping).
      alignment: None, or `(rows_k, extra)` for the training diagnostics:
        `extra(micro, micro_weights, index, result)` returns a list of
        [rows_k, *var.shape] sums, accumulated beside the update and never
        read by it.

    Returns:
      (gradient sums (float32, shaped like `variables`), per-row losses [n],
      predictions [n, ...], norms [n], non-finite flags [n], alignment sums:
      a list of [rows_k, *var.shape], or None).
    """
    m = microbatch_size
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

    align = alignment is not None

    def body(i, sums, losses, outputs, norms, nonfinite, aligned):
        micro, micro_weights, index = microbatch(i)
        r = clip_microbatch(micro, micro_weights)
        sums = [s + tf.cast(g, tf.float32)
                for s, g in zip(sums, r.gradient_sum)]
        if align:
            # Training-set diagnostics: separate passes the update never reads.
            extra = alignment[1](micro, micro_weights, index, r)
            aligned = [a + e for a, e in zip(aligned, extra)]
        return (i + 1, sums, losses.write(i, r.losses),
                outputs.write(i, r.outputs), norms.write(i, r.norms),
                nonfinite.write(i, r.nonfinite), aligned)

    def array(dtype):
        return tf.TensorArray(dtype, size=num_micro, infer_shape=True)

    zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
    aligned = []
    if align:
        aligned = [tf.zeros([alignment[0], *v.shape], tf.float32)
                   for v in variables]
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


# -------------------------------------------------- 3. counts over replicas


def replica():
    """`(context, on_first_replica)`: the replica context (None outside one)
    and float32 1.0 on the job's replica 0, else 0.0."""
    context = tf.distribute.get_replica_context()
    replica_id = context.replica_id_in_sync_group if context else 0
    return context, tf.cast(tf.equal(replica_id, 0), tf.float32)


def all_reduced_counts(context, weights, norms, nonfinite, l2_norm_clip,
                       count_threshold=None):
    """Clipped, real and non-finite rows over all replicas, in one all-reduce.

    The real rows (weight > 0) are what the update really holds, checked
    against the accounting before it is applied; the others are
    training-set diagnostics. With adaptive clipping, a fourth entry is the
    count that adapts the threshold, `adaptive.count_at_most`: it is
    released only with noise (`adaptive.adapt_threshold`).

    Args:
      l2_norm_clip: rows with a larger norm count as clipped.
      count_threshold: None, or the adaptive threshold T_t.

    Returns:
      float32 [3] (clipped real rows, real rows, non-finite real rows), or
      [4] with the weighted count of rows whose norm is at most T_t.
    """
    real = weights > 0
    entries = [
        tf.reduce_sum(tf.cast(tf.logical_and(
            real, norms > l2_norm_clip), tf.float32)),
        tf.reduce_sum(tf.cast(real, tf.float32)),
        tf.reduce_sum(tf.cast(tf.logical_and(real, nonfinite), tf.float32)),
    ]
    if count_threshold is not None:
        entries.append(adaptive.count_at_most(weights, norms, nonfinite,
                                              count_threshold))
    counts = tf.stack(entries)
    if context is not None:
        counts = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
    return counts


# -------------------------------------------------- 4. noise


def add_noise(sums, variables, config, index, on_first_replica,
              l2_norm_clip=None):
    """Adds the update's Gaussian noise to this replica's clipped sum.

    The only place noise enters the update: N(0, (sigma * C)^2) per
    coordinate, drawn by `noise.gaussian_noise` from (secret run seed,
    update `index`), added on replica 0 only; Keras' `optimizer.apply` sums
    the replicas' shares, so the job's update carries one draw.

    Args:
      sums: this replica's clipped sums, shaped like `variables`.
      variables: the trainable variables (their shapes key the draws).
      config: the `DPConfig` (noise multiplier, clip norm, seed).
      index: int64 scalar, the ledger's index of this update.
      on_first_replica: float32 1.0 on replica 0, else 0.0.
      l2_norm_clip: None for `config.l2_norm_clip`, or this update's clip
        norm (adaptive_clipping="quantile": its threshold, a tensor). The
        stddev is `config.gradient_noise_multiplier` times it.

    Returns:
      The noised sums (the sums unchanged when the noise multiplier is 0).
    """
    if config.noise_multiplier > 0:
        stddev = (config.noise_stddev if l2_norm_clip is None
                  else config.gradient_noise_multiplier * l2_norm_clip)
        noises = noise.gaussian_noise(
            [v.shape for v in variables], stddev, config.seed, index)
        sums = [s + on_first_replica * z for s, z in zip(sums, noises)]
    return sums


# -------------------------------------------------- 5-6. the update


def normalise(sums, expected_batch_size):
    """Divides by the expected logical batch size, never the realised one."""
    return [s / float(expected_batch_size) for s in sums]


def add_regularizer_gradients(grads, variables, on_first_replica):
    """Adds the gradient of the variables' weight regularizers, once for the job.

    Data-independent, so added after clipping and noise, on replica 0 only
    (the optimizer sums the replicas' shares).

    Returns:
      `(grads, reg_loss)`: the gradients with the regularizers' added, and
      the regularization loss (0.0 without regularizers).
    """
    grads = list(grads)
    regularized = [(i, v) for i, v in enumerate(variables)
                   if getattr(v, "regularizer", None) is not None]
    reg_loss = tf.constant(0.0)
    if regularized:
        with tf.GradientTape() as tape:
            reg_loss = tf.add_n([tf.cast(v.regularizer(v), tf.float32)
                                 for _, v in regularized])
        reg_grads = tape.gradient(reg_loss, [v for _, v in regularized])
        for (i, _), g in zip(regularized, reg_grads):
            grads[i] = grads[i] + on_first_replica * tf.cast(g, tf.float32)
    return grads, reg_loss


def apply_update(optimizer, grads, variables, *, within_limit, waits,
                 counter, after_apply=None):
    """Applies the update, then counts it; every write waits for the checks.

    Every write waits for the whole step (input checks included), so a
    failing batch leaves weights, optimizer, EMA and the count as they
    were: no update is applied without being counted, or vice versa.

    Args:
      optimizer: the Keras optimizer; in replica context its `apply` sums
        the replicas' gradients itself.
      grads: the normalised, noised gradients (float32).
      variables: the trainable variables.
      within_limit: float32 1.0 / 0.0 from `checks.check_rows`; an
        oversized batch whose assertion was dropped moves nothing.
      waits: the assertions the writes wait for.
      counter: the ledger's update counter, incremented once.
      after_apply: None, or a callable run after the optimizer (the EMA
        update of the shadows).
    """
    grads = [tf.cast(g * within_limit, v.dtype) for g, v in zip(grads, variables)]
    with tf.control_dependencies(grads + list(waits)):
        optimizer.apply(grads, variables)
        if after_apply is not None:
            after_apply()
        counter.assign_add(1)
