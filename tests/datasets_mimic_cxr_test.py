"""Tests of the MIMIC-CXR-JPG loader on a small fixture tree with the real tables."""

import os

import numpy as np
import pandas as pd
import pytest

import dataset_fixtures as fx
from tf_dpfair.datasets import mimic_cxr


def _ids(attribute, *names):
    spec = mimic_cxr.GROUP_SPEC
    return [spec.names(attribute).index(n) for n in names]


def _elements(source):
    elements = list(source.elements().as_numpy_iterator())
    dicoms = [os.path.basename(p)[:-4] for p in source.paths]
    return dict(zip(dicoms, elements))


@pytest.fixture
def root(tmp_path):
    return fx.make_mimic(str(tmp_path))


def test_official_splits_paths_and_dropped_unlabelled_image(root):
    sources = mimic_cxr.load(root, image_size=(8, 8))
    assert set(sources) == {"train", "validation", "test"}
    dicoms = {name: sorted(os.path.basename(p)[:-4] for p in s.paths)
              for name, s in sources.items()}
    assert dicoms == {"train": ["d1", "d2", "d3", "d4"], "validation": ["d5"],
                      "test": ["d6", "d7"]}  # d8's study has no label row
    assert sources["train"].paths[0].endswith(
            os.path.join("files", "p10", "p10000032", "s50000001", "d1.jpg"))


def test_labels_and_uncertain_policies(root):
    zeros = _elements(mimic_cxr.load(root, image_size=(8, 8))["train"])
    ignore = _elements(mimic_cxr.load(root, image_size=(8, 8), uncertain="ignore")["train"])
    # Study 50000001: Atelectasis 1, Edema -1, Pleural Effusion 0, others blank.
    np.testing.assert_array_equal(zeros["d1"]["label"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(zeros["d2"]["label"], [1, 0, 0, 0, 0])  # same study
    np.testing.assert_array_equal(ignore["d1"]["label_mask"], [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(zeros["d3"]["label"], [0, 1, 0, 0, 0])
    ones = _elements(mimic_cxr.load(root, image_size=(8, 8), uncertain="ones")["train"])
    np.testing.assert_array_equal(ones["d4"]["label"], [0, 0, 1, 0, 1])
    assert "label_mask" not in zeros["d1"]


def test_demographics_joined_by_subject(root):
    sources = mimic_cxr.load(root, image_size=(8, 8))
    train = _elements(sources["train"])
    validation = _elements(sources["validation"])
    test = _elements(sources["test"])

    def groups(element):
        return [int(element["groups"][a]) for a in ("sex", "age", "race", "insurance")]

    # 10000032: F, 52; WHITE twice vs BLACK once; Medicare twice vs Medicaid once.
    assert groups(train["d1"]) == (_ids("sex", "female") + _ids("age", "40-59")
                                   + _ids("race", "white") + _ids("insurance", "medicare"))
    # 10000764: M, 86; no admissions.
    assert groups(train["d4"]) == (_ids("sex", "male") + _ids("age", "80+")
                                   + _ids("race", "unknown") + _ids("insurance", "unknown"))
    # 10000898: no patients row; UNKNOWN race is not a vote; insurance tie -> earliest.
    assert groups(validation["d5"]) == (_ids("sex", "unknown") + _ids("age", "unknown")
                                        + _ids("race", "asian") + _ids("insurance", "private"))
    # 10001884: F, 68, HISPANIC/LATINO - PUERTO RICAN, Medicare.
    assert groups(test["d6"]) == (_ids("sex", "female") + _ids("age", "60-79")
                                  + _ids("race", "hispanic") + _ids("insurance", "medicare"))
    # 10002013: F, 39; blank race and OTHER twice; blank insurance is not a vote,
    # Medicare and Medicaid once each -> the earlier admission (Medicaid).
    assert groups(test["d7"]) == (_ids("sex", "female") + _ids("age", "0-39")
                                  + _ids("race", "other") + _ids("insurance", "medicaid"))


def test_subjects_never_span_splits(root):
    sources = mimic_cxr.load(root, image_size=(8, 8))
    subjects = {name: {p.split(os.sep)[-3] for p in s.paths} for name, s in sources.items()}
    names = list(subjects)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not subjects[a] & subjects[b]


def test_frontal_only_uses_the_metadata(root):
    sources = mimic_cxr.load(root, image_size=(8, 8), frontal_only=True)
    assert sorted(os.path.basename(p) for p in sources["train"].paths) == [
            "d1.jpg", "d3.jpg", "d4.jpg"]


def test_uncompressed_tables_and_mimic_iv_elsewhere(tmp_path):
    os.makedirs(tmp_path / "cxr")
    root = fx.make_mimic(str(tmp_path / "cxr"), iv_subfolder="", gzip=False)
    sources = mimic_cxr.load(root, image_size=(8, 8), channels=3)
    assert sources["test"].element_spec["image"].shape == (8, 8, 3)


def test_missing_tables_are_named(tmp_path, root):
    with pytest.raises(FileNotFoundError,
                       match=r"mimic-cxr-2.0.0-split.csv.gz', 'mimic-cxr-2.0.0-split.csv'"):
        mimic_cxr.load(str(tmp_path / "empty"))
    os.remove(os.path.join(root, "files", "p10", "p10000032", "s50000001", "d1.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 of 4 image files are missing.*d1.jpg"):
        mimic_cxr.load(root, mimic_iv_dir=os.path.join(root, "hosp"))
    with pytest.raises(FileNotFoundError,
                       match=r"'patients.csv.gz', 'patients.csv'\] in .*nowhere"):
        mimic_cxr.load(root, mimic_iv_dir=str(tmp_path / "nowhere"))
    os.remove(os.path.join(root, "hosp", "admissions.csv.gz"))
    with pytest.raises(FileNotFoundError, match="admissions.csv.gz.*mimic_iv_dir"):
        mimic_cxr.load(root)


def test_subject_in_two_splits_is_refused(tmp_path):
    root = fx.make_mimic(str(tmp_path))
    path = os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz")
    split = pd.read_csv(path)
    split.loc[split["dicom_id"] == "d3", "split"] = "test"
    split.to_csv(path, index=False, compression="gzip")
    with pytest.raises(ValueError, match="subjects are in several splits, e.g. 10000032"):
        mimic_cxr.load(root)


def test_bad_arguments(root):
    with pytest.raises(ValueError, match="Unknown MIMIC-CXR labels"):
        mimic_cxr.load(root, labels=("Flu",))
    with pytest.raises(ValueError, match="must be one of"):
        mimic_cxr.load(root, uncertain="maybe")


def test_group_mappings():
    assert mimic_cxr.race_group("BLACK/CAPE VERDEAN") == "black"
    assert mimic_cxr.race_group("SOUTH AMERICAN") == "hispanic"
    assert mimic_cxr.race_group("PATIENT DECLINED TO ANSWER") is None
    assert mimic_cxr.race_group("MULTIPLE RACE/ETHNICITY") == "other"
    assert mimic_cxr.insurance_group("Medicaid") == "medicaid"
    assert mimic_cxr.insurance_group("No charge") == "other"
