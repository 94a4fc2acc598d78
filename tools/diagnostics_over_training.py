"""Per-group training diagnostics over training, beside the test accuracy gap.

For every private run of the given sweep folders (runs made with
`group_diagnostics`), reads each evaluation period's diagnostics from the
run's TensorBoard logs (`tensorboard/train_diagnostics`) and the test
accuracy of each group from its checkpoints (`checkpoints/epoch_*.npz`, EMA
scores where kept), and draws one row per epsilon: the clip fraction and the
median pre-clip gradient norm of each group, and the test accuracy gap
(other group minus designated group), against updates. Repeats of a sweep
are drawn as separate lines.

Usage:
  python tools/diagnostics_over_training.py --runs=/tmp/ft/run0,/tmp/ft/run1 \\
      --out=docs/pretrained_finetune_study/diagnostics_over_training.png
"""

import argparse
import glob
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402


def diagnostics(run_dir, attribute, group):
    """{figure: [(update, value)]} of one group, from the run's event files."""
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "train_diagnostics",
                                              "events*"))):
        events = event_accumulator.EventAccumulator(
            path, size_guidance={event_accumulator.TENSORS: 0})
        events.Reload()
        for figure in ("clip_fraction", "grad_norm_p50"):
            tag = f"train_diagnostics/{attribute}/{group}/{figure}"
            if tag in events.Tags()["tensors"]:
                found.setdefault(figure, []).extend(
                    (e.step, float(np.asarray(
                        tensor_util.make_ndarray(e.tensor_proto))))
                    for e in events.Tensors(tag))
    return {k: sorted(v) for k, v in found.items()}


def accuracy_gaps(run_dir, attribute, group_ids):
    """[(update, accuracy of group_ids[1] minus that of group_ids[0])] per checkpoint."""
    labels = np.load(os.path.join(run_dir, "checkpoints", "labels.npz"))
    groups = labels[f"group_{attribute}"]
    points = []
    for path in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.npz"))):
        checkpoint = np.load(path)
        scores = checkpoint["ema_scores"] if "ema_scores" in checkpoint else checkpoint["scores"]
        right = scores.argmax(axis=1) == labels["labels"]
        accuracy = [right[groups == g].mean() for g in group_ids]
        points.append((int(checkpoint["updates"]), accuracy[1] - accuracy[0]))
    return points


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="comma-separated sweep folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--attribute", default="orientation")
    parser.add_argument("--group", default="rotated")
    parser.add_argument("--others", default="upright")
    args = parser.parse_args()
    by_epsilon = {}
    for sweep in args.runs.split(","):
        for run_dir in sorted(glob.glob(os.path.join(sweep, "epsilon=*"))):
            with open(os.path.join(run_dir, "result.json")) as f:
                result = json.load(f)
            if not result["privacy"]["private"]:
                continue
            epsilon = float(result["settings"]["epsilon"])
            names = result["data"]["groups"][args.attribute]
            group_ids = [names.index(args.group), names.index(args.others)]
            by_epsilon.setdefault(epsilon, []).append(
                (diagnostics(run_dir, args.attribute, args.group),
                 diagnostics(run_dir, args.attribute, args.others),
                 accuracy_gaps(run_dir, args.attribute, group_ids)))
    epsilons = sorted(by_epsilon)
    figure, axes = plt.subplots(len(epsilons), 3, figsize=(12, 2.6 * len(epsilons)),
                                squeeze=False)
    for row, epsilon in zip(axes, epsilons):
        for repeat, (mine, theirs, gaps) in enumerate(by_epsilon[epsilon]):
            for ax, figure_name in zip(row[:2], ("clip_fraction", "grad_norm_p50")):
                for data, colour, name in ((mine, "tab:red", args.group),
                                           (theirs, "tab:blue", args.others)):
                    steps, values = zip(*data[figure_name])
                    ax.plot(steps, values, color=colour, marker="o", alpha=0.7,
                            label=name if repeat == 0 else None)
            steps, values = zip(*gaps)
            row[2].plot(steps, values, color="black", marker="o", alpha=0.7)
        label = "inf" if not math.isfinite(epsilon) else f"{epsilon:g}"
        row[0].set_ylabel(f"epsilon {label}")
        row[0].set_title("clip fraction (training)")
        row[1].set_title("median gradient norm / C (training)")
        row[1].set_yscale("log")
        row[2].set_title(f"test accuracy gap ({args.others} - {args.group})")
        row[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("updates")
    figure.tight_layout()
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}: {len(epsilons)} epsilons, "
          f"{sum(len(v) for v in by_epsilon.values())} runs")


if __name__ == "__main__":
    main()
