"""The figures behind a sweep report's claims, under bootstrap weights, from saved runs.

`verdicts_lib` states the claims; this module reads what the runs saved and
computes the numbers the claims test:

- per run, the test examples of its final model (`predictions.npz`) and
  of its checkpoints (`checkpoints/epoch_NNN.npz`, `update_NNNNNN.npz`),
  as mappings of per-example arrays for `inference.hierarchical_bootstrap`
  and `inference.hierarchical_copies`, stratified by the intersection of
  every group attribute (so that a resample keeps every group's size for
  every attribute);
- `figures`: the overall performance and one attribute's gap (max - min
  over its groups) under bootstrap weights: top-1 accuracy for multi-class
  data, mean AUC over labels (ties count one half; labels masked out
  left out; a group's mean over the labels defined in it) for multi-label
  data;
- `excess_from_copies`: the excess disparity at matched performance of a
  private arm over a non-private arm, from their bootstrap copies, on the
  non-private checkpoint curves (`curve.build_curve`, rule "all"), never
  extrapolated;
- `validation_curve`, `validation_figure`: a run's validation performance
  at each checkpoint, and the figure a learning-rate choice rests on.
"""

import glob
import os
import warnings

import numpy as np

from tf_dpfair.fairness import auc
from tf_dpfair.fairness import curve

STRATA = "strata"


def _validation_key(names, weights):
    """The EMA validation scores when asked for and saved, else the raw ones."""
    return "ema_val_scores" if weights == "ema" and "ema_val_scores" in names else "val_scores"


def _strata(labels_file, attributes):
    """Joint group codes over every attribute `[n]` (all zeros without groups)."""
    n = len(labels_file["labels"])
    columns = [np.asarray(labels_file["group_" + a]) for a in attributes]
    if not columns:
        return np.zeros(n, np.int64)
    return np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)[1].ravel()


def _run_arrays(labels_file, attributes, scores, multi_label):
    """A run's mapping of per-example arrays; `scores` is `[n, M, L]` (M models)."""
    labels = np.asarray(labels_file["labels"])
    arrays = {STRATA: _strata(labels_file, attributes), "labels": labels}
    arrays.update({"group_" + a: np.asarray(labels_file["group_" + a]) for a in attributes})
    if multi_label:
        arrays["values"] = scores.astype(np.float64)
        if "label_mask" in labels_file:
            arrays["mask"] = np.asarray(labels_file["label_mask"], dtype=np.float64)
    else:
        arrays["values"] = (scores.argmax(-1) == labels[:, None]).astype(np.float64)
    return arrays


def final_run(run_dir, attributes, multi_label, weights="raw"):
    """A run's final test predictions as a bootstrap run mapping.

    Args:
        run_dir: the run's folder (`predictions.npz`).
        attributes: group attributes to keep.
        multi_label: multi-label data (mean AUC) or multi-class (accuracy).
        weights: "raw", or "ema" (EMA scores where the run saved them).

    Returns:
        `(run, used)`: the mapping (with "values" `[n, 1]` correct flags or
        `[n, 1, L]` scores) and the weights used ("raw" or "ema").
    """
    saved = np.load(os.path.join(run_dir, "predictions.npz"))
    used = "ema" if weights == "ema" and "scores_ema" in saved.files else "raw"
    return _run_arrays(saved, attributes, saved[f"scores_{used}"][:, None], multi_label), used


