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

Every figure is of the held-out test split; training images are never
shown. Runs need not share their test examples (with `test_examples` > 0 or
a rotated test share, each seed draws its own): per-example figures are
computed within each group of runs that scored the same examples
(`group_by_test_split`, checked on the saved labels and groups and on the
settings that draw the split), never across; per-run figures (per-class
accuracy, the heatmap) take every run, each on its own split. Models are
read with EMA weights where a run kept them (private runs), raw weights
otherwise, as in `report_lib`'s summary.

This module writes the report (CSV, figures, Markdown); the numbers are
computed in `explorable_analysis` and the figures drawn in
`explorable_figures`, whose public names are importable from here too.
"""

import os

import numpy as np
import pandas as pd

from tf_dpfair.experiments.explorable_analysis import (  # noqa: F401 (re-exported)
    NEVER, PROJECTIONS, RunPredictions, _epsilons, _facet_text, _load_settings, _use,
    default_projection, epsilon_of, facet_combinations, group_by_test_split, heatmap_cells,
    heatmap_means, load_run_predictions, load_test_images, penultimate_embeddings,
    per_class_accuracy, privacy_sensitivity, project, rank_examples, split_settings)
from tf_dpfair.experiments.explorable_figures import (  # noqa: F401 (re-exported)
    HELD_OUT_NOTE, plot_heatmap, plot_image_grid, plot_per_class, plot_projection,
    sensitivity_label)
from tf_dpfair.experiments.explorable_figures import epsilon_text as _epsilon_text
from tf_dpfair.fairness import auc_report


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


def _sensitivity_units(combinations, splits):
    """`[(facet values, split name, rows)]`: each setting's runs, by test split."""
    split_of = {run: name for name, runs in splits for run in runs}
    units = []
    for values, rows in combinations:
        names = rows["run"].map(split_of)
        units += [(values, name, rows[names == name]) for name in dict.fromkeys(names)]
    return units


def _level_shares(values, split, sensitivity, rare):
    """Share of the split's test examples (and of each group) at each level."""
    entries = []
    labels = np.array([sensitivity_label(v) for v in sensitivity])
    for label in dict.fromkeys(sensitivity_label(v) for v in np.sort(sensitivity)):
        hits = labels == label
        entry = {**values, "test split": split,
                 "smallest epsilon (from which on every model is right)": label,
                 "share of test examples": hits.mean()}
        if rare is not None:
            entry["share of rotated"] = hits[rare].mean()
            entry["share of upright"] = hits[~rare].mean()
        entries.append(entry)
    return entries


def _sensitivities(table, units, predictions, splits, rare_group):
    """Each unit's per-example sensitivity, the per-example frames and the level shares.

    Examples of one split are only ever scored by that split's runs: the
    runs of a unit share their test examples, so their votes are per example.

    Returns:
        `(sensitivity, frames, levels)`: dict (facet text, split) -> `[N]`;
        dict split -> DataFrame (a row per test example, label, groups, a
        column per setting that scored the split); DataFrame of level shares.
    """
    frames = {}
    for name, runs in splits:
        first = predictions[runs[0]]
        frames[name] = pd.DataFrame({"label": first.labels, **{
            f"group_{a}": v for a, v in first.groups.items()}})
    sensitivity, levels = {}, []
    for values, split, rows in units:
        first = predictions[rows["run"].iloc[0]]
        correct = np.stack([predictions[r].scores.argmax(axis=1) == first.labels
                            for r in rows["run"]])
        found = privacy_sensitivity(correct, _epsilons(rows))
        sensitivity[(_facet_text(values), split)] = found
        frames[split][f"sensitivity ({_facet_text(values)})"] = [
            sensitivity_label(v) for v in found]
        levels += _level_shares(values, split, found,
                                _rare_mask(table, first.groups, *rare_group[:2]))
    levels = pd.DataFrame(levels)
    if len(splits) == 1:
        levels = levels.drop(columns="test split")
    return sensitivity, frames, levels


