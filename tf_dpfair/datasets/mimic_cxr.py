"""MIMIC-CXR-JPG (Johnson et al. 2019) from a local copy, with MIMIC-IV demographics.

Expected files (`.csv.gz` or `.csv`):

    root/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 label columns
    root/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split
    root/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, ..., ViewPosition, ...
                                           (only needed for frontal_only)
    root/files/p10/p10000032/s50414267/<dicom_id>.jpg
    mimic_iv_dir[/hosp or /core]/patients.csv.gz    subject_id, gender, anchor_age, ...
    mimic_iv_dir[/hosp or /core]/admissions.csv.gz  subject_id, admittime, insurance,
                                                    race (or ethnicity), ...

Labels come from the CheXpert labeler (same values and policies as CheXpert),
joined to images by study. Splits are the official ones ("validate" is called
"validation"), which are by subject; this is checked. Demographics join by
subject_id: sex from `gender`, age band from `anchor_age` (the age in the
subject's anchor year, not at the study), race and insurance from admissions.
A subject with several admissions gets the most common known value, ties
going to the earliest admission (by `admittime`). Missing values are the
group "unknown". Images without a label row are dropped.
"""

import logging
import os

import numpy as np
import pandas as pd

from tf_dpfair.data import pipeline
from tf_dpfair.datasets import common
from tf_dpfair.datasets.chexpert import EVAL_PATHOLOGIES, OBSERVATIONS
from tf_dpfair.data.groups import GroupSpec, UNKNOWN

LABELS_FILE = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SPLITS = {"train": "train", "validate": "validation", "test": "test"}
SEX_NAMES = ("male", "female", UNKNOWN)
RACE_NAMES = ("white", "black", "asian", "hispanic", "other", UNKNOWN)
INSURANCE_NAMES = ("medicare", "medicaid", "private", "other", UNKNOWN)
GROUP_SPEC = GroupSpec({"sex": SEX_NAMES, "age": common.AGE_GROUP_NAMES,
                        "race": RACE_NAMES, "insurance": INSURANCE_NAMES})
FRONTAL_VIEWS = ("PA", "AP")
_NOT_STATED = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "OTHER/UNKNOWN")
_HINT = ("MIMIC-CXR-JPG and MIMIC-IV are on https://physionet.org (credentialed "
         "access).")


def race_group(value):
    """Maps a MIMIC-IV race string to a group of `RACE_NAMES`.

    WHITE*, BLACK*, ASIAN*, HISPANIC* and SOUTH AMERICAN go to white, black,
    asian and hispanic; not-stated values (UNKNOWN, UNABLE TO OBTAIN, PATIENT
    DECLINED TO ANSWER) to None; everything else to "other".

    Args:
        value: a non-empty race string.

    Returns:
        A group name, or None for unknown.
    """
    value = value.upper()
    if value in _NOT_STATED:
        return None
    for prefix, group in (("WHITE", "white"), ("BLACK", "black"), ("ASIAN", "asian"),
                          ("HISPANIC", "hispanic"), ("SOUTH AMERICAN", "hispanic")):
        if value.startswith(prefix):
            return group
    return "other"


def insurance_group(value):
    """Maps a MIMIC-IV insurance string to a group of `INSURANCE_NAMES`.

    Args:
        value: a non-empty insurance string (Medicare, Medicaid, Private,
            Other, No charge, ...).

    Returns:
        "medicare", "medicaid", "private" or "other".
    """
    value = value.lower()
    return value if value in ("medicare", "medicaid", "private") else "other"


def load(root, *, mimic_iv_dir=None, labels=EVAL_PATHOLOGIES, uncertain=common.ZEROS,
         image_size=(224, 224), channels=1, frontal_only=False, check_files=True):
    """Loads MIMIC-CXR-JPG as `ExampleSource`s on the official splits.

    Args:
        root: the MIMIC-CXR-JPG folder (holding the CSVs and files/).
        mimic_iv_dir: folder with MIMIC-IV patients and admissions tables
            (directly, or in its hosp/ or core/ subfolder); default `root`.
        labels: observations to predict, default the 5 evaluation pathologies.
        uncertain: "zeros" (default), "ones", "ignore" (adds a label mask) or
            a dict label -> policy; blank is negative.
        image_size: `(height, width)` images are resized to.
        channels: 1 or 3.
        frontal_only: keep PA and AP views only (needs the metadata file).
        check_files: check up front that every image file exists.

    Returns:
        dict "train", "validation", "test" -> `pipeline.ExampleSource` with
        float32 `[L]` labels and groups "sex", "age", "race", "insurance".

    Raises:
        FileNotFoundError: a table or image is missing.
        ValueError: bad arguments or tables, or a subject in two splits.
    """
    labels = tuple(labels)
    unknown = [label for label in labels if label not in OBSERVATIONS]
    if unknown or not labels:
        raise ValueError(
                f"Unknown MIMIC-CXR labels {unknown or labels}; choose from {OBSERVATIONS}.")
    policies = common.resolve_policies(uncertain, labels)
    images = _read(root, SPLIT_FILE, ("dicom_id", "study_id", "subject_id", "split"))
    studies = _read(root, LABELS_FILE, ("subject_id", "study_id") + labels)
    if frontal_only:
        views = _read(root, METADATA_FILE, ("dicom_id", "ViewPosition"))
        images = images.merge(views[["dicom_id", "ViewPosition"]], on="dicom_id", how="left")
        images = images[images["ViewPosition"].isin(FRONTAL_VIEWS)]
    table = images.merge(studies, on=["subject_id", "study_id"], how="inner")
    if len(table) < len(images):
        logging.info("MIMIC-CXR: dropped %d images without a label row.",
                     len(images) - len(table))
    _check_subject_splits(table)
    groups = _demographics(mimic_iv_dir or root, table["subject_id"].to_numpy())
    targets, mask = common.chexpert_labels(table[list(labels)].to_numpy(np.float64), policies)
    sources = {}
    for raw, name in SPLITS.items():
        rows = (table["split"] == raw).to_numpy()
        if not rows.any():
            raise ValueError(f"MIMIC-CXR: no images in the official {raw!r} split.")
        paths = [image_path(root, s, t, d) for s, t, d in table.loc[
                rows, ["subject_id", "study_id", "dicom_id"]].itertuples(index=False)]
        if check_files:
            common.check_image_files(paths, "MIMIC-CXR")
        sources[name] = pipeline.ExampleSource.from_image_files(
                paths, targets[rows], image_size=image_size, channels=channels,
                groups={a: ids[rows] for a, ids in groups.items()}, group_spec=GROUP_SPEC,
                label_mask=None if mask is None else mask[rows])
    return sources


