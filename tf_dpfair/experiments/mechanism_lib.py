"""Why a group pays: per-group clipping and gradients against the accuracy gap.

For each setting (training-set size, rotated share, privacy level) one small
CNN trains on Fashion-MNIST whose rotated images are a rare group, with
`diagnostics.GroupDiagnostics(alignment=True)` on the training batches, and
is evaluated on a test split with a fixed rotated share after every epoch.
Per epoch it records, for the upright and rotated groups, the clip fraction,
the median pre-clip gradient norm, the share of the clipped sum against the
share of examples, the cosine of the update with the group's own gradient,
and the test accuracy of each group.

Privacy levels: `inf` trains without clipping and without noise (C so large
that nothing is clipped) with Adam, the usual non-private recipe; `sgd` is
the same with the clipped runs' optimizer (plain SGD at a rate that suits
unclipped gradients), so that `sgd` against `clip` isolates clipping; `clip`
clips at C but adds no noise, which separates clipping's effect from the
noise's; a number is a target epsilon (Poisson sampling, RDP, delta 1e-5)
with clipping at C.

The training-set figures are outside the DP guarantee (diagnostics of the
person training the model); accuracies are on held-out test images.
"""

import dataclasses
import json
import math
import os
import secrets
import time

import keras
import numpy as np

import tf_dpfair as dpf
from tf_dpfair.data import pipeline as data_lib
from tf_dpfair.training import diagnostics
from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.experiments import inputs_lib

