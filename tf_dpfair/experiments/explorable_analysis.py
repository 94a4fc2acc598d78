"""What the PAIR explorable shows, computed from a sweep's saved test predictions.

Privacy sensitivity of each test example, the most and least sensitive of
each class, per-class accuracy, 2-D projections of embeddings, and the
subgroup heatmap's cells; and the reading of a sweep's runs they need
(saved predictions, test images, a model's penultimate-layer embeddings).
`explorable_lib` writes the report from these, `explorable_figures` draws.
"""

import hashlib
import json
import math
import os
from typing import NamedTuple

import keras
import numpy as np
import pandas as pd

from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import settings_lib

NEVER = math.inf  # sensitivity of an example the largest epsilon misclassifies
PROJECTIONS = ("umap", "pca", "tsne")
_NOT_FACETS = ("epsilon", "non_private", "noise_multiplier", "seed")
_SPLIT_SETTINGS = ("test_examples", "test_rotated_fraction", "seed")


def privacy_sensitivity(correct, epsilons):
    """Smallest epsilon from which on every model classifies each example.

    Args:
        correct: bool `[M, N]`: whether model m classifies example n.
        epsilons: `[M]` epsilon of each model (inf = non-private). Several
            models at one epsilon (seeds) vote: the example counts as
            correct there when at least half of them get it right.

    Returns:
        float `[N]`: the smallest epsilon e of the sweep such that the
        example is correct at e and at every larger epsilon; `NEVER` (inf
        is taken by non-private models, so NaN marks it) when the largest
        epsilon gets it wrong. Larger values are more privacy-sensitive.

    Raises:
        ValueError: shapes that disagree, or no model.
    """
    correct = np.asarray(correct, dtype=bool)
    epsilons = np.asarray(epsilons, dtype=float)
    if correct.ndim != 2 or correct.shape[0] != epsilons.shape[0] or not len(epsilons):
        raise ValueError(f"correct must be [models, examples] with one epsilon per model; "
                         f"got {correct.shape} and {epsilons.shape}.")
    levels = np.unique(epsilons)  # ascending, inf last
    votes = np.stack([correct[epsilons == e].mean(axis=0) >= 0.5 for e in levels])
    # Walking down from the largest epsilon: still correct at every level so far.
    still = np.logical_and.accumulate(votes[::-1], axis=0)[::-1]
    first = np.argmax(still, axis=0)
    return np.where(still[-1], levels[first], np.nan)


def rank_examples(sensitivity, true_probability, labels, count):
    """The most and least privacy-sensitive examples of each class.

    Most sensitive: the largest finite sensitivity (lost first as privacy
    tightens), ties broken by the lowest mean probability of the true class
    over the models; least sensitive: the smallest sensitivity, ties broken
    by the highest probability. Examples that no model classifies
    (sensitivity NaN) are in neither list.

    Args:
        sensitivity: `[N]` from `privacy_sensitivity`.
        true_probability: `[N]` mean probability of the true class.
        labels: `[N]` class ids.
        count: examples per class and list.

    Returns:
        dict class id -> (most sensitive indices, least sensitive indices).
    """
    out = {}
    for k in np.unique(labels):
        rows = np.flatnonzero((labels == k) & ~np.isnan(sensitivity))
        most = rows[np.lexsort((true_probability[rows], -sensitivity[rows]))][:count]
        least = rows[np.lexsort((-true_probability[rows], sensitivity[rows]))][:count]
        out[int(k)] = (most, least)
    return out


def per_class_accuracy(scores, labels, num_classes):
    """Top-1 accuracy of each class: `[K]`, NaN for classes absent from `labels`."""
    predicted = np.asarray(scores).argmax(axis=1)
    return np.array([np.mean(predicted[labels == k] == k) if (labels == k).any() else np.nan
                     for k in range(num_classes)])


def project(embeddings, method="umap", seed=0):
    """2-D projection of embeddings.

    Args:
        embeddings: `[N, D]`.
        method: "umap" (umap-learn), "pca" or "tsne" (scikit-learn).
        seed: random state of UMAP and t-SNE.

    Returns:
        `(points [N, 2], name of the method used)`.

    Raises:
        ValueError: unknown method.
        ImportError: "umap" without umap-learn installed.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if method == "umap":
        import umap  # Optional dependency (setup.cfg extra "explorable").

        reducer = umap.UMAP(n_components=2, random_state=seed, n_jobs=1)
        return reducer.fit_transform(embeddings), "UMAP (umap-learn, 15 neighbours)"
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings), "PCA"
    if method == "tsne":
        from sklearn.manifold import TSNE

        return (TSNE(n_components=2, random_state=seed, init="pca").fit_transform(embeddings),
                "t-SNE (scikit-learn)")
    raise ValueError(f"method must be one of {PROJECTIONS}; got {method!r}.")


def default_projection():
    """'umap' where umap-learn imports, else 'pca'."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return "pca"
    return "umap"


# ---------------------------------------------------------------- the sweep


