"""Small on-disk copies of the datasets' layouts, with their real CSV headers.

Images are fake JPEGs (encoded small random arrays); tables keep the real
column names and orders, and include uncertain and blank labels, a patient
with several studies, and missing demographics.
"""

import os

import numpy as np
import pandas as pd
import tensorflow as tf

CHEXPERT_HEADER = (
        "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
        "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,"
        "Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices")

# (path under the dataset folder, Sex, Age, Frontal/Lateral, AP/PA, 14 labels in CSV
# order as strings: "1.0", "0.0", "-1.0" or "" for blank).
_BLANK = [""] * 14


def _labels(**values):
    names = CHEXPERT_HEADER.split(",")[5:]
    row = list(_BLANK)
    for name, value in values.items():
        row[names.index(name.replace("_", " "))] = value
    return row


CHEXPERT_TRAIN = [
        ("train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP",
         _labels(Atelectasis="-1.0", Cardiomegaly="1.0", Edema="", Pleural_Effusion="0.0")),
        # Patient 2: two studies, a lateral view, unknown sex.
        ("train/patient00002/study1/view1_frontal.jpg", "Unknown", "87", "Frontal", "PA",
         _labels(Edema="1.0", Consolidation="-1.0")),
        ("train/patient00002/study1/view2_lateral.jpg", "Unknown", "87", "Lateral", "",
         _labels(Edema="1.0", Consolidation="-1.0")),
        ("train/patient00002/study2/view1_frontal.jpg", "Unknown", "88", "Frontal", "AP",
         _labels(No_Finding="1.0")),
        # Patient 3: blank age.
        ("train/patient00003/study1/view1_frontal.jpg", "Male", "", "Frontal", "AP",
         _labels(Pleural_Effusion="1.0", Atelectasis="0.0")),
] + [
        (f"train/patient{p:05d}/study1/view1_frontal.jpg", ("Male", "Female")[p % 2],
         str(age), "Frontal", "PA", _labels(Cardiomegaly=("1.0", "0.0", "-1.0", "")[p % 4]))
        for p, age in zip(range(4, 16), (20, 39, 40, 59, 60, 79, 80, 95, 33, 51, 72, 18))
]
CHEXPERT_VALID = [
        ("valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP",
         _labels(Atelectasis="1.0", Cardiomegaly="0.0", Consolidation="0.0", Edema="0.0",
                 Pleural_Effusion="1.0")),
        ("valid/patient64542/study1/view1_frontal.jpg", "Female", "45", "Frontal", "PA",
         _labels(Atelectasis="0.0", Cardiomegaly="1.0", Consolidation="0.0", Edema="1.0",
                 Pleural_Effusion="0.0")),
]


