"""The PAIR explorable's figures, from a sweep's saved test predictions.

"Can a model be differentially private and fair?" shows three things that
`write_explorable` draws for any sweep with the axes they need:

- Privacy sensitivity of each test example (needs an epsilon axis): the
  smallest epsilon from which on every model of the sweep classifies the
  example correctly (`privacy_sensitivity`), image grids of the most and
  least privacy-sensitive test images of each class, and a 2-D projection
  of the penultimate-layer embeddings coloured by that sensitivity.
- Per-class accuracy against epsilon (needs an epsilon axis).
- The subgroup heatmap (needs epsilon and `rotated_fraction` axes, and
  `train_examples` for its rows): accuracy of the rotated group and its gap
  to the upright group in every cell, each cell of the Markdown tables
  linking to that run's per-group table.

Every figure is of the held-out test split, the same images in every run of
the sweep (checked); training images are never shown. Models are read with
EMA weights where a run kept them (private runs), raw weights otherwise, as
in `report_lib`'s summary.
"""

import json
import math
import os

import keras
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tf_dpfair.fairness import auc_report as reports
from tf_dpfair.experiments import evaluation_lib
from tf_dpfair.experiments import inputs_lib
from tf_dpfair.experiments import train_lib

NEVER = math.inf  # sensitivity of an example the largest epsilon misclassifies
HELD_OUT_NOTE = "held-out test images (not training data)"
PROJECTIONS = ("umap", "pca", "tsne")
_NOT_FACETS = ("epsilon", "non_private", "noise_multiplier", "seed")


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


def sensitivity_label(value):
    """'never' for NaN, 'inf' (non-private), or the epsilon as text."""
    if np.isnan(value):
        return "never"
    return "inf" if math.isinf(value) else f"{value:g}"


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


def load_run_predictions(sweep_dir, table):
    """Per run: test scores (EMA where kept) and the shared labels and groups.

    Args:
        sweep_dir: the sweep folder.
        table: its results table (`sweep_lib.collect_results`).

    Returns:
        `(scores, labels, groups)`: dict run -> `[N, K]` probabilities, class
        ids `[N]`, dict attribute -> ids `[N]`.

    Raises:
        ValueError: the runs were not evaluated on the same test examples.
    """
    scores, labels, groups = {}, None, None
    for _, row in table.iterrows():
        saved = np.load(os.path.join(sweep_dir, row["run"], "predictions.npz"))
        scores[row["run"]] = saved[f"scores_{_use(row)}"].astype(np.float64)
        run_groups = {k[len("group_"):]: saved[k] for k in saved.files
                      if k.startswith("group_")}
        if labels is None:
            labels, groups = saved["labels"], run_groups
        elif (not np.array_equal(labels, saved["labels"]) or set(groups) != set(run_groups)
              or any(not np.array_equal(groups[a], run_groups[a]) for a in groups)):
            raise ValueError(f"Run {row['run']} was evaluated on other test examples than "
                             "the first run: per-example figures need one test split.")
    return scores, labels, groups


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
    return train_lib.settings_from(None, values)


def load_test_images(run_dir):
    """The test images of a run `[N, H, W, C]` (floats in [0, 1] or uint8)."""
    run_data = inputs_lib.load_data(_load_settings(run_dir))
    images = [element["image"].numpy() for element in run_data.test.elements()]
    return np.stack(images), list(run_data.class_names)