def checkpoint_files(run_dir):
    """`[(updates, path)]` of a run's checkpoints, by update (epoch and update files)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*_*.npz"))):
        if os.path.basename(path).startswith(("epoch_", "update_")):
            with np.load(path) as saved:
                found.setdefault(int(saved["updates"]), path)
    return sorted(found.items())


def checkpoint_runs(run_dirs, attributes, multi_label):
    """The non-private runs' checkpoints (raw weights) as bootstrap run mappings.

    Only the updates every run checkpointed are kept, so that every run's
    curve has the same knots in update order.

    Args:
        run_dirs: the runs' folders.
        attributes, multi_label: as in `final_run`.

    Returns:
        `(runs, updates)`: mappings with "values" `[n, M, ...]`, and the M
        updates.
    """
    files = [dict(checkpoint_files(d)) for d in run_dirs]
    updates = sorted(set.intersection(*(set(f) for f in files))) if files else []
    if not updates:
        return [], []
    runs = []
    for run_dir, paths in zip(run_dirs, files):
        labels = np.load(os.path.join(run_dir, "checkpoints", "labels.npz"))
        scores = np.stack([np.load(paths[u])["scores"] for u in updates], axis=1)
        runs.append(_run_arrays(labels, attributes, scores, multi_label))
    return runs, updates


def _mean_auc(values, labels, mask, rows, weights):
    """Mean over labels of the weighted AUC of the examples `rows`: `[k]`."""
    per_label = []
    for j in range(labels.shape[1]):
        keep = rows if mask is None else rows & (mask[:, j] > 0)
        per_label.append(auc._weighted_aucs(labels[keep, j], values[keep, j],
                                            weights[:, keep]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # labels undefined everywhere
        return np.nanmean(np.stack(per_label, axis=1), axis=1)


def _group_means(run, weights, attribute, model, multi_label):
    """Overall `[k]` and per-group `[k, G]` performance of model `model` of a run."""
    values = run["values"][:, model]
    ids = run["group_" + attribute] if attribute else np.zeros(len(values), np.int64)
    groups = np.unique(ids)
    if not multi_label:
        hits = weights * values
        overall = hits.sum(1) / weights.sum(1)
        means = [hits[:, ids == g].sum(1) / weights[:, ids == g].sum(1) for g in groups]
        return overall, np.stack(means, axis=1)
    labels, mask = run["labels"], run.get("mask")
    everyone = np.ones(len(values), bool)
    overall = _mean_auc(values, labels, mask, everyone, weights)
    means = [_mean_auc(values, labels, mask, ids == g, weights) for g in groups]
    return overall, np.stack(means, axis=1)


def figures(run, weights, attribute, multi_label):
    """Overall performance and `attribute`'s gap of every model of a run.

    Args:
        run: a mapping from `final_run` or `checkpoint_runs` ("values" `[n, M]`
            or `[n, M, L]`).
        weights: float `[k, n]`, how often each example was drawn.
        attribute: the group attribute of the gap, or None (gap 0).
        multi_label: mean AUC (True) or accuracy (False).

    Returns:
        float `[k, 2, M]`: `[:, 0]` overall performance, `[:, 1]` the max -
        min over the attribute's groups (NaN groups ignored).
    """
    out = np.empty((len(weights), 2, run["values"].shape[1]))
    for model in range(run["values"].shape[1]):
        overall, means = _group_means(run, weights, attribute, model, multi_label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[:, 0, model] = overall
            out[:, 1, model] = np.nanmax(means, axis=1) - np.nanmin(means, axis=1)
    return out


def _interpolate(private, curves_performance, curves_gap):
    """Excess per row: private `[B, Rp, 2]`, curves `[B, Rn, M]`.

    Returns `(excess [B], below [B], above [B])`: below / above, whether some
    private model of the row lies below / above some curve of the row.
    """
    b, rn, m = curves_performance.shape
    draws = curve.build_curve_draws(curves_performance.reshape(b * rn, m),
                                    curves_gap.reshape(b * rn, m), rule="all")
    at = np.repeat(private[:, :, 0], rn, axis=0)  # row b * Rn + n holds draw b
    gap, _ = curve.interpolated_gap(draws, at)
    below = (at < np.nanmin(draws.performance, axis=1)[:, None]).reshape(b, -1).any(axis=1)
    above = (at > np.nanmax(draws.performance, axis=1)[:, None]).reshape(b, -1).any(axis=1)
    gap = gap.reshape(b, rn, -1).mean(axis=1)
    return (private[:, :, 1] - gap).mean(axis=1), below, above


def excess_from_copies(private, non_private):
    """Private gap minus the non-private gap at the private performance.

    Each private model (copy) is placed on each non-private run's (copy's)
    checkpoint curve at its own performance; the non-private gap there is
    averaged over the non-private runs, and the excess averaged over the
    private models: d = mean_p [gap_p - mean_n curve_n(performance_p)].

    Args:
        private: `inference.Copies` of `figures` of the private runs'
            final models (`[..., 2, 1]`).
        non_private: `inference.Copies` of `figures` of the non-private
            runs' checkpoints (`[..., 2, M]`).

    Returns:
        dict "estimate" (float), "draws" `[B]` (NaN where outside), "below"
        and "above" (draws with a private model below / above some curve's
        range) and "estimate_outside" ("below", "above" or "" for the
        models on all their data).

    Raises:
        ValueError: a curve with fewer than 2 distinct performances.
    """
    point, point_below, point_above = _interpolate(private.point[None, :, :, 0],
                                                   non_private.point[None, :, 0],
                                                   non_private.point[None, :, 1])
    draws, below, above = _interpolate(private.draws[..., 0], non_private.draws[:, :, 0],
                                       non_private.draws[:, :, 1])
    side = "below" if point_below[0] else "above" if point_above[0] else ""
    return {"estimate": float(point[0]), "draws": np.where(below | above, np.nan, draws),
            "below": int(below.sum()), "above": int(above.sum()), "estimate_outside": side}


def validation_curve(run_dir, multi_label, weights="raw"):
    """A run's validation performance at each checkpoint, in update order.

    Args:
        run_dir: the run's folder (`checkpoints/*.npz` with "val_scores",
            `checkpoints/val_labels.npz`).
        multi_label: mean AUC (True) or accuracy (False).
        weights: "raw" or "ema" (EMA scores where saved).

    Returns:
        A list of floats, or None when the run saved no validation scores.
    """
    labels_path = os.path.join(run_dir, "checkpoints", "val_labels.npz")
    if not os.path.exists(labels_path):
        return None
    labels = np.load(labels_path)
    out = []
    for _, path in checkpoint_files(run_dir):
        saved = np.load(path)
        key = _validation_key(saved.files, weights)
        if key not in saved.files:
            continue
        run = _run_arrays(labels, [], saved[key][:, None], multi_label)
        out.append(float(figures(run, np.ones((1, len(labels["labels"]))), None,
                                 multi_label)[0, 0, 0]))
    return out or None