def write_jpeg(path, height=20, width=16, channels=1, seed=0):
    """Writes a random JPEG and returns its pixels, uint8 [height, width, channels]."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels),
                                                  dtype=np.uint8)
    tf.io.write_file(path, tf.io.encode_jpeg(pixels))
    return pixels


def make_chexpert(root, folder="CheXpert-v1.0-small", rows=None):
    """Writes a CheXpert tree under root/folder; returns the dataset folder."""
    directory = os.path.join(root, folder)
    tables = {"train.csv": CHEXPERT_TRAIN, "valid.csv": CHEXPERT_VALID}
    if rows is not None:
        tables["train.csv"] = rows
    for name, table in tables.items():
        os.makedirs(directory, exist_ok=True)
        lines = [CHEXPERT_HEADER]
        for k, (path, sex, age, view, ap_pa, labels) in enumerate(table):
            write_jpeg(os.path.join(directory, path), seed=k)
            lines.append(",".join([f"{folder}/{path}", sex, age, view, ap_pa] + labels))
        with open(os.path.join(directory, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return directory


MIMIC_LABEL_COLUMNS = [
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
        "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
        "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
        "Support Devices"]
# (dicom_id, study_id, subject_id, split, ViewPosition)
MIMIC_IMAGES = [
        ("d1", 50000001, 10000032, "train", "PA"),
        ("d2", 50000001, 10000032, "train", "LATERAL"),
        ("d3", 50000002, 10000032, "train", "AP"),  # second study of the same subject
        ("d4", 50000003, 10000764, "train", "AP"),
        ("d5", 50000004, 10000898, "validate", "PA"),
        ("d6", 50000005, 10001884, "test", "AP"),
        ("d7", 50000006, 10002013, "test", "PA"),
        ("d8", 50000007, 10002013, "test", "PA"),  # study without a label row
]
# study -> {label: value}; missing labels are blank.
MIMIC_STUDY_LABELS = {
        (10000032, 50000001): {"Atelectasis": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0},
        (10000032, 50000002): {"Cardiomegaly": 1.0, "No Finding": 0.0},
        (10000764, 50000003): {"Consolidation": -1.0, "Pleural Effusion": 1.0},
        (10000898, 50000004): {"No Finding": 1.0},
        (10001884, 50000005): {"Edema": 1.0, "Cardiomegaly": -1.0},
        (10002013, 50000006): {"Atelectasis": 0.0},
}
MIMIC_PATIENTS = [  # 10000898 has no patients row: sex and age unknown.
        (10000032, "F", 52, 2180, "2014 - 2016", ""),
        (10000764, "M", 86, 2132, "2014 - 2016", ""),
        (10001884, "F", 68, 2122, "2008 - 2010", "2131-01-20"),
        (10002013, "F", 39, 2160, "2008 - 2010", ""),
]
# subject, admittime, insurance, race; 10000764 has no admissions.
MIMIC_ADMISSIONS = [
        (10000032, "2180-05-06 22:23:00", "Medicaid", "WHITE"),
        (10000032, "2180-06-26 18:27:00", "Medicare", "BLACK/AFRICAN AMERICAN"),
        (10000032, "2180-07-23 12:35:00", "Medicare", "WHITE"),
        (10000898, "2187-01-02 10:00:00", "Other", "UNKNOWN"),
        (10000898, "2186-01-02 10:00:00", "Private", "ASIAN - CHINESE"),
        (10001884, "2125-10-04 23:36:00", "Medicare", "HISPANIC/LATINO - PUERTO RICAN"),
        (10002013, "2160-05-18 07:45:00", "", ""),
        # Tie (Medicaid, Medicare once each): the earlier admission wins.
        (10002013, "2161-05-18 07:45:00", "Medicare", "OTHER"),
        (10002013, "2159-05-18 07:45:00", "Medicaid", "OTHER"),
]


def make_mimic(root, iv_subfolder="hosp", gzip=True):
    """Writes a MIMIC-CXR-JPG tree and MIMIC-IV tables under root; returns root."""
    suffix = ".csv.gz" if gzip else ".csv"
    compression = "gzip" if gzip else None
    split = pd.DataFrame([m[:4] for m in MIMIC_IMAGES],
                         columns=["dicom_id", "study_id", "subject_id", "split"])
    split.to_csv(os.path.join(root, "mimic-cxr-2.0.0-split" + suffix), index=False,
                 compression=compression)
    metadata = pd.DataFrame(
            [(d, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
              "CHEST (PA AND LAT)", "postero-anterior", "Erect")
             for d, study, subject, _, view in MIMIC_IMAGES],
            columns=["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                     "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                     "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                     "PatientOrientationCodeSequence_CodeMeaning"])
    metadata.to_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata" + suffix), index=False,
                    compression=compression)
    labels = pd.DataFrame(
            [[subject, study] + [values.get(c, np.nan) for c in MIMIC_LABEL_COLUMNS]
             for (subject, study), values in MIMIC_STUDY_LABELS.items()],
            columns=["subject_id", "study_id"] + MIMIC_LABEL_COLUMNS)
    labels.to_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert" + suffix), index=False,
                  compression=compression)
    for k, (dicom, study, subject, _, _) in enumerate(MIMIC_IMAGES):
        s = str(subject)
        write_jpeg(os.path.join(root, "files", "p" + s[:2], "p" + s, f"s{study}",
                                f"{dicom}.jpg"), seed=k)
    iv = os.path.join(root, iv_subfolder) if iv_subfolder else root
    os.makedirs(iv, exist_ok=True)
    pd.DataFrame(MIMIC_PATIENTS, columns=["subject_id", "gender", "anchor_age", "anchor_year",
                                          "anchor_year_group", "dod"]).to_csv(
            os.path.join(iv, "patients" + suffix), index=False, compression=compression)
    admissions = pd.DataFrame(
            [(subject, 20000000 + k, admit, admit, "", "EW EMER.", "P49AFC", "EMERGENCY ROOM",
              "HOME", insurance, "ENGLISH", "WIDOWED", race, "", "", 0)
             for k, (subject, admit, insurance, race) in enumerate(MIMIC_ADMISSIONS)],
            columns=["subject_id", "hadm_id", "admittime", "dischtime", "deathtime",
                     "admission_type", "admit_provider_id", "admission_location",
                     "discharge_location", "insurance", "language", "marital_status", "race",
                     "edregtime", "edouttime", "hospital_expire_flag"])
    admissions.to_csv(os.path.join(iv, "admissions" + suffix), index=False,
                      compression=compression)
    return root