def penultimate_embeddings(run_dir, dataset_images, batch_size=1000):
    """Inputs of a saved model's last layer for the given images `[N, D]`.

    The raw weights of `model.keras` (the non-private run has no others).
    The last layer is found inside nested models (a fine-tuning model's head
    sits at the end of its nested backbone). The model runs whole, in inference mode, and the last layer's input is
    recorded on its way in: a functional model cut at that tensor would be
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


def plot_image_grid(images, ranking, class_names, sensitivity, groups=None, count=6):
    """Most and least privacy-sensitive test images of each class.

    Args:
        images: `[N, H, W, C]` test images.
        ranking: `rank_examples` output.
        class_names: names of the classes.
        sensitivity: `[N]` from `privacy_sensitivity`.
        groups: optional `[N]` bool, True for the rare group (marked "R").
        count: images per class and list.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    classes = sorted(ranking)
    figure = Figure(figsize=(1.0 * (2 * count + 1) + 1.5, 1.05 * len(classes) + 1.0))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(classes), 2 * count + 1)
    for r, k in enumerate(classes):
        for side, indices in enumerate(ranking[k]):
            for c, index in enumerate(indices):
                axes = figure.add_subplot(grid[r, c + side * (count + 1)])
                axes.imshow(np.squeeze(images[index]), cmap="gray")
                label = sensitivity_label(sensitivity[index])
                if groups is not None and groups[index]:
                    label += " R"
                axes.set_title(label, fontsize=7, pad=1)
                axes.set_xticks([])
                axes.set_yticks([])
                if c == 0 and side == 0:
                    axes.set_ylabel(class_names[k], fontsize=8, rotation=0, ha="right",
                                    va="center")
    figure.suptitle("Left: most privacy-sensitive (need the largest epsilon); right: least "
                    "(right at the smallest).\nAbove each image: the smallest epsilon from "
                    "which on every model classifies it"
                    + ("; R = rotated group" if groups is not None else "")
                    + f". {HELD_OUT_NOTE.capitalize()}.", fontsize=9)
    figure.subplots_adjust(left=0.12, right=0.99, bottom=0.01,
                           top=1 - 0.9 / figure.get_figheight(), wspace=0.05, hspace=0.35)
    return figure


