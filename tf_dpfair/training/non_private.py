"""Group-aware evaluation shared by private and non-private models.

Evaluation batches may carry group ids in `y = {"label": ..., "groups": ...}`
(see `tf_dpfair.data.batch`). Models with this mixin split them off before the loss
and feed them to metrics marked `needs_groups` (such as `GroupedAUC`). Group
metrics are never updated on training batches, and their names are dropped
from training logs.
"""

import keras

from tf_dpfair.data import batch
from tf_dpfair.training import keras_multiworker
from tf_dpfair.training import progress


class GroupedEvaluation:
    """Mixin for `keras.Model`: routes group ids to group metrics in evaluation."""

    _group_metrics = ()

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None,
                metrics=None, **kwargs):
        """Like `keras.Model.compile`; metrics with `needs_groups` get group ids.

        Metrics with `needs_groups = True` are fed the groups of
        `y = {"label": ..., "groups": ...}` during evaluation.
        """
        metrics = list(metrics or [])
        self._group_metrics = [m for m in metrics
                               if getattr(m, "needs_groups", False)]
        other = [m for m in metrics if not getattr(m, "needs_groups", False)]
        super().compile(optimizer=optimizer, loss=loss,
                        loss_weights=loss_weights, metrics=other or None,
                        **kwargs)

    def compile_from_config(self, config):
        """Re-compiles a loaded model through this class's `compile`."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """Keras' `compute_loss` with the groups split off `y`."""
        labels, _ = batch.split_labels(y)
        return super().compute_loss(x, labels, y_pred, sample_weight, training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Updates compiled metrics, and group metrics when `y` has groups."""
        labels, groups = batch.split_labels(y)
        if groups is not None:
            for metric in self._group_metrics:
                metric.update_state(labels, y_pred, sample_weight=sample_weight,
                                    groups=groups, label_mask=batch.label_mask_of(y))
        return super().compute_metrics(x, labels, y_pred, sample_weight)

    def training_logs(self, x, labels, y_pred, sample_weight):
        """Metric logs of a training step: no groups, no group metric names."""
        logs = self.compute_metrics(x, labels, y_pred, sample_weight)
        for metric in self._group_metrics:
            for name in metric.result():
                logs.pop(name, None)
        return logs


@keras.saving.register_keras_serializable(package="tf_dpfair")
class NonPrivateModel(keras_multiworker.MultiWorkerFit, progress.HeadlineProgress,
                      GroupedEvaluation, keras.Model):
    """A functional model trained without DP, evaluated like a DPModel.

    The baseline of private-vs-non-private comparisons: plain Keras training
    (no clipping, no noise; epsilon is infinite), with group ids in held-out
    batches reaching group metrics exactly as for `DPModel`.
    `NonPrivateModel(inputs=..., outputs=...)`, or `make_non_private(model)`.
    """

    def train_step(self, data):
        """Keras' own step, with any group ids removed from `y` first."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        labels, _ = batch.split_labels(y)
        logs = super().train_step((x, labels, sample_weight))
        for metric in self._group_metrics:
            for name in metric.result():
                logs.pop(name, None)
        return logs


def make_non_private(model):
    """Returns a `NonPrivateModel` sharing the weights of a functional/Sequential model.

    Raises:
      TypeError: `model` has no functional graph (build it with `keras.Input`).
    """
    inputs = getattr(model, "inputs", None)
    outputs = getattr(model, "outputs", None)
    if not (isinstance(model, keras.Model) and model.built and inputs and outputs):
        raise TypeError("make_non_private needs a built functional or Sequential "
                        "keras.Model.")
    return NonPrivateModel(inputs=inputs, outputs=outputs,
                           name=f"non_private_{model.name}")
