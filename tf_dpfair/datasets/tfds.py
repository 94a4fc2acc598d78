"""The paper's TFDS datasets (imagenet2012, places365, chexpert), prepared locally.

Nothing is downloaded: a dataset is read from `data_dir` if prepared there,
else prepared from `manual_dir` for builders that take manual downloads
(imagenet2012: the ILSVRC2012 tar files; chexpert: the CheXpert-v1.0-small
folder). places365 (`places365_small`) has no manual-download path in TFDS;
prepare it elsewhere and pass that `data_dir`.

Poisson sampling needs random access, so datasets are read through
`builder.as_data_source` and must be prepared with
`file_format="array_record"` (done automatically when preparing from
`manual_dir`). The TFDS chexpert builder drops Sex and Age; `load_chexpert`
joins them back by image path from the CSV in `manual_dir`.
"""

import csv
import os

import numpy as np
import tensorflow as tf

from tf_dpfair.data import pipeline
from tf_dpfair.datasets import chexpert
from tf_dpfair.datasets import common

NAMES = {"imagenet2012": "imagenet2012", "places365": "places365_small",
         "chexpert": "chexpert"}
# The TFDS chexpert builder's ClassLabel order, and the CSV value each stands for.
_CHEXPERT_CLASS_VALUES = (-1.0, 1.0, 0.0, np.nan)  # uncertain, positive, negative, unmentioned


def prepared_builder(name, *, data_dir, manual_dir=None):
    """Returns the TFDS builder of `name`, preparing it from `manual_dir` if needed.

    Args:
        name: a key of `NAMES` or any TFDS dataset name.
        data_dir: TFDS data folder.
        manual_dir: folder with the manually downloaded files, or None.

    Returns:
        A prepared `tfds.core.DatasetBuilder`.

    Raises:
        FileNotFoundError: not prepared and no usable `manual_dir`.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAMES.get(name, name), data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise FileNotFoundError(
                f"TFDS {builder.name!r} is not prepared in {data_dir!r} and has no "
                f"manual-download path; nothing is downloaded. Prepare it elsewhere with "
                f"file_format='array_record' and pass that data_dir.")
    if manual_dir is None or not os.path.isdir(manual_dir):
        raise FileNotFoundError(
                f"TFDS {builder.name!r} is not prepared in {data_dir!r}; pass manual_dir= "
                f"the folder with its manual download (got {manual_dir!r}). Expected "
                f"there: {builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
            file_format="array_record")
    return builder


def load(name, *, split, data_dir, manual_dir=None, image_size=(224, 224), channels=3):
    """A TFDS image classification split as an `ExampleSource` (random access).

    Args:
        name: "imagenet2012", "places365" or another TFDS name with "image"
            and "label" features.
        split: TFDS split, e.g. "train" or "validation".
        data_dir: TFDS data folder.
        manual_dir: manual-download folder (see `prepared_builder`).
        image_size: `(height, width)` images are resized to.
        channels: 1 or 3.

    Returns:
        `pipeline.ExampleSource` of uint8 `[height, width, channels]` images and
        int32 class ids; no groups.

    Raises:
        FileNotFoundError: see `prepared_builder`.
        NotImplementedError: the dataset was prepared without array_record.
    """
    _check_channels(channels)
    builder = prepared_builder(name, data_dir=data_dir, manual_dir=manual_dir)
    source = builder.as_data_source(split=split)

    def fetch(index):
        example = source[int(index)]
        return _channels(example["image"], channels), np.int32(example["label"])

    def load_fn(index):
        image, label = tf.numpy_function(fetch, [index], (tf.uint8, tf.int32))
        label.set_shape([])
        return {pipeline.IMAGE: _resize(image, image_size, channels), pipeline.LABEL: label,
                pipeline.GROUPS: {}}

    return pipeline.ExampleSource(len(source), load_fn)


def load_chexpert(*, split, data_dir, manual_dir, labels=chexpert.EVAL_PATHOLOGIES,
                  uncertain=common.ZEROS, image_size=(224, 224), channels=1):
    """TFDS chexpert with Sex and Age groups joined back by image path.

    Args:
        split: "train" or "validation" (TFDS slicing like "train[:10%]" works).
        data_dir: TFDS data folder.
        manual_dir: folder holding CheXpert-v1.0-small (its CSVs give the groups).
        labels: observations to predict.
        uncertain: "zeros", "ones", "ignore" (adds a label mask) or a dict
            label -> policy; unmentioned (blank) is negative.
        image_size: `(height, width)` images are resized to.
        channels: 1 or 3.

    Returns:
        `pipeline.ExampleSource` with float32 `[L]` labels and groups "sex" and
        "age" (`chexpert.GROUP_SPEC`); an image whose path is not in the CSV
        gets the "unknown" groups.

    Raises:
        FileNotFoundError: the CSVs or the prepared dataset are missing.
        ValueError: bad labels or policy.
    """
    _check_channels(channels)
    labels = tuple(labels)
    policies = common.resolve_policies(uncertain, labels)
    directory = chexpert.find_dataset_dir(manual_dir)
    csv_path = os.path.join(directory, "valid.csv" if split.startswith("validation")
                            else "train.csv")
    with open(csv_path, newline="") as f:
        observations = next(csv.reader(f))[len(chexpert.META_COLUMNS):]
    table = chexpert.read_table(csv_path, labels=labels, uncertain=uncertain)
    groups_by_path = {path: (sex, age) for path, sex, age in zip(
            table["path"], table["groups"]["sex"], table["groups"]["age"])}
    unknown = tuple(chexpert.GROUP_SPEC.num_groups(a) - 1 for a in ("sex", "age"))
    columns = [observations.index(label) for label in labels]
    value_of = np.asarray(_CHEXPERT_CLASS_VALUES)
    builder = prepared_builder("chexpert", data_dir=data_dir, manual_dir=manual_dir)
    source = builder.as_data_source(split=split)
    with_mask = common.IGNORE in policies

    def fetch(index):
        example = source[int(index)]
        name = example["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        values = value_of[np.asarray(example["label"])[columns]]
        targets, mask = common.chexpert_labels(values[np.newaxis], policies)
        mask = np.ones_like(targets) if mask is None else mask
        sex, age = groups_by_path.get(name, unknown)
        return (_channels(example["image"], channels), targets[0], mask[0],
                np.int32(sex), np.int32(age))

    def load_fn(index):
        image, targets, mask, sex, age = tf.numpy_function(
                fetch, [index], (tf.uint8, tf.float32, tf.float32, tf.int32, tf.int32))
        for tensor, shape in ((targets, [len(labels)]), (mask, [len(labels)]),
                              (sex, []), (age, [])):
            tensor.set_shape(shape)
        element = {pipeline.IMAGE: _resize(image, image_size, channels), pipeline.LABEL: targets,
                   pipeline.GROUPS: {"sex": sex, "age": age}}
        if with_mask:
            element[pipeline.LABEL_MASK] = mask
        return element

    return pipeline.ExampleSource(len(source), load_fn, chexpert.GROUP_SPEC)


def _check_channels(channels):
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}.")


def _channels(image, channels):
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., np.newaxis]
    if image.shape[-1] == channels:
        return image
    if channels == 1:
        return np.round(image[..., :3].mean(axis=-1, keepdims=True)).astype(np.uint8)
    return np.repeat(image[..., :1], channels, axis=-1)


def _resize(image, image_size, channels):
    image.set_shape([None, None, channels])
    return pipeline.resize_image(image, image_size)
