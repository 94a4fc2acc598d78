"""Helpers shared by the loaders: files, label policies, age bands, splits."""

import os

import numpy as np
import pandas as pd

from tf_dpfair.data.groups import UNKNOWN

AGE_BANDS = ("0-39", "40-59", "60-79", "80+")
AGE_GROUP_NAMES = AGE_BANDS + (UNKNOWN,)
_AGE_EDGES = (40, 60, 80)

# Uncertain-label policies (Irvin et al. 2019): U-Ignore, U-Zeros, U-Ones.
IGNORE = "ignore"
ZEROS = "zeros"
ONES = "ones"
UNCERTAIN_POLICIES = (IGNORE, ZEROS, ONES)


def find_file(directory, names, dataset, hint=""):
    """Returns the path of the first of `names` that exists in `directory`.

    Args:
        directory: folder to look in.
        names: candidate file names, in order of preference.
        dataset: dataset name for the error message.
        hint: extra sentence for the error message (where to get the files).

    Returns:
        The path as a str.

    Raises:
        FileNotFoundError: none exists; the message names the folder and the
            expected files.
    """
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
            f"{dataset}: expected one of {list(names)} in {directory!r}, found none. "
            f"Nothing is downloaded; place the files there. {hint}".rstrip())


def check_image_files(paths, dataset, max_listed=3):
    """Raises if any image file is missing, naming a few of them.

    Args:
        paths: image file paths.
        dataset: dataset name for the message.
        max_listed: how many missing paths the message lists.

    Raises:
        FileNotFoundError: some paths do not exist.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
                f"{dataset}: {len(missing)} of {len(paths)} image files are missing, "
                f"e.g. {missing[:max_listed]}. Pass check_files=False to skip this check.")


def age_band_ids(ages):
    """Age bands 0-39, 40-59, 60-79, 80+ as ids into `AGE_GROUP_NAMES`.

    Args:
        ages: array-like of ages in years; NaN, blank or negative is unknown.

    Returns:
        int32 numpy array of ids; `len(AGE_BANDS)` means unknown.
    """
    ages = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object)), errors="coerce").to_numpy(
            dtype=np.float64)
    ids = np.searchsorted(np.asarray(_AGE_EDGES, np.float64), ages, side="right")
    ids[~(ages >= 0)] = len(AGE_BANDS)  # also catches NaN
    return ids.astype(np.int32)


def category_ids(values, names, mapping=None):
    """Maps raw category values to ids into `names`; unmapped -> "unknown".

    Args:
        values: array-like of raw values (str or NaN).
        names: group names; must contain `UNKNOWN`.
        mapping: optional callable raw value (stripped str) -> group name or
            None (unknown); default: lower-cased value if it is in `names`.

    Returns:
        int32 numpy array of ids.
    """
    lookup = {name: i for i, name in enumerate(names)}
    unknown = lookup[UNKNOWN]
    ids = np.full(len(values), unknown, np.int32)
    for i, value in enumerate(values):
        if isinstance(value, str) and value.strip():
            name = mapping(value.strip()) if mapping else value.strip().lower()
            ids[i] = lookup.get(name, unknown)
    return ids


def resolve_policies(uncertain, labels):
    """Returns one uncertain-label policy per label.

    Args:
        uncertain: a policy name, or a dict label -> policy (labels not in the
            dict get "zeros").
        labels: the label names.

    Returns:
        A list of policies, one per label.

    Raises:
        ValueError: unknown policy or unknown label in the dict.
    """
    if isinstance(uncertain, str):
        policies = {label: uncertain for label in labels}
    else:
        unknown = set(uncertain) - set(labels)
        if unknown:
            raise ValueError(f"Uncertain-label policy given for unknown labels {sorted(unknown)}.")
        policies = {label: uncertain.get(label, ZEROS) for label in labels}
    for label, policy in policies.items():
        if policy not in UNCERTAIN_POLICIES:
            raise ValueError(
                    f"Uncertain-label policy for {label!r} must be one of "
                    f"{UNCERTAIN_POLICIES}; got {policy!r}.")
    return [policies[label] for label in labels]


def chexpert_labels(values, policies):
    """Turns CheXpert-labeler values into targets and a mask.

    Values are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank
    (not mentioned). Blank counts as negative, as is common practice (the
    labeler leaves a finding blank when the report does not mention it).
    Uncertain follows the label's policy: "zeros" -> 0, "ones" -> 1,
    "ignore" -> target 0 with mask 0.

    Args:
        values: float `[N, L]` array, NaN for blank.
        policies: one policy per column.

    Returns:
        `(targets, mask)`: float32 `[N, L]` each; mask is None when no policy
        is "ignore".

    Raises:
        ValueError: a value is not 1, 0, -1 or blank.
    """
    values = np.asarray(values, np.float64)
    known = np.isnan(values) | np.isin(values, (1.0, 0.0, -1.0))
    if not known.all():
        bad = values[~known][0]
        raise ValueError(f"CheXpert label values must be 1.0, 0.0, -1.0 or blank; got {bad}.")
    uncertain = values == -1.0
    targets = (values == 1.0).astype(np.float32)
    mask = np.ones_like(targets)
    for column, policy in enumerate(policies):
        if policy == ONES:
            targets[uncertain[:, column], column] = 1.0
        elif policy == IGNORE:
            mask[uncertain[:, column], column] = 0.0
    return targets, (mask if IGNORE in policies else None)


def patient_split(patients, fractions, seed):
    """Assigns whole patients to splits, so no patient is in two splits.

    Args:
        patients: array-like of patient ids, one per example.
        fractions: ordered mapping split name -> fraction of patients; the
            fractions must sum to 1 (the last split takes the rounding rest).
        seed: integer seed of the patient permutation.

    Returns:
        dict split name -> bool numpy mask over examples.

    Raises:
        ValueError: fractions are negative or do not sum to 1.
    """
    values = list(fractions.values())
    if any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"Split fractions must be >= 0 and sum to 1; got {dict(fractions)}.")
    patients = np.asarray(patients)
    unique = np.unique(patients)
    order = np.random.default_rng(seed).permutation(len(unique))
    bounds = np.round(np.cumsum([0.0] + values) * len(unique)).astype(int)
    bounds[-1] = len(unique)
    masks = {}
    for name, start, stop in zip(fractions, bounds[:-1], bounds[1:]):
        masks[name] = np.isin(patients, unique[order[start:stop]])
    return masks


ORIENTATION_NAMES = ("upright", "rotated")


def rotate_subgroup(images, fraction, seed):
    """Rotates a random `fraction` of the images by 90 degrees: a rare subgroup.

    The PAIR explorable "Can a model be differentially private and fair?"
    uses MNIST digits rotated 90 degrees as 5-20% of the data to show that
    rare subgroups lose accuracy first as privacy tightens.

    Args:
        images: `[N, H, W, C]` array with H == W (when fraction > 0).
        fraction: fraction of images to rotate, in [0, 1].
        seed: integer seed choosing which images.

    Returns:
        `(images, ids)`: a copy of the images with the chosen ones rotated, and
        int32 `[N]` ids into `ORIENTATION_NAMES`.

    Raises:
        ValueError: `fraction` is out of range, or images are not square.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rotated_fraction must be in [0, 1]; got {fraction}.")
    images = np.array(images)
    ids = np.zeros(len(images), np.int32)
    count = int(round(fraction * len(images)))
    if count:
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"Only square images can be rotated; got {images.shape[1:3]}.")
        chosen = np.random.default_rng(seed).choice(len(images), count, replace=False)
        images[chosen] = np.rot90(images[chosen], k=1, axes=(1, 2))
        ids[chosen] = 1
    return images, ids