def image_path(root, subject_id, study_id, dicom_id):
    """The JPEG path of one image: root/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg.

    Args:
        root: the MIMIC-CXR-JPG folder.
        subject_id: int subject id (XX is its first two digits).
        study_id: int study id.
        dicom_id: str image id.

    Returns:
        The path as a str.
    """
    subject = str(int(subject_id))
    return os.path.join(root, "files", "p" + subject[:2], "p" + subject,
                        f"s{int(study_id)}", f"{dicom_id}.jpg")


def _read(directory, name, columns):
    path = common.find_file(directory, (name + ".gz", name), "MIMIC-CXR", _HINT)
    table = pd.read_csv(path, dtype={"dicom_id": str, "split": str, "race": str,
                                     "ethnicity": str, "insurance": str, "gender": str})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"MIMIC-CXR: {path} lacks the columns {missing}.")
    return table


def _check_subject_splits(table):
    splits_per_subject = table.groupby("subject_id")["split"].nunique()
    mixed = splits_per_subject[splits_per_subject > 1]
    if len(mixed):
        raise ValueError(
                f"MIMIC-CXR: {len(mixed)} subjects are in several splits, e.g. "
                f"{mixed.index[0]}; splits must be subject-disjoint.")
    unknown = sorted(set(table["split"]) - set(SPLITS))
    if unknown:
        raise ValueError(f"MIMIC-CXR: unknown split names {unknown}; expected {list(SPLITS)}.")


def _demographics(directory, subjects):
    """Group ids of sex, age, race and insurance per image, by subject."""
    folders = [directory] + [os.path.join(directory, d) for d in ("hosp", "core")]
    folder = next((f for f in folders if os.path.isfile(os.path.join(f, "patients.csv.gz"))
                   or os.path.isfile(os.path.join(f, "patients.csv"))), directory)
    patients = _read_iv(folder, "patients.csv", ("subject_id", "gender", "anchor_age"))
    admissions = _read_iv(folder, "admissions.csv", ("subject_id", "insurance"))
    race_column = "race" if "race" in admissions.columns else "ethnicity"
    if race_column not in admissions.columns:
        raise ValueError("MIMIC-IV: admissions lacks a race (or ethnicity) column.")
    patients = patients.drop_duplicates("subject_id").set_index("subject_id")
    sex = patients["gender"].reindex(subjects).map({"M": "male", "F": "female"})
    return {
            "sex": common.category_ids(sex.to_numpy(object), SEX_NAMES),
            "age": common.age_band_ids(patients["anchor_age"].reindex(subjects).to_numpy(object)),
            "race": _per_subject(admissions, race_column, race_group, subjects, RACE_NAMES),
            "insurance": _per_subject(admissions, "insurance", insurance_group, subjects,
                                      INSURANCE_NAMES),
    }


def _read_iv(folder, name, columns):
    hint = "Pass mimic_iv_dir= the MIMIC-IV folder. " + _HINT
    path = common.find_file(folder, (name + ".gz", name), "MIMIC-IV", hint)
    table = pd.read_csv(path, dtype={"gender": str, "race": str, "ethnicity": str,
                                     "insurance": str})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"MIMIC-IV: {path} lacks the columns {missing}.")
    return table


def _per_subject(admissions, column, to_group, subjects, names):
    """The most common known group per subject; ties go to the earliest admission."""
    table = admissions[["subject_id", column]].copy()
    if "admittime" in admissions.columns:
        table["when"] = pd.to_datetime(admissions["admittime"], errors="coerce")
        table = table.sort_values("when", kind="stable", na_position="last")
    table["order"] = np.arange(len(table))
    table["group"] = [to_group(v.strip()) if isinstance(v, str) and v.strip() else None
                      for v in table[column]]
    table = table.dropna(subset=["group"])
    votes = (table.groupby(["subject_id", "group"])
             .agg(count=("order", "size"), first=("order", "min")).reset_index()
             .sort_values(["subject_id", "count", "first"], ascending=[True, False, True])
             .drop_duplicates("subject_id").set_index("subject_id")["group"])
    return common.category_ids(votes.reindex(subjects).to_numpy(object), names)
