"""HParams table and private vs non-private comparison of a sweep of runs.

A sweep directory holds one log directory per run, each written by
`callback.FairnessDashboard` (e.g. `sweep/eps1`, `sweep/eps8`,
`sweep/non_private`); point TensorBoard at the sweep directory.

- `write_hparams_config(sweep_dir)` writes the HParams experiment config:
  the settings of `layout.run_hparams` with the values the runs used as
  domains, and the final overall AUC, worst-group AUC and gap of each
  attribute (current and EMA weights) and epsilon as metrics, so the table
  and parallel-coordinates views compare the sweep.
- `read_sweep(sweep_dir, attribute)` reads each run's settings and final
  figures back from the event files.
- `write_sweep_comparison(sweep_dir, results, attribute)` writes the image
  `gap_vs_auc/<attribute>` (run `sweep_comparison`): gap against overall
  AUC, private runs labelled by epsilon, non-private runs marked apart, the
  comparison of Berrada et al. (2023) at a glance.
"""

import math
import os

import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from tf_dpfair.dashboards import summaries

SWEEP_RUN = "sweep_comparison"
SWEEP_IMAGE_PREFIX = "gap_vs_auc/"
_RESULT_KEYS = ("private", "epsilon", "auc", "gap")


def _load(path):
    accumulator = event_accumulator.EventAccumulator(path)
    accumulator.Reload()
    return accumulator


def _last(accumulator, tag):
    """Last value of scalar `tag` in a run, or None if it has none."""
    if accumulator is None or tag not in accumulator.Tags()["tensors"]:
        return None
    return float(tensor_util.make_ndarray(accumulator.Tensors(tag)[-1].tensor_proto).item())


def _session_values(accumulator):
    """The HParams values a run recorded, or None if it recorded none."""
    content = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME).get(
        hparams_metadata.SESSION_START_INFO_TAG)
    if content is None:
        return None
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


def _sessions(sweep_dir):
    """(run name, hparams, {run: accumulator}) of every dashboard run under `sweep_dir`."""
    found = []
    for directory, subdirs, _ in sorted(tf.io.gfile.walk(sweep_dir)):
        if summaries.FAIRNESS_RUN not in subdirs:
            continue
        values = _session_values(_load(directory))
        if values is None:
            continue
        runs = {run: _load(os.path.join(directory, run))
                for run in (summaries.FAIRNESS_RUN, summaries.EMA_RUN) if run in subdirs}
        found.append((os.path.relpath(directory, sweep_dir), values, runs))
    return found


def read_sweep(sweep_dir, attribute, *, ema=None):
    """Settings and final figures of each run of a sweep.

    Args:
        sweep_dir: the directory holding the runs' log directories.
        attribute: the attribute whose gap and worst group are read.
        ema: True for the EMA weights' figures, False for the current
            weights', None for EMA where a run has them.

    Returns:
        A list of dicts, one per run with HParams: `name` (its directory
        relative to `sweep_dir`), `hparams`, `private`, `epsilon` (final,
        inf for a non-private run), `auc`, `gap`, `worst` (NaN when not
        logged) and `weights` ("ema" or "current").
    """
    results = []
    for name, values, runs in _sessions(sweep_dir):
        use_ema = ema if ema is not None else _last(runs.get(summaries.EMA_RUN), "auc") is not None
        run = runs.get(summaries.EMA_RUN if use_ema else summaries.FAIRNESS_RUN)
        private = bool(values.get("private", False))
        epsilon = _last(runs[summaries.FAIRNESS_RUN], summaries.EPSILON_TAG)
        figures = {key: _last(run, tag) for key, tag in (
            ("auc", "auc"), ("gap", f"auc_gap/{attribute}"), ("worst", f"auc_worst/{attribute}"))}
        results.append({
            "name": name, "hparams": values, "private": private,
            "epsilon": epsilon if private and epsilon is not None else math.inf,
            **{key: math.nan if value is None else value for key, value in figures.items()},
            "weights": "ema" if use_ema else "current"})
    return results


def _domain(values):
    """A Discrete domain of the values runs used, or None if their types differ."""
    kinds = {type(v) for v in values}
    if len(kinds) != 1:
        return None
    return hp.Discrete(sorted(set(values)))


