"""The model of one run, compiled, and the callbacks beside its `fit`.

`build_run_model` wraps the run's base model (`inputs_lib.build_model`) with
DP-SGD (`tf_dpfair.make_private`) or as the non-private baseline, and
compiles it; `extra_callbacks` adds the TensorBoard fairness dashboard (and
the per-group training diagnostics, whose last values `last_diagnostics`
reads back from the history). Used by `train_lib.run`.
"""

import os
import re

import keras

import tf_dpfair as dpf
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import inputs_lib


def build_run_model(settings, run_data, sigma, noise_seed, strategy, base=None):
    """The compiled model of a run: `DPModel`, or the non-private baseline.

    Args:
        settings: the run's `Settings`.
        run_data: its `inputs_lib` data.
        sigma: the noise multiplier (private runs).
        noise_seed: the noise seed, or None for a fresh secret one.
        strategy: the `tf.distribute.Strategy` whose scope holds the model.
        base: the Keras model to train, built in that scope (the head of
            cached features, `features_lib`); None builds the run's model.

    Returns:
        The compiled Keras model.

    Raises:
        ValueError: augmult > 1 for a non-private run.
    """
    with strategy.scope():
        base = base or inputs_lib.build_model(settings, run_data)
        if settings.private:
            config = dpf.DPConfig(
                l2_norm_clip=settings.clip_norm, noise_multiplier=sigma,
                expected_batch_size=settings.batch_size,
                microbatch_size=settings.microbatch_size, augmult=settings.augmult,
                ema_decay=settings.ema_decay or None,
                ema_warmup=settings.ema_warmup or None, seed=noise_seed,
                **adaptive_options(settings))
            model = dpf.make_private(base, config)
        else:
            if settings.augmult > 1:
                raise ValueError("augmult > 1 is implemented by DPModel only.")
            model = dpf.make_non_private(base)
        compile_model(model, settings, run_data)
    return model


def adaptive_options(settings):
    """The DPConfig fields of `adaptive_clipping` (none for a fixed clip norm).

    The count's noise defaults to batch_size / 20 (Andrew et al. 2021);
    `noise_multiplier` stays the noise the accountant sees (calibrated to
    the target epsilon), of which the count takes its share.
    """
    if not settings.adaptive_clipping:
        return {}
    return {"adaptive_clipping": settings.adaptive_clipping,
            "count_noise_multiplier": (settings.count_noise_multiplier
                                       or settings.batch_size / 20.0),
            "target_quantile": settings.target_quantile or None,
            "threshold_learning_rate": settings.threshold_learning_rate,
            "initial_threshold": settings.clip_norm}


def extra_callbacks(settings, work_dir, *, privacy_logger, run_data, test):
    """The TensorBoard fairness dashboard of a run (and its diagnostics).

    With group attributes, the dashboard evaluates the test split exactly
    every `dashboard_every` epochs (and at the last; never with 0): per-group
    AUC and error rates with bootstrap bands (`tf_dpfair.dashboards.callback`),
    at the top-1 class for multi-class data and at
    `evaluation_lib.THRESHOLD` for multi-label data. Private runs with
    `group_diagnostics` also get `diagnostics.GroupDiagnostics` first, so the
    dashboard shows the training-set figures in their own category.
    """
    grouped = bool(run_data.group_spec.attributes)
    multi_class = not run_data.multi_label
    found = []
    if settings.group_diagnostics and settings.private and grouped:
        found.append(dpf.training.diagnostics.GroupDiagnostics(
            run_data.group_spec, alignment=settings.diagnostics_alignment))
    found.append(dpf.dashboards.FairnessDashboard(
        os.path.join(work_dir, "tensorboard"), privacy_logger=privacy_logger,
        hparams={"dataset": settings.dataset, "model": settings.model},
        evaluation_data=test if grouped and settings.dashboard_every else None,
        evaluate_every=settings.dashboard_every or 1,
        group_names=run_data.group_spec if grouped else None,
        n_bootstrap=max(1, settings.n_bootstrap // 5),
        threshold=None if multi_class else evaluation_lib.THRESHOLD,
        multi_class=multi_class and grouped, from_logits=True))
    return found


def compile_model(model, settings, run_data):
    """Compiles a run's model: its loss, optimizer and (per-group) metrics."""
    multi_label = run_data.multi_label
    loss_class = (keras.losses.BinaryCrossentropy if multi_label
                  else keras.losses.SparseCategoricalCrossentropy)
    # Mean over real rows: weight-0 padding of Poisson batches must not dilute
    # the non-private loss (the DP step divides by the expected batch itself).
    loss = loss_class(from_logits=True, reduction="mean_with_sample_weight")
    rate, name = settings.learning_rate, settings.optimizer
    if not settings.private:
        rate = settings.non_private_learning_rate or rate
        name = settings.non_private_optimizer or name
    if name == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=settings.momentum)
    else:
        optimizer = keras.optimizers.Adam(rate)
    metrics = [] if multi_label else ["accuracy"]
    if run_data.group_spec.attributes:
        # Streaming per-group error rates on validation data (never training).
        metrics.append(dpf.fairness.streaming_rates.GroupedErrorRates(
            run_data.group_spec.to_dict(), from_logits=True,
            threshold=evaluation_lib.THRESHOLD if multi_label else None,
            multi_class=not multi_label,
            label_names=[metric_name(n) for n in run_data.class_names]))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics or None)


def metric_name(class_name):
    """A class name as a part of a metric's name: no spaces, no '/'.

    Fashion-MNIST's "T-shirt/top" becomes "T-shirt_top": metric names are
    '/'-separated keys, and the metrics refuse a '/' inside a part.
    """
    return re.sub(r"[\s/]+", "_", str(class_name))


def last_diagnostics(history):
    """The last epoch's per-group training diagnostics, nested by attribute and group.

    Args:
        history: `History.history` of `fit` (log name -> list of values).

    Returns:
        dict attribute -> group -> figure -> value (empty without
        `diagnostics.GroupDiagnostics`); figures of training data, outside
        the DP guarantee.
    """
    nested = {}
    for key, values in history.items():
        parts = key[len(dpf.training.diagnostics.PREFIX):].split("/")
        if key.startswith(dpf.training.diagnostics.PREFIX) and len(parts) == 3 and values:
            attribute, group, figure = parts
            nested.setdefault(attribute, {}).setdefault(group, {})[figure] = values[-1]
    return nested
