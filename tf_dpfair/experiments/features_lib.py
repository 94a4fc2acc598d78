"""A run's data as frozen-backbone features (`cache_features=True`), cached on disk.

For a linear probe (`finetune="head"`), `cached_run` splits the run's model
into its frozen backbone and its head (`tf_dpfair.training.frozen_features`),
computes the backbone's features of the training split (K = `augmult` views
per example, drawn once), the validation split and the test split (one plain
view each), and returns the run's data with those features in place of the
images and the head to train. The DP step, the sampling and the accounting
are those of the uncached run; what differs is stated in `frozen_features`
(views drawn once per example, not once per update).

Features are saved under `feature_cache_dir` (default `<work_dir>/features`)
as `<split>_<key>.npz`. The key hashes everything the features depend on:
the data settings (dataset, subsets, rotated shares, image size, seed,
validation share), the views, the split's size and the backbone's weights,
so runs of a sweep that differ only in training settings (learning rate,
epsilon, batch, EMA) share one cache, and a stale file is never read.
"""

import dataclasses
import hashlib
import json
import os

from tf_dpfair.training import frozen_features

# Settings the data (and so the features) depend on.
_DATA_FIELDS = ("dataset", "data_dir", "dataset_options", "train_examples", "test_examples",
                "rotated_fraction", "test_rotated_fraction", "image_size", "seed",
                "validation_fraction", "model", "model_options", "pretrained")


@dataclasses.dataclass(frozen=True)
class CachedRun:
    """A run's data as features and the head to train on them.

    Attributes:
        run_data: the run's `RunData`, its train and test sources features.
        validation: the validation split's features, or None.
        head: the Keras model from features to logits (the trained layers).
        backbone: the frozen model from images to features.
        files: split name -> the cache file read or written.
    """
    run_data: object
    validation: object
    head: object
    backbone: object
    files: dict


def cache_key(settings, backbone_digest, split, views, num_examples):
    """The hex key of one split's features (see the module docstring)."""
    described = {field: getattr(settings, field) for field in _DATA_FIELDS}
    described.update(split=split, views=views, num_examples=num_examples,
                     backbone=backbone_digest, format=frozen_features.CACHE_FORMAT)
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _features(settings, backbone, digest, split, source, views, write):
    """One split's features: read from the cache when its key matches, else computed."""
    folder = settings.feature_cache_dir or os.path.join(settings.work_dir, "features")
    key = cache_key(settings, digest, split, views, source.num_examples)
    path = os.path.join(folder, f"{split}_{key[:16]}.npz")
    found = frozen_features.load_features(path, key)
    if found is not None:
        print(f"Features of the {split} split read from {path}.")
        return found, path
    print(f"Computing the frozen backbone's features of the {split} split "
          f"({source.num_examples} examples x {views} view(s)).")
    found = frozen_features.cache_features(backbone, source, views=views, seed=settings.seed,
                                           batch_size=settings.eval_batch_size)
    if write:
        frozen_features.save_features(path, found, key)
    return found, path


def cached_run(settings, run_data, validation, model, *, write=True):
    """The run's data as features, and the head of `model` to train on them.

    Args:
        settings: the run's `Settings` (`cache_features=True`).
        run_data: its `RunData` (validation already carved out).
        validation: the validation `ExampleSource`, or None.
        model: the run's base model (`inputs_lib.build_model`, finetune="head").
        write: save computed features (the chief of a job does).

    Returns:
        A `CachedRun`.

    Raises:
        ValueError: the model has no frozen backbone (see
            `frozen_features.split_frozen_backbone`).
    """
    backbone, head = frozen_features.split_frozen_backbone(model)
    digest = frozen_features.weights_digest(backbone)
    splits = {"train": (run_data.train, settings.augmult), "test": (run_data.test, 1)}
    if validation is not None:
        splits["validation"] = (validation, 1)
    done, files = {}, {}
    for split, (source, views) in splits.items():
        done[split], files[split] = _features(settings, backbone, digest, split, source,
                                              views, write)
    shape = tuple(done["test"].element_spec["image"].shape)
    cached = dataclasses.replace(
            run_data, train=done["train"], test=done["test"], input_shape=shape,
            description=f"{run_data.description}; trained on cached features of the "
                        f"frozen backbone ({settings.augmult} view(s) per training "
                        f"example, drawn once)")
    return CachedRun(run_data=cached, validation=done.get("validation"), head=head,
                     backbone=backbone, files=files)