def epsilon_of(row):
    """A run's epsilon: its target (`settings.epsilon`), else the accounted one.

    Runs of one grid value account slightly different epsilons (0.9995 and
    0.9999 for target 1 at two training-set sizes); the target keeps them on
    one level.
    """
    target = row.get("settings.epsilon")
    if isinstance(target, str):
        return math.inf if target == "inf" else float(target)
    if target is None or pd.isna(target):
        return float(row["epsilon"])
    return float(target)


def _epsilons(rows):
    return np.array([epsilon_of(r) for _, r in rows.iterrows()])


def _use(row, metric="accuracy"):
    """'ema' where the run kept EMA weights, else 'raw' (as the summary)."""
    return "ema" if not pd.isna(row.get(f"metrics.ema.{metric}")) else "raw"


class RunPredictions(NamedTuple):
    """A run's saved test predictions (`predictions.npz`).

    Attributes:
        scores: `[N, K]` probabilities (EMA weights where the run kept them).
        labels: `[N]` class ids.
        groups: dict attribute -> group ids `[N]`.
    """

    scores: np.ndarray
    labels: np.ndarray
    groups: dict


def load_run_predictions(sweep_dir, table):
    """Every run's test predictions, each on the test examples it scored.

    Runs need not share their test examples: a run with `test_examples` > 0
    or a rotated test share draws them with its seed. `group_by_test_split`
    tells which runs do.

    Args:
        sweep_dir: the sweep folder.
        table: its results table (`sweep_lib.collect_results`).

    Returns:
        dict run -> `RunPredictions`.
    """
    out = {}
    for _, row in table.iterrows():
        saved = np.load(os.path.join(sweep_dir, row["run"], "predictions.npz"))
        out[row["run"]] = RunPredictions(
            saved[f"scores_{_use(row)}"].astype(np.float64), saved["labels"],
            {k[len("group_"):]: saved[k] for k in saved.files if k.startswith("group_")})
    return out


def _setting(row, key, default):
    """`settings.<key>` of a results row; `default` where absent or None/NaN."""
    value = row.get(f"settings.{key}")
    return default if value is None or (np.isscalar(value) and pd.isna(value)) else value


def split_settings(row):
    """The settings that draw a run's test split (`inputs_lib.load_data`).

    Returns:
        dict with `test_examples`, `test_rotated_fraction` (the training
        share where unset, as the loader does) and `seed`: None where
        nothing is drawn at random (all test examples, none rotated), since
        the seed then leaves the split alone. Cautious elsewhere: a seed that
        draws the whole split (`test_examples` >= its size) still counts.
    """
    examples = int(_setting(row, "test_examples", 0))
    fraction = float(_setting(row, "test_rotated_fraction",
                              _setting(row, "rotated_fraction", 0.0)))
    seed = int(_setting(row, "seed", 0)) if examples or fraction else None
    return {"test_examples": examples, "test_rotated_fraction": fraction, "seed": seed}


