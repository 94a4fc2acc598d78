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

This module writes the report (CSV, figures, Markdown); the numbers are
computed in `explorable_analysis` and the figures drawn in
`explorable_figures`, whose public names are importable from here too.
"""

import os

import numpy as np
import pandas as pd

from tf_dpfair.experiments.explorable_analysis import (  # noqa: F401 (re-exported)
    NEVER, PROJECTIONS, _epsilons, _facet_text, _load_settings, _use,
    default_projection, epsilon_of, facet_combinations, heatmap_cells,
    load_run_predictions, load_test_images, penultimate_embeddings,
    per_class_accuracy, privacy_sensitivity, project, rank_examples)
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
             auc_report.to_markdown(shown.drop(columns=list(chosen)).reset_index(drop=True))]
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
              auc_report.to_markdown(per_class)]
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