GROUP = "orientation"
NO_CLIP_NORM = 1e4  # `inf`: far above any gradient norm here (the clip fraction shows it)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One run of the study.

    Attributes:
        train_examples: training images (a random subset).
        rotated_fraction: share of training images rotated 90 degrees.
        privacy: "inf", "clip", or a target epsilon as a string ("4").
    """

    train_examples: int
    rotated_fraction: float
    privacy: str

    @property
    def name(self):
        """The run's folder name."""
        return (f"n{self.train_examples}_rot{round(self.rotated_fraction * 100):02d}"
                f"_{self.privacy.replace('.', 'p')}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What every run shares.

    Attributes:
        data_dir: Fashion-MNIST IDX folder.
        test_examples: test images (fixed rotated share `test_rotated_fraction`).
        test_rotated_fraction: share of rotated test images.
        batch_size: expected logical batch (Poisson sampling).
        microbatch_size: per-example pass size.
        epochs: epochs of `steps_per_epoch` updates.
        steps_per_epoch: updates between evaluations.
        clip_norm: C of the clipped settings.
        learning_rate: SGD learning rate of the clipped settings.
        non_private_learning_rate: Adam learning rate of `inf` (unclipped
            gradients need another recipe).
        unclipped_sgd_learning_rate: SGD learning rate of `sgd`.
        delta: delta of the privacy statements.
        seed: seed of subsets, rotations and initialisation.
    """

    data_dir: str = fashion_mnist.DEFAULT_ROOT
    test_examples: int = 5000
    test_rotated_fraction: float = 0.2
    batch_size: int = 500
    microbatch_size: int = 50
    epochs: int = 6
    steps_per_epoch: int = 10
    clip_norm: float = 1.0
    learning_rate: float = 2.0
    non_private_learning_rate: float = 0.003
    unclipped_sgd_learning_rate: float = 0.05
    delta: float = 1e-5
    seed: int = 0


def load_sources(recipe, setting):
    """Training and test `ExampleSource`s with the rotated group.

    Returns:
        `(train, test)`.
    """
    splits = fashion_mnist.load(recipe.data_dir, rotated_fraction=setting.rotated_fraction,
                                seed=recipe.seed)
    test = fashion_mnist.load(recipe.data_dir, rotated_fraction=recipe.test_rotated_fraction,
                              seed=recipe.seed + 1)["test"]
    return (_subset(splits["train"], setting.train_examples, recipe.seed),
            _subset(test, recipe.test_examples, recipe.seed + 2))


def _subset(source, size, seed):
    if not size or size >= source.num_examples:
        return source
    # Its own stream: choosing with the rotation's seed would pick exactly the
    # rotated images (numpy's choice without replacement is prefix-stable).
    rows = np.sort(np.random.default_rng([seed, 1]).choice(
        source.num_examples, size, replace=False))
    elements = source.elements().batch(source.num_examples).get_single_element()
    return data_lib.ExampleSource.from_arrays(
        elements["image"].numpy()[rows], elements["label"].numpy()[rows],
        groups={k: v.numpy()[rows] for k, v in elements["groups"].items()},
        group_spec=source.group_spec)


class GroupAccuracy(keras.callbacks.Callback):
    """Adds each group's held-out accuracy to the epoch logs (`test_accuracy/<group>`)."""

    def __init__(self, test, group_spec):
        super().__init__()
        self._data = data_lib.make_eval_dataset(test, batch_size=500)
        self._names = group_spec.names(GROUP)

    def on_epoch_end(self, epoch, logs=None):
        correct, groups, weights = [], [], []
        for x, y, w in self._data:
            scores = self.model.predict_on_batch(x)
            correct.append(np.argmax(scores, -1) == y["label"].numpy())
            groups.append(y["groups"][GROUP].numpy())
            weights.append(w.numpy())
        correct, groups = np.concatenate(correct), np.concatenate(groups)
        real = np.concatenate(weights) > 0
        for index, name in enumerate(self._names):
            member = real & (groups == index)
            logs[f"test_accuracy/{name}"] = float(correct[member].mean()) if member.any() \
                else math.nan
        logs["test_accuracy"] = float(correct[real].mean())


def run_setting(recipe, setting, work_dir):
    """Trains one setting and writes `history.json` into `work_dir/<name>`.

    A finished setting (its history.json exists) is read, not rerun.

    Returns:
        The dict written: setting, epsilon statement, per-epoch logs, seconds.
    """
    out = os.path.join(work_dir, setting.name)
    path = os.path.join(out, "history.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    train_source, test_source = load_sources(recipe, setting)
    train = data_lib.make_train_dataset(
        train_source, expected_batch_size=recipe.batch_size, seed=secrets.randbits(62),
        microbatch_size=recipe.microbatch_size, with_groups=True)
    steps = recipe.epochs * recipe.steps_per_epoch
    clip, sigma, optimizer = recipe.clip_norm, 0.0, keras.optimizers.SGD(recipe.learning_rate)
    if setting.privacy == "inf":
        clip, optimizer = NO_CLIP_NORM, keras.optimizers.Adam(recipe.non_private_learning_rate)
    elif setting.privacy == "sgd":
        clip = NO_CLIP_NORM
        optimizer = keras.optimizers.SGD(recipe.unclipped_sgd_learning_rate)
    elif setting.privacy != "clip":
        sigma = dpf.privacy.accounting.calibrate_noise_multiplier(
            target_epsilon=float(setting.privacy), delta=recipe.delta,
            **train.spec.accountant_kwargs(steps))
    keras.utils.set_random_seed(recipe.seed)
    base = inputs_lib.tiny_cnn((28, 28, 1), 10)
    model = dpf.make_private(base, dpf.DPConfig(
        l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=recipe.batch_size,
        microbatch_size=recipe.microbatch_size))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    privacy = dpf.callbacks.PrivacyLogger(delta=recipe.delta, verbose=0)
    history = model.fit(
        train, epochs=recipe.epochs, steps_per_epoch=recipe.steps_per_epoch, verbose=0,
        callbacks=[privacy, diagnostics.GroupDiagnostics(train_source.group_spec,
                                                         alignment=True),
                   GroupAccuracy(test_source, train_source.group_spec)])
    result = {
        "setting": dataclasses.asdict(setting), "recipe": dataclasses.asdict(recipe),
        "noise_multiplier": sigma, "clip_norm": clip,
        "statement": str(privacy.statement()),
        "epsilon": privacy.statement().epsilon if sigma > 0 else math.inf,
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "seconds": time.time() - started,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return result


def run_study(recipe, settings, work_dir, log=print):
    """Runs every setting (finished ones are read back) and returns their results."""
    results = []
    for number, setting in enumerate(settings, 1):
        result = run_setting(recipe, setting, work_dir)
        log(f"[{number}/{len(settings)}] {setting.name}: final rotated accuracy "
            f"{_last(result, 'test_accuracy/rotated'):.3f}, upright "
            f"{_last(result, 'test_accuracy/upright'):.3f} ({result['seconds']:.0f} s)")
        results.append(result)
    return results


def _last(result, key):
    values = result["history"].get(key) or [math.nan]
    return values[-1]


def _group_key(figure, group):
    return f"{diagnostics.PREFIX}{GROUP}/{group}/{figure}"


def summary_rows(results):
    """One row per setting with the final epoch's figures (for the table)."""
    rows = []
    for result in results:
        s = result["setting"]
        row = {"train_examples": s["train_examples"],
               "rotated_fraction": s["rotated_fraction"], "privacy": s["privacy"],
               "epsilon": result["epsilon"],
               "accuracy_gap": _last(result, "test_accuracy/upright")
               - _last(result, "test_accuracy/rotated")}
        for group in ("upright", "rotated"):
            for figure in ("clip_fraction", "grad_norm_p50", "example_share",
                           "clipped_sum_share", "update_cosine"):
                row[f"{group}_{figure}"] = _last(result, _group_key(figure, group))
            row[f"{group}_accuracy"] = _last(result, f"test_accuracy/{group}")
        rows.append(row)
    return rows


def plot_study(results, path):
    """Per setting over training: clipping and gradients of each group, and the gap.

    One row of panels per setting: clip fraction, median gradient norm,
    clipped-sum share over example share, and held-out accuracy of each group.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("clip_fraction", "clip fraction"), ("grad_norm_p50", "median grad norm"),
              ("share_ratio", "clipped-sum share / example share"),
              ("accuracy", "test accuracy")]
    figure, axes = plt.subplots(len(results), len(panels),
                                figsize=(4 * len(panels), 2.3 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        history = result["history"]
        for axis, (key, title) in zip(row, panels):
            for group, style in (("upright", "-"), ("rotated", "--")):
                if key == "accuracy":
                    values = history.get(f"test_accuracy/{group}", [])
                elif key == "share_ratio":
                    shares = history.get(_group_key("clipped_sum_share", group), [])
                    examples = history.get(_group_key("example_share", group), [])
                    values = [a / b if b else math.nan for a, b in zip(shares, examples)]
                else:
                    values = history.get(_group_key(key, group), [])
                axis.plot(range(1, len(values) + 1), values, style, label=group)
            axis.set_title(f"{result['setting']['privacy']}, "
                           f"{result['setting']['rotated_fraction']:.0%} rotated: {title}",
                           fontsize=8)
            axis.tick_params(labelsize=7)
        row[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_summary(rows, path):
    """Across settings: the rotated group's clip-fraction excess against its accuracy gap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for row in rows:
        label = f"{row['privacy']}, {row['rotated_fraction']:.0%}"
        excess = row["rotated_clip_fraction"] - row["upright_clip_fraction"]
        ratio = row["rotated_clipped_sum_share"] / row["rotated_example_share"] \
            if row["rotated_example_share"] else math.nan
        for axis, x in zip(axes, (excess, ratio)):
            axis.scatter(x, row["accuracy_gap"])
            axis.annotate(label, (x, row["accuracy_gap"]), fontsize=7)
    axes[0].set_xlabel("rotated minus upright clip fraction (last epoch)")
    axes[1].set_xlabel("rotated group: clipped-sum share / example share")
    for axis in axes:
        axis.set_ylabel("upright minus rotated test accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(results, directory):
    """Writes `summary.md`, `summary.json`, `curves.png` and `summary.png`.

    Returns:
        The path of summary.md.
    """
    os.makedirs(directory, exist_ok=True)
    rows = summary_rows(results)
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
    columns = ["privacy", "rotated_fraction", "train_examples", "epsilon",
               "upright_accuracy", "rotated_accuracy", "accuracy_gap",
               "upright_clip_fraction", "rotated_clip_fraction",
               "upright_grad_norm_p50", "rotated_grad_norm_p50",
               "rotated_example_share", "rotated_clipped_sum_share",
               "upright_update_cosine", "rotated_update_cosine"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row[c]) for c in columns) + " |")
    text = ("Training-set figures (clip fraction, gradient norms, shares, cosines) are "
            "diagnostics on training data, outside the DP guarantee; accuracies are on "
            "held-out test images. Last epoch of each run.\n\n" + "\n".join(lines) + "\n")
    path = os.path.join(directory, "summary.md")
    with open(path, "w") as f:
        f.write(text)
    plot_study(results, os.path.join(directory, "curves.png"))
    plot_summary(rows, os.path.join(directory, "summary.png"))
    return path


def _format(value):
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}"
    return str(value)
