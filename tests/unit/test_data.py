import numpy as np
import pytest

from edgemm.data import load_dataset
from edgemm.errors import InputError
from edgemm.iospec import TensorSpec

SPECS = [TensorSpec("image", "float32", ("batch", 3, 4, 4)), TensorSpec("input_ids", "int64", ("batch", 5))]


def good(n=6):
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((n, 3, 4, 4)).astype(np.float32),
            "input_ids": rng.integers(0, 9, (n, 5)).astype(np.int64)}


def write(tmp_path, name="d.npz", **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_valid_file_and_labels(tmp_path):
    ds = load_dataset(write(tmp_path, **good(), labels=np.arange(6)), specs=SPECS)
    assert ds.num_samples == 6 and ds.labels.tolist() == list(range(6))
    assert len(ds.sha256) == 64


def test_folder_of_files_is_concatenated(tmp_path):
    write(tmp_path, "a.npz", **good(3))
    write(tmp_path, "b.npz", **good(4))
    assert load_dataset(tmp_path, specs=SPECS).num_samples == 7


@pytest.mark.parametrize("mutate, message, field", [
    (lambda d: d["image"].__setitem__((0, 0, 0, 0), np.nan), "NaN/Inf", "image"),
    (lambda d: d["image"].__setitem__((1, 0, 0, 0), np.inf), "NaN/Inf", "image"),
    (lambda d: d.pop("input_ids"), "missing input 'input_ids'", "input_ids"),
    (lambda d: d.__setitem__("extra", np.zeros((6, 2), np.float32)), "unexpected key 'extra'", "extra"),
    (lambda d: d.__setitem__("input_ids", d["input_ids"].astype(np.int32)), "dtype int32", "input_ids"),
    (lambda d: d.__setitem__("image", d["image"][:0]), "no samples", "image"),
    (lambda d: d.__setitem__("image", d["image"][:, :, :2]), "sample shape", "image"),
    (lambda d: d.__setitem__("image", d["image"][:3]), "different sample counts", "axis 0"),
])
def test_bad_data_names_file_and_input(tmp_path, mutate, message, field):
    d = good()
    mutate(d)
    path = write(tmp_path, **d)
    with pytest.raises(InputError) as info:
        load_dataset(path, specs=SPECS)
    text = str(info.value)
    assert message in text and str(path) in text and field in text
    assert "\n" not in text


def test_object_arrays_are_not_unpickled(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="cannot read it safely"):
        load_dataset(p)


def test_not_an_npz(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(p)