def plot_projection(points, sensitivity, method, rare=None):
    """Embedding projection coloured by privacy sensitivity (one colour per level).

    Args:
        points: `[N, 2]` projected embeddings.
        sensitivity: `[N]` from `privacy_sensitivity`.
        method: name of the projection, for the title.
        rare: optional bool `[N]`, True for the rotated group (triangles).

    Returns:
        A `matplotlib.figure.Figure`.
    """
    figure = Figure(figsize=(7.0, 6.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rare = np.zeros(len(points), bool) if rare is None else np.asarray(rare, bool)
    levels = list(np.unique(sensitivity[~np.isnan(sensitivity)]))
    palette = matplotlib.colormaps["plasma"]
    entries = [("never", np.isnan(sensitivity), "#bbbbbb")] + [
        (sensitivity_label(v), sensitivity == v, palette(0.85 * i / max(1, len(levels) - 1)))
        for i, v in enumerate(levels)]
    for label, rows, color in entries:
        axes.scatter(points[rows & ~rare, 0], points[rows & ~rare, 1], s=4, marker="o",
                     color=color, alpha=0.6, linewidths=0, label=f"{label} ({rows.sum()})")
        if (rows & rare).any():
            axes.scatter(points[rows & rare, 0], points[rows & rare, 1], s=7, marker="^",
                         color=color, alpha=0.8, linewidths=0)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(title="smallest epsilon from which on\nevery model is right (count)",
                fontsize=7, title_fontsize=7, markerscale=3, loc="best")
    axes.set_title(f"Penultimate-layer embeddings, {method}\n"
                   + ("triangles: rotated group; " if rare.any() else "")
                   + HELD_OUT_NOTE, fontsize=9)
    figure.tight_layout()
    return figure


def _epsilon_text(value):
    return "non-private" if math.isinf(value) else f"{value:g}"


def _choose(combinations, facets):
    """The combination named by `facets`, or the one with the largest values."""
    if facets:
        for values, rows in combinations:
            if all(str(values.get(k)) == str(v) for k, v in facets.items()):
                return values, rows
        raise ValueError(f"No runs with {facets}; settings: "
                         f"{[values for values, _ in combinations]}.")
    return max(combinations, key=lambda c: [_sortable(v) for v in c[0].values()])


def _sortable(value):
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, str(value))


def plot_per_class(panels, class_names):
    """Per-class accuracy against epsilon, one panel per `(title, epsilons, [M, K])`."""
    figure = Figure(figsize=(4.6 * len(panels), 4.0))
    FigureCanvasAgg(figure)
    palette = matplotlib.colormaps["tab10"]
    finite = [e for _, eps, _ in panels for e in eps if np.isfinite(e)] or [1.0]
    inf_x = max(finite) * 4
    for p, (title, epsilons, accuracy) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), p + 1)
        x = np.array([inf_x if math.isinf(e) else e for e in epsilons])
        order = np.argsort(x)
        for k, name in enumerate(class_names):
            axes.plot(x[order], accuracy[order, k], "o-", color=palette(k % 10), label=name,
                      markersize=3)
        ticks = sorted(set(x))
        axes.set_xscale("log")
        axes.set_xticks(ticks, [_epsilon_text(inf_x if t == inf_x else t)
                                if t != inf_x else "non-\nprivate" for t in ticks])
        axes.minorticks_off()
        axes.set_xlabel("epsilon")
        axes.set_title(title, fontsize=9)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("test accuracy of the class")
    figure.axes[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def heatmap_cells(table, attribute="orientation", rare="rotated", common="upright"):
    """One row per run: size, rotated share, epsilon, the rare group's accuracy and gap.

    The gap is the common group's accuracy minus the rare group's (positive
    when the rare group trails). EMA weights where the run kept them.

    Returns:
        A DataFrame with columns run, train_examples, rotated_fraction,
        epsilon, weights, rare_accuracy, common_accuracy, gap.
    """
    rows = []
    for _, r in table.iterrows():
        use = _use(r)
        prefix = f"metrics.{use}.groups.{attribute}."
        rare_accuracy = r.get(prefix + f"{rare}.accuracy")
        common_accuracy = r.get(prefix + f"{common}.accuracy")
        rows.append({"run": r["run"],
                     "train_examples": int(r["data.num_train"]),
                     "rotated_fraction": float(r["settings.rotated_fraction"]),
                     "epsilon": epsilon_of(r), "weights": use,
                     "rare_accuracy": rare_accuracy, "common_accuracy": common_accuracy,
                     "gap": common_accuracy - rare_accuracy})
    return pd.DataFrame(rows)


def plot_heatmap(cells):
    """Rare-group accuracy (top row) and its gap (bottom row) per rotated share."""
    shares = sorted(cells["rotated_fraction"].unique())
    sizes = sorted(cells["train_examples"].unique())
    epsilons = sorted(cells["epsilon"].unique())
    figure = Figure(figsize=(3.2 * len(shares) + 1.2, 2.0 + 1.2 * len(sizes) * 2))
    FigureCanvasAgg(figure)
    figure.subplots_adjust(wspace=0.08, hspace=0.45, left=0.08, right=0.88)
    for row, (column, title, cmap, limits) in enumerate((
            ("rare_accuracy", "rotated-group accuracy", "viridis", (0.0, 1.0)),
            ("gap", "gap: upright - rotated accuracy", "magma_r", (0.0, 0.8)))):
        for p, share in enumerate(shares):
            axes = figure.add_subplot(2, len(shares), row * len(shares) + p + 1)
            grid = np.full((len(sizes), len(epsilons)), np.nan)
            for c in cells[cells["rotated_fraction"] == share].itertuples():
                grid[sizes.index(c.train_examples), epsilons.index(c.epsilon)] = getattr(
                    c, column)
            image = axes.imshow(grid, cmap=cmap, vmin=limits[0], vmax=limits[1],
                                aspect="auto", origin="lower")
            for i in range(len(sizes)):
                for j in range(len(epsilons)):
                    if not np.isnan(grid[i, j]):
                        shade = image.norm(grid[i, j])
                        dark = shade < 0.5 if cmap == "viridis" else shade > 0.5
                        axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                                  fontsize=8, color="white" if dark else "black")
            axes.set_xticks(range(len(epsilons)),
                            ["inf" if math.isinf(e) else f"{e:g}" for e in epsilons])
            axes.set_xlabel("epsilon", fontsize=8)
            # Size labels on the first panel only: the panels sit close.
            axes.set_yticks(range(len(sizes)),
                            [f"{s:,}" for s in sizes] if p == 0 else [""] * len(sizes))
            if p == 0:
                axes.set_ylabel("training images", fontsize=8)
            axes.set_title(f"{title}\n{share:.0%} of training images rotated", fontsize=8)
        box = axes.get_position()
        figure.colorbar(image, cax=figure.add_axes([0.9, box.y0, 0.012, box.height]))
    figure.suptitle("Rotated group on held-out test images (the same in every run); "
                    "EMA weights where kept", fontsize=9)
    return figure


