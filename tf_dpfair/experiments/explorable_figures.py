"""The figures of the PAIR explorable (`explorable_lib`), drawn with matplotlib.

Image grids of the most and least privacy-sensitive test images, the
embedding projection coloured by sensitivity, per-class accuracy against
epsilon, and the subgroup heatmap. Each function takes numbers already
computed (`explorable_lib`) and returns a `matplotlib.figure.Figure`; none
reads files.
"""

import math
import warnings

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HELD_OUT_NOTE = "held-out test images (not training data)"


def sensitivity_label(value):
    """'never' for NaN, 'inf' (non-private), or the epsilon as text."""
    if np.isnan(value):
        return "never"
    return "inf" if math.isinf(value) else f"{value:g}"


def epsilon_text(value):
    """'non-private' for inf, else the epsilon as text."""
    return "non-private" if math.isinf(value) else f"{value:g}"


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


def _mean_per_epsilon(x, accuracy):
    """Distinct x, ascending, and the mean accuracy of the runs at each: `[E]`, `[E, K]`."""
    levels = np.unique(x)
    with warnings.catch_warnings():  # A class no run at a level saw stays NaN.
        warnings.simplefilter("ignore", RuntimeWarning)
        return levels, np.stack([np.nanmean(accuracy[x == v], axis=0) for v in levels])


def plot_per_class(panels, class_names):
    """Per-class accuracy against epsilon, one panel per `(title, epsilons, [M, K])`.

    Several runs at one epsilon (seeds): the line joins their means, and each
    run is a dot.
    """
    figure = Figure(figsize=(4.6 * len(panels), 4.0))
    FigureCanvasAgg(figure)
    palette = matplotlib.colormaps["tab10"]
    finite = [e for _, eps, _ in panels for e in eps if np.isfinite(e)] or [1.0]
    inf_x = max(finite) * 4
    for p, (title, epsilons, accuracy) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), p + 1)
        x = np.array([inf_x if math.isinf(e) else e for e in epsilons])
        levels, means = _mean_per_epsilon(x, np.asarray(accuracy, dtype=float))
        several = len(levels) < len(x)
        for k, name in enumerate(class_names):
            color = palette(k % 10)
            axes.plot(levels, means[:, k], "o-", color=color, label=name, markersize=3)
            if several:
                axes.scatter(x, accuracy[:, k], s=10, color=color, alpha=0.5, linewidths=0)
        axes.set_xscale("log")
        axes.set_xticks(levels, [epsilon_text(t) if t != inf_x else "non-\nprivate"
                                 for t in levels])
        axes.minorticks_off()
        axes.set_xlabel("epsilon")
        axes.set_title(title + ("\nline: mean over runs; dots: runs" if several else ""),
                       fontsize=9)
        axes.set_ylim(0, 1)
        axes.grid(alpha=0.3)
    figure.axes[0].set_ylabel("test accuracy of the class")
    figure.axes[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return figure


def plot_heatmap(cells):
    """Rare-group accuracy (top row) and its gap (bottom row) per rotated share.

    Args:
        cells: one row per (rotated_fraction, train_examples, epsilon) with
            rare_accuracy and gap (`explorable_analysis.heatmap_means`).
    """
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
    figure.suptitle("Rotated group on held-out test images; EMA weights where kept; "
                    "several runs (seeds) in a cell: their mean", fontsize=9)
    return figure