def write_hparams_config(sweep_dir):
    """Writes the HParams experiment config of a sweep into `sweep_dir`.

    Run it once the runs have started (it reads their recorded settings and
    attributes); running it again replaces the config.

    Args:
        sweep_dir: the directory holding the runs' log directories.

    Returns:
        `(hparams, metrics)`: the `hp.HParam` and `hp.Metric` lists written.

    Raises:
        ValueError: no run under `sweep_dir` has a dashboard and HParams.
    """
    sessions = _sessions(sweep_dir)
    if not sessions:
        raise ValueError(f"No FairnessDashboard runs with HParams under {sweep_dir!r}.")
    values = {}
    attributes = []
    for _, session_values, runs in sessions:
        for key, value in session_values.items():
            values.setdefault(key, []).append(value)
        for tag in runs[summaries.FAIRNESS_RUN].Tags()["tensors"]:
            parts = tag.split("/")
            if parts[0] == "auc_gap" and len(parts) == 2 and parts[1] not in attributes:
                attributes.append(parts[1])
    hparams = [hp.HParam(name, _domain(vals)) for name, vals in values.items()]
    metrics = [hp.Metric(summaries.EPSILON_TAG, group=summaries.FAIRNESS_RUN,
                         display_name="epsilon spent")]
    for run, weights in ((summaries.FAIRNESS_RUN, ""), (summaries.EMA_RUN, "EMA ")):
        metrics.append(hp.Metric("auc", group=run, display_name=f"{weights}overall AUC"))
        for attribute in attributes:
            metrics += [
                hp.Metric(f"auc_worst/{attribute}", group=run,
                          display_name=f"{weights}worst-group AUC ({attribute})"),
                hp.Metric(f"auc_gap/{attribute}", group=run,
                          display_name=f"{weights}AUC gap ({attribute})")]
    writer = tf.summary.create_file_writer(sweep_dir)
    with writer.as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()
    return hparams, metrics


def plot_sweep(results, attribute):
    """Draws disparity against overall AUC for private and non-private runs.

    Args:
        results: a list of dicts with `private` (bool), `epsilon`, `auc` and
            `gap` (the max - min group AUC of `attribute`), and optionally
            `name`; e.g. from `read_sweep`.
        attribute: the attribute the gaps are of (for the labels).

    Returns:
        A `matplotlib.figure.Figure` on an Agg canvas.

    Raises:
        ValueError: no results, or a result lacks one of the keys.
    """
    if not results:
        raise ValueError("results is empty: nothing to compare.")
    for result in results:
        missing = [key for key in _RESULT_KEYS if key not in result]
        if missing:
            raise ValueError(f"A result lacks {missing}; each needs {list(_RESULT_KEYS)}: "
                             f"{result!r}.")
    figure = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    private = [r for r in results if r["private"]]
    public = [r for r in results if not r["private"]]
    if private:
        axes.scatter([r["auc"] for r in private], [r["gap"] for r in private], s=60,
                     color="tab:blue", zorder=3, label="private")
        for r in private:
            axes.annotate(f"eps={r['epsilon']:.3g}", (r["auc"], r["gap"]), fontsize=8,
                          xytext=(5, 4), textcoords="offset points")
    if public:
        axes.scatter([r["auc"] for r in public], [r["gap"] for r in public], marker="s",
                     color="black", s=50, zorder=3, label="non-private")
        for r in public:
            axes.annotate(str(r.get("name", "")), (r["auc"], r["gap"]), fontsize=8,
                          xytext=(5, -10), textcoords="offset points")
    axes.set_xlabel("overall AUC (held-out)")
    axes.set_ylabel(f"AUC gap by {attribute} (max - min group)")
    axes.set_title(f"Disparity vs accuracy by {attribute}: compare runs of equal AUC",
                   fontsize=10)
    axes.margins(0.2)  # Room for the point labels.
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def write_sweep_comparison(sweep_dir, results, attribute, *, step=0):
    """Writes `plot_sweep` as the image `gap_vs_auc/<attribute>` of the sweep.

    Args:
        sweep_dir: the sweep directory; the image goes to run `sweep_comparison`.
        results: as for `plot_sweep`.
        attribute: the attribute the gaps are of.
        step: the step of the image.

    Returns:
        The image tag.

    Raises:
        ValueError: as for `plot_sweep`.
    """
    image = summaries.figure_to_image(plot_sweep(results, attribute))
    tag = SWEEP_IMAGE_PREFIX + attribute
    writer = tf.summary.create_file_writer(os.path.join(sweep_dir, SWEEP_RUN))
    with writer.as_default():
        tf.summary.image(tag, image, step=step)
    writer.close()
    return tag
