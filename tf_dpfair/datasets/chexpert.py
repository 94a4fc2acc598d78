"""CheXpert (Irvin et al. 2019) from a local copy, with sex and age groups.

Expected layout (CheXpert-v1.0 or CheXpert-v1.0-small; `root` is that folder
or its parent):

    CheXpert-v1.0-small/
        train.csv  valid.csv
        train/patient00001/study1/view1_frontal.jpg ...
        valid/patient64541/study1/view1_frontal.jpg ...

The CSVs have the columns Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14
observations (`OBSERVATIONS`), valued 1.0, 0.0, -1.0 (uncertain) or blank. Sex
and Age are read from the same row as the image path (the TFDS builder drops
them). Splits are by patient (`patient00001` in the path): "train" and
"validation" are disjoint sets of patients of train.csv, "test" is the
official valid.csv (radiologist-labelled, no uncertain labels).
"""

import os
import re

import numpy as np
import pandas as pd

from tf_dpfair.data import pipeline
from tf_dpfair.datasets import common
from tf_dpfair.data.groups import GroupSpec, UNKNOWN

OBSERVATIONS = (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
        "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
        "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
        "Support Devices")
EVAL_PATHOLOGIES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                    "Pleural Effusion")
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
COLUMNS = META_COLUMNS + OBSERVATIONS
DATASET_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SEX_NAMES = ("male", "female", UNKNOWN)
GROUP_SPEC = GroupSpec({"sex": SEX_NAMES, "age": common.AGE_GROUP_NAMES})
_PATIENT = re.compile(r"(patient\d+)")
_HINT = ("Get CheXpert from https://stanfordmlgroup.github.io/competitions/chexpert/ "
         "and pass the CheXpert-v1.0(-small) folder or its parent.")


def find_dataset_dir(root):
    """Returns the folder holding train.csv and valid.csv under `root`.

    Args:
        root: the CheXpert-v1.0(-small) folder or its parent.

    Returns:
        The folder path.

    Raises:
        FileNotFoundError: neither `root` nor `root/CheXpert-v1.0(-small)`
            holds train.csv and valid.csv.
    """
    for candidate in (root,) + tuple(os.path.join(root, d) for d in DATASET_DIRS):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in ("train.csv", "valid.csv")):
            return candidate
    raise FileNotFoundError(
            f"CheXpert: expected train.csv and valid.csv in {root!r} or in "
            f"{[os.path.join(root, d) for d in DATASET_DIRS]}. Nothing is downloaded. "
            f"{_HINT}")


def read_table(csv_path, *, labels=EVAL_PATHOLOGIES, uncertain=common.ZEROS):
    """Reads one CheXpert CSV into labels, masks and group ids.

    Args:
        csv_path: train.csv or valid.csv.
        labels: observation names to keep, in output order.
        uncertain: policy for -1.0 labels: "zeros", "ones", "ignore", or a
            dict label -> policy; blank is always negative.

    Returns:
        A dict of numpy arrays over the rows: "path" (str, as in the CSV),
        "patient" (str), "frontal" (bool), "label" float32 `[N, L]`,
        "label_mask" float32 `[N, L]` or None, "groups" {"sex", "age"} int32
        ids into `GROUP_SPEC`.

    Raises:
        ValueError: columns are missing, a label is unknown, a path has no
            patient id, or a label value is invalid.
    """
    labels = _check_labels(labels)
    policies = common.resolve_policies(uncertain, labels)
    table = pd.read_csv(csv_path, dtype={"Path": str, "Sex": str})
    missing = [c for c in META_COLUMNS + tuple(labels) if c not in table.columns]
    if missing:
        raise ValueError(
                f"CheXpert: {csv_path} lacks the columns {missing}; expected {list(COLUMNS)}.")
    paths = table["Path"].to_numpy(dtype=str)
    patients = [_PATIENT.search(p) for p in paths]
    if not all(patients):
        bad = paths[[m is None for m in patients].index(True)]
        raise ValueError(
                f"CheXpert: no patient id (patientNNNNN) in the path {bad!r} of {csv_path}.")
    targets, mask = common.chexpert_labels(table[list(labels)].to_numpy(np.float64), policies)
    return {
            "path": paths,
            "patient": np.asarray([m.group(1) for m in patients]),
            "frontal": table["Frontal/Lateral"].astype(str).str.lower().eq("frontal").to_numpy(),
            "label": targets,
            "label_mask": mask,
            "groups": {"sex": common.category_ids(table["Sex"].to_numpy(object), SEX_NAMES),
                       "age": common.age_band_ids(table["Age"].to_numpy(object))},
    }