def _write_per_example(frames, path):
    """`privacy_sensitivity.csv`: one row per test example (per split if several)."""
    if len(frames) == 1:
        next(iter(frames.values())).to_csv(path, index_label="test_index")
        return
    frame = pd.concat(frames.values(), keys=list(frames), names=["test_split", "test_index"],
                      sort=False)
    frame.to_csv(path)


def _split_note(splits, shown):
    """The report's line on several test splits; [] for one."""
    if len(splits) == 1:
        return []
    return [f"The runs scored {len(splits)} different test splits "
            f"({'; '.join(name for name, _ in splits)}): the seed draws the test examples "
            "where test_examples > 0 or a rotated test share is set. Per-example figures "
            "never mix splits: each example's sensitivity comes from the runs that scored "
            "it (runs at one epsilon vote only within a split; `privacy_sensitivity.csv` "
            f"has a row per example of each split), and the images and projection below "
            f"are of the split **{shown}** only.", ""]


def _example_figures(sweep_dir, rows, prediction_of, sensitivity, rare, out_dir,
                     projection, count):
    """Image grids and the embedding projection of one split's runs; Markdown lines."""
    labels = prediction_of(rows["run"].iloc[0]).labels
    images, class_names = load_test_images(os.path.join(sweep_dir, rows["run"].iloc[0]),
                                           expected_labels=labels)
    probability = np.mean([prediction_of(run).scores[np.arange(len(labels)), labels]
                           for run in rows["run"]], axis=0)
    ranking = rank_examples(sensitivity, probability, labels, count)
    figure = plot_image_grid(images, ranking, class_names, sensitivity, rare, count)
    paths = {"sensitivity_grid": os.path.join(out_dir, "privacy_sensitive_examples.png")}
    figure.savefig(paths["sensitivity_grid"], dpi=80)
    lines = ["", "Most (left) and least (right) privacy-sensitive test images of each "
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
    return paths, lines, class_names


def _per_class_section(combinations, chosen, predictions, class_names, out_dir):
    """Per-class accuracy of every run (each on its own test split); Markdown lines."""
    first = next(iter(chosen), None)
    panels, table_rows = [], []
    # Panels in increasing order of the first setting (the table is in run-name order).
    ordered = sorted(combinations, key=lambda c: [_sortable(v) for v in c[0].values()])
    for values, group_rows in ordered:
        if any(str(values[k]) != str(chosen[k]) for k in chosen if k != first):
            continue
        accuracy = np.stack([per_class_accuracy(predictions[run].scores,
                                                predictions[run].labels, len(class_names))
                             for run in group_rows["run"]])
        epsilons = _epsilons(group_rows)
        panels.append((_facet_text(values), epsilons, accuracy))
        for run, e, values_k in zip(group_rows["run"], epsilons, accuracy):
            table_rows.append({"run": run, **values, "epsilon": _epsilon_text(e),
                               **dict(zip(class_names, values_k))})
    paths = {"per_class": os.path.join(out_dir, "per_class_accuracy.png"),
             "per_class_csv": os.path.join(out_dir, "per_class_accuracy.csv")}
    plot_per_class(panels, class_names).savefig(paths["per_class"], dpi=90)
    per_class = pd.DataFrame(table_rows)
    per_class.to_csv(paths["per_class_csv"], index=False)
    lines = ["## Per-class accuracy against epsilon", "",
             "Test accuracy of each class (EMA weights where kept), one row per run on "
             "the test examples it scored; where several runs (seeds) share an epsilon, "
             "the figure's line is their mean and the dots are the runs. One panel per "
             f"value of {first or 'the sweep'}:", "", "![](per_class_accuracy.png)", "",
             auc_report.to_markdown(per_class)]
    return paths, lines


def _sensitivity_section(sweep_dir, table, keys, out_dir, facets, projection, count,
                         rare_group):
    """Sensitivity CSV, image grids, projection and per-class figure; Markdown lines."""
    predictions = load_run_predictions(sweep_dir, table)
    splits = group_by_test_split(table, predictions)
    combinations = facet_combinations(table, keys)
    sensitivity, frames, levels = _sensitivities(
        table, _sensitivity_units(combinations, splits), predictions, splits, rare_group)
    paths = {"sensitivity": os.path.join(out_dir, "privacy_sensitivity.csv")}
    _write_per_example(frames, paths["sensitivity"])
    chosen, rows = _choose(combinations, facets)
    split_of = {run: name for name, runs in splits for run in runs}
    names = list(rows["run"].map(split_of))
    split = max(dict.fromkeys(names), key=names.count)  # The split most runs scored.
    rows = rows[[name == split for name in names]]
    shown = levels
    for key, value in {**chosen, "test split": split}.items():
        if key in shown:
            shown = shown[shown[key].astype(str) == str(value)].drop(columns=key)
    lines = ["## Which test examples privacy costs first", "",
             f"Setting shown: **{_facet_text(chosen)}** (every setting is in "
             "`privacy_sensitivity.csv`, one column per setting). Each test example's "
             "sensitivity is the smallest epsilon of the sweep from which on every model "
             "classifies it correctly (at that epsilon and every larger one; several runs "
             "at one epsilon vote); 'never' when even the largest epsilon gets it wrong. "
             f"All images are {HELD_OUT_NOTE}.", "", *_split_note(splits, split),
             auc_report.to_markdown(shown.reset_index(drop=True))]
    found = sensitivity[(_facet_text(chosen), split)]
    rare = _rare_mask(table, predictions[rows["run"].iloc[0]].groups, *rare_group[:2])
    figure_paths, figure_lines, class_names = _example_figures(
        sweep_dir, rows, predictions.get, found, rare, out_dir, projection, count)
    paths.update(figure_paths)
    per_class_paths, per_class_lines = _per_class_section(combinations, chosen, predictions,
                                                          class_names, out_dir)
    paths.update(per_class_paths)
    return paths, lines + figure_lines + per_class_lines


def _heatmap_entry(cell):
    """A heatmap table cell: the figures, linked to the run's page (each run's if several)."""
    text = f"{cell['rare_accuracy']:.3f} ({cell['gap']:.3f})"
    if len(cell["runs"]) == 1:
        return f"[{text}](runs/{cell['runs'][0]}.md)"
    return f"{text}: " + ", ".join(f"[seed {seed}](runs/{run}.md)"
                                   for run, seed in zip(cell["runs"], cell["seeds"]))


def _heatmap_section(table, out_dir, rare_group):
    """Heatmap figure, its CSV, per-run pages and linked Markdown tables."""
    cells = heatmap_cells(table, *rare_group)
    paths = {"heatmap": os.path.join(out_dir, "subgroup_heatmap.png"),
             "heatmap_csv": os.path.join(out_dir, "subgroup_heatmap.csv")}
    means = heatmap_means(cells)
    plot_heatmap(means).savefig(paths["heatmap"], dpi=90)
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
    if len(means) < len(cells):
        lines += ["Cells with several runs (seeds) show the mean of their runs' figures, "
                  "each on the test examples that run scored.", ""]
    epsilons = sorted(means["epsilon"].unique())
    for share in sorted(means["rotated_fraction"].unique()):
        lines += [f"**{share:.0%} of training images rotated**", "",
                  "| training images | " + " | ".join(
                      f"epsilon {_epsilon_text(e)}" for e in epsilons) + " |",
                  "| ---: |" + " --- |" * len(epsilons)]
        for size in sorted(means["train_examples"].unique()):
            found = means[(means["rotated_fraction"] == share)
                          & (means["train_examples"] == size)].set_index("epsilon")
            entries = [_heatmap_entry(found.loc[e]) if e in found.index else ""
                       for e in epsilons]
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
        ValueError: `facets` naming no run, or a run whose settings draw
            another test split than its saved predictions are of.
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