def _examples_digest(prediction):
    """A digest of the saved labels and groups, in order: equal for one split."""
    digest = hashlib.sha256()
    for name, values in [("labels", prediction.labels), *sorted(prediction.groups.items())]:
        values = np.ascontiguousarray(values)
        digest.update(f"{name}:{values.dtype}:{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def _split_names(settings_of_splits):
    """One name per split, from the split settings that tell the splits apart.

    Args:
        settings_of_splits: per split, the `split_settings` of its runs.
    """
    seen = [{k: "/".join(sorted({"-" if s[k] is None else f"{s[k]}" for s in runs}))
             for k in _SPLIT_SETTINGS} for runs in settings_of_splits]
    differing = [k for k in _SPLIT_SETTINGS if len({v[k] for v in seen}) > 1]
    names = [", ".join(f"{k}={v[k]}" for k in differing) for v in seen]
    if len(set(names)) < len(names):  # Told apart by the saved arrays alone.
        names = [f"test split {i + 1}" + (f" ({n})" if n else "") for i, n in enumerate(names)]
    return names


def group_by_test_split(table, predictions):
    """The runs grouped by the test examples they scored.

    Two runs share a split when their saved labels and groups agree element
    by element, in order, and so do their `split_settings`: the arrays alone
    could agree by chance on a small random subset, and the settings alone
    would need every loader's rules.

    Args:
        table: the results table.
        predictions: `load_run_predictions` output.

    Returns:
        `[(name, runs)]` in table order: runs of one split scored the same
        examples in the same order. Names tell the splits apart ("seed=1");
        "" when there is one split.
    """
    splits = {}
    for _, row in table.iterrows():
        settings = split_settings(row)
        key = (_examples_digest(predictions[row["run"]]), tuple(sorted(
            (k, str(v)) for k, v in settings.items())))
        splits.setdefault(key, []).append((row["run"], settings))
    names = _split_names([[s for _, s in runs] for runs in splits.values()])
    return [(name, [run for run, _ in runs]) for name, runs in zip(names, splits.values())]


def facet_combinations(table, keys):
    """[(facet dict, rows of the table)] over the settings other than epsilon."""
    facets = [k for k in keys if k not in _NOT_FACETS]
    if not facets:
        return [({}, table)]
    out = []
    for values, rows in table.groupby([f"settings.{k}" for k in facets], sort=False):
        values = values if isinstance(values, tuple) else (values,)
        out.append((dict(zip(facets, values)), rows))
    return out


def _facet_text(facets):
    return ", ".join(f"{k}={v}" for k, v in facets.items()) or "all runs"


def _load_settings(run_dir):
    with open(os.path.join(run_dir, "settings.json")) as f:
        values = json.load(f)
    values = {k: (math.inf if v == "inf" else v) for k, v in values.items()}
    return settings_lib.settings_from(None, values)


def load_test_images(run_dir, expected_labels=None):
    """The test images of a run `[N, H, W, C]` (floats in [0, 1] or uint8).

    Args:
        run_dir: the run's folder (its `settings.json` draws the split again).
        expected_labels: optional `[N]` labels the run saved, in order.

    Returns:
        `(images, class names)`.

    Raises:
        ValueError: the split drawn again has other labels than `expected_labels`.
    """
    run_data = inputs_lib.load_data(_load_settings(run_dir))
    elements = list(run_data.test.elements())
    if expected_labels is not None:
        labels = np.array([np.asarray(e["label"]) for e in elements])
        if not np.array_equal(labels, expected_labels):
            raise ValueError(f"The test split drawn from {run_dir}/settings.json is not the "
                             "one its predictions.npz scored (other labels or order).")
    return np.stack([e["image"].numpy() for e in elements]), list(run_data.class_names)


def penultimate_embeddings(run_dir, dataset_images, batch_size=1000):
    """Inputs of a saved model's last layer for the given images `[N, D]`.

    The raw weights of `model.keras` (the non-private run has no others).
    The last layer is found inside nested models (a fine-tuning model's head
    sits at the end of its nested backbone). The model runs whole, in
    inference mode, and the last layer's input is recorded on its way in: a functional model cut at that tensor would be
    rebuilt from the graph, which Keras refuses for fine-tuning models whose
    nested backbone reuses the outer input's name.
    """
    model = keras.saving.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    last = model.layers[-1]
    while isinstance(last, keras.Model):  # A nested model ending in the head.
        last = last.layers[-1]
    seen = []
    call = last.call

    def recording_call(inputs, *args, **kwargs):
        seen.append(np.asarray(inputs))
        return call(inputs, *args, **kwargs)

    images = dataset_images.astype(np.float32)
    if dataset_images.dtype == np.uint8:
        images = images / 255.0
    last.call = recording_call
    try:
        for i in range(0, len(images), batch_size):
            # A list matches the functional model's input structure.
            model([images[i:i + batch_size]], training=False)
    finally:
        del last.call  # The class's own call again.
    if len(seen) != -(-len(images) // batch_size):
        raise ValueError(f"The last layer of {run_dir}/model.keras ran {len(seen)} times "
                         f"for {len(images)} images in batches of {batch_size}: it is not "
                         "called once per forward pass, so its input is no embedding.")
    return np.concatenate(seen)


def heatmap_cells(table, attribute="orientation", rare="rotated", common="upright"):
    """One row per run: size, rotated share, epsilon, the rare group's accuracy and gap.

    The gap is the common group's accuracy minus the rare group's (positive
    when the rare group trails). EMA weights where the run kept them.

    Returns:
        A DataFrame with columns run, seed, train_examples, rotated_fraction,
        epsilon, weights, rare_accuracy, common_accuracy, gap.
    """
    rows = []
    for _, r in table.iterrows():
        use = _use(r)
        prefix = f"metrics.{use}.groups.{attribute}."
        rare_accuracy = r.get(prefix + f"{rare}.accuracy")
        common_accuracy = r.get(prefix + f"{common}.accuracy")
        rows.append({"run": r["run"], "seed": _setting(r, "seed", 0),
                     "train_examples": int(r["data.num_train"]),
                     "rotated_fraction": float(r["settings.rotated_fraction"]),
                     "epsilon": epsilon_of(r), "weights": use,
                     "rare_accuracy": rare_accuracy, "common_accuracy": common_accuracy,
                     "gap": common_accuracy - rare_accuracy})
    return pd.DataFrame(rows)


def heatmap_means(cells):
    """The heatmap's cells with several runs (seeds) merged: their means.

    Each run's accuracies are of its own test split, so means of per-run
    figures are taken, never figures of pooled examples.

    Args:
        cells: `heatmap_cells` output.

    Returns:
        A DataFrame, one row per (rotated_fraction, train_examples, epsilon):
        rare_accuracy and gap (means over its runs), runs and seeds (lists).
    """
    keys = ["rotated_fraction", "train_examples", "epsilon"]
    return cells.groupby(keys, sort=True).agg(
        rare_accuracy=("rare_accuracy", "mean"), gap=("gap", "mean"),
        runs=("run", list), seeds=("seed", list)).reset_index()