def load(root, *, labels=EVAL_PATHOLOGIES, uncertain=common.ZEROS, image_size=(224, 224),
         channels=1, frontal_only=False, validation_fraction=0.1, seed=0, check_files=True):
    """Loads CheXpert as `ExampleSource`s split by patient.

    Args:
        root: the CheXpert-v1.0(-small) folder or its parent.
        labels: observations to predict, default the 5 evaluation pathologies.
        uncertain: "zeros" (default), "ones", "ignore" (adds a label mask) or
            a dict label -> policy.
        image_size: `(height, width)` images are resized to.
        channels: 1 or 3.
        frontal_only: keep frontal views only.
        validation_fraction: fraction of train.csv patients held out as
            "validation"; 0 means no "validation" split.
        seed: seed of the patient split.
        check_files: check up front that every image file exists.

    Returns:
        dict "train", "validation" (if any), "test" (official valid.csv) ->
        `pipeline.ExampleSource` with multi-label float32 `[L]` labels and groups
        "sex" and "age".

    Raises:
        FileNotFoundError: CSVs or images are missing.
        ValueError: bad arguments or CSV contents, or a patient is in both
            train.csv and valid.csv.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction}.")
    directory = find_dataset_dir(root)
    train = read_table(os.path.join(directory, "train.csv"), labels=labels, uncertain=uncertain)
    test = read_table(os.path.join(directory, "valid.csv"), labels=labels, uncertain=uncertain)
    shared = np.intersect1d(train["patient"], test["patient"])
    if shared.size:
        raise ValueError(
                f"CheXpert: {shared.size} patients appear in both train.csv and valid.csv, "
                f"e.g. {shared[0]}; splits must be patient-disjoint.")
    tables = {}
    if validation_fraction > 0:
        masks = common.patient_split(
                train["patient"],
                {"train": 1.0 - validation_fraction, "validation": validation_fraction}, seed)
        tables = {name: _subset(train, mask) for name, mask in masks.items()}
    else:
        tables["train"] = train
    tables["test"] = test
    sources = {}
    for name, table in tables.items():
        if frontal_only:
            table = _subset(table, table["frontal"])
        if not len(table["path"]):
            raise ValueError(f"CheXpert: the {name!r} split is empty.")
        paths = [_image_path(directory, p) for p in table["path"]]
        if check_files:
            common.check_image_files(paths, "CheXpert")
        sources[name] = pipeline.ExampleSource.from_image_files(
                paths, table["label"], image_size=image_size, channels=channels,
                groups=table["groups"], group_spec=GROUP_SPEC, label_mask=table["label_mask"])
    return sources


def _check_labels(labels):
    labels = tuple(labels)
    unknown = [label for label in labels if label not in OBSERVATIONS]
    if unknown or not labels:
        raise ValueError(
                f"Unknown CheXpert labels {unknown or labels}; choose from {OBSERVATIONS}.")
    return labels


def _image_path(directory, csv_path):
    # CSV paths start with the original folder name (CheXpert-v1.0-small/train/...);
    # resolve them against the folder that holds the CSVs, whatever its name.
    parts = csv_path.replace("\\", "/").split("/")
    if parts[0].startswith("CheXpert"):
        parts = parts[1:]
    return os.path.join(directory, *parts)


def _subset(table, mask):
    return {key: (_subset(value, mask) if isinstance(value, dict)
                  else None if value is None else value[mask])
            for key, value in table.items()}