def _run_page(row, use):
    """Markdown of one run's per-group table, from its result.json figures."""
    lines = [f"# {row['run']}", "", f"Weights: {use}. {row.get('privacy.statement', '')}", "",
             "| attribute | group | count | accuracy | AUC | error | TPR (mean) | FPR (mean) "
             "| ECE |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    prefix = f"metrics.{use}.groups."
    groups = sorted({tuple(c[len(prefix):].split(".")[:2]) for c in row.index
                     if c.startswith(prefix) and c.endswith(".count")})

    def cell(name, interval=True):
        value = row.get(name)
        if value is None or pd.isna(value):
            return ""
        text = f"{value:.3f}"
        if interval and not pd.isna(row.get(name + "_low")):
            text += f" [{row[name + '_low']:.3f}, {row[name + '_high']:.3f}]"
        return text

    for attribute, group in groups:
        base = f"{prefix}{attribute}.{group}."
        rates = f"metrics.{use}.rates.groups.{attribute}.{group}."
        lines.append(f"| {attribute} | {group} | {int(row[base + 'count'])} | "
                     f"{cell(base + 'accuracy')} | {cell(base + 'auc')} | "
                     f"{cell(rates + 'error', False)} | {cell(rates + 'tpr', False)} | "
                     f"{cell(rates + 'fpr', False)} | {cell(rates + 'ece', False)} |")
    lines += ["", "Held-out test split; intervals: 95% bootstrap, resampled within each "
              "group. Error and ECE: top-1 (multi-class); TPR and FPR: means over classes."]
    return "\n".join(lines) + "\n"


def _rare_mask(table, groups, attribute, rare):
    """Bool `[N]`: test examples of the rare group, or None without it."""
    column = f"data.groups.{attribute}"
    if attribute not in groups or column not in table:
        return None
    names = list(table[column].iloc[0])
    return groups[attribute] == names.index(rare) if rare in names else None


def _sensitivity_section(sweep_dir, table, keys, out_dir, facets, projection, count,
                         rare_group):
    """Sensitivity CSV, image grids, projection and per-class figure; Markdown lines."""
    scores, labels, groups = load_run_predictions(sweep_dir, table)
    rare = _rare_mask(table, groups, *rare_group[:2])
    combinations = facet_combinations(table, keys)
    per_example = pd.DataFrame({"label": labels, **{f"group_{a}": v for a, v in groups.items()}})
    levels = []
    sensitivities = {}
    for values, rows in combinations:
        correct = np.stack([scores[run].argmax(axis=1) == labels for run in rows["run"]])
        sensitivity = privacy_sensitivity(correct, _epsilons(rows))
        sensitivities[_facet_text(values)] = sensitivity
        per_example[f"sensitivity ({_facet_text(values)})"] = [
            sensitivity_label(v) for v in sensitivity]
        for label in dict.fromkeys(sensitivity_label(v) for v in np.sort(sensitivity)):
            hits = np.array([sensitivity_label(v) == label for v in sensitivity])
            entry = {**values, "smallest epsilon (from which on every model is right)": label,
                     "share of test examples": hits.mean()}
            if rare is not None:
                entry["share of rotated"] = hits[rare].mean()
                entry["share of upright"] = hits[~rare].mean()
            levels.append(entry)
    paths = {"sensitivity": os.path.join(out_dir, "privacy_sensitivity.csv")}
    per_example.to_csv(paths["sensitivity"], index_label="test_index")
    chosen, rows = _choose(combinations, facets)
    sensitivity = sensitivities[_facet_text(chosen)]
    levels = pd.DataFrame(levels)
    shown = levels
    for key, value in chosen.items():
        shown = shown[shown[key].astype(str) == str(value)]
    lines = ["## Which test examples privacy costs first", "",
             f"Setting shown: **{_facet_text(chosen)}** (every setting is in "
             "`privacy_sensitivity.csv`, one column per setting). Each test example's "
             "sensitivity is the smallest epsilon of the sweep from which on every model "
             "classifies it correctly (at that epsilon and every larger one; several runs "
             "at one epsilon vote); 'never' when even the largest epsilon gets it wrong. "
             f"All images are {HELD_OUT_NOTE}.", "",
             reports.to_markdown(shown.drop(columns=list(chosen)).reset_index(drop=True))]
    images, class_names = load_test_images(os.path.join(sweep_dir, rows["run"].iloc[0]))
    probability = np.mean([scores[run][np.arange(len(labels)), labels] for run in rows["run"]],
                          axis=0)
    ranking = rank_examples(sensitivity, probability, labels, count)
    figure = plot_image_grid(images, ranking, class_names, sensitivity, rare, count)
    paths["sensitivity_grid"] = os.path.join(out_dir, "privacy_sensitive_examples.png")
    figure.savefig(paths["sensitivity_grid"], dpi=80)
    lines += ["", "Most (left) and least (right) privacy-sensitive test images of each "
              "class; ties broken by the mean probability of the true class over the "
              "setting's models:", "", "![](privacy_sensitive_examples.png)", ""]
    largest = rows["run"].iloc[int(np.argmax(_epsilons(rows)))]
    embeddings = penultimate_embeddings(os.path.join(sweep_dir, largest), images)
    points, method = project(embeddings, projection or default_projection())
    figure = plot_projection(points, sensitivity, method, rare)
    paths["sensitivity_projection"] = os.path.join(out_dir, "sensitivity_projection.png")
    figure.savefig(paths["sensitivity_projection"], dpi=90)
    lines += [f"Penultimate-layer embeddings of the test images under the model of the "
              f"largest epsilon ({largest}, raw weights), projected to 2-D with {method}, "
              "coloured by sensitivity:", "", "![](sensitivity_projection.png)", ""]

    first = next(iter(chosen), None)
    panels, table_rows = [], []
    # Panels in increasing order of the first setting (the table is in run-name order).
    ordered = sorted(combinations, key=lambda c: [_sortable(v) for v in c[0].values()])
    for values, group_rows in ordered:
        if any(str(values[k]) != str(chosen[k]) for k in chosen if k != first):
            continue
        accuracy = np.stack([per_class_accuracy(scores[run], labels, len(class_names))
                             for run in group_rows["run"]])
        epsilons = _epsilons(group_rows)
        panels.append((_facet_text(values), epsilons, accuracy))
        for e, values_k in zip(epsilons, accuracy):
            table_rows.append({**values, "epsilon": _epsilon_text(e),
                               **dict(zip(class_names, values_k))})
    figure = plot_per_class(panels, class_names)
    paths["per_class"] = os.path.join(out_dir, "per_class_accuracy.png")
    figure.savefig(paths["per_class"], dpi=90)
    per_class = pd.DataFrame(table_rows)
    paths["per_class_csv"] = os.path.join(out_dir, "per_class_accuracy.csv")
    per_class.to_csv(paths["per_class_csv"], index=False)
    lines += ["## Per-class accuracy against epsilon", "",
              "Test accuracy of each class (EMA weights where kept); one panel per "
              f"value of {first or 'the sweep'}:", "", "![](per_class_accuracy.png)", "",
              reports.to_markdown(per_class)]
    return paths, lines


def _heatmap_section(table, out_dir, rare_group):
    """Heatmap figure, its CSV, per-run pages and linked Markdown tables."""
    cells = heatmap_cells(table, *rare_group)
    paths = {"heatmap": os.path.join(out_dir, "subgroup_heatmap.png"),
             "heatmap_csv": os.path.join(out_dir, "subgroup_heatmap.csv")}
    plot_heatmap(cells).savefig(paths["heatmap"], dpi=90)
    cells.to_csv(paths["heatmap_csv"], index=False)
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    for _, row in table.iterrows():
        with open(os.path.join(out_dir, "runs", f"{row['run']}.md"), "w") as f:
            f.write(_run_page(row, _use(row)))
    lines = ["## The subgroup heatmap", "",
             f"Accuracy of the {rare_group[1]} test images and, in brackets, the gap "
             f"({rare_group[2]} minus {rare_group[1]}) for every training-set size, "
             "epsilon and share of rotated training images. Each cell links to its run's "
             "per-group table.", "", "![](subgroup_heatmap.png)", ""]
    epsilons = sorted(cells["epsilon"].unique())
    for share in sorted(cells["rotated_fraction"].unique()):
        lines += [f"**{share:.0%} of training images rotated**", "",
                  "| training images | " + " | ".join(
                      f"epsilon {_epsilon_text(e)}" for e in epsilons) + " |",
                  "| ---: |" + " --- |" * len(epsilons)]
        for size in sorted(cells["train_examples"].unique()):
            found = cells[(cells["rotated_fraction"] == share)
                          & (cells["train_examples"] == size)].set_index("epsilon")
            entries = []
            for e in epsilons:
                if e not in found.index:
                    entries.append("")
                    continue
                c = found.loc[e]
                entries.append(f"[{c['rare_accuracy']:.3f} ({c['gap']:.3f})]"
                               f"(runs/{c['run']}.md)")
            lines.append(f"| {size:,} | " + " | ".join(entries) + " |")
        lines.append("")
    return paths, lines


def write_explorable(sweep_dir, table, keys, out_dir, *, facets=None, projection=None,
                     count=6, rare_group=("orientation", "rotated", "upright")):
    """Writes the explorable's figures that the sweep's axes allow.

    Args:
        sweep_dir: the sweep folder.
        table, keys: from `report_lib.load_sweep`.
        out_dir: report folder.
        facets: dict setting -> value choosing the runs of the image grids,
            the projection and the per-class figure (default: the largest
            value of every setting but epsilon and seed).
        projection: "umap", "pca" or "tsne" (default: UMAP where umap-learn
            is installed, else PCA).
        count: images per class in each grid.
        rare_group: (attribute, rare group, common group) of the heatmap.

    Returns:
        `(paths, lines)`: dict name -> file written, and Markdown lines for
        the sweep report (empty when no figure applies: multi-label data,
        or a single epsilon).

    Raises:
        ValueError: runs evaluated on different test examples, or `facets`
            naming no run.
    """
    if bool(table["data.multi_label"].iloc[0]) or len(set(_epsilons(table))) < 2:
        return {}, []
    paths, lines = _sensitivity_section(sweep_dir, table, keys, out_dir, facets, projection,
                                        count, rare_group)
    axes_present = {"rotated_fraction"} <= set(keys)
    group_columns = f"metrics.raw.groups.{rare_group[0]}.{rare_group[1]}.accuracy"
    if axes_present and group_columns in table:
        heatmap_paths, heatmap_lines = _heatmap_section(table, out_dir, rare_group)
        paths.update(heatmap_paths)
        lines += [""] + heatmap_lines
    return paths, lines
