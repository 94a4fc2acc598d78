"""Tests of the CheXpert loader on a small fixture tree with the real CSV layout."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import dataset_fixtures as fx
from tf_dpfair.data import pipeline as data
from tf_dpfair.datasets import chexpert

SEX = {name: i for i, name in enumerate(chexpert.SEX_NAMES)}
AGE = {name: i for i, name in enumerate(chexpert.GROUP_SPEC.names("age"))}


@pytest.fixture
def root(tmp_path):
    fx.make_chexpert(str(tmp_path))
    return str(tmp_path)


def _train_csv(root):
    return os.path.join(root, "CheXpert-v1.0-small", "train.csv")


def test_labels_under_each_uncertain_policy(root):
    # Row 0: Atelectasis -1.0, Cardiomegaly 1.0, Consolidation and Edema blank,
    # Pleural Effusion 0.0. Labels are in EVAL_PATHOLOGIES order.
    zeros = chexpert.read_table(_train_csv(root), uncertain="zeros")
    ones = chexpert.read_table(_train_csv(root), uncertain="ones")
    ignore = chexpert.read_table(_train_csv(root), uncertain="ignore")
    np.testing.assert_array_equal(zeros["label"][0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ones["label"][0], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ignore["label"][0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ignore["label_mask"][0], [0, 1, 1, 1, 1])
    assert zeros["label_mask"] is None and ones["label_mask"] is None
    # Row 1: Consolidation -1.0, Edema 1.0.
    np.testing.assert_array_equal(ignore["label"][1], [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(ignore["label_mask"][1], [1, 1, 0, 1, 1])
    mixed = chexpert.read_table(_train_csv(root), uncertain={"Atelectasis": "ones"})
    np.testing.assert_array_equal(mixed["label"][0], [1, 1, 0, 0, 0])


def test_all_fourteen_labels_and_blank_is_negative(root):
    table = chexpert.read_table(_train_csv(root), labels=chexpert.OBSERVATIONS)
    assert table["label"].shape == (len(fx.CHEXPERT_TRAIN), 14)
    # Row 3 has only "No Finding" = 1.0; everything else is blank, hence 0.
    np.testing.assert_array_equal(table["label"][3], [1] + [0] * 13)


def test_sex_and_age_groups_with_missing_demographics(root):
    table = chexpert.read_table(_train_csv(root))
    sex, age = table["groups"]["sex"], table["groups"]["age"]
    assert (sex[0], age[0]) == (SEX["female"], AGE["60-79"])
    assert (sex[1], age[1]) == (SEX["unknown"], AGE["80+"])
    assert (sex[4], age[4]) == (SEX["male"], AGE["unknown"])
    # Band edges: 20, 39, 40, 59, 60, 79, 80, 95 for rows 5..12.
    expected = ["0-39", "0-39", "40-59", "40-59", "60-79", "60-79", "80+", "80+"]
    np.testing.assert_array_equal(age[5:13], [AGE[band] for band in expected])
    assert list(table["patient"][:5]) == ["patient00001"] + ["patient00002"] * 3 + [
            "patient00003"]


def test_splits_are_patient_disjoint_and_cover_the_data(root):
    sources = chexpert.load(root, image_size=(8, 8), validation_fraction=0.3, seed=3)
    assert set(sources) == {"train", "validation", "test"}

    def patients(source):
        return {re.search(r"patient\d+", p).group(0) for p in source.paths}

    train, validation, test = (patients(sources[k]) for k in ("train", "validation", "test"))
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert len(train | validation) == 15 and test == {"patient64541", "patient64542"}
    assert sources["train"].num_examples + sources["validation"].num_examples == len(
            fx.CHEXPERT_TRAIN)
    # The patient with several studies sits in one split with all its images.
    in_train = sum("patient00002" in p for p in sources["train"].paths)
    assert in_train in (0, 3)
    assert sources["test"].group_spec == chexpert.GROUP_SPEC


def test_loaded_examples_match_the_files(root):
    sources = chexpert.load(root, image_size=(8, 8), validation_fraction=0.0,
                            uncertain="ignore")
    assert set(sources) == {"train", "test"}
    source = sources["train"]
    element = next(iter(source.elements()))
    assert element["image"].shape == (8, 8, 1) and element["image"].dtype == tf.uint8
    expected = data.decode_image(tf.io.read_file(source.paths[0]), (8, 8), 1)
    np.testing.assert_array_equal(element["image"], expected)
    np.testing.assert_array_equal(element["label_mask"], [0, 1, 1, 1, 1])
    assert int(element["groups"]["sex"]) == SEX["female"]
    x, y, w = next(iter(data.make_eval_dataset(source, batch_size=4)))
    assert x.shape == (4, 8, 8, 1) and set(y) == {"label", "label_mask", "groups"}


def test_frontal_only_and_parent_or_dataset_folder(root):
    folder = os.path.join(root, "CheXpert-v1.0-small")
    sources = chexpert.load(folder, image_size=(8, 8), frontal_only=True,
                            validation_fraction=0.0)
    assert sources["train"].num_examples == len(fx.CHEXPERT_TRAIN) - 1
    assert not any("lateral" in p for p in sources["train"].paths)


def test_full_size_folder_name_and_three_channels(tmp_path):
    fx.make_chexpert(str(tmp_path), folder="CheXpert-v1.0")
    sources = chexpert.load(str(tmp_path), image_size=(6, 5), channels=3)
    assert sources["test"].element_spec["image"].shape == (6, 5, 3)


def test_missing_files_are_named(tmp_path, root):
    with pytest.raises(FileNotFoundError, match=r"expected train.csv and valid.csv in"):
        chexpert.load(str(tmp_path / "nowhere"))
    os.remove(os.path.join(root, "CheXpert-v1.0-small", "train", "patient00001", "study1",
                           "view1_frontal.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 of \d+ image files are missing"):
        chexpert.load(root, validation_fraction=0.0)
    chexpert.load(root, validation_fraction=0.0, check_files=False)


def test_bad_tables_and_arguments(tmp_path, root):
    with pytest.raises(ValueError, match="Unknown CheXpert labels"):
        chexpert.read_table(_train_csv(root), labels=("Atelectasis", "Flu"))
    with pytest.raises(ValueError, match="must be one of"):
        chexpert.read_table(_train_csv(root), uncertain="maybe")
    with pytest.raises(ValueError, match="unknown labels"):
        chexpert.read_table(_train_csv(root), uncertain={"Flu": "ones"})
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        chexpert.load(root, validation_fraction=1.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("Path,Sex,Age\nx/train/patient1/study1/a.jpg,Male,3\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['Frontal/Lateral'"):
        chexpert.read_table(str(bad))
    row = list(fx.CHEXPERT_TRAIN[0])
    row[5] = fx._labels(Atelectasis="2.0")
    other = tmp_path / "other"
    fx.make_chexpert(str(other), rows=[tuple(row)])
    with pytest.raises(ValueError, match="must be 1.0, 0.0, -1.0 or blank; got 2.0"):
        chexpert.load(str(other))
    nameless = list(fx.CHEXPERT_TRAIN[0])
    nameless[0] = "train/p1/study1/view1_frontal.jpg"
    third = tmp_path / "third"
    fx.make_chexpert(str(third), rows=[tuple(nameless)])
    with pytest.raises(ValueError, match="no patient id"):
        chexpert.load(str(third))


def test_patient_in_train_and_valid_is_refused(tmp_path):
    row = list(fx.CHEXPERT_TRAIN[0])
    row[0] = "train/patient64541/study1/view1_frontal.jpg"
    fx.make_chexpert(str(tmp_path), rows=[tuple(row)])
    with pytest.raises(ValueError, match="appear in both train.csv and valid.csv"):
        chexpert.load(str(tmp_path))
