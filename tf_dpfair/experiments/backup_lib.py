"""A run's backup: restoring it before `fit`, and whether anything is left to train.

`train_lib.run` keeps `keras.callbacks.BackupAndRestore` state in
`work_dir/backup`; rerunning the same settings loads it here first, so the
data pipeline restarts at the update the backup holds, and a run that the
privacy budget (or its last planned update) ended trains nothing more.
"""

import json
import os

import keras

import tf_dpfair as dpf


def updates_applied(model):
    """Optimizer updates applied so far (saved with the model and its backups)."""
    if isinstance(model, dpf.DPTraining):
        return model.update_count
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def restore_backup(model, backup_dir, steps_per_epoch, strategy):
    """Loads the backup (if any) and returns the updates already applied.

    BackupAndRestore would load it too, but only inside `fit`; the pipeline
    has to know the update count before `fit` to restart at the right batch.
    On several workers the chief alone reads the backup and every worker
    gets its state (`tf_dpfair.workers.copy_from_chief`): the others need
    no access to the work dir.

    Args:
        model: the compiled model (built optimizer or not).
        backup_dir: the run's `BackupAndRestore` folder.
        steps_per_epoch: updates per Keras epoch of the run.
        strategy: the run's `tf.distribute.Strategy`.

    Returns:
        The updates the model holds (0 without a backup).

    Raises:
        ValueError: the backup holds another number of updates than its
            epochs of `steps_per_epoch` (it belongs to other settings).
    """
    chief = dpf.workers.is_chief(strategy)
    weights = os.path.join(backup_dir, "latest.weights.h5")
    found = chief and os.path.exists(weights)
    if not dpf.workers.share_from_chief(strategy, int(found)):
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    problem = None
    if chief:
        model.load_weights(weights)
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            epoch = json.load(f)["epoch"]
        done = updates_applied(model)
        if done != epoch * steps_per_epoch:
            problem = (f"The backup in {backup_dir} holds {done} updates after {epoch} "
                       f"epochs of {steps_per_epoch}: it belongs to other settings. "
                       f"Remove it or use another work_dir.")
    # Every worker stops on the chief's finding, rather than wait for it.
    if dpf.workers.share_from_chief(strategy, int(problem is not None)):
        raise ValueError(problem or "The chief found a backup of other settings "
                         "in its work_dir (see its output).")
    dpf.workers.copy_from_chief(strategy, model.variables + model.optimizer.variables)
    return updates_applied(model)


def nothing_left_to_train(model, logger, total_steps):
    """Says why a restored run has no update left to train, or None.

    A private run with a target epsilon is finished once it has updates and
    one more would take epsilon above the target (the budget stopped it,
    possibly at its last planned update); any run is finished once it has
    `total_steps` updates.

    Args:
        model: the model, with its restored update count.
        logger: the run's `PrivacyLogger` (None for non-private runs), with
            its model set.
        total_steps: the updates the run plans.

    Returns:
        The message to print, or None when updates are left.
    """
    done = updates_applied(model)
    # With no update yet, a budget that fits none is the logger's refusal.
    if done and logger is not None and logger.target_epsilon is not None:
        now, after = logger.statement(done), logger.statement(done + 1)
        if after.epsilon > logger.target_epsilon:
            return (f"The run is finished: the privacy budget epsilon="
                    f"{logger.target_epsilon} was reached after {done} updates "
                    f"(epsilon {now.epsilon:.4g}, delta {now.delta:.3g}; one more "
                    f"update would take epsilon to {after.epsilon:.4g}). Nothing "
                    f"left to train.")
    if done >= total_steps:
        spent = "" if logger is None else f" (epsilon {logger.statement(done).epsilon:.4g})"
        return (f"The run is finished: all {total_steps} updates were applied"
                f"{spent}. Nothing left to train.")
    return None
