"""Synthetic "CheXpert-shaped" data: real group proportions, plantable gaps.

Each example has a sex and an age band drawn with CheXpert's proportions and
the 5 evaluation pathologies drawn independently with CheXpert's positive
rates (independent of the groups, so any gap comes from the difficulty you
plant). The image is grey background plus Gaussian pixel noise plus, for
every positive label, that label's blob (`templates`) scaled by the signal
strength. Difficulty is group-dependent through:

- `group_signal`: multiplies the blob amplitude for examples in a group
    (weaker signal -> lower AUC in that group);
- `group_label_noise`: flips each recorded label of examples in a group
    with that probability (the image keeps the true labels).

`unknown_fraction` marks that share of recorded labels unknown (label mask
0, recorded as 0), like CheXpert's uncertain labels under the "ignore" policy.

A matched filter (`image . template`) recovers each label, so a planted gap
shows up even without training; a small CNN learns it from 32x32 images.
"""

import numpy as np

from tf_dpfair.data import pipeline
from tf_dpfair.datasets import common
from tf_dpfair.datasets.chexpert import EVAL_PATHOLOGIES
from tf_dpfair.data.groups import GroupSpec

SEX_PROPORTIONS = {"male": 0.594, "female": 0.406}
# CheXpert's published figures sum to 0.999 (rounding); they are renormalised.
AGE_PROPORTIONS = {"0-39": 0.140, "40-59": 0.310, "60-79": 0.389, "80+": 0.160}
POSITIVE_RATES = {"Atelectasis": 0.149, "Cardiomegaly": 0.121, "Consolidation": 0.066,
                  "Edema": 0.234, "Pleural Effusion": 0.386}
LABELS = EVAL_PATHOLOGIES
GROUP_SPEC = GroupSpec({"sex": tuple(SEX_PROPORTIONS), "age": common.AGE_BANDS})
_CENTRES = ((0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7), (0.5, 0.5))
_PROPORTIONS = {"sex": SEX_PROPORTIONS, "age": AGE_PROPORTIONS}


def templates(image_size=32):
    """The blob that a positive label adds to the image, one per label.

    Args:
        image_size: side of the square images.

    Returns:
        float32 `[5, image_size, image_size]`, Gaussian blobs of peak 1 in
        `LABELS` order.
    """
    grid = (np.arange(image_size) + 0.5) / image_size
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    width = 0.1
    return np.stack([np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * width ** 2))
                     for r, c in _CENTRES]).astype(np.float32)


def generate(num_examples, *, image_size=32, seed=0, signal=0.1, noise_std=0.2,
             group_signal=None, group_label_noise=None, unknown_fraction=0.0):
    """Draws synthetic CheXpert-shaped examples as numpy arrays.

    Args:
        num_examples: N > 0.
        image_size: side of the square grayscale images (>= 8).
        seed: integer seed.
        signal: blob amplitude (in [0, 1] pixel units) of a positive label.
        noise_std: standard deviation of the pixel noise.
        group_signal: `{attribute: {group name: factor}}` multiplying `signal`
            for examples in that group (factors of several attributes multiply).
        group_label_noise: `{attribute: {group name: probability}}` of flipping
            each recorded label of examples in that group.
        unknown_fraction: probability, in [0, 1), that a recorded label is
            unknown (its mask 0 and its recorded value 0).

    Returns:
        dict with "image" uint8 `[N, S, S, 1]`, "label" float32 `[N, 5]`
        (recorded), "clean_label" float32 `[N, 5]` (before label noise),
        "label_mask" float32 `[N, 5]` (1 = known) and "groups" {"sex", "age"}
        int32 `[N]` ids into `GROUP_SPEC`.

    Raises:
        ValueError: bad sizes, or an unknown attribute or group name.
    """
    if int(num_examples) != num_examples or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer; got {num_examples!r}.")
    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8; got {image_size!r}.")
    if not 0.0 <= unknown_fraction < 1.0:
        raise ValueError(f"unknown_fraction must lie in [0, 1); got {unknown_fraction!r}.")
    rng = np.random.default_rng(seed)
    groups = {}
    for attribute, proportions in _PROPORTIONS.items():
        p = np.asarray(list(proportions.values()))
        groups[attribute] = rng.choice(len(p), size=num_examples, p=p / p.sum()).astype(np.int32)
    rates = np.asarray([POSITIVE_RATES[label] for label in LABELS])
    clean = (rng.random((num_examples, len(LABELS))) < rates).astype(np.float32)
    strength = signal * _per_example(group_signal, groups, 1.0, np.multiply, "group_signal")
    flip = _per_example(group_label_noise, groups, 0.0, np.maximum, "group_label_noise")
    blobs = np.einsum("nl,lhw->nhw", clean, templates(image_size))
    pixels = 0.5 + strength[:, None, None] * blobs
    pixels += noise_std * rng.standard_normal(pixels.shape)
    image = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)[..., np.newaxis]
    flipped = rng.random(clean.shape) < flip[:, None]
    label = np.where(flipped, 1.0 - clean, clean).astype(np.float32)
    # Drawn last, so the other arrays are those of the same seed without it.
    known = (rng.random(clean.shape) >= unknown_fraction).astype(np.float32)
    return {"image": image, "label": label * known, "clean_label": clean,
            "label_mask": known, "groups": groups}


def load(*, num_train=4000, num_test=2000, seed=0, **kwargs):
    """Synthetic "train" and "test" `ExampleSource`s (different seeds).

    Args:
        num_train: training examples.
        num_test: test examples.
        seed: seed; the test split uses `seed + 1`.
        **kwargs: passed to `generate` (image_size, signal, noise_std,
            group_signal, group_label_noise, unknown_fraction).

    Returns:
        dict "train", "test" -> `pipeline.ExampleSource` with float32 `[5]` labels
        (`LABELS`), a label mask when `unknown_fraction` > 0, and groups
        "sex", "age" (`GROUP_SPEC`).
    """
    sources = {}
    for offset, (name, num) in enumerate((("train", num_train), ("test", num_test))):
        arrays = generate(num, seed=seed + offset, **kwargs)
        sources[name] = pipeline.ExampleSource.from_arrays(
                arrays["image"], arrays["label"], groups=arrays["groups"],
                group_spec=GROUP_SPEC,
                label_mask=arrays["label_mask"] if kwargs.get("unknown_fraction") else None)
    return sources


def _per_example(settings, groups, default, combine, argument):
    values = np.full(len(next(iter(groups.values()))), default, np.float64)
    for attribute, per_group in (settings or {}).items():
        if attribute not in groups:
            raise ValueError(
                    f"{argument}: unknown attribute {attribute!r}; choose from {sorted(groups)}.")
        names = GROUP_SPEC.names(attribute)
        for name, value in per_group.items():
            if name not in names:
                raise ValueError(
                        f"{argument}: unknown group {name!r} of {attribute!r}; choose from "
                        f"{names}.")
            if value < 0 or (argument == "group_label_noise" and value > 1):
                raise ValueError(f"{argument}: bad value {value} for {attribute}={name}.")
            in_group = groups[attribute] == names.index(name)
            values[in_group] = combine(values[in_group], value)
    return values
