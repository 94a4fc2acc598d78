"""Tests of the TFDS loaders with tfds.testing.mock_data (nothing is prepared or read)."""

import numpy as np
import pytest

import dataset_fixtures as fx
from tf_dpfair.data import pipeline as data
from tf_dpfair.datasets import chexpert
from tf_dpfair.datasets import tfds as tfds_loader

tfds = pytest.importorskip("tensorflow_datasets")

# The TFDS chexpert builder's class ids: uncertain, positive, negative, unmentioned.
_TFDS_CLASS = {"-1.0": 0, "1.0": 1, "0.0": 2, "": 3}


def _tfds_chexpert_examples(rows, folder="CheXpert-v1.0-small"):
    examples = []
    for k, (path, _, _, view, _, labels) in enumerate(rows):
        examples.append({
                "name": f"{folder}/{path}".encode(),
                "image": np.full((12, 10, 1), 10 * k, np.uint8),
                "label": np.array([_TFDS_CLASS[v] for v in labels], np.int64),
                "image_view": int(view == "Lateral"),
        })
    return examples


def test_chexpert_groups_are_joined_back_by_path(tmp_path):
    fx.make_chexpert(str(tmp_path))
    examples = _tfds_chexpert_examples(fx.CHEXPERT_TRAIN)
    examples.append(dict(examples[0], name=b"CheXpert-v1.0-small/train/patient99999/x.jpg"))

    def as_data_source(self, split, **kwargs):
        assert self.name == "chexpert" and split == "train"
        return examples

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        source = tfds_loader.load_chexpert(split="train", data_dir=str(tmp_path / "tfds"),
                                           manual_dir=str(tmp_path), image_size=(8, 8),
                                           uncertain="ignore")
        elements = list(source.elements().as_numpy_iterator())
    table = chexpert.read_table(str(tmp_path / "CheXpert-v1.0-small" / "train.csv"),
                                uncertain="ignore")
    assert source.num_examples == len(fx.CHEXPERT_TRAIN) + 1
    for k, element in enumerate(elements[:-1]):
        np.testing.assert_array_equal(element["label"], table["label"][k])
        np.testing.assert_array_equal(element["label_mask"], table["label_mask"][k])
        assert element["groups"]["sex"] == table["groups"]["sex"][k]
        assert element["groups"]["age"] == table["groups"]["age"][k]
        assert element["image"].shape == (8, 8, 1)
        assert np.all(element["image"] == 10 * k)
    unknown = elements[-1]["groups"]
    assert (unknown["sex"], unknown["age"]) == (2, 4)  # path not in the CSV
    assert source.group_spec == chexpert.GROUP_SPEC
    x, y, _ = next(iter(data.make_eval_dataset(source, batch_size=4)))
    assert x.shape == (4, 8, 8, 1) and set(y["groups"]) == {"sex", "age"}


def test_generic_loader_with_mocked_imagenet(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        source = tfds_loader.load("imagenet2012", split="validation",
                                  data_dir=str(tmp_path), manual_dir=str(tmp_path),
                                  image_size=(16, 16), channels=3)
        dataset, spec = data.make_train_dataset(source, expected_batch_size=2, seed=0,
                                                num_steps=1)
        x, y, w = next(iter(dataset))
    assert source.num_examples == 6 and source.group_spec.attributes == ()
    assert x.shape == (spec.padded_batch_size, 16, 16, 3) and y.dtype == "int32"


def test_unprepared_datasets_are_refused_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass manual_dir=.*ILSVRC2012"):
        tfds_loader.prepared_builder("imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no manual-download path"):
        tfds_loader.prepared_builder("places365", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        tfds_loader.load("imagenet2012", split="train", data_dir=str(tmp_path), channels=2)
