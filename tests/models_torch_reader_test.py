"""Tests for the torch-free .pth reader, against files written by torch itself."""

import os
import pickle
import zipfile

import numpy as np
import pytest

from tf_dpfair.models.torch_reader import load_torch_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_reads_what_torch_wrote(name):
    expected = np.load(os.path.join(FIXTURES, "tiny_expected.npz"))
    state = load_torch_state_dict(os.path.join(FIXTURES, name))
    assert list(state) == list(expected.files)  # file order is kept
    for key in expected.files:
        assert state[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def test_non_contiguous_and_shared_storage():
    state = load_torch_state_dict(os.path.join(FIXTURES, "tiny_zip.pth"))
    # `transposed` and `slice` are views of one storage; both must be copies.
    np.testing.assert_array_equal(state["slice"], state["transposed"].T[1:3, 2:])
    state["slice"][0, 0] = 123.0
    assert state["transposed"][2, 1] != 123.0


def test_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load posix.system"):
        load_torch_state_dict(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(ValueError, match="neither a zip nor a legacy PyTorch file"):
        load_torch_state_dict(path)
    empty_zip = tmp_path / "empty.pth"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("readme.txt", "nothing")
    with pytest.raises(ValueError, match="without a data.pkl"):
        load_torch_state_dict(empty_zip)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "absent.pth")
